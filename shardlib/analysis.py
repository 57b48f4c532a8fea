"""What shards mean (alignment with event types) and what they do (parameter interventions).

Alignment, each against two baselines (field notes §6: always compare with shuffled labels):
- purity: for each latent that fires, the share of its firing events that belong to its
  most common event type; mean over firing latents (1 for a perfect dictionary);
- best-latent AUROC per event type: max over latents of the AUROC of |activation| as a
  detector of that type;
- Hungarian matching of shard directions to the per-type mean updates (mean |cos|);
baselines: the same statistics with event types shuffled across events, and a dictionary
of random directions with the SAE's structure (random rank-r factors per matrix).

Interventions (the parameter-space analogue of the maze policy's "cheese vector"):
``theta_base + alpha * scale * shard`` with ``scale`` = the norm of the total RL update on
the shard's tensors, and ablation ``theta_final - <delta_total, shard> shard``; reward per
task family is measured on fixed held-out prompts, against random directions of the same
norm and structure.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .config import SEED_MAX, Params, param
from .events import event_type_labels, event_types
from .io import save_results
from .metrics import abs_cos, hungarian_mcc, seed_stability
from .sae import ShardSAE

# ---------------------------------------------------------------------------
# alignment metrics


def type_means(updates: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, list[str]]:
    types = np.asarray(types)
    names = [str(t) for t in np.unique(types)]
    return np.stack([updates[types == t].mean(0) for t in np.unique(types)]), names


def random_dictionary(shapes: dict[str, tuple], n: int, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` random unit directions with the SAE's structure (rank-r per matrix; dense if rank = 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in shapes.items():
        if rank > 0 and len(s) == 2:
            out[name] = torch.einsum(
                "for,fir->foi", torch.randn(n, s[0], rank, generator=g), torch.randn(n, s[1], rank, generator=g)
            )
        else:
            out[name] = torch.randn(n, *s, generator=g)
    norm = sum((v.reshape(n, -1) ** 2).sum(1) for v in out.values()).sqrt()
    return {k: v / norm.view(-1, *([1] * (v.ndim - 1))) for k, v in out.items()}


ALIGNMENT_METRICS = {
    "purity": "firing-weighted purity of (latent, sign) clusters: share of firings on their cluster's majority type",
    "nmi": "normalized mutual information between each event's top (latent, sign) and its type (scikit-learn)",
    "ari": "adjusted Rand index between each event's top (latent, sign) and its type (scikit-learn; chance = 0)",
    "auroc": "mean over types of the best (latent, sign) cluster's AUROC, its rectified activation as the score",
    "type_match": "Hungarian mean |cos| between type-mean updates and dictionary directions",
    "types_matched": "types whose mean update has a dictionary direction at |cos| > 0.9",
}


def alignment(
    codes: np.ndarray,
    types: np.ndarray,
    updates: np.ndarray,
    directions: np.ndarray,
    random_dirs: np.ndarray,
    k: int,
    seed: int = 0,
    signed: bool = True,
) -> dict[str, float]:
    """Every ``ALIGNMENT_METRICS`` entry, with ``_shuffled`` (the same codes, event types permuted) and
    ``_random`` (a random dictionary of the SAE's structure: its top-``k`` signed projections as codes,
    its directions for the type matches) baselines, and ``n_types``."""
    from . import metrics as M

    shuffled = np.random.default_rng(seed).permutation(types)
    rand_codes = M.random_codes(updates, random_dirs, k, signed)
    means, means_s = type_means(updates, types)[0], type_means(updates, shuffled)[0]
    clustering = {
        "purity": M.weighted_purity,
        "nmi": M.nmi,
        "ari": M.ari,
        "auroc": lambda c, t: float(np.nanmean(list(M.best_signed_auroc(c, t).values()))),
    }
    out = {}
    for name, f in clustering.items():
        out[name], out[f"{name}_shuffled"], out[f"{name}_random"] = (
            f(codes, types),
            f(codes, shuffled),
            f(rand_codes, types),
        )
    out["type_match"] = hungarian_mcc(means, directions)
    out["type_match_shuffled"] = hungarian_mcc(means_s, directions)
    out["type_match_random"] = hungarian_mcc(means, random_dirs)
    out["types_matched"] = M.types_matched(means, directions)
    out["types_matched_shuffled"] = M.types_matched(means_s, directions)
    out["types_matched_random"] = M.types_matched(means, random_dirs)
    out["n_types"] = len(means)
    return out


# ---------------------------------------------------------------------------
# interventions


def add_direction(model, direction: dict[str, torch.Tensor], alpha: float):
    """A copy of ``model`` with ``alpha * direction`` added to the named parameters."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, d in direction.items():
            params[name].add_(alpha * d.to(params[name].dtype))
    return m


