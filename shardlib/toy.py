"""Toy models with published decompositions (L3D, APD, SPD), decomposed by shardlib's SAE.

TMS (Elhage et al. 2022; as in APD/SPD/L3D): ``xhat = ReLU(W^T W x + b)``, ``W`` is
``m x n`` (hidden x features), features ``x_c ~ U[0, 1]`` active with probability p.
Ground-truth mechanisms: the rank-1 feature circuits ``W[:, c] e_c^T`` (zero bias part).

Data points (L3D, field notes §2b): per-sample gradients, at the trained weights, of the
divergence ``1/2 ||f(x_i) - stopgrad f(x_r)||^2`` with ``x_r`` another sample of the batch,
with respect to ``W`` and ``b``, via ``torch.func.vmap(grad)``.

MMCS two ways:
- column-wise (the papers'): for each feature c, the max over shards of |cos| between the
  shard's W column c and ``W[:, c]``, averaged over c;
- whole-direction (shardlib's): |cos| between the flattened shard (W and b parts) and the
  flattened circuit ``W[:, c] e_c^T``, max over shards, averaged over c.
ML2R here: ``||D_k[:, c]|| / ||D_k||`` at the best match (the share of the unit-norm shard's
norm on its feature's column; 1 = entirely on it). The papers' ML2R compares weight
norms, which a unit-norm shard does not have, so the two numbers are not the same quantity.
Reconstruction error: batch-pooled ``sum ||g - ghat||^2 / sum ||g||^2`` as L3D computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from torch.func import functional_call, grad, vmap

from .config import Params, param

PUBLISHED = {
    # case: {metric: (value, source)}
    "tms_5_2": {"mmcs_apd": (0.998, "APD, Braun et al. 2025"), "mmcs_spd": (1.000, "SPD, Bushnaq et al. 2025"),
                "ml2r_spd": (0.99, "SPD, Bushnaq et al. 2025"), "recon_error_l3d": (0.19, "L3D, Chrisman et al. 2025")},
    "tms_40_10": {"mmcs_apd": (0.996, "APD, Braun et al. 2025"), "mmcs_spd": (1.000, "SPD, Bushnaq et al. 2025")},
}


class TMS(torch.nn.Module):
    def __init__(self, n_features: int, n_hidden: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(n_hidden, n_features, generator=g) * (2 / (n_hidden + n_features)) ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(n_features))

    def forward(self, x):
        return torch.relu(x @ self.W.T @ self.W + self.b)


def sample_features(n: int, n_features: int, p: float, generator: torch.Generator) -> torch.Tensor:
    active = torch.rand(n, n_features, generator=generator) < p
    return active * torch.rand(n, n_features, generator=generator)


def train_tms(n_features: int, n_hidden: int, p: float = 0.05, steps: int = 4000, batch: int = 1024, lr: float = 3e-3, seed: int = 0) -> TMS:
    model = TMS(n_features, n_hidden, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = sample_features(batch, n_features, p, g)
        loss = ((model(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def divergence_gradients(model: TMS, x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-sample gradients of 1/2 ||f(x_i) - stopgrad f(x_r)||^2, x_r = another sample of the batch."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = x[torch.randperm(len(x), generator=generator)]
    with torch.no_grad():
        f_ref = model(ref)

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


def columnwise(dW: np.ndarray, W: np.ndarray) -> tuple[float, float]:
    """(MMCS, ML2R) in the papers' column-wise sense; dW: shard W parts [F, m, n], W: [m, n]."""
    n = W.shape[1]
    cos = np.zeros((dW.shape[0], n))
    for c in range(n):
        col = dW[:, :, c]
        cos[:, c] = np.abs(col @ W[:, c]) / np.clip(np.linalg.norm(col, axis=1) * np.linalg.norm(W[:, c]), 1e-30, None)
    best = cos.argmax(0)
    share = [np.linalg.norm(dW[best[c], :, c]) / np.linalg.norm(dW[best[c]]) for c in range(n)]
    return float(cos.max(0).mean()), float(np.mean(share))


@dataclass(frozen=True)
class ToyParams(Params):
    """Parameters of the toy-model reproductions (``notebooks/08_toy_models.ipynb``)."""

    cases: list[str] = param(["tms_5_2", "tms_40_10"], "toy models: tms_5_2, tms_40_10")
    seeds: list[int] = param([0, 1, 2], "seeds (TMS training, gradient sampling and SAE)")
    feature_prob: float = param(0.05, "probability a feature is active", gt=0, le=1)
    tms_steps: int = param(4000, "TMS training steps", ge=1)
    n_samples: int = param(8192, "samples whose divergence gradients form the data", ge=16)
    k: int = param(1, "SAE active latents per gradient", ge=1)
    epochs: int = param(20, "SAE epochs", ge=1)
    lr: float = param(1e-2, "SAE learning rate (L3D uses 1e-2 on toys)", gt=0)
    batch_size: int = param(256, "SAE batch size", ge=1)
    activations: list[str] = param(["signed", "relu"], "activation variants: signed TopK (L3D) and ReLU-TopK")
    device: str = param("cpu", "'cpu', 'cuda' or 'auto'", choices=("auto", "cpu", "cuda"))

    def check(self):
        bad = [c for c in self.cases if c not in ("tms_5_2", "tms_40_10")]
        if bad or not self.cases:
            raise ValueError(f"parameter 'cases': got {list(self.cases)}; accepted: tms_5_2, tms_40_10")
        bad = [a for a in self.activations if a not in ("signed", "relu")]
        if bad or not self.activations:
            raise ValueError(f"parameter 'activations': got {list(self.activations)}; accepted: signed, relu")


