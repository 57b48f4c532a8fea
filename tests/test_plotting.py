import numpy as np

from shardlib.plotting import smooth


def test_moving_average_skips_missing_steps_instead_of_blanking_the_window():
    y = np.array([1.0, np.nan, 3.0, np.nan, np.nan, 5.0])
    out = smooth(y, 3)
    assert np.allclose(out, [1.0, 1.0, 2.0, 3.0, 3.0, 5.0])  # padded with the first value, NaN steps left out
    assert np.allclose(smooth(np.arange(5.0), 2), [0.0, 0.5, 1.5, 2.5, 3.5])
    assert np.isnan(smooth(np.full(4, np.nan), 2)).all()


def test_sparsity_lenses_draws_only_the_scopes_a_study_holds():
    import numpy as np
    import xarray as xr

    from shardlib import plotting

    ds = xr.Dataset(
        {"unchanged": (("run", "scope", "tau"), np.full((1, 2, 3), 0.5))},
        coords={"run": ["rl"], "scope": ["cumulative", "event"], "tau": [0.0, 1e-6, 1e-5]},
    )  # no step updates collected, no learning-rate sweep
    fig = plotting.sparsity_lenses(ds)
    assert [ax.get_title() for ax in fig.axes] == ["cumulative update", "event update"]


def test_a_frontier_panel_names_only_the_ranks_it_draws():
    import xarray as xr

    from shardlib import plotting

    fvu = np.array([[[0.5, 0.4], [np.nan, np.nan]], [[np.nan, np.nan], [0.9, 0.8]]])  # store x rank x k
    ds = xr.Dataset(
        {"fvu": (("store", "rank", "k"), fvu), "l0": (("store", "rank", "k"), np.where(np.isnan(fvu), np.nan, 4.0))},
        coords={"store": ["events", "events_one_matrix"], "rank": [0, 1], "k": [4, 16]},
    )
    fig = plotting.frontier_panels(ds)
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert labels == [["dense"], ["rank 1"]]
    assert [ax.get_lines()[0].get_color() for ax in fig.axes] == ["C0", "C1"]  # each rank keeps its colour
    assert [ax.get_lines()[0].get_marker() for ax in fig.axes] == ["o", "^"]  # and its marker: coinciding lines show
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"  # the suptitle clears panel titles


def test_shards_by_type_draws_the_types_with_enough_events_labelled_with_their_counts():
    import pandas as pd

    from shardlib import plotting

    types = ["a"] * 25 + ["b"] * 30 + ["c"] * 3
    codes = pd.DataFrame(np.abs(np.random.default_rng(0).normal(size=(len(types), 4))))
    fig = plotting.shards_by_type(codes, types)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a (25)", "b (30)"]
    assert "1 type(s) under 20 events left out" in ax.get_title()
    assert ax.get_images()[0].get_interpolation() == "nearest"
    few = plotting.shards_by_type(codes.iloc[:6], ["a"] * 3 + ["b"] * 3).axes[0]  # no type has 20: all are drawn
    assert [t.get_text() for t in few.get_yticklabels()] == ["a (3)", "b (3)"] and "left out" not in few.get_title()


def test_an_add_effect_panel_with_every_cell_within_noise_says_so_instead_of_a_blank_heatmap():
    import xarray as xr

    from shardlib import plotting

    ds = xr.Dataset(
        {
            "add_effect": (("intervened_shard", "alpha", "task"), np.zeros((2, 2, 3))),
            "ablate_effect": (("intervened_shard", "task"), np.zeros((2, 3))),
            "noise_floor": ("task", [0.1, 0.2, 0.05]),
        },
        coords={"intervened_shard": [4, 9], "alpha": [-1.0, 1.0], "task": ["a", "b", "c"]},
    )
    fig = plotting.intervention_effects(ds)
    assert not any(ax.get_images() for ax in fig.axes)  # no heatmap, no colourbar
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(texts) == 3 and "beyond the noise floor" in texts[0] and "0 of 6" in texts[2]
    moved = ds.assign(add_effect=ds.add_effect.where(ds.alpha < 0, 0.5))  # α = +1 moves reward
    fig = plotting.intervention_effects(moved)
    assert fig.axes[0].get_images() and fig.axes[1].texts


