"""Figure: reward change per task when a shard is added to the starting policy; specificity vs random directions."""

import matplotlib.pyplot as plt

from shardlib import plotting
from shardlib.findings import nanmean_std
from shardlib.io import load_results

NAME = "intervention"
INPUTS = ["analysis_bandit/results.nc", "analysis_lm/results.nc"]


def make(run_dir):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    spec = []
    for ax, f, title in zip(axes[:2], INPUTS, ["bandit", "LM"]):
        ds = load_results(run_dir / f)
        plotting.add_effect(ds, ax, title=f"{title}: ")
        spec.append((title, ds.specificity.values, ds.random_specificity.values))
    ax = axes[2]
    for i, (_title, s, r) in enumerate(spec):
        (ms, ss), (mr, sr) = nanmean_std(s), nanmean_std(r)  # no bar where all are NaN (a tiny run)
        ax.bar([2 * i], [ms], yerr=[ss], capsize=3, color="C0", label="shards" if i == 0 else None)
        ax.bar([2 * i + 0.8], [mr], yerr=[sr], capsize=3, color="C7", label="random" if i == 0 else None)
    ax.set_xticks([0.4, 2.4], [t for t, _, _ in spec])
    ax.set(ylabel="specificity max|E|/Σ|E|", title="effect specificity", ylim=(0, 1.05))
    ax.legend()
    return fig
