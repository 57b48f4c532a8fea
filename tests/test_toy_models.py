import numpy as np
import pytest
import torch

from shardlib import toy_models


def test_divergence_gradient_matches_a_hand_computation():
    """TMS 2->1 at known weights: d/dW of 1/2||f(x) - f_r||^2 by hand."""
    m = toy_models.TMS(2, 1)
    with torch.no_grad():
        m.W.copy_(torch.tensor([[1.0, 0.5]]))
        m.b.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(0))
    grads = toy_models.divergence_gradients(m, x, g)
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
    m = toy_models.TMS(5, 2)
    c = toy_models.circuits(m)
    assert c["W"].shape == (5, 2, 5)
    for k in range(5):
        assert torch.linalg.matrix_rank(c["W"][k]) == 1
        assert (
            torch.equal(c["W"][k][:, k], m.W.detach()[:, k]) and c["W"][k].abs().sum() == m.W.detach()[:, k].abs().sum()
        )


def test_zero_reference_gradient_of_tmcs_matches_a_hand_computation():
    """TMCS 2->1->2 at known weights, reference 0: d/dtheta of 1/2||f(x)||^2 by hand."""
    m = toy_models.TMCS(2, 1, 2)
    with torch.no_grad():
        m.W_in.copy_(torch.tensor([[2.0], [1.0]]))
        m.W_out.copy_(torch.tensor([[1.0, -1.0]]))
        m.b.copy_(torch.tensor([0.5, 0.5]))
    x = torch.tensor([[1.0, 0.0]])
    grads = toy_models.divergence_gradients(m, x, reference="zero")
    # h = x W_in = 2; pre = h W_out + b = [2.5, -1.5]; f = [2.5, 0]; delta = f * 1[pre > 0] = [2.5, 0]
    delta = torch.tensor([2.5, 0.0])
    assert torch.allclose(grads["b"][0], delta)
    assert torch.allclose(grads["W_out"][0], torch.tensor([[2.0]]) * delta[None, :])  # h^T delta
    assert torch.allclose(grads["W_in"][0], torch.outer(x[0], m.W_out.detach() @ delta))  # x^T (W_out delta)^T
    with pytest.raises(ValueError, match="reference"):
        toy_models.divergence_gradients(m, x, reference="other")


def test_tmcs_ground_truth_is_the_gradient_of_each_input_alone():
    m, A = toy_models.train_tmcs(steps=1, seed=0)
    truth = toy_models.tmcs_circuits(m)
    assert truth["W_in"].shape == (10, 10, 5) and A.shape == (10, 10) and float(A.min()) >= 0 and float(A.max()) < 3
    for i in range(10):  # the input-side part of input i's circuit lives in W_in's row i only
        others = torch.cat([truth["W_in"][i, :i], truth["W_in"][i, i + 1 :]])
        assert others.abs().max() == 0


def test_intervention_with_a_zero_shard_changes_nothing():
    model = toy_models.train_tms(5, 2, steps=20)
    curve = toy_models.intervention_curve(model, {"W": torch.zeros(2, 5), "b": torch.zeros(5)})
    assert curve.shape == (13, 5) and np.allclose(curve, 0)