def project_out(model, direction: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]):
    """``model`` minus the component of ``delta`` along the (unit) ``direction``."""
    c = float(sum((direction[n] * delta[n]).sum() for n in direction))
    return add_direction(model, direction, -c), c


def param_delta(base, final, names) -> dict[str, torch.Tensor]:
    pb, pf = dict(base.named_parameters()), dict(final.named_parameters())
    return {n: (pf[n] - pb[n]).detach().float() for n in names}


# ---------------------------------------------------------------------------
# the stage


@dataclass(frozen=True)
class AnalysisParams(Params):
    """Parameters of the shard analysis (``notebooks/07_shard_analysis.ipynb``)."""

    shards_dir: str = param("", "a shard stage's folder (shards.nc, activations.nc, results.nc)")
    rl_dir: str = param(
        "",
        "the RL stage folder whose updates the shards were trained on (init_policy/, policy/); '' (a store written "
        "by another trainer, e.g. TRL): alignment only, no interventions and no online-shards comparison",
    )
    event_type_label: str = param(
        "",
        "'' = shardlib's event types (shardlib.events: task x correctness, bandit: cluster x arm); else the store "
        "label whose values are the event types as they are (e.g. 'task' from collect_updates(columns=['task']))",
    )
    extra_seeds: list[int] = param(
        [1, 2], "more SAE seeds trained on the same store, for seed-to-seed stability", ge=0, le=SEED_MAX
    )
    alphas: list[float] = param(
        [-1.0, 1.0], "intervention strengths, relative to the total RL update's norm on the shard's tensors"
    )
    settings_k: list[int] = param(
        [1, 4], "settings comparison: k of the SAEs trained (other parameters: the shard stage's)"
    )
    settings_normalize: list[bool] = param(
        [False, True], "settings comparison: raw and/or unit-normalised updates ([] = no comparison)"
    )
    n_shards: int = param(16, "intervene on this many most frequent shards", ge=1)
    n_random: int = param(16, "random directions of the same structure as the intervention baseline", ge=1)
    eval_prompts: int = param(512, "held-out prompts per intervention evaluation", ge=1)

    def check(self):
        if not self.shards_dir:
            raise ValueError("parameter 'shards_dir': the shard stage's folder is needed")


@dataclass
class AnalysisInputs:
    """What the analysis reads: a shard stage's files and the update store it was trained on."""

    shards: xr.Dataset
    """``shards.nc`` of the shard stage."""
    acts: xr.Dataset
    """``activations.nc``: every event's active shards and labels."""
    sae_params: object
    """The shard stage's :class:`~shardlib.shards.ShardParams`."""
    data: dict[str, torch.Tensor]
    """The store's updates, the same events as ``acts``."""
    store: xr.Dataset
    """The store's labels for the same events."""
    dirs: dict[str, np.ndarray]
    """Each shard's unit direction per tensor, ``{param: [shard, *shape]}``."""

    @property
    def names(self) -> list[str]:
        return list(self.dirs)

    @property
    def n_shards(self) -> int:
        return self.shards.sizes["shard"]


def load_inputs(p: AnalysisParams) -> AnalysisInputs:
    """Shard directions, activations, the SAE config, and the store's updates (same events)."""
    from .io import load_results
    from .shardfile import shard_directions
    from .shards import ShardParams, load_updates

    sd = Path(p.shards_dir)
    sh, acts = load_results(sd / "shards.nc"), load_results(sd / "activations.nc")
    sp = ShardParams.from_dict(json.loads(sh.attrs["config"]))
    data, store = load_updates(sp.store_path, sp.params, sp.skip_zero_updates, sp.normalize)
    return AnalysisInputs(sh, acts, sp, data, store, shard_directions(sh))


