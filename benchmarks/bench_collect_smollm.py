"""Benchmark: where a collecting GRPO step's time goes on SmolLM2-135M-Instruct (configs/smollm.yaml, stage rl_text).

    python benchmarks/bench_collect_smollm.py [--policy runs/smollm/model/policy] [--repeats 5] [--threads 1]

On one GRPO rollout of the config (3 prompts x 8 completions), times in one run, each the median of
``--repeats`` taken in turn after a warm-up: sampling the rollout; the forward and backward pass as a step that does not collect runs it
(each prompt's shared tokens once, ``share_prompts``); the same pass on every completion's own rows (what
per-event gradients need); that pass with the collector's capture of all 90 MLP matrices, their per-event
factors compressed to rank 4; and the optimizer step. A step is sampling + pass + optimizer step, so the
ratios say what collecting costs against a step that shares prompts and against one that runs the same rows.
``--threads`` (default 1, as each stage kernel of ``make study`` computes; the study's GRPO also shares the
machine with the SFT control, which this benchmark does not).
Writes ``benchmarks/results/bench_collect_smollm.json``. Needs the SmolLM2 study's model stage
(``make study CONFIG=configs/smollm.yaml RUN=smollm``, or ``--only model``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from shardlib import policy as pol
from shardlib import rl
from shardlib.collector import UpdateCollector

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(ROOT / "runs" / "smollm" / "model" / "policy"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the study's kernels: 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_collect_smollm.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (Path(args.policy) / "config.json").exists():
        sys.exit(
            f"no policy at {args.policy}: run the SmolLM2 study's model stage first "
            "(make study CONFIG=configs/smollm.yaml RUN=smollm), or pass --policy"
        )
    cfg = yaml.safe_load((ROOT / "configs" / "smollm.yaml").read_text())["stages"]["rl_text"]["params"]
    p = rl.RLParams.from_dict({**cfg, "init_path": args.policy, "out_dir": tempfile.mkdtemp(), "device": "cpu"})
    testbed = rl.make_testbed(p)
    model = rl.initial_policy(p, testbed)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)

    class OneProcess:  # what rl.rollout reads of an accelerate Accelerator
        device, num_processes, process_index = torch.device("cpu"), 1, 0

    with torch.no_grad():
        snapshot = {n: t.clone() for n, t in model.state_dict().items()}
    col = UpdateCollector(model, p.collect_params, lr=p.lr, factored=True, max_rank=p.collect_max_rank)
    ro = rl.rollout(p, testbed, model, 0, OneProcess())
    prompt, pmask = ro.rep["prompt"], ro.rep["prompt_mask"]
    vs = getattr(testbed, "vocab_size", None)

    def backward(share: bool, collect: bool) -> None:
        with col.capture(True) if collect else nullcontext():
            logp, _ = pol.logprobs(model, prompt, ro.comp, vs, p.temperature, pmask, share_prompts=share)
            (-(logp * ro.adv[:, None] * ro.mask).sum()).backward()
        if collect:  # the events' updates and kept fractions, as a step makes them (no store: nothing written)
            col.after_step(0)

    def adam_step() -> float:
        backward(True, False)  # a gradient to step with (not timed)
        t = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t
        opt.zero_grad(set_to_none=True)
        model.load_state_dict(snapshot)  # the other parts keep timing the policy of the rollout
        return dt

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    parts = {
        "sample": lambda: timed(lambda: rl.rollout(p, testbed, model, 0, OneProcess())),
        "pass_shared": lambda: timed(lambda: backward(True, False)),
        "pass_own_rows": lambda: timed(lambda: backward(False, False)),
        "pass_own_rows_collect": lambda: timed(lambda: backward(False, True)),
        "optimizer_step": adam_step,
    }
    for fn in parts.values():  # warm-up: first calls allocate (and Adam creates its state)
        fn()
    # round-robin repeats, so that a slow spell of the machine falls on every part alike; medians
    times = {k: [] for k in parts}
    for _ in range(args.repeats):
        for k, fn in parts.items():
            times[k].append(fn())
    secs = {k: statistics.median(v) for k, v in times.items()}
    base = secs["sample"] + secs["optimizer_step"]
    step = {k: base + secs[k] for k in ("pass_shared", "pass_own_rows", "pass_own_rows_collect")}
    out = {
        "model": str(Path(args.policy).resolve().relative_to(ROOT))
        if ROOT in Path(args.policy).resolve().parents
        else args.policy,
        "completions": int(ro.comp.shape[0]),
        "prompt_width": int(prompt.shape[1]),
        "completion_width": int(ro.comp.shape[1]),
        "matrices": len(col.params),
        "max_rank": p.collect_max_rank,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "seconds": {k: round(v, 3) for k, v in secs.items()},
        "step_seconds": {k: round(v, 3) for k, v in step.items()},
        "collecting_over_shared_step": round(step["pass_own_rows_collect"] / step["pass_shared"], 3),
        "collecting_over_same_rows_step": round(step["pass_own_rows_collect"] / step["pass_own_rows"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for k, v in secs.items():
        print(f"{k:24s} {v:7.2f} s")
    print(
        f"a collecting step against a step that shares prompts: {out['collecting_over_shared_step']:.2f}x; against a "
        f"step on the same rows: {out['collecting_over_same_rows_step']:.2f}x (target <= 1.5x)"
    )
    return out


if __name__ == "__main__":
    main()
