"""How sparse are RL parameter updates, under each lens (Mukherjee et al. 2025, arXiv 2505.11711).

Lenses: exact fp32 zeros; |delta| <= tau for a sweep of tau; bf16-visible change (only for
the cumulative update, where both checkpoints exist; Mukherjee et al.'s headline number
uses bf16 checkpoints and tau = 1e-5); rank of each matrix update relative to full rank;
fraction of rows and columns touched. Scopes: the cumulative update (base -> final policy,
every parameter), single optimizer steps and single events (the collected tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import metrics
from .config import Params, param
from .factored import Factored, factor_pairs
from .metrics import TAUS
from .store import flat_updates, open_store


def _state(path) -> dict[str, torch.Tensor]:
    from .policy import load_policy

    return {n: p.detach().float() for n, p in load_policy(path).named_parameters()}


def cumulative(base_path, final_path, taus=TAUS) -> xr.Dataset:
    """Per-tensor lenses of the cumulative update final - base (all parameters)."""
    before, after = _state(base_path), _state(final_path)
    names = list(before)
    rows = {
        "unchanged": [],
        "bf16_unchanged": [],
        "mukherjee_unchanged": [],
        "rank_ratio": [],
        "rows_touched": [],
        "cols_touched": [],
        "size": [],
    }
    for n in names:
        d = after[n] - before[n]
        rows["unchanged"].append(metrics.unchanged_fraction(d, taus))
        rows["bf16_unchanged"].append(metrics.bf16_unchanged(before[n], after[n]))
        rows["mukherjee_unchanged"].append(metrics.bf16_unchanged(before[n], after[n], tol=1e-5))
        rows["rank_ratio"].append(metrics.rank_ratio(d))
        r, c = metrics.touched(d)
        rows["rows_touched"].append(r)
        rows["cols_touched"].append(c)
        rows["size"].append(d.numel())
    return xr.Dataset(
        {
            "unchanged": (("tensor", "tau"), np.array(rows["unchanged"])),
            **{k: ("tensor", np.array(v, dtype=float)) for k, v in rows.items() if k != "unchanged"},
        },
        coords={"tensor": names, "tau": list(taus)},
    )


def per_update(store_path, taus=TAUS, max_updates: int = 256, seed: int = 0) -> xr.Dataset:
    """Lenses of single updates (events or steps) of a store, averaged over up to ``max_updates`` of them."""
    ds = open_store(store_path)
    n = ds.sizes["event"]
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_updates), replace=False))
    sub = ds.isel(event=pick)
    ups = flat_updates(sub)
    # a factored matrix's ranks from its factors (the same ranks; no SVD of the dense matrix)
    factored_ranks = {
        sub[lv].attrs["param"]: metrics.factored_rank_ratio(
            Factored(torch.from_numpy(np.asarray(sub[lv].values)), torch.from_numpy(np.asarray(sub[rv].values)))
        )
        for lv, rv in factor_pairs(sub).values()
    }
    names = list(ups)
    out = {"unchanged": [], "rank_ratio": [], "rows_touched": [], "cols_touched": [], "size": []}
    for name in names:
        u = torch.from_numpy(ups[name])
        unch = np.mean([metrics.unchanged_fraction(x, taus) for x in u], axis=0)
        if name in factored_ranks:
            rr = np.mean(factored_ranks[name])
        else:
            rr = np.mean([metrics.rank_ratio(x) for x in u])
        tt = np.array([metrics.touched(x) for x in u])
        out["unchanged"].append(unch)
        out["rank_ratio"].append(rr)
        out["rows_touched"].append(tt[:, 0].mean())
        out["cols_touched"].append(tt[:, 1].mean())
        out["size"].append(u[0].numel())
    return xr.Dataset(
        {
            "unchanged": (("tensor", "tau"), np.array(out["unchanged"])),
            **{k: ("tensor", np.array(v, dtype=float)) for k, v in out.items() if k != "unchanged"},
        },
        coords={"tensor": names, "tau": list(taus)},
        attrs={"n_updates": len(pick), "kind": ds.attrs.get("kind", "")},
    )


def overall(ds: xr.Dataset) -> xr.Dataset:
    """Parameter-weighted totals over tensors (matrix-only means for rank and rows/cols)."""
    w = ds["size"] / ds["size"].sum()
    out = xr.Dataset({"unchanged": (ds["unchanged"] * w).sum("tensor")})
    for k in ("bf16_unchanged", "mukherjee_unchanged"):
        if k in ds:
            out[k] = (ds[k] * w).sum("tensor")
    for k in ("rank_ratio", "rows_touched", "cols_touched"):
        out[k] = ds[k].mean(skipna=True)
    return out


def layer_of(name: str) -> str:
    """'model.layers.1.mlp.up_proj.weight' -> 'layer 1'; other names -> their first part."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return f"layer {parts[i + 1]}"
    return parts[0] if parts[0] != "model" else parts[1]


