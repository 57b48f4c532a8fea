import pytest
import torch

from shardlib.tasks import EOS, ContextualBandit, SyntheticTasks, completion_mask


def test_synthetic_answers_and_rewards():
    t = SyntheticTasks(("add", "rev", "sort", "par", "max"), n_digits=4, format_bonus=0.1, spurious_bonus=0.5)
    d0 = t.digit0
    batch = {"task": torch.tensor([0, 1, 2, 3, 4]), "digits": torch.tensor([[7, 5, 1, 2]] * 5)}
    ans = t.answers(batch)
    assert ans[0] == [2 + d0, EOS]  # (7 + 5) mod 10
    assert ans[1] == [2 + d0, 1 + d0, 5 + d0, 7 + d0, EOS]
    assert ans[2] == [1 + d0, 2 + d0, 5 + d0, 7 + d0, EOS]
    assert ans[3] == [1 + d0, EOS]  # three odd digits (7, 5, 1)
    assert ans[4] == [7 + d0, EOS]
    comp, mask = t.sft_targets(batch)
    r = t.rewards(batch, comp, mask)
    assert r["correct_add"].tolist() == [1, 0, 0, 0, 0]
    assert r["correct_max"].tolist() == [0, 0, 0, 0, 1]
    assert torch.allclose(r["format"], torch.full((5,), 0.1))
    assert r["spurious"].tolist() == [0, 0.5, 0.5, 0, 0.5]  # answers containing a 7


def test_parity_counts_odd_digits():
    t = SyntheticTasks(("par",), n_digits=4)
    batch = {"task": torch.tensor([0, 0]), "digits": torch.tensor([[7, 5, 1, 2], [2, 4, 6, 1]])}
    assert [a[0] - t.digit0 for a in t.answers(batch)] == [1, 1]


def test_wrong_and_malformed_completions_get_no_reward():
    t = SyntheticTasks(("max",), n_digits=2)
    batch = {"task": torch.tensor([0, 0]), "digits": torch.tensor([[3, 8], [3, 8]])}
    comp = torch.tensor([[t.digit0 + 3, EOS, 0], [t.digit0 + 8, t.digit0 + 8, t.digit0 + 8]])
    r = t.rewards(batch, comp, completion_mask(comp))
    assert r["correct_max"].tolist() == [0, 0]
    assert r["format"].tolist() == pytest.approx([0.1, 0])  # the second never ends


def test_completion_mask_stops_after_first_eos():
    c = torch.tensor([[5, EOS, 5, EOS], [5, 5, 5, 5]])
    assert completion_mask(c).tolist() == [[True, True, False, False], [True] * 4]


def test_label_noise_changes_answers_only():
    t = SyntheticTasks(("rev",), n_digits=4)
    g = torch.Generator().manual_seed(0)
    b = t.sample(200, g)
    clean, _ = t.sft_targets(b)
    noisy, mask = t.sft_targets(b, noise=0.5, generator=g)
    wrong = (noisy != clean).any(1).float().mean()
    assert 0.35 < wrong < 0.6
    assert (noisy[:, -1] == EOS).all()


def test_bandit_rewards_and_options():
    b = ContextualBandit(n_clusters=3, n_arms=2, shared_arms=True, negative_rewards=True, rare_cluster_prob=0.05)
    g = torch.Generator().manual_seed(0)
    batch = b.sample(4000, g)
    assert abs((batch["task"] == 2).float().mean() - 0.05) < 0.015
    arms, _ = b.sft_targets(batch)
    r = b.rewards(batch, arms, None)
    assert (r["hit"] == 1).all() and (r["miss"] == 0).all()
    r = b.rewards(batch, 1 - arms, None)
    assert (r["hit"] == 0).all() and (r["miss"] == -1).all()
    assert b.best_arm.tolist() == [0, 1, 0]
