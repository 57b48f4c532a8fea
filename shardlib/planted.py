"""Planted shards: synthetic updates with known ground-truth directions (the positive control).

Ground-truth shards live in a real model's parameter shapes, are sparse in which tensors
they touch, low rank in each matrix, fire with Zipfian frequencies, a few per event, with
signed coefficients (an RL update's sign follows its advantage) and Gaussian noise.
An SAE that cannot recover these cannot be trusted on real updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from .common import dense_parameter_count, flatten, progress_bar
from .config import Params, param


def model_shapes(d_model: int = 64, d_ff: int = 128, n_layers: int = 2, patterns=("mlp", "attn")) -> dict[str, tuple]:
    """Weight shapes of the tiny Llama policy (built locally, nothing downloaded)."""
    from .policy import tiny_lm

    m = tiny_lm(32, d_model, n_layers, max(1, d_model // 16), d_ff)
    keep = {"mlp": "mlp.", "attn": "self_attn."}
    return {n: tuple(p.shape) for n, p in m.named_parameters() if p.ndim == 2 and any(keep[k] in n for k in patterns)}


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
):
    """Returns (updates {name: [n_events, *shape]}, truth {name: [n_shards, *shape]} unit norm overall,
    codes [n_events, n_shards], frequencies [n_shards])."""
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    truth = {n: torch.zeros(n_shards, *shapes[n]) for n in names}
    for j in range(n_shards):
        chosen = torch.randperm(len(names), generator=g)[: min(tensors_per_shard, len(names))].tolist()
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
    # Zipfian firing probabilities scaled to the requested mean number of active shards
    base = 1.0 / np.arange(1, n_shards + 1) ** zipf
    c = active_per_event / base.sum()
    freq = np.clip(c * base, 0, 1)
    active = torch.rand(n_events, n_shards, generator=g) < torch.tensor(freq, dtype=torch.float32)
    mag = 0.5 + torch.rand(n_events, n_shards, generator=g)
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
    data_seed: int = param(0, "seed of the synthetic data", ge=0)
    n_latents: int = param(32, "SAE latents", ge=1)
    k: int = param(4, "SAE active latents per update", ge=1)
    ranks: list[int] = param([1, 2, 0], "SAE ranks to compare (0 = dense baseline)")
    seeds: list[int] = param([0, 1], "SAE seeds (seed-to-seed stability needs two or more)")
    signed: bool = param(True, "signed TopK (planted coefficients are signed)")
    epochs: int = param(10, "SAE epochs", ge=1)
    batch_size: int = param(128, "SAE batch size", ge=1)
    lr: float = param(3e-3, "SAE learning rate", gt=0)
    device: str = param("auto", "'cpu', 'cuda' or 'auto'", choices=("auto", "cpu", "cuda"))

    def check(self):
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
    import time

    from . import metrics
    from .shards import ShardParams, evaluate, train

    sp = ShardParams.from_dict(
        {
            "out_dir": f"{p.out_dir}/sae_rank{rank}_seed{seed}",
            "seed": seed,
            "store_path": "planted",
            "n_latents": p.n_latents,
            "k": p.k,
            "rank": rank,
            "signed": p.signed,
            "epochs": p.epochs,
            "batch_size": p.batch_size,
            "lr": p.lr,
            "device": p.device,
            "skip_zero_updates": False,
            "checkpoint_every": p.epochs,
        }
    )
    t0 = time.perf_counter()
    res = train(sp, progress=False, data=data)
    dt = time.perf_counter() - t0
    sae = res.sae.cpu()
    m = metrics.recovery(G, flatten(sae.directions(), names))
    m.update(evaluate(sae, data, res.heldout_idx))
    m.update(seconds=dt, seconds_per_epoch=dt / p.epochs, n_parameters=sae.n_parameters())
    return m, sae


def run(p: PlantedParams, progress: bool = True) -> xr.Dataset:
    """The stage: :func:`run_control`, written to ``results.nc``."""
    from pathlib import Path

    from .io import save_results

    ds, _ = run_control(p, progress)
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds
