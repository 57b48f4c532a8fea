"""Figure: fraction of parameters unchanged under each lens, RL vs SFT, and against the learning rate."""

import matplotlib.pyplot as plt

from shardlib.io import load_results

NAME = "sparsity"
INPUTS = ["sparsity/results.nc"]


def make(run_dir):
    ds = load_results(run_dir / INPUTS[0])
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, scope in zip(axes[:3], ["cumulative", "step", "event"]):
        for run in ds.run.values:
            ax.plot(range(ds.sizes["tau"]), ds.unchanged.sel(run=run, scope=scope), marker="o", label=str(run))
        ax.set_xticks(range(ds.sizes["tau"]), [f"{t:g}" for t in ds.tau.values], rotation=45)
        ax.set(xlabel="τ", title=f"{scope} update", ylim=(-0.02, 1.02))
    axes[0].set_ylabel("fraction with |Δ| ≤ τ")
    axes[0].legend()
    ax = axes[3]
    if "lr" in ds.dims:
        ax.plot(ds.lr, ds.lr_bf16_unchanged, marker="o", label="bf16 unchanged")
        ax.plot(ds.lr, ds.lr_mukherjee_unchanged, marker="s", label="bf16, |Δ| ≤ 1e-5")
        ax.plot(ds.lr, ds.lr_unchanged.sel(tau=0.0), marker="^", label="fp32 exact zeros")
        ax.set(xscale="log", xlabel="learning rate", title="cumulative, GRPO on LM", ylim=(-0.02, 1.02))
        ax.legend()
    fig.suptitle("How sparse are the updates? Fraction of parameters unchanged, by lens")
    return fig
