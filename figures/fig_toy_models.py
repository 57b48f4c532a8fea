"""Figure: toy-model reproductions: per-feature MMCS and reconstruction error against the published numbers."""

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
    w = 0.8 / ds.sizes["activation"]
    for j, act in enumerate(ds.activation.values):
        for ax, v in zip(axes, ["mmcs_columnwise", "recon_error"]):
            sel = ds[v].sel(activation=act)
            ax.bar(x + w * j, sel.mean("seed"), w, yerr=sel.std("seed"), capsize=3, label=f"shardlib, {act}")
    if "mmcs_truth_init" in ds:
        start = ds.mmcs_truth_init.sel(activation=ds.activation.values[0]).mean("seed")
        axes[0].plot(x, start, "kx", label=f"{ds.activation.values[0]}, started at the truth")
    if "mmcs_single_feature" in ds:
        one = ds.mmcs_single_feature.sel(activation=ds.activation.values[0]).mean("seed")
        axes[0].plot(
            x, one, "k^", markerfacecolor="none", label=f"{ds.activation.values[0]}, one active feature per sample"
        )
    styles = {"mmcs_apd": ("APD", ":"), "mmcs_spd": ("SPD", "--"), "recon_error_l3d": ("L3D", ":")}
    seen = set()
    for i, case in enumerate(ds.case.values):
        for metric, (value, _src) in PUBLISHED.get(str(case), {}).items():
            if metric not in styles:
                continue
            label, ls = styles[metric]
            ax = axes[1] if metric.startswith("recon") else axes[0]
            ax.hlines(
                value,
                i - w / 2,
                i + w * (ds.sizes["activation"] - 0.5),
                colors="k",
                linestyles=ls,
                label=label if label not in seen else None,
            )
            seen.add(label)
    for ax, t in zip(axes, ["MMCS per feature to the ground-truth circuits", "reconstruction error (batch-pooled)"]):
        ax.set_xticks(x + w * (ds.sizes["activation"] - 1) / 2, [str(c) for c in ds.case.values])
        ax.set_title(t)
        ax.legend(fontsize=6)
    axes[0].set_ylim(0.9, 1.005)
    return fig
