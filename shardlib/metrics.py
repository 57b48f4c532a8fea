"""Metrics with reference definitions (the papers each section names).

Reconstruction (Gao et al. 2024; SAELens' corrected definition)
    FVU = sum_b ||x_b - xhat_b||^2 / sum_b ||x_b - xbar||^2, from sufficient statistics
    accumulated over the whole evaluation set (never a mean of per-sample ratios).
Ground-truth recovery (G: ground-truth directions, D: decoder directions, C = |cos|)
    MMCS(G->D) = mean_j max_i C_ij; MMCS(D->G) = mean_i max_j C_ij;
    R@t = fraction of G with a match >= t, with uniqueness = distinct best matches / |G|;
    Hungarian MCC = mean |cos| of the one-to-one matching (scipy linear_sum_assignment).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .factored import Factored, singular_values


def sq_terms(v, h) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(||v - h||^2, ||v||^2, ||h||^2)`` per event [N], float64, for one tensor's batch ``v`` and its
    reconstruction ``h``: from Gram matrices of the factors when both are
    :class:`~shardlib.factored.Factored` (one of them factored alone is made dense)."""
    if isinstance(v, Factored) != isinstance(h, Factored):
        v, h = (t.dense() if isinstance(t, Factored) else t for t in (v, h))
    if isinstance(v, Factored):
        v64, h64 = v.to(torch.float64), h.to(torch.float64)
        return v64.minus(h64).sq_norms(), v64.sq_norms(), h64.sq_norms()
    v64, h64 = v.double().reshape(len(v), -1), h.double().reshape(len(h), -1)
    return ((v64 - h64) ** 2).sum(1), (v64**2).sum(1), (h64**2).sum(1)


@dataclass
class ReconStats:
    """Sufficient statistics for FVU, L0, dead/dense fractions and shrinkage (plain and norm-weighted)."""

    n: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    sum_x: dict = field(default_factory=dict)
    l0_sum: float = 0.0
    fires: torch.Tensor | None = None
    shrink_sum: float = 0.0
    n_nonzero: int = 0
    norm_sum: float = 0.0
    norm_hat_sum: float = 0.0

    def update(self, x: dict, xhat: dict, z: torch.Tensor) -> None:
        """Add a batch: ``x`` and ``xhat`` per tensor, dense [N, *shape] or both
        :class:`~shardlib.factored.Factored` (then every norm comes from Gram matrices of the factors, in
        float64, and the running sum for the mean is one dense matrix per tensor)."""
        self.update_terms(x, {k: sq_terms(v, xhat[k]) for k, v in x.items()}, z)

    def update_terms(self, x: dict, terms: dict, z: torch.Tensor) -> None:
        """Add a batch from its per-event terms: ``terms[name]`` = (squared error, ``||x||^2``, ``||xhat||^2``),
        each [N] in float64 (:meth:`~shardlib.sae.ShardSAE.recon_terms`), and ``x`` for the running sum."""
        n = z.shape[0]
        xs = torch.zeros(n, dtype=torch.float64)
        hs = torch.zeros(n, dtype=torch.float64)
        for k, (sse, x_sq, h_sq) in terms.items():
            v = x[k]
            self.sse += float(sse.sum())
            if isinstance(v, Factored):
                self.sum_x[k] = self.sum_x.get(k, 0) + v.to(torch.float64).event_sum().reshape(-1).cpu()
            else:
                self.sum_x[k] = self.sum_x.get(k, 0) + v.double().reshape(n, -1).sum(0).cpu()
            x_sq, h_sq = x_sq.cpu(), h_sq.cpu()
            self.sum_sq += float(x_sq.sum())
            xs += x_sq
            hs += h_sq
        active = z != 0
        self.l0_sum += float(active.sum())
        f = active.sum(0).double().cpu()
        self.fires = f if self.fires is None else self.fires + f
        nz = xs > 0  # shrinkage is undefined for an all-zero update
        self.shrink_sum += float((hs[nz].sqrt() / xs[nz].sqrt()).sum())
        self.norm_sum += float(xs.sqrt().sum())
        self.norm_hat_sum += float(hs.sqrt().sum())
        self.n_nonzero += int(nz.sum())
        self.n += n

    def result(self) -> dict[str, float]:
        mean_sq = sum(float((s / self.n) @ (s / self.n)) for s in self.sum_x.values())
        denom = self.sum_sq - self.n * mean_sq
        freq = self.fires / self.n
        return {
            "fvu": self.sse / denom if denom > 0 else float("nan"),
            "l0": self.l0_sum / self.n,
            "dead_fraction": float((freq == 0).double().mean()),
            "dense_fraction": float((freq > 0.1).double().mean()),
            "shrinkage": self.shrink_sum / self.n_nonzero if self.n_nonzero else float("nan"),
            # E[||xhat||] / E[||x||]: each update weighted by its norm, so tiny updates cannot dominate
            "shrinkage_weighted": self.norm_hat_sum / self.norm_sum if self.norm_sum > 0 else float("nan"),
        }


