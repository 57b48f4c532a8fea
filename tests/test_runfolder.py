import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shardlib import runner
from shardlib.runconfig import PipelineError, load_config
from shardlib.runfolder import run_lock

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def _tiny(tmp_path, stages):
    cfg = load_config(TINY)
    cfg["stages"] = {k: cfg["stages"][k] for k in stages}
    return cfg


def test_a_second_run_on_the_same_run_name_is_refused_and_a_stale_lock_taken_over(tmp_path):
    cfg = _tiny(tmp_path, ["pretrain"])
    run_dir = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen(  # another process holds the run, as a first `shardlib run` would
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from shardlib.runfolder import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PipelineError, match=rf"in use by process {holder.pid} "):
            runner.run(cfg, runs_dir=tmp_path / "runs")
    finally:
        holder.kill()
        holder.wait()
    # its holder is gone (killed): the kernel released the lock, whatever the file says
    (run_dir / ".shardlib.lock").write_text(
        json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "then"})
    )
    with run_lock(run_dir):
        assert json.loads((run_dir / ".shardlib.lock").read_text())["pid"] == os.getpid()
    (run_dir / ".shardlib.lock").write_text("{half")  # a lock file a kill left half-written
    with run_lock(run_dir):
        pass
