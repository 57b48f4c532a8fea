"""The public shard files a shard stage writes, and readers for them.

- ``shards.nc``: one variable per parameter tensor, dims ``("shard", <tensor axes>)`` = each
  latent's dense unit-norm decoder direction (norm over all tensors together), attribute
  ``param``; the low-rank factors (``<var>__U``, ``<var>__V``); per-shard ``frequency`` and
  ``mean_activation``; the SAE config and provenance as attributes. When the dense directions of
  the low-rank matrices would exceed ``DENSE_MAX_BYTES`` (an SAE over every MLP matrix of a
  20-50M-parameter policy: tens of GiB; 256 latents on one SmolLM2 MLP matrix), only their factors are written, each with attributes
  ``param`` and ``factor`` (``U`` or ``V``); ``U_i V_i^T`` is the unit direction's part on that
  matrix, and :func:`shard_directions` forms it when a tensor is asked for.
- ``activations.nc``: for every event of the store, the indices and values of its active
  latents (dims ``("event", "slot")``, index -1 = empty slot), with the store's labels and
  ``split`` (train / heldout).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping

import numpy as np
import xarray as xr

from .sae import ShardSAE
from .store import var_name

DENSE_MAX_BYTES = 2**28
"""Largest total size (fp32) of the low-rank matrices' dense directions that ``shards.nc`` holds (256 MiB: the
SmolLM2 study's 64 shards of one matrix, 226 MB, stay dense; 256 rank-1 shards of that matrix, 906 MB, were
written dense too at 1 GiB, 5 GB for its six ``longer_events`` fits, and are now their factors, 4 MB each)."""


def shards_dataset(
    sae: ShardSAE, frequency=None, mean_activation=None, dense_max_bytes: int = DENSE_MAX_BYTES
) -> xr.Dataset:
    """The public ``shards.nc`` content: dense unit directions per tensor, factors, statistics (the low-rank
    matrices' factors only, tagged ``param`` and ``factor``, when their dense directions would exceed
    ``dense_max_bytes``)."""
    lowrank = [n for n in sae.names if sae.lowrank(n)]
    factors_only = 4 * sae.n_latents * sum(math.prod(sae.shapes[n]) for n in lowrank) > dense_max_bytes
    # factors only: dense directions of the other tensors alone
    dirs = sae.directions([n for n in sae.names if n not in lowrank] if factors_only else None)
    vars_ = {}
    nrm = sae.decoder_norms().detach().sqrt()[:, None, None]
    for n, part in zip(sae.names, sae.dec.values()):
        vn = var_name(n)
        dims = ("shard",) + tuple(f"{vn}_dim{i}" for i in range(len(sae.shapes[n])))
        if n in dirs:
            vars_[vn] = xr.Variable(dims, dirs[n].cpu().numpy(), attrs={"param": n})
        if sae.lowrank(n):
            tag = (lambda f, n=n: {"param": n, "factor": f}) if factors_only else (lambda f: {})
            vars_[f"{vn}__U"] = xr.Variable(
                ("shard", dims[1], "rank"), (part.U.detach() / nrm).transpose(1, 2).cpu().numpy(), attrs=tag("U")
            )
            vars_[f"{vn}__V"] = xr.Variable(
                ("shard", dims[2], "rank"), (part.V.detach() / nrm).transpose(1, 2).cpu().numpy(), attrs=tag("V")
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


class ShardDirections(Mapping):
    """``{param: [shard, *shape]}`` read from a ``shards.nc`` dataset when a tensor is first asked for: its
    dense variable, or, where the file holds only factors, ``U_i V_i^T`` formed then (one tensor at a time:
    asking for one matrix of a large SAE never forms the others)."""

    def __init__(self, ds: xr.Dataset):
        self._ds, self._vars, self._cache = ds, {}, {}
        for v in ds.data_vars:
            a = ds[v].attrs
            if "param" in a and "factor" not in a:
                self._vars[a["param"]] = v
            elif a.get("factor") == "U" and a.get("param") not in self._vars:
                self._vars[a["param"]] = (v, v[: -len("__U")] + "__V")

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            v = self._vars[name]
            if isinstance(v, tuple):
                U, V = (np.asarray(self._ds[x].values, dtype=np.float32) for x in v)
                self._cache[name] = np.matmul(U, V.transpose(0, 2, 1))
            else:
                self._cache[name] = self._ds[v].values
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._vars)

    def __len__(self) -> int:
        return len(self._vars)


def shard_directions(ds: xr.Dataset) -> ShardDirections:
    """``{param: [shard, *shape]}`` from a ``shards.nc`` dataset (a :class:`ShardDirections`: each tensor is
    read, or formed from its factors, when first asked for)."""
    return ShardDirections(ds)


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
