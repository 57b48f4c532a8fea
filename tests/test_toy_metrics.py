import numpy as np
import pytest
import torch

from shardlib import toy_metrics, toy_models


def test_columnwise_mmcs_and_ml2r_on_a_constructed_example():
    W = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    perfect = np.stack([np.outer(W[:, c], np.eye(3)[c]) for c in range(3)])
    assert toy_metrics.columnwise(-perfect, W) == pytest.approx((1.0, 1.0))
    half = perfect.copy()
    half[2, :, 0] = W[:, 2]  # shard 2 also has a column-0 part as large as its own
    mm, share = toy_metrics.columnwise(half, W)
    assert mm == pytest.approx(1.0)
    assert share == pytest.approx((1 + 1 + 1 / np.sqrt(2)) / 3)


def test_coefficient_r_is_pearson_per_row_with_the_sign_fixed():
    A = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    assert toy_metrics.coefficient_r(-2 * A, A) == pytest.approx(1.0)  # a signed shard may point either way
    rec = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    r_second = np.corrcoef(rec[1], A[1])[0, 1]
    assert toy_metrics.coefficient_r(rec, A) == pytest.approx((1.0 + r_second) / 2)


def test_own_output_share_on_constructed_curves():
    curves = np.zeros((2, 3, 2))
    curves[0, :, 0] = 1.0  # shard 0 moves only output 0
    curves[1, :, 0], curves[1, :, 1] = 1.0, 3.0  # shard 1 moves output 1 three times as much as output 0
    assert toy_metrics.own_output_share(curves, np.array([0, 1])) == pytest.approx((1.0 + 0.75) / 2)
    assert toy_metrics.own_output_share(curves, np.array([1, 0])) == pytest.approx((0.25 + 0.0) / 2)


def test_gradient_ml2r_is_one_for_an_sae_at_the_truth_and_halves_with_half_codes():
    from shardlib.sae import ShardSAE

    m = toy_models.TMS(5, 2, seed=3)
    truth = toy_models.circuits(m)
    sae = ShardSAE({"W": (2, 5), "b": (5,)}, 5, 1, rank=1, signed=True)
    sae.set_directions_({k: v.clone() for k, v in truth.items()})
    unit = truth["W"] / truth["W"].flatten(1).norm(dim=1)[:, None, None]
    data = {"W": 2 * unit, "b": torch.zeros(5, 5)}  # gradient c = twice circuit c: code 2, norm 2
    assert toy_metrics.gradient_ml2r(sae, data, np.arange(5), np.arange(5)) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        for p in sae.enc.parameters():
            p.mul_(0.5**0.5)  # encoder at half length (U and V each by 1/sqrt 2): codes halve
    assert toy_metrics.gradient_ml2r(sae, data, np.arange(5), np.arange(5)) == pytest.approx(0.5, abs=1e-5)
