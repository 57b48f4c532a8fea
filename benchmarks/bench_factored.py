"""Benchmark: dense against factored per-event updates of Llama-style MLP matrices (issue 12, part 3).

    python benchmarks/bench_factored.py [--widths 128 256 512 1024 2048] [--tokens 32] [--events 16]
    python benchmarks/bench_factored.py --plot   # the log-log figure from the saved results only

For each width d_model (d_ff = 4 d_model) one Llama-style MLP block (gate, up, down; no biases; SiLU):

- *collection*: ``--events`` events of ``--tokens`` tokens each, a loss with a nonzero output gradient
  on every token. The collector records the three matrices' event updates dense, factored exactly
  (one factor per token) and factored with ``max_rank = tokens / 2``; each way is timed (capture,
  backward and turning the hooks' (x, delta) into event updates; best of 3) and its bytes per event
  counted (fp32); also the memory a 2,048-event dense ring buffer would need, against this machine's.
- *SAE step*: the same low-rank ShardSAE (``--latents`` latents, rank 1, signed TopK k = 4, b_pre of
  rank 1, AuxK over a tenth of the latents held dead) takes training steps on a batch of ``--sae-batch`` events given dense and given as
  their exact factors (``--tokens`` factors each); median time of ``--sae-steps`` steps after one
  warm-up step, and the peak resident memory of a fresh process doing only that (``VmHWM`` after a
  reset: the Python and torch baseline included).
- *recovery*: planted factored data (``planted.planted_factored``: 16 rank-1 shards over the three
  matrices, 2 per event, log-normal magnitudes, noise), 16 latents, 20 epochs of 64; trained on the factors
  and, for widths up to ``--recovery-dense-max``, on the dense twin with the same seed; MMCS(G->D) of
  each (``planted.factored_cosines``).

Writes ``benchmarks/results/bench_factored.json`` and the log-log plot
``benchmarks/results/bench_factored.png``; ``--table`` prints the README table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib.collector import UpdateCollector  # noqa: E402
from shardlib.common import fmt_bytes  # noqa: E402
from shardlib.factored import Factored  # noqa: E402


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
        kept = [float(v.mean()) for v in col.kept_fractions().values()]
        ups = col.after_step(0)
        best = min(best, time.perf_counter() - t0)
    per_event = sum(nbytes(u) for u in ups.values()) // events
    out = {"events_per_s": events / best, "bytes_per_event": per_event}
    if kept:  # compressed: the mean share of ||U_e||^2 kept
        out["kept_energy"] = sum(kept) / len(kept)
    return out


def mlp_shapes(d: int) -> dict[str, tuple]:
    return {"gate_proj.weight": (4 * d, d), "up_proj.weight": (4 * d, d), "down_proj.weight": (d, 4 * d)}


def sae_step(d: int, mode: str, latents: int, batch: int, tokens: int, steps: int) -> dict:
    """Median seconds per SAE training step on one batch given dense or factored (run in its own process,
    so that ``ru_maxrss`` is this measurement's peak)."""
    import statistics

    from shardlib.sae import SAEConfig
    from shardlib.trainer import TrainConfig, build_trainer

    torch.manual_seed(0)
    shapes = mlp_shapes(d)
    g = torch.Generator().manual_seed(0)
    x = {
        n: Factored(torch.randn(batch, tokens, o, generator=g) / o**0.5, torch.randn(batch, tokens, i, generator=g))
        for n, (o, i) in shapes.items()
    }
    if mode == "dense":
        x = {n: f.dense() for n, f in x.items()}
    arch = SAEConfig(n_latents=latents, k=4, rank=1, signed=True, b_pre_rank=1)
    tr = build_trainer(TrainConfig(arch, dead_window=10**12, resample_dead=False, fire_frac=0.0), x)
    times = []
    for _ in range(steps + 1):
        tr.last_fired[: latents // 10] = -(10**13)  # a tenth of the latents dead: AuxK runs on every step
        t0 = time.perf_counter()
        tr.step(x)
        times.append(time.perf_counter() - t0)
    return {"s_per_step": statistics.median(times[1:]), "peak_bytes": peak_rss()}


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (Linux: a forked child starts with its parent's peak)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Peak resident set size in bytes since :func:`reset_peak_rss` (VmHWM), else ``ru_maxrss``."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sae_step_subprocess(d, mode, args) -> dict:
    import subprocess

    cmd = [sys.executable, __file__, "--sae-one", str(d), mode, "--latents", str(args.latents)]
    cmd += ["--sae-batch", str(args.sae_batch), "--tokens", str(args.tokens), "--sae-steps", str(args.sae_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode == -9:  # the kernel's out-of-memory killer: this width does not fit the machine
        return {"s_per_step": None, "peak_bytes": None, "failed": "killed (out of memory)"}
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def recovery(d: int, mode: str, events: int, epochs: int, seed: int = 0) -> dict:
    """MMCS(G->D) of a 16-latent signed rank-1 SAE on planted factored data, trained on the factors or on
    the dense twin (same data, seed, split and batches)."""
    from shardlib.fit import FitParams, fit
    from shardlib.planted import factored_cosines, planted_factored

    data, truth, _ = planted_factored(mlp_shapes(d), n_shards=16, n_events=events, active=2, seed=seed)
    if mode == "dense":
        data = {n: f.dense() for n, f in data.items()}
    p = FitParams.from_dict(
        {"out_dir": "/tmp/bench_factored_recovery", "n_latents": 16, "k": 2, "rank": 1}
        | {"signed": True, "epochs": epochs, "batch_size": 64, "b_pre_rank": 1, "seed": seed, "device": "cpu"}
    )
    import shutil

    shutil.rmtree(p.out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = fit(p, data, progress=False)
    seconds = time.perf_counter() - t0
    shutil.rmtree(p.out_dir, ignore_errors=True)
    return {"mmcs": float(factored_cosines(truth, res.sae).max(1).mean()), "train_s": seconds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="*", type=int, default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--events", type=int, default=16)
    ap.add_argument("--latents", type=int, default=256, help="SAE latents for the step timing")
    ap.add_argument("--sae-batch", type=int, default=16, help="events per SAE step for the step timing")
    ap.add_argument("--sae-steps", type=int, default=3, help="timed SAE steps (after one warm-up step)")
    ap.add_argument("--recovery-events", type=int, default=2048)
    ap.add_argument("--recovery-epochs", type=int, default=20)
    ap.add_argument("--recovery-dense-max", type=int, default=128, help="largest width for the dense twin's SAE")
    ap.add_argument("--sae-one", nargs=2, metavar=("D_MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--plot", action="store_true", help="only redraw the plot from the saved results")
    ap.add_argument("--table", action="store_true", help="only print the README table from the saved results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_factored.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.sae_one:
        reset_peak_rss()
        d, mode = int(args.sae_one[0]), args.sae_one[1]
        print(json.dumps(sae_step(d, mode, args.latents, args.sae_batch, args.tokens, args.sae_steps)))
        return
    if args.plot or args.table:
        result = json.loads(Path(args.out).read_text())
        plot(result, Path(args.out).with_suffix(".png")) if args.plot else print(table(result))
        return
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
        row["factored_buffer_fits"] = 2048 * row["factored_bytes_per_event"] < mem
        for mode in ("dense", "factored"):
            for k, v in sae_step_subprocess(d, mode, args).items():
                row[f"sae_{mode}_{k}"] = v
        dense_s, fac_s = row["sae_dense_s_per_step"], row["sae_factored_s_per_step"]
        row["sae_speed_ratio"] = dense_s / fac_s if dense_s and fac_s else None
        for mode in ("factored", "dense"):
            if mode == "dense" and d > args.recovery_dense_max:
                continue
            for k, v in recovery(d, mode, args.recovery_events, args.recovery_epochs).items():
                row[f"recovery_{mode}_{k}"] = v
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    result = {
        "tokens": args.tokens,
        "events": args.events,
        "sae": {"latents": args.latents, "batch": args.sae_batch, "steps": args.sae_steps, "k": 4, "rank": 1},
        "recovery": {"events": args.recovery_events, "epochs": args.recovery_epochs, "shards": 16, "latents": 16},
        "machine_memory_gib": mem / 2**30,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.out).with_suffix(".png"))
    print(table(result))


def plot(result: dict, path: Path) -> None:
    """Log-log: bytes per event and SAE seconds per step against d_model, dense and factored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    d = [r["d_model"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ax = axes[0]
    ax.loglog(d, [r["dense_bytes_per_event"] for r in rows], "o-", label="dense")
    ax.loglog(
        d, [r["factored_bytes_per_event"] for r in rows], "s-", label=f"factored (exact, {result['tokens']} tokens)"
    )
    ax.axhline(
        result["machine_memory_gib"] * 2**30 / 2048, color="grey", ls=":", label="2,048-event buffer fills this machine"
    )
    ax.set(xlabel="d_model (d_ff = 4 d_model)", ylabel="bytes per event (MLP block, fp32)", title="storage")
    ax.legend(fontsize=7)
    ax = axes[1]
    fits = [r for r in rows if r["sae_dense_s_per_step"] is not None]
    ax.loglog([r["d_model"] for r in fits], [r["sae_dense_s_per_step"] for r in fits], "o-", label="dense events")
    ax.loglog(d, [r["sae_factored_s_per_step"] for r in rows], "s-", label="factored events")
    for r in rows:
        if r["sae_dense_s_per_step"] is None:
            ax.annotate(
                "dense: out of memory",
                (r["d_model"], r["sae_factored_s_per_step"]),
                fontsize=7,
                xytext=(-120, 25),
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "lw": 0.5},
            )
    s = result["sae"]
    ax.set(
        xlabel="d_model", ylabel="seconds per SAE step", title=f"SAE step ({s['latents']} latents, {s['batch']} events)"
    )
    ax.legend(fontsize=7)
    for a in axes:
        a.set_xticks(d, [str(x) for x in d])
        a.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def table(result: dict) -> str:
    """The README's markdown table."""
    lines = [
        "| d_model | bytes / event dense | factored | ratio | collection speed-up | SAE s / step dense | factored | "
        "speed-up | peak RSS dense | factored | MMCS dense | factored |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        md, ds, ratio = r.get("recovery_dense_mmcs"), r["sae_dense_s_per_step"], r["sae_speed_ratio"]
        oom = "out of memory"
        lines.append(
            f"| {r['d_model']} | {fmt_bytes(r['dense_bytes_per_event'])} | {fmt_bytes(r['factored_bytes_per_event'])} | "
            f"{r['bytes_ratio_exact']:.1f}x | {r['speed_ratio_exact']:.1f}x | {oom if ds is None else f'{ds:.3f}'} | "
            f"{r['sae_factored_s_per_step']:.3f} | {'-' if ratio is None else f'{ratio:.1f}x'} | "
            f"{oom if ds is None else fmt_bytes(r['sae_dense_peak_bytes'])} | "
            f"{fmt_bytes(r['sae_factored_peak_bytes'])} | {'-' if md is None else f'{md:.3f}'} | "
            f"{r['recovery_factored_mmcs']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
