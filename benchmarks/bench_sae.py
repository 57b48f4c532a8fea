"""Benchmark: the planted-shard targets, low-rank against dense, and achieved FLOP/s.

    python benchmarks/bench_sae.py [--config configs/default.yaml]

On the planted-shard control at the default size (the config's ``planted`` stage), for
the low-rank SAE (rank 1) and the dense baseline at the same number of latents and k on
the same data, each in its own process (so peak memory is its own):
recovery (R@0.9, MMCS(G->D)), wall time, time per epoch, SAE parameters, peak RSS.
Reports the ratios measured in this one run, the targets met or not, and the achieved
FLOP/s of one SAE training step (torch's FlopCounterMode) against this machine's fp32
matmul peak measured in the same run. Writes ``benchmarks/results/bench_sae.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def planted_params(config, rank, out_dir):
    from shardlib.planted import PlantedParams

    cfg = yaml.safe_load(Path(config).read_text())["stages"]["planted"]["params"]
    return PlantedParams.from_dict({**cfg, "ranks": [rank], "seeds": [0], "out_dir": out_dir, "device": "cpu"})


def variant(config: str, rank: int) -> dict:
    """Run in a child process: one SAE on the planted data; prints a JSON line."""
    import tempfile

    from shardlib.planted import run_control

    with tempfile.TemporaryDirectory() as tmp:
        p = planted_params(config, rank, tmp)
        t0 = time.perf_counter()
        ds, saes = run_control(p, progress=False)
        total = time.perf_counter() - t0
    row = {
        k: float(ds[k].values.ravel()[0])
        for k in (
            "mmcs_g2d",
            "r_at_0.9",
            "uniqueness",
            "hungarian_mcc",
            "fvu",
            "l0",
            "seconds",
            "seconds_per_epoch",
            "n_parameters",
        )
    }
    row["seconds_with_data"] = total
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def baseline_rss() -> float:
    """Peak RSS of a process that imports everything and builds the data but trains nothing."""
    import shardlib.planted
    import shardlib.shards  # noqa: F401

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(config: str) -> tuple[float, float]:
    """(FLOPs of one rank-1 SAE training step counted by FlopCounterMode, seconds per step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from shardlib.planted import planted_store
    from shardlib.sae import SAEConfig
    from shardlib.trainer import TrainConfig, build_trainer

    p = planted_params(config, 1, "/tmp/unused")
    _, (data, *_) = planted_store(p)
    arch = SAEConfig(n_latents=p.n_latents, k=p.k, rank=1, signed=p.signed, b_pre_rank=0)
    tr = build_trainer(TrainConfig(arch, lr=p.lr, dead_window=10**9, resample_dead=False, fire_frac=0.0), data)
    batch = {k: v[: p.batch_size] for k, v in data.items()}
    tr.samples = 10**9 + 10  # make every latent count as dead once, so AuxK runs as in the worst case
    tr.last_fired[: p.n_latents // 2] = tr.samples
    with FlopCounterMode(display=False) as fc:
        tr.step(batch)
    flops = fc.get_total_flops()
    tr.step(batch)
    secs = min(_time(lambda: tr.step(batch)) for _ in range(10))
    return float(flops), secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--variant", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant is not None:
        print(json.dumps(variant(args.config, args.variant)))
        return
    if args.baseline:
        print(json.dumps({"peak_rss_mib": baseline_rss()}))
        return
    torch.manual_seed(0)

    def child(*extra):
        r = subprocess.run(
            [sys.executable, __file__, "--config", args.config, *extra], capture_output=True, text=True, check=True
        )
        return json.loads(r.stdout.strip().splitlines()[-1])

    base = child("--baseline")["peak_rss_mib"]
    low, dense = child("--variant", "1"), child("--variant", "0")
    flops, secs = step_flops(args.config)
    peak = matmul_peak()
    res = {
        "lowrank_rank1": low,
        "dense": dense,
        "baseline_process_rss_mib": base,
        "param_ratio_dense_over_lowrank": dense["n_parameters"] / low["n_parameters"],
        "epoch_time_ratio_dense_over_lowrank": dense["seconds_per_epoch"] / low["seconds_per_epoch"],
        "sae_step_flops": flops,
        "sae_step_seconds": secs,
        "sae_achieved_flop_per_s": flops / secs,
        "matmul_peak_flop_per_s": peak,
        "fraction_of_matmul_peak": flops / secs / peak,
    }
    targets = {
        "recovery R@0.9 >= 0.9 and MMCS(G->D) >= 0.95": low["r_at_0.9"] >= 0.9 and low["mmcs_g2d"] >= 0.95,
        "low-rank planted run under 2 minutes": low["seconds_with_data"] < 120,
        "no worse recovery than dense": low["r_at_0.9"] >= dense["r_at_0.9"]
        and low["mmcs_g2d"] >= dense["mmcs_g2d"] - 1e-3,
        ">= 10x fewer SAE parameters": res["param_ratio_dense_over_lowrank"] >= 10,
        "no slower per epoch than dense": res["epoch_time_ratio_dense_over_lowrank"] >= 1.0,
    }
    res["targets"] = {k: bool(v) for k, v in targets.items()}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sae.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
