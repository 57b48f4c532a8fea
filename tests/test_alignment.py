import numpy as np
import pytest
import torch

from shardlib import alignment


def test_alignment_separates_structure_from_baselines():
    rng = np.random.default_rng(1)
    T, D = 3, 40
    means = rng.normal(size=(T, D))
    types = rng.integers(0, T, 900)
    updates = means[types] + 0.05 * rng.normal(size=(900, D))
    codes = np.eye(T)[types] * 2.0
    dirs = means / np.linalg.norm(means, axis=1, keepdims=True)
    rand = [rng.normal(size=(T, D)) for _ in range(5)]
    a = alignment.alignment(codes, types, updates, dirs, rand, k=1)
    assert (
        a["purity"] == 1.0 and a["auroc"] == 1.0 and a["nmi"] == pytest.approx(1.0) and a["ari"] == pytest.approx(1.0)
    )
    assert a["type_match"] > 0.99 and a["types_matched"] == a["n_types"] == 3
    assert a["auroc_shuffled"] < 0.6 and abs(a["ari_shuffled"]) < 0.02 and a["nmi_shuffled"] < 0.02
    assert a["type_match_random"] < 0.6 and a["types_matched_random"] == 0 and a["purity_shuffled"] < 0.5
    assert a["ari_random"] < a["ari"]  # random projections find some of the clusters the data has, not all
    assert a["ari_random_std"] > 0  # five random dictionaries: a spread, not one draw
    # well-separated clusters, one computation per event: the fitted baselines find them as well as the SAE
    assert a["types_matched_oracle"] == 3 and a["type_match_oracle"] == pytest.approx(1.0)
    assert a["nmi_kmeans"] > 0.95 and a["types_matched_kmeans"] == 3
    assert a["types_matched_events"] <= 3 and 0 <= a["nmi_pca"] <= 1


def test_random_dictionary_has_the_sae_structure():
    d = alignment.random_dictionary({"w": (6, 5), "b": (6,)}, 4, rank=1)
    norm = torch.sqrt((d["w"] ** 2).sum((1, 2)) + (d["b"] ** 2).sum(1))
    assert torch.allclose(norm, torch.ones(4))
    assert all(torch.linalg.matrix_rank(d["w"][i]) == 1 for i in range(4))


def test_fits_in_the_span_equal_the_fits_to_the_events():
    # fewer events than dimensions: k-means and PCA run on span coordinates; they must be the fits to the events
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    types = np.repeat(np.arange(4), 10)
    X = 3 * rng.normal(size=(4, 500))[types] + rng.normal(size=(40, 500))
    Q, C = alignment.span_coordinates(X, 10)
    assert Q.shape == (500, 40) and np.allclose(C @ Q.T, X) and np.allclose(Q.T @ Q, np.eye(40))
    got = alignment.fitted_dictionaries(X, types, 10, seed=0)
    mu = X.mean(0)
    km = KMeans(n_clusters=10, n_init=3, random_state=0).fit(X - mu).cluster_centers_ + mu
    pca = PCA(n_components=10, svd_solver="full").fit(X).components_
    for name, want in (("kmeans", km), ("pca", pca)):
        D = got[name][1]
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
        cos = np.abs(D @ want.T)
        assert np.allclose(np.sort(cos.max(1)), 1, atol=1e-6), name  # the same directions, up to order and sign
    assert alignment.span_coordinates(X[:, :30], 6)[0] is None  # more events than dimensions: fitted as they are
    assert alignment.span_coordinates(X, 8)[0] is None  # many events per centroid: the basis costs more than it saves


def test_repeated_events_narrow_the_span_and_pca_still_gives_as_many_components_as_asked():
    # GRPO's identical completions give identical events: the span has fewer dimensions than events, and PCA,
    # asked for as many components as events, is fitted to the events themselves (as without the span)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 300))
    X[10:] = X[:10]
    Q, C = alignment.span_coordinates(X, 20)
    assert Q.shape == (300, 10) and np.allclose(C @ Q.T, X)
    with pytest.warns(Warning, match="distinct clusters"):  # k-means on 10 distinct points, 20 clusters asked
        got = alignment.fitted_dictionaries(X, np.arange(20) % 4, 20, seed=0)
    assert got["pca"][1].shape == (20, 300) and got["kmeans"][1].shape == (20, 300)


def test_cached_fits_fit_the_same_events_once_and_keep_only_small_dictionaries(monkeypatch):
    """The same events, types, size and seed are fitted once; another seed or other events fit again; dictionaries
    over CACHE_MAX_BYTES are returned without being kept. The alignment's scores are the same with the cache."""
    rng = np.random.default_rng(0)
    X, types = rng.normal(size=(40, 12)), np.repeat(["a", "b"], 20)
    calls = []
    real = alignment.fitted_dictionaries
    monkeypatch.setattr(alignment, "fitted_dictionaries", lambda *a: calls.append(a[2:]) or real(*a))
    cache = {}
    first = alignment.cached_fits(cache, X, types, 4, 0)
    again = alignment.cached_fits(cache, X.copy(), types.copy(), 4, 0)
    assert len(calls) == 1 and again is first
    alignment.cached_fits(cache, X, types, 4, 1)
    alignment.cached_fits(cache, X + 1, types, 4, 0)
    alignment.cached_fits(cache, X, types[::-1], 4, 0)
    assert len(calls) == 4 and len(cache) == 4
    monkeypatch.setattr(alignment, "CACHE_MAX_BYTES", 0)
    alignment.cached_fits(cache, X, types, 3, 0)
    alignment.cached_fits(cache, X, types, 3, 0)
    assert len(calls) == 6 and len(cache) == 4
    D = alignment.unit_rows(rng.normal(size=(4, 12)))
    codes = X @ D.T
    R = [alignment.unit_rows(rng.normal(size=(4, 12)))]
    plain = alignment.alignment(codes, types, X, D, R, k=2)
    cached = alignment.alignment(codes, types, X, D, R, k=2, cache={})
    assert plain.keys() == cached.keys()
    assert all(np.isclose(plain[m], cached[m], equal_nan=True) for m in plain)
