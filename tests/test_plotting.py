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
