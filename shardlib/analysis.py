"""What shards mean (alignment with event types) and what they do (parameter interventions).

Alignment (``ALIGNMENT_METRICS``; NMI and ARI are scikit-learn's): purity of (latent, sign) clusters, NMI and
ARI between each event's top (latent, sign) and its type, best-cluster AUROC per type, Hungarian matching of
directions to the type-mean updates, and types matched at |cos| > 0.9. Every score stands beside
``BASELINES``: chance (shuffled labels; random dictionaries of the SAE's structure over ``RANDOM_SEEDS``
seeds) and dictionaries fitted to the same events (k-means, PCA, drawn events, and the type means as the
ceiling), each encoded as the SAE encodes. Clustering is the natural competitor: where every event
reinforces one computation an SAE with k = 1 *is* a clustering (Coates & Ng 2011 found k-means
dictionaries competitive with sparse coding), so an SAE shows its worth only by beating these.

Interventions (the parameter-space analogue of the maze policy's "cheese vector"): ``theta_base + alpha *
size_i * shard_i`` with ``size_i`` the shard's component in the fine-tune's total change, both signs, and
ablation ``theta_final - <delta_total, shard> shard``; reward per task family on fixed held-out prompts.
Effects count only above the evaluation's noise floor (the unchanged policy under other sampling seeds);
nulls: random directions from the span of the stored updates at the same sizes, and shuffled shard tasks
for the own-task hit rate.
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
from .metrics import abs_cos, hungarian_mcc, seed_stability, unit_rows
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

BASELINES = {
    "shuffled": "the SAE's codes with the event types permuted across events (chance for these codes)",
    "kmeans": "k-means (scikit-learn, K = the SAE's latents, 3 starts) fitted to the SAE's input, centred; its "
    "centroids as a dictionary, encoded as the SAE encodes (each event's top-k signed projections)",
    "pca": "the SAE's input's top principal directions (as many as latents), encoded as the SAE encodes",
    "events": "as many nonzero events drawn from the store as latents, as a dictionary, encoded as the SAE encodes",
    "oracle": "the type-mean updates themselves as the dictionary, encoded as the SAE encodes: the ceiling for the "
    "direction matches (1 by construction), not for the clustering scores (a top-k projection is not the best "
    "assignment to types)",
    "random": "random dictionaries of the SAE's structure (rank-r per matrix), encoded as the SAE encodes: mean "
    "over RANDOM_SEEDS seeds (``_random_std``: their spread)",
}
RANDOM_SEEDS = 5
FITTED = ("kmeans", "pca", "events", "oracle")


def fitted_dictionaries(
    X: np.ndarray, types: np.ndarray, n: int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The dictionaries fitted to the same events as the SAE (``BASELINES``: kmeans, pca, events, oracle), each as
    (encoder, directions), unit rows [n_directions, D]: the encoder acts on the centred input (the SAE subtracts
    its b_pre, so its codes see centred events), the directions are compared with the type-mean updates (a
    k-means centroid is a mean of events, as a type mean is)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(0)
    km = KMeans(n_clusters=min(n, len(X)), n_init=3, random_state=seed).fit(X - mu).cluster_centers_ + mu
    pca = PCA(n_components=min(n, *X.shape), random_state=seed).fit(X).components_
    nonzero = np.flatnonzero(np.linalg.norm(X, axis=1) > 0)
    drawn = X[np.random.default_rng(seed).choice(nonzero, min(n, len(nonzero)), replace=False)]
    means = type_means(X, types)[0]
    return {
        name: (unit_rows(v - mu), unit_rows(v)) if name != "pca" else (unit_rows(v), unit_rows(v))
        for name, v in (("kmeans", km), ("pca", pca), ("events", drawn), ("oracle", means))
    }


def _clustering_scores(codes: np.ndarray, types: np.ndarray) -> dict[str, float]:
    from . import metrics as M

    return {
        "purity": M.weighted_purity(codes, types),
        "nmi": M.nmi(codes, types),
        "ari": M.ari(codes, types),
        "auroc": float(np.nanmean(list(M.best_signed_auroc(codes, types).values()))),
    }


def _dictionary_scores(codes, types, means, D) -> dict[str, float]:
    from . import metrics as M

    return {
        **_clustering_scores(codes, types),
        "type_match": hungarian_mcc(means, D),
        "types_matched": M.types_matched(means, D),
    }


def alignment(
    codes: np.ndarray,
    types: np.ndarray,
    updates: np.ndarray,
    directions: np.ndarray,
    random_dirs: list[np.ndarray],
    k: int,
    seed: int = 0,
    signed: bool = True,
) -> dict[str, float]:
    """Every ``ALIGNMENT_METRICS`` entry for the SAE (its ``codes`` and ``directions``), and the same entry for
    every ``BASELINES`` dictionary as ``<metric>_<baseline>`` (``random_dirs``: one random dictionary per seed,
    scored as their mean with ``<metric>_random_std``), and ``n_types``. Every fixed dictionary encodes the
    centred ``updates`` with the SAE's k and sign handling; type matches compare with the type-mean updates."""
    from . import metrics as M

    X = np.asarray(updates, dtype=np.float64)
    Xc = X - X.mean(0)
    shuffled = np.random.default_rng(seed).permutation(types)
    means, means_s = type_means(X, types)[0], type_means(X, shuffled)[0]
    out = _dictionary_scores(codes, types, means, directions)
    for name, v in _dictionary_scores(codes, shuffled, means_s, directions).items():
        out[f"{name}_shuffled"] = v
    for base, (E, D) in fitted_dictionaries(X, types, len(directions), seed).items():
        for name, v in _dictionary_scores(M.random_codes(Xc, E, k, signed), types, means, D).items():
            out[f"{name}_{base}"] = v
    rand = [_dictionary_scores(M.random_codes(Xc, R, k, signed), types, means, R) for R in random_dirs]
    for name in rand[0]:
        vals = np.array([r[name] for r in rand], dtype=float)
        out[f"{name}_random"], out[f"{name}_random_std"] = float(np.nanmean(vals)), float(np.nanstd(vals))
    out["n_types"] = len(means)
    return out


