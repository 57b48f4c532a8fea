"""Benchmark: the analysis's fitted baselines (k-means and PCA, ``shardlib.alignment.fitted_dictionaries``) fitted
in the events' span against fitted in their full dimension, on SmolLM2-shaped events.

    python benchmarks/bench_alignment.py [--events 88] [--dim 884736] [--latents 64] [--types 6] [--repeats 2]

The events are ``--events`` vectors of ``--dim`` numbers (the SmolLM2 analysis: 88 nonzero events of one
576 x 1536 matrix, 64 latents, 6 event types): each type's mean plus noise of the same size, float64 as the
analysis holds them. Two ways, each timed on the same events in one process, median of ``--repeats``:

- ``span``: :func:`shardlib.alignment.fitted_dictionaries` as it runs (k-means and PCA fitted to the events'
  coordinates in their span, :func:`shardlib.alignment.span_coordinates`, mapped back);
- ``full``: the same function with the span left out (the fits on the events themselves: what it did before).

Both give each baseline's unit directions; the benchmark reports the smallest over the span's k-means
directions of its best |cos| with the full fit's (1: the same centroids up to order and sign), the same for
PCA's leading ``--types`` - 1 components (the centred type means' span; past it the spectrum is noise of
equal variance, whose directions no PCA determines), and the share of the events' variance each way's
components capture (exact PCA captures the most). Writes ``benchmarks/results/bench_alignment.json`` and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib import alignment  # noqa: E402


def events(n: int, dim: int, n_types: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    types = np.arange(n) % n_types
    means = rng.normal(size=(n_types, dim))
    return means[types] + rng.normal(size=(n, dim)), types


def fit(X, types, n, way: str) -> tuple[float, dict]:
    t = time.perf_counter()
    if way == "full":
        with mock.patch.object(alignment, "span_coordinates", lambda X, n: (None, X)):
            out = alignment.fitted_dictionaries(X, types, n, seed=0)
    else:
        out = alignment.fitted_dictionaries(X, types, n, seed=0)
    return time.perf_counter() - t, out


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest over the rows of ``a`` of the best |cos| with a row of ``b`` (unit rows)."""
    return float(np.abs(a @ b.T).max(1).min())


def captured(X: np.ndarray, C: np.ndarray) -> float:
    """Share of the centred events' variance in the span of the unit rows ``C`` (orthonormal PCA components)."""
    Xc = X - X.mean(0)
    return float(((Xc @ C.T) ** 2).sum() / (Xc**2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=88)
    ap.add_argument("--dim", type=int, default=576 * 1536)
    ap.add_argument("--latents", type=int, default=64)
    ap.add_argument("--types", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_alignment.json"))
    a = ap.parse_args()
    X, types = events(a.events, a.dim, a.types)
    secs, dirs = {"span": [], "full": []}, {}
    for _ in range(a.repeats):
        for way in ("span", "full"):
            s, out = fit(X, types, a.latents, way)
            secs[way].append(s)
            dirs[way] = out
            print(way, f"{s:.1f} s", file=sys.stderr, flush=True)
    result = {
        "args": {k: v for k, v in vars(a).items() if k != "out"},
        "seconds": {w: statistics.median(v) for w, v in secs.items()},
        "all_seconds": secs,
        "agreement": {
            "kmeans": agreement(dirs["span"]["kmeans"][1], dirs["full"]["kmeans"][1]),
            # the leading components only (the centred type means span types - 1 directions): past them the
            # spectrum is noise of equal variance, whose directions no PCA determines (the full fit's randomized
            # SVD rotates them at will)
            "pca_leading": agreement(dirs["span"]["pca"][1][: a.types - 1], dirs["full"]["pca"][1][: a.types - 1]),
        },
        "pca_variance_captured": {w: captured(X, dirs[w]["pca"][1]) for w in ("span", "full")},
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(result))


def table(r: dict) -> str:
    s = r["seconds"]
    return "\n".join(
        [
            "| events x dimension | latents | full dimension | span | speed-up | k-means directions agree | "
            "leading PCA directions agree | PCA variance captured, full / span |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['args']['events']} x {r['args']['dim']:,} | {r['args']['latents']} | {s['full']:.1f} s | "
            f"{s['span']:.1f} s | {s['full'] / s['span']:.1f}x | {r['agreement']['kmeans']:.6f} | "
            f"{r['agreement']['pca_leading']:.6f} | {r['pca_variance_captured']['full']:.4f} / "
            f"{r['pca_variance_captured']['span']:.4f} |",
        ]
    )


if __name__ == "__main__":
    main()
