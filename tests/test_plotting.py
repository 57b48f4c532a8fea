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
