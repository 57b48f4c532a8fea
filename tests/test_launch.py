import json
import subprocess
import sys

from shardlib.io import load_results
from shardlib.updates import open_store


def test_launch_runs_the_stage_function_and_writes_what_the_notebook_writes(tmp_path):
    """`python -m shardlib.launch rl ... online_sae=true` writes the online shards (it used not to)."""
    out = tmp_path / "rl"
    args = [
        f"out_dir={out}",
        "testbed=bandit",
        "steps=4",
        "prompts_per_step=8",
        "group_size=4",
        "eval_prompts=16",
        "device=cpu",
        "collect_params=['*']",
        "buffer_capacity=64",
        "online_sae=true",
        "online_warmup=16",
        "online_batch_size=8",
        "online_n_latents=4",
        "online_k=1",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "shardlib.launch", "rl", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "processes=1" in r.stdout
    ds = load_results(out / "results.nc")
    assert ds.attrs["num_processes"] == 1 and json.loads(ds.attrs["config"])["online_sae"] is True
    assert (out / "online_sae" / "sae.safetensors").exists()
    assert load_results(out / "online_shards.nc").sizes["shard"] == 4
    assert open_store(out / "updates" / "events").sizes["event"] == 4 * 8 * 4
    bad = subprocess.run(
        [sys.executable, "-m", "shardlib.launch", "rl", f"out_dir={out}", "lr=.nan"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "parameter 'lr': got nan" in bad.stderr
