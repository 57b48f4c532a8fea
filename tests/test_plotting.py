import numpy as np

from shardlib.plotting import smooth


def test_moving_average_skips_missing_steps_instead_of_blanking_the_window():
    y = np.array([1.0, np.nan, 3.0, np.nan, np.nan, 5.0])
    out = smooth(y, 3)
    assert np.allclose(out, [1.0, 1.0, 2.0, 3.0, 3.0, 5.0])  # padded with the first value, NaN steps left out
    assert np.allclose(smooth(np.arange(5.0), 2), [0.0, 0.5, 1.5, 2.5, 3.5])
    assert np.isnan(smooth(np.full(4, np.nan), 2)).all()
