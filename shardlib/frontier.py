"""The reconstruction frontier stage: held-out FVU over (rank, k) from papermill sweeps of the shard stage.

A sweep (``sweep: {rank: [...], k: [...]}`` in a config) runs the shard notebook once per
combination, each in its own folder; :func:`combine_sweep` reads their ``results.nc`` and
:func:`run` stacks the sweeps of several stores (events, steps) into one Dataset, beside a baseline fitted
to the same updates: the held-out FVU of the training updates' top-k principal components
(:func:`pca_reference`, on the SAEs' own events and split), a dense code of k numbers per event where the SAE
picks k of its latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .config import Params, param
from .factored import Factored, n_events
from .io import save_results, sweep_points

GRAM_BLOCK_BYTES = 2**28
"""The dense route makes at most this many bytes of one matrix's events dense at a time."""


def gram_matrix(data: dict) -> np.ndarray:
    """``<U_a, U_b>`` over all tensors of ``data`` ({name: dense [N, ...] or Factored}) as a float64 [N, N]
    matrix. A factored matrix with few factors goes through its factors' Gram matrices in float64
    (``N^2 F^2 (d_out + d_in)`` work); one with many (an Adam step's rank-32 factors) is made dense, blocks of
    events at a time (``N^2 d_out d_in`` work), whichever is less. The dense route multiplies in float32 (the
    updates' own precision; float64 took twice as long), which resolves FVUs down to about 1e-5, not below."""
    n = n_events(data)
    G = torch.zeros(n, n, dtype=torch.float64)
    for v in data.values():
        if isinstance(v, Factored) and v.n_factors**2 * sum(v.shape) < v.shape[0] * v.shape[1]:
            F = v.n_factors
            gl = v.left.double().reshape(n * F, -1) @ v.left.double().reshape(n * F, -1).T
            gr = v.right.double().reshape(n * F, -1) @ v.right.double().reshape(n * F, -1).T
            G += (gl * gr).reshape(n, F, n, F).sum((1, 3))
            continue
        size = int(np.prod(v.shape if isinstance(v, Factored) else v.shape[1:]))
        step = max(1, GRAM_BLOCK_BYTES // (4 * size))

        def block(a, v=v, step=step):
            part = v.take(slice(a, a + step)).dense() if isinstance(v, Factored) else v[a : a + step]
            return part.reshape(len(part), -1).float()

        for a in range(0, n, step):
            xa = block(a)
            for b in range(0, a + 1, step):
                xb = xa if b == a else block(b)
                g = (xa @ xb.T).double()
                G[a : a + step, b : b + step] += g
                if b != a:
                    G[b : b + step, a : a + step] += g.T
    return G.numpy()


def pca_heldout_fvu(G: np.ndarray, train: np.ndarray, held: np.ndarray, ks) -> np.ndarray:
    """Held-out FVU of PCA with ``k`` components for each of ``ks``, from the Gram matrix of all events: the
    components are the training events' (centred on their mean), a held-out event is reconstructed as the training
    mean plus its projection, and FVU is the shard stage's (squared error over the held-out events' variance around
    their own mean). Components beyond the training events' rank add nothing."""
    from scipy.sparse.linalg import eigsh

    Gtt = G[np.ix_(train, train)]
    m = len(train)
    mean_t = Gtt.mean(0)
    C = Gtt - mean_t[:, None] - mean_t[None] + Gtt.mean()  # J Gtt J: the centred training events' Gram matrix
    top = min(max(int(k) for k in ks), m)  # only the leading components are needed
    if 4 * top < m and m > 256:  # Lanczos for a few of many (a dense eigh of 2650 events takes 5-25 s on 2 cores)
        v0 = np.random.default_rng(0).standard_normal(m)  # a fixed start: the same components every run
        lam, V = eigsh(C, k=top, which="LA", v0=v0)
    else:
        lam, V = np.linalg.eigh(C)
    order = np.argsort(lam)[::-1][:top]
    lam, V = lam[order], V[:, order]
    live = lam > 1e-12 * max(lam[0], 1e-300)
    Ght = G[np.ix_(held, train)]
    cross = Ght - Ght.mean(1, keepdims=True) - mean_t[None] + Gtt.mean()  # <x_t - mu, x_i - mu>
    coef = (cross @ V[:, live]) / np.sqrt(lam[live])  # [held, components]: projections on the unit components
    dist = np.diag(G)[held] - 2 * Ght.mean(1) + Gtt.mean()  # ||x_t - mu||^2
    denom = np.diag(G)[held].sum() - len(held) * G[np.ix_(held, held)].mean()
    if not denom > 0:  # identical held-out events: FVU is undefined (as ReconStats has it)
        return np.full(len(ks), np.nan)
    captured = np.concatenate([[0.0], np.cumsum((coef**2).sum(0))])
    sse = [max(dist.sum() - captured[min(int(k), coef.shape[1])], 0.0) for k in ks]  # rounding: never below 0
    return np.array(sse) / denom


SPLIT_KEYS = ("store_path", "params", "skip_zero_updates", "normalize", "holdout_frac", "holdout", "seed")
"""What decides a shard stage's events and its held-out split."""


def pca_reference(shard_configs: list[dict], ks) -> np.ndarray | None:
    """:func:`pca_heldout_fvu` on the events and split of a sweep's shard-stage runs (their recorded configs: the
    store, the tensors, zero skipping, normalisation, holdout fraction, kind and seed, which must agree), or None where
    they read no store or different events, the store is gone, or fewer than 2 events are held out."""
    from .fit import split_events
    from .shards import load_updates
    from .store import StoreError

    split = {json.dumps([c.get(key) for key in SPLIT_KEYS], sort_keys=True) for c in shard_configs}
    cfg = shard_configs[0]
    if len(split) != 1 or not cfg.get("store_path"):
        return None
    try:
        data, _ = load_updates(
            cfg["store_path"], cfg.get("params", ()), cfg.get("skip_zero_updates", True), cfg.get("normalize", False)
        )
    except (FileNotFoundError, StoreError):  # moved or deleted since the sweep ran: no baseline, not a crash
        return None
    train, held = split_events(n_events(data), cfg["holdout_frac"], cfg["seed"], cfg.get("holdout", "random"))
    if len(held) < 2:
        return None
    return pca_heldout_fvu(gram_matrix(data), train, held, ks)


def sweep_folders(sweep_dir) -> list[Path]:
    """The point folders of a sweep: those the runner's ``sweep.json`` lists (a former config's points left in the
    folder are not this sweep's), or every subfolder of a sweep made by hand; none for a missing folder."""
    if not Path(sweep_dir).is_dir():
        return []
    points = sweep_points(sweep_dir)
    if points is not None:
        return [Path(sweep_dir) / name for name in points]
    return sorted(d for d in Path(sweep_dir).iterdir() if d.is_dir())


def combine_sweep(sweep_dir) -> xr.Dataset:
    """Combine a sweep of shard stages (subfolders of ``sweep_dir``) into held-out metrics over (rank, k), with
    ``pca_fvu`` over k (:func:`pca_reference`) where the stages read a store.

    Where the runner wrote ``sweep.json`` only the points it lists are read (a former config's points
    left in the folder are not this sweep's)."""
    rows, configs = [], []
    for d in sweep_folders(sweep_dir):
        f = d / "results.nc"
        if not f.exists():
            continue
        with xr.open_dataset(f) as r:
            cfg = json.loads(r.attrs["config"])
            configs.append(cfg)
            m = {k: float(r[f"heldout_{k}"]) for k in ("fvu", "l0", "dead_fraction", "dense_fraction")}
            m["n_parameters"] = float(r["n_parameters"])
            if "train_fvu" in r:  # the same SAE on its own training updates: how far the fit got
                m["train_fvu"] = float(r["train_fvu"])
        rows.append(xr.Dataset(m).expand_dims(rank=[cfg["rank"]], k=[cfg["k"]]))
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no finished shard runs (subfolders with results.nc)")
    ds = xr.combine_by_coords(rows, join="outer").sortby(["rank", "k"])
    pca = pca_reference(configs, ds.k.values)  # the points of a sweep train on the same events and split
    if pca is not None:
        ds["pca_fvu"] = ("k", pca)
    return ds


@dataclass(frozen=True)
class FrontierParams(Params):
    """Parameters of the reconstruction frontier (``notebooks/06_frontier.ipynb``)."""

    sweep_dirs: list[str] = param([], "folders of shard-stage sweeps over k and rank, one per store")
    sweep_names: list[str] = param([], "a name per sweep folder (e.g. events, steps)")

    def check(self):
        if len(self.sweep_dirs) != len(self.sweep_names) or not self.sweep_dirs:
            raise ValueError("parameters 'sweep_dirs' and 'sweep_names': one name per folder, at least one folder")


def run(p: FrontierParams) -> xr.Dataset:
    """The stage: combine every sweep (with its PCA baseline), stack them along ``store`` and write
    ``results.nc``."""
    parts = [combine_sweep(d).expand_dims(store=[n]) for n, d in zip(p.sweep_names, p.sweep_dirs)]
    if any("pca_fvu" in x for x in parts):  # a sweep without a store (no PCA) gets NaN
        parts = [x if "pca_fvu" in x else x.assign(pca_fvu=x.fvu.isel(rank=0) * np.nan) for x in parts]
    ds = xr.concat(parts, dim="store", join="outer")
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds
