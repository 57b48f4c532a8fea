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


class Centered(Factored):
    """Factored events ``x_n`` less one factored matrix ``b`` shared by all (an SAE's ``b_pre``): as a
    :class:`Factored` batch, each event's factors followed by ``b``'s (left side negated); :func:`factor_inner`
    takes ``x``'s factors per event and ``b``'s once, where the batch's rows repeat ``b`` for every event (at rank
    4, half the rows of a centred SmolLM2 event) and the data's rows need no gradient."""

    def __new__(cls, x: Factored, b: Factored):
        n = x.n_events
        left = torch.cat([x.left, -b.left.expand(n, *b.left.shape[1:])], 1)
        self = super().__new__(cls, left, torch.cat([x.right, b.right.expand(n, *b.right.shape[1:])], 1))
        self.x, self.b = x, b  # b: one event
        return self

    def to(self, *args, **kwargs) -> Centered:
        return Centered(self.x.to(*args, **kwargs), self.b.to(*args, **kwargs))

    def detach(self) -> Centered:
        return Centered(self.x.detach(), self.b.detach())


def factor_inner(x: Factored, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``<x_n, U_i V_i^T>`` [N, F] for a factored batch ``x`` and factors U [F, r, d_out], V [F, r, d_in]:
    ``sum_f sum_r (U_ir . L_nf)(V_ir . R_nf)``, cost N m F r (d_out + d_in); x is never formed. The factors'
    rows stack as [F r, d] without a copy (the layout [F, d, r] copied all of them twice a call: 19 s of a
    rank-4 fit over SmolLM2's 90 MLP matrices). A :class:`Centered` batch: ``<x_n, M_i> - <b, M_i>``."""
    if isinstance(x, Centered):
        return factor_inner(x.x, U, V) - factor_inner(x.b, U, V)
    F, r, d_out = U.shape
    A, B = U.reshape(F * r, d_out), V.reshape(F * r, V.shape[2])
    return ((x.left @ A.T) * (x.right @ B.T)).sum(1).view(x.n_events, F, r).sum(-1)


def factor_gram(U1: torch.Tensor, V1: torch.Tensor, U2: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """``<U1_i V1_i^T, U2_j V2_j^T>`` [F1, F2] = ``sum_{r,q} (U1_ir . U2_jq)(V1_ir . V2_jq)`` (factors [F, r, d]):
    two matmuls of the stacked factors, cost F1 r F2 r (d_out + d_in); no matrix is formed."""
    (a, r, _), (b, q, _) = U1.shape, U2.shape

    def stacked(M):
        return M.reshape(M.shape[0] * M.shape[1], M.shape[2])

    if U1 is U2 and V1 is V2:  # the Gram matrix of one set: its backward in one matmul per side, not two
        g = _SelfGram.apply(stacked(U1)) * _SelfGram.apply(stacked(V1))
    else:
        g = (stacked(U1) @ stacked(U2).T) * (stacked(V1) @ stacked(V2).T)
    return g.view(a, r, b, q).sum((1, 3))


class _SelfGram(torch.autograd.Function):
    """``S S^T`` whose backward is ``(G + G^T) S``: one matmul, where autograd's ``S @ S.T`` takes two (one per
    operand), the most expensive of a rank-4 step over SmolLM2's MLP matrices (all 1024 stacked factors of a
    matrix against each other)."""

    @staticmethod
    def forward(ctx, S):
        ctx.save_for_backward(S)
        return S @ S.T

    @staticmethod
    def backward(ctx, G):
        (S,) = ctx.saved_tensors
        return (G + G.T) @ S


def top_svd(m: torch.Tensor, r: int, oversample: int = 10, power_iters: int = 4):
    """The leading ``r`` singular triplets (U [d_out, r], S [r], Vh [r, d_in]) of the matrix ``m`` by a randomized
    SVD (Halko, Martinsson and Tropp 2011, algorithms 4.4 and 5.1: a Gaussian test matrix from a generator of its
    own, so the global random stream is untouched, ``power_iters`` subspace iterations, then the SVD of an
    (r + oversample) x d_in matrix): about 1000x fewer operations than the full SVD of an MLP matrix of SmolLM2
    (90 of them took 16 s at the start of every fit on its MLP matrices). Exact to rounding where ``m``'s rank is
    at most ``r + oversample``; otherwise close to the best rank-r approximation, the closer the faster ``m``'s
    singular values fall (its error bounds: Halko et al. section 10). Small matrices take the full SVD."""
    q = min(r + oversample, *m.shape)
    if q == min(m.shape):
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    g = torch.Generator(device=m.device).manual_seed(0)
    Q = torch.linalg.qr(m @ torch.randn(m.shape[1], q, generator=g, device=m.device, dtype=m.dtype)).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(m @ torch.linalg.qr(m.T @ Q).Q).Q
    u, S, Vh = torch.linalg.svd(Q.T @ m, full_matrices=False)
    return (Q @ u)[:, :r], S[:r], Vh[:r]


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
    """F matrices ``U_i V_i^T`` [d_out, d_in] of one weight matrix, held as factors U [F, r, d_out], V [F, r, d_in]
    (``U[i, j]`` is latent i's j-th left factor: a latent's factors, and all latents' factors stacked as [F r, d],
    are views, never copies)."""

    def __init__(self, n: int, shape: tuple[int, int], rank: int, g: torch.Generator):
        super().__init__()
        d_out, d_in = shape
        # drawn as [F, d, r] (the draws of the layout before) and stored as [F, r, d]
        U = torch.randn(n, d_out, rank, generator=g) / math.sqrt(d_out)
        V = torch.randn(n, d_in, rank, generator=g) / math.sqrt(d_in)
        self.U = nn.Parameter(U.transpose(1, 2).contiguous())
        self.V = nn.Parameter(V.transpose(1, 2).contiguous())

    def widths(self) -> list[tuple[nn.Parameter, int]]:
        """Each parameter with the length of the vectors it holds (for the relative learning rate)."""
        return [(self.U, self.U.shape[2]), (self.V, self.V.shape[2])]

    def inner(self, x) -> torch.Tensor:
        """<x_n, U_i V_i^T> [N, F] for x dense [N, d_out, d_in] (one matmul ``x @ B`` for all matrices, then a
        batched dot with ``A``), or Factored (``sum_f sum_r (a_r . L_f)(b_r . R_f)``: x is never formed)."""
        if isinstance(x, Factored):
            return factor_inner(x, self.U, self.V)
        F, r, d_out = self.U.shape
        A, B = self.U.reshape(F * r, d_out), self.V.reshape(F * r, self.V.shape[2])
        return ((x @ B.T) * A.T).sum(1).view(-1, F, r).sum(-1)

    def sq_norms(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        """||U_i V_i^T||^2 [F] (or of ``latents`` only), from r x r Gram matrices."""
        U, V = (self.U, self.V) if latents is None else (self.U[latents], self.V[latents])
        return ((U @ U.transpose(1, 2)) * (V @ V.transpose(1, 2))).sum((1, 2))

    def divide_(self, norms: torch.Tensor, idx=None, mirror: LowRank | None = None) -> None:
        """Divide matrix i by ``norms[i]`` (each factor by its square root); see :func:`_divide_rows`."""
        s = norms.sqrt()[:, None, None]
        _divide_rows(self.U, s, idx, None if mirror is None else mirror.U)
        _divide_rows(self.V, s, idx, None if mirror is None else mirror.V)

    def assign_(self, idx: torch.Tensor, d) -> None:
        """Set matrices ``idx`` to the best rank-r approximations of ``d`` (dense [len(idx), d_out, d_in]: truncated
        SVD, zero factors beyond its rank; Factored: :func:`~shardlib.factored.best_rank`, from the factors' Gram
        matrices)."""
        r = self.U.shape[1]
        if isinstance(d, Factored):
            f, _ = best_rank(d.to(self.U), r)
            self.U[idx], self.V[idx] = f.left, f.right
            return
        U, S, Vh = torch.linalg.svd(d.to(self.U), full_matrices=False)
        s = S[:, :r].sqrt()
        U_r, V_r = U[:, :, :r].transpose(1, 2) * s[:, :, None], Vh[:, :r, :] * s[:, :, None]
        pad = r - U_r.shape[1]  # rank above min(shape): the extra factors are zero
        self.U[idx] = nn.functional.pad(U_r, (0, 0, 0, pad))
        self.V[idx] = nn.functional.pad(V_r, (0, 0, 0, pad))

    def decode(self, idx: torch.Tensor, vals: torch.Tensor, factored: bool):
        """``sum_j vals[n, j] M_idx[n, j]`` per event n, from the chosen matrices' factors only: Factored (their
        k r factors, scaled by ``vals``) or dense [N, d_out, d_in]."""
        U, V = self.U[idx], self.V[idx]  # [N, kk, r, d]
        N, kk, r, d_out = U.shape
        Uz = (U * vals[..., None, None]).reshape(N, kk * r, d_out)
        if factored:
            return Factored(Uz, V.reshape(N, kk * r, -1))
        return Uz.transpose(1, 2) @ V.reshape(N, kk * r, -1)

    def dense(self) -> torch.Tensor:
        """The matrices [F, d_out, d_in]."""
        return torch.einsum("fro,fri->foi", self.U, self.V)


def grad_buffer(W: torch.Tensor) -> torch.Tensor:
    """``W.grad``, created as zeros where there is none: what the functions below add their weight gradients into.

    The dense parts of at least ``BLOCKED`` numbers (SmolLM2's dense reference: 256 x 885k per side) write their
    weight gradients into ``W.grad`` in place from the backward, as ``.backward()`` would accumulate them, instead
    of returning them (so ``torch.autograd.grad`` does not see them): a returned gradient is a fresh 906 MB tensor
    every step, which the system maps page by page (0.4 s of a 0.7 s product on one thread), and the trainer keeps
    these gradients between steps, zeroed rather than freed (:func:`zero_grads`)."""
    if W.grad is None:
        W.grad = torch.zeros_like(W)
    return W.grad


def zero_grads(module: nn.Module) -> None:
    """Clear the gradients of ``module``'s parameters for the next step: zero the large ones :func:`grad_buffer`
    writes (kept, not freed: every step gives them a gradient), drop the others (``set_to_none``, as Adam expects
    of a parameter the step left without one)."""
    for prm in module.parameters():
        if prm.grad is not None and prm.numel() >= BLOCKED:
            prm.grad.zero_()
        else:
            prm.grad = None


def _add_outer(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block: int = 2048) -> None:
    """``out += a^T b`` [F, D] for a [N, F] and b [N, D] with few rows N (a weight gradient over a batch), in blocks
    of ``block`` columns: MKL's single product of SmolLM2's dense reference (F 256, D 885k, N 16) took 1.2 s on one
    thread, the blocks 0.3 s into memory already mapped."""
    aT = a.T.contiguous()
    for s in range(0, b.shape[1], block):
        out[:, s : s + block].addmm_(aT, b[:, s : s + block])


class _RowSqNorms(torch.autograd.Function):
    """``||W_i||^2`` for the rows ``latents`` of W [F, D]; the backward adds ``2 g_i W_i`` to those rows of
    ``W.grad`` (:func:`grad_buffer`) in one pass. Autograd's ``W[latents]`` copied the rows, and its backward
    zero-filled a full-size gradient to scatter into."""

    @staticmethod
    def forward(ctx, W, latents):
        ctx.save_for_backward(W, latents)
        ctx.weight = W
        return torch.linalg.vector_norm(W, dim=1)[latents].square()

    @staticmethod
    def backward(ctx, g):
        W, latents = ctx.saved_tensors
        coef = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).index_add_(0, latents, 2 * g.to(W.dtype))
        grad_buffer(ctx.weight).addcmul_(W, coef[:, None])
        return None, None


class _Product(torch.autograd.Function):
    """``a W^T`` (``transposed``: encoder scores of inputs a [N, D]) or ``a W`` (a decoding of codes a [N, F]) for
    W [F, D]; the backward adds W's gradient into ``W.grad`` (:func:`grad_buffer`, :func:`_add_outer`)."""

    @staticmethod
    def forward(ctx, a, W, transposed: bool):
        ctx.save_for_backward(a, W)
        ctx.weight, ctx.transposed = W, transposed
        return a @ W.T if transposed else a @ W

    @staticmethod
    def backward(ctx, g):
        a, W = ctx.saved_tensors
        if ctx.transposed:  # y = a W^T: dW = g^T a, da = g W
            _add_outer(grad_buffer(ctx.weight), g, a)
            return (g @ W if ctx.needs_input_grad[0] else None), None, None
        _add_outer(grad_buffer(ctx.weight), a, g)  # y = a W: dW = a^T g, da = g W^T
        return (g @ W.T if ctx.needs_input_grad[0] else None), None, None


CENTERED = 1 << 16  # factored matrices of at least this many numbers are centred as Centered batches
BLOCKED = 1 << 24  # Dense parts of at least this many numbers take _Product and _RowSqNorms


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
        x = x.reshape(x.shape[0], -1)
        return _Product.apply(x, self.W, True) if self.W.numel() >= BLOCKED else x @ self.W.T

    def sq_norms(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        # not (W**2).sum(1): its backward makes two passes over W (1.8 s against 1.0 s for 226M numbers)
        if latents is None or self.W.numel() < BLOCKED:
            return torch.linalg.vector_norm(self.W if latents is None else self.W[latents], dim=1).square()
        return _RowSqNorms.apply(self.W, latents)

    def divide_(self, norms: torch.Tensor, idx=None, mirror: Dense | None = None) -> None:
        _divide_rows(self.W, norms[:, None], idx, None if mirror is None else mirror.W)

    def assign_(self, idx: torch.Tensor, d: torch.Tensor) -> None:
        self.W[idx] = d.to(self.W).reshape(len(idx), -1)

    def decode(self, idx: torch.Tensor, vals: torch.Tensor, factored: bool = False) -> torch.Tensor:
        # the sparse codes as a dense [N, F] matrix times W: gathering the active rows (W[idx], [N, kk, D]) held
        # N x kk rows of D numbers, 7 GB for AuxK's 128 rows of a 885k-parameter matrix at batches of 16
        codes = vals.new_zeros(idx.shape[0], self.W.shape[0]).scatter(1, idx, vals)
        out = _Product.apply(codes, self.W, False) if self.W.numel() >= BLOCKED else codes @ self.W
        return out.view(idx.shape[0], *self.shape)

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
        if not isinstance(v, Factored):
            return v - self.value()
        # small matrices: one product over every row costs less than two (the default study's planted stage, one run
        # each: 138 s before Centered, 146 s with it for every matrix, 131 s with this threshold)
        return Centered(v, self.factored(1)) if math.prod(v.shape) >= CENTERED else v.minus(self.factored(v.n_events))

    def add_to(self, v):
        if isinstance(v, Factored):
            b = self.factored(v.n_events)
            return Factored(torch.cat([b.left, v.left], 1), torch.cat([b.right, v.right], 1))
        return v + self.value()

    @torch.no_grad()
    def init_(self, m: torch.Tensor) -> None:
        """Start at (nearly) the best rank-r approximation of ``m`` (:func:`top_svd`)."""
        U, S, Vh = top_svd(m, self.U.shape[1])
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
