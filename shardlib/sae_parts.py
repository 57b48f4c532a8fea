"""The per-tensor parts a :class:`~shardlib.sae.ShardSAE` is made of, each kind written once.

Directions (the decoder's and the encoder's, one row per latent) of one tensor: :class:`LowRank`
(a weight matrix of a ``rank > 0`` SAE: factors ``U_i V_i^T``, never formed as matrices) or
:class:`Dense` (a vector, or any tensor of the dense baseline). The pre-encoder bias of one tensor:
:class:`LowRankBias` (``b_pre_rank > 0``: what factored inputs need) or :class:`DenseBias`. Every
part takes dense batches [N, *shape]; the low-rank ones also :class:`~shardlib.updates.Factored` ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .factored import Factored, best_rank


def factor_inner(x: Factored, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``<x_n, U_i V_i^T>`` [N, F] for a factored batch ``x`` and factors U [F, d_out, r], V [F, d_in, r]:
    ``sum_f sum_r (U_ir . L_nf)(V_ir . R_nf)``, cost N m F r (d_out + d_in); x is never formed."""
    F, d_out, r = U.shape
    A = U.permute(1, 0, 2).reshape(d_out, F * r)
    B = V.permute(1, 0, 2).reshape(V.shape[1], F * r)
    return ((x.left @ A) * (x.right @ B)).sum(1).view(x.n_events, F, r).sum(-1)


def factor_gram(U1: torch.Tensor, V1: torch.Tensor, U2: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """``<U1_i V1_i^T, U2_j V2_j^T>`` [F1, F2] = ``sum_{r,q} (U1_ir . U2_jq)(V1_ir . V2_jq)``: two matmuls of
    the stacked factors, cost F1 r F2 r (d_out + d_in); no matrix is formed."""
    (a, _, r), (b, _, q) = U1.shape, U2.shape

    def stacked(M):
        return M.transpose(1, 2).reshape(M.shape[0] * M.shape[2], M.shape[1])

    g = (stacked(U1) @ stacked(U2).T) * (stacked(V1) @ stacked(V2).T)
    return g.view(a, r, b, q).sum((1, 3))


def _divide_rows(p: torch.Tensor, div: torch.Tensor, idx: torch.Tensor | None, mirror: torch.Tensor | None) -> None:
    """``p /= div`` in place; with ``idx``, only those rows, their new values copied into ``mirror`` too."""
    if idx is None:
        p.div_(div)
        return
    sub = p[idx] / div[idx]
    p[idx] = sub
    if mirror is not None:
        mirror[idx] = sub


class LowRank(nn.Module):
    """F matrices ``U_i V_i^T`` [d_out, d_in] of one weight matrix, held as factors U [F, d_out, r], V [F, d_in, r]."""

    def __init__(self, n: int, shape: tuple[int, int], rank: int, g: torch.Generator):
        super().__init__()
        d_out, d_in = shape
        self.U = nn.Parameter(torch.randn(n, d_out, rank, generator=g) / math.sqrt(d_out))
        self.V = nn.Parameter(torch.randn(n, d_in, rank, generator=g) / math.sqrt(d_in))

    def widths(self) -> list[tuple[nn.Parameter, int]]:
        """Each parameter with the length of the vectors it holds (for the relative learning rate)."""
        return [(self.U, self.U.shape[1]), (self.V, self.V.shape[1])]

    def inner(self, x) -> torch.Tensor:
        """<x_n, U_i V_i^T> [N, F] for x dense [N, d_out, d_in] (one matmul ``x @ B`` for all matrices, then a
        batched dot with ``A``), or Factored (``sum_f sum_r (a_r . L_f)(b_r . R_f)``: x is never formed)."""
        if isinstance(x, Factored):
            return factor_inner(x, self.U, self.V)
        F, d_out, r = self.U.shape
        A = self.U.permute(1, 0, 2).reshape(d_out, F * r)
        B = self.V.permute(1, 0, 2).reshape(self.V.shape[1], F * r)
        return ((x @ B) * A).sum(1).view(-1, F, r).sum(-1)

    def sq_norms(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        """||U_i V_i^T||^2 [F] (or of ``latents`` only), from r x r Gram matrices."""
        U, V = (self.U, self.V) if latents is None else (self.U[latents], self.V[latents])
        return ((U.transpose(1, 2) @ U) * (V.transpose(1, 2) @ V)).sum((1, 2))

    def divide_(self, norms: torch.Tensor, idx=None, mirror: LowRank | None = None) -> None:
        """Divide matrix i by ``norms[i]`` (each factor by its square root); see :func:`_divide_rows`."""
        s = norms.sqrt()[:, None, None]
        _divide_rows(self.U, s, idx, None if mirror is None else mirror.U)
        _divide_rows(self.V, s, idx, None if mirror is None else mirror.V)

    def assign_(self, idx: torch.Tensor, d) -> None:
        """Set matrices ``idx`` to the best rank-r approximations of ``d`` (dense [len(idx), d_out, d_in]: truncated
        SVD, zero factors beyond its rank; Factored: a QR of both sides and an SVD of the small core)."""
        r = self.U.shape[-1]
        if isinstance(d, Factored):
            f, _ = best_rank(d.to(self.U), r)
            self.U[idx], self.V[idx] = f.left.transpose(1, 2), f.right.transpose(1, 2)
            return
        U, S, Vh = torch.linalg.svd(d.to(self.U), full_matrices=False)
        s = S[:, :r].sqrt()
        U_r, V_r = U[:, :, :r] * s[:, None, :], Vh[:, :r, :].transpose(1, 2) * s[:, None, :]
        pad = r - U_r.shape[-1]  # rank above min(shape): the extra factors are zero
        self.U[idx] = nn.functional.pad(U_r, (0, pad))
        self.V[idx] = nn.functional.pad(V_r, (0, pad))

    def decode(self, idx: torch.Tensor, vals: torch.Tensor, factored: bool):
        """``sum_j vals[n, j] M_idx[n, j]`` per event n, from the chosen matrices' factors only: Factored (their
        k r factors, scaled by ``vals``) or dense [N, d_out, d_in]."""
        U, V = self.U[idx], self.V[idx]  # [N, kk, d, r]
        N, kk, d_out, r = U.shape
        Uz = U * vals[..., None, None]
        if factored:
            return Factored(Uz.transpose(2, 3).reshape(N, kk * r, d_out), V.transpose(2, 3).reshape(N, kk * r, -1))
        return Uz.permute(0, 2, 1, 3).reshape(N, d_out, kk * r) @ V.permute(0, 1, 3, 2).reshape(N, kk * r, -1)

    def dense(self) -> torch.Tensor:
        """The matrices [F, d_out, d_in]."""
        return torch.einsum("for,fir->foi", self.U, self.V)


class Dense(nn.Module):
    """F dense tensors of one shape (a vector, or a matrix of a ``rank=0`` SAE), held flat: W [F, D]."""

    def __init__(self, n: int, shape: tuple, g: torch.Generator):
        super().__init__()
        self.shape = shape
        D = math.prod(shape)
        self.W = nn.Parameter(torch.randn(n, D, generator=g) / math.sqrt(D))

    def widths(self) -> list[tuple[nn.Parameter, int]]:
        return [(self.W, self.W.shape[1])]

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ self.W.T

    def sq_norms(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        # not (W**2).sum(1): its backward makes two passes over W (1.8 s against 1.0 s for 226M numbers)
        return torch.linalg.vector_norm(self.W if latents is None else self.W[latents], dim=1).square()

    def divide_(self, norms: torch.Tensor, idx=None, mirror: Dense | None = None) -> None:
        _divide_rows(self.W, norms[:, None], idx, None if mirror is None else mirror.W)

    def assign_(self, idx: torch.Tensor, d: torch.Tensor) -> None:
        self.W[idx] = d.to(self.W).reshape(len(idx), -1)

    def decode(self, idx: torch.Tensor, vals: torch.Tensor, factored: bool = False) -> torch.Tensor:
        # the sparse codes as a dense [N, F] matrix times W: gathering the active rows (W[idx], [N, kk, D]) held
        # N x kk rows of D numbers, 7 GB for AuxK's 128 rows of a 885k-parameter matrix at batches of 16
        codes = vals.new_zeros(idx.shape[0], self.W.shape[0]).scatter(1, idx, vals)
        return (codes @ self.W).view(idx.shape[0], *self.shape)

    def dense(self) -> torch.Tensor:
        return self.W.view(self.W.shape[0], *self.shape)


class LowRankBias(nn.Module):
    """A weight matrix's ``b_pre`` of rank r: ``U V^T`` (U [d_out, r] starts at 0 so that V gets a gradient;
    :meth:`init_` sets both), subtracted from and added to factored events as factors."""

    def __init__(self, shape: tuple[int, int], rank: int, g: torch.Generator):
        super().__init__()
        self.U = nn.Parameter(torch.zeros(shape[0], rank))
        self.V = nn.Parameter(torch.randn(shape[1], rank, generator=g) / math.sqrt(shape[1]))

    def widths(self) -> list[tuple[nn.Parameter, int]]:
        return [(self.U, self.U.shape[0]), (self.V, self.V.shape[0])]

    def value(self) -> torch.Tensor:
        return self.U @ self.V.T

    def factored(self, n: int) -> Factored:
        """The bias as ``n`` identical factored events."""
        return Factored(self.U.T.expand(n, *self.U.T.shape), self.V.T.expand(n, *self.V.T.shape))

    def subtract_from(self, v):
        return v.minus(self.factored(v.n_events)) if isinstance(v, Factored) else v - self.value()

    def add_to(self, v):
        if isinstance(v, Factored):
            b = self.factored(v.n_events)
            return Factored(torch.cat([b.left, v.left], 1), torch.cat([b.right, v.right], 1))
        return v + self.value()

    @torch.no_grad()
    def init_(self, m: torch.Tensor) -> None:
        """Start at the best rank-r approximation of ``m``."""
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        r = min(self.U.shape[1], len(S))
        s = S[:r].sqrt()
        self.U.zero_()[:, :r] = (U[:, :r] * s).float()
        if s.sum() > 0:
            self.V.zero_()[:, :r] = (Vh[:r].T * s).float()


class DenseBias(nn.Module):
    """A tensor's dense ``b_pre``."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(shape))

    def widths(self) -> list[tuple[nn.Parameter, int]]:
        return [(self.b, self.b.numel())]

    def value(self) -> torch.Tensor:
        return self.b

    def subtract_from(self, v: torch.Tensor) -> torch.Tensor:
        return v - self.b

    def add_to(self, v: torch.Tensor) -> torch.Tensor:
        return v + self.b

    @torch.no_grad()
    def init_(self, m: torch.Tensor) -> None:
        self.b.copy_(m.float())
