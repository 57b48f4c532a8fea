"""Figure: held-out FVU against L0 for event and step updates, by SAE rank."""

import matplotlib.pyplot as plt

from shardlib import plotting
from shardlib.io import load_results

NAME = "frontier"
INPUTS = ["frontier/results.nc"]


def make(run_dir):
    ds = load_results(run_dir / INPUTS[0])
    fig, axes = plt.subplots(1, ds.sizes["store"], figsize=(4.5 * ds.sizes["store"], 3.2), squeeze=False)
    for ax, store in zip(axes[0], ds.store.values):
        plotting.frontier(ds.sel(store=store), ax, title=f"LM {store} updates")
    fig.suptitle("Reconstruction frontier (dashed: FVU 0.1 and 0.01)")
    return fig
