"""Figure: planted-shard positive control: recovery by SAE rank (dense = rank 0)."""

import matplotlib.pyplot as plt
import numpy as np

from shardlib.io import load_results

NAME = "planted"
INPUTS = ["planted/results.nc"]


def make(run_dir):
    ds = load_results(run_dir / INPUTS[0])
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    labels = ["dense" if r == 0 else f"rank {r}" for r in ds["rank"].values]
    x = np.arange(len(labels))
    for ax, v, t in zip(axes, ["mmcs_g2d", "r_at_0.9", "fvu"], ["MMCS(G→D)", "R@0.9", "held-out FVU"]):
        ax.bar(x, ds[v].mean("seed"), yerr=ds[v].std("seed"), capsize=3)
        ax.set_xticks(x, labels)
        ax.set_title(t)
    fig.suptitle("Planted shards: recovery of known ground-truth directions")
    return fig
