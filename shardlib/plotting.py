"""House style and the plots shared by notebooks and ``figures/`` scripts.

Every plotting function takes results (xarray objects) and an ``Axes``; nothing here
computes a number that is not in a results file. :func:`save` writes PNG and PDF with
fixed metadata so that regenerating from the same results is byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

STYLE = {
    "figure.figsize": (5.0, 3.2),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.4,
    "svg.hashsalt": "shardlib",
}


def style() -> None:
    plt.rcParams.update(STYLE)


def save(fig, path, formats=("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``path.<fmt>`` for each format, byte-identical across runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = path.with_suffix("." + fmt)
        meta = {"CreationDate": None, "Producer": None} if fmt == "pdf" else {"Software": None}
        fig.savefig(p, format=fmt, metadata=meta, bbox_inches="tight")
        out.append(p)
    return out


def smooth(y, window: int):
    import numpy as np

    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) < window:
        return y
    k = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, k, mode="valid")


def reward_by_task(ds, ax=None, window: int = 10, title: str = ""):
    """Mean reward of each task family over training steps (moving average)."""
    ax = ax or plt.gca()
    for t in ds["task"].values:
        ax.plot(ds["step"].values, smooth(ds["task_reward"].sel(task=t).values, window), label=str(t))
    ax.set_xlabel("step")
    ax.set_ylabel(f"reward (mean over {window} steps)")
    ax.set_title(title or "reward by task family")
    ax.legend(ncol=2)
    return ax


def eval_bars(ds, ax=None, title: str = ""):
    """Held-out reward by task family, starting policy vs fine-tuned policy."""
    import numpy as np

    ax = ax or plt.gca()
    tasks = [str(t) for t in ds["task"].values]
    x = np.arange(len(tasks))
    ax.bar(x - 0.2, ds["eval_reward_init"].values, 0.4, label="before")
    ax.bar(x + 0.2, ds["eval_reward_final"].values, 0.4, label="after")
    ax.set_xticks(x, tasks, rotation=30)
    ax.set_ylabel("held-out mean reward")
    ax.set_title(title or "before vs after fine-tuning")
    ax.legend()
    return ax
