import numpy as np
import pytest
import torch
from torch import nn

from shardlib import interventions


def test_effect_scores_count_only_effects_above_the_noise_floor():
    floor = np.array([0.1, 0.1, 0.1])
    effect = np.array(
        [
            [[0.0, 0.05, 0.0], [0.0, 0.5, -0.2]],  # moves task 1 (alpha +), and task 2
            [[0.09, -0.09, 0.05], [0.0, 0.0, 0.0]],  # noise only: one prompt's worth would score 1.0 unfloored
        ]
    )
    sc = interventions.effect_scores(effect, floor)
    assert sc["moves"].tolist() == [1.0, 0.0] and sc["n_above"].tolist() == [2.0, 0.0]
    assert sc["top_task"].tolist() == [1, -1] and sc["best_alpha"][0] == 1
    assert sc["specificity"][0] == pytest.approx(0.5 / 0.7) and np.isnan(sc["specificity"][1])


def test_own_task_null_credits_no_task_every_direction_hits():
    own = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    top = np.zeros(8, int)  # task 0 is hit hardest by every shard
    null_mean, p95, p = interventions.own_task_null(own, top)
    assert null_mean == pytest.approx(0.25) and p > 0.3  # observed 0.25: no better than shuffled tasks
    assert np.isnan(interventions.own_task_null(own, -np.ones(8, int))[0])


def test_shard_sizes_and_span_directions():
    raw = np.array([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]])
    codes = np.array([[1.0], [0.0], [-1.0]])
    assert interventions.shard_sizes(raw, codes, np.array([[1.0, 0.0]])).tolist() == [5.0]
    r = interventions.span_directions(raw[:, :1], 3, seed=0)
    assert np.allclose(np.abs(r), 1.0)  # the span of events along one axis is that axis


def test_a_zero_shard_changes_nothing_and_ablation_removes_the_component():
    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    m = interventions.add_direction(base, {"weight": torch.zeros(2, 3)}, 10.0)
    assert torch.equal(m(x), base(x))
    d = {"weight": torch.zeros(2, 3)}
    d["weight"][0, 0] = 1.0
    delta = {"weight": torch.full((2, 3), 0.5)}
    final = interventions.add_direction(base, delta, 1.0)
    ablated, c = interventions.project_out(final, d, delta)
    assert c == pytest.approx(0.5)
    assert ablated.weight[0, 0].item() == pytest.approx(base.weight[0, 0].item(), abs=1e-6)
    assert ablated.weight[1, 1].item() == pytest.approx(final.weight[1, 1].item())


def test_specificity():
    s = interventions.specificity(np.array([[0.0, 1.0, 0.0], [1.0, 1.0, -1.0], [0.0, 0.0, 0.0]]))
    assert s[0] == 1.0 and s[1] == pytest.approx(1 / 3) and np.isnan(s[2])
