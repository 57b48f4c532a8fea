"""A run folder's safety: the lock a run holds, the runner's record of each stage folder (``.stage.json``), and the
rules it writes by: every file inside ``<runs>/<run>/``, no symbolic link followed inside the runs folder, only
folders that carry its own record emptied (marked ``stale`` first, so a kill while emptying is redone), a ``done``
record trusted only while the files it lists are there."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .runconfig import ROOT, PipelineError

if TYPE_CHECKING:
    from .runner import Stage

STAGE_FILE = ".stage.json"
LOCK_FILE = ".shardlib.lock"


def runs_folder(runs_dir=None, cfg: dict | None = None) -> Path:
    """The folder runs go into (absolute). ``runs/`` of the repository by default; a folder inside
    the repository must be inside ``runs/``, and the repository itself or a folder above it is
    refused (a run there could overwrite the project's own files)."""
    runs = Path(runs_dir or (cfg or {}).get("runs_dir") or ROOT / "runs").expanduser().resolve()
    if "{" in str(runs) or "}" in str(runs):
        raise PipelineError(
            f"runs folder {runs}: braces are not allowed in its path (papermill formats paths with them)"
        )
    root = ROOT.resolve()
    inside_root = runs == root or root in runs.parents
    if (
        runs == root
        or runs in root.parents
        or (inside_root and not (runs == root / "runs" or root / "runs" in runs.parents))
    ):
        raise PipelineError(
            f"runs folder {runs} would put runs among the repository's own files; use runs/ (the default) "
            "or a folder outside the repository (--runs-dir)"
        )
    return runs


def inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def read_state(out: Path) -> dict:
    """The runner's record of a stage folder, or {} when it is missing or unreadable."""
    try:
        state = json.loads((out / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


STATUSES = ("running", "done", "failed", "stale")
"""A stage record's status; ``stale``: the folder is being emptied (a forced rerun or a changed configuration), so
whatever a kill left in it is emptied again by the next run."""


def is_record(state: dict, st: Stage) -> bool:
    """Whether ``state`` is a record this runner wrote for this very stage folder."""
    try:
        return (
            isinstance(state.get("fingerprint"), str)
            and state.get("status") in STATUSES
            and Path(state["params"]["out_dir"]).resolve() == st.out_dir.resolve()
        )
    except (KeyError, TypeError):
        return False


def write_state(out: Path, state: dict) -> None:
    from .io import atomic_write

    atomic_write(out / STAGE_FILE, lambda t: Path(t).write_text(json.dumps(state, indent=1)))


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir/.shardlib.lock`` while the block runs (``fcntl.flock``: the kernel
    releases it when the holder exits, however it exits, so a lock left by a dead process is simply
    taken). A second run is refused with the owner (pid, host, start time) the file names."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    refuse_link(lock)
    try:  # O_NOFOLLOW: a link put there after the check is not followed either
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(lock) from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        os.close(fd)
        host = f" on host {owner['host']}" if owner.get("host") not in (None, socket.gethostname()) else ""
        raise PipelineError(
            f"run folder {run_dir} is in use by process {owner.get('pid', '?')}{host} (since {owner.get('started', '?')}); "
            "wait for it to finish or stop it, or use another run name (--run)"
        ) from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    try:
        yield lock
    finally:
        os.ftruncate(fd, 0)  # the file stays (removing it could let two processes lock two files)
        os.close(fd)


def stage_files(out: Path) -> list[str]:
    """The files a finished stage left in its folder (relative paths; its record aside), listed in its record."""
    files = []
    for folder, _, names in os.walk(out):  # does not follow links
        files += [os.path.relpath(os.path.join(folder, n), out) for n in names]
    return sorted(f for f in files if f != STAGE_FILE)


def missing_output(out: Path, state: dict) -> str | None:
    """The first output a ``done`` record lists that is no longer a plain file in the stage folder (deleted, or
    replaced by a folder or a link), or why the record cannot tell; None when every one is there."""
    files = state.get("outputs")
    if not isinstance(files, list):
        return "its record lists no outputs"
    for rel in files:
        f = out / str(rel)
        if f.is_symlink() or not f.is_file():
            return f"{rel} is missing or not a file"
    return None


def check_no_links(run_dir: Path, stages: list[Stage]) -> None:
    """Refuse a symbolic link where the runner writes inside the runs folder: the run folder, its lock file, the
    stage and sweep folders (the runs folder itself may be a link: it was resolved)."""
    paths = {run_dir, run_dir / LOCK_FILE}
    for st in stages:
        paths |= {p for p in [st.out_dir, *st.out_dir.parents] if run_dir in p.parents}
    for p in sorted(paths):
        refuse_link(p)


def refuse_link(p: Path) -> None:
    if p.is_symlink():
        raise _link_error(p)


def _link_error(p: Path) -> PipelineError:
    try:
        target = f" (to {os.readlink(p)})"
    except OSError:
        target = ""
    return PipelineError(
        f"{p} is a symbolic link{target}; the runner writes nothing through links inside the runs folder: replace "
        "it by a plain folder or file (or remove it), or use another run name (--run)"
    )


def _check_stage_folder_links(out: Path) -> None:
    """Refuse a stage folder holding a symbolic link anywhere (a resumed stage would write through it)."""
    for folder, dirs, names in os.walk(out):
        for n in sorted(dirs + names):
            refuse_link(Path(folder, n))


def _empty_stage_dir(out: Path, state: dict) -> None:
    """Empty the runner's own stage folder: its record is marked ``stale`` first (atomically), then every file
    but the record goes, links removed, not followed; a kill on the way leaves a ``stale`` record, whose folder
    the next run empties again."""
    write_state(out, {**state, "status": "stale"})
    for child in sorted(out.iterdir()):
        if child.name == STAGE_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def fresh_stage_dir(st: Stage, state: dict, fp: str, force: bool) -> None:
    """Make ``st.out_dir`` ready: keep it (resume) when its record matches, empty it when the runner's own record
    says the configuration changed (or ``force``, or a former emptying was cut short, or a finished stage's outputs
    are gone), refuse when it holds files without such a record, or a symbolic link."""
    out = st.out_dir
    if out.exists() and not out.is_dir():
        raise PipelineError(
            f"stage {st.name!r}: {out} is a file, not a stage folder; move it away or choose another run name (--run)"
        )
    if out.is_dir():
        if not is_record(state, st):
            if any(out.iterdir()):
                raise PipelineError(
                    f"stage {st.name!r}: {out} holds files but no valid {STAGE_FILE}, so the runner did not write it and "
                    "will not delete it; move or delete that folder yourself, or choose another run name (--run)"
                )
        elif (
            force
            or state["fingerprint"] != fp
            or state["status"] == "stale"
            or (state["status"] == "done" and missing_output(out, state))
        ):
            _empty_stage_dir(out, state)  # the runner's own folder: start clean
    out.mkdir(parents=True, exist_ok=True)
    _check_stage_folder_links(out)
