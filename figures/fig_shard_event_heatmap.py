"""Figure: mean |activation| of each shard by event type (bandit and LM)."""

import matplotlib.pyplot as plt

from shardlib import plotting
from shardlib.io import load_results

NAME = "shard_event_heatmap"
INPUTS = ["analysis_bandit/results.nc", "analysis_lm/results.nc"]


def make(run_dir):
    fig, axes = plt.subplots(2, 1, figsize=(9, 6))
    for ax, f, title in zip(axes, INPUTS, ["bandit", "LM"]):
        ds = load_results(run_dir / f)
        plotting.event_heatmap(ds, ax, title=f"{title}: ")
    fig.suptitle("Which reinforcement events each shard fires on (bandit: cluster × arm; LM: task × correctness)")
    fig.tight_layout()
    return fig
