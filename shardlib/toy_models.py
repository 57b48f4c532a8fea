"""The toy models with published decompositions (L3D, APD, SPD): the models, their training, the per-sample
gradients an SAE decomposes, and the ground-truth circuits.

Cases (``CASES``):
- TMS 5->2 and 40->10 (Elhage et al. 2022; as in APD/SPD/L3D): ``xhat = ReLU(W^T W x + b)``,
  ``W`` is ``m x n`` (hidden x features), features ``x_c ~ U[0, 1]`` active with probability p.
  Ground-truth mechanisms: the rank-1 feature circuits ``W[:, c] e_c^T`` (zero bias part).
- TMCS, L3D's circuit superposition: ``y = ReLU(x W_in W_out + b)`` (10 inputs, 5 hidden,
  10 outputs) trained to compute ``x A`` with ``A ~ U[0, 3)`` (L3D's script: max coefficient 3).
  Ground truth for input i: the divergence gradient of the input ``e_i`` (feature i alone),
  computed by autograd; the coefficients a shard recovers are its bias part (for an input
  with only feature i, the bias gradient is the output ``f(x) ~ x_i A[i, :]``).

Data points (L3D: Chrisman et al. 2025, arXiv 2504.00194, code briannachrisman/eigenestimation): per-sample gradients at the trained weights, via
``torch.func.vmap(grad)``, of ``1/2 ||f(x_i) - stopgrad f(x_r)||^2`` where the reference
``x_r`` is another sample of the batch (TMS) or the output is compared with zero (TMCS, as
L3D's circuit-superposition script does with its ``ZeroOutput`` reference). Samples with no
active feature are dropped (L3D's data generator drops them), and so are gradients that are
exactly zero (every output dead on both samples: nothing to decompose).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

# model, (features, hidden), default k: about the number of feature circuits one gradient
# holds (active features per non-empty sample: 1.1 on TMS 5->2, 1.25 on TMCS, 2.4 on
# TMS 40->10, where the reference sample adds its own)
CASES = {
    "tms_5_2": {"model": "tms", "shape": (5, 2), "k": 1},
    "tms_40_10": {"model": "tms", "shape": (40, 10), "k": 3},
    "tmcs": {"model": "tmcs", "shape": (10, 5), "k": 1},
}
TMCS_OUTPUTS, TMCS_MAX_COEF = 10, 3.0


class TMS(torch.nn.Module):
    def __init__(self, n_features: int, n_hidden: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(
            torch.randn(n_hidden, n_features, generator=g) * (2 / (n_hidden + n_features)) ** 0.5
        )
        self.b = torch.nn.Parameter(torch.zeros(n_features))

    def forward(self, x):
        return torch.relu(x @ self.W.T @ self.W + self.b)


class TMCS(torch.nn.Module):
    """L3D's circuit superposition: ``ReLU(x W_in W_out + b)``, W_in [inputs, hidden], W_out [hidden, outputs]."""

    def __init__(self, n_inputs: int, n_hidden: int, n_outputs: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_in = torch.nn.Parameter(
            torch.randn(n_inputs, n_hidden, generator=g) * (2 / (n_inputs + n_hidden)) ** 0.5
        )
        self.W_out = torch.nn.Parameter(
            torch.randn(n_hidden, n_outputs, generator=g) * (2 / (n_hidden + n_outputs)) ** 0.5
        )
        self.b = torch.nn.Parameter(torch.zeros(n_outputs))

    def forward(self, x):
        return torch.relu(x @ self.W_in @ self.W_out + self.b)


def sample_features(n: int, n_features: int, p: float, generator: torch.Generator) -> torch.Tensor:
    active = torch.rand(n, n_features, generator=generator) < p
    return active * torch.rand(n, n_features, generator=generator)


def _fit(model, target, n_features: int, p: float, steps: int, batch: int, lr: float, g: torch.Generator):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x = sample_features(batch, n_features, p, g)
        loss = ((model(x) - target(x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def train_tms(
    n_features: int,
    n_hidden: int,
    p: float = 0.05,
    steps: int = 4000,
    batch: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
) -> TMS:
    g = torch.Generator().manual_seed(seed + 1)
    return _fit(TMS(n_features, n_hidden, seed), lambda x: x, n_features, p, steps, batch, lr, g)


def train_tmcs(
    n_inputs: int = 10,
    n_hidden: int = 5,
    n_outputs: int = TMCS_OUTPUTS,
    p: float = 0.05,
    steps: int = 4000,
    batch: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[TMCS, torch.Tensor]:
    """A TMCS trained to compute ``x A``; returns (model, A [inputs, outputs])."""
    g = torch.Generator().manual_seed(seed + 1)
    A = torch.rand(n_inputs, n_outputs, generator=g) * TMCS_MAX_COEF
    return _fit(TMCS(n_inputs, n_hidden, n_outputs, seed), lambda x: x @ A, n_inputs, p, steps, batch, lr, g), A


def divergence_gradients(
    model: torch.nn.Module, x: torch.Tensor, generator: torch.Generator | None = None, reference: str = "sample"
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of 1/2 ||f(x_i) - stopgrad ref_i||^2 with respect to every parameter.

    ``reference="sample"``: ref_i = f(x_r), x_r another sample of the batch (a permutation drawn
    from ``generator``); ``reference="zero"``: ref_i = 0.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        if reference == "sample":
            f_ref = model(x[torch.randperm(len(x), generator=generator)])
        elif reference == "zero":
            f_ref = torch.zeros_like(model(x[:1])).expand(len(x), -1)
        else:
            raise ValueError(f"reference must be 'sample' or 'zero', got {reference!r}")

    def loss(pr, xi, fr):
        return 0.5 * ((functional_call(model, pr, (xi[None],))[0] - fr) ** 2).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, f_ref)


def circuits(model: TMS) -> dict[str, torch.Tensor]:
    """Ground-truth rank-1 circuits W[:, c] e_c^T (bias part zero): {W: [n, m, n], b: [n, n]}."""
    W = model.W.detach()
    n = W.shape[1]
    G = torch.zeros(n, *W.shape)
    for c in range(n):
        G[c, :, c] = W[:, c]
    return {"W": G, "b": torch.zeros(n, n)}


def tmcs_circuits(model: TMCS) -> dict[str, torch.Tensor]:
    """Ground truth for each input i: the (zero-reference) divergence gradient of ``e_i``."""
    return divergence_gradients(model, torch.eye(model.W_in.shape[0]), reference="zero")


INTERVENTION_DELTAS = np.linspace(-3, 3, 13)


def intervention_curve(
    model: TMS, direction: dict[str, torch.Tensor], deltas=INTERVENTION_DELTAS, n: int = 2048, seed: int = 0
) -> np.ndarray:
    """Mean |output change| per output feature under W0 + delta * shard: [len(deltas), n_features]."""
    g = torch.Generator().manual_seed(seed)
    x = sample_features(n, model.W.shape[1], 0.05, g)
    base = model(x).detach()
    out = []
    for d in deltas:
        m = TMS(model.W.shape[1], model.W.shape[0])
        with torch.no_grad():
            m.W.copy_(model.W + d * direction["W"] * model.W.norm())
            m.b.copy_(model.b + d * direction["b"] * model.W.norm())
            out.append((m(x) - base).abs().mean(0).numpy())
    return np.array(out)
