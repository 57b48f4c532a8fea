"""Results files: provenance attributes and atomic netCDF writes."""

from __future__ import annotations

import glob
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


def _umask() -> int:
    """The process's umask (read without changing it, where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_stale_tmp(path) -> list[Path]:
    """Remove the ``<name>.*.tmp`` files a killed :func:`atomic_write` of ``path`` left behind."""
    path = Path(path)
    stale = sorted(path.parent.glob(glob.escape(path.name) + ".*.tmp")) if path.parent.is_dir() else []
    for f in stale:
        if f.is_file():
            f.unlink()
    return stale


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    The file gets the usual mode for new files (0666 less the umask), and temporary files that a
    killed earlier write of the same ``path`` left are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = disk_full_error(e, path)
        if full is None:
            raise
        raise full from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


NEARLY_FULL_BYTES = 64 << 20
"""Below this much free space, a write that failed for an unnamed reason (netCDF's "HDF error") is a full disk."""


def disk_full_error(e: Exception, path) -> OSError | None:
    """``OSError(ENOSPC)`` naming ``path`` when ``e`` (an error while writing it) comes from a full disk: an ENOSPC or
    EDQUOT error about a temporary file, or an error without one (netCDF says "HDF error") with under
    ``NEARLY_FULL_BYTES`` free; None otherwise."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    if isinstance(e, OSError) and e.errno is not None:
        return None
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return None
    if free >= NEARLY_FULL_BYTES:
        return None
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return OSError(errno.ENOSPC, f"No space left on device ({why}; {free >> 20} MiB free)", str(path))


def atomic_dir(path: Path) -> Path:
    """A fresh ``path.tmp`` folder to write into; :func:`commit_dir` then renames it over ``path``
    (a killed write leaves ``path`` intact)."""
    recover_dir(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp``: ``path`` -> ``path.old``, ``tmp`` -> ``path``, remove ``path.old``.

    A kill between the two renames leaves only ``path.old``; :func:`recover_dir` puts it back."""
    old = path.with_name(path.name + ".old")
    if old.exists() and path.exists():  # a kill while removing an earlier .old
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(path) -> Path:
    """Settle a folder that :func:`commit_dir` may have left half-replaced by a kill; returns ``path``.

    ``path`` missing but ``path.old`` present (killed between the renames): ``path.old`` is the
    last complete version and is moved back. ``path`` and ``path.old`` both present (killed while
    removing ``path.old``): ``path`` is complete and ``path.old`` is removed.
    """
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)
    return path


OPTIMIZER_FILE = "optimizer.pt"


def write_checkpoint(path, state: dict, savers: dict, optimizer=None) -> None:
    """Write checkpoint folder ``path`` atomically: each ``savers[name](folder)`` writes ``path/name``
    (safetensors + JSON), the optimizer's state goes to ``optimizer.pt``, and ``state.json`` (JSON:
    the counter, history, fingerprint) is written last; :func:`read_checkpoint` checks it on resume."""
    import torch

    tmp = atomic_dir(Path(path))
    try:
        for name, save in savers.items():
            save(tmp / name)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / "state.json").write_text(json.dumps(state))
    except Exception as e:  # torch and safetensors report a full disk in their own words
        full = disk_full_error(e, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        raise full from None
    commit_dir(tmp, Path(path))


def load_optimizer(optimizer, folder) -> None:
    """Restore an optimizer's state from ``folder/optimizer.pt`` (tensors and plain data only)."""
    import torch

    optimizer.load_state_dict(torch.load(Path(folder) / OPTIMIZER_FILE, weights_only=True))


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, edited, or was written by a run with other parameters."""


def read_checkpoint(ckpt, fingerprint: str, counter: str, limit: int, files=()) -> dict | None:
    """The ``state.json`` of checkpoint folder ``ckpt`` after checking it, or None when there is none.

    Settles a half-finished :func:`commit_dir` first (:func:`recover_dir`). Checks that the
    checkpoint was written with ``fingerprint``, that ``state[counter]`` (steps or epochs done) is
    an integer in 1..``limit`` and equals the length of ``state["history"]``, whose rows carry
    ``counter`` values 0, 1, ..., and that each of ``files`` is present. Raises
    :class:`CheckpointError` naming the problem and the fix otherwise.
    """
    ckpt = recover_dir(ckpt)
    f = ckpt / "state.json"
    fix = f"delete {ckpt} (the stage then starts over) or run the stage with --force"
    if not f.exists():
        if ckpt.is_dir() and any(ckpt.iterdir()):
            raise CheckpointError(f"{ckpt} holds files but no state.json, so it is not a complete checkpoint; {fix}")
        return None
    try:
        state = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f} is unreadable ({e}); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get("history"), list):
        raise CheckpointError(f"{f} is not a checkpoint state (no history); {fix}")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{ckpt} was written by a run with other parameters; {fix}")
    n, history = state.get(counter), state["history"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise CheckpointError(f"{f}: {counter} is {n!r}, expected an integer from 1 to {limit}; {fix}")
    seen = [h.get(counter) if isinstance(h, dict) else None for h in history]
    if seen != list(range(n)):
        got = f"{len(seen)} rows" + (f", {counter}s {seen[0]}..{seen[-1]}" if seen else "")
        raise CheckpointError(
            f"{f}: {counter} is {n} but its history holds {got} (expected {counter}s 0..{n - 1}): "
            f"the checkpoint was edited or mixed with another; {fix}"
        )
    missing = [x for x in files if not (ckpt / x).exists()]
    if missing:
        raise CheckpointError(f"{ckpt} lacks {missing}; {fix}")
    return state


def save_results(ds: xr.Dataset, path, config: dict | None = None, seed: int | None = None) -> Path:
    """Write ``ds`` as netCDF with provenance attributes, atomically. The provenance (the stage's
    ``config``, seed, commit, versions) is added to ``ds.attrs`` too, so the in-memory results a
    stage returns read like the file (a Finding can name the stage's configuration)."""
    ds.attrs.update(provenance(config, seed))
    atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine=NETCDF_ENGINE))
    return Path(path)


def load_results(path) -> xr.Dataset:
    with xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
        return ds.load()


SWEEP_MANIFEST = "sweep.json"
"""Written by the runner in every sweep folder: ``{"points": [point folder names]}`` of the config that ran."""


def sweep_points(folder) -> list[str] | None:
    """The point folders the runner's last config swept in ``folder`` (its ``sweep.json``), or None where
    there is no manifest (a sweep made by hand: every subfolder is a point)."""
    f = Path(folder) / SWEEP_MANIFEST
    return json.loads(f.read_text())["points"] if f.exists() else None