def test_the_event_heatmap_gives_the_seed_mean_and_labels_columns_with_shard_ids():
    import xarray as xr

    from shardlib import plotting

    act = np.zeros((30, 2))
    act[:, 0] = np.linspace(1, 2, 30)
    act[7, 1] = 5.0
    ds = xr.Dataset(
        {
            "activation_by_type": (("shard", "event_type"), act),
            "type_count": ("event_type", [30, 25]),
            **{v: ("sae_seed", [0.2, 0.4]) for v in ("nmi", "nmi_random", "purity", "purity_shuffled")},
        },
        coords={"shard": np.arange(30), "event_type": ["x", "y"], "sae_seed": [3, 4]},
    )
    ax = plotting.event_heatmap(ds, plt_axes())
    assert "NMI 0.30" in ax.get_title() and "means of 2 SAE seeds" in ax.get_title()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == 30 and labels[0] == "29" and "7" in labels  # ids, not rank positions
    assert ax.get_xlabel().startswith("shard id (SAE seed 3")


def plt_axes():
    import matplotlib.pyplot as plt

    return plt.subplots()[1]


def test_log_axes_keep_two_tick_labels_and_aux_zeros_are_not_drawn():
    import xarray as xr

    from shardlib import plotting

    m = xr.Dataset(
        {"curve_rec": ("epoch", [0.9, 1.6, 0.7]), "curve_aux": ("epoch", [0.0, 0.0, 0.0])}, coords={"epoch": [0, 1, 2]}
    )
    ax = plotting.shard_training_curves(m, plt_axes(), dead_window=128)
    assert ax.get_yscale() == "linear"  # under a decade: a log axis would label one tick
    assert [t.get_text() for t in ax.get_legend().get_texts()][1] == "AuxK: 0 (no latent unfired for 128 samples)"
    # latents restarted as they died leave AuxK nothing to act on: the legend says so, not that none died
    restarted = m.assign(curve_resampled=("epoch", [0.0, 2.5, 0.0]))
    ax = plotting.shard_training_curves(restarted, plt_axes(), dead_window=128)
    label = [t.get_text() for t in ax.get_legend().get_texts()][1]
    assert label == "AuxK: 0 (dead latents restarted as they died, in 1 of 3 epochs)"
    ax = plotting.shard_training_curves(m.assign(curve_aux=("epoch", [0.0, 0.01, 0.3])), plt_axes(), 128)
    assert ax.get_yscale() == "log" and np.isnan(ax.get_lines()[1].get_ydata()[0])  # zeros masked, no spike
    ax = plt_axes()
    ax.plot([1, 2], [0.15, 0.9])
    ax.set(yscale="log", ylim=(0.12, 2.5))  # one power of ten (1) inside
    plotting.readable_log_axis(ax)
    ax.figure.canvas.draw()
    shown = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    lo, hi = ax.get_ylim()
    assert len([v for v in ax.get_yticks() if lo <= v <= hi]) >= 2 and len(shown) >= 2


def test_sft_update_norms_are_split_by_task_only():
    import pandas as pd

    from shardlib import plotting

    norms = pd.DataFrame({"norm": [1.0, 2.0, 3.0], "task_name": ["a", "a", "b"], "advantage_sign": ["pos"] * 3})
    ax = plt_axes()
    table, counts = plotting.update_norms(norms, ax, by_sign=False)
    assert ax.get_legend() is None and list(table.index) == ["a", "b"] and list(counts["events"]) == [2, 1]
    table, _ = plotting.update_norms(norms, plt_axes())
    assert list(table.columns) == ["pos"]
