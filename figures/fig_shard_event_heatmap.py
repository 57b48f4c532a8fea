"""Figure: mean |activation| of each shard by event type (bandit and LM)."""

import matplotlib.pyplot as plt

from shardlib import plotting
from shardlib.io import load_results

NAME = "shard_event_heatmap"
INPUTS = ["analysis_bandit/results.nc", "analysis_lm/results.nc"]


def make(run_dir):
    data = [load_results(run_dir / f) for f in INPUTS]
    rows = [int((ds.type_count.values >= plotting.MIN_TYPE_EVENTS).sum()) for ds in data]
    fig, axes = plt.subplots(2, 1, figsize=(9, 2 + 0.22 * sum(rows)), height_ratios=[max(r, 2) for r in rows])
    for ax, ds, title in zip(axes, data, ["bandit", "LM"]):
        plotting.event_heatmap(ds, ax, title=f"{title}: ")
    fig.suptitle("Which reinforcement events each shard fires on (bandit: cluster × arm; LM: task × answer token)")
    fig.tight_layout()
    return fig