def intervention_effects(p: AnalysisParams, dirs: dict[str, np.ndarray], order: np.ndarray, rank: int):
    """Effect of adding each shard (and random directions) to the base policy, and of ablating
    each shard from the fine-tuned policy: reward change per task family."""
    from .policy import evaluate, load_policy
    from .rl import RLParams, make_testbed

    rp = RLParams.from_dict(json.loads(xr.open_dataset(Path(p.rl_dir) / "results.nc").attrs["config"]))
    testbed = make_testbed(rp)
    base = load_policy(Path(p.rl_dir) / "init_policy").eval()
    final = load_policy(Path(p.rl_dir) / "policy").eval()
    names = list(dirs)
    delta = param_delta(base, final, names)
    scale = float(sum((d**2).sum() for d in delta.values()).sqrt())
    ev = lambda m: np.array(evaluate(m, testbed, p.eval_prompts, p.seed, rp.temperature)["reward"])
    r_base, r_final = ev(base), ev(final)
    shard_ids = order[: p.n_shards]
    rand = random_dictionary({n: dirs[n].shape[1:] for n in names}, p.n_random, rank, p.seed + 1)
    add, add_rand, abl, coef = [], [], [], []
    for i in shard_ids:
        d = {n: torch.from_numpy(dirs[n][i]) for n in names}
        add.append([ev(add_direction(base, d, a * scale)) - r_base for a in p.alphas])
        m, c = project_out(final, d, delta)
        abl.append(ev(m) - r_final)
        coef.append(c)
    for j in range(p.n_random):
        d = {n: rand[n][j] for n in names}
        add_rand.append([ev(add_direction(base, d, a * scale)) - r_base for a in p.alphas])
    tasks = list(testbed.task_names)
    return xr.Dataset(
        {
            "add_effect": (("shard", "alpha", "task"), np.array(add)),
            "random_add_effect": (("random", "alpha", "task"), np.array(add_rand)),
            "ablate_effect": (("shard", "task"), np.array(abl)),
            "ablate_coefficient": ("shard", np.array(coef)),
            "reward_base": ("task", r_base),
            "reward_final": ("task", r_final),
        },
        coords={"shard": shard_ids, "alpha": list(p.alphas), "task": tasks, "random": np.arange(p.n_random)},
        attrs={"update_norm": scale},
    )


def specificity(effect: np.ndarray) -> np.ndarray:
    """max_t |E_t| / sum_t |E_t| per row (1 = the whole effect on one task; 1/T = spread evenly)."""
    a = np.abs(effect)
    total = a.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, a.max(-1) / total, np.nan)  # no effect at all: undefined


def stage_event_types(labels: xr.Dataset, label: str = "") -> np.ndarray:
    """Event type per event of a store (or ``activations.nc``): shardlib's :func:`~shardlib.events.event_types`
    when ``label`` is empty, else the values of the store label ``label`` as strings."""
    if not label:
        return event_types(labels)
    if label not in labels.coords:
        raise KeyError(f"event_type_label {label!r}: the store has no such label; labels: {sorted(labels.coords)}")
    return np.array([str(v) for v in labels[label].values])


NO_INTERVENTIONS = "not run: rl_dir is empty (no shardlib RL run to intervene on)"


def run(p: AnalysisParams, progress: bool = True) -> xr.Dataset:
    """The stage: :func:`analyse`, written to ``results.nc``."""
    ds = analyse(p, progress)
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds


def analyse(p: AnalysisParams, progress: bool = True) -> xr.Dataset:
    """Alignment (this SAE and extra seeds), where shards live, and interventions, as one Dataset."""
    from .common import flatten
    from .shardfile import dense_codes

    inp = load_inputs(p)
    names, F = inp.names, inp.n_shards
    codes = dense_codes(inp.acts, F, signed=True).values  # signed: a (latent, sign) is a cluster
    if p.event_type_label:
        types, task = stage_event_types(inp.acts, p.event_type_label), None
    else:
        types, task = event_type_labels(inp.acts)
    X = flatten({n: inp.data[n] for n in names}, names)
    D = np.concatenate([inp.dirs[n].reshape(F, -1) for n in names], 1)
    parts = [
        seed_alignment(p, inp, codes, types, X, D),
        type_views(codes, types, X, p.seed),
        where_shards_live(inp.dirs),
    ]
    if p.rl_dir:  # what needs a shardlib RL run: its online shards, its policies and testbed
        parts.append(online_comparison(Path(p.rl_dir) / "online_shards.nc", names, X, types, D))
    parts.append(settings_comparison(p, inp))
    if p.rl_dir:
        if task is None:
            task = inp.acts["task"].values
        parts.append(intervention_results(p, inp, codes, task))
    out = xr.merge(parts, combine_attrs="override")
    out.attrs["store_path"] = inp.sae_params.store_path
    if not p.rl_dir:
        out.attrs["interventions"] = NO_INTERVENTIONS
    return out


