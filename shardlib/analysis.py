"""The shard analysis stage (``notebooks/07_shard_analysis.ipynb``): what shards mean and what they do.

:func:`analyse` reads a shard stage's files and the update store they were trained on, and scores the shards'
alignment with event types against its baselines (:mod:`shardlib.alignment`), for this SAE, more SAE seeds and
other SAE settings; per-type views (coherence, AUROC, activation by type); where shards live (tensors, rank);
the online shards against the offline ones; and, given the RL run, the parameter interventions
(:mod:`shardlib.interventions`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .alignment import alignment, random_dictionaries, type_means
from .config import SEED_MAX, Params, param
from .events import event_type_labels, event_types
from .factored import n_events
from .interventions import intervention_results
from .io import save_results
from .metrics import abs_cos, hungarian_mcc, seed_stability, unit_rows
from .sae import ShardSAE


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
    fits = {}  # the baselines fitted to the same updates at the same seed, shared by the SAEs aligned here
    seeds = seed_alignment(p, inp, codes, types, X, D, fits)
    parts = [
        seeds,
        type_views(codes, types, X, p.seed),
        where_shards_live(inp.dirs),
        xr.Dataset(  # each shard against each type's mean update (the shard cards' nearest type)
            {"shard_type_cos": (("shard", "event_type"), unit_rows(D) @ unit_rows(means).T)},
            coords={"shard": np.arange(F), "event_type": type_names},
        ),
    ]
    if p.rl_dir:  # what needs a shardlib RL run: its online shards, its policies and testbed
        parts.append(online_comparison(Path(p.rl_dir) / "online_shards.nc", names, X, types, D))
    own = {m: float(seeds[m].sel(sae_seed=inp.sae_params.seed)) for m in seeds.data_vars if "sae_seed" in seeds[m].dims}
    parts.append(settings_comparison(p, inp, own, fits))
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


def seed_alignment(p: AnalysisParams, inp: AnalysisInputs, codes, types, X, D, cache: dict | None = None) -> xr.Dataset:
    """:func:`alignment` of this SAE and of one more SAE per ``extra_seeds`` (same data), and their
    seed-to-seed stability (mean Hungarian |cos| over pairs)."""
    from . import fit, shards
    from .common import flatten

    sp, names, F = inp.sae_params, inp.names, inp.n_shards
    shapes = {n: inp.dirs[n].shape[1:] for n in names}
    # every SAE seed's baselines get their own seed (k-means starts, drawn events, random dictionaries), so
    # the spread over sae_seed is a spread for the baselines too
    rows = {
        sp.seed: alignment(
            codes, types, X, D, random_dictionaries(shapes, names, F, sp.rank, sp.seed), sp.k, sp.seed, sp.signed, cache
        )
    }
    seed_dirs = {sp.seed: D}
    for s in p.extra_seeds:
        q = sp.replace(seed=s, out_dir=str(Path(p.out_dir) / f"sae_seed{s}"), online_shards_path="")
        r = shards.train(q, progress=False, data=inp.data)
        _, _, z = fit.encode_all(r.sae.cpu(), inp.data, batch_size=sp.eval_batch_size)
        Ds = flatten(r.sae.directions(), names)
        rows[s] = alignment(
            z.numpy(), types, X, Ds, random_dictionaries(shapes, names, F, sp.rank, s), sp.k, s, sp.signed, cache
        )
        seed_dirs[s] = Ds
    seeds = list(rows)
    out = xr.Dataset({k: ("sae_seed", [rows[s][k] for s in seeds]) for k in rows[seeds[0]]}, coords={"sae_seed": seeds})
    out["seed_stability"] = seed_stability([seed_dirs[s] for s in seeds])
    return out


def settings_comparison(
    p: AnalysisParams, inp: AnalysisInputs, own: dict | None = None, cache: dict | None = None
) -> xr.Dataset:
    """What the SAE's settings do: one SAE per (k, raw or unit-normalised updates), the shard stage's other
    parameters and seed, each scored with :func:`alignment` (on the updates it was trained on) and its
    held-out FVU (the reconstruction cost). Zero updates are left out, as in the shard stage. ``own``: the
    shard stage's SAE's :func:`alignment` row (:func:`seed_alignment`), reused for the setting that is that SAE;
    ``cache``: :func:`~shardlib.alignment.cached_fits`'s, shared with :func:`seed_alignment`."""
    from . import fit, shards
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
                heldout = fit.split_events(n_events(data), sp.holdout_frac, sp.seed, sp.holdout)[1]
            else:
                r = shards.train(q, progress=False)
                sae, data, store, heldout = r.sae.cpu(), r.data, r.store, r.heldout_idx
            if same and own is not None:  # scored already, on the same codes, events and random dictionaries
                row = dict(own)
            else:
                _, _, z = fit.encode_all(sae, data, batch_size=sp.eval_batch_size)
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
                    cache,
                )
            row["heldout_fvu"] = fit.evaluate(sae, data, heldout, batch_size=sp.eval_batch_size).get("fvu", np.nan)
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
