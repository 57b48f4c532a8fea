import numpy as np
import pytest
import torch

from shardlib import toy


def test_divergence_gradient_matches_a_hand_computation():
    """TMS 2->1 at known weights: d/dW of 1/2||f(x) - f_r||^2 by hand."""
    m = toy.TMS(2, 1)
    with torch.no_grad():
        m.W.copy_(torch.tensor([[1.0, 0.5]]))
        m.b.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(0))
    grads = toy.divergence_gradients(m, x, g)
    # sample 0: h = W x = 1; pre = W^T h + b = [1.1, 0.3]; f = ReLU(pre) = [1.1, 0.3]
    ref = x[perm[0]]
    f_r = torch.relu(ref @ m.W.T @ m.W + m.b).detach()
    delta = (torch.tensor([1.1, 0.3]) - f_r) * torch.tensor([1.0, 1.0])  # both outputs active
    h = torch.tensor([1.0])
    # f = ReLU(W^T W x + b): dL/dW = h delta^T + (W delta) x^T
    dW = torch.outer(h, delta) + torch.outer(m.W.detach() @ delta, x[0])
    assert torch.allclose(grads["W"][0], dW, atol=1e-6)
    assert torch.allclose(grads["b"][0], delta, atol=1e-6)


def test_circuits_are_rank_one_feature_columns():
    m = toy.TMS(5, 2)
    c = toy.circuits(m)
    assert c["W"].shape == (5, 2, 5)
    for k in range(5):
        assert torch.linalg.matrix_rank(c["W"][k]) == 1
        assert (
            torch.equal(c["W"][k][:, k], m.W.detach()[:, k]) and c["W"][k].abs().sum() == m.W.detach()[:, k].abs().sum()
        )


def test_columnwise_mmcs_and_ml2r_on_a_constructed_example():
    W = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    perfect = np.stack([np.outer(W[:, c], np.eye(3)[c]) for c in range(3)])
    assert toy.columnwise(-perfect, W) == pytest.approx((1.0, 1.0))
    half = perfect.copy()
    half[2, :, 0] = W[:, 2]  # shard 2 also has a column-0 part as large as its own
    mm, share = toy.columnwise(half, W)
    assert mm == pytest.approx(1.0)
    assert share == pytest.approx((1 + 1 + 1 / np.sqrt(2)) / 3)


def test_zero_reference_gradient_of_tmcs_matches_a_hand_computation():
    """TMCS 2->1->2 at known weights, reference 0: d/dtheta of 1/2||f(x)||^2 by hand."""
    m = toy.TMCS(2, 1, 2)
    with torch.no_grad():
        m.W_in.copy_(torch.tensor([[2.0], [1.0]]))
        m.W_out.copy_(torch.tensor([[1.0, -1.0]]))
        m.b.copy_(torch.tensor([0.5, 0.5]))
    x = torch.tensor([[1.0, 0.0]])
    grads = toy.divergence_gradients(m, x, reference="zero")
    # h = x W_in = 2; pre = h W_out + b = [2.5, -1.5]; f = [2.5, 0]; delta = f * 1[pre > 0] = [2.5, 0]
    delta = torch.tensor([2.5, 0.0])
    assert torch.allclose(grads["b"][0], delta)
    assert torch.allclose(grads["W_out"][0], torch.tensor([[2.0]]) * delta[None, :])  # h^T delta
    assert torch.allclose(grads["W_in"][0], torch.outer(x[0], m.W_out.detach() @ delta))  # x^T (W_out delta)^T
    with pytest.raises(ValueError, match="reference"):
        toy.divergence_gradients(m, x, reference="other")


def test_tmcs_ground_truth_is_the_gradient_of_each_input_alone():
    m, A = toy.train_tmcs(steps=1, seed=0)
    truth = toy.tmcs_circuits(m)
    assert truth["W_in"].shape == (10, 10, 5) and A.shape == (10, 10) and float(A.min()) >= 0 and float(A.max()) < 3
    for i in range(10):  # the input-side part of input i's circuit lives in W_in's row i only
        others = torch.cat([truth["W_in"][i, :i], truth["W_in"][i, i + 1 :]])
        assert others.abs().max() == 0


def test_coefficient_r_is_pearson_per_row_with_the_sign_fixed():
    A = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    assert toy.coefficient_r(-2 * A, A) == pytest.approx(1.0)  # a signed shard may point either way
    rec = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    r_second = np.corrcoef(rec[1], A[1])[0, 1]
    assert toy.coefficient_r(rec, A) == pytest.approx((1.0 + r_second) / 2)


