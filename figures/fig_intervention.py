"""Figure: reward change per task when a shard is added to the starting policy, above the evaluation's noise
floor; the share of shards and of random directions (from the updates' span, same sizes) that move reward at all."""

import matplotlib.pyplot as plt

from shardlib import plotting
from shardlib.findings import nanmean
from shardlib.io import load_results

NAME = "intervention"
INPUTS = ["analysis_bandit/results.nc", "analysis_lm/results.nc"]


def make(run_dir):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    shares = []
    for ax, f, title in zip(axes[:2], INPUTS, ["bandit", "LM"]):
        ds = load_results(run_dir / f)
        if "moves" in ds and nanmean(ds.moves) == 0:  # every cell within noise: a blank heatmap says nothing
            ax.axis("off")
            largest = float(abs(ds.add_effect).max())
            ax.text(
                0,
                0.5,
                f"{title}: no shard moves reward above the noise floor\n(largest |Δ reward| {largest:.3f}; "
                f"floor {float(ds.noise_floor.min()):.3f}–{float(ds.noise_floor.max()):.3f} by task)",
                fontsize=10,
            )
        else:
            plotting.add_effect(ds, ax, title=f"{title}: ")
        if "moves" in ds:
            shares.append((title, nanmean(ds.moves), nanmean(ds.random_moves)))
    ax = axes[2]
    for i, (_title, s, r) in enumerate(shares):
        ax.bar([2 * i], [s], color="C0", label="shards" if i == 0 else None)
        ax.bar([2 * i + 0.8], [r], color="C7", label="random span directions" if i == 0 else None)
        for x, v in ((2 * i, s), (2 * i + 0.8, r)):
            ax.text(x, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks([2 * i + 0.4 for i in range(len(shares))], [t for t, _, _ in shares])
    ax.set(ylabel="share moving reward", title="moves reward above the noise floor", ylim=(0, 1.05))
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
