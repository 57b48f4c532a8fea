"""Figure: online (ring buffer, during RL) versus offline (stored events) shards."""

import matplotlib.pyplot as plt
import numpy as np

from shardlib.io import load_results

NAME = "online_offline"
INPUTS = ["analysis_bandit/results.nc", "analysis_lm/results.nc"]


def make(run_dir):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    keys = [
        ("online_offline_match", "online↔offline\n(Hungarian |cos|)"),
        ("type_match", "offline↔type means"),
        ("online_type_match", "online↔type means"),
        ("type_match_random", "random↔type means"),
    ]
    for i, f in enumerate(INPUTS):
        ds = load_results(run_dir / f)
        vals = [float(np.ravel(ds[k].values)[0]) if k in ds else np.nan for k, _ in keys]
        ax.bar(np.arange(len(keys)) + 0.4 * i, vals, 0.4, label=f.split("_")[1].split("/")[0])
    ax.set_xticks(np.arange(len(keys)) + 0.2, [lbl for _, lbl in keys], fontsize=7)
    ax.set(ylabel="mean |cos|", title="online vs offline shards", ylim=(0, 1.05))
    ax.legend()
    return fig
