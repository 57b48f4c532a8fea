import json
import os
import stat
from pathlib import Path

import pytest

from shardlib.io import CheckpointError, atomic_dir, atomic_write, commit_dir, read_checkpoint, recover_dir


def test_atomic_write_gives_the_umask_mode_and_cleans_stale_tmp_files(tmp_path):
    target = tmp_path / "state.json"
    stale = tmp_path / "state.json.abc123.tmp"  # what a kill during an earlier write leaves
    stale.write_text("half")
    other = tmp_path / "other.json.abc123.tmp"  # another file's: not ours to remove
    other.write_text("x")
    old = os.umask(0o022)
    try:
        atomic_write(target, lambda t: Path(t).write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json.abc123.tmp", "state.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_tmp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(tmp):
        Path(tmp).write_text("partial")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def _ckpt(path, step):
    tmp = atomic_dir(path)
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    commit_dir(tmp, path)


def test_commit_dir_recovers_from_a_kill_between_its_renames(tmp_path):
    ck = tmp_path / "checkpoint"
    _ckpt(ck, 1)
    _ckpt(ck, 2)
    assert json.loads((ck / "state.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # killed after `checkpoint -> checkpoint.old`, before `checkpoint.tmp -> checkpoint`
    tmp = atomic_dir(ck)
    (tmp / "state.json").write_text(json.dumps({"step": 3}))
    os.replace(ck, tmp_path / "checkpoint.old")
    assert not ck.exists()
    recover_dir(ck)  # resume from the last complete checkpoint, as the issue asks
    assert json.loads((ck / "state.json").read_text()) == {"step": 2}
    # killed while removing checkpoint.old: the new one is complete, the old is dropped
    (tmp_path / "checkpoint.old").mkdir()
    recover_dir(ck)
    assert not (tmp_path / "checkpoint.old").exists() and json.loads((ck / "state.json").read_text()) == {"step": 2}


def _state(path, **kw):
    path.mkdir(parents=True, exist_ok=True)
    state = {"step": 3, "history": [{"step": i} for i in range(3)], "fingerprint": "fp", **kw}
    (path / "state.json").write_text(json.dumps(state))
    (path / "policy").mkdir(exist_ok=True)
    return path


def test_read_checkpoint_checks_fingerprint_step_history_and_files(tmp_path):
    assert read_checkpoint(tmp_path / "none", "fp", "step", 10) is None
    ok = _state(tmp_path / "ok")
    assert read_checkpoint(ok, "fp", "step", 10, ["policy"])["step"] == 3
    with pytest.raises(CheckpointError, match="other parameters"):
        read_checkpoint(ok, "other", "step", 10)
    with pytest.raises(CheckpointError, match=r"lacks \['optimizer.pt'\]"):
        read_checkpoint(ok, "fp", "step", 10, ["policy", "optimizer.pt"])
    edited = _state(tmp_path / "edited", step=2)  # step edited from 3 to 2: history disagrees
    with pytest.raises(CheckpointError, match=r"step is 2 but its history holds 3 rows, steps 0..2 .*delete"):
        read_checkpoint(edited, "fp", "step", 10)
    for bad in (0, 11, 2.5, "3", True):
        with pytest.raises(CheckpointError, match="expected an integer from 1 to 10"):
            read_checkpoint(_state(tmp_path / f"b{bad}", step=bad), "fp", "step", 10)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_checkpoint(tmp_path / "garbled", "fp", "step", 10)
    (tmp_path / "nostate").mkdir()
    (tmp_path / "nostate" / "optimizer.pt").write_text("x")
    with pytest.raises(CheckpointError, match="no state.json"):
        read_checkpoint(tmp_path / "nostate", "fp", "step", 10)


def test_a_full_disk_while_writing_names_the_file_whatever_the_writer_says(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from shardlib import io

    target = tmp_path / "results.nc"

    def hdf_error(tmp):  # what netCDF raises when the disk fills up
        Path(tmp).write_text("partial")
        raise RuntimeError("NetCDF: HDF error")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OSError) as e:
        atomic_write(target, hdf_error)
    assert e.value.errno == 28 and e.value.filename == str(target) and "HDF error; 1 MiB free" in e.value.strerror
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone, freeing what it held

    def enospc(tmp):
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError) as e:
        io.write_checkpoint(tmp_path / "ckpt", {"step": 1}, {"model": lambda f: enospc(f)})
    assert e.value.errno == 28 and e.value.filename == str(tmp_path / "ckpt") and not (tmp_path / "ckpt.tmp").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="HDF error"):  # with free space it is another problem: left as it is
        atomic_write(target, hdf_error)
