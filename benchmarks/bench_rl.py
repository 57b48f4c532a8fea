"""Benchmark: GRPO throughput, the cost of event-update collection, per-event gradient throughput.

    python benchmarks/bench_rl.py [--steps 30] [--pretrained runs/default/pretrain/policy]

Measures, in one run on this machine, on the default LM config (configs/default.yaml,
stage rl_lm): tokens/s and steps/s of GRPO; the time of an RL step with event and step
update collection against the same step without it (ratio; target <= 1.3); bytes per
event; per-event gradient throughput of the collector's hook path against a
``torch.func.vmap(grad)`` reference on the same events. Prints a table and writes
``benchmarks/results/bench_rl.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from shardlib import policy as pol
from shardlib import rl
from shardlib.collector import UpdateCollector, select_params
from shardlib.store import bytes_per_event
from shardlib.tasks import SyntheticTasks

ROOT = Path(__file__).resolve().parent.parent


def lm_params(tmp, pretrained, steps, collect):
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["stages"]["rl_lm"]["params"]
    cfg = {
        **cfg,
        "init_path": pretrained,
        "steps": steps,
        "out_dir": str(tmp),
        "device": "cpu",
        "eval_prompts": 8,
        "checkpoint_every": 10_000,
        "collect_every": 1,
        "buffer_capacity": 0,
        "online_sae": False,
    }
    if not collect:
        cfg["collect_params"] = []
    return rl.RLParams.from_dict(cfg)


def timed_train(p):
    res = rl.train(p, progress=False)
    ds = res.results
    # the first steps include warm-up; use the median step time
    return float(statistics.median(1 / ds.steps_per_s.values[2:])), float(ds.tokens_per_s.values[2:].mean())


def per_event_throughput(model, names, n_events=256, repeats=3):
    """events/s of the hook path and of vmap(grad) on the same GRPO token loss."""
    from torch.func import functional_call, grad, vmap

    tasks = SyntheticTasks()
    g = torch.Generator().manual_seed(0)
    b = tasks.sample(n_events, g)
    comp, mask = pol.sample(model, b["prompt"], tasks.max_new_tokens, g, vocab_size=tasks.vocab_size)
    adv = torch.randn(n_events)
    col = UpdateCollector(model, names, lr=1.0)

    def hooks():
        with col.capture():
            logp, _ = pol.logprobs(model, b["prompt"], comp, tasks.vocab_size)
            (-(logp * adv[:, None] * mask).sum()).backward()
        out = col.pop_event_gradients()
        model.zero_grad()
        return out

    params = {n: p.detach() for n, p in model.named_parameters()}
    sel = {n: params[n] for n in names}

    def one_loss(sp, prompt, c, m, a):
        logits = functional_call(model, {**params, **sp}, (torch.cat([prompt, c])[None],), {"use_cache": False}).logits
        logp = torch.log_softmax(logits[0, prompt.shape[0] - 1 : -1, : tasks.vocab_size], -1).gather(-1, c[:, None])[
            :, 0
        ]
        return -(logp * a * m).sum()

    def vmapped():
        return vmap(grad(one_loss), in_dims=(None, 0, 0, 0, 0))(sel, b["prompt"], comp, mask.float(), adv)

    out = {}
    for name, fn in (("hooks", hooks), ("vmap", vmapped)):
        fn()
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = fn()
            t.append(time.perf_counter() - t0)
        out[name] = n_events / min(t)
        out[name + "_result"] = res
    diff = max(float((out["hooks_result"][n] - out["vmap_result"][n]).abs().max()) for n in names)
    scale = max(float(out["vmap_result"][n].abs().max()) for n in names)
    return out["hooks"], out["vmap"], diff / scale


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pretrained", default=str(ROOT / "runs/default/pretrain/policy"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if not Path(args.pretrained).exists():
        raise SystemExit(
            f"{args.pretrained} does not exist: run `make study` (or the pretrain stage) first, or pass --pretrained"
        )
    with tempfile.TemporaryDirectory() as tmp:
        # alternate the two variants, twice, to spread machine noise over both
        plain, collect, tok = [], [], []
        for i in range(2):
            t, tk = timed_train(lm_params(Path(tmp) / f"plain{i}", args.pretrained, args.steps, False))
            plain.append(t)
            tok.append(tk)
            t, _ = timed_train(lm_params(Path(tmp) / f"col{i}", args.pretrained, args.steps, True))
            collect.append(t)
        p = lm_params(Path(tmp) / "x", args.pretrained, 1, True)
        model = pol.load_policy(args.pretrained)
        names = list(select_params(model, p.collect_params))
        bpe = bytes_per_event(select_params(model, p.collect_params), p.store_dtype)
        hooks_eps, vmap_eps, diff = per_event_throughput(model, names)
    step_plain, step_col = min(plain), min(collect)
    result = {
        "grpo_tokens_per_s": max(tok),
        "grpo_steps_per_s": 1 / step_plain,
        "step_time_without_collection_s": step_plain,
        "step_time_with_collection_s": step_col,
        "collection_overhead_ratio": step_col / step_plain,
        "events_per_step": p.prompts_per_step * p.group_size,
        "bytes_per_event": bpe,
        "collected_params": names,
        "per_event_grad_events_per_s_hooks": hooks_eps,
        "per_event_grad_events_per_s_vmap": vmap_eps,
        "hooks_vs_vmap_speedup": hooks_eps / vmap_eps,
        "hooks_vs_vmap_max_rel_diff": diff,
        "torch_threads": torch.get_num_threads(),
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_rl.json").write_text(json.dumps(result, indent=1))
    for k, v in result.items():
        print(f"{k:40s} {v}")
    print(
        f"target: collection overhead <= 1.3x -> {'MET' if result['collection_overhead_ratio'] <= 1.3 else 'NOT MET'}"
    )


if __name__ == "__main__":
    main()
