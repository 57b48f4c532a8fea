"""Planted shards: synthetic updates with known ground-truth directions (the positive control).

Ground-truth shards live in a real model's parameter shapes, are sparse in which tensors
they touch, low rank in each matrix, fire with Zipfian frequencies, a few per event, with
signed coefficients (an RL update's sign follows its advantage) and Gaussian noise.
An SAE that cannot recover these cannot be trusted on real updates.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def model_shapes(d_model: int = 64, d_ff: int = 128, n_layers: int = 2, patterns=("mlp", "attn")) -> dict[str, tuple]:
    """Weight shapes of the tiny Llama policy (built locally, nothing downloaded)."""
    from .policy import tiny_lm

    m = tiny_lm(32, d_model, n_layers, max(1, d_model // 16), d_ff)
    keep = {"mlp": "mlp.", "attn": "self_attn."}
    return {n: tuple(p.shape) for n, p in m.named_parameters()
            if p.ndim == 2 and any(keep[k] in n for k in patterns)}


def planted_updates(
    shapes: dict[str, tuple],
    n_shards: int = 16,
    n_events: int = 4096,
    active_per_event: float = 2.0,
    rank: int = 1,
    tensors_per_shard: int = 2,
    zipf: float = 1.0,
    noise: float = 0.05,
    signed: bool = True,
    seed: int = 0,
):
    """Returns (updates {name: [n_events, *shape]}, truth {name: [n_shards, *shape]} unit norm overall,
    codes [n_events, n_shards], frequencies [n_shards])."""
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    truth = {n: torch.zeros(n_shards, *shapes[n]) for n in names}
    for j in range(n_shards):
        chosen = torch.randperm(len(names), generator=g)[: min(tensors_per_shard, len(names))].tolist()
        for c in chosen:
            n = names[c]
            if len(shapes[n]) == 2:
                d_out, d_in = shapes[n]
                truth[n][j] = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
            else:
                truth[n][j] = torch.randn(shapes[n], generator=g)
    norm = sum((truth[n] ** 2).reshape(n_shards, -1).sum(1) for n in names).sqrt()
    for n in names:
        truth[n] /= norm.view(-1, *([1] * len(shapes[n])))
    # Zipfian firing probabilities scaled to the requested mean number of active shards
    base = 1.0 / np.arange(1, n_shards + 1) ** zipf
    c = active_per_event / base.sum()
    freq = np.clip(c * base, 0, 1)
    active = torch.rand(n_events, n_shards, generator=g) < torch.tensor(freq, dtype=torch.float32)
    mag = 0.5 + torch.rand(n_events, n_shards, generator=g)
    sign = torch.where(torch.rand(n_events, n_shards, generator=g) < 0.5, -1.0, 1.0) if signed else torch.ones(n_events, n_shards)
    codes = active * mag * sign
    D = sum(math.prod(s) for s in shapes.values())
    updates = {}
    for n in names:
        flat = codes @ truth[n].reshape(n_shards, -1)
        flat = flat + noise * torch.randn(flat.shape, generator=g) / math.sqrt(D)
        updates[n] = flat.view(n_events, *shapes[n])
    return updates, truth, codes, freq


def flatten(tensors: dict[str, torch.Tensor], names=None) -> np.ndarray:
    """Concatenate per-tensor [F, *shape] into [F, D] (in ``names`` order)."""
    names = names or list(tensors)
    n = tensors[names[0]].shape[0]
    return torch.cat([tensors[k].reshape(n, -1) for k in names], 1).numpy()
