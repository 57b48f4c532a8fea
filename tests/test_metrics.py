"""Metrics pinned against their reference definitions on cases with known answers."""

import numpy as np
import pytest
import torch

from shardlib import metrics


def test_fvu_of_the_mean_predictor_is_one():
    x = np.random.default_rng(0).normal(size=(50, 7)) + 3
    assert metrics.fvu(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(1.0)
    assert metrics.fvu(x, x) == 0.0


def test_recon_stats_fvu_is_pooled_not_a_mean_of_ratios():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(40, 3, 2)))
    xh = x + torch.tensor(rng.normal(size=(40, 3, 2))) * torch.linspace(0.01, 2, 40)[:, None, None]
    z = torch.zeros(40, 5)
    z[:, 0] = 1
    z[:10, 4] = 2
    st = metrics.ReconStats()
    for s in range(0, 40, 7):  # accumulated over uneven batches
        st.update({"w": x[s : s + 7]}, {"w": xh[s : s + 7]}, z[s : s + 7])
    r = st.result()
    assert r["fvu"] == pytest.approx(metrics.fvu(x.numpy(), xh.numpy()))
    assert r["l0"] == pytest.approx(1.25)
    assert r["dead_fraction"] == pytest.approx(3 / 5)
    assert r["dense_fraction"] == pytest.approx(2 / 5)  # latent 0 (100%) and latent 4 (25%)
    shrink = np.mean(np.linalg.norm(xh.reshape(40, -1), axis=1) / np.linalg.norm(x.reshape(40, -1), axis=1))
    assert r["shrinkage"] == pytest.approx(shrink)
    norms, norms_hat = np.linalg.norm(x.reshape(40, -1), axis=1), np.linalg.norm(xh.reshape(40, -1), axis=1)
    assert r["shrinkage_weighted"] == pytest.approx(norms_hat.sum() / norms.sum())


def test_recon_stats_mean_predictor_gives_fvu_one():
    x = torch.randn(30, 4) + 2
    st = metrics.ReconStats()
    st.update({"v": x}, {"v": x.mean(0).expand_as(x)}, torch.ones(30, 2))
    assert st.result()["fvu"] == pytest.approx(1.0)


def test_recovery_metrics_on_a_constructed_dictionary():
    G = np.eye(4)[:3]  # three ground-truth directions
    D = np.stack([-G[0], G[1], G[1] + 0.01 * np.eye(4)[3], np.eye(4)[3]])  # G2 missing, G1 twice, one junk latent
    r = metrics.recovery(G, D)
    assert r["mmcs_g2d"] == pytest.approx((1 + 1 + 0) / 3)
    assert r["mmcs_d2g"] == pytest.approx((1 + 1 + 0.99995 + 0) / 4, abs=1e-4)
    assert r["r@0.9"] == pytest.approx(2 / 3)
    assert r["uniqueness"] == pytest.approx(2 / 3)  # best matches: latent 0, 1, and for G2 some latent
    assert r["hungarian_mcc"] == pytest.approx((1 + 1 + 0) / 3, abs=1e-4)


def test_perfect_dictionary_up_to_sign_and_permutation():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(5, 20))
    D = -G[[3, 1, 4, 0, 2]] * 2.5
    r = metrics.recovery(G, D)
    assert r["mmcs_g2d"] == pytest.approx(1) and r["hungarian_mcc"] == pytest.approx(1) and r["uniqueness"] == 1


def test_seed_stability_is_one_for_permuted_copies_and_nan_for_one_seed():
    from shardlib.metrics import seed_stability

    rng = np.random.default_rng(0)
    D = rng.standard_normal((5, 12))
    assert np.isclose(seed_stability([D, -D[::-1], D[[2, 0, 1, 4, 3]]]), 1.0)  # sign and order do not matter
    assert np.isnan(seed_stability([D]))
    assert seed_stability([D, rng.standard_normal((5, 12))]) < 0.9


# alignment metrics pinned to constructed cases (scikit-learn's NMI/ARI definitions)


