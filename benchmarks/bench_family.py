"""Benchmark: the SAE at its defaults on the planted family, side by side with EleutherAI sparsify.

Its sparsify column is not a fair peer comparison (issue 22: sparsify outside its own recipe, one rate
tuned for shardlib, 110k samples, two seeds); ``benchmarks/bench_peer.py`` is.

    pip install -e '.[bench]'        # eai-sparsify, a benchmark-only extra
    python benchmarks/bench_family.py [--members mixed_rank2 attn_heavy] [--seeds 0 1] [--events 4096]

For each member of ``shardlib.planted.FAMILY`` and seed, in one process, on the same store, the
same train/held-out split and the same batches (the shard stage's: 128 events, 30 epochs, its
per-epoch permutation):

- shardlib signed TopK, one latent per planted shard, rank = the planted rank (shard-stage defaults);
- shardlib ReLU TopK, two latents per shard (one per sign), rank = the planted rank;
- shardlib dense ReLU TopK (rank 0), two latents per shard: the dense-input cost reference;
- sparsify's ``SparseCoder`` (dense ReLU TopK, two latents per shard, the same k) trained as its
  trainer does (decoder bias from the first batch's mean, unit-norm decoder, gradient parallel to
  the decoder removed), with Adam at the shard stage's relative rate, 0.03 / sqrt(width) (sparsify's
  default 2e-4 / sqrt(latents / 2**14) moves a 33k-wide row by most of its size per step here), 10% linear warm-up then linear decay (sparsify's 1,000-step warm-up exceeds this run's length),
  AuxK with weight 1/32 (Gao et al.; sparsify's default 0 left most latents dead here) and the
  data scaled to coordinates of RMS 1 (the scale sparsify's rates are tuned for).

Reports MMCS(G->D), R@0.9, Hungarian MCC, held-out FVU, wall time, time per step and parameters,
and the time per step of each rank-r SAE against the dense one's (a rank-r score on a dense input
costs r x a dense encoder row's multiply-adds, so the bound on the ratio is r). Writes
``benchmarks/results/bench_family.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib import metrics  # noqa: E402
from shardlib.common import flatten  # noqa: E402
from shardlib.fit import split_events  # noqa: E402
from shardlib.planted import FAMILY, family_store, fit_planted  # noqa: E402

EPOCHS, BATCH, HOLDOUT = 30, 128, 0.1


def shardlib_fit(member, seed, data, truth, names, tmp, signed, per_shard, rank):
    m = FAMILY[member]
    settings = {
        "out_dir": f"{tmp}/{member}_{signed}_{rank}_{seed}",
        "seed": seed,
        "n_latents": per_shard * m["n_shards"],
        "k": m["active"],
        "rank": rank,
        "signed": signed,
        "device": "cpu",
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "holdout_frac": HOLDOUT,
        "checkpoint_every": EPOCHS,
    }
    row, res = fit_planted(settings, data, flatten(truth, names), names)
    steps = EPOCHS * math.ceil(len(res.train_idx) / BATCH)
    return {
        **_keep(row),
        "seconds": row["seconds"],
        "ms_per_step": 1000 * row["seconds"] / steps,
        "n_parameters": row["n_parameters"],
    }


def sparsify_fit(member, seed, data, truth, names):
    from sparsify import SparseCoder, SparseCoderConfig

    m = FAMILY[member]
    X = torch.cat([data[n].reshape(len(data[n]), -1) for n in names], 1)
    # sparsify's rates are tuned for language-model activations, whose coordinates have RMS of order 1:
    # give it the data at that scale (recovery and FVU do not depend on it)
    X = X * (X.shape[1] / X.pow(2).sum(1).mean()).sqrt()
    train_idx, held_idx = split_events(len(X), HOLDOUT, seed)
    torch.manual_seed(seed)
    F = 2 * m["n_shards"]
    sae = SparseCoder(X.shape[1], SparseCoderConfig(num_latents=F, k=m["active"]), device="cpu")
    # sparsify's default Adam rate 2e-4 / sqrt(latents / 2**14) is 4.5e-3 at 32 latents: a step of most of
    # a unit decoder row's per-coordinate size at these widths (MMCS 0.64 on attn_heavy). Give it the
    # shard stage's relative rate instead, in its units: 0.03 / sqrt(width)
    lr = 0.03 / X.shape[1] ** 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    steps = EPOCHS * math.ceil(len(train_idx) / BATCH)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else max(0.0, (steps - t) / max(1, steps - warm))
    )
    t0 = time.perf_counter()
    first, samples = True, 0
    last_fired = torch.zeros(F, dtype=torch.long)
    for epoch in range(EPOCHS):  # the shard stage's batches
        perm = train_idx[np.random.default_rng([seed, epoch]).permutation(len(train_idx))]
        for s in range(0, len(perm), BATCH):
            x = X[perm[s : s + BATCH]]
            if first:  # sparsify's trainer: b_dec from the first batch's mean
                sae.b_dec.data = x.mean(0)
                first = False
            dead = (samples - last_fired) > 5000  # as the shard stage's dead_window
            out = sae(x, dead_mask=dead)
            samples += len(x)
            last_fired[out.latent_indices[out.latent_acts > 0].unique()] = samples
            opt.zero_grad()
            (out.fvu + out.auxk_loss / 32).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sched.step()
            sae.set_decoder_norm_to_unit_norm()
    dt = time.perf_counter() - t0
    D = sae.W_dec.detach().numpy()
    row = metrics.recovery(flatten(truth, names), D / np.linalg.norm(D, axis=1, keepdims=True))
    with torch.no_grad():
        xh = held = X[held_idx]
        xh = sae(held).sae_out
        fvu = float(((held - xh) ** 2).sum() / ((held - held.mean(0)) ** 2).sum())
    n_par = sum(p.numel() for p in sae.parameters())
    return {**_keep(row), "fvu": fvu, "seconds": dt, "ms_per_step": 1000 * dt / steps, "n_parameters": n_par}


def _keep(row):
    return {k: float(row[k]) for k in ("mmcs_g2d", "r@0.9", "hungarian_mcc", "fvu") if k in row}


def markdown(result: dict) -> str:
    """The README's table: per member and SAE, mean ± std over seeds."""
    rows = [
        "| member | SAE | MMCS(G→D) | R@0.9 | held-out FVU | ms / step | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, v in result["summary"].items():
        if not isinstance(v, dict):
            continue
        member, sae = key.split(" | ")
        rows.append(
            f"| {member} | {sae} | {v['mmcs_g2d'][0]:.3f} ± {v['mmcs_g2d'][1]:.3f} | {v['r@0.9'][0]:.2f} ± "
            f"{v['r@0.9'][1]:.2f} | {v['fvu'][0]:.3f} | {v['ms_per_step'][0]:.0f} | {v['n_parameters'][0]:,.0f} |"
        )
    ratios = [f"{k.split(' | ')[0]} {v:.2f}" for k, v in result["summary"].items() if not isinstance(v, dict)]
    return (
        "\n".join(rows)
        + "\n\nTime per step, low-rank ReLU SAE over the dense one (bound on dense inputs: the rank): "
        + ", ".join(ratios)
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", nargs="*", default=list(FAMILY))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--events", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_family.json"))
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out's results; no training")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    import tempfile

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for member in args.members:
            r = FAMILY[member]["rank"]
            for seed in args.seeds:
                shapes, (data, truth, _, _) = family_store(member, args.events, seed)
                names = list(shapes)
                kinds = [
                    (f"shardlib signed rank {r}", True, 1, r),
                    (f"shardlib relu rank {r}", False, 2, r),
                    ("shardlib relu dense", False, 2, 0),
                    ("sparsify relu dense", None, 2, 0),
                ]
                for name, signed, per_shard, rank in kinds:
                    if signed is None:
                        fit = sparsify_fit(member, seed, data, truth, names)
                    else:
                        fit = shardlib_fit(member, seed, data, truth, names, tmp, signed, per_shard, rank)
                    row = {"member": member, "seed": seed, "sae": name, **fit}
                    rows.append(row)
                    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                    print(json.dumps(shown), flush=True)
    summary = {}
    for member in args.members:
        sub = [x for x in rows if x["member"] == member]
        for name in dict.fromkeys(x["sae"] for x in sub):
            rs = [x for x in sub if x["sae"] == name]
            summary[f"{member} | {name}"] = {
                k: [float(np.mean([x[k] for x in rs])), float(np.std([x[k] for x in rs]))]
                for k in ("mmcs_g2d", "r@0.9", "fvu", "seconds", "ms_per_step", "n_parameters")
            }
        dense = [x["ms_per_step"] for x in sub if x["sae"] == "shardlib relu dense"]
        low = [x["ms_per_step"] for x in sub if x["sae"].startswith("shardlib relu rank")]
        summary[f"{member} | time per step, rank {FAMILY[member]['rank']} / dense (bound: the rank)"] = float(
            np.mean(low) / np.mean(dense)
        )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "events": args.events,
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "seeds": args.seeds,
        "rows": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
