"""What shards mean: their alignment with event types, beside baselines.

Alignment (``ALIGNMENT_METRICS``; NMI and ARI are scikit-learn's): purity of (latent, sign) clusters, NMI and
ARI between each event's top (latent, sign) and its type, best-cluster AUROC per type, Hungarian matching of
directions to the type-mean updates, and types matched at |cos| > 0.9. Every score stands beside
``BASELINES``: chance (shuffled labels; random dictionaries of the SAE's structure over ``RANDOM_SEEDS``
seeds) and dictionaries fitted to the same events (k-means, PCA, drawn events, and the type means as the
ceiling), each encoded as the SAE encodes. Clustering is the natural competitor: where every event
reinforces one computation an SAE with k = 1 *is* a clustering (Coates & Ng 2011 found k-means
dictionaries competitive with sparse coding), so an SAE shows its worth only by beating these.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .metrics import hungarian_mcc, row_norms, unit_rows


def type_means(updates: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, list[str]]:
    types = np.asarray(types)
    names = [str(t) for t in np.unique(types)]
    return np.stack([updates[types == t].mean(0) for t in np.unique(types)]), names


def random_dictionary(shapes: dict[str, tuple], n: int, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` random unit directions with the SAE's structure (rank-r per matrix; dense if rank = 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in shapes.items():
        if rank > 0 and len(s) == 2:
            out[name] = torch.einsum(
                "for,fir->foi", torch.randn(n, s[0], rank, generator=g), torch.randn(n, s[1], rank, generator=g)
            )
        else:
            out[name] = torch.randn(n, *s, generator=g)
    norm = sum((v.reshape(n, -1) ** 2).sum(1) for v in out.values()).sqrt()
    return {k: v / norm.view(-1, *([1] * (v.ndim - 1))) for k, v in out.items()}


ALIGNMENT_METRICS = {
    "purity": "firing-weighted purity of (latent, sign) clusters: share of firings on their cluster's majority type",
    "nmi": "normalized mutual information between each event's top (latent, sign) and its type (scikit-learn)",
    "ari": "adjusted Rand index between each event's top (latent, sign) and its type (scikit-learn; chance = 0)",
    "auroc": "mean over types of the best (latent, sign) cluster's AUROC, its rectified activation as the score",
    "type_match": "Hungarian mean |cos| between type-mean updates and dictionary directions",
    "types_matched": "types whose mean update has a dictionary direction at |cos| > 0.9",
}

BASELINES = {
    "shuffled": "the SAE's codes with the event types permuted across events (chance for these codes)",
    "kmeans": "k-means (scikit-learn, K = the SAE's latents, 3 starts) fitted to the SAE's input, centred; its "
    "centroids as a dictionary, encoded as the SAE encodes (each event's top-k signed projections)",
    "pca": "the SAE's input's top principal directions (as many as latents), encoded as the SAE encodes",
    "events": "as many nonzero events drawn from the store as latents, as a dictionary, encoded as the SAE encodes",
    "oracle": "the type-mean updates themselves as the dictionary, encoded as the SAE encodes: the ceiling for the "
    "direction matches (1 by construction), not for the clustering scores (a top-k projection is not the best "
    "assignment to types)",
    "random": "random dictionaries of the SAE's structure (rank-r per matrix), encoded as the SAE encodes: mean "
    "over RANDOM_SEEDS seeds (``_random_std``: their spread)",
}
RANDOM_SEEDS = 5
FITTED = ("kmeans", "pca", "events", "oracle")


def span_coordinates(X: np.ndarray, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(Q, X @ Q): an orthonormal basis Q [D, r] of the span of the rows of X [N, D] (r <= N, their rank) and each
    row's coordinates in it, where that is cheaper for fitting ``n`` centroids or components; else (None, X).
    Every mean, centroid and principal direction of the rows lies in their span and distances there are the
    rows' own, so k-means and PCA fitted to the coordinates, mapped back by Q, are the fits to X (to rounding).
    The basis comes from the Gram matrix X X^T = U L U^T (Q = X^T U L^-1/2, coordinates U L^1/2; directions of
    eigenvalue below 1e-12 of the largest, rounding or repeated rows, are left out): two N^2 D products, which
    pay when the rows are few against their dimension and the fits (one Lloyd pass is N D n): used for
    N <= 4 n and N < D (SmolLM2: 88 nonzero events of 885k parameters, 64 latents; not the small LM's 3312)."""
    if X.shape[0] >= X.shape[1] or X.shape[0] > 4 * n:
        return None, X
    lam, U = np.linalg.eigh(X @ X.T)
    keep = lam > 1e-12 * max(lam[-1], 0.0)
    lam, U = lam[keep][::-1], U[:, keep][:, ::-1]  # largest first
    return (X.T @ U) / np.sqrt(lam), U * np.sqrt(lam)


