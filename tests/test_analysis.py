import numpy as np
import pytest
import torch
from torch import nn

from shardlib import analysis, metrics


def test_auroc_reference_values():
    assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert metrics.auroc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 1])) == 0.5
    assert metrics.auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0


def test_alignment_separates_structure_from_baselines():
    rng = np.random.default_rng(1)
    T, D = 3, 40
    means = rng.normal(size=(T, D))
    types = rng.integers(0, T, 900)
    updates = means[types] + 0.05 * rng.normal(size=(900, D))
    codes = np.eye(T)[types] * 2.0
    dirs = means / np.linalg.norm(means, axis=1, keepdims=True)
    rand = rng.normal(size=(T, D))
    a = analysis.alignment(codes, types, updates, dirs, rand, k=1)
    assert (
        a["purity"] == 1.0 and a["auroc"] == 1.0 and a["nmi"] == pytest.approx(1.0) and a["ari"] == pytest.approx(1.0)
    )
    assert a["type_match"] > 0.99 and a["types_matched"] == a["n_types"] == 3
    assert a["auroc_shuffled"] < 0.6 and abs(a["ari_shuffled"]) < 0.02 and a["nmi_shuffled"] < 0.02
    assert a["type_match_random"] < 0.6 and a["types_matched_random"] == 0 and a["purity_shuffled"] < 0.5
    assert a["ari_random"] < a["ari"]  # random projections find some of the clusters the data has, not all


def test_random_dictionary_has_the_sae_structure():
    d = analysis.random_dictionary({"w": (6, 5), "b": (6,)}, 4, rank=1)
    norm = torch.sqrt((d["w"] ** 2).sum((1, 2)) + (d["b"] ** 2).sum(1))
    assert torch.allclose(norm, torch.ones(4))
    assert all(torch.linalg.matrix_rank(d["w"][i]) == 1 for i in range(4))


def test_a_zero_shard_changes_nothing_and_ablation_removes_the_component():
    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    m = analysis.add_direction(base, {"weight": torch.zeros(2, 3)}, 10.0)
    assert torch.equal(m(x), base(x))
    d = {"weight": torch.zeros(2, 3)}
    d["weight"][0, 0] = 1.0
    delta = {"weight": torch.full((2, 3), 0.5)}
    final = analysis.add_direction(base, delta, 1.0)
    ablated, c = analysis.project_out(final, d, delta)
    assert c == pytest.approx(0.5)
    assert ablated.weight[0, 0].item() == pytest.approx(base.weight[0, 0].item(), abs=1e-6)
    assert ablated.weight[1, 1].item() == pytest.approx(final.weight[1, 1].item())


def test_specificity():
    s = analysis.specificity(np.array([[0.0, 1.0, 0.0], [1.0, 1.0, -1.0], [0.0, 0.0, 0.0]]))
    assert s[0] == 1.0 and s[1] == pytest.approx(1 / 3) and np.isnan(s[2])