def random_dictionaries(shapes: dict[str, tuple], names: list[str], n: int, rank: int, seed: int) -> list[np.ndarray]:
    """``RANDOM_SEEDS`` flattened :func:`random_dictionary` draws (seeds derived from ``seed``)."""
    from .common import flatten

    return [flatten(random_dictionary(shapes, n, rank, 1000 * seed + 7 + j), names) for j in range(RANDOM_SEEDS)]


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
        [-1.0, 1.0],
        "intervention strengths, relative to each shard's own size (its component in the fine-tune's change)",
    )
    noise_seeds: int = param(
        4, "evaluations of the unchanged policy under other sampling seeds: the noise floor of every effect", ge=1
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


def shard_sizes(raw: np.ndarray, codes: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Each shard's size in parameter space: the sum over the events it fires on of the event update's
    component along it, ``sum_e |<x_e, d_i>|`` (``raw``: the stored updates, unnormalised; ``D``: unit
    directions). One event's component is far too small to move a policy's reward; the sum is how far the
    stored updates moved the policy along the shard."""
    proj = np.abs(np.asarray(raw, dtype=np.float64) @ np.asarray(D, dtype=np.float64).T)
    return (proj * (np.asarray(codes) != 0)).sum(0)


def span_directions(raw: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` unit directions drawn from the span of the stored updates (Gaussian combinations of the events):
    the intervention null, in the space the updates occupy rather than anywhere in parameter space."""
    w = np.random.default_rng(seed).standard_normal((n, len(raw)))
    return unit_rows(w @ np.asarray(raw, dtype=np.float64))


def _unflatten(v: np.ndarray, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = torch.from_numpy(np.ascontiguousarray(v[i : i + size]).reshape(shape)).float()
        i += size
    return out


def intervention_effects(p: AnalysisParams, inp: AnalysisInputs, shard_ids: np.ndarray, event_sizes, randoms):
    """Reward change per task family of adding each shard (``alpha`` × its size, both signs) to the base policy
    and of ablating it from the fine-tuned one; the same additions for ``randoms`` (unit rows, at the shards'
    sizes in turn); and the evaluation noise: the unchanged base policy under ``noise_seeds`` other sampling
    seeds on the same prompts. A shard's size is its component in the fine-tune's actual change,
    ``|<theta_final - theta_base, shard>|`` (what ablation removes): the space the policy moved in, whatever
    the optimizer. ``event_sizes`` (:func:`shard_sizes`, the summed components of the stored events) are kept
    beside it; with Adam and stored updates ``-lr * gradient`` they are on another scale."""
    from .policy import evaluate, load_policy
    from .rl import RLParams, make_testbed

    rp = RLParams.from_dict(json.loads(xr.open_dataset(Path(p.rl_dir) / "results.nc").attrs["config"]))
    testbed = make_testbed(rp)
    base = load_policy(Path(p.rl_dir) / "init_policy").eval()
    final = load_policy(Path(p.rl_dir) / "policy").eval()
    names, shapes = inp.names, {n: inp.dirs[n].shape[1:] for n in inp.names}
    delta = param_delta(base, final, names)
    coef = np.array([float(sum((torch.from_numpy(inp.dirs[n][i]) * delta[n]).sum() for n in names)) for i in shard_ids])
    sizes = np.abs(coef)
    rand_sizes = sizes[np.arange(len(randoms)) % len(sizes)]

    def ev(m, sample_seed=None):
        return np.array(evaluate(m, testbed, p.eval_prompts, p.seed, rp.temperature, sample_seed=sample_seed)["reward"])

    r_base, r_final = ev(base), ev(final)
    noise = np.array([ev(base, 1 + j) - r_base for j in range(p.noise_seeds)])
    add, add_rand, abl = [], [], []
    for i, size in zip(shard_ids, sizes):
        d = {n: torch.from_numpy(inp.dirs[n][i]) for n in names}
        add.append([ev(add_direction(base, d, a * size)) - r_base for a in p.alphas])
        abl.append(ev(project_out(final, d, delta)[0]) - r_final)
    for r, size in zip(randoms, rand_sizes):
        d = _unflatten(r, shapes)
        add_rand.append([ev(add_direction(base, d, a * size)) - r_base for a in p.alphas])
    return xr.Dataset(
        {
            "add_effect": (("shard", "alpha", "task"), np.array(add)),
            "shard_size": ("shard", sizes),
            "shard_event_size": ("shard", np.asarray(event_sizes, dtype=float)),
            "random_add_effect": (("random", "alpha", "task"), np.array(add_rand)),
            "random_size": ("random", np.asarray(rand_sizes, dtype=float)),
            "ablate_effect": (("shard", "task"), np.array(abl)),
            "ablate_coefficient": ("shard", np.array(coef)),
            "noise_effect": (("noise_seed", "task"), noise.reshape(p.noise_seeds, len(r_base))),
            "reward_base": ("task", r_base),
            "reward_final": ("task", r_final),
        },
        coords={
            "shard": shard_ids,
            "alpha": list(p.alphas),
            "task": list(testbed.task_names),
            "random": np.arange(len(randoms)),
            "noise_seed": np.arange(p.noise_seeds),
        },
        attrs={"update_norm": float(sum((d**2).sum() for d in delta.values()).sqrt())},
    )


def specificity(effect: np.ndarray) -> np.ndarray:
    """max_t |E_t| / sum_t |E_t| per row (1 = the whole effect on one task; 1/T = spread evenly); NaN where a
    row has no effect. Scale-free: pass only effects above the noise floor (:func:`effect_scores`)."""
    a = np.abs(effect)
    total = a.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, a.max(-1) / total, np.nan)  # no effect at all: undefined


def effect_scores(effect: np.ndarray, floor: np.ndarray) -> dict[str, np.ndarray]:
    """Per direction, from its effects [direction, alpha, task] and the noise floor [task]: whether any effect
    exceeds the floor (``moves``), how many (alpha, task) cells do, the sign with the larger total effect
    above the floor, the specificity of that sign's above-floor effects, and its most-moved task (-1: none)."""
    a = np.abs(effect)
    above = np.where(a > floor, a, 0.0)
    best_alpha = above.sum(-1).argmax(1)
    best = above[np.arange(len(a)), best_alpha]
    moves = best.sum(-1) > 0
    return {
        "moves": moves.astype(float),
        "n_above": (above > 0).sum((1, 2)).astype(float),
        "best_alpha": best_alpha,
        "specificity": specificity(best),
        "top_task": np.where(moves, best.argmax(-1), -1),
    }


def own_task_null(own: np.ndarray, top: np.ndarray, n_perm: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Own-task hit rate under shuffled shard tasks: the shards' own tasks permuted among the shards that move
    reward (``top`` >= 0), so that a task every direction hits hardest gives no credit. Returns the null's mean,
    its 95th percentile, and the share of permutations at or above the observed rate (a p-value)."""
    keep = top >= 0
    if not keep.any():
        return float("nan"), float("nan"), float("nan")
    o, t = own[keep], top[keep]
    observed = float((o == t).mean())
    rng = np.random.default_rng(seed)
    null = np.array([(rng.permutation(o) == t).mean() for _ in range(n_perm)])
    return float(null.mean()), float(np.quantile(null, 0.95)), float((null >= observed).mean())


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
    means, type_names = type_means(X, types)
    parts = [
        seed_alignment(p, inp, codes, types, X, D),
        type_views(codes, types, X, p.seed),
        where_shards_live(inp.dirs),
        xr.Dataset(  # each shard against each type's mean update (the shard cards' nearest type)
            {"shard_type_cos": (("shard", "event_type"), unit_rows(D) @ unit_rows(means).T)},
            coords={"shard": np.arange(F), "event_type": type_names},
        ),
    ]
    if p.rl_dir:  # what needs a shardlib RL run: its online shards, its policies and testbed
        parts.append(online_comparison(Path(p.rl_dir) / "online_shards.nc", names, X, types, D))
    parts.append(settings_comparison(p, inp))
    if p.rl_dir:
        if task is None:
            task = inp.acts["task"].values
        parts.append(intervention_results(p, inp, codes, task, X, D))
    out = xr.merge(parts, combine_attrs="override")
    out["n_events"] = len(X)  # the events aligned; zero updates (nothing reinforced) are left out and counted
    out["n_zero_events"] = int(inp.store.attrs.get("n_zero_skipped", 0))
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
    shapes = {n: inp.dirs[n].shape[1:] for n in names}
    # every SAE seed's baselines get their own seed (k-means starts, drawn events, random dictionaries), so
    # the spread over sae_seed is a spread for the baselines too
    rows = {
        sp.seed: alignment(
            codes, types, X, D, random_dictionaries(shapes, names, F, sp.rank, sp.seed), sp.k, sp.seed, sp.signed
        )
    }
    seed_dirs = {sp.seed: D}
    for s in p.extra_seeds:
        q = sp.replace(seed=s, out_dir=str(Path(p.out_dir) / f"sae_seed{s}"), online_shards_path="")
        r = sh_mod.train(q, progress=False, data=inp.data)
        _, _, z = sh_mod.encode_all(r.sae.cpu(), inp.data)
        Ds = flatten(r.sae.directions(), names)
        rows[s] = alignment(
            z.numpy(), types, X, Ds, random_dictionaries(shapes, names, F, sp.rank, s), sp.k, s, sp.signed
        )
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
    R = random_dictionaries({n: inp.dirs[n].shape[1:] for n in names}, names, sp.n_latents, sp.rank, sp.seed)
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
                sp.seed,
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
    """Per event type: its number of events, its coherence (signed: norm of the mean unit update; sign-free:
    the top singular direction's share of its unit updates' energy; 1 = one computation), the best
    (latent, sign)'s AUROC (and with shuffled labels), and each shard's mean |activation| on it."""
    from .metrics import best_signed_auroc, coherence, coherence_rank1

    au = best_signed_auroc(codes, types)
    au_s = best_signed_auroc(codes, np.random.default_rng(seed).permutation(types))
    coh, coh1 = coherence(updates, types), coherence_rank1(updates, types)
    uniq = list(au)
    absolute = np.abs(codes)
    return xr.Dataset(
        {
            "type_auroc": ("event_type", [au[t] for t in uniq]),
            "type_auroc_shuffled": ("event_type", [au_s[t] for t in uniq]),
            "type_count": ("event_type", [int((types == t).sum()) for t in uniq]),
            "type_coherence": ("event_type", [coh.get(t, np.nan) for t in uniq]),
            "type_coherence_rank1": ("event_type", [coh1.get(t, np.nan) for t in uniq]),
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
    cos = unit_rows(D) @ unit_rows(on_dirs).T
    nearest = np.abs(cos).argmax(1)
    return xr.Dataset(
        {
            "online_type_match": hungarian_mcc(type_means(X, types)[0], on_dirs),
            "online_offline_match": hungarian_mcc(D, on_dirs),
            "online_offline_mmcs": float(abs_cos(D, on_dirs).max(1).mean()),
            "online_nearest": ("shard", nearest),
            "online_nearest_cos": ("shard", cos[np.arange(len(D)), nearest]),
        },
        coords={"shard": np.arange(len(D))},
    )


def intervention_results(
    p: AnalysisParams, inp: AnalysisInputs, codes: np.ndarray, task: np.ndarray, X: np.ndarray, D: np.ndarray
) -> xr.Dataset:
    """:func:`intervention_effects` on the most frequent shards, each added at its own size in the fine-tune
    and against as many random directions from the updates' span at the same sizes, scored against the
    evaluation's noise floor (the largest change of the unchanged policy across sampling seeds, per task):
    which directions move reward above it, the specificity of what does, and whether a shard's largest
    effect falls on its own task (where it fires most), with that hit rate's shuffled-task null."""
    raw = X * inp.store["update_norm"].values[:, None] if "update_norm" in inp.store.coords else X
    order = np.argsort(-inp.shards["frequency"].values)
    ids = order[: p.n_shards]
    randoms = span_directions(raw, p.n_random, p.seed + 1)
    eff = intervention_effects(p, inp, ids, shard_sizes(raw, codes[:, ids], D[ids]), randoms)
    floor = np.abs(eff["noise_effect"].values).max(0)
    absolute = np.abs(codes)
    own = np.array(
        [
            np.argmax([absolute[task == t, i].mean() if (task == t).any() else -1 for t in range(eff.sizes["task"])])
            for i in ids
        ]
    )
    sc = effect_scores(eff["add_effect"].values, floor)
    rs = effect_scores(eff["random_add_effect"].values, floor)
    out = eff.rename({"shard": "intervened_shard"})
    out["noise_floor"] = ("task", floor)
    out["own_task"] = ("intervened_shard", own)
    for name in ("moves", "n_above", "specificity"):
        out[name] = ("intervened_shard", sc[name])
        out[f"random_{name}"] = ("random", rs[name])
    hit = np.where(sc["top_task"] >= 0, (sc["top_task"] == own).astype(float), np.nan)
    out["own_task_hit"] = ("intervened_shard", hit)
    null_mean, null_p95, p_value = own_task_null(own, sc["top_task"], seed=p.seed)
    out["own_task_null"], out["own_task_null_p95"], out["own_task_p"] = null_mean, null_p95, p_value
    abl = np.abs(eff["ablate_effect"].values)
    out["ablate_moves"] = ("intervened_shard", (abl > floor).any(1).astype(float))
    return out