def fitted_dictionaries(
    X: np.ndarray, types: np.ndarray, n: int, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The dictionaries fitted to the same events as the SAE (``BASELINES``: kmeans, pca, events, oracle), each as
    (encoder, directions), unit rows [n_directions, D]: the encoder acts on the centred input (the SAE subtracts
    its b_pre, so its codes see centred events), the directions are compared with the type-mean updates (a
    k-means centroid is a mean of events, as a type mean is)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(0)
    Q, C = span_coordinates(X, n)  # k-means and PCA see only distances and variances inside the events' span
    C_mu = C.mean(0)
    km = KMeans(n_clusters=min(n, len(X)), n_init=3, random_state=seed).fit(C - C_mu).cluster_centers_
    km = km @ Q.T + mu if Q is not None else km + mu
    n_pca = min(n, *X.shape)
    if Q is not None and C.shape[1] >= n_pca:
        pca = PCA(n_components=n_pca, random_state=seed).fit(C).components_ @ Q.T
    else:  # no basis, or one narrower than the components asked (events that repeat: their span has fewer dimensions)
        pca = PCA(n_components=n_pca, random_state=seed).fit(X).components_
    nonzero = np.flatnonzero(row_norms(X) > 0)
    drawn = X[np.random.default_rng(seed).choice(nonzero, min(n, len(nonzero)), replace=False)]
    means = type_means(X, types)[0]
    return {
        name: (unit_rows(v - mu), unit_rows(v)) if name != "pca" else (unit_rows(v), unit_rows(v))
        for name, v in (("kmeans", km), ("pca", pca), ("events", drawn), ("oracle", means))
    }


CACHE_MAX_BYTES = 256 << 20


def cached_fits(cache: dict | None, X: np.ndarray, types, n: int, seed: int) -> dict:
    """:func:`fitted_dictionaries`, read from ``cache`` when the same events (their bytes), types, size and seed
    were fitted before, and kept there (read-only) when the dictionaries would take at most ``CACHE_MAX_BYTES``
    (the default study's settings comparison refits the shard stage's own updates at its seed; SmolLM2's
    one-matrix dictionaries, 453 MB each, are neither hashed nor kept)."""
    if cache is None or 8 * n * X.shape[1] * 8 > CACHE_MAX_BYTES:  # 4 dictionaries x (encoder, directions), float64
        return fitted_dictionaries(X, types, n, seed)
    key = (
        hashlib.sha256(np.ascontiguousarray(X)).hexdigest(),  # the buffer itself, not a copy of its bytes
        hashlib.sha256(repr(np.asarray(types).tolist()).encode()).hexdigest(),
        X.shape,
        str(X.dtype),
        n,
        seed,
    )
    if key not in cache:
        cache[key] = fitted_dictionaries(X, types, n, seed)
        for pair in cache[key].values():  # shared by every caller: read-only
            for a in pair:
                a.flags.writeable = False
    return cache[key]


def _clustering_scores(codes: np.ndarray, types: np.ndarray) -> dict[str, float]:
    from . import metrics as M

    return {
        "purity": M.weighted_purity(codes, types),
        "nmi": M.nmi(codes, types),
        "ari": M.ari(codes, types),
        "auroc": float(np.nanmean(list(M.best_signed_auroc(codes, types).values()))),
    }


def _dictionary_scores(codes, types, means, D) -> dict[str, float]:
    from . import metrics as M

    return {
        **_clustering_scores(codes, types),
        "type_match": hungarian_mcc(means, D),
        "types_matched": M.types_matched(means, D),
    }


def alignment(
    codes: np.ndarray,
    types: np.ndarray,
    updates: np.ndarray,
    directions: np.ndarray,
    random_dirs: list[np.ndarray],
    k: int,
    seed: int = 0,
    signed: bool = True,
    cache: dict | None = None,
) -> dict[str, float]:
    """Every ``ALIGNMENT_METRICS`` entry for the SAE (its ``codes`` and ``directions``), and the same entry for
    every ``BASELINES`` dictionary as ``<metric>_<baseline>`` (``random_dirs``: one random dictionary per seed,
    scored as their mean with ``<metric>_random_std``), and ``n_types``. Every fixed dictionary encodes the
    centred ``updates`` with the SAE's k and sign handling; type matches compare with the type-mean updates.
    ``cache``: a dict kept by a caller that aligns several SAEs: the fitted dictionaries of the same updates, types,
    size and seed are fitted once (:func:`cached_fits`)."""
    from . import metrics as M

    X = np.asarray(updates, dtype=np.float64)
    Xc = X - X.mean(0)
    # every score reads the directions in float64: converted once here, not by each (on SmolLM2's one matrix a
    # dictionary is 64 x 885k numbers, and the scores of one alignment converted them about 20 times)
    directions = np.asarray(directions, dtype=np.float64)
    shuffled = np.random.default_rng(seed).permutation(types)
    means, means_s = type_means(X, types)[0], type_means(X, shuffled)[0]
    out = _dictionary_scores(codes, types, means, directions)
    for name, v in _dictionary_scores(codes, shuffled, means_s, directions).items():
        out[f"{name}_shuffled"] = v
    for base, (E, D) in cached_fits(cache, X, types, len(directions), seed).items():
        for name, v in _dictionary_scores(M.random_codes(Xc, E, k, signed), types, means, D).items():
            out[f"{name}_{base}"] = v
    random64 = (np.asarray(R, dtype=np.float64) for R in random_dirs)  # each converted once, one at a time
    rand = [_dictionary_scores(M.random_codes(Xc, R, k, signed), types, means, R) for R in random64]
    for name in rand[0]:
        vals = np.array([r[name] for r in rand], dtype=float)
        out[f"{name}_random"], out[f"{name}_random_std"] = float(np.nanmean(vals)), float(np.nanstd(vals))
    out["n_types"] = len(means)
    return out


def random_dictionaries(shapes: dict[str, tuple], names: list[str], n: int, rank: int, seed: int) -> list[np.ndarray]:
    """``RANDOM_SEEDS`` flattened :func:`random_dictionary` draws (seeds derived from ``seed``)."""
    from .common import flatten

    return [flatten(random_dictionary(shapes, n, rank, 1000 * seed + 7 + j), names) for j in range(RANDOM_SEEDS)]