def seed_alignment(p: AnalysisParams, inp: AnalysisInputs, codes, types, X, D) -> xr.Dataset:
    """:func:`alignment` of this SAE and of one more SAE per ``extra_seeds`` (same data), and their
    seed-to-seed stability (mean Hungarian |cos| over pairs)."""
    from . import shards as sh_mod
    from .common import flatten

    sp, names, F = inp.sae_params, inp.names, inp.n_shards
    R = flatten(random_dictionary({n: inp.dirs[n].shape[1:] for n in names}, F, sp.rank, p.seed + 7), names)
    rows = {sp.seed: alignment(codes, types, X, D, R, sp.k, p.seed, sp.signed)}
    seed_dirs = {sp.seed: D}
    for s in p.extra_seeds:
        q = sp.replace(seed=s, out_dir=str(Path(p.out_dir) / f"sae_seed{s}"), online_shards_path="")
        r = sh_mod.train(q, progress=False, data=inp.data)
        _, _, z = sh_mod.encode_all(r.sae.cpu(), inp.data)
        Ds = flatten(r.sae.directions(), names)
        rows[s] = alignment(z.numpy(), types, X, Ds, R, sp.k, p.seed, sp.signed)
        seed_dirs[s] = Ds
    seeds = list(rows)
    out = xr.Dataset({k: ("sae_seed", [rows[s][k] for s in seeds]) for k in rows[seeds[0]]}, coords={"sae_seed": seeds})
    out["seed_stability"] = seed_stability([seed_dirs[s] for s in seeds])
    return out


def settings_comparison(p: AnalysisParams, inp: AnalysisInputs) -> xr.Dataset:
    """What the SAE's settings do: one SAE per (k, raw or unit-normalised updates), the shard stage's other
    parameters and seed, each scored with :func:`alignment` (on the updates it was trained on) and its
    held-out FVU (the reconstruction cost). Zero updates are left out, as in the shard stage."""
    from . import shards as sh_mod
    from .common import flatten

    if not p.settings_k or not p.settings_normalize:
        return xr.Dataset()
    sp, names = inp.sae_params, inp.names
    R = flatten(random_dictionary({n: inp.dirs[n].shape[1:] for n in names}, sp.n_latents, sp.rank, p.seed + 7), names)
    rows = {}
    for k in p.settings_k:
        for norm in p.settings_normalize:
            q = sp.replace(
                k=min(k, sp.n_latents),
                normalize=norm,
                online_shards_path="",
                out_dir=str(Path(p.out_dir) / f"setting_k{k}_{'unit' if norm else 'raw'}"),
            )
            same = (
                q.replace(out_dir=sp.out_dir, online_shards_path=sp.online_shards_path).fingerprint()
                == sp.fingerprint()
            )
            if same:  # the shard stage's own SAE: read it, do not train it again
                sae = ShardSAE.load(Path(p.shards_dir) / "sae")
                data, store = inp.data, inp.store
                heldout = sh_mod.split_events(sh_mod.n_events(data), sp.holdout_frac, sp.seed)[1]
            else:
                r = sh_mod.train(q, progress=False)
                sae, data, store, heldout = r.sae.cpu(), r.data, r.store, r.heldout_idx
            _, _, z = sh_mod.encode_all(sae, data)
            X = flatten({n: data[n] for n in names}, names)
            row = alignment(
                z.numpy(),
                stage_event_types(store, p.event_type_label),
                X,
                flatten(sae.directions(), names),
                R,
                q.k,
                p.seed,
                q.signed,
            )
            row["heldout_fvu"] = sh_mod.evaluate(sae, data, heldout).get("fvu", np.nan)
            rows[(k, norm)] = row
    keys = list(next(iter(rows.values())))
    return xr.Dataset(
        {
            f"setting_{m}": (
                ("setting_k", "setting_normalize"),
                [[rows[(k, n)][m] for n in p.settings_normalize] for k in p.settings_k],
            )
            for m in keys
        },
        coords={"setting_k": list(p.settings_k), "setting_normalize": list(p.settings_normalize)},
    )


