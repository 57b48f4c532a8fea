"""Results files: provenance attributes and atomic netCDF writes."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import xarray as xr

NETCDF_ENGINE = "netcdf4"


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the shardlib checkout, or ("unknown", False) outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def provenance(config: dict | None = None, seed: int | None = None) -> dict:
    """Attributes every results file carries (netCDF attrs: strings and numbers only)."""
    import torch

    from . import __version__

    commit, dirty = git_state()
    return {
        "config": json.dumps(config or {}, sort_keys=True),
        "git_commit": commit,
        "git_dirty": int(dirty),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "shardlib_version": __version__,
        "seed": -1 if seed is None else int(seed),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_dir(path: Path) -> Path:
    """A fresh ``path.tmp`` folder to write into; :func:`commit_dir` then renames it over ``path``
    (a killed write leaves ``path`` intact)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, path: Path) -> None:
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def save_results(ds: xr.Dataset, path, config: dict | None = None, seed: int | None = None) -> Path:
    """Write ``ds`` as netCDF with provenance attributes, atomically."""
    ds = ds.copy()
    ds.attrs.update(provenance(config, seed))
    atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine=NETCDF_ENGINE))
    return Path(path)


def load_results(path) -> xr.Dataset:
    with xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
        return ds.load()
