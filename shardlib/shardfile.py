"""The public shard files a shard stage writes, and readers for them.

- ``shards.nc``: one variable per parameter tensor, dims ``("shard", <tensor axes>)`` = each
  latent's dense unit-norm decoder direction (norm over all tensors together), attribute
  ``param``; the low-rank factors (``<var>__U``, ``<var>__V``); per-shard ``frequency`` and
  ``mean_activation``; the SAE config and provenance as attributes.
- ``activations.nc``: for every event of the store, the indices and values of its active
  latents (dims ``("event", "slot")``, index -1 = empty slot), with the store's labels and
  ``split`` (train / heldout).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from .sae import ShardSAE
from .updates import var_name


def shards_dataset(sae: ShardSAE, frequency=None, mean_activation=None) -> xr.Dataset:
    """The public ``shards.nc`` content: dense unit directions per tensor, factors, statistics."""
    dirs = sae.directions()
    vars_ = {}
    nrm = sae.decoder_norms().detach().sqrt()[:, None, None]
    for j, n in enumerate(sae.names):
        vn = var_name(n)
        dims = ("shard",) + tuple(f"{vn}_dim{i}" for i in range(len(sae.shapes[n])))
        vars_[vn] = xr.Variable(dims, dirs[n].cpu().numpy(), attrs={"param": n})
        if sae.lowrank(n):
            vars_[f"{vn}__U"] = xr.Variable(
                ("shard", dims[1], "rank"), (sae.dec[f"{j}_U"].detach() / nrm).cpu().numpy()
            )
            vars_[f"{vn}__V"] = xr.Variable(
                ("shard", dims[2], "rank"), (sae.dec[f"{j}_V"].detach() / nrm).cpu().numpy()
            )
    if frequency is not None:
        vars_["frequency"] = xr.Variable("shard", np.asarray(frequency))
    if mean_activation is not None:
        vars_["mean_activation"] = xr.Variable("shard", np.asarray(mean_activation))
    return xr.Dataset(
        vars_,
        coords={"shard": np.arange(sae.n_latents)},
        attrs={"sae_config": json.dumps(sae.config()), "input_scale": float(sae.scale)},
    )


def shard_directions(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """``{param: [shard, *shape]}`` from a ``shards.nc`` dataset."""
    return {ds[v].attrs["param"]: ds[v].values for v in ds.data_vars if "param" in ds[v].attrs}


def dense_codes(acts: xr.Dataset, n_latents: int, signed: bool = False):
    """|activation| (or, with ``signed``, the signed code) of every shard on every event, as a pandas frame
    [event, shard], from ``activations.nc``."""
    import pandas as pd

    idx, val = acts["index"].values, acts["value"].values
    dense = np.zeros((idx.shape[0], n_latents), dtype=np.float32)
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    ok = idx.reshape(-1) >= 0
    v = val.reshape(-1)[ok]
    dense[rows[ok], idx.reshape(-1)[ok]] = v if signed else np.abs(v)
    return pd.DataFrame(dense)


def activations_dataset(
    index: np.ndarray, value: np.ndarray, heldout: np.ndarray, store: xr.Dataset | None
) -> xr.Dataset:
    """The public ``activations.nc`` content: active latents of every event, the store's labels, the split."""
    split = np.array(["train"] * len(index), dtype=object)
    split[heldout] = "heldout"
    labels = {}
    if store is not None:
        labels = {c: ("event", store[c].values) for c in store.coords if store[c].dims == ("event",)}
    acts = xr.Dataset(
        {
            "index": (("event", "slot"), index.astype(np.int32)),
            "value": (("event", "slot"), value.astype(np.float32)),
        },
        coords={**labels, "split": ("event", split.astype(str))},
    )
    if store is not None and "task_names" in store.attrs:
        acts.attrs["task_names"] = store.attrs["task_names"]
    return acts
