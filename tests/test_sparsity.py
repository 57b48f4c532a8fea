import numpy as np
import pytest
import torch

from shardlib import metrics, sparsity


def test_rank_of_a_known_low_rank_update():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(8, 2, generator=g) @ torch.randn(2, 6, generator=g)
    assert metrics.rank_ratio(d) == pytest.approx(2 / 6)
    assert metrics.rank_ratio(torch.zeros(4, 4)) == 0.0
    assert np.isnan(metrics.rank_ratio(torch.ones(3)))


def test_unchanged_lenses():
    d = torch.tensor([0.0, 1e-9, 1e-6, 1e-3])
    assert metrics.unchanged_fraction(d, (0.0, 1e-8, 1e-5)).tolist() == [0.25, 0.5, 0.75]
    before = torch.tensor([1.0, 1.0])
    after = torch.tensor([1.0 + 1e-4, 1.5])  # the first change is below bf16 resolution at 1.0
    assert metrics.bf16_unchanged(before, after) == 0.5
    rows, cols = metrics.touched(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert (rows, cols) == (0.5, 0.5)


def test_cumulative_lenses_between_two_policies(tmp_path):
    from shardlib.policy import MLPPolicy, save_policy

    torch.manual_seed(0)
    a = MLPPolicy(3, 2, 4)
    b = MLPPolicy(3, 2, 4)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.net[0].weight[0, :] += 1.0  # one row changes
    save_policy(a, tmp_path / "a")
    save_policy(b, tmp_path / "b")
    ds = sparsity.cumulative(tmp_path / "a", tmp_path / "b")
    w = ds.sel(tensor="net.0.weight")
    assert float(w.unchanged.sel(tau=0.0)) == pytest.approx(1 - 3 / 12)
    assert (
        float(w.rows_touched) == 0.25 and float(w.cols_touched) == 1.0 and float(w.rank_ratio) == pytest.approx(1 / 3)
    )
    assert float(ds.sel(tensor="net.2.bias").unchanged.sel(tau=0.0)) == 1.0
    assert sparsity.layer_of("model.layers.1.mlp.up_proj.weight") == "layer 1"
