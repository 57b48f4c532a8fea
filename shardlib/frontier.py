"""The reconstruction frontier stage: held-out FVU over (rank, k) from papermill sweeps of the shard stage.

A sweep (``sweep: {rank: [...], k: [...]}`` in a config) runs the shard notebook once per
combination, each in its own folder; :func:`combine_sweep` reads their ``results.nc`` and
:func:`run` stacks the sweeps of several stores (events, steps) into one Dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import xarray as xr

from .config import Params, param
from .io import save_results, sweep_points


def combine_sweep(sweep_dir) -> xr.Dataset:
    """Combine a sweep of shard stages (subfolders of ``sweep_dir``) into held-out metrics over (rank, k).

    Where the runner wrote ``sweep.json`` only the points it lists are read (a former config's points
    left in the folder are not this sweep's)."""
    rows = []
    points = sweep_points(sweep_dir)
    if points is not None:
        dirs = [Path(sweep_dir) / name for name in points]
    else:
        dirs = sorted(d for d in Path(sweep_dir).iterdir() if d.is_dir())
    for d in dirs:
        f = d / "results.nc"
        if not f.exists():
            continue
        with xr.open_dataset(f) as r:
            cfg = json.loads(r.attrs["config"])
            m = {k: float(r[f"heldout_{k}"]) for k in ("fvu", "l0", "dead_fraction", "dense_fraction")}
            m["n_parameters"] = float(r["n_parameters"])
        rows.append(xr.Dataset(m).expand_dims(rank=[cfg["rank"]], k=[cfg["k"]]))
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no finished shard runs (subfolders with results.nc)")
    return xr.combine_by_coords(rows, join="outer").sortby(["rank", "k"])


@dataclass(frozen=True)
class FrontierParams(Params):
    """Parameters of the reconstruction frontier (``notebooks/06_frontier.ipynb``)."""

    sweep_dirs: list[str] = param([], "folders of shard-stage sweeps over k and rank, one per store")
    sweep_names: list[str] = param([], "a name per sweep folder (e.g. events, steps)")

    def check(self):
        if len(self.sweep_dirs) != len(self.sweep_names) or not self.sweep_dirs:
            raise ValueError("parameters 'sweep_dirs' and 'sweep_names': one name per folder, at least one folder")


def run(p: FrontierParams) -> xr.Dataset:
    """The stage: combine every sweep, stack them along ``store`` and write ``results.nc``."""
    parts = [combine_sweep(d).expand_dims(store=[n]) for n, d in zip(p.sweep_names, p.sweep_dirs)]
    ds = xr.concat(parts, dim="store", join="outer")
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds
