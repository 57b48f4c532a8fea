"""Factored matrix updates: ``U_e = sum_f left[e, f] (outer) right[e, f]``, and their algebra.

A linear layer's per-event weight gradient is ``sum_t delta_t x_t^T`` (one factor per token), so an event
update can be held as its factors, ``factors * (d_out + d_in)`` numbers instead of ``d_out * d_in``.
:class:`Factored` holds a batch of such events; the functions here pad, concatenate, select, compress
(:func:`best_rank`; dense matrices: :func:`randomized_rank`) and build (:func:`factorize`) them, and find (:func:`factor_pairs`) and densify
(:func:`densify`) a store's factored variables (the store format: :mod:`shardlib.store`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import xarray as xr

LEFT, RIGHT = "__left", "__right"


class Factored(NamedTuple):
    """A batch of factored matrix updates: ``U_e = sum_f left[e, f] (outer) right[e, f]``."""

    left: torch.Tensor
    """[events, factors, d_out]"""
    right: torch.Tensor
    """[events, factors, d_in]"""

    @property
    def n_events(self) -> int:
        return self.left.shape[0]

    @property
    def n_factors(self) -> int:
        return self.left.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of one event's matrix, ``(d_out, d_in)``."""
        return self.left.shape[2], self.right.shape[2]

    def dense(self) -> torch.Tensor:
        return torch.einsum("efo,efi->eoi", self.left, self.right)

    def take(self, idx) -> Factored:
        """The events ``idx`` selects (indices, a mask or a slice)."""
        return Factored(self.left[idx], self.right[idx])

    def to(self, *args, **kwargs) -> Factored:
        return Factored(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def scaled(self, c) -> Factored:
        """``c * U_e`` (``c`` a number or one per event)."""
        c = torch.as_tensor(c, dtype=self.left.dtype, device=self.left.device)
        return Factored(self.left * (c.view(-1, 1, 1) if c.ndim else c), self.right)

    def minus(self, other: Factored) -> Factored:
        """``U_e - V_e`` as one factored batch (the factors of both, ``other``'s left side negated)."""
        return Factored(torch.cat([self.left, -other.left], 1), torch.cat([self.right, other.right], 1))

    def detach(self) -> Factored:
        return Factored(self.left.detach(), self.right.detach())

    def sq_norms(self) -> torch.Tensor:
        """||U_e||_F^2 per event from the factors' Gram matrices, never forming U_e."""
        gl = self.left @ self.left.transpose(1, 2)
        gr = self.right @ self.right.transpose(1, 2)
        return (gl * gr).sum((1, 2))

    def event_sum(self) -> torch.Tensor:
        """``sum_e U_e``: one dense [d_out, d_in] matrix for the whole batch (one matmul over all factors)."""
        return self.left.reshape(-1, self.left.shape[2]).T @ self.right.reshape(-1, self.right.shape[2])


def pad_factors(f: Factored, m: int) -> Factored:
    """``f`` with its factor axis padded by zero rows to ``m`` factors (the same updates)."""
    pad = (0, 0, 0, m - f.n_factors)
    return Factored(torch.nn.functional.pad(f.left, pad), torch.nn.functional.pad(f.right, pad))


def cat_factored(parts: list[Factored]) -> Factored:
    """Concatenate batches of factored updates along ``event``, padding the factor axis with zero rows to
    the largest factor count."""
    m = max(f.n_factors for f in parts)
    padded = [pad_factors(f, m) for f in parts]
    return Factored(torch.cat([f.left for f in padded]), torch.cat([f.right for f in padded]))


def _tensors(v) -> tuple:
    return (v.left, v.right) if isinstance(v, Factored) else (v,)


def take(v, idx):
    """Events ``idx`` of a dense [event, ...] tensor or a Factored batch."""
    return v.take(idx) if isinstance(v, Factored) else v[idx]


def n_events(data: dict) -> int:
    """Number of events of a ``{name: tensor or Factored}`` batch."""
    v = next(iter(data.values()))
    return v.n_events if isinstance(v, Factored) else v.shape[0]


def _qr_core(f: Factored) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin QRs of both sides, ``left^T = Ql Rl`` and ``right^T = Qr Rr`` ([E, d, m] and [E, m, m]), and the
    small core ``Rl Rr^T``: ``U_e = Ql (Rl Rr^T) Qr^T``, so the core's singular values are ``U_e``'s."""
    Ql, Rl = torch.linalg.qr(f.left.transpose(1, 2))
    Qr, Rr = torch.linalg.qr(f.right.transpose(1, 2))
    return Ql, Qr, Rl @ Rr.transpose(1, 2)


def singular_values(f: Factored) -> torch.Tensor:
    """The singular values of every event's matrix [E, m] (descending), from the m x m core: never formed."""
    return torch.linalg.svdvals(_qr_core(f)[2])


def best_rank(f: Factored, rank: int) -> tuple[Factored, torch.Tensor]:
    """The best rank-``rank`` approximation of every event (Eckart-Young) and the kept fraction of ``||U_e||^2``
    (1 for an all-zero event): exactly ``rank`` factors per event (zero rows where an event's rank is lower),
    singular values split evenly (each factor pair has equal norms), ordered by singular value.

    From the factors' Gram matrices (``m x m`` for ``m`` factors), never a QR of the long sides: with
    ``Gl = left left^T``, ``Gr = right right^T`` and ``S = Gr^(1/2)``, the eigenpairs ``(mu_k, w_k)`` of
    ``S Gl S`` give ``U_e``'s singular values ``sqrt(mu_k)``, left vectors ``left^T S w_k / sqrt(mu_k)`` and
    right vectors ``right^T Gl S w_k / mu_k``; ``||U_e||^2 = <Gl, Gr>``. The small eigenproblems run in float64
    on Grams formed in the factors' dtype; directions with ``mu_k`` under ``50 eps`` of the largest (``eps`` of that
    dtype, at least 1e-10: float32's Grams carry noise eigenvalues of about 3e-8 of the largest) are rounding and
    are dropped, so an event of lower rank gets zero factors, not unbalanced noise pairs. About 0.6 times the
    time of thin QRs of both sides on SmolLM2's MLP matrices (57 factors of 576 and 1536, one thread)."""
    left, right = f.left, f.right
    Gl = (left @ left.transpose(1, 2)).double()
    Gr = (right @ right.transpose(1, 2)).double()
    lam, V = torch.linalg.eigh(Gr)
    S = (V * lam.clamp(min=0).sqrt()[:, None, :]) @ V.transpose(1, 2)
    mu, W = torch.linalg.eigh(S @ Gl @ S)  # ascending
    r = min(rank, mu.shape[1])
    mu, W = mu.flip(1)[:, :r].clamp(min=0), W.flip(2)[:, :, :r]
    live = mu > mu[:, :1] * max(1e-10, 50 * torch.finfo(left.dtype).eps)
    safe = torch.where(live, mu, torch.ones_like(mu))[:, None, :]
    SW = S @ W
    a = SW * safe**-0.25 * live[:, None, :]  # left_k = left^T S w_k mu_k^(-1/4): singular value split evenly
    b = (Gl @ SW) * safe**-0.75 * live[:, None, :]
    out_l = a.to(left.dtype).transpose(1, 2) @ left
    out_r = b.to(right.dtype).transpose(1, 2) @ right
    total = (Gl * Gr).sum((1, 2))
    kept = torch.where(total > 0, (mu * live).sum(1) / total.clamp(min=1e-300), torch.ones_like(total))
    pad = (0, 0, 0, rank - r)
    out = Factored(*(torch.nn.functional.pad(t, pad).contiguous() for t in (out_l, out_r)))
    return out, kept.to(left.dtype)


def randomized_rank(
    dense: torch.Tensor, rank: int, oversample: int = 16, power_iters: int = 2, seed: int = 0
) -> tuple[Factored, torch.Tensor]:
    """A rank-``rank`` factored approximation of dense matrices [E, d_out, d_in] and the kept fraction of each
    ``||U_e||^2``, by the randomized SVD of Halko, Martinsson & Tropp (2011, Algorithms 4.4 and 5.1):
    a Gaussian sketch of ``rank + oversample`` columns, ``power_iters`` re-orthonormalized power iterations,
    then the best rank-``rank`` part of the small projection ``Q^T U_e``. For updates that are not low rank
    (an Adam step's); singular values split evenly between the factors, as :func:`best_rank` does.

    The kept fraction is exact for the factors returned (it is the energy of a projection of ``U_e``) and at
    most the Eckart-Young optimum; the sketch comes from ``seed``, so the result is deterministic on one device.
    """
    E, d_out, d_in = dense.shape
    r = min(rank, d_out, d_in)
    width = min(r + oversample, d_out, d_in)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(d_in, width, generator=gen, dtype=dense.dtype).to(dense.device)
    Q = torch.linalg.qr(dense @ omega).Q  # [E, d_out, width]
    for _ in range(power_iters):
        Z = torch.linalg.qr(dense.transpose(1, 2) @ Q).Q
        Q = torch.linalg.qr(dense @ Z).Q
    B = Q.transpose(1, 2) @ dense  # [E, width, d_in]
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    s, root = s[:, :r], s[:, :r].sqrt()
    left = ((Q @ Ub[:, :, :r]) * root[:, None, :]).transpose(1, 2)
    right = Vh[:, :r, :] * root[:, :, None]
    total = dense.pow(2).sum((1, 2))
    kept = torch.where(total > 0, s.pow(2).sum(1) / total.clamp(min=torch.finfo(dense.dtype).tiny), 1.0).clamp(max=1)
    pad = (0, 0, 0, rank - r)
    out = Factored(*(torch.nn.functional.pad(t, pad).contiguous() for t in (left, right)))
    return out, kept


def factorize(delta: torch.Tensor, x: torch.Tensor, max_rank: int | None = None) -> tuple[Factored, torch.Tensor]:
    """Per-event factors of ``U_e = sum_t delta[e, t] x[e, t]^T`` (delta [E, T, d_out], x [E, T, d_in]).

    ``max_rank=None``: exact, one factor per token. Otherwise at most ``max_rank`` factors per event
    (:func:`best_rank`: the best rank-``max_rank`` approximation of U_e); returns the factors and the kept
    fraction of ||U_e||^2 per event (1 when exact or when the event's rank is within ``max_rank``).
    """
    delta, x = delta.float(), x.float()
    live = (delta.any(-1) & x.any(-1)).unsqueeze(-1)  # a token with zero delta (masked) or zero x adds nothing:
    delta, x = delta * live, x * live  # zero both sides, as padding rows are
    exact = Factored(delta, x)
    if max_rank is None or max_rank >= delta.shape[1]:
        return exact, torch.ones(delta.shape[0])
    return best_rank(exact, max_rank)


def factor_pairs(ds: xr.Dataset) -> dict[str, tuple[str, str]]:
    """``{var: (left var, right var)}`` of a store's factored matrix variables."""
    return {v[: -len(LEFT)]: (v, v[: -len(LEFT)] + RIGHT) for v in ds.data_vars if v.endswith(LEFT)}


def densify(ds: xr.Dataset, events=None) -> xr.Dataset:
    """The store (or the ``events`` it selects: a slice or indices) with every factored variable made
    dense: ``<var>`` with dims ``("event", "<var>_dim0", "<var>_dim1")``; dense variables and labels as
    they are."""
    if events is not None:
        ds = ds.isel(event=events)
    out = ds
    for var, (lv, rv) in factor_pairs(ds).items():
        U = np.einsum("efo,efi->eoi", np.asarray(ds[lv].values), np.asarray(ds[rv].values))
        out = out.drop_vars([lv, rv])
        out[var] = xr.Variable(("event", f"{var}_dim0", f"{var}_dim1"), U.astype(np.float32), dict(ds[lv].attrs))
        out = out.drop_dims(f"{var}_factor", errors="ignore")
    return out