def test_a_perfect_signed_dictionary_is_pure_and_shuffled_labels_are_chance():
    from shardlib import metrics as M

    rng = np.random.default_rng(0)
    types = rng.integers(0, 4, 4000)
    codes = np.zeros((4000, 2))  # latent 0 fires +1 on type 0 and -1 on type 1: its sign separates them
    codes[types == 0, 0], codes[types == 1, 0] = 1.0, -1.0
    codes[types == 2, 1], codes[types == 3, 1] = 2.0, -0.5
    assert M.weighted_purity(codes, types) == 1.0
    assert M.nmi(codes, types) == pytest.approx(1.0) and M.ari(codes, types) == pytest.approx(1.0)
    assert all(v == 1.0 for v in M.best_signed_auroc(codes, types).values())
    shuffled = rng.permutation(types)
    assert M.nmi(codes, shuffled) < 0.01 and abs(M.ari(codes, shuffled)) < 0.01
    assert M.weighted_purity(codes, shuffled) == pytest.approx(0.25, abs=0.03)
    # |z| would merge each latent's two types: purity 0.5, the flaw the signed clusters fix
    assert M.weighted_purity(np.abs(codes), types) == pytest.approx(0.5, abs=0.03)


def test_purity_weights_by_firing_and_top_cluster_marks_silent_events():
    from shardlib import metrics as M

    types = np.array([0] * 99 + [1] + [1, 0])
    codes = np.zeros((102, 2))
    codes[:100, 0] = 1.0  # fires 100 times, 99 on type 0
    codes[100:, 1] = 1.0  # fires twice, half and half
    assert M.weighted_purity(codes, types) == pytest.approx((99 + 1) / 102)
    assert M.top_cluster(np.array([[0.0, 0.0], [0.0, -2.0], [0.5, 0.1]])).tolist() == [-1, 3, 0]


def test_types_matched_coherence_and_random_codes():
    from shardlib import metrics as M

    means = np.eye(3, 5)
    dirs = np.array([[1.0, 0.1, 0, 0, 0], [0, 0, 0, 1.0, 0]])
    assert M.types_matched(means, dirs) == 1
    coh = M.coherence(
        np.array([[1.0, 0], [2.0, 0], [1.0, 0], [-1.0, 0], [0.0, 0.0]]), np.array(["a", "a", "b", "b", "b"])
    )
    assert coh == {"a": 1.0, "b": 0.0}  # the zero update of b is left out
    c = M.random_codes(np.array([[3.0, -1.0, 0.5]]), np.eye(3), k=2)
    assert c.tolist() == [[3.0, -1.0, 0.0]]


def test_coherence_needs_two_events_and_random_codes_follow_the_sign_handling():
    from shardlib import metrics as M

    assert np.isnan(M.coherence(np.array([[1.0, 0.0]]), np.array(["a"]))["a"])
    c = M.random_codes(np.array([[3.0, -5.0, 0.5]]), np.eye(3), k=2, signed=False)
    assert c.tolist() == [[3.0, 0.0, 0.5]]  # rectified, as a ReLU SAE's codes


def test_row_norms_and_unit_rows():
    X = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    assert np.array_equal(metrics.row_norms(X), [5.0, 0.0, 1.0])
    assert np.allclose(metrics.unit_rows(X), [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]])  # a zero row stays zero


def test_the_rank_of_a_factored_update_from_its_factors_is_the_dense_matrixs():
    import torch

    from shardlib.factored import Factored
    from shardlib.metrics import factored_rank_ratio, rank_ratio

    g = torch.Generator().manual_seed(0)
    for m, true_rank in ((4, 4), (4, 2), (6, 0)):
        left, right = torch.randn(m, 30, generator=g), torch.randn(m, 20, generator=g)
        left[true_rank:] = 0  # factors beyond the rank are zero (a store pads events of lower rank so)
        dense = left.T @ right
        assert factored_rank_ratio(Factored(left[None], right[None]))[0] == rank_ratio(dense) == true_rank / 20
    left = torch.randn(3, 30, generator=g)
    right = torch.stack([torch.randn(20, generator=g)] * 3)  # three factor pairs, one right side: rank 1
    assert factored_rank_ratio(Factored(left[None], right[None]))[0] == rank_ratio(left.T @ right) == 1 / 20
