"""Shards: a TopK sparse autoencoder on parameter updates, low-rank per weight matrix (L3D-style).

Data point: one update ``x`` = a set of tensors (the selected parameters). Latent ``i``
owns, per weight matrix (d_out x d_in), decoder factors ``U_i`` (d_out x r) and ``V_i``
(d_in x r), so its direction there is ``U_i V_i^T``; vectors (biases, norms) and
``rank=0`` (the dense baseline) use plain dense factors. Encoder factors have the same
shapes (untied; initialized from the decoder).

- scores ``a = <x - b_pre, E_i> + b_enc``, with ``<G, A B^T> = sum_r a_r^T G b_r``: one
  matmul ``G @ B`` for all latents, then a batched dot with ``A``; no d_out x d_in matrix
  per latent is ever formed;
- activation: TopK (``z = ReLU(TopK_k(a))``, Gao et al. 2024), BatchTopK (top k*B over the
  batch; a threshold at inference, Bussmann et al. 2024), and ``signed`` (TopK on |a|,
  sign kept, as L3D: a parameter direction has no preferred sign);
- reconstruction ``xhat = b_pre + sum_i z_i D_i`` from the *active* latents' factors only
  (per sample, cost N k d_out d_in r);
- decoder directions have unit norm over the whole parameter-space direction (the norm
  is divided out in the forward pass, and the factors are rescaled after each step);
- AuxK loss for dead latents (no bias in the auxiliary reconstruction; dead = not fired
  within ``dead_window`` samples), ``L = L_rec + aux_coef * L_aux``;
- ``b_pre`` initialized from the data mean; inputs divided by one scale factor (saved
  with the model) so that the mean squared norm is 1. With ``b_pre_rank = r > 0`` a matrix's
  ``b_pre`` is itself rank r (factors P [d_out, r], Q [d_in, r]; started at the best rank-r
  approximation of the mean), which is what factored inputs need.

Factored inputs (:class:`~shardlib.factored.Factored`: ``U_e = sum_f L_f R_f^T``, m factors) of a
low-rank tensor are never made dense: the centred input is the factored ``U_e / scale - P Q^T``
(m + r factors), its scores are ``sum_f sum_r (a_r^T L_f)(b_r^T R_f)`` (cost m (d_out + d_in) per
latent and rank instead of d_out d_in), and the reconstruction ``sum_i z_i U_i V_i^T`` is itself
factored (k r factors), so the squared error of an event is the sum of the Hadamard product of the
two Gram matrices of the residual's factors: the event's own Gram terms, the cross terms with the
active latents' factors and the latent-latent terms, (m + r + k r)^2 (d_out + d_in) in all. A dense
(``rank=0``) SAE makes factored inputs dense, batch by batch.

Saved as ``sae.safetensors`` + ``cfg.json`` (sparsify style).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .factored import Factored, best_rank

Tensors = dict[str, "torch.Tensor | Factored"]
"""One batch of updates per tensor: dense [N, *shape], or :class:`~shardlib.factored.Factored` for matrices."""


def dense(v) -> torch.Tensor:
    """A dense [N, *shape] tensor (a Factored batch made dense)."""
    return v.dense() if isinstance(v, Factored) else v


def difference(a, b):
    """``a - b`` per event; factored when both are (the factors of both), dense otherwise."""
    if isinstance(a, Factored) and isinstance(b, Factored):
        return a.minus(b)
    return dense(a) - dense(b)


def sq_norms(v) -> torch.Tensor:
    """||v_e||^2 per event [N]: from Gram matrices of the factors when ``v`` is Factored."""
    return v.sq_norms() if isinstance(v, Factored) else (v.reshape(v.shape[0], -1) ** 2).sum(1)


def centered_sq_sum(v) -> torch.Tensor:
    """sum_e ||v_e - mean_e v||^2 over the batch; for a Factored batch sum_e ||v_e||^2 - N ||mean||^2 with the
    mean one dense matrix for the whole batch (float64 for the subtraction)."""
    if isinstance(v, Factored):
        return sq_norms(v).double().sum() - (v.event_sum().double() ** 2).sum() / v.n_events
    return ((v - v.mean(0)) ** 2).sum()


class ForwardOutput(NamedTuple):
    """What :meth:`ShardSAE.forward` returns; every tensor is in normalized units (input / ``scale``)."""

    xhat: Tensors
    """Reconstruction per tensor, ``b_pre`` included: ``b_pre + sum_i z_i D_i`` (Factored for factored inputs)."""

    codes: torch.Tensor
    """Sparse codes z [N, F]: the activation of ``pre_acts`` (zero outside the active latents)."""

    pre_acts: torch.Tensor
    """Encoder scores a [N, F] = <x - b_pre, E_i> + b_enc, before the activation."""

    centered: Tensors
    """The input minus ``b_pre``, per tensor (what the latents reconstruct; Factored for factored inputs)."""


class LossOutput(NamedTuple):
    """What :func:`sae_loss` returns: the training loss and its parts (scalars), and the forward pass."""

    loss: torch.Tensor
    """``rec + aux_coef * aux``: what the optimizer minimizes."""

    rec: torch.Tensor
    """Reconstruction error of the batch over the data's total variance (a batch FVU estimate)."""

    aux: torch.Tensor
    """AuxK loss of the dead latents (zero when none is dead or ``aux_coef`` is 0)."""

    out: ForwardOutput
    """The forward pass the losses were computed from."""


class ShardSAE(nn.Module):
    def __init__(
        self,
        shapes: dict[str, tuple],
        n_latents: int,
        k: int,
        rank: int = 1,
        activation: str = "topk",
        signed: bool = False,
        seed: int = 0,
        encoder_bias: bool = False,
        b_pre_rank: int = 0,
    ):
        super().__init__()
        if b_pre_rank < 0:
            raise ValueError(f"b_pre_rank must be >= 0 (0 = dense), got {b_pre_rank}")
        if activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation must be 'topk' or 'batchtopk', got {activation!r}")
        if not 1 <= k <= n_latents:
            raise ValueError(f"k={k} must be between 1 and n_latents={n_latents}")
        self.names = list(shapes)
        self.shapes = {n: tuple(int(s) for s in shapes[n]) for n in self.names}
        self.n_latents, self.k, self.rank, self.activation, self.signed = n_latents, k, rank, activation, signed
        self.encoder_bias, self.b_pre_rank = encoder_bias, b_pre_rank
        g = torch.Generator().manual_seed(seed)
        F = n_latents
        self.dec = nn.ParameterDict()
        self.enc = nn.ParameterDict()
        self.b_pre = nn.ParameterDict()
        for j, n in enumerate(self.names):
            shape = self.shapes[n]
            if self.lowrank(n):
                d_out, d_in = shape
                self.dec[f"{j}_U"] = nn.Parameter(torch.randn(F, d_out, rank, generator=g) / math.sqrt(d_out))
                self.dec[f"{j}_V"] = nn.Parameter(torch.randn(F, d_in, rank, generator=g) / math.sqrt(d_in))
            else:
                D = math.prod(shape)
                self.dec[f"{j}_W"] = nn.Parameter(torch.randn(F, D, generator=g) / math.sqrt(D))
            if self.lowrank_bias(n):  # P Q^T: P starts at 0, so that Q gets a gradient (init_from_data sets both)
                self.b_pre[f"{j}_U"] = nn.Parameter(torch.zeros(shape[0], b_pre_rank))
                self.b_pre[f"{j}_V"] = nn.Parameter(
                    torch.randn(shape[1], b_pre_rank, generator=g) / math.sqrt(shape[1])
                )
            else:
                self.b_pre[str(j)] = nn.Parameter(torch.zeros(shape))
        if encoder_bias:
            self.b_enc = nn.Parameter(torch.zeros(F))
        else:  # fixed at zero (a buffer, so that saved SAEs keep one layout)
            self.register_buffer("b_enc", torch.zeros(F))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(0.0))  # BatchTopK inference threshold
        self.normalize_decoder_()
        for key, p in self.dec.items():
            self.enc[key] = nn.Parameter(p.detach().clone())

    # -- structure ---------------------------------------------------------
    def lowrank(self, name: str) -> bool:
        return self.rank > 0 and len(self.shapes[name]) == 2

    def lowrank_bias(self, name: str) -> bool:
        return self.b_pre_rank > 0 and len(self.shapes[name]) == 2

    def bias(self, j: int) -> torch.Tensor:
        """The dense ``b_pre`` of tensor ``j`` (``P Q^T`` for a low-rank one)."""
        if self.lowrank_bias(self.names[j]):
            return self.b_pre[f"{j}_U"] @ self.b_pre[f"{j}_V"].T
        return self.b_pre[str(j)]

    def bias_factored(self, j: int, n: int) -> Factored:
        """The low-rank ``b_pre`` of matrix ``j`` as ``n`` identical factored events."""
        P, Q = self.b_pre[f"{j}_U"], self.b_pre[f"{j}_V"]
        return Factored(P.T.expand(n, *P.T.shape), Q.T.expand(n, *Q.T.shape))

    def config(self) -> dict:
        return {
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "n_latents": self.n_latents,
            "k": self.k,
            "rank": self.rank,
            "activation": self.activation,
            "signed": self.signed,
            "encoder_bias": self.encoder_bias,
            "b_pre_rank": self.b_pre_rank,
        }

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, lr: float, relative: bool = True) -> list[dict]:
        """Adam parameter groups. With ``relative``, each tensor's learning rate is ``lr`` divided by
        the square root of the length of the vectors it holds (a decoder factor of a d x d' matrix:
        d; a dense direction: its size; b_pre: its tensor's size), so that one Adam step moves every
        factor by about the same fraction ``lr`` of its norm whatever the widths. A single absolute
        rate moves a 24,704-dim dense direction by half its norm per step and a 128-dim factor by 3%."""
        groups = {}
        for key, prm in self.named_parameters():
            if not relative or key == "b_enc":  # a score: one number per latent
                d = 1
            elif key.startswith("b_pre."):  # a dense bias: its size; a low-rank one's factor: its width
                d = prm.shape[0] if key.endswith(("_U", "_V")) else prm.numel()
            else:
                d = prm.shape[1]
            groups.setdefault(d, []).append(prm)
        return [{"params": ps, "lr": lr / math.sqrt(d)} for d, ps in sorted(groups.items())]

    # -- inner products with a set of factors ------------------------------
    def _inner(self, y: Tensors, factors: nn.ParameterDict) -> torch.Tensor:
        """<y_n, F_i> summed over tensors, for every sample n and latent i: [N, F]."""
        out = 0.0
        F = self.n_latents
        for j, n in enumerate(self.names):
            x = y[n]
            N = x.n_events if isinstance(x, Factored) else x.shape[0]
            if self.lowrank(n) and isinstance(x, Factored):  # sum_f sum_r (a_r . L_f)(b_r . R_f)
                A, B = factors[f"{j}_U"], factors[f"{j}_V"]
                r = A.shape[-1]
                N = x.n_events
                LA = x.left @ A.permute(1, 0, 2).reshape(A.shape[1], F * r)  # [N, m, F r]
                RB = x.right @ B.permute(1, 0, 2).reshape(B.shape[1], F * r)
                out = out + (LA * RB).sum(1).view(N, F, r).sum(-1)
            elif self.lowrank(n):
                A, B = factors[f"{j}_U"], factors[f"{j}_V"]
                r = A.shape[-1]
                xB = x @ B.permute(1, 0, 2).reshape(B.shape[1], F * r)  # [N, d_out, F r]
                s = (xB * A.permute(1, 0, 2).reshape(A.shape[1], F * r)).sum(1)
                out = out + s.view(N, F, r).sum(-1)
            else:
                out = out + x.reshape(N, -1) @ factors[f"{j}_W"].T
        return out

    def decoder_norms(self) -> torch.Tensor:
        """||D_i|| over all tensors together, from r x r Gram matrices: [F]."""
        sq = 0.0
        for j, n in enumerate(self.names):
            if self.lowrank(n):
                U, V = self.dec[f"{j}_U"], self.dec[f"{j}_V"]
                sq = sq + ((U.transpose(1, 2) @ U) * (V.transpose(1, 2) @ V)).sum((1, 2))
            else:
                sq = sq + (self.dec[f"{j}_W"] ** 2).sum(1)
        return sq.clamp(min=1e-30).sqrt()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder factors so every direction has unit norm (U, V each by norm^-1/2)."""
        norms = self.decoder_norms()
        for j, n in enumerate(self.names):
            if self.lowrank(n):
                self.dec[f"{j}_U"].div_(norms.sqrt()[:, None, None])
                self.dec[f"{j}_V"].div_(norms.sqrt()[:, None, None])
            else:
                self.dec[f"{j}_W"].div_(norms[:, None])

    @torch.no_grad()
    def set_directions_(self, directions: Tensors, latents=None) -> None:
        """Start decoder and encoder at given directions {name: [F, *shape]} (then unit norm).

        ``latents`` (indices) sets only those latents, ``directions`` then holding one row each.
        Low-rank tensors take each direction's best rank-``rank`` approximation (truncated
        SVD; for Factored directions a QR of both sides and an SVD of the small core); used to
        start an SAE at known ground truth, and to restart dead latents.
        """
        idx = torch.arange(self.n_latents) if latents is None else torch.as_tensor(latents).cpu()
        norms = None
        for j, n in enumerate(self.names):
            d = directions[n]
            ref = self.dec[f"{j}_U" if self.lowrank(n) else f"{j}_W"]
            if isinstance(d, Factored) and self.lowrank(n):  # best rank-r part without forming the matrix
                if (d.n_events, *d.shape) != (len(idx), *self.shapes[n]):
                    raise ValueError(
                        f"directions[{n!r}] holds {d.n_events} factored {d.shape} matrices; expected "
                        f"{(len(idx), *self.shapes[n])}"
                    )
                f, _ = best_rank(d.to(ref), self.rank)
                self.dec[f"{j}_U"][idx.to(ref.device)] = f.left.transpose(1, 2)
                self.dec[f"{j}_V"][idx.to(ref.device)] = f.right.transpose(1, 2)
                continue
            d = dense(d).to(ref)
            if tuple(d.shape) != (len(idx), *self.shapes[n]):
                raise ValueError(
                    f"directions[{n!r}] has shape {tuple(d.shape)}; expected {(len(idx), *self.shapes[n])}"
                )
            if self.lowrank(n):
                U, S, Vh = torch.linalg.svd(d, full_matrices=False)
                r = self.rank
                s = S[:, :r].sqrt()
                U_r, V_r = U[:, :, :r] * s[:, None, :], Vh[:, :r, :].transpose(1, 2) * s[:, None, :]
                pad = r - U_r.shape[-1]  # rank above min(shape): the extra factors are zero
                self.dec[f"{j}_U"][idx.to(d.device)] = torch.nn.functional.pad(U_r, (0, pad))
                self.dec[f"{j}_V"][idx.to(d.device)] = torch.nn.functional.pad(V_r, (0, pad))
            else:
                self.dec[f"{j}_W"][idx.to(d.device)] = d.reshape(len(idx), -1)
        norms = self.decoder_norms()
        for key, p in self.dec.items():
            dev = p.device
            sub = p[idx.to(dev)]
            if key.endswith("_U") or key.endswith("_V"):
                sub = sub / norms[idx.to(dev)].sqrt()[:, None, None]
            else:
                sub = sub / norms[idx.to(dev)][:, None]
            p[idx.to(dev)] = sub
            self.enc[key][idx.to(dev)] = sub

    # -- forward -----------------------------------------------------------
    def scaled_input(self, x: Tensors) -> Tensors:
        """The input divided by ``scale``: Factored where the tensor is a low-rank matrix given factored
        (a dense SAE or a vector takes it dense)."""
        out = {}
        for n in self.names:
            v = x[n]
            if isinstance(v, Factored) and self.lowrank(n):
                out[n] = v.scaled(1 / self.scale)
            else:
                out[n] = dense(v) / self.scale
        return out

    def center(self, x: Tensors) -> Tensors:
        out = {}
        for j, (n, v) in enumerate(self.scaled_input(x).items()):
            if isinstance(v, Factored):
                if not self.lowrank_bias(n):
                    raise ValueError(
                        f"tensor {n!r} comes factored, but this SAE's b_pre is dense (b_pre_rank=0): subtracting a "
                        "dense b_pre would form the matrix of every event. Build the SAE with b_pre_rank > 0"
                    )
                out[n] = v.minus(self.bias_factored(j, v.n_events))
            else:
                out[n] = v - self.bias(j)
        return out

    def pre_acts(self, y: Tensors) -> torch.Tensor:
        return self._inner(y, self.enc) + self.b_enc

    def activate(self, a: torch.Tensor) -> torch.Tensor:
        """Sparse codes z [N, F] (zeros off the active set)."""
        mag = a.abs() if self.signed else a
        if self.activation == "batchtopk" and not self.training:
            keep = mag > self.threshold
        elif self.activation == "batchtopk":
            flat = mag.reshape(-1)
            kk = min(flat.numel(), self.k * a.shape[0])
            idx = flat.topk(kk).indices
            keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, idx, True).view_as(a)
            with torch.no_grad():  # running mean of the smallest kept positive magnitude
                kept = mag[keep & (mag > 0)]
                if kept.numel():
                    m = kept.min()
                    self.threshold.copy_(m if self.threshold == 0 else 0.99 * self.threshold + 0.01 * m)
        else:
            idx = mag.topk(self.k, dim=1).indices
            keep = torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True)
        z = torch.where(keep, a, torch.zeros_like(a))
        return z if self.signed else torch.relu(z)

    def decode_active(self, z: torch.Tensor, with_bias: bool = True, like: Tensors | None = None) -> Tensors:
        """Reconstruction from the nonzero entries of z, per sample, using only active factors; factored
        (the active latents' factors, scaled by their codes) for the tensors where ``like`` is Factored."""
        N = z.shape[0]
        kk = max(1, int((z != 0).sum(1).max()))
        vals, idx = z.abs().topk(kk, dim=1)
        vals = z.gather(1, idx) / self.decoder_norms()[idx]  # unit-norm directions
        out = {}
        for j, n in enumerate(self.names):
            if self.lowrank(n) and like is not None and isinstance(like[n], Factored):
                U, V = self.dec[f"{j}_U"][idx], self.dec[f"{j}_V"][idx]  # [N, kk, d, r]
                r = U.shape[-1]
                left = (U * vals[..., None, None]).transpose(2, 3).reshape(N, kk * r, U.shape[2])
                xh = Factored(left, V.transpose(2, 3).reshape(N, kk * r, V.shape[2]))
                if with_bias:
                    b = self.bias_factored(j, N)
                    xh = Factored(torch.cat([b.left, xh.left], 1), torch.cat([b.right, xh.right], 1))
                out[n] = xh
                continue
            if self.lowrank(n):
                U, V = self.dec[f"{j}_U"][idx], self.dec[f"{j}_V"][idx]  # [N, kk, d, r]
                r = U.shape[-1]
                Uz = (U * vals[..., None, None]).permute(0, 2, 1, 3).reshape(N, U.shape[2], kk * r)
                Vr = V.permute(0, 1, 3, 2).reshape(N, kk * r, V.shape[2])
                xh = Uz @ Vr
            else:
                xh = (vals[..., None] * self.dec[f"{j}_W"][idx]).sum(1).view(N, *self.shapes[n])
            out[n] = xh + self.bias(j) if with_bias else xh
        return out

    def forward(self, x: Tensors) -> ForwardOutput:
        y = self.center(x)
        a = self.pre_acts(y)
        z = self.activate(a)
        return ForwardOutput(xhat=self.decode_active(z, like=y), codes=z, pre_acts=a, centered=y)

    def residual(self, x: Tensors, xhat: Tensors) -> Tensors:
        """``x / scale - xhat`` per tensor (Factored where both are): what the SAE leaves unexplained."""
        xs = self.scaled_input(x)
        return {n: difference(xs[n], xhat[n]) for n in self.names}

    def reconstruct(self, x: Tensors) -> dict[str, torch.Tensor]:
        """Reconstruction in the input's units (dense)."""
        return {n: dense(v) * self.scale for n, v in self.forward(x).xhat.items()}

    @torch.no_grad()
    def directions(self) -> Tensors:
        """Each latent's dense unit-norm decoder direction per tensor: {name: [F, *shape]} (output only)."""
        norms = self.decoder_norms()
        out = {}
        for j, n in enumerate(self.names):
            if self.lowrank(n):
                d = torch.einsum("for,fir->foi", self.dec[f"{j}_U"], self.dec[f"{j}_V"])
            else:
                d = self.dec[f"{j}_W"].view(self.n_latents, *self.shapes[n])
            out[n] = d / norms.view(-1, *([1] * (d.ndim - 1)))
        return out

    # -- io ----------------------------------------------------------------
    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / "sae.safetensors")
        )
        (path / "cfg.json").write_text(json.dumps(self.config(), indent=1))

    @classmethod
    def load(cls, path) -> ShardSAE:
        path = Path(path)
        cfg = json.loads((path / "cfg.json").read_text())
        sae = cls(**cfg)
        sae.load_state_dict(load_file(str(path / "sae.safetensors")))
        return sae


def sae_loss(sae: ShardSAE, x: Tensors, variance: float, dead: torch.Tensor, aux_k: int, aux_coef: float) -> LossOutput:
    """The whole training loss of one batch ``x`` (input units): ``L = L_rec + aux_coef * L_aux``.

    ``L_rec = sum_b ||x_b / scale - xhat_b||^2 / (N * variance)``, with ``variance`` the training
    data's total variance per event in normalized units (so ``L_rec`` estimates the FVU); ``L_aux``
    is :func:`aux_loss` over the ``dead`` latents with ``aux_k`` of them. Factored inputs: every
    squared norm from Gram matrices of factors (:func:`sq_norms`).
    """
    out = sae(x)
    n = out.codes.shape[0]
    xs = sae.scaled_input(x)
    rec = sum(sq_norms(difference(xs[name], out.xhat[name])).sum() for name in sae.names) / (n * variance)
    aux = rec.new_zeros(())
    if aux_coef > 0:
        aux = aux_loss(sae, out.pre_acts, xs, out.xhat, dead.to(out.codes.device), aux_k)
    return LossOutput(loss=rec + aux_coef * aux, rec=rec, aux=aux, out=out)


def aux_loss(sae: ShardSAE, a: torch.Tensor, y: Tensors, xhat: Tensors, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): reconstruct the residual ``e = y - xhat`` with the top-k_aux dead latents, no
    bias; ``||e - e_hat||^2 / sum_b ||e_b - mean(e)||^2``. (``y`` centred and ``xhat`` without ``b_pre``, or
    ``y = x / scale`` and ``xhat`` with it: the same ``e``.)"""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return a.new_zeros(())
    e = {}
    for n in sae.names:
        d = difference(y[n], xhat[n])
        e[n] = d.detach()
    mag = (a.abs() if sae.signed else a).masked_fill(~dead[None], -float("inf"))
    kk = min(k_aux, n_dead)
    idx = mag.topk(kk, dim=1).indices
    za = torch.zeros_like(a).scatter(1, idx, a.gather(1, idx))
    if not sae.signed:
        za = torch.relu(za)
    eh = sae.decode_active(za, with_bias=False, like=e)
    num = sum(sq_norms(difference(e[n], eh[n])).sum() for n in sae.names)
    den = sum(centered_sq_sum(e[n]) for n in sae.names)
    return num / den.clamp(min=1e-30).to(num.dtype)
