"""House style and the plots shared by notebooks and ``figures/`` scripts.

Every plotting function takes results (xarray objects) and an ``Axes``; nothing here
computes a number that is not in a results file. :func:`save` writes PNG and PDF with
fixed metadata so that regenerating from the same results is byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

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
    """Trailing moving average over ``window`` steps that skips NaN steps (e.g. a task that drew no
    prompt that step) instead of blanking the window; NaN only where the whole window is NaN."""
    import numpy as np

    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) < window:
        return y
    ok = ~np.isnan(y)
    k = np.ones(window)
    first = y[ok][0] if ok.any() else np.nan
    pad_v = np.concatenate([np.full(window - 1, first), np.where(ok, y, 0.0)])
    pad_n = np.concatenate([np.full(window - 1, 1.0 if ok.any() else 0.0), ok.astype(float)])
    s, n = np.convolve(pad_v, k, mode="valid"), np.convolve(pad_n, k, mode="valid")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def readable_log_axis(ax, which: str = "y") -> None:
    """Make a log axis's tick labels readable: a linear axis when its range is under a decade (a log axis would
    label at most one tick), else labels at 1, 2 and 5 × each power of ten when fewer than two powers of ten fall
    inside it. Call it after drawing."""
    from matplotlib import ticker

    axis = ax.yaxis if which == "y" else ax.xaxis
    if axis.get_scale() != "log":
        return
    lo, hi = sorted(ax.get_ylim() if which == "y" else ax.get_xlim())
    if lo <= 0 or hi / lo < 10:
        (ax.set_yscale if which == "y" else ax.set_xscale)("linear")
        return
    if np.floor(np.log10(hi)) - np.ceil(np.log10(lo)) + 1 < 2:
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())


def no_effect(ax, text: str) -> None:
    """In place of a plot with nothing to show (every cell blank): the axis off and ``text`` on it."""
    ax.axis("off")
    ax.text(0, 0.5, text, fontsize=9, transform=ax.transAxes, va="center")


def shard_training_curves(m, ax=None, dead_window: int | None = None):
    """The shard SAE's normalised reconstruction and AuxK losses per epoch (``curve_rec``, ``curve_aux``). AuxK is
    0 in an epoch where no latent went unfired for ``dead_window`` samples, or where each latent that did was
    restarted in that step (``curve_resampled``); not: no latent ends dead. Its zeros are left out of the log axis."""
    ax = ax or plt.gca()
    # each epoch's value is the mean of its batches' FVUs (against the training events' variance): with few,
    # heavy-tailed events (SmolLM2's) it moves with which events share a batch, as well as with training
    ax.plot(m.epoch, m.curve_rec, label="reconstruction (mean of the epoch's batch FVUs)")
    aux = np.asarray(m.curve_aux.values, dtype=float)
    window = f"{dead_window} samples" if dead_window else "dead_window samples"
    if (aux > 0).any():
        ax.plot(
            m.epoch,
            np.where(aux > 0, aux, np.nan),
            marker=".",
            label=f"AuxK (not drawn where 0: no latent unfired for {window})",
        )
    else:  # a latent is restarted in the step it dies (resample_dead), so AuxK only acts where none is restarted
        restarts = np.asarray(m.curve_resampled.values, dtype=float) if "curve_resampled" in m else np.zeros(0)
        why = (
            f"dead latents restarted as they died, in {int((restarts > 0).sum())} of {len(restarts)} epochs"
            if (restarts > 0).any()
            else f"no latent unfired for {window}"
        )
        ax.plot([], [], " ", label=f"AuxK: 0 ({why})")
    ax.set(xlabel="epoch", ylabel="normalized loss", yscale="log", title="training")
    readable_log_axis(ax)
    ax.legend()
    return ax


def sft_loss(ds, ax=None, window: int = 10, title: str = ""):
    """The SFT control's training loss (NLL of the target answers) over steps, moving average: its training signal
    (the reward of its targets, correct answers, is constant)."""
    ax = ax or plt.gca()
    ax.plot(ds["step"].values, smooth(ds["loss"].values, window))
    ax.set(xlabel="step", ylabel=f"NLL of the targets (mean over {window} steps)", title=title or "SFT loss")
    return ax


def update_norms(norms, ax=None, by_sign: bool = True):
    """Mean event-update norm per task family (and sign of the advantage when ``by_sign``; SFT has no advantage)
    as bars; returns (mean norms, event counts) as tables."""
    ax = ax or plt.gca()
    by = ["task_name", "advantage_sign"] if by_sign else ["task_name"]
    table = norms.groupby(by)["norm"].mean()
    counts = norms.groupby(by).size()
    if by_sign:
        table, counts = table.unstack(), counts.unstack().rename_axis(columns="events")
    else:
        table, counts = table.to_frame("mean norm"), counts.to_frame("events")
    table.plot.bar(ax=ax, rot=30, legend=by_sign)
    ax.set(ylabel="mean ‖event update‖", title="event update norms by " + ("type" if by_sign else "task (SFT)"))
    return table, counts


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


def heatmap(da, ax=None, xlabel: str = "", title: str = "", center: bool = False):
    """A labelled heatmap of a 2-D DataArray (rows = first dim); ``center`` uses a diverging map around 0."""
    import numpy as np

    ax = ax or plt.gca()
    v = np.asarray(da.values, dtype=float)
    kw = {"cmap": "viridis"}
    if center:
        m = np.nanmax(np.abs(v)) if np.isfinite(v).any() else 1.0
        kw = {"cmap": "RdBu_r", "vmin": -m, "vmax": m}
    im = ax.imshow(v, aspect="auto", interpolation="nearest", **kw)
    rows, cols = da.dims
    ax.set_yticks(range(v.shape[0]), [str(x) for x in da[rows].values])
    names = [str(x) for x in da[cols].values]
    step = 1 if v.shape[1] <= 40 else int(np.ceil(v.shape[1] / 40))  # many columns: every step-th one labelled
    at = range(0, v.shape[1], step)
    ax.set_xticks(at, [names[i] for i in at], rotation=90, fontsize=None if v.shape[1] <= 20 else 6)
    ax.set_xlabel(xlabel or cols)
    ax.set_title(title)
    ax.grid(False)  # grid lines would cross the cells
    ax.figure.colorbar(im, ax=ax)
    return ax


MARKERS = ("o", "^", "D", "v", "P", "X")  # distinct markers for lines that may coincide ("s": the PCA baseline)
LINESTYLES = ("-", "--", "-.", ":")


def _distinct(i: int) -> dict:
    """Line style of the i-th of several lines that may coincide: its own colour, marker and dash, drawn smaller,
    thinner and slightly transparent the later it comes, so that a line on top leaves the one below visible."""
    return {
        "color": f"C{i}",
        "marker": MARKERS[i % len(MARKERS)],
        "ls": LINESTYLES[i % len(LINESTYLES)],
        "ms": max(3.5, 8 - 1.5 * i),
        "lw": max(0.8, 2.2 - 0.5 * i),
        "alpha": 0.8,
    }


def frontier(ds, ax=None, title: str = ""):
    """Held-out FVU against L0 for each SAE rank (0 = dense), the held-out FVU of k principal components of the
    same training updates against k where the sweep has it (``pca_fvu``), with FVU = 0.1 and 0.01 marked."""
    ax = ax or plt.gca()
    for i, r in enumerate(ds["rank"].values):
        sel = ds.sel(rank=r)
        if not np.isfinite(np.asarray(sel["fvu"].values, dtype=float)).any():
            continue  # a rank this store was not fitted at (a combined sweep's NaN): no line, no legend entry
        # a rank's colour and marker are its place among the sweep's ranks, the same in every panel; later ranks
        # draw smaller and thinner on top, so that a line on top of another leaves it visible; solid, as dashes and
        # dots mark the FVU lines and the PCA baseline
        ax.plot(sel["l0"], sel["fvu"], **{**_distinct(i), "ls": "-"}, label="dense" if r == 0 else f"rank {r}")
    if "pca_fvu" in ds and np.isfinite(np.asarray(ds["pca_fvu"].values, dtype=float)).any():
        # the baseline fitted to the same events: k principal components, a dense code of k numbers per update
        ax.plot(ds["k"], ds["pca_fvu"], marker="s", ls=":", color="k", label="PCA, k components")
    for t in (0.1, 0.01):
        ax.axhline(t, ls="--", c="grey", lw=0.8)
    xlabel = "L0 (active latents per update)" + ("; PCA: k components" if "pca_fvu" in ds else "")
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="held-out FVU", title=title)
    ax.set_ylim(top=max(ax.get_ylim()[1], 1.3))  # FVU 1 (no better than the mean update) always in view
    readable_log_axis(ax)
    l0 = np.asarray(ds["l0"].values, dtype=float).ravel()
    if "pca_fvu" in ds:
        l0 = np.concatenate([l0, np.asarray(ds["k"].values, dtype=float)])
    l0 = l0[np.isfinite(l0) & (l0 > 0)]
    if len(l0):  # the axis spans the measured points (a dead SAE's L0 near 0 would stretch it to 1e-2)
        ax.set_xlim(l0.min() / 1.5, l0.max() * 1.5)
        ticks = sorted(set(np.round(l0, 1)))
        if len(ticks) <= 8:
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
    if ax.get_legend_handles_labels()[0]:  # a store with no finite point draws no line to label
        ax.legend()
    return ax


def intervention_curves(da, title: str = ""):
    """One panel per shard: mean |output change| of every output against delta (da: [shard, delta, output])."""
    import matplotlib.pyplot as plt

    n = da.sizes["shard"]
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.6), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        for c in range(da.sizes["output"]):
            ax.plot(da.delta, da.isel(shard=i, output=c), label=f"output {c}")
        ax.set(title=f"shard {i}", xlabel="δ")
    axes[0][0].set_ylabel("mean |Δ output|")
    axes[0][-1].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9, y=1.04)
    return fig


def planted_recovery(ds):
    """Planted control: MMCS(G→D), R@0.9 and held-out FVU by SAE rank (dense = rank 0), mean ± std over seeds."""
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(10, 3), layout="constrained")
    labels = ["dense" if r == 0 else f"rank {r}" for r in ds["rank"].values]
    x = np.arange(len(labels))
    for ax, v, t in zip(axes, ["mmcs_g2d", "r_at_0.9", "fvu"], ["MMCS(G→D)", "R@0.9", "held-out FVU"]):
        ax.bar(x, ds[v].mean("seed"), yerr=ds[v].std("seed"), capsize=3)
        ax.set_xticks(x, labels)
        ax.set_title(t)
    fig.suptitle("Planted shards: recovery of known ground-truth directions")
    return fig


def sparsity_lenses(ds):
    """Fraction of parameters unchanged under |Δ| ≤ τ for cumulative, step and event updates (those the study
    holds), and against lr (when it holds a learning-rate sweep)."""
    scopes = [s for s in ("cumulative", "step", "event") if s in ds.scope.values]
    sweep = "lr" in ds.dims
    n = len(scopes) + sweep
    fig, axes = plt.subplots(1, n, figsize=(3.5 * n, 3.2), squeeze=False, layout="constrained")
    axes = axes[0]
    for ax, scope in zip(axes, scopes):
        for i, run in enumerate(ds.run.values):  # distinct markers and styles: coinciding runs both stay visible
            ax.plot(
                range(ds.sizes["tau"]),
                ds.unchanged.sel(run=run, scope=scope),
                **_distinct(i),
                label=str(run),
            )
        ax.set_xticks(range(ds.sizes["tau"]), [f"{t:g}" for t in ds.tau.values], rotation=45)
        ax.set(xlabel="τ", title=f"{scope} update", ylim=(-0.02, 1.02))
    axes[0].set_ylabel("fraction with |Δ| ≤ τ")
    axes[0].legend()
    if sweep:
        ax = axes[-1]
        ax.plot(ds.lr, ds.lr_bf16_unchanged, **_distinct(0), label="bf16 unchanged")
        ax.plot(ds.lr, ds.lr_mukherjee_unchanged, **_distinct(1), label="bf16, |Δ| ≤ 1e-5")
        ax.plot(ds.lr, ds.lr_unchanged.sel(tau=0.0), **_distinct(2), label="fp32 exact zeros")
        ax.set(xscale="log", xlabel="learning rate", title="cumulative, GRPO on LM", ylim=(-0.02, 1.02))
        ax.legend()
    fig.suptitle("How sparse are the updates? Fraction of parameters unchanged, by lens")
    return fig


def frontier_panels(ds, store_label: str = "{store} updates"):
    """One :func:`frontier` panel per store (events, steps)."""
    n = ds.sizes["store"]
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False, layout="constrained")
    for ax, store in zip(axes[0], ds.store.values):
        frontier(ds.sel(store=store), ax, title=store_label.format(store=store))
    fig.suptitle("Reconstruction frontier (dashed: FVU 0.1 and 0.01; dotted: PCA with k components)")
    return fig


MIN_TYPE_EVENTS = 20  # event types with fewer events are left out of the heatmap (their means are noise)


def shards_by_type(codes, types, title: str = "mean |activation| by event type"):
    """Mean |activation| of each shard (columns of ``codes``, a frame [event, shard]) per event type (``types``,
    one per event): one row per type with at least ``MIN_TYPE_EVENTS`` events (every type when none has), labelled
    with its count, each
    cell its own colour (no interpolation); the figure grows with the number of rows so that labels stay apart."""
    import pandas as pd

    types = pd.Series(np.asarray(types), index=codes.index)
    counts = types.value_counts()
    keep = sorted(t for t, n in counts.items() if n >= MIN_TYPE_EVENTS) or sorted(counts.index)  # as event_heatmap
    table = codes.groupby(types).mean().loc[keep]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(table) + 1.2)))
    im = ax.imshow(table.values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(table)), [f"{t} ({counts[t]})" for t in table.index], fontsize=7)
    ax.grid(False)
    left_out = len(counts) - len(keep)
    note = f"; {left_out} type(s) under {MIN_TYPE_EVENTS} events left out" if left_out else ""
    ax.set(xlabel="shard", title=f"{title} (events per type in brackets{note})")
    fig.colorbar(im, ax=ax)
    return fig


def event_heatmap(ds, ax=None, title: str = ""):
    """Mean |activation| of each shard by event type, each row divided by its largest value (the pattern, not the
    scale of one type), rows labelled with their event counts, types under ``MIN_TYPE_EVENTS`` events left out,
    shards (of the first SAE seed, labelled with their ids) ordered by their dominant type so that a diagonal
    shows; titled with NMI (and its k-means and random-dictionary baselines) and firing-weighted purity (and with
    shuffled labels), means over the SAE seeds as the Finding gives them."""
    from .findings import nanmean

    nmi, nmi_r = nanmean(ds.nmi), nanmean(ds.nmi_random)
    km = f"k-means {nanmean(ds.nmi_kmeans):.2f}, " if "nmi_kmeans" in ds else ""
    pur, pur_s = nanmean(ds.purity), nanmean(ds.purity_shuffled)
    seeds = ds.sizes.get("sae_seed", 1)
    first = int(ds.sae_seed[0]) if "sae_seed" in ds.coords else 0
    act = ds.activation_by_type.transpose("event_type", "shard")
    keep = ds.type_count.values >= MIN_TYPE_EVENTS
    if not keep.any():
        keep[:] = True
    act = act.isel(event_type=np.flatnonzero(keep))
    counts = ds.type_count.values[keep]
    v = act.values / np.clip(act.values.max(1, keepdims=True), 1e-30, None)
    fired = act.values.max(0) > 0
    order = np.lexsort((-act.values.max(0), act.values.argmax(0)))  # by dominant type, strongest first
    order = order[fired[order]]
    da = act.copy(data=v).isel(shard=order)
    da = da.assign_coords(event_type=[f"{t} (n={c})" for t, c in zip(act.event_type.values, counts)])
    dropped = int((~keep).sum())
    note = f"; {dropped} types under {MIN_TYPE_EVENTS} events left out" if dropped else ""
    heatmap(
        da,
        ax,
        xlabel=f"shard id (SAE seed {first}: firing shards, by dominant type; rows scaled to their max{note})",
        title=f"{title}NMI {nmi:.2f} ({km}random dict. {nmi_r:.2f}), purity {pur:.2f} (shuffled {pur_s:.2f}); "
        f"mean{'s' if seeds > 1 else ''} of {seeds} SAE seed{'s' if seeds > 1 else ''}",
    )
    return ax


def add_effect(ds, ax=None, title: str = "", alpha: float | None = None):
    """Reward change per task when each shard is added to the base policy at strength ``alpha`` (default: the
    largest) times its own size; cells within the evaluation's noise floor are left blank, and when every cell is
    blank a line of text says so in place of an empty heatmap."""
    ax = ax or plt.gca()
    a = float(ds.alpha.max()) if alpha is None else alpha
    raw = ds.add_effect.sel(alpha=a)
    da, note = raw, ""
    if "noise_floor" in ds:
        da = raw.where(np.abs(raw) > ds.noise_floor)
        note = " (blank: within noise)"
    if not np.isfinite(np.asarray(da.values, dtype=float)).any():
        largest = float(np.nanmax(np.abs(raw.values))) if np.isfinite(raw.values).any() else float("nan")
        floor = (
            f"; noise floor {float(ds.noise_floor.min()):.3f}–{float(ds.noise_floor.max()):.3f}"
            if "noise_floor" in ds
            else ""
        )
        no_effect(
            ax,
            f"{title}{a:+g} × size × shard: no (shard, task) cell\nbeyond the noise floor "
            f"(largest |Δ reward| {largest:.3f}{floor})",
        )
        return ax
    return heatmap(da, ax, center=True, title=f"{title}Δ reward, {a:+g} × size × shard{note}")


def intervention_effects(ds):
    """Three panels: the reward change per task of adding each shard at its own size to the starting policy (the
    largest and the smallest α) and of ablating it from the fine-tuned policy; a panel with nothing to show (every
    cell within noise, or nearly every ablation cell exactly 0) says so in a line of text."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), layout="constrained")
    add_effect(ds, axes[0], title="add: ", alpha=float(ds.alpha.max()))
    add_effect(ds, axes[1], title="add: ", alpha=float(ds.alpha.min()))
    changed = ds.ablate_effect != 0
    if changed.mean() >= 0.1:
        heatmap(ds.ablate_effect, axes[2], center=True, title="ablate shard: Δ reward")
    else:  # nearly every cell exactly 0: a heatmap would show one colour
        no_effect(
            axes[2],
            f"ablate: {int(changed.sum())} of {ds.ablate_effect.size} (shard, task) cells\nchange reward at all",
        )
    return fig