def fvu(x: np.ndarray, xhat: np.ndarray) -> float:
    """FVU of flattened samples [n, d] (reference definition, for tests and small data)."""
    x, xhat = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(xhat, np.float64).reshape(len(x), -1)
    return float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def abs_cos(G: np.ndarray, D: np.ndarray) -> np.ndarray:
    """|cos| between rows of G [g, d] and rows of D [f, d]: matrix [g, f]."""
    G = np.asarray(G, np.float64).reshape(len(G), -1)
    D = np.asarray(D, np.float64).reshape(len(D), -1)
    # the products first, then the norms (normalised copies of [64, 885k] rows cost more than the products)
    return np.abs(G @ D.T) / np.outer(row_norms(G).clip(1e-30), row_norms(D).clip(1e-30))


def mmcs(G, D) -> tuple[float, float]:
    """(MMCS(G->D) recovery, MMCS(D->G) which penalizes junk latents)."""
    C = abs_cos(G, D)
    return float(C.max(1).mean()), float(C.max(0).mean())


def recall_at(G, D, t: float = 0.9) -> tuple[float, float]:
    """(fraction of ground truth matched at |cos| >= t, uniqueness of best matches)."""
    C = abs_cos(G, D)
    best = C.argmax(1)
    return float((C.max(1) >= t).mean()), len(set(best.tolist())) / len(C)


