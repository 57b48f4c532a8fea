"""Compare the results of two runs: ``python -m shardlib compare RUN_A RUN_B``.

Every netCDF file of either run (results, shard files, update-store chunks) is compared with the
file at the same path in the other (a file only one of them holds is a difference): the same variables
and coordinates, with exactly equal values (NaN equal to NaN). Attributes (provenance, paths, creation times) and wall-clock variables
(``*seconds*``, ``*_per_s``, ``*_time``, ``peak_rss*``) are left out: two runs of one config and seed on CPU must agree on
everything else. Used to show that a refactor left the study's numbers unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .io import NETCDF_ENGINE

WALL_CLOCK = re.compile(r"seconds|_per_s$|(^|_)time$|^peak_rss")


@dataclass
class FileComparison:
    path: str
    """The file, relative to the run folder."""
    status: str
    """``identical``, ``differs`` or ``missing`` (in one of the runs: ``detail`` says which)."""
    detail: str = ""


def _values(da: xr.DataArray) -> np.ndarray:
    return np.asarray(da.values)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def compare_files(fa: Path, fb: Path) -> tuple[bool, str]:
    """(equal, what differs) for two netCDF files, attributes and wall-clock variables left out."""
    with xr.open_dataset(fa, engine=NETCDF_ENGINE) as a, xr.open_dataset(fb, engine=NETCDF_ENGINE) as b:
        names_a = {v for v in list(a.variables) if not WALL_CLOCK.search(str(v))}
        names_b = {v for v in list(b.variables) if not WALL_CLOCK.search(str(v))}
        if names_a != names_b:
            return False, f"variables only in A: {sorted(names_a - names_b)}, only in B: {sorted(names_b - names_a)}"
        diffs = []
        for v in sorted(names_a):
            x, y = _values(a[v]), _values(b[v])
            if a[v].dims != b[v].dims or not _equal(x, y):
                if x.shape == y.shape and x.dtype.kind == "f" == y.dtype.kind:
                    diffs.append(f"{v} (max |diff| {float(np.nanmax(np.abs(x - y))):.3g})")
                else:
                    diffs.append(f"{v} ({a[v].dims} {x.shape} vs {b[v].dims} {y.shape})")
        return not diffs, ", ".join(diffs)


def compare_runs(run_a, run_b) -> list[FileComparison]:
    """One :class:`FileComparison` per netCDF file of either run (a file only one run holds is ``missing`` in the
    other, and a difference)."""
    run_a, run_b = Path(run_a), Path(run_b)
    files_a = {f.relative_to(run_a) for f in run_a.rglob("*.nc")}
    files_b = {f.relative_to(run_b) for f in run_b.rglob("*.nc")}
    out = []
    for rel in sorted(files_a | files_b):
        if rel not in files_b or rel not in files_a:
            side, other = ("A", "B") if rel in files_a else ("B", "A")
            out.append(FileComparison(str(rel), "missing", f"(only in run {side}; run {other} lacks it)"))
            continue
        same, detail = compare_files(run_a / rel, run_b / rel)
        out.append(FileComparison(str(rel), "identical" if same else "differs", detail))
    return out
