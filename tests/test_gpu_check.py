"""The GPU study's config, the pieces it needs (factors-only shard files, the online SAE's device) and
scripts/gpu_check.sh end to end on CPU with a tiny override (configs/gpu_tiny.yaml)."""

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from shardlib import runner
from shardlib.runconfig import load_config
from shardlib.shardfile import shard_directions, shards_dataset

ROOT = Path(__file__).resolve().parent.parent
GPU, GPU_TINY = ROOT / "configs" / "gpu.yaml", ROOT / "configs" / "gpu_tiny.yaml"


@pytest.mark.parametrize("config", [GPU, GPU_TINY])
def test_gpu_configs_validate(config, tmp_path):
    stages = runner.plan(load_config(config), tmp_path)
    runner.validate(stages)  # every stage's parameters accepted by its Params class
    names = {s.name for s in stages}
    assert {"pretrain", "rl_lm", "shards_lm", "analysis_lm", "figures"} <= names


def test_gpu_study_is_the_described_scale_up(tmp_path):
    """A Llama-style policy of 20-50M parameters, every MLP matrix collected factored, an online SAE of
    1-2k latents; the stages that densify the LM's events read one matrix."""
    from shardlib import policy as pol
    from shardlib.tasks import SyntheticTasks

    st = {s.name: s.params for s in runner.plan(load_config(GPU), tmp_path)}
    pre, rl = st["pretrain"], st["rl_lm"]
    t = SyntheticTasks()
    with torch.device("meta"):
        model = pol.tiny_lm(t.vocab_size, pre["d_model"], pre["n_layers"], pre["n_heads"], pre["d_ff"], max_len=16)
    assert 20e6 <= sum(p.numel() for p in model.parameters()) <= 50e6
    mlp = [n for n, p in model.named_parameters() if ".mlp." in n and p.ndim == 2]
    collected = [n for n in mlp if any(fnmatch.fnmatchcase(n, g) for g in rl["collect_params"])]
    assert len(collected) == len(mlp) == 3 * pre["n_layers"]
    assert rl["collect_factored"] and rl["online_sae"] and 1024 <= rl["online_n_latents"] <= 2048
    names = dict(model.named_parameters())
    for stage in ("shards_lm", "frontier_events[rank=1,k=4]", "frontier_steps[rank=1,k=4]"):
        (one,) = st[stage]["params"]
        assert one in names and names[one].ndim == 2
    assert st["sparsity"]["max_updates"] == 1
    default = {s.name: s.params for s in runner.plan(load_config(ROOT / "configs" / "default.yaml"), tmp_path)}
    for stage in ("pretrain", "rl_lm", "sft_lm", "shards_lm", "planted"):  # GPU stages: device auto, as the default
        assert st[stage].get("device", "auto") == default[stage].get("device", "auto") == "auto"


def _small_sae():
    from shardlib.sae import ShardSAE

    return ShardSAE({"w": (6, 5), "b": (6,)}, n_latents=4, k=2, rank=2, seed=0)


def test_shards_file_keeps_factors_only_above_the_limit(tmp_path):
    sae = _small_sae()
    want = {n: d.numpy() for n, d in sae.directions().items()}
    full = shards_dataset(sae)
    assert "w" in full and not full["w__U"].attrs  # the usual file: unchanged
    small = shards_dataset(sae, dense_max_bytes=0)
    assert "w" not in small and "b" in small
    assert small["w__U"].attrs == {"param": "w", "factor": "U"} and small["w__V"].attrs["factor"] == "V"
    small.to_netcdf(tmp_path / "shards.nc")
    with xr.open_dataset(tmp_path / "shards.nc") as ds:
        dirs = shard_directions(ds.load())
    assert list(dirs) == ["w", "b"] == list(shard_directions(full))
    for n in ("w", "b"):
        np.testing.assert_allclose(dirs[n], want[n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(shard_directions(full)[n], want[n], rtol=1e-6)


def test_online_trainer_trains_where_the_rl_stage_runs():
    from shardlib.rl import RLParams
    from shardlib.shards import OnlineTrainer

    base = {"collect_params": ["*"], "buffer_capacity": 8, "online_sae": True}
    assert OnlineTrainer.from_rl(RLParams.from_dict({**base, "device": "cpu"})).device == torch.device("cpu")
    auto = OnlineTrainer.from_rl(RLParams.from_dict({**base, "device": "auto"}))
    assert auto.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_gpu_check_script_on_cpu(tmp_path):
    """gpu_check.sh with the tiny config, two stages and tiny benchmarks: one summary with stage times,
    RL tokens/s, bytes per event, the SAE step on the CPU (no GPU here: its figures are null)."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_CHECK_CONFIG": str(GPU_TINY),
        "GPU_CHECK_RUNS_DIR": str(tmp_path),
        "GPU_CHECK_ONLY": "pretrain rl_lm",
        "GPU_CHECK_SET": "rl_lm.steps=2",
        "GPU_CHECK_TIMEOUT": "240",
        "GPU_CHECK_THREADS": "1",  # the other test worker has the second core
        "GPU_CHECK_SAE_ARGS": "--steps 1 --cpu-steps 1",
        "GPU_CHECK_BENCH_ARGS": "--widths 16 --tokens 4 --events 4 --latents 8 --sae-batch 4 --sae-steps 1 "
        "--recovery-events 32 --recovery-epochs 1",
    }
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "gpu_tiny"
    s = json.loads((run / "gpu_check.json").read_text())
    assert s["device"]["device"] == "cpu" and s["device"]["gpu_name"] is None
    assert s["study"]["status"] == "done" and s["study"]["wall_seconds"] > 0
    assert s["sets"] == ["rl_lm.steps=2"] and s["only"] == ["pretrain", "rl_lm"]
    assert set(s["stages"]) == {"pretrain", "rl_lm"}
    for rec in s["stages"].values():
        assert rec["status"] == "done" and rec["seconds"] > 0 and rec["gpu_memory_peak_mib"] is None
    assert s["gpu_memory"] is None
    assert s["policy_parameters"] > 0
    assert s["rl"]["rl_lm"]["steps"] == 2 and s["rl"]["rl_lm"]["tokens_per_s_median"] > 0
    ev = s["stores"]["rl_lm/updates/events"]
    assert ev["events"] == 2 * 4 * 4 and ev["factored_tensors"] == ev["tensors"] == 24
    assert ev["bytes_per_event"] > 0 and ev["dense_fp32_bytes_per_event"] == 4 * 8 * 3 * 16 * 32
    sae = s["sae_step"]
    assert sae["n_latents"] == 16 and sae["factored_tensors"] == 24 and list(sae["devices"]) == ["cpu"]
    assert sae["devices"]["cpu"]["no_dead_s_per_step"] > 0 and sae["devices"]["cpu"]["all_dead_s_per_step"] > 0
    assert sae["cpu_over_gpu"] is None
    (row,) = s["bench_factored"]["rows"]
    assert row["d_model"] == 16 and row["factored_bytes_per_event"] > 0 and s["bench_factored"]["exit_code"] == 0
    assert (run / "rl_lm" / "online_shards.nc").exists()  # the online SAE trained
    md = (run / "gpu_check.md").read_text()
    assert "## Stages" in md and "rl_lm/updates/events" in md and "no GPU" in md
