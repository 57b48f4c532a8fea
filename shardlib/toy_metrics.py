"""How shards of toy-model gradients compare with the ground truth (:mod:`shardlib.toy_models`).

Metrics:
- MMCS per feature (the papers' column-wise one on TMS): for each feature c, the max over
  shards of |cos| between the shard's slice for c and the circuit's, averaged over c. The
  slice is W's column c on TMS (APD/SPD's definition) and W_in's row i on TMCS;
- whole-direction MMCS (shardlib's): |cos| between the flattened shard (every tensor) and the
  flattened ground-truth circuit, max over shards, averaged over features;
- ML2R share: ``||D_k[slice c]|| / ||D_k||`` at the best match (the share of the unit-norm
  shard's norm on its feature's slice; 1 = entirely on it). The papers' ML2R compares weight
  norms, which a unit-norm shard does not have, so the two numbers are not the same quantity;
- MMCS after a truth start: the same per-feature MMCS for an SAE whose decoder starts at the
  ground-truth circuits. If training moves it to where a random start ends, the objective's
  optimum is not the circuits (a property of the data), and more training cannot close the gap;
- single-feature control: the same per-feature MMCS for an SAE trained on gradients of samples
  with exactly one active feature (each feature equally often). A sample with several active
  features a, b has cross terms such as ``W[:, a] e_b^T`` in its gradient, which no single
  feature circuit holds; the control says how much of a shortfall they cause;
- coefficient correlation (TMCS): Pearson r between the matched shard's bias part (sign
  fixed so it sums positive: a signed direction has no preferred sign) and ``A[i, :]``, mean
  over inputs i; ``coef_r_model`` is the same for the trained model's own outputs ``f(e_i)``,
  the most a shard of this model can recover. L3D's exact computation of its r = 0.92 is not
  published with the paper; this is our reading of it;
- reconstruction error: batch-pooled ``sum ||g - ghat||^2 / sum ||g||^2`` as L3D computes it.
"""

from __future__ import annotations

import numpy as np
import torch


def column_cos(dW: np.ndarray, W: np.ndarray) -> np.ndarray:
    """|cos| between every shard's column c and ``W[:, c]``: [F, n]."""
    cos = np.zeros((dW.shape[0], W.shape[1]))
    for c in range(W.shape[1]):
        col = dW[:, :, c]
        cos[:, c] = np.abs(col @ W[:, c]) / np.clip(np.linalg.norm(col, axis=1) * np.linalg.norm(W[:, c]), 1e-30, None)
    return cos


def own_output_share(curves: np.ndarray, best: np.ndarray) -> float:
    """Share of a shard's output change on its own feature's output, mean over features.

    ``curves`` [F, deltas, outputs] from ``intervention_curve``; ``best[c]`` the shard matched to feature c.
    """
    return float(np.mean([curves[b][:, c].sum() / max(curves[b].sum(), 1e-30) for c, b in enumerate(best)]))


def columnwise(dW: np.ndarray, W: np.ndarray) -> tuple[float, float]:
    """(MMCS, ML2R share) per feature column; dW: shard parts [F, m, n], W: ground-truth columns [m, n].

    Column c of ``W`` is feature c's circuit slice (TMS: ``W[:, c]``; TMCS: W_in's row i, passed transposed).
    """
    n = W.shape[1]
    cos = column_cos(dW, W)
    best = cos.argmax(0)
    share = [np.linalg.norm(dW[best[c], :, c]) / np.linalg.norm(dW[best[c]]) for c in range(n)]
    return float(cos.max(0).mean()), float(np.mean(share))


@torch.no_grad()
def gradient_ml2r(sae, data: dict[str, torch.Tensor], feature: np.ndarray, best: np.ndarray) -> float:
    """ML2R's analogue for gradient shards: how much of a one-feature gradient its matched shard carries.

    For the gradients whose sample has only feature c active: mean ``|z[:, best[c]]|`` (the
    shard's contribution has that norm: directions are unit norm) over mean ``||y||`` (the
    gradient as the SAE sees it, scaled and centred by ``b_pre``); averaged over features. 1 = the
    shard reproduces the feature's gradient at full size, < 1 shrunk (or not firing), > 1 inflated.
    """
    sae.eval()
    _, z, _, y = sae(data)
    norm = torch.stack([v.reshape(len(z), -1).pow(2).sum(1) for v in y.values()]).sum(0).sqrt()
    ratios = []
    for c, b in enumerate(best):
        rows = torch.from_numpy(feature == c)
        if rows.any():
            ratios.append(float(z[rows, b].abs().mean() / norm[rows].mean().clamp(min=1e-30)))
    return float(np.mean(ratios)) if ratios else float("nan")


def coefficient_r(recovered: np.ndarray, A: np.ndarray) -> float:
    """Mean over rows i of Pearson r(recovered[i] * sign(sum recovered[i]), A[i])."""
    rs = [np.corrcoef(r * (1.0 if r.sum() >= 0 else -1.0), a)[0, 1] for r, a in zip(recovered, A)]
    return float(np.mean(rs))


METRICS = {
    "mmcs_columnwise": "MMCS per feature slice (TMS: W column c, the papers' column-wise; TMCS: W_in row i)",
    "mmcs_whole": "MMCS of whole directions (every tensor) to the ground-truth circuits",
    "ml2r_share": "share of the matched shard's norm on its feature's slice (not the papers' ML2R)",
    "ml2r_gradient": "norm ratio at best match in gradient space: on gradients with only feature c active, mean |code| of c's matched shard over mean ||gradient|| (centred and scaled as the SAE sees it), mean over features",
    "mmcs_truth_init": "per-feature MMCS of an SAE started at the ground-truth circuits",
    "mmcs_single_feature": "per-feature MMCS of the signed SAE trained on gradients of samples with exactly one active feature",
    "recon_error_single_feature": "reconstruction error of that SAE on those gradients",
    "own_output_share": "TMS: share of the output change under W0 + delta * shard (delta in [-3, 3]) on the matched feature's own output",
    "own_output_share_truth": "TMS: the same share for the ground-truth circuits W[:, c] e_c^T (unit norm)",
    "recon_error": "batch-pooled reconstruction error sum||g - ghat||^2 / sum||g||^2 (as L3D)",
    "l0": "active latents per gradient",
    "dead_fraction": "fraction of latents that never fire",
    "coef_r": "TMCS: Pearson r between matched shards' bias parts and A's rows (mean over inputs)",
    "coef_r_model": "TMCS: the same r for the trained model's own outputs f(e_i) (the most a shard can recover)",
    "n_datapoints": "gradients in the data (samples with an active feature)",
}