def test_set_directions_starts_the_sae_at_the_truth():
    m = toy.TMS(5, 2)
    truth = toy.circuits(m)
    from shardlib.sae import ShardSAE

    sae = ShardSAE({"W": (2, 5), "b": (5,)}, 5, 1, rank=1, signed=True)
    sae.set_directions_({k: v.clone() for k, v in truth.items()})
    d = sae.directions()
    unit = truth["W"] / truth["W"].flatten(1).norm(dim=1)[:, None, None]
    assert torch.allclose(d["W"], unit, atol=1e-6) and torch.allclose(d["b"], torch.zeros(5, 5))
    with pytest.raises(ValueError, match="shape"):
        sae.set_directions_({"W": torch.zeros(4, 2, 5), "b": torch.zeros(4, 5)})


def test_params_reject_an_unknown_case_and_a_too_large_k(tmp_path):
    with pytest.raises(ValueError, match="cases"):
        toy.ToyParams.from_dict(dict(out_dir=str(tmp_path), cases=["tms_5_3"]))
    with pytest.raises(ValueError, match="k"):
        toy.ToyParams.from_dict(dict(out_dir=str(tmp_path), cases=["tms_5_2"], k=6))


def test_cases_run_and_the_numbers_do_not_depend_on_workers(tmp_path):
    kw = dict(cases=["tms_5_2", "tmcs"], seeds=[0], model_steps=200, n_samples=512, sae_steps=30)
    serial = toy.run(toy.ToyParams.from_dict(dict(out_dir=str(tmp_path / "a"), workers=1, **kw)), progress=False)
    pooled = toy.run(toy.ToyParams.from_dict(dict(out_dir=str(tmp_path / "b"), workers=2, **kw)), progress=False)
    for k in serial.data_vars:
        assert np.array_equal(serial[k].values, pooled[k].values, equal_nan=True), k
    tms, tmcs = serial.sel(case="tms_5_2"), serial.sel(case="tmcs")
    assert ((tms.mmcs_columnwise >= 0) & (tms.mmcs_columnwise <= 1)).all() and (serial.recon_error >= 0).all()
    assert np.isnan(tms.coef_r).all() and np.isfinite(tmcs.coef_r).all()
    for control in ("mmcs_truth_init", "mmcs_single_feature", "recon_error_single_feature"):  # signed only
        assert (
            np.isfinite(serial[control].sel(activation="signed")).all()
            and np.isnan(serial[control].sel(activation="relu")).all()
        )
    assert "published_tmcs_recon_error_l3d" in serial.attrs
    assert serial.intervention_tms_5_2.shape == (5, 13, 5) and np.isfinite(tms.own_output_share).all()
    assert np.isnan(tmcs.own_output_share).all() and np.isfinite(tms.own_output_share_truth).all()
    assert (serial.ml2r_gradient > 0).all()
    # after run, run_case resumes the finished SAEs: the table's numbers, no retraining
    m, _ = toy.run_case(
        "tmcs", 0, "signed", toy.ToyParams.from_dict(dict(out_dir=str(tmp_path / "b"), workers=2, **kw))
    )
    assert m["mmcs_columnwise"] == serial.mmcs_columnwise.sel(case="tmcs", activation="signed", seed=0).item()


def test_intervention_with_a_zero_shard_changes_nothing():
    model = toy.train_tms(5, 2, steps=20)
    curve = toy.intervention_curve(model, {"W": torch.zeros(2, 5), "b": torch.zeros(5)})
    assert curve.shape == (13, 5) and np.allclose(curve, 0)


def test_own_output_share_on_constructed_curves():
    curves = np.zeros((2, 3, 2))
    curves[0, :, 0] = 1.0  # shard 0 moves only output 0
    curves[1, :, 0], curves[1, :, 1] = 1.0, 3.0  # shard 1 moves output 1 three times as much as output 0
    assert toy.own_output_share(curves, np.array([0, 1])) == pytest.approx((1.0 + 0.75) / 2)
    assert toy.own_output_share(curves, np.array([1, 0])) == pytest.approx((0.25 + 0.0) / 2)


def test_gradient_ml2r_is_one_for_an_sae_at_the_truth_and_halves_with_half_codes():
    from shardlib.sae import ShardSAE

    m = toy.TMS(5, 2, seed=3)
    truth = toy.circuits(m)
    sae = ShardSAE({"W": (2, 5), "b": (5,)}, 5, 1, rank=1, signed=True)
    sae.set_directions_({k: v.clone() for k, v in truth.items()})
    unit = truth["W"] / truth["W"].flatten(1).norm(dim=1)[:, None, None]
    data = {"W": 2 * unit, "b": torch.zeros(5, 5)}  # gradient c = twice circuit c: code 2, norm 2
    assert toy.gradient_ml2r(sae, data, np.arange(5), np.arange(5)) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        for p in sae.enc.parameters():
            p.mul_(0.5**0.5)  # encoder at half length (U and V each by 1/sqrt 2): codes halve
    assert toy.gradient_ml2r(sae, data, np.arange(5), np.arange(5)) == pytest.approx(0.5, abs=1e-5)
