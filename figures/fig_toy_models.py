"""Figure: toy-model reproductions: MMCS to ground-truth circuits against the published numbers."""

import matplotlib.pyplot as plt
import numpy as np

from shardlib.io import load_results
from shardlib.toy import PUBLISHED

NAME = "toy_models"
INPUTS = ["toy_models/results.nc"]


def make(run_dir):
    ds = load_results(run_dir / INPUTS[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    x = np.arange(ds.sizes["case"])
    for j, act in enumerate(ds.activation.values):
        for ax, v in zip(axes, ["mmcs_columnwise", "recon_error"]):
            sel = ds[v].sel(activation=act)
            ax.bar(x + 0.25 * j, sel.mean("seed"), 0.25, yerr=sel.std("seed"), capsize=3, label=f"shardlib, {act}")
    for i, case in enumerate(ds.case.values):
        pub = PUBLISHED.get(str(case), {})
        if "mmcs_apd" in pub:
            axes[0].hlines(pub["mmcs_apd"][0], i - 0.15, i + 0.65, colors="k", linestyles=":", label="APD" if i == 0 else None)
        if "recon_error_l3d" in pub:
            axes[1].hlines(pub["recon_error_l3d"][0], i - 0.15, i + 0.65, colors="k", linestyles=":", label="L3D" if i == 0 else None)
    for ax, t in zip(axes, ["MMCS (column-wise) to feature circuits", "reconstruction error (batch-pooled)"]):
        ax.set_xticks(x + 0.125, [str(c) for c in ds.case.values])
        ax.set_title(t)
        ax.legend(fontsize=6)
    axes[0].set_ylim(0.8, 1.01)
    return fig