def hungarian_mcc(G, D) -> float:
    """Mean |cos| of the optimal one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    C = abs_cos(G, D)
    r, c = linear_sum_assignment(-C)
    return float(C[r, c].sum() / len(G))


def seed_stability(dictionaries: list) -> float:
    """Mean Hungarian |cos| over every pair of dictionaries [F, D] (SAEs of several seeds on the same data);
    NaN with fewer than two."""
    pairs = [(a, b) for i, a in enumerate(dictionaries) for b in dictionaries[i + 1 :]]
    return float(np.mean([hungarian_mcc(a, b) for a, b in pairs])) if pairs else float("nan")


def recovery(G, D, t: float = 0.9) -> dict[str, float]:
    g2d, d2g = mmcs(G, D)
    r, uniq = recall_at(G, D, t)
    return {"mmcs_g2d": g2d, "mmcs_d2g": d2g, f"r@{t}": r, "uniqueness": uniq, "hungarian_mcc": hungarian_mcc(G, D)}


# ---------------------------------------------------------------------------
# update sparsity (Mukherjee et al. 2025, arXiv 2505.11711, and its critiques)

TAUS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)


def unchanged_fraction(delta: torch.Tensor, taus=TAUS) -> np.ndarray:
    """Fraction of entries with |delta| <= tau, per tau (tau = 0: exact fp32 zeros)."""
    a = delta.detach().abs().float().reshape(-1)
    return np.array([float((a <= t).float().mean()) for t in taus])


def bf16_unchanged(before: torch.Tensor, after: torch.Tensor, tol: float = 0.0) -> float:
    """Fraction of entries whose bf16 value is unchanged (Mukherjee et al.: tol = 1e-5 on bf16 checkpoints)."""
    d = (after.detach().bfloat16().float() - before.detach().bfloat16().float()).abs()
    return float((d <= tol).float().mean())


def rank_ratio(delta: torch.Tensor) -> float:
    """matrix_rank(delta) / min(shape) (NaN for non-matrices; 0 for an all-zero delta).

    The rank tolerance is float32's (``max(shape) * eps_fp32 * sigma_max``): updates are fp32,
    and a double-precision tolerance would count fp32 rounding noise as rank.
    """
    if delta.ndim != 2:
        return float("nan")
    return float(torch.linalg.matrix_rank(delta.float())) / min(delta.shape)


def factored_rank_ratio(f: Factored) -> np.ndarray:
    """:func:`rank_ratio` of every event of a factored batch [E], from its factors
    (:func:`~shardlib.factored.singular_values`, in float64) with the same float32 tolerance, without forming or
    decomposing any d_out x d_in matrix (a full SVD per event: 40 of the SmolLM2 sparsity stage's 97 s)."""
    d_out, d_in = f.shape
    s = singular_values(f.to(torch.float64))
    tol = max(d_out, d_in) * torch.finfo(torch.float32).eps * s[:, :1]
    return (s > tol).sum(1).numpy() / min(d_out, d_in)


def touched(delta: torch.Tensor) -> tuple[float, float]:
    """(fraction of rows, fraction of columns) with any nonzero entry (NaN for non-matrices)."""
    if delta.ndim != 2:
        return float("nan"), float("nan")
    nz = delta != 0
    return float(nz.any(1).float().mean()), float(nz.any(0).float().mean())


# ---------------------------------------------------------------------------
# alignment of shards with event types. A signed latent is two clusters:
# (latent, +) and (latent, -); its sign separates what it fires on.


def sign_split(codes: np.ndarray) -> np.ndarray:
    """[N, 2F] nonnegative: column i = max(z_i, 0) (cluster (i, +)), column F + i = max(-z_i, 0) (cluster (i, -))."""
    z = np.asarray(codes, dtype=np.float64)
    return np.concatenate([np.maximum(z, 0), np.maximum(-z, 0)], 1)


def top_cluster(codes: np.ndarray) -> np.ndarray:
    """Each event's strongest (latent, sign) cluster, as an index into :func:`sign_split`'s columns; -1 when none fires."""
    s = sign_split(codes)
    top = s.argmax(1)
    return np.where(s.max(1) > 0, top, -1)


def weighted_purity(codes: np.ndarray, types: np.ndarray) -> float:
    """Firing-weighted purity over (latent, sign) clusters: the share of all firings that fall on their
    cluster's majority event type (a latent firing 3,000 times weighs 3,000 times one firing once)."""
    fires = sign_split(codes) > 0
    types = np.asarray(types)
    majority = total = 0
    for j in range(fires.shape[1]):
        t = types[fires[:, j]]
        if len(t):
            majority += np.unique(t, return_counts=True)[1].max()
            total += len(t)
    return float(majority / total) if total else float("nan")


def nmi(codes: np.ndarray, types: np.ndarray) -> float:
    """Normalized mutual information (scikit-learn's, arithmetic mean) between each event's top (latent, sign)
    cluster and its event type; 1 = the clusters are the types, about 0 = independent."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(types).astype(str), top_cluster(codes)))


def ari(codes: np.ndarray, types: np.ndarray) -> float:
    """Adjusted Rand index (scikit-learn's) between each event's top (latent, sign) cluster and its type;
    chance-corrected: 0 in expectation for random clusters, 1 for identical partitions."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(types).astype(str), top_cluster(codes)))


def _auroc_from_ranks(ranks: np.ndarray, label: np.ndarray):
    """Mann-Whitney AUROC of every column of ``ranks`` (the scores' ranks, ties averaged) for ``label``."""
    n_pos, n_neg = label.sum(), (~label).sum()
    if n_pos == 0 or n_neg == 0:
        return np.full(ranks.shape[1:], np.nan)
    return (ranks[label].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties averaged)."""
    from scipy.stats import rankdata

    return float(_auroc_from_ranks(rankdata(np.asarray(score))[:, None], np.asarray(label, bool))[0])


def best_signed_auroc(codes: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """For each event type, the best (latent, sign) cluster's AUROC, scored by that cluster's activation
    (``max(z, 0)`` for (latent, +), ``max(-z, 0)`` for (latent, -)): how well one cluster's firing
    picks out the type. (A type marked only by a latent *not* firing scores 0.5 here.)"""
    from scipy.stats import rankdata

    s = sign_split(codes)
    types = np.asarray(types)
    ranks = np.apply_along_axis(rankdata, 0, s)  # once per column, shared by every type
    return {str(t): float(_auroc_from_ranks(ranks, types == t).max()) for t in np.unique(types)}


def types_matched(type_means: np.ndarray, directions: np.ndarray, t: float = 0.9) -> int:
    """How many type-mean updates have a dictionary direction within |cos| > ``t``."""
    if len(type_means) == 0 or len(directions) == 0:
        return 0
    return int((abs_cos(type_means, directions).max(1) > t).sum())


def _per_type_of_unit_updates(updates: np.ndarray, types: np.ndarray, score) -> dict[str, float]:
    """``score(unit updates of one type)`` per event type, zero updates left out, NaN below 2 events."""
    X = np.asarray(updates, dtype=np.float64).reshape(len(updates), -1)
    n = row_norms(X)
    keep = n > 0
    U = X[keep] / n[keep, None]
    types = np.asarray(types)[keep]
    return {str(t): float(score(U[types == t])) if (types == t).sum() >= 2 else float("nan") for t in np.unique(types)}


def coherence(updates: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """Per event type: the norm of the mean of its unit-normalised updates (1 = all parallel, one computation).
    For n unrelated directions it is about 1/sqrt(n), so small types read high: NaN below 2 events,
    and read it beside the type's count. Zero updates are left out."""
    return _per_type_of_unit_updates(updates, types, lambda u: np.linalg.norm(u.mean(0)))


def _top_singular_share(u: np.ndarray) -> float:
    s = np.linalg.svd(u @ u.T, compute_uv=False, hermitian=True)  # eigenvalues of the Gram = s^2
    return s[0] / s.sum()


def coherence_rank1(updates: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """Per event type, a sign-free coherence: the share of its unit-normalised updates' energy on their top
    singular direction (1 = every event on one axis, whatever its sign; a type whose events are + and - of
    one computation reads 1 here and near 0 in :func:`coherence`). For n unrelated directions in many
    dimensions it is about 1/n. NaN below 2 events; zero updates are left out."""
    return _per_type_of_unit_updates(updates, types, _top_singular_share)


def unit_rows(D: np.ndarray) -> np.ndarray:
    """Rows of ``D`` scaled to unit norm (zero rows stay zero)."""
    D = np.asarray(D, dtype=np.float64)
    n = row_norms(D)[:, None]
    return D / np.where(n > 0, n, 1.0)


def row_norms(X: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row of a 2-D array (one pass, no squared copy: np.linalg.norm(axis=1) took 1.2 s on a
    [64, 885k] float64 array on one CPU thread, this 0.03 s)."""
    return np.sqrt(np.einsum("ij,ij->i", X, X))


def topk_codes(proj: np.ndarray, k: int, signed: bool = True) -> np.ndarray:
    """Keep each row's ``k`` entries of largest |value| (``signed``), or of largest positive value (a ReLU
    TopK), zeroing the rest: the SAE's TopK applied to a fixed dictionary's projections."""
    proj = np.asarray(proj, dtype=np.float64)
    if not signed:
        proj = np.maximum(proj, 0)
    k = max(1, min(k, proj.shape[1]))
    idx = np.argsort(-np.abs(proj), axis=1, kind="stable")[:, :k]
    out = np.zeros_like(proj)
    np.put_along_axis(out, idx, np.take_along_axis(proj, idx, 1), 1)
    return out


def random_codes(updates: np.ndarray, directions: np.ndarray, k: int, signed: bool = True) -> np.ndarray:
    """Codes a fixed dictionary gives: each event's top-k projections onto ``directions`` [F, D], signed
    (as a signed SAE) or rectified (``signed=False``, as a ReLU SAE). With random directions it is the chance
    baseline of the clustering metrics; with k-means centroids, principal directions, drawn events or type
    means it is that dictionary encoded as the SAE encodes (same size, k and sign handling)."""
    X = np.asarray(updates, dtype=np.float64).reshape(len(updates), -1)
    return topk_codes(X @ np.asarray(directions, dtype=np.float64).T, k, signed)
