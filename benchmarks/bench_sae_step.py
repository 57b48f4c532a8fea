"""Benchmark: one training step of an RL stage's online SAE, on the GPU (when there is one) and on the CPU.

    python benchmarks/bench_sae_step.py --run-dir runs/gpu --out runs/gpu/gpu_check/sae_step.json

Times training steps of the online SAE of ``--stage`` (its latents, k, rank and batch size, from the stage's
``.stage.json``) on the first events of the stage's own event store (read with ``shards.load_updates``, as
the shard stage reads them), in one process, in two settings: ``no_dead`` (no latent counts as dead: no
AuxK, no restarts; the usual step) and ``all_dead`` (every latent that did not fire in the previous step
counts as dead: AuxK over up to ``aux_k`` of them and restarts; the worst case). Median of the timed steps
after one warm-up step; peak GPU memory (``torch.cuda.max_memory_allocated``) of each setting.
``scripts/gpu_check.sh`` runs it; ``scripts/gpu_summary.py`` puts its JSON in the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def first_events(store: Path, n: int) -> dict:
    """``n`` events from the start of a store (repeated when it holds fewer): ``{param: tensor or Factored}``."""
    from shardlib.factored import take
    from shardlib.shards import load_updates

    data, _ = load_updates(store)
    total = len(next(iter(data.values())))
    idx = np.arange(n) % total
    return {name: take(v, idx) for name, v in data.items()}


def _time_steps(cfg, data: dict, dev: str, n: int) -> dict:
    """Seconds per step (median after one warm-up step) and peak GPU memory, ``no_dead`` and ``all_dead``."""
    from dataclasses import replace

    from shardlib.common import deterministic
    from shardlib.trainer import build_trainer

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    batch = {name: v.to(dev) for name, v in data.items()}
    row = {"timed_steps": n}
    for setting, window in (("no_dead", 10**15), ("all_dead", 1)):
        tr = build_trainer(replace(cfg, dead_window=window), data, device=dev)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        with deterministic():  # as the online and offline trainers run
            for _ in range(n + 1):
                sync()
                t0 = time.perf_counter()
                tr.step(batch)
                sync()
                times.append(time.perf_counter() - t0)
        row[f"{setting}_s_per_step"] = statistics.median(times[1:])
        row[f"{setting}_peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
        del tr
    return row


def sae_step_timing(
    store: Path, n_latents: int, k: int, rank: int, batch: int, steps: int = 10, cpu_steps: int = 2, devices=None
) -> dict:
    """Seconds per SAE training step on each device, ``no_dead`` and ``all_dead`` (see the module docstring), on
    ``batch`` events of ``store``."""
    from shardlib.factored import Factored
    from shardlib.sae import SAEConfig
    from shardlib.trainer import TrainConfig, build_trainer

    data = first_events(store, batch)
    cfg = TrainConfig(SAEConfig(n_latents=n_latents, k=k, rank=rank), batch_size=batch)  # the shard stage's defaults
    base = build_trainer(cfg, data)  # for the SAE's sizes
    devices = devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    out = {
        "store": str(store),
        "events_per_step": batch,
        "n_latents": n_latents,
        "k": k,
        "rank": rank,
        "aux_k": base.aux_k,
        "tensors": len(data),
        "factored_tensors": sum(isinstance(v, Factored) for v in data.values()),
        "sae_parameters": base.sae.n_parameters(),
        "devices": {dev: _time_steps(cfg, data, dev, steps if dev != "cpu" else cpu_steps) for dev in devices},
    }
    if "cuda" in out["devices"] and "cpu" in out["devices"]:
        g, c = out["devices"]["cuda"], out["devices"]["cpu"]
        out["cpu_over_gpu"] = {s: c[f"{s}_s_per_step"] / g[f"{s}_s_per_step"] for s in ("no_dead", "all_dead")}
    else:
        out["cpu_over_gpu"] = None
    return out


def sae_step_for_run(run_dir: Path, stage: str = "rl_lm", **overrides) -> dict:
    """:func:`sae_step_timing` with the online SAE settings of ``stage`` (its ``.stage.json``), on its event store."""
    store = run_dir / stage / "updates" / "events"
    try:
        params = json.loads((run_dir / stage / ".stage.json").read_text())["params"]
    except (OSError, ValueError, KeyError):
        return {"skipped": f"no stage record {run_dir / stage / '.stage.json'}"}
    try:
        chunks = json.loads((store / "store.json").read_text()).get("chunks")
    except (OSError, ValueError):
        chunks = None
    if not chunks:
        return {"skipped": f"no events stored in {store}"}
    settings = {
        "n_latents": params.get("online_n_latents", 32),
        "k": params.get("online_k", 4),
        "rank": params.get("online_rank", 1),
        "batch": params.get("online_batch_size", 128),
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return {"stage": stage, **sae_step_timing(store, **settings)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", default="rl_lm")
    ap.add_argument("--latents", type=int, help="default: the stage's online_n_latents")
    ap.add_argument("--k", type=int, help="default: the stage's online_k")
    ap.add_argument("--batch", type=int, help="default: the stage's online_batch_size")
    ap.add_argument("--steps", type=int, default=10, help="timed steps on the GPU")
    ap.add_argument("--cpu-steps", type=int, default=2, help="timed steps on the CPU")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    res = sae_step_for_run(
        Path(args.run_dir),
        args.stage,
        n_latents=args.latents,
        k=args.k,
        batch=args.batch,
        steps=args.steps,
        cpu_steps=args.cpu_steps,
    )
    text = json.dumps(res, indent=1)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