CASE_SHAPES = {"tms_5_2": (5, 2), "tms_40_10": (40, 10)}


def run_case(case: str, seed: int, activation: str, p: ToyParams) -> tuple[dict, object, TMS]:
    """Train the TMS, build its gradient data, train the SAE; returns (metrics, sae, model)."""
    from .metrics import mmcs
    from .planted import flatten
    from .shards import ShardParams, train

    n, m = CASE_SHAPES[case]
    model = train_tms(n, m, p.feature_prob, p.tms_steps, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    x = sample_features(p.n_samples, n, p.feature_prob, g)
    data = divergence_gradients(model, x, g)
    keep = (data["W"].reshape(len(x), -1) != 0).any(1)  # gradients with no W part carry no circuit
    data = {k: v[keep] for k, v in data.items()}
    sp = ShardParams.from_dict({"store_path": "toy", "out_dir": f"{p.out_dir}/{case}_{activation}_seed{seed}", "seed": seed,
                                "n_latents": n, "k": p.k, "rank": 1, "signed": activation == "signed", "epochs": p.epochs,
                                "lr": p.lr, "batch_size": p.batch_size, "holdout_frac": 0.0, "skip_zero_updates": False,
                                "checkpoint_every": p.epochs, "device": p.device})
    res = train(sp, progress=False, data=data)
    sae = res["sae"].cpu()
    dirs = sae.directions()
    W = model.W.detach().numpy()
    col_mmcs, ml2r = columnwise(dirs["W"].numpy(), W)
    whole = mmcs(flatten(circuits(model), ["W", "b"]), flatten(dirs, ["W", "b"]))[0]
    with torch.no_grad():
        sae.eval()
        xh, z, *_ = sae(data)
        num = sum(((data[k] / sae.scale - xh[k]) ** 2).sum() for k in data)
        den = sum(((data[k] / sae.scale) ** 2).sum() for k in data)
    freq = (z != 0).float().mean(0)
    return {"mmcs_columnwise": col_mmcs, "mmcs_whole": whole, "ml2r_share": ml2r, "recon_error": float(num / den),
            "l0": float((z != 0).sum(1).float().mean()), "dead_fraction": float((freq == 0).float().mean()),
            "n_datapoints": int(keep.sum())}, sae, model


def run(p: ToyParams, progress: bool = True) -> xr.Dataset:
    from tqdm.auto import tqdm

    keys = ["mmcs_columnwise", "mmcs_whole", "ml2r_share", "recon_error", "l0", "dead_fraction", "n_datapoints"]
    vals = {k: np.full((len(p.cases), len(p.activations), len(p.seeds)), np.nan) for k in keys}
    jobs = [(i, j, s) for i in range(len(p.cases)) for j in range(len(p.activations)) for s in range(len(p.seeds))]
    for i, j, s in tqdm(jobs, desc="toys", disable=not progress):
        m, _, _ = run_case(p.cases[i], p.seeds[s], p.activations[j], p)
        for k in keys:
            vals[k][i, j, s] = m[k]
    ds = xr.Dataset({k: (("case", "activation", "seed"), v) for k, v in vals.items()},
                    coords={"case": list(p.cases), "activation": list(p.activations), "seed": list(p.seeds)})
    for case in p.cases:
        for metric, (v, src) in PUBLISHED.get(case, {}).items():
            ds.attrs[f"published_{case}_{metric}"] = f"{v} ({src})"
    return ds


def intervention_curve(model: TMS, direction: dict[str, torch.Tensor], deltas=np.linspace(-3, 3, 13), n: int = 2048, seed: int = 0) -> np.ndarray:
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


def comparison_table(ds: xr.Dataset):
    """Mean ± std over seeds next to the published numbers, as a pandas frame."""
    import pandas as pd

    rows = []
    for case in ds.case.values:
        for act in ds.activation.values:
            sel = ds.sel(case=case, activation=act)
            row = {"case": str(case), "activation": str(act)}
            for k in ("mmcs_columnwise", "mmcs_whole", "ml2r_share", "recon_error", "l0", "dead_fraction"):
                row[k] = f"{float(sel[k].mean()):.3f} ± {float(sel[k].std()):.3f}"
            pub = PUBLISHED.get(str(case), {})
            row["published"] = "; ".join(f"{m} {v} ({src})" for m, (v, src) in pub.items())
            rows.append(row)
    return pd.DataFrame(rows)