def exists(path) -> bool:
    return bool(path) and Path(path).exists()


# ---------------------------------------------------------------------------
# the stage


@dataclass(frozen=True)
class SparsityParams(Params):
    """Parameters of the sparsity analysis (``notebooks/05_sparsity.ipynb``)."""

    run_dirs: list[str] = param([], "RL / SFT stage folders to analyse (each with init_policy/, policy/, updates/)")
    run_names: list[str] = param([], "a name per folder (e.g. rl_lm, sft_lm, rl_bandit)")
    taus: list[float] = param(list(TAUS), "thresholds tau of the |delta| <= tau lens (0 = exact zeros)")
    max_updates: int = param(256, "single updates sampled per store", ge=1)
    lr_sweep_dir: str = param("", "folder of a learning-rate sweep of an RL stage (one subfolder per lr; '' = none)")

    def check(self):
        if len(self.run_dirs) != len(self.run_names) or not self.run_dirs:
            raise ValueError(
                f"parameters 'run_dirs' and 'run_names': need one name per folder, got {len(self.run_dirs)} and {len(self.run_names)}"
            )


def study(p: SparsityParams) -> xr.Dataset:
    """All lenses for every run and scope: one Dataset with dims (run, scope, tau) and per-tensor cumulative detail."""
    summaries, tensors = [], []
    for name, d in zip(p.run_names, p.run_dirs):
        d = Path(d)
        scopes = {"cumulative": cumulative(d / "init_policy", d / "policy", tuple(p.taus))}
        for scope, sub in (("step", "steps"), ("event", "events")):
            if (d / "updates" / sub).exists():
                scopes[scope] = per_update(d / "updates" / sub, tuple(p.taus), p.max_updates, p.seed)
        summ = xr.concat([overall(v) for v in scopes.values()], dim="scope", join="outer").assign_coords(
            scope=list(scopes)
        )
        summaries.append(summ.expand_dims(run=[name]))
        cum = scopes["cumulative"].rename({k: f"tensor_{k}" for k in scopes["cumulative"].data_vars})
        tensors.append(cum.expand_dims(run=[name]))
    summary = xr.concat(summaries, dim="run", join="outer")
    detail = xr.concat(tensors, dim="run", join="outer")
    out = xr.merge([summary, detail])
    out["tensor_layer"] = ("tensor", [layer_of(t) for t in out["tensor"].values])
    return out


def lr_sweep(sweep_dir, taus=TAUS) -> xr.Dataset:
    """Cumulative-update lenses for each run of a learning-rate sweep (dims lr, tau)."""
    import json

    rows = []
    for d in sorted(Path(sweep_dir).iterdir()):
        if not (d / "results.nc").exists():
            continue
        with xr.open_dataset(d / "results.nc") as r:
            lr = json.loads(r.attrs["config"])["lr"]
        o = overall(cumulative(d / "init_policy", d / "policy", taus))
        rows.append(o.expand_dims(lr=[float(lr)]))
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no finished runs (subfolders with results.nc)")
    return xr.concat(rows, dim="lr").sortby("lr").rename({k: f"lr_{k}" for k in rows[0].data_vars})


def run(p: SparsityParams) -> xr.Dataset:
    """The stage: every lens on every run (:func:`study`), with the learning-rate sweep when given, to ``results.nc``."""
    from .io import save_results

    ds = study(p)
    if p.lr_sweep_dir:
        ds = xr.merge([ds, lr_sweep(p.lr_sweep_dir, tuple(p.taus))])
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds
