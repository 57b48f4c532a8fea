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
latent and rank instead of d_out d_in), and the losses never form an event's reconstruction either:
with ``w`` the codes over the decoder norms, ``||y_n - sum_i w_ni M_i||^2 = ||y_n||^2 - 2 sum_i w_ni
<y_n, M_i> + sum_ij w_ni w_nj <M_i, M_j>``, the inner products from factors (``<M_i, M_j>`` once per
batch over the latents active in it: (s r)^2 (d_out + d_in); :class:`_GramTerms`), and AuxK's
residual the same way. (Decoding each event's k r active factors instead held N k r (d_out + d_in)
numbers per matrix: 11 GB at rank 4 over SmolLM2's MLP matrices with AuxK's 128 latents.)
:meth:`ShardSAE.forward` still returns the reconstruction, factored (k r factors), for readers of
small batches. A dense (``rank=0``) SAE makes factored inputs dense, batch by batch.

Each tensor's decoder and encoder rows and its ``b_pre`` are small modules of :mod:`shardlib.sae_parts`
(low-rank or dense), so each of the above is written once per kind. The architecture is a
:class:`SAEConfig`. Saved as ``sae.safetensors`` (keys ``dec.<j>.U``, ``b_pre.<j>.b``, ...: ``j`` the
tensor's position) + ``cfg.json`` (sparsify style); a low-rank part's factors are saved as they are held,
[F, r, d] (the file's metadata says ``factor_layout: rank_first``). Folders saved with the earlier keys
(``dec.<j>_U``, ``b_pre.<j>``) or the earlier factor layout ([F, d, r]) load too.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .factored import Factored
from .metrics import sq_terms
from .sae_parts import Dense, DenseBias, LowRank, LowRankBias, factor_gram, factor_inner

Tensors = dict[str, "torch.Tensor | Factored"]
"""One batch of updates per tensor: dense [N, *shape], or :class:`~shardlib.factored.Factored` for matrices."""


def shapes_of(data: Tensors) -> dict[str, tuple]:
    """The shape of one event per tensor."""
    return {k: tuple(v.shape) if isinstance(v, Factored) else tuple(v.shape[1:]) for k, v in data.items()}


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

    codes: torch.Tensor
    """Sparse codes z [N, F] of the batch."""

    sq_err: torch.Tensor
    """Each event's squared reconstruction error [N] (normalized units, all tensors; detached)."""


@dataclass(frozen=True)
class SAEConfig:
    """A :class:`ShardSAE`'s architecture: what ``cfg.json`` holds beside the tensor shapes (sparsify's
    ``SparseCoderConfig``). :class:`~shardlib.trainer.TrainConfig` nests one."""

    n_latents: int = 32
    """Latents (shards)."""
    k: int = 4
    """Active latents per event (TopK), or their mean per event (BatchTopK)."""
    rank: int = 1
    """Rank of each latent's factors per weight matrix (0 = dense directions: the dense baseline)."""
    activation: str = "topk"
    """``topk`` (per event) or ``batchtopk`` (over the batch; a learned threshold at inference)."""
    signed: bool = False
    """TopK on |a| keeping the sign (L3D) instead of ReLU-TopK."""
    encoder_bias: bool = False
    """Learn an encoder bias ``b_enc`` (fixed at 0 otherwise)."""
    b_pre_rank: int = -1
    """Rank of each weight matrix's ``b_pre`` (0 = dense); -1 = :meth:`resolved` against the data."""

    def __post_init__(self):
        if self.b_pre_rank < -1:
            raise ValueError(f"b_pre_rank must be >= 0 (0 = dense) or -1 (from the data), got {self.b_pre_rank}")
        if self.activation not in ("topk", "batchtopk"):
            raise ValueError(f"activation must be 'topk' or 'batchtopk', got {self.activation!r}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k={self.k} must be between 1 and n_latents={self.n_latents}")

    def resolved(self, data: Tensors) -> SAEConfig:
        """``b_pre_rank`` -1 resolved: the SAE's rank when a low-rank matrix comes factored in ``data`` (a dense
        ``b_pre`` would densify every event), else 0 (dense)."""
        if self.b_pre_rank >= 0:
            return self
        factored = self.rank > 0 and any(isinstance(v, Factored) for v in data.values())
        return replace(self, b_pre_rank=self.rank if factored else 0)


_V1_KEY = re.compile(r"(dec|enc|b_pre)\.(\d+)(?:_([UVW]))?")


_FACTOR_KEY = re.compile(r"(dec|enc)\.\d+\.[UV]")
FACTOR_LAYOUT = {"factor_layout": "rank_first"}
"""The metadata of a saved SAE whose low-rank factors are [F, r, d] (before it, they were [F, d, r])."""


def _upgrade_keys(state: dict, rank_first: bool = True) -> dict:
    """A state dict saved before the per-tensor modules (``dec.0_U``, ``b_pre.0``) in today's keys (``dec.0.U``,
    ``b_pre.0.b``), and low-rank factors saved as [F, d, r] (not ``rank_first``) as today's [F, r, d]; today's
    pass unchanged."""
    out = {}
    for key, v in state.items():
        m = _V1_KEY.fullmatch(key)
        key = f"{m[1]}.{m[2]}.{m[3] or 'b'}" if m else key
        out[key] = v if rank_first or not _FACTOR_KEY.fullmatch(key) else v.transpose(1, 2).contiguous()
    return out


class ShardSAE(nn.Module):
    """The SAE over the tensors of ``shapes``: per tensor a decoder part ``dec[j]`` and an encoder part ``enc[j]``
    (:class:`~shardlib.sae_parts.LowRank` for a weight matrix of a ``rank > 0`` SAE, else
    :class:`~shardlib.sae_parts.Dense`) and a ``b_pre[j]`` (:class:`~shardlib.sae_parts.LowRankBias` with
    ``b_pre_rank > 0``, else :class:`~shardlib.sae_parts.DenseBias`), ``j`` the tensor's position."""

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
        SAEConfig(n_latents, k, rank, activation, signed, encoder_bias, b_pre_rank)  # checks the rest
        self.names = list(shapes)
        self.shapes = {n: tuple(int(s) for s in shapes[n]) for n in self.names}
        self.n_latents, self.k, self.rank, self.activation, self.signed = n_latents, k, rank, activation, signed
        self.encoder_bias, self.b_pre_rank = encoder_bias, b_pre_rank
        g = torch.Generator().manual_seed(seed)
        self.dec, self.enc, self.b_pre = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for j, n in enumerate(self.names):
            shape, matrix = self.shapes[n], len(self.shapes[n]) == 2
            self.dec[str(j)] = LowRank(n_latents, shape, rank, g) if rank > 0 and matrix else Dense(n_latents, shape, g)
            self.b_pre[str(j)] = LowRankBias(shape, b_pre_rank, g) if b_pre_rank > 0 and matrix else DenseBias(shape)
        if encoder_bias:
            self.b_enc = nn.Parameter(torch.zeros(n_latents))
        else:  # fixed at zero (a buffer, so that saved SAEs keep one layout)
            self.register_buffer("b_enc", torch.zeros(n_latents))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(0.0))  # BatchTopK inference threshold
        self.normalize_decoder_()
        for key, part in self.dec.items():  # the encoder starts at the (unit) decoder
            self.enc[key] = copy.deepcopy(part)

    @classmethod
    def build(cls, shapes: dict[str, tuple], cfg: SAEConfig, seed: int = 0) -> ShardSAE:
        """The SAE ``cfg`` describes (``b_pre_rank`` resolved: :meth:`SAEConfig.resolved`) over ``shapes``."""
        return cls(shapes, seed=seed, **asdict(cfg))

    # -- structure ---------------------------------------------------------
    def lowrank(self, name: str) -> bool:
        return self.rank > 0 and len(self.shapes[name]) == 2

    def config(self) -> dict:
        cfg = SAEConfig(
            self.n_latents, self.k, self.rank, self.activation, self.signed, self.encoder_bias, self.b_pre_rank
        )
        return {"shapes": {n: list(s) for n, s in self.shapes.items()}, **asdict(cfg)}

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def latent_parameters(self) -> list[nn.Parameter]:
        """The per-latent factors (decoder and encoder; row i = latent i), not ``b_pre`` or ``b_enc``."""
        return [*self.dec.parameters(), *self.enc.parameters()]

    def param_groups(self, lr: float, relative: bool = True) -> list[dict]:
        """Adam parameter groups. With ``relative``, each tensor's learning rate is ``lr`` divided by
        the square root of the length of the vectors it holds (a decoder factor of a d x d' matrix:
        d; a dense direction: its size; b_pre: its tensor's size, a low-rank one's factor its width;
        ``b_enc``: 1), so that one Adam step moves every factor by about the same fraction ``lr`` of its
        norm whatever the widths. A single absolute rate moves a 24,704-dim dense direction by half its
        norm per step and a 128-dim factor by 3%."""
        parts = [*self.dec.values(), *self.enc.values(), *self.b_pre.values()]
        width = {id(p): d for part in parts for p, d in part.widths()}
        groups = {}
        for prm in self.parameters():
            groups.setdefault(width.get(id(prm), 1) if relative else 1, []).append(prm)
        return [{"params": ps, "lr": lr / math.sqrt(d)} for d, ps in sorted(groups.items())]

    # -- directions ----------------------------------------------------------
    def decoder_norms(self, latents: torch.Tensor | None = None) -> torch.Tensor:
        """||D_i|| over all tensors together: [F], or [len(latents)] for ``latents`` only (a loss that uses a
        few latents then differentiates through their rows only: through all 256 rows of the dense SmolLM2
        reference, 226M numbers, the norms' backward took 2.4 s of a 6.8 s step)."""
        sq = 0.0
        for part in self.dec.values():
            sq = sq + part.sq_norms(latents)
        return sq.clamp(min=1e-30).sqrt()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale the decoder so that every direction has unit norm."""
        norms = self.decoder_norms()
        for part in self.dec.values():
            part.divide_(norms)

    @torch.no_grad()
    def set_directions_(self, directions: Tensors, latents=None) -> None:
        """Start decoder and encoder at given directions {name: [F, *shape]} (then unit norm).

        ``latents`` (indices) sets only those latents, ``directions`` then holding one row each.
        Low-rank tensors take each direction's best rank-``rank`` approximation (truncated
        SVD; for Factored directions :func:`~shardlib.factored.best_rank`, from the factors' Gram matrices); used to
        start an SAE at known ground truth, and to restart dead latents.
        """
        idx = torch.arange(self.n_latents) if latents is None else torch.as_tensor(latents).cpu()
        idx = idx.to(self.scale.device)
        for n, part in zip(self.names, self.dec.values()):
            d, want = directions[n], (len(idx), *self.shapes[n])
            if isinstance(d, Factored) and (d.n_events, *d.shape) != want:
                raise ValueError(f"directions[{n!r}] holds {d.n_events} factored {d.shape} matrices; expected {want}")
            if not isinstance(d, Factored) and tuple(d.shape) != want:
                raise ValueError(f"directions[{n!r}] has shape {tuple(d.shape)}; expected {want}")
            part.assign_(idx, d if isinstance(part, LowRank) else dense(d))
        norms = self.decoder_norms()
        for dec, enc in zip(self.dec.values(), self.enc.values()):
            dec.divide_(norms, idx, mirror=enc)

    @torch.no_grad()
    def directions(self, names=None) -> dict[str, torch.Tensor]:
        """Each latent's dense unit-norm decoder direction per tensor: {name: [F, *shape]} (output only), for
        the tensors ``names`` (default: all)."""
        norms = self.decoder_norms()
        out = {}
        for n, part in zip(self.names, self.dec.values()):
            if names is None or n in names:
                d = part.dense()
                out[n] = d / norms.view(-1, *([1] * (d.ndim - 1)))
        return out

    # -- forward -----------------------------------------------------------
    def scaled_input(self, x: Tensors) -> Tensors:
        """The input divided by ``scale``: Factored where the tensor is a low-rank matrix given factored
        (a dense SAE or a vector takes it dense)."""
        out = {}
        for n, part in zip(self.names, self.dec.values()):
            v = x[n]
            out[n] = (
                v.scaled(1 / self.scale)
                if isinstance(v, Factored) and isinstance(part, LowRank)
                else dense(v) / self.scale
            )
        return out

    def center(self, x: Tensors) -> Tensors:
        out = {}
        for (n, v), bias in zip(self.scaled_input(x).items(), self.b_pre.values()):
            if isinstance(v, Factored) and not isinstance(bias, LowRankBias):
                raise ValueError(
                    f"tensor {n!r} comes factored, but this SAE's b_pre is dense (b_pre_rank=0): subtracting a "
                    "dense b_pre would form the matrix of every event. Build the SAE with b_pre_rank > 0"
                )
            out[n] = bias.subtract_from(v)
        return out

    def pre_acts(self, y: Tensors) -> torch.Tensor:
        """Encoder scores <y, E_i> + b_enc [N, F], summed over tensors."""
        out = 0.0
        for n, part in zip(self.names, self.enc.values()):
            out = out + part.inner(y[n])
        return out + self.b_enc

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

    def decode_active(
        self, z: torch.Tensor, with_bias: bool = True, like: Tensors | None = None, names=None
    ) -> Tensors:
        """Reconstruction from the nonzero entries of z, per sample, using only active factors; factored
        (the active latents' factors, scaled by their codes) for the tensors where ``like`` is Factored; for
        the tensors ``names`` (default: all)."""
        if names is not None and not names:  # every tensor of the batch is reconstructed elsewhere (Gram terms)
            return {}
        kk = max(1, int((z != 0).sum(1).max()))
        vals, idx = z.abs().topk(kk, dim=1)
        used, where = torch.unique(idx, return_inverse=True)
        vals = z.gather(1, idx) / self.decoder_norms(used)[where]  # unit-norm directions
        out = {}
        for n, part, bias in zip(self.names, self.dec.values(), self.b_pre.values()):
            if names is None or n in names:
                xh = part.decode(idx, vals, factored=like is not None and isinstance(like[n], Factored))
                out[n] = bias.add_to(xh) if with_bias else xh
        return out

    def by_gram(self, y: Tensors) -> list[str]:
        """The tensors whose errors come from Gram matrices of factors (:class:`_GramTerms`): low-rank
        matrices given factored. The others are decoded (:meth:`decode_active`)."""
        return [n for n in self.names if self.lowrank(n) and isinstance(y[n], Factored)]

    @torch.no_grad()
    def recon_terms(self, x: Tensors, grams: dict | None = None) -> tuple[torch.Tensor, dict[str, tuple]]:
        """The codes z [N, F] of ``x`` and, per tensor, each event's squared error ``||x/scale - xhat||^2``,
        ``||x/scale||^2`` and ``||xhat||^2`` (float64, [N] each): what :class:`~shardlib.metrics.ReconStats`
        needs. Factored low-rank tensors from Gram matrices of factors (no per-event reconstruction is
        formed), the rest from :meth:`decode_active`. ``grams``: a dict the caller passes to every batch of one
        evaluation (the SAE unchanged between them), where the decoder's Gram matrices are kept."""
        y = self.center(x)
        z = self.activate(self.pre_acts(y))
        xs = self.scaled_input(x)
        gram = self.by_gram(y)
        xhat = self.decode_active(z, like=y, names=[n for n in self.names if n not in gram])
        terms, norms = {}, self.decoder_norms()
        for n, part, bias in zip(self.names, self.dec.values(), self.b_pre.values()):
            if n in gram:
                cache = None if grams is None else grams.setdefault(n, {})
                t = _GramTerms.of(part, y[n].to(torch.float64), z, norms, dtype=torch.float64, cache=cache)
                b = bias.factored(1).to(torch.float64)
                bw = 2 * (t.w * factor_inner(b, t.U, t.V)).sum(1)
                terms[n] = (t.sq_err(), xs[n].to(torch.float64).sq_norms(), b.sq_norms() + bw + t.xhat_sq())
            else:
                terms[n] = sq_terms(xs[n], xhat[n])
        return z, terms

    def forward(self, x: Tensors) -> ForwardOutput:
        y = self.center(x)
        a = self.pre_acts(y)
        z = self.activate(a)
        return ForwardOutput(xhat=self.decode_active(z, like=y), codes=z, pre_acts=a, centered=y)

    def residual(self, x: Tensors, xhat: Tensors) -> Tensors:
        """``x / scale - xhat`` per tensor (Factored where both are): what the SAE leaves unexplained."""
        xs = self.scaled_input(x)
        return {n: difference(xs[n], xhat[n]) for n in self.names}

    # -- io ----------------------------------------------------------------
    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
            str(path / "sae.safetensors"),
            metadata=FACTOR_LAYOUT,
        )
        (path / "cfg.json").write_text(json.dumps(self.config(), indent=1))

    @classmethod
    def load(cls, path) -> ShardSAE:
        path = Path(path)
        cfg = json.loads((path / "cfg.json").read_text())
        sae = cls(**cfg)
        with safe_open(str(path / "sae.safetensors"), "pt") as f:
            rank_first = (f.metadata() or {}).get("factor_layout") == FACTOR_LAYOUT["factor_layout"]
        sae.load_state_dict(_upgrade_keys(load_file(str(path / "sae.safetensors")), rank_first))
        return sae


class _GramTerms(NamedTuple):
    """One factored low-rank tensor's reconstruction, held as inner products: the batch's active latents
    ``S``, their codes over the decoder norms ``w`` [N, s] (so ``xhat_n = sum_i w_ni M_i`` with
    ``M_i = U_i V_i^T``), ``Q`` [N, s] = ``<y_n, M_i>``, ``K`` [s, s] = ``<M_i, M_j>`` and ``y_sq`` [N] =
    ``||y_n||^2``. Then ``||y_n - xhat_n||^2 = y_sq - 2 w Q + w K w``: cost N m s r (d_out + d_in) +
    (s r)^2 (d_out + d_in) for the whole batch, where decoding every event's k r factors costs
    N (m + k r)^2 (d_out + d_in) and holds N k r (d_out + d_in) numbers (11 GB at rank 4 over SmolLM2's 90
    MLP matrices with AuxK's 128 latents per event)."""

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    w: torch.Tensor
    Q: torch.Tensor
    K: torch.Tensor
    y_sq: torch.Tensor

    @classmethod
    def of(
        cls, part: LowRank, y: Factored, z: torch.Tensor, norms: torch.Tensor, dtype=None, cache: dict | None = None
    ) -> _GramTerms:
        """``cache`` (a dict kept by the caller while the SAE does not change, as in an evaluation over many
        batches) holds the Gram matrix of all latents once a batch uses at least half of them: later batches index
        it instead of computing theirs (a rank-4 SAE's over SmolLM2's 90 MLP matrices: 200 GFLOP a batch)."""
        S = torch.nonzero((z != 0).any(0)).flatten()
        F = len(z.T)
        # every latent active (large k): the factors themselves, not a gathered copy of them (778 MB at rank 4
        # over SmolLM2's 90 MLP matrices)
        U, V = (part.U, part.V) if len(S) == F else (part.U[S], part.V[S])
        if dtype is not None:
            U, V, z, norms = U.to(dtype), V.to(dtype), z.to(dtype), norms.to(dtype)
        w = z[:, S] / norms[S]
        if cache is not None and ("K" in cache or 2 * len(S) >= F):
            if "K" not in cache:
                U_all, V_all = (U, V) if len(S) == F else (part.U.to(U.dtype), part.V.to(U.dtype))
                cache["K"] = factor_gram(U_all, V_all, U_all, V_all)
            K = cache["K"] if len(S) == F else cache["K"][S][:, S]
        else:
            K = factor_gram(U, V, U, V)
        return cls(S, U, V, w, factor_inner(y, U, V), K, y.sq_norms())

    def xhat_sq(self) -> torch.Tensor:
        return ((self.w @ self.K) * self.w).sum(1)

    def sq_err(self) -> torch.Tensor:
        return self.y_sq - 2 * (self.w * self.Q).sum(1) + self.xhat_sq()


def sae_loss(sae: ShardSAE, x: Tensors, variance: float, dead: torch.Tensor, aux_k: int, aux_coef: float) -> LossOutput:
    """The whole training loss of one batch ``x`` (input units): ``L = L_rec + aux_coef * L_aux``.

    ``L_rec = sum_b ||x_b / scale - xhat_b||^2 / (N * variance)``, with ``variance`` the training
    data's total variance per event in normalized units (so ``L_rec`` estimates the FVU); ``L_aux``
    is :func:`aux_loss` over the ``dead`` latents with ``aux_k`` of them. Factored low-rank tensors:
    every squared norm from inner products of factors (:class:`_GramTerms`), no event's
    reconstruction is formed; the other tensors are decoded.
    """
    y = sae.center(x)
    a = sae.pre_acts(y)
    z = sae.activate(a)
    n = z.shape[0]
    gram = sae.by_gram(y)
    xs = sae.scaled_input(x)
    xhat = sae.decode_active(z, like=y, names=[name for name in sae.names if name not in gram])
    norms = sae.decoder_norms() if gram else None
    err, grams = {}, {}
    for name, part in zip(sae.names, sae.dec.values()):
        if name in gram:
            grams[name] = _GramTerms.of(part, y[name], z, norms)
            err[name] = grams[name].sq_err()
        else:
            err[name] = sq_norms(difference(xs[name], xhat[name]))
    rec = sum(e.sum() for e in err.values()) / (n * variance)
    aux = rec.new_zeros(())
    if aux_coef > 0:
        aux = aux_loss(sae, a, y, xs, xhat, dead.to(z.device), aux_k, grams, err)
    sq_err = sum(e.detach().double() for e in err.values())
    return LossOutput(loss=rec + aux_coef * aux, rec=rec, aux=aux, codes=z, sq_err=sq_err)


def aux_loss(
    sae: ShardSAE,
    a: torch.Tensor,
    y: Tensors,
    xs: Tensors,
    xhat: Tensors,
    dead: torch.Tensor,
    k_aux: int,
    grams: dict[str, _GramTerms] | None = None,
    err: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): reconstruct the residual ``e = x/scale - xhat`` (detached) with the top-k_aux
    dead latents, no bias; ``||e - e_hat||^2 / sum_b ||e_b - mean(e)||^2``.

    ``y`` is the centred input, ``xs`` the scaled one, ``xhat`` the decoded tensors' reconstructions (b_pre
    included), ``grams`` the factored low-rank ones' :class:`_GramTerms` (none: every tensor is decoded)
    and ``err`` their squared errors per event. For a factored low-rank tensor, with ``u`` the dead latents' codes over their norms:
    ``||e_n - e_hat_n||^2 = ||e_n||^2 - 2 sum_j u_nj <e_n, M_j> + u K u``, ``<e_n, M_j> = <y_n, M_j> -
    sum_i w_ni <M_i, M_j>`` (y, w and M_i detached), and the batch's ``sum_{a,b} <e_a, e_b>`` from the
    events' cross Gram matrix: nothing per event is decoded there either."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return a.new_zeros(())
    mag = (a.abs() if sae.signed else a).masked_fill(~dead[None], -float("inf"))
    kk = min(k_aux, n_dead)
    idx = mag.topk(kk, dim=1).indices
    za = torch.zeros_like(a).scatter(1, idx, a.gather(1, idx))
    if not sae.signed:
        za = torch.relu(za)
    e = {n: difference(xs[n], xhat[n]).detach() for n in xhat}
    eh = sae.decode_active(za, with_bias=False, like=e, names=list(e))
    num = sum(sq_norms(difference(e[n], eh[n])).sum() for n in e)
    den = sum(centered_sq_sum(e[n]) for n in e)
    norms = sae.decoder_norms() if grams else None
    for name, t in (grams or {}).items():
        part = sae.dec[str(sae.names.index(name))]
        ta = _GramTerms.of(part, y[name].detach(), za, norms)  # the dead latents' Q' = <y, M_j>, K' among them
        w = t.w.detach()
        eM = ta.Q - w @ factor_gram(t.U.detach(), t.V.detach(), ta.U, ta.V)  # <e_n, M_j>
        e_sq = err[name].detach()
        num = num + (e_sq - 2 * (ta.w * eM).sum(1) + ta.xhat_sq()).sum()
        with torch.no_grad():  # sum_{a,b} <e_a, e_b> = sum of (Y - P - P^T + W K W^T), P = <y_a, xhat_b>
            Y = cross_gram(y[name].detach())
            P = t.Q.detach() @ w.T
            E = Y - P - P.T + w @ t.K.detach() @ w.T
            den = den + e_sq.double().sum() - E.double().sum() / len(w)
    return num / den.clamp(min=1e-30).to(num.dtype)


def cross_gram(y: Factored) -> torch.Tensor:
    """``<y_a, y_b>`` [N, N] over a factored batch, from the Gram matrices of all its factors."""
    N, m, _ = y.left.shape
    gl = y.left.reshape(N * m, -1) @ y.left.reshape(N * m, -1).T
    gr = y.right.reshape(N * m, -1) @ y.right.reshape(N * m, -1).T
    return (gl * gr).view(N, m, N, m).sum((1, 3))
