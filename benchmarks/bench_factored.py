"""Benchmark: dense against factored per-event updates of Llama-style MLP matrices (issue 12, part 3, partly).

    python benchmarks/bench_factored.py [--widths 128 256 512 1024 2048] [--tokens 32] [--events 16]

For each width d_model (d_ff = 4 d_model) one Llama-style MLP block (gate, up, down; no biases; SiLU),
``--events`` events of ``--tokens`` tokens each, a loss with a nonzero output gradient on every token.
The collector records the three matrices' event updates dense, factored exactly (one factor per
token) and factored with ``max_rank = tokens / 2``; each way is timed (capture, backward and turning
the hooks' (x, delta) into event updates; best of 3) and its bytes per event counted (fp32). Also: the
memory a 2,048-event dense ring buffer would need, against this machine's memory. What this does not
measure yet: SAE time per step on factored events (the SAE densifies them: issue 12, part 2) and peak
memory. Writes ``benchmarks/results/bench_factored.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib.updates import Factored, UpdateCollector  # noqa: E402


class MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            nn.Linear(d, f, False),
            nn.Linear(d, f, False),
            nn.Linear(f, d, False),
        )

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def nbytes(u) -> int:
    return sum(t.numel() * t.element_size() for t in u) if isinstance(u, Factored) else u.numel() * u.element_size()


def one(d: int, tokens: int, events: int, factored: bool, max_rank):
    torch.manual_seed(0)
    m = MLP(d, 4 * d)
    x = torch.randn(events, tokens, d)
    w = torch.randn(d)
    col = UpdateCollector(m, ["*"], lr=1e-3, factored=factored, max_rank=max_rank)
    best, ups = float("inf"), None
    for _ in range(3):
        m.zero_grad()
        t0 = time.perf_counter()
        with col.capture():
            (m(x) @ w).sum().backward()
        kept = [float(v.mean()) for k in col._kept for v in k.values()]
        ups = col.after_step(0)
        best = min(best, time.perf_counter() - t0)
    per_event = sum(nbytes(u) for u in ups.values()) // events
    out = {"events_per_s": events / best, "bytes_per_event": per_event}
    if kept:  # compressed: the mean share of ||U_e||^2 kept
        out["kept_energy"] = sum(kept) / len(kept)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="*", type=int, default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--events", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_factored.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for d in args.widths:
        row = {"d_model": d, "d_ff": 4 * d}
        for name, fac, r in (("dense", False, None), ("factored", True, None), ("factored_r", True, args.tokens // 2)):
            for k, v in one(d, args.tokens, args.events, fac, r).items():
                row[f"{name}_{k}"] = v
        row["bytes_ratio_exact"] = row["dense_bytes_per_event"] / row["factored_bytes_per_event"]
        row["bytes_ratio_rank"] = row["dense_bytes_per_event"] / row["factored_r_bytes_per_event"]
        row["speed_ratio_exact"] = row["factored_events_per_s"] / row["dense_events_per_s"]
        row["dense_buffer_2048_gib"] = 2048 * row["dense_bytes_per_event"] / 2**30
        row["factored_buffer_2048_gib"] = 2048 * row["factored_bytes_per_event"] / 2**30
        row["dense_buffer_fits"] = 2048 * row["dense_bytes_per_event"] < mem
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    result = {"tokens": args.tokens, "events": args.events, "machine_memory_gib": mem / 2**30, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
