"""Benchmark: the factored SAE loss from inner products (``shardlib.sae.sae_loss``) against decoding every
event's active factors (what it did before), on SmolLM2-shaped factored events.

    python benchmarks/bench_sae_loss.py [--matrices 8] [--rank 4] [--ks 4 64] [--batch 16] [--steps 3]

Each event holds ``--matrices`` MLP matrices of SmolLM2-135M (576 x 1536 and 1536 x 576 in turn) as 4
factors (the SmolLM2 store's ``collect_max_rank``), plus the SAE's rank-``--rank`` b_pre. One signed TopK SAE
of 256 latents at each k, every latent counted dead (AuxK over 128 of them: the worst case, and what a run's
first steps see). Two ways to compute the same loss (rec + AuxK/32) and its backward:

- ``gram``: :func:`shardlib.sae.sae_loss` (squared errors from ``<y, M_i>`` and ``<M_i, M_j>``, the latter once
  per batch over the latents active in it);
- ``decoded``: the reconstruction of every event as its ``k r`` active factors (``ShardSAE.forward``), the
  squared error from the Gram matrices of the residual's factors, and AuxK the same way
  (:func:`shardlib.sae.aux_loss` given no Gram terms): the loss before this benchmark's change.

Each (way, k) runs in a fresh process: median seconds of ``--steps`` forward+backward passes after one
warm-up, and the process's peak resident memory (``VmHWM``: the Python and torch baseline and the SAE's
parameters included). The two losses are first checked equal on one batch. Writes
``benchmarks/results/bench_sae_loss.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib.factored import Factored  # noqa: E402
from shardlib.sae import ShardSAE, aux_loss, difference, sae_loss, sq_norms  # noqa: E402

AUX_COEF, N_LATENTS, AUX_K = 1 / 32, 256, 128


def batch(matrices: int, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j in range(matrices):
        d_out, d_in = (576, 1536) if j % 2 == 0 else (1536, 576)
        out[f"m{j}"] = Factored(torch.randn(n, 4, d_out, generator=g), torch.randn(n, 4, d_in, generator=g) / 100)
    return out


def decoded_loss(sae: ShardSAE, x: dict, dead: torch.Tensor) -> torch.Tensor:
    out = sae(x)
    xs = sae.scaled_input(x)
    rec = sum(sq_norms(difference(xs[n], out.xhat[n])).sum() for n in sae.names) / len(out.codes)
    return rec + AUX_COEF * aux_loss(sae, out.pre_acts, out.centered, xs, out.xhat, dead, AUX_K)


def gram_loss(sae: ShardSAE, x: dict, dead: torch.Tensor) -> torch.Tensor:
    return sae_loss(sae, x, 1.0, dead, AUX_K, AUX_COEF).loss


WAYS = {"gram": gram_loss, "decoded": decoded_loss}


def build(x: dict, k: int, rank: int) -> ShardSAE:
    shapes = {n: v.shape for n, v in x.items()}
    return ShardSAE(shapes, N_LATENTS, k, rank=rank, signed=True, seed=0, b_pre_rank=rank)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def child(way: str, k: int, a) -> dict:
    torch.manual_seed(0)
    x = batch(a.matrices, a.batch)
    sae = build(x, k, a.rank)
    dead = torch.ones(N_LATENTS, dtype=torch.bool)
    secs = []
    for i in range(a.steps + 1):
        t = time.perf_counter()
        loss = WAYS[way](sae, x, dead)
        loss.backward()
        sae.zero_grad(set_to_none=True)
        if i:
            secs.append(time.perf_counter() - t)
    return {"way": way, "k": k, "seconds": statistics.median(secs), "peak_rss": peak_rss()}


def check_equal(a) -> float:
    """Largest relative difference of the two losses and of their gradients on one small batch."""
    x = batch(2, 4, seed=1)
    worst = 0.0
    for k in a.ks:
        res = []
        for way in WAYS:
            sae = build(x, min(k, N_LATENTS), a.rank)
            loss = WAYS[way](sae, x, torch.ones(N_LATENTS, dtype=torch.bool))
            loss.backward()
            res.append([loss.detach(), *(p.grad.clone() for p in sae.parameters() if p.grad is not None)])
        for u, v in zip(*res):
            worst = max(worst, float((u - v).abs().max() / v.abs().max().clamp(min=1e-30)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 64])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("WAY", "K"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_sae_loss.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a)))
        return
    rel = check_equal(a)
    if rel > 1e-3:  # float32 sums over 885k-entry matrices, in another order
        raise SystemExit(f"the two losses differ by {rel:.2e} (relative): not the same computation")
    rows = []
    for k in a.ks:
        for way in WAYS:
            cmd = [sys.executable, __file__, "--child", way, str(k), *sys.argv[1:]]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                rows.append({"way": way, "k": k, "seconds": None, "peak_rss": None, "error": r.stderr[-300:]})
            else:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    out = {"args": {k: v for k, v in vars(a).items() if k not in ("child", "out")}, "max_rel_diff": rel, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(table(out))


def table(out: dict) -> str:
    gib = 2**30
    by = {(r["way"], r["k"]): r for r in out["rows"]}
    lines = [
        "| k | s / step, decoded | gram | speed-up | peak RSS, decoded | gram | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in out["args"]["ks"]:
        d, g = by[("decoded", k)], by[("gram", k)]
        if d["seconds"] is None or g["seconds"] is None:
            lines.append(f"| {k} | {d['seconds'] or 'failed'} | {g['seconds'] or 'failed'} | - | - | - | - |")
            continue
        lines.append(
            f"| {k} | {d['seconds']:.2f} | {g['seconds']:.2f} | {d['seconds'] / g['seconds']:.1f}x | "
            f"{d['peak_rss'] / gib:.2f} GiB | {g['peak_rss'] / gib:.2f} GiB | {d['peak_rss'] / g['peak_rss']:.1f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
