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
        assert torch.equal(c["W"][k][:, k], m.W.detach()[:, k]) and c["W"][k].abs().sum() == m.W.detach()[:, k].abs().sum()


def test_columnwise_mmcs_and_ml2r_on_a_constructed_example():
    W = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    perfect = np.stack([np.outer(W[:, c], np.eye(3)[c]) for c in range(3)])
    assert toy.columnwise(-perfect, W) == pytest.approx((1.0, 1.0))
    half = perfect.copy()
    half[2, :, 0] = W[:, 2]  # shard 2 also has a column-0 part as large as its own
    mm, share = toy.columnwise(half, W)
    assert mm == pytest.approx(1.0)
    assert share == pytest.approx((1 + 1 + 1 / np.sqrt(2)) / 3)


def test_tms_training_reduces_loss_and_case_runs(tmp_path):
    p = toy.ToyParams.from_dict(dict(out_dir=str(tmp_path), cases=["tms_5_2"], seeds=[0], tms_steps=200, n_samples=512, epochs=3,
                                     activations=["signed"]))
    m, sae, model = toy.run_case("tms_5_2", 0, "signed", p)
    assert 0 <= m["mmcs_columnwise"] <= 1 and 0 <= m["recon_error"] and m["l0"] <= 1
    curve = toy.intervention_curve(model, {"W": torch.zeros(2, 5), "b": torch.zeros(5)})
    assert np.allclose(curve, 0)  # a zero shard changes nothing