def type_views(codes: np.ndarray, types: np.ndarray, updates: np.ndarray, seed: int) -> xr.Dataset:
    """Per event type: its number of events, its coherence (norm of the mean unit update: 1 = one
    computation), the best (latent, sign)'s AUROC (and with shuffled labels), and each shard's mean
    |activation| on it."""
    from .metrics import best_signed_auroc, coherence

    au = best_signed_auroc(codes, types)
    au_s = best_signed_auroc(codes, np.random.default_rng(seed).permutation(types))
    coh = coherence(updates, types)
    uniq = list(au)
    absolute = np.abs(codes)
    return xr.Dataset(
        {
            "type_auroc": ("event_type", [au[t] for t in uniq]),
            "type_auroc_shuffled": ("event_type", [au_s[t] for t in uniq]),
            "type_count": ("event_type", [int((types == t).sum()) for t in uniq]),
            "type_coherence": ("event_type", [coh.get(t, np.nan) for t in uniq]),
            "activation_by_type": (("shard", "event_type"), np.stack([absolute[types == t].mean(0) for t in uniq], 1)),
        },
        coords={"event_type": uniq, "shard": np.arange(codes.shape[1])},
    )


def where_shards_live(dirs: dict[str, np.ndarray]) -> xr.Dataset:
    """Each shard's squared-norm share per tensor (with the tensor's layer), and the normalized singular
    values of its matrix parts (how low-rank a shard is)."""
    from .sparsity import layer_of

    names = list(dirs)
    F = len(next(iter(dirs.values())))
    share = np.stack([(dirs[n].reshape(F, -1) ** 2).sum(1) for n in names], 1)
    out = xr.Dataset(
        {"norm_share": (("shard", "tensor"), share)},
        coords={"shard": np.arange(F), "tensor": names, "tensor_layer": ("tensor", [layer_of(n) for n in names])},
    )
    mats = [n for n in names if dirs[n].ndim == 3]
    if mats:
        k = min(min(dirs[n].shape[1:]) for n in mats)
        spec = np.stack([np.linalg.svd(dirs[n], compute_uv=False)[:, :k] for n in mats], 1)  # [F, mats, k]
        spec = spec / np.clip(spec[..., :1], 1e-30, None)
        out["rank_spectrum"] = (("shard", "matrix", "singular"), spec)
        out = out.assign_coords(matrix=mats, singular=np.arange(k))
    return out


def online_comparison(online: Path, names: list[str], X, types, D) -> xr.Dataset:
    """Online shards (trained from the ring buffer during RL) against offline shards and type means;
    empty when the RL run trained none."""
    if not online.exists():
        return xr.Dataset()
    from .io import load_results
    from .shardfile import shard_directions

    on = load_results(online)
    on_dirs = np.concatenate([shard_directions(on)[n].reshape(on.sizes["shard"], -1) for n in names], 1)
    return xr.Dataset(
        {
            "online_type_match": hungarian_mcc(type_means(X, types)[0], on_dirs),
            "online_offline_match": hungarian_mcc(D, on_dirs),
            "online_offline_mmcs": float(abs_cos(D, on_dirs).max(1).mean()),
        }
    )


def intervention_results(p: AnalysisParams, inp: AnalysisInputs, codes: np.ndarray, task: np.ndarray) -> xr.Dataset:
    """:func:`intervention_effects` on the most frequent shards, with each shard's own task (where it fires
    most), the specificity of its effect (and of random directions), and whether it hits its own task."""
    codes = np.abs(codes)
    order = np.argsort(-inp.shards["frequency"].values)
    eff = intervention_effects(p, inp.dirs, order, inp.sae_params.rank)
    own = np.array(
        [
            np.argmax([codes[task == t, i].mean() if (task == t).any() else -1 for t in range(eff.sizes["task"])])
            for i in eff["shard"].values
        ]
    )
    pos = eff["add_effect"].sel(alpha=max(p.alphas)).values
    out = eff.rename({"shard": "intervened_shard"})
    out["own_task"] = ("intervened_shard", own)
    out["specificity"] = ("intervened_shard", specificity(pos))
    out["random_specificity"] = ("random", specificity(eff["random_add_effect"].sel(alpha=max(p.alphas)).values))
    out["own_task_hit"] = ("intervened_shard", (np.abs(pos).argmax(1) == own).astype(float))
    tot = np.abs(pos).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        own_share = np.where(tot > 0, np.abs(pos)[np.arange(len(own)), own] / tot, np.nan)
    out["own_share"] = ("intervened_shard", own_share)
    return out
