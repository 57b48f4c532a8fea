"""Planted shards: synthetic updates with known ground-truth directions (the positive control).

Ground-truth shards live in a real model's parameter shapes, are sparse in which tensors
they touch, low rank in each matrix, fire with Zipfian frequencies, a few per event, with
signed coefficients (an RL update's sign follows its advantage) and Gaussian noise.
An SAE that cannot recover these cannot be trusted on real updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from .common import dense_parameter_count, flatten, progress_bar
from .config import SEED_MAX, Params, param


def model_shapes(d_model: int = 64, d_ff: int = 128, n_layers: int = 2, patterns=("mlp", "attn")) -> dict[str, tuple]:
    """Parameter shapes of the tiny Llama policy (built locally, nothing downloaded).

    ``patterns``: ``"mlp"`` and ``"attn"`` select the layers' weight matrices, ``"norm"`` their
    RMSNorm weight vectors (the vectors a shard may touch besides matrices).
    """
    from .policy import tiny_lm

    m = tiny_lm(32, d_model, n_layers, max(1, d_model // 16), d_ff)
    keep = {"mlp": ("mlp.", 2), "attn": ("self_attn.", 2), "norm": ("layernorm.", 1)}
    return {
        n: tuple(p.shape)
        for n, p in m.named_parameters()
        if any(keep[k][0] in n and p.ndim == keep[k][1] for k in patterns)
    }


def planted_updates(
    shapes: dict[str, tuple],
    n_shards: int = 16,
    n_events: int = 4096,
    active_per_event: float = 2.0,
    rank: int = 1,
    tensors_per_shard: int = 2,
    zipf: float = 1.0,
    noise: float = 0.05,
    signed: bool = True,
    seed: int = 0,
    *,
    min_tensors_per_shard: int | None = None,
    coefficients: str = "uniform",
    exact_active: bool = False,
):
    """Synthetic updates from known shards.

    Each shard touches ``tensors_per_shard`` tensors (or a number drawn uniformly from
    ``min_tensors_per_shard..tensors_per_shard``), rank ``rank`` in each matrix, a dense vector
    in each vector tensor, unit norm over all tensors. Shards fire with Zipfian frequencies
    (exponent ``zipf``): independently with a mean of ``active_per_event`` per event, or, with
    ``exact_active``, exactly ``active_per_event`` distinct shards per event drawn with those
    weights. Magnitudes are uniform in [0.5, 1.5] (``coefficients="uniform"``) or log-normal with
    median 1 and sigma 1 (``"lognormal"``, heavy-tailed); signs are random when ``signed``.
    Noise of norm about ``noise`` per event is added.

    Returns (updates {name: [n_events, *shape]}, truth {name: [n_shards, *shape]} unit norm
    overall, codes [n_events, n_shards], frequencies [n_shards]).
    """
    if coefficients not in ("uniform", "lognormal"):
        raise ValueError(f"coefficients must be 'uniform' or 'lognormal', got {coefficients!r}")
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    truth = {n: torch.zeros(n_shards, *shapes[n]) for n in names}
    lo = tensors_per_shard if min_tensors_per_shard is None else min_tensors_per_shard
    for j in range(n_shards):
        count = int(torch.randint(lo, tensors_per_shard + 1, (1,), generator=g)) if lo < tensors_per_shard else lo
        chosen = torch.randperm(len(names), generator=g)[: min(count, len(names))].tolist()
        for c in chosen:
            n = names[c]
            if len(shapes[n]) == 2:
                d_out, d_in = shapes[n]
                truth[n][j] = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
            else:
                truth[n][j] = torch.randn(shapes[n], generator=g)
    norm = sum((truth[n] ** 2).reshape(n_shards, -1).sum(1) for n in names).sqrt()
    for n in names:
        truth[n] /= norm.view(-1, *([1] * len(shapes[n])))
    base = 1.0 / np.arange(1, n_shards + 1) ** zipf
    if exact_active:
        m = int(round(active_per_event))
        if not 1 <= m <= n_shards:
            raise ValueError(f"exact_active needs 1 <= active_per_event <= n_shards, got {active_per_event}")
        # Gumbel top-m: m distinct shards per event, drawn with probabilities proportional to base
        u = torch.rand(n_events, n_shards, generator=g).clamp(1e-12, 1 - 1e-12)
        keys = torch.log(torch.tensor(base, dtype=torch.float32)) - torch.log(-torch.log(u))
        active = torch.zeros(n_events, n_shards, dtype=torch.bool).scatter_(1, keys.topk(m, dim=1).indices, True)
        freq = active.float().mean(0).numpy().astype(np.float64)
    else:
        # Zipfian firing probabilities scaled to the requested mean number of active shards
        freq = np.clip(active_per_event / base.sum() * base, 0, 1)
        active = torch.rand(n_events, n_shards, generator=g) < torch.tensor(freq, dtype=torch.float32)
    if coefficients == "uniform":
        mag = 0.5 + torch.rand(n_events, n_shards, generator=g)
    else:
        mag = torch.exp(torch.randn(n_events, n_shards, generator=g))
    sign = (
        torch.where(torch.rand(n_events, n_shards, generator=g) < 0.5, -1.0, 1.0)
        if signed
        else torch.ones(n_events, n_shards)
    )
    codes = active * mag * sign
    D = sum(math.prod(s) for s in shapes.values())
    updates = {}
    for n in names:
        flat = codes @ truth[n].reshape(n_shards, -1)
        flat = flat + noise * torch.randn(flat.shape, generator=g) / math.sqrt(D)
        updates[n] = flat.view(n_events, *shapes[n])
    return updates, truth, codes, freq


def planted_factored(
    shapes: dict[str, tuple],
    n_shards: int = 16,
    n_events: int = 1024,
    active: int = 2,
    rank: int = 1,
    zipf: float = 1.0,
    noise: float = 0.05,
    noise_factors: int = 8,
    seed: int = 0,
):
    """Synthetic *factored* updates of weight matrices, never dense: each shard is a rank-``rank`` matrix
    in one matrix (chosen at random), unit norm; each event holds exactly ``active`` distinct shards
    (Zipf-weighted, as ``planted_updates(exact_active=True)``) with log-normal magnitudes and random
    signs, plus ``noise_factors`` random rank-1 terms of total norm about ``noise``. An event's factors:
    ``code * A_s`` and ``B_s`` of its shards, then the noise terms (what a collector of ``active * rank +
    noise_factors`` factors per event would store).

    Returns (updates {name: Factored [n_events]}, truth {name: Factored [n_shards]} with ``rank``
    factors each (zero where the shard is elsewhere), codes [n_events, n_shards]).
    """
    from .factored import Factored

    if any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"planted_factored plants matrices only; got shapes {shapes}")
    if not 1 <= active <= n_shards:
        raise ValueError(f"active must be between 1 and n_shards={n_shards}, got {active}")
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    where = torch.randint(len(names), (n_shards,), generator=g)
    truth = {}
    for t, n in enumerate(names):
        d_out, d_in = shapes[n]
        A = torch.randn(n_shards, rank, d_out, generator=g) * (where == t).view(-1, 1, 1)
        B = torch.randn(n_shards, rank, d_in, generator=g) * (where == t).view(-1, 1, 1)  # zero rows: padding
        truth[n] = Factored(A, B)
    norm = sum(f.sq_norms() for f in truth.values()).sqrt()
    truth = {
        n: Factored(f.left / norm.sqrt().view(-1, 1, 1), f.right / norm.sqrt().view(-1, 1, 1)) for n, f in truth.items()
    }
    base = torch.tensor(1.0 / np.arange(1, n_shards + 1) ** zipf, dtype=torch.float32)
    u = torch.rand(n_events, n_shards, generator=g).clamp(1e-12, 1 - 1e-12)
    idx = (torch.log(base) - torch.log(-torch.log(u))).topk(active, dim=1).indices  # [E, active]
    mag = torch.exp(torch.randn(n_events, active, generator=g))
    sign = torch.where(torch.rand(n_events, active, generator=g) < 0.5, -1.0, 1.0)
    coef = mag * sign
    codes = torch.zeros(n_events, n_shards).scatter_(1, idx, coef)
    updates = {}
    for n in names:
        d_out, d_in = shapes[n]
        left = (truth[n].left[idx] * coef.view(n_events, active, 1, 1)).reshape(n_events, active * rank, d_out)
        right = truth[n].right[idx].reshape(n_events, active * rank, d_in)
        q = noise / math.sqrt(noise_factors * len(names))
        nl = torch.randn(n_events, noise_factors, d_out, generator=g) * (q / math.sqrt(d_out))
        nr = torch.randn(n_events, noise_factors, d_in, generator=g) / math.sqrt(d_in)
        updates[n] = Factored(torch.cat([left, nl], 1), torch.cat([right, nr], 1))
    return updates, truth, codes


def factored_cosines(truth: dict, sae) -> np.ndarray:
    """|cos| between planted factored shards and a low-rank SAE's decoder directions [n_shards, n_latents],
    from factor Gram matrices (<A B^T, U V^T> = sum (A^T U) * (B^T V)): no matrix is formed."""
    inner = 0.0
    for n, part in zip(sae.names, sae.dec.values()):
        A, B = truth[n].left, truth[n].right  # [S, r, d]
        U, V = part.U.detach(), part.V.detach()  # [F, r', d]
        inner = inner + (torch.einsum("sao,fbo->sfab", A, U) * torch.einsum("sai,fbi->sfab", B, V)).sum((2, 3))
    t_norm = sum(f.sq_norms() for f in truth.values()).sqrt()
    return (inner.abs() / (t_norm[:, None] * sae.decoder_norms().detach()[None])).numpy()


# ---------------------------------------------------------------------------
# the planted family: stores of other kinds than the default, to check the SAE's defaults on

FAMILY = {
    "mlp_rank1": dict(
        patterns=("mlp",),
        n_layers=2,
        n_shards=16,
        rank=1,
        tensors=(2, 2),
        coefficients="uniform",
        active=2,
        zipf=1.0,
        noise=0.05,
    ),
    "mixed_rank2": dict(
        patterns=("mlp", "norm"),
        n_layers=1,
        n_shards=24,
        rank=2,
        tensors=(1, 2),
        coefficients="lognormal",
        active=3,
        zipf=1.0,
        noise=0.05,
    ),
    "attn_heavy": dict(
        patterns=("attn", "norm"),
        n_layers=1,
        n_shards=16,
        rank=1,
        tensors=(1, 3),
        coefficients="lognormal",
        active=2,
        zipf=1.5,
        noise=0.1,
    ),
}
"""Members of the planted family: which tensors of the tiny Llama (d_model 64, d_ff 128) shards live in
(``norm`` adds RMSNorm weight vectors), how many shards, their rank per matrix, how many tensors each
touches (min, max), the coefficient law (log-normal: heavy-tailed), exactly ``active`` shards per update
drawn with Zipf weights, and the noise."""

SAE_KINDS = {"signed": (True, 1), "relu": (False, 2)}
"""How each member is fitted: signed TopK with one latent per shard, ReLU TopK with two (one per sign)."""


def family_shapes(member: str) -> dict[str, tuple]:
    """Parameter shapes one member of :data:`FAMILY` lives in."""
    m = FAMILY[member]
    return model_shapes(64, 128, m["n_layers"], m["patterns"])


def family_store(member: str, n_events: int, seed: int):
    """(shapes, ``planted_updates(...)``) of one member of :data:`FAMILY`."""
    m = FAMILY[member]
    shapes = family_shapes(member)
    lo, hi = m["tensors"]
    data = planted_updates(
        shapes,
        m["n_shards"],
        n_events,
        m["active"],
        m["rank"],
        hi,
        m["zipf"],
        m["noise"],
        True,
        seed,
        min_tensors_per_shard=lo,
        coefficients=m["coefficients"],
        exact_active=True,
    )
    return shapes, data


def fit_family(p: PlantedParams, progress: bool = True) -> xr.Dataset:
    """Every member x SAE kind x seed at the shard stage's defaults, given n_latents, k = active shards per
    update and rank = the planted rank: recovery, FVU, dead fraction, time and parameters."""
    keys = ["mmcs_g2d", "r@0.9", "hungarian_mcc", "fvu", "dead_fraction", "seconds", "n_parameters"]
    out = {k: np.full((len(p.family), len(SAE_KINDS), len(p.family_seeds)), np.nan) for k in keys}
    jobs = [(i, m, s, seed) for i, m in enumerate(p.family) for s, seed in enumerate(p.family_seeds)]
    for i, member, s, seed in progress_bar(jobs, desc="family", disable=not progress):
        shapes, (data, truth, _, _) = family_store(member, p.family_events, seed)
        names = list(shapes)
        G = flatten(truth, names)
        fm = FAMILY[member]
        for j, (kind, (signed, per_shard)) in enumerate(SAE_KINDS.items()):
            settings = {
                "out_dir": f"{p.out_dir}/family/{member}_{kind}_seed{seed}",
                "seed": seed,
                "n_latents": per_shard * fm["n_shards"],
                "k": fm["active"],
                "rank": fm["rank"],
                "signed": signed,
                "device": p.device,
            }
            row, _ = fit_planted(settings, data, G, names)
            for k in keys:
                out[k][i, j, s] = row[k]
    dims = ("member", "sae", "family_seed")
    ds = xr.Dataset(
        {"family_" + k.replace("@", "_at_"): (dims, v) for k, v in out.items()},
        coords={"member": list(p.family), "sae": list(SAE_KINDS), "family_seed": list(p.family_seeds)},
    )
    ds["family_n_shards"] = ("member", [FAMILY[m]["n_shards"] for m in p.family])
    ds["family_dims"] = ("member", [sum(math.prod(v) for v in family_shapes(m).values()) for m in p.family])
    return ds


# ---------------------------------------------------------------------------
# the positive-control experiment


@dataclass(frozen=True)
class PlantedParams(Params):
    """Parameters of the planted-shard positive control (``notebooks/04_planted.ipynb``)."""

    d_model: int = param(64, "shapes: hidden size of the tiny Llama whose weight shapes are used", ge=8)
    d_ff: int = param(128, "shapes: MLP width", ge=8)
    n_layers: int = param(2, "shapes: layers", ge=1)
    tensors: list[str] = param(["mlp"], "which weight groups: 'mlp' and/or 'attn'")
    n_shards: int = param(16, "ground-truth shards", ge=1)
    n_events: int = param(2048, "synthetic updates", ge=16)
    active_per_event: float = param(2.0, "mean number of shards active per update", gt=0)
    planted_rank: int = param(1, "rank of each ground-truth shard per matrix", ge=1)
    tensors_per_shard: int = param(2, "tensors each ground-truth shard touches", ge=1)
    zipf: float = param(1.0, "Zipf exponent of the shards' firing frequencies", ge=0)
    noise: float = param(0.05, "noise norm relative to a unit shard", ge=0)
    data_seed: int = param(0, "seed of the synthetic data", ge=0, le=SEED_MAX)
    n_latents: int = param(32, "SAE latents", ge=1)
    k: int = param(4, "SAE active latents per update", ge=1)
    ranks: list[int] = param([1, 2, 0], "SAE ranks to compare (0 = dense baseline)")
    seeds: list[int] = param([0, 1], "SAE seeds (seed-to-seed stability needs two or more)", ge=0, le=SEED_MAX)
    signed: bool = param(True, "signed TopK (planted coefficients are signed)")
    epochs: int = param(10, "SAE epochs", ge=1)
    batch_size: int = param(128, "SAE batch size", ge=1)
    lr: float = param(0.03, "SAE learning rate (relative, as the shard stage's lr)", gt=0)
    device: str = param("auto", "'cpu', 'cuda' or 'auto'", choices=("auto", "cpu", "cuda"))
    family: list[str] = param(
        ["mlp_rank1", "mixed_rank2", "attn_heavy"],
        "members of the planted family (planted.FAMILY) each fitted by a signed and a ReLU SAE at the shard stage's"
        " defaults ([] = none)",
    )
    family_events: int = param(2048, "family: synthetic updates per member", ge=16)
    family_seeds: list[int] = param([0, 1], "family: seeds (data and SAE)", ge=0, le=SEED_MAX)

    def check(self):
        unknown = [m for m in self.family if m not in FAMILY]
        if unknown:
            raise ValueError(f"parameter 'family': unknown member(s) {unknown}; accepted: {sorted(FAMILY)}")
        if self.family and not self.family_seeds:
            raise ValueError("parameter 'family_seeds': give at least one seed")
        bad = [t for t in self.tensors if t not in ("mlp", "attn")]
        if bad or not self.tensors:
            raise ValueError(
                f"parameter 'tensors': got {list(self.tensors)}; accepted: a non-empty list of 'mlp', 'attn'"
            )
        if any(r < 0 for r in self.ranks) or not self.ranks:
            raise ValueError(f"parameter 'ranks': got {list(self.ranks)}; accepted: ranks >= 0 (0 = dense)")
        if not self.seeds:
            raise ValueError("parameter 'seeds': give at least one seed")


def planted_store(p: PlantedParams):
    """(tensor shapes, ``planted_updates(...)``) of the control's configuration: the data every SAE of the
    stage (and ``benchmarks/bench_sae.py``) trains on."""
    shapes = model_shapes(p.d_model, p.d_ff, p.n_layers, tuple(p.tensors))
    args = (p.n_shards, p.n_events, p.active_per_event, p.planted_rank, p.tensors_per_shard, p.zipf, p.noise)
    return shapes, planted_updates(shapes, *args, True, p.data_seed)


RECOVERY_KEYS = [
    "mmcs_g2d",
    "mmcs_d2g",
    "r@0.9",
    "uniqueness",
    "hungarian_mcc",
    "fvu",
    "l0",
    "dead_fraction",
    "seconds",
    "seconds_per_epoch",
    "n_parameters",
]


def run_control(p: PlantedParams, progress: bool = True):
    """Train an SAE per (rank, seed) on the same planted data; returns (results Dataset, SAEs)."""

    from . import metrics

    shapes, (data, truth, codes, freq) = planted_store(p)
    names = list(shapes)
    G = flatten(truth, names)
    rows, saes = {}, {}
    for rank in progress_bar(p.ranks, desc="ranks", disable=not progress):
        for seed in p.seeds:
            rows[(rank, seed)], saes[(rank, seed)] = fit_one(p, rank, seed, data, G, names)
    ds = xr.Dataset(
        {
            k.replace("@", "_at_"): (("rank", "seed"), [[rows[(r, s)][k] for s in p.seeds] for r in p.ranks])
            for k in RECOVERY_KEYS
        },
        coords={"rank": list(p.ranks), "seed": list(p.seeds)},
    )
    stability = [metrics.seed_stability([flatten(saes[(r, s)].directions(), names) for s in p.seeds]) for r in p.ranks]
    ds["seed_stability"] = ("rank", stability)
    ds["frequency"] = ("truth", freq)
    ds["dense_n_parameters"] = dense_parameter_count({"update": (G.shape[1],)}, p.n_latents)
    ds.attrs["n_params_per_update"] = int(G.shape[1])
    ds.attrs["tensors"] = ",".join(names)
    return ds, saes


def fit_one(p: PlantedParams, rank: int, seed: int, data, G: np.ndarray, names: list[str]):
    """One SAE of the control: its recovery of the planted directions ``G``, held-out metrics, time; (row, SAE)."""
    settings = {
        "out_dir": f"{p.out_dir}/sae_rank{rank}_seed{seed}",
        "seed": seed,
        "n_latents": p.n_latents,
        "k": p.k,
        "rank": rank,
        "signed": p.signed,
        "epochs": p.epochs,
        "batch_size": p.batch_size,
        "lr": p.lr,
        "device": p.device,
        "checkpoint_every": p.epochs,
    }
    m, res = fit_planted(settings, data, G, names)
    m["seconds_per_epoch"] = m["seconds"] / p.epochs
    return m, res.sae


def fit_planted(settings: dict, data, G: np.ndarray, names: list[str]):
    """Train one shard SAE (:class:`~shardlib.fit.FitParams` fields ``settings``, on the planted ``data`` itself) and
    score it: recovery of the planted directions ``G`` (rows in ``names`` order), held-out metrics, wall
    time ``seconds`` and ``n_parameters``. Returns (row, :class:`~shardlib.fit.ShardTraining` with the
    SAE on the CPU)."""
    from . import metrics
    from .fit import FitParams, evaluate, fit

    sp = FitParams.from_dict(settings)
    t0 = time.perf_counter()
    res = fit(sp, data, progress=False)
    dt = time.perf_counter() - t0
    res.sae = res.sae.cpu()
    row = metrics.recovery(G, flatten(res.sae.directions(), names))
    row.update(evaluate(res.sae, data, res.heldout_idx))
    row.update(seconds=dt, n_parameters=res.sae.n_parameters())
    return row, res


def run(p: PlantedParams, progress: bool = True) -> xr.Dataset:
    """The stage: :func:`run_control`, written to ``results.nc``."""
    from pathlib import Path

    from .io import save_results

    ds, _ = run_control(p, progress)
    if p.family:
        ds = xr.merge([ds, fit_family(p, progress)], combine_attrs="override")
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds
