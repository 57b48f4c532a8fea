"""Parameter updates: per-event and per-step collection, an on-disk store, a ring buffer.

Conventions (``convention`` attribute of every store)
-----------------------------------------------------
A training step minimises ``L = sum_e l_e`` over its reinforcement events ``e``
(the loss's normalisation is folded into each ``l_e``).

- ``sgd``  : event update ``u_e = -lr * grad l_e``. Then ``sum_e u_e = -lr * grad L``,
  the plain-SGD step the events jointly make.
- ``adam`` : ``u_e = -lr * grad l_e / (sqrt(v_hat) + eps)`` with ``v_hat`` the
  optimizer's bias-corrected second moment *after* the step (Adam's preconditioner
  applied to each event; the momentum term is left out: it mixes steps).
- step updates are always ``theta_after - theta_before`` of one optimizer step.

Per-event gradients of ``nn.Linear`` layers come from the RL step's own
forward/backward: a forward hook keeps each layer's input ``x`` and a tensor hook its
output gradient ``delta``; event ``e``'s weight gradient is ``sum_t delta_{e,t} x_{e,t}^T``
(one einsum for all events), never a loop over events.

Store format (public: any RL loop may write it)
-----------------------------------------------
A store is a folder of netCDF chunk files ``chunk-<first step>-<last step>.nc`` (or a
single ``.nc`` file). Each holds one data variable per parameter tensor with dims
``("event", <name>_dim0, ...)`` and attribute ``param`` (the parameter's name); event
labels are coordinates along ``event``; dataset attributes ``kind`` (``event`` or
``step``) and ``convention``. Chunks are written atomically, so a crash loses at most
the events not yet flushed and never corrupts a chunk.

Factored event updates (a linear layer's per-event gradient is ``sum_t delta_t x_t^T``): for a
matrix variable ``<var>``, two variables ``<var>__left`` with dims ``("event", "<var>_factor",
"<var>_dim0")`` and ``<var>__right`` with dims ``("event", "<var>_factor", "<var>_dim1")``, both with
attribute ``param``; the update is ``U_e = sum_f left[e, f] (outer) right[e, f]``. Events with fewer
factors are padded with all-zero rows (zero in both ``left`` and ``right``). A store may mix dense
and factored variables (vectors stay dense). :func:`densify` turns a range of events dense; the
collector writes factors with ``factored=True`` (exact: one factor per token; or compressed to
``max_rank`` factors, the kept fraction of ``||U_e||^2`` stored as the label ``<var>__kept``).
Example, by hand::

    L = np.random.randn(10, 3, 64)  # 10 events, 3 factors, d_out = 64
    R = np.random.randn(10, 3, 128)  # d_in = 128
    xr.Dataset(
        {"w__left": (("event", "w_factor", "w_dim0"), L, {"param": "layer.weight"}),
         "w__right": (("event", "w_factor", "w_dim1"), R, {"param": "layer.weight"})},
        coords={"step": ("event", np.zeros(10, int))},
        attrs={"kind": "event", "convention": "sgd"},
    ).to_netcdf("store.nc")

A store written by :class:`UpdateStore` also holds ``store.json``: the run's fingerprint,
the kind, and one entry per chunk (its steps, number of events and SHA-256). :func:`open_store`
checks the folder against it and refuses missing chunks (gaps), files it does not list
(foreign, copied or duplicated chunks), changed bytes, chunks of another run (their
``fingerprint`` attribute) and step labels outside the chunk's name, naming the chunk and
the fix. A folder of chunks without ``store.json`` (written by hand) and a single ``.nc`` file
are still accepted, with the step checks only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import xarray as xr
from torch import nn

from .common import fmt_bytes  # noqa: F401  (re-exported: the notebooks call updates.fmt_bytes)
from .io import NETCDF_ENGINE, atomic_write, provenance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORE_META = "store.json"
STORE_FORMAT = 2
CHUNK_RE = re.compile(r"chunk-(\d{8})-(\d{8})\.nc")
MAX_STORE_STEP = 99_999_999
"""The last step a chunk name holds (8 digits)."""


class StoreError(ValueError):
    """An update store is malformed or belongs to another run."""


# ---------------------------------------------------------------------------
# parameter selection


def select_params(model: nn.Module, patterns) -> dict[str, nn.Parameter]:
    """Parameters whose names match any glob in ``patterns`` (``*.mlp.*.weight``)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    named = dict(model.named_parameters())
    chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        sample = ", ".join(list(named)[:8])
        raise ValueError(f"no parameter matches {list(patterns)}; parameter names look like: {sample}")
    return chosen


def selection_summary(params: dict[str, torch.Tensor]) -> str:
    total = sum(p.numel() for p in params.values())
    lines = [f"{n}: {tuple(p.shape)}" for n, p in params.items()]
    return "\n".join(
        lines + [f"{len(params)} tensors, {total:,} parameters ({4 * total / 2**10:.1f} KiB per fp32 update)"]
    )


def var_name(param: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", param)


LEFT, RIGHT = "__left", "__right"


class Factored(NamedTuple):
    """A batch of factored matrix updates: ``U_e = sum_f left[e, f] (outer) right[e, f]``."""

    left: torch.Tensor
    """[events, factors, d_out]"""
    right: torch.Tensor
    """[events, factors, d_in]"""

    @property
    def n_events(self) -> int:
        return self.left.shape[0]

    @property
    def n_factors(self) -> int:
        return self.left.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of one event's matrix, ``(d_out, d_in)``."""
        return self.left.shape[2], self.right.shape[2]

    def dense(self) -> torch.Tensor:
        return torch.einsum("efo,efi->eoi", self.left, self.right)

    def take(self, idx) -> Factored:
        """The events ``idx`` selects (indices, a mask or a slice)."""
        return Factored(self.left[idx], self.right[idx])

    def to(self, *args, **kwargs) -> Factored:
        return Factored(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def scaled(self, c) -> Factored:
        """``c * U_e`` (``c`` a number or one per event)."""
        c = torch.as_tensor(c, dtype=self.left.dtype, device=self.left.device)
        return Factored(self.left * (c.view(-1, 1, 1) if c.ndim else c), self.right)

    def minus(self, other: Factored) -> Factored:
        """``U_e - V_e`` as one factored batch (the factors of both, ``other``'s left side negated)."""
        return Factored(torch.cat([self.left, -other.left], 1), torch.cat([self.right, other.right], 1))

    def detach(self) -> Factored:
        return Factored(self.left.detach(), self.right.detach())

    def sq_norms(self) -> torch.Tensor:
        """||U_e||_F^2 per event from the factors' Gram matrices, never forming U_e."""
        gl = self.left @ self.left.transpose(1, 2)
        gr = self.right @ self.right.transpose(1, 2)
        return (gl * gr).sum((1, 2))

    def event_sum(self) -> torch.Tensor:
        """``sum_e U_e``: one dense [d_out, d_in] matrix for the whole batch (one matmul over all factors)."""
        return self.left.reshape(-1, self.left.shape[2]).T @ self.right.reshape(-1, self.right.shape[2])


def pad_factors(f: Factored, m: int) -> Factored:
    """``f`` with its factor axis padded by zero rows to ``m`` factors (the same updates)."""
    pad = (0, 0, 0, m - f.n_factors)
    return Factored(torch.nn.functional.pad(f.left, pad), torch.nn.functional.pad(f.right, pad))


def cat_factored(parts: list[Factored]) -> Factored:
    """Concatenate batches of factored updates along ``event``, padding the factor axis with zero rows to
    the largest factor count."""
    m = max(f.n_factors for f in parts)
    padded = [pad_factors(f, m) for f in parts]
    return Factored(torch.cat([f.left for f in padded]), torch.cat([f.right for f in padded]))


def _tensors(v) -> tuple:
    return (v.left, v.right) if isinstance(v, Factored) else (v,)


def take(v, idx):
    """Events ``idx`` of a dense [event, ...] tensor or a Factored batch."""
    return v.take(idx) if isinstance(v, Factored) else v[idx]


def n_events(data: dict) -> int:
    """Number of events of a ``{name: tensor or Factored}`` batch."""
    v = next(iter(data.values()))
    return v.n_events if isinstance(v, Factored) else v.shape[0]


def best_rank(f: Factored, rank: int) -> tuple[Factored, torch.Tensor]:
    """The best rank-``rank`` approximation of every event (Eckart-Young), by a thin QR of both sides and
    an SVD of the small core: exactly ``rank`` factors per event (zero rows where an event's rank is
    lower), singular values split evenly (each factor pair has equal norms), ordered by singular value;
    and the kept fraction of ``||U_e||^2`` (1 for an all-zero event)."""
    Ql, Rl = torch.linalg.qr(f.left.transpose(1, 2))  # left^T = Ql Rl: [E, d_out, m], [E, m, m]
    Qr, Rr = torch.linalg.qr(f.right.transpose(1, 2))  # right^T = Qr Rr
    u, sv, vh = torch.linalg.svd(Rl @ Rr.transpose(1, 2))  # U_e = Ql (Rl Rr^T) Qr^T
    r = min(rank, sv.shape[1])
    s = sv[:, None, :r].sqrt()
    left = (Ql @ u[:, :, :r]) * s  # [E, d_out, r]
    right = (Qr @ vh[:, :r, :].transpose(1, 2)) * s
    total = (sv**2).sum(1)
    kept = torch.where(total > 0, (sv[:, :r] ** 2).sum(1) / total.clamp(min=1e-300), torch.ones_like(total))
    pad = (0, 0, 0, rank - r)
    out = Factored(*(torch.nn.functional.pad(t.transpose(1, 2), pad).contiguous() for t in (left, right)))
    return out, kept


def factorize(delta: torch.Tensor, x: torch.Tensor, max_rank: int | None = None) -> tuple[Factored, torch.Tensor]:
    """Per-event factors of ``U_e = sum_t delta[e, t] x[e, t]^T`` (delta [E, T, d_out], x [E, T, d_in]).

    ``max_rank=None``: exact, one factor per token. Otherwise at most ``max_rank`` factors per event
    (:func:`best_rank`: the best rank-``max_rank`` approximation of U_e); returns the factors and the kept
    fraction of ||U_e||^2 per event (1 when exact or when the event's rank is within ``max_rank``).
    """
    delta, x = delta.float(), x.float()
    live = (delta.any(-1) & x.any(-1)).unsqueeze(-1)  # a token with zero delta (masked) or zero x adds nothing:
    delta, x = delta * live, x * live  # zero both sides, as padding rows are
    exact = Factored(delta, x)
    if max_rank is None or max_rank >= delta.shape[1]:
        return exact, torch.ones(delta.shape[0])
    return best_rank(exact, max_rank)


def factor_pairs(ds: xr.Dataset) -> dict[str, tuple[str, str]]:
    """``{var: (left var, right var)}`` of a store's factored matrix variables."""
    return {v[: -len(LEFT)]: (v, v[: -len(LEFT)] + RIGHT) for v in ds.data_vars if v.endswith(LEFT)}


def densify(ds: xr.Dataset, events=None) -> xr.Dataset:
    """The store (or the ``events`` it selects: a slice or indices) with every factored variable made
    dense: ``<var>`` with dims ``("event", "<var>_dim0", "<var>_dim1")``; dense variables and labels as
    they are."""
    if events is not None:
        ds = ds.isel(event=events)
    out = ds
    for var, (lv, rv) in factor_pairs(ds).items():
        U = np.einsum("efo,efi->eoi", np.asarray(ds[lv].values), np.asarray(ds[rv].values))
        out = out.drop_vars([lv, rv])
        out[var] = xr.Variable(("event", f"{var}_dim0", f"{var}_dim1"), U.astype(np.float32), dict(ds[lv].attrs))
        out = out.drop_dims(f"{var}_factor", errors="ignore")
    return out


# ---------------------------------------------------------------------------
# ring buffer


class RingBuffer:
    """Fixed-capacity buffer of the most recent updates (flattened per parameter).

    Matrices named in ``factored`` are held as :class:`Factored` events: memory per event
    ``factors * (d_out + d_in)`` instead of ``d_out * d_in``; the factor axis grows to the largest
    factor count added (events with fewer are padded with zero rows), and ``sample`` returns them
    factored.
    """

    def __init__(self, shapes: dict[str, tuple], capacity: int, dtype=torch.float32, factored=()):
        if capacity < 1:
            raise ValueError(f"ring buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.shapes = capacity, dict(shapes)
        self.factored = [n for n in shapes if n in set(factored)]
        for n in self.factored:
            if len(self.shapes[n]) != 2:
                raise ValueError(f"ring buffer: {n!r} has shape {self.shapes[n]}; only matrices can be factored")
        self.data = {
            n: Factored(torch.zeros((capacity, 0, s[0]), dtype=dtype), torch.zeros((capacity, 0, s[1]), dtype=dtype))
            if n in self.factored
            else torch.zeros((capacity, *s), dtype=dtype)
            for n, s in shapes.items()
        }
        self.labels: dict[str, np.ndarray] = {}
        self.size = 0
        self.cursor = 0
        self.total_added = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.data.values() for t in _tensors(v))

    def add(self, updates: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> None:
        first_value = next(iter(updates.values()))
        n = first_value.n_events if isinstance(first_value, Factored) else first_value.shape[0]
        first = max(0, n - self.capacity)  # more events than capacity: only the last `capacity` stay
        idx = (self.cursor + torch.arange(first, n)) % self.capacity
        for k, v in updates.items():
            if k in self.factored:
                if not isinstance(v, Factored):
                    raise TypeError(f"ring buffer: {k!r} holds factored events; got a dense tensor")
                buf = self.data[k]
                m = max(buf.n_factors, v.n_factors)
                buf, v = pad_factors(buf, m), pad_factors(v, m)
                v = v.take(slice(first, None))
                buf.left[idx], buf.right[idx] = v.left.to(buf.left.dtype), v.right.to(buf.right.dtype)
                self.data[k] = buf
            else:
                if isinstance(v, Factored):
                    v = v.dense()
                self.data[k][idx] = v[first:].to(self.data[k].dtype)
        for k, v in labels.items():
            if np.asarray(v).dtype.kind in "OUS":  # text labels stay in the stores, not the buffer
                continue
            if k not in self.labels:
                self.labels[k] = np.zeros(self.capacity, dtype=np.asarray(v).dtype)
            self.labels[k][idx.numpy()] = np.asarray(v)[first:]
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.total_added += n

    def contents(self) -> dict:
        """The events held now (oldest slots first as stored): ``{name: tensor or Factored}``, float32."""
        return {k: take(v, slice(0, self.size)).to(torch.float32) for k, v in self.data.items()}

    def sample(self, n: int, generator: torch.Generator) -> dict:
        if self.size == 0:
            raise ValueError("ring buffer is empty")
        idx = torch.randint(self.size, (n,), generator=generator)
        return {k: take(v, idx).to(torch.float32) for k, v in self.data.items()}

    def save(self, path) -> None:
        """Contents and position into folder ``path`` (part of an RL checkpoint)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k, v in self.data.items():
            if isinstance(v, Factored):
                tensors[k + LEFT], tensors[k + RIGHT] = v.left.contiguous(), v.right.contiguous()
            else:
                tensors[k] = v.contiguous()
        save_file(tensors, str(path / "data.safetensors"))
        np.savez(path / "labels.npz", **self.labels)
        (path / "state.json").write_text(
            json.dumps(
                {
                    "size": self.size,
                    "cursor": self.cursor,
                    "total_added": self.total_added,
                    "capacity": self.capacity,
                    "shapes": {k: list(v) for k, v in self.shapes.items()},
                    "factored": self.factored,
                }
            )
        )

    def load(self, path) -> None:
        """Restore what ``save`` wrote; the buffer must have the same capacity and tensors."""
        from safetensors.torch import load_file

        path = Path(path)
        st = json.loads((path / "state.json").read_text())
        same = st["capacity"] == self.capacity and st["shapes"] == {k: list(v) for k, v in self.shapes.items()}
        if not same or st.get("factored", []) != self.factored:
            raise ValueError(
                f"{path} holds a ring buffer of capacity {st['capacity']} over {st['shapes']} (factored: "
                f"{st.get('factored', [])}); this one has capacity {self.capacity} over {self.shapes} (factored: "
                f"{self.factored})"
            )
        data = load_file(str(path / "data.safetensors"))
        self.data = {
            k: Factored(data[k + LEFT].to(v.left.dtype), data[k + RIGHT].to(v.right.dtype))
            if isinstance(v, Factored)
            else data[k].to(v.dtype)
            for k, v in self.data.items()
        }
        with np.load(path / "labels.npz") as z:
            self.labels = {k: z[k] for k in z.files}
        self.size, self.cursor, self.total_added = st["size"], st["cursor"], st["total_added"]


# ---------------------------------------------------------------------------
# on-disk store


class UpdateStore:
    """Appends updates to a folder of netCDF chunks; one store = one run's updates of one kind."""

    def __init__(
        self,
        path,
        kind: str,
        convention: str,
        fingerprint: str,
        dtype: str = "float32",
        config=None,
        seed=None,
        attrs=None,
    ):
        if kind not in ("event", "step"):
            raise ValueError(f"kind must be 'event' or 'step', got {kind!r}")
        self.path = Path(path)
        self.kind, self.convention, self.dtype = kind, convention, dtype
        self.attrs = {
            **provenance(config, seed),
            "kind": kind,
            "convention": convention,
            "fingerprint": fingerprint,
            **(attrs or {}),
        }
        self._pending_updates: dict[str, list] = {}
        self._pending_labels: dict[str, list] = {}
        self._pending_steps: list[int] = []
        meta = self.path / STORE_META
        if self.path.is_dir():
            for f in self.path.glob("*.tmp"):  # left by a write a kill interrupted (first store.json included)
                if f.is_file():
                    f.unlink()
        if meta.exists():
            old = _read_meta(self.path)
            if old.get("fingerprint") != fingerprint or old.get("kind") != kind:
                raise StoreError(
                    f"{self.path} already holds {old.get('kind')} updates of another run "
                    f"(fingerprint {old.get('fingerprint')}, this run {fingerprint}); "
                    "choose another out_dir, or delete that folder if its updates are no longer wanted"
                )
            if old.get("format") != STORE_FORMAT or not isinstance(old.get("chunks"), dict):
                raise StoreError(
                    f"{self.path} was written by an older shardlib (no chunk list in {STORE_META}); "
                    "delete that folder and rerun the stage that writes it"
                )
            self._manifest = old
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise StoreError(
                    f"{self.path} is not empty and holds no {STORE_META}: refusing to write an update store there"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            self._manifest = {"format": STORE_FORMAT, "fingerprint": fingerprint, "kind": kind, "chunks": {}}
            self._save_manifest()

    def _save_manifest(self) -> None:
        text = json.dumps(self._manifest, indent=1, sort_keys=True)
        atomic_write(self.path / STORE_META, lambda t: Path(t).write_text(text))

    def chunks(self) -> list[Path]:
        return sorted(self.path.glob("chunk-*.nc"))

    def truncate_from(self, step: int) -> None:
        """Drop stored events with ``step >= step`` (resuming from a checkpoint at ``step``).

        Chunk files the chunk list does not hold yet (a kill between writing a chunk and listing
        it) always start after the last checkpoint, and are removed here too."""
        self._pending_updates, self._pending_labels, self._pending_steps = {}, {}, []
        listed = self._manifest["chunks"]
        for f in self.chunks():
            m = CHUNK_RE.fullmatch(f.name)
            if m is None:
                continue
            first, last = int(m[1]), int(m[2])
            if f.name not in listed:
                if first >= step:
                    f.unlink()
                continue
            if first >= step:
                del listed[f.name]
                self._save_manifest()
                f.unlink()
            elif last >= step:  # the trimmed copy is written and listed before the original goes
                with xr.open_dataset(f, engine=NETCDF_ENGINE) as ds:
                    keep = ds.isel(event=np.flatnonzero(ds["step"].values < step)).load()
                self._write(keep, first, step - 1, replaces=f.name)
                f.unlink()

    def append(self, updates: dict[str, torch.Tensor | Factored], labels: dict[str, np.ndarray], step: int) -> None:
        """Queue one step's updates (dense tensors [event, *shape], or :class:`Factored`) and labels."""
        for k, v in updates.items():
            if isinstance(v, Factored):
                v = Factored(*(t.detach().to("cpu", DTYPES[self.dtype]) for t in v))
            else:
                v = v.detach().to("cpu", DTYPES[self.dtype])
            self._pending_updates.setdefault(k, []).append(v)
        for k, v in labels.items():
            self._pending_labels.setdefault(k, []).append(np.asarray(v))
        self._pending_steps.append(step)

    def flush(self) -> None:
        if not self._pending_steps:
            return
        first, last = min(self._pending_steps), max(self._pending_steps)
        data_vars = {}
        for name, parts in self._pending_updates.items():
            vn = var_name(name)
            if isinstance(parts[0], Factored):
                f = cat_factored(parts)
                for t, suffix, dim in ((f.left, LEFT, 0), (f.right, RIGHT, 1)):
                    dims = ("event", f"{vn}_factor", f"{vn}_dim{dim}")
                    data_vars[vn + suffix] = xr.Variable(dims, t.float().numpy(), attrs={"param": name})
                continue
            arr = torch.cat(parts)
            if arr.dtype == torch.bfloat16:  # netCDF has no bfloat16: store the exact values as float32
                arr = arr.float()
            a = arr.numpy()
            dims = ("event",) + tuple(f"{vn}_dim{i}" for i in range(a.ndim - 1))
            data_vars[vn] = xr.Variable(dims, a, attrs={"param": name})
        coords = {k: ("event", np.concatenate(v)) for k, v in self._pending_labels.items()}
        ds = xr.Dataset(data_vars, coords=coords)
        self._write(ds, first, last)
        self._pending_updates, self._pending_labels, self._pending_steps = {}, {}, []

    def _write(self, ds: xr.Dataset, first: int, last: int, replaces: str | None = None) -> None:
        """Write one chunk atomically, then list it (steps, events, SHA-256) in ``store.json``, dropping the
        entry of the chunk it ``replaces`` in the same write."""
        if not 0 <= first <= last <= MAX_STORE_STEP:
            raise StoreError(
                f"{self.path}: steps {first}-{last} cannot name a chunk (steps 0 to {MAX_STORE_STEP}); number steps from 0"
            )
        ds.attrs.update(self.attrs)
        ds.attrs["store_dtype"] = self.dtype
        f = self.path / f"chunk-{first:08d}-{last:08d}.nc"
        entry = {"first": int(first), "last": int(last), "events": int(ds.sizes.get("event", 0))}

        def write(tmp):
            ds.to_netcdf(tmp, engine=NETCDF_ENGINE)
            entry["sha256"] = file_sha256(tmp)

        atomic_write(f, write)
        if replaces is not None:
            self._manifest["chunks"].pop(replaces, None)
        self._manifest["chunks"][f.name] = entry
        self._save_manifest()

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.chunks())


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / STORE_META).read_text())
    except (OSError, ValueError) as e:
        raise StoreError(
            f"{folder / STORE_META} is unreadable ({e}); the store's chunk list is lost: rerun the stage that "
            "wrote the store"
        ) from None
    if not isinstance(meta, dict):
        raise StoreError(f"{folder / STORE_META} is not a JSON object; rerun the stage that wrote the store")
    chunks = meta.get("chunks")
    for name, e in chunks.items() if isinstance(chunks, dict) else ():
        bad = [k for k, t in MANIFEST_ENTRY.items() if not isinstance(e, dict) or not isinstance(e.get(k), t)]
        if bad or isinstance(e.get("events"), bool) or CHUNK_RE.fullmatch(str(name)) is None:
            what = f"lacks or mistypes {bad}" if bad else "is malformed"
            raise StoreError(
                f"{folder / STORE_META}: the entry of chunk {str(name)[:80]!r} {what} (each lists first, last, events and "
                "sha256 of a chunk-<first>-<last>.nc): it was edited or damaged; rerun the stage that wrote the store"
            )
    return meta


MANIFEST_ENTRY = {"first": int, "last": int, "events": int, "sha256": str}
"""What ``store.json`` lists for each chunk, and the type of each."""


def _check_chunk_files(folder: Path, files: list[Path], verify: bool) -> dict:
    """Check a store folder's chunk files against its ``store.json`` chunk list."""
    meta = _read_meta(folder)
    fix = "rerun the stage that wrote the store (its folder is rebuilt), or delete the file if you added it by hand"
    if meta.get("format") != STORE_FORMAT or not isinstance(meta.get("chunks"), dict):
        raise StoreError(
            f"{folder}: {STORE_META} holds no chunk list (written by an older shardlib); "
            "rerun the stage that wrote the store"
        )
    listed = meta["chunks"]
    names = {f.name for f in files}
    for f in files:
        if f.name not in listed:
            raise StoreError(
                f"{f} is not part of this store ({STORE_META} does not list it): a copied, foreign or "
                f"half-written chunk; {fix}"
            )
    for name, e in sorted(listed.items()):
        if name not in names:
            raise StoreError(
                f"{folder / name} (steps {e['first']}-{e['last']}, {e['events']} events) is missing: the store "
                "has a gap; restore that file, or rerun the stage that wrote the store"
            )
        if verify and file_sha256(folder / name) != e["sha256"]:
            raise StoreError(
                f"{folder / name} differs from the chunk the run wrote (SHA-256 mismatch): it was replaced or "
                "corrupted on disk; restore it, or rerun the stage that wrote the store"
            )
    return meta


def _check_chunk(ds: xr.Dataset, f: Path, meta: dict | None) -> tuple[int, int] | None:
    """Steps a chunk's name promises against its ``step`` labels, its run against the store's."""
    m = CHUNK_RE.fullmatch(f.name)
    if meta is not None:
        e = meta["chunks"][f.name]
        if ds.attrs.get("fingerprint") != meta.get("fingerprint"):
            raise StoreError(
                f"{f} comes from another run (fingerprint {ds.attrs.get('fingerprint')!r}, the store's "
                f"{meta.get('fingerprint')!r}); restore the store's own chunk, or rerun the stage that wrote it"
            )
        if ds.sizes.get("event") != e["events"]:
            raise StoreError(
                f"{f} holds {ds.sizes.get('event')} events, the store lists {e['events']}; rerun the stage that wrote it"
            )
    if m is None:
        return None
    first, last = int(m[1]), int(m[2])
    if "step" in ds.coords and ds.sizes.get("event", 0):
        steps = np.asarray(ds["step"].values)
        if steps.min() < first or steps.max() > last:
            raise StoreError(
                f"{f}: its step labels run {int(steps.min())}-{int(steps.max())}, outside the steps "
                f"{first}-{last} its name promises; the chunk was renamed or edited: restore it, or rerun the stage"
            )
    return first, last


def open_store(path, lazy_above_bytes: int = 2**30, verify: bool = True) -> xr.Dataset:
    """Open an update store (folder of chunks or one ``.nc`` file) as one Dataset along ``event``.

    Lazy (dask chunks) when the files are larger than ``lazy_above_bytes``. Rejects a store
    with no parameter variables, wrong dims, NaN/Inf updates or mismatched label lengths,
    naming the variable and the problem. A folder is checked against its ``store.json``
    (gaps, unlisted or foreign chunks, and with ``verify`` each chunk's SHA-256), and its
    chunks' step ranges must not overlap.
    """
    path = Path(path)
    meta = None
    if path.is_dir():
        files = sorted(path.glob("*.nc"))
        if (path / STORE_META).exists():
            meta = _check_chunk_files(path, files, verify)
        elif any(CHUNK_RE.fullmatch(f.name) for f in files):
            odd = [f.name for f in files if not CHUNK_RE.fullmatch(f.name)]
            if odd:
                raise StoreError(
                    f"{path}: {odd} are not chunk files (chunk-<first step>-<last step>.nc) beside the "
                    "chunks; move them out of the store folder"
                )
    elif path.exists():
        files = [path]
    else:
        raise StoreError(f"update store {path} does not exist; pass a store folder or a .nc file")
    if not files:
        raise StoreError(f"update store {path} holds no .nc files")
    size = sum(f.stat().st_size for f in files)
    lazy = size > lazy_above_bytes
    parts, ranges, steps = [], [], []
    for f in files:
        try:
            ds = xr.open_dataset(f, engine=NETCDF_ENGINE, chunks={} if lazy else None)
        except Exception as e:
            raise StoreError(f"{f} is not a readable netCDF file: {str(e).splitlines()[0]}") from e
        validate_store(ds, where=str(f))
        r = _check_chunk(ds, f, meta)
        if r is not None:
            ranges.append((r, f))
        if "step" in ds.coords:
            steps.append((f, np.unique(np.asarray(ds["step"].values))))
        parts.append(ds if lazy else ds.load())
        if not lazy:
            ds.close()
    _check_no_overlaps(path, ranges, steps)
    if len(parts) > 1:
        parts = _pad_factors(parts)
    out = (
        parts[0]
        if len(parts) == 1
        else xr.concat(
            parts, dim="event", data_vars="all", coords="different", compat="equals", combine_attrs="override"
        )
    )
    return out


def _check_no_overlaps(path: Path, ranges: list, steps: list) -> None:
    """No step stored twice: neither by the step ranges chunk names promise nor by the files' ``step`` labels
    (a folder without ``store.json`` may hold a copy of a chunk under any name)."""
    ranges.sort()
    for ((a0, a1), fa), ((b0, b1), fb) in itertools.pairwise(ranges):
        if b0 <= a1:
            raise StoreError(
                f"{fb.name} (steps {b0}-{b1}) overlaps {fa.name} (steps {a0}-{a1}) in {path}: the same steps "
                "stored twice; remove the copy, or rerun the stage that wrote the store"
            )
    owner: dict[int, Path] = {}
    for f, labels in steps:
        for step in labels.tolist():
            if owner.setdefault(step, f) != f:
                raise StoreError(
                    f"{f.name} and {owner[step].name} in {path} both hold events of step {step}: the same steps stored "
                    "twice; remove the copy, or rerun the stage that wrote the store"
                )


def _pad_factors(parts: list[xr.Dataset]) -> list[xr.Dataset]:
    """Chunks whose events have different numbers of factors: pad with zero rows to the largest."""
    dims = {f"{v}_factor" for p in parts for v in factor_pairs(p)}
    size = {d: max(p.sizes.get(d, 0) for p in parts) for d in dims}
    out = []
    for p in parts:
        pad = {d: (0, size[d] - p.sizes[d]) for d in dims if d in p.dims and p.sizes[d] < size[d]}
        if pad:
            keep = [v for v in p.data_vars if not (set(p[v].dims) & set(pad))]
            padded = p.drop_vars(keep).pad(pad, constant_values=0.0)
            p = xr.merge([p[keep], padded], combine_attrs="override")
        out.append(p)
    return out


def update_vars(ds: xr.Dataset) -> list[str]:
    """Names of the store's dense parameter variables (those with a ``param`` attribute; factored
    variables are listed by :func:`factor_pairs`)."""
    return [v for v in ds.data_vars if "param" in ds[v].attrs and not v.endswith((LEFT, RIGHT))]


def validate_store(ds: xr.Dataset, where: str = "store") -> None:
    if ds.attrs.get("kind") not in ("event", "step"):
        raise StoreError(f"{where}: dataset attribute 'kind' must be 'event' or 'step', got {ds.attrs.get('kind')!r}")
    names = update_vars(ds)
    pairs = factor_pairs(ds)
    if not names and not pairs:
        raise StoreError(f"{where}: no parameter variable (a data variable with attribute 'param') found")
    if "event" not in ds.dims:
        raise StoreError(f"{where}: no 'event' dimension")
    _validate_factors(ds, pairs, names, where)
    n = ds.sizes["event"]
    for v in names:
        if ds[v].dims[0] != "event":
            raise StoreError(f"{where}: variable {v!r} has dims {ds[v].dims}; the first must be 'event'")
        vals = ds[v].data
        finite = np.isfinite(vals).all()
        if hasattr(finite, "compute"):
            finite = finite.compute()
        if not bool(finite):
            raise StoreError(f"{where}: variable {v!r} holds NaN or Inf updates")
    names = names + [v for p in pairs.values() for v in p]
    tensor_dims = {d for v in names for d in ds[v].dims[1:]}
    labels = [c for c in list(ds.coords) + list(ds.data_vars) if c not in names and c != "event"]
    for c in labels:
        dims = ds[c].dims
        if dims == ("event",) or (dims and set(dims) <= tensor_dims):
            continue
        size = ds[c].size
        raise StoreError(
            f"{where}: label {c!r} has dims {dims} ({size} values) but the store has {n} events; "
            "labels must be 1-d along 'event', one value per event"
        )


def _validate_factors(ds: xr.Dataset, pairs: dict, dense: list[str], where: str) -> None:
    orphans = [v for v in ds.data_vars if v.endswith(RIGHT) and v[: -len(RIGHT)] not in pairs]
    if orphans:
        raise StoreError(f"{where}: {orphans} have no matching '{LEFT}' variable; a factored update needs both")
    for var, (lv, rv) in pairs.items():
        if rv not in ds:
            raise StoreError(f"{where}: {lv!r} has no matching {rv!r}; a factored update needs both")
        want_l, want_r = ("event", f"{var}_factor", f"{var}_dim0"), ("event", f"{var}_factor", f"{var}_dim1")
        if ds[lv].dims != want_l or ds[rv].dims != want_r:
            raise StoreError(
                f"{where}: factored variable {var!r} has dims {ds[lv].dims} and {ds[rv].dims}; "
                f"expected {want_l} and {want_r}"
            )
        pl, pr = ds[lv].attrs.get("param"), ds[rv].attrs.get("param")
        if pl is None or pl != pr:
            raise StoreError(f"{where}: {lv!r} and {rv!r} must carry the same 'param' attribute (got {pl!r}, {pr!r})")
        if var in dense or any(ds[v].attrs["param"] == pl for v in dense):
            raise StoreError(f"{where}: parameter {pl!r} is stored both dense and factored; keep one")
        L, R = np.asarray(ds[lv].values), np.asarray(ds[rv].values)
        if not (np.isfinite(L).all() and np.isfinite(R).all()):
            raise StoreError(f"{where}: factored variable {var!r} holds NaN or Inf")
        zl, zr = ~L.any(2), ~R.any(2)  # all-zero factor rows
        bad = np.flatnonzero((zl != zr).any(1))
        if len(bad):
            raise StoreError(
                f"{where}: factored variable {var!r}: event(s) {bad[:5].tolist()} pad a factor row on one side "
                "only; padding rows must be zero in both __left and __right"
            )


def flat_updates(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """``{param name: array [event, *shape]}`` of a store."""
    ds = densify(ds)
    return {ds[v].attrs["param"]: np.asarray(ds[v].values, dtype=np.float32) for v in update_vars(ds)}


# ---------------------------------------------------------------------------
# the collector


def check_convention(convention: str, factored: bool) -> None:
    """The event-update convention is known, and factored events are plain sgd (what every collector checks
    before it is built)."""
    if convention not in ("sgd", "adam"):
        raise ValueError(f"convention must be 'sgd' or 'adam', got {convention!r}")
    if factored and convention == "adam":
        raise ValueError(
            "factored=True needs convention='sgd': Adam's elementwise preconditioner does not keep an "
            "event update factored (collect factored sgd events, or dense adam events)"
        )


class UpdateCollector:
    """Collects per-event and per-step updates of selected parameters from any PyTorch loop.

    Usage in a hand-written loop::

        col = UpdateCollector(model, ["*.weight"], lr=1e-3, event_store=store)
        with col.capture():
            loss = per_event_losses.sum()
            loss.backward()
        col.before_step(); opt.step(); col.after_step(step, labels)

    Per-event updates need every selected parameter to be an ``nn.Linear`` weight or bias. ``lr`` is one
    learning rate, or one per selected parameter (``{name: lr}``); a loop with a schedule sets ``col.lr``
    before each ``after_step``.
    """

    def __init__(
        self,
        model: nn.Module,
        params,
        *,
        lr: float | dict[str, float],
        optimizer=None,
        convention: str = "sgd",
        event_store: UpdateStore | None = None,
        step_store: UpdateStore | None = None,
        buffer: RingBuffer | None = None,
        events: bool = True,
        scale: float = 1.0,
        every: int = 1,
        group_by: str | None = None,
        factored: bool = False,
        max_rank: int | None = None,
    ):
        check_convention(convention, factored)
        if factored and group_by is not None:
            raise ValueError("factored=True with group_by is not supported yet: collect per-completion events")
        if max_rank is not None and max_rank < 1:
            raise ValueError(f"max_rank must be >= 1 (or None: exact), got {max_rank}")
        if convention == "adam" and optimizer is None:
            raise ValueError("convention='adam' needs the optimizer (its second moments precondition each event)")
        self.model, self.lr, self.optimizer, self.convention = model, lr, optimizer, convention
        self.params = select_params(model, params)
        self.event_store, self.step_store, self.buffer = event_store, step_store, buffer
        self.events, self.scale, self.every, self.group_by = events, scale, every, group_by
        self.factored, self.max_rank = factored, max_rank
        self._kept: list[dict[str, torch.Tensor]] = []
        self._linear = {}
        if events:
            owners = param_owners(model)
            bad = [n for n in self.params if not isinstance(owners[n][1], nn.Linear)]
            if bad:
                raise ValueError(non_linear_message(model, bad, owners))
            for n in self.params:
                mname, mod, pname = owners[n]
                self._linear.setdefault(mname, (mod, {}))[1][pname] = n
        self._pairs: dict[str, list] = {}
        self._forwards: dict[str, int] = {}
        self._event_grads: list[dict[str, torch.Tensor]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._handles = []

    def active(self, step: int) -> bool:
        return step % self.every == 0

    @contextmanager
    def capture(self, enabled: bool = True):
        """Record the (layer input, output gradient) pairs of one forward/backward.

        A pair is kept when the layer's output receives its gradient (a tensor hook set by the forward hook
        holds the input until then), so forwards that never get a gradient do not count: generation, log-prob
        passes under ``no_grad``, and the first or the recompute forward of gradient checkpointing (reentrant
        or not: whichever output the gradient reaches is the one kept).
        """
        if not (enabled and self.events):
            yield
            return
        self._pairs = {m: [] for m in self._linear}
        self._forwards = dict.fromkeys(self._linear, 0)

        def fwd_hook(mname):
            def hook(mod, inputs, output):
                self._forwards[mname] += 1
                if not (isinstance(output, torch.Tensor) and output.requires_grad):
                    return
                x = inputs[0].detach()

                def on_grad(g, x=x):
                    self._pairs[mname].append((x, g.detach()))

                output.register_hook(on_grad)

            return hook

        handles = [mod.register_forward_hook(fwd_hook(m)) for m, (mod, _) in self._linear.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._event_grads.append(self._per_event_grads())

    def _per_event_grads(self) -> dict[str, torch.Tensor]:
        out, kept = {}, {}
        for mname, (_mod, pnames) in self._linear.items():
            pairs = self._pairs[mname]
            if len(pairs) != 1:
                why = (
                    "its output received no gradient (was the layer called as a module, and did the loss depend on it?)"
                    if not pairs
                    else f"{len(pairs)} of its outputs received a gradient: the layer is used several times in one "
                    "forward (a shared module), or several backwards ran"
                )
                raise RuntimeError(
                    f"layer {mname} ran {self._forwards[mname]} forward(s) inside one capture and {why}; capture "
                    "exactly one forward and backward whose gradient reaches the layer once"
                )
            x, d = pairs[0]
            x, d = x.float(), d.float()
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            d = d.reshape(d.shape[0], -1, d.shape[-1])
            for pname, full in pnames.items():
                if pname == "weight" and self.factored:
                    out[full], kept[var_name(full) + "__kept"] = factorize(d * self.scale, x, self.max_rank)
                elif pname == "weight":
                    out[full] = torch.einsum("nto,nti->noi", d, x) * self.scale
                else:
                    out[full] = d.sum(1) * self.scale
        self._pairs, self._forwards = {}, {}
        if kept:
            self._kept.append(kept)
        return out

    def before_step(self) -> None:
        if self.step_store is not None:
            self._before = {n: p.detach().float().clone() for n, p in self.params.items()}

    def event_gradients(self) -> dict[str, torch.Tensor]:
        """Raw per-event gradients captured since the last step, concatenated over micro-batches."""
        if not self._event_grads:
            return {}
        out = {}
        for n, first in self._event_grads[0].items():
            parts = [g[n] for g in self._event_grads]
            # micro-batches of different lengths: cat_factored pads the factor axis
            out[n] = cat_factored(parts) if isinstance(first, Factored) else torch.cat(parts)
        return out

    def _preconditioner(self, name: str) -> torch.Tensor:
        p = self.params[name]
        state = self.optimizer.state[p]
        group = next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))
        beta2, eps = group["betas"][1], group["eps"]
        t = float(state["step"])
        v_hat = state["exp_avg_sq"].float() / (1 - beta2**t)
        return 1.0 / (v_hat.sqrt() + eps)

    def after_step(
        self, step: int, labels: dict[str, np.ndarray] | None = None, gather=None
    ) -> dict[str, torch.Tensor]:
        """Turn captured gradients into event updates and the parameter change into a step update.

        ``gather`` (e.g. ``accelerator.gather``) collects tensors from every process.
        Returns the event updates (after the convention) of this step.
        """
        updates = {}
        if self._event_grads:
            grads = self.event_gradients()
            self._event_grads = []
            for n, g in grads.items():
                lr = self.lr[n] if isinstance(self.lr, dict) else self.lr
                if isinstance(g, Factored):
                    updates[n] = Factored(-lr * g.left, g.right)
                    continue
                u = -lr * g
                if self.convention == "adam":
                    u = u * self._preconditioner(n).to(u.device)
                updates[n] = u
            if self._kept:
                labels = dict(labels or {})
                for key in self._kept[0]:
                    labels[key] = torch.cat([k[key] for k in self._kept]).cpu().numpy()
                self._kept = []
            if gather is not None and self.factored:
                raise NotImplementedError(
                    "factored event updates from several processes are not gathered yet; run one process, or "
                    "collect dense events"
                )
            if gather is not None:
                updates = {n: gather(u.contiguous()) for n, u in updates.items()}
            updates = {
                n: Factored(u.left.cpu(), u.right.cpu()) if isinstance(u, Factored) else u.cpu()
                for n, u in updates.items()
            }
            if self.group_by is not None and labels:
                updates, labels = group_events(updates, labels, self.group_by)
            if self.event_store is not None:
                self.event_store.append(updates, labels or {}, step)
            if self.buffer is not None:  # factored where the buffer holds factored events, else made dense
                self.buffer.add(updates, {k: v for k, v in (labels or {}).items() if not k.endswith("__kept")})
        if self.step_store is not None and self._before:
            delta = {n: (p.detach().float() - self._before[n]).cpu()[None] for n, p in self.params.items()}
            self.step_store.append(delta, {"step": np.array([step])}, step)
            self._before = {}
        return updates

    def flush(self) -> None:
        for s in (self.event_store, self.step_store):
            if s is not None:
                s.flush()


def param_owners(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """``{parameter name: (module name, module, the parameter's name in it)}``."""
    owners = {}
    for mname, mod in model.named_modules():
        for pname, _p in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = (mname, mod, pname)
    return owners


def linear_patterns(model: nn.Module, exclude=()) -> list[str]:
    """Glob patterns covering the ``nn.Linear`` weights of ``model`` (but the modules named in ``exclude``):
    layer indices become ``*`` (``model.layers.*.mlp.down_proj.weight``), in module order."""
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mname not in exclude:
            pat = re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", f"{mname}.weight")
            if pat not in out:
                out.append(pat)
    return out


def non_linear_message(model: nn.Module, bad: list[str], owners: dict, exclude=()) -> str:
    """Why parameters ``bad`` (not owned by an ``nn.Linear``) cannot have per-event updates, and what can
    (the Linear layers but those named in ``exclude``)."""
    shown = ", ".join(f"{n!r} ({type(owners[n][1]).__name__})" for n in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    linear = linear_patterns(model, exclude)
    can = ", ".join(repr(p) for p in linear[:12]) + (" ..." if len(linear) > 12 else "")
    return (
        f"per-event updates need nn.Linear parameters; the selection matches {len(bad)} that are not: {shown}{more} "
        f"(e.g. {bad[0]!r} belongs to a {type(owners[bad[0]][1]).__name__}). Narrow the patterns to Linear layers "
        f"(this model's: {can or 'none'}), or collect step updates only"
    )


def group_events(updates: dict[str, torch.Tensor], labels: dict[str, np.ndarray], key: str = "group"):
    """Sum the updates of events that share ``labels[key]`` (e.g. one prompt's G completions).

    Labels of a group: float labels are averaged (reward, advantage, clause values), integer
    labels take the group's first value (step, task, group), and ``n_events`` counts the events.
    """
    ids, first, inverse = np.unique(labels[key], return_index=True, return_inverse=True)
    inv = torch.from_numpy(inverse)
    out = {n: torch.zeros((len(ids), *u.shape[1:]), dtype=u.dtype).index_add_(0, inv, u) for n, u in updates.items()}
    counts = np.bincount(inverse)
    lab = {}
    for k, v in labels.items():
        v = np.asarray(v)
        lab[k] = (np.bincount(inverse, weights=v) / counts).astype(v.dtype) if v.dtype.kind == "f" else v[first]
    lab["n_events"] = counts.astype(np.int64)
    return out, lab


def bytes_per_event(params: dict[str, torch.Tensor], dtype: str = "float32") -> int:
    return sum(p.numel() for p in params.values()) * DTYPES[dtype].itemsize


def update_norms(ds: xr.Dataset):
    """A pandas frame: each event's update norm (over all stored tensors) with its labels.

    Adds ``task_name`` (from the store's ``task_names`` attribute when present) and
    ``advantage_sign`` columns for grouping by event type.
    """
    sq = sum((ds[v].astype("float64") ** 2).sum([d for d in ds[v].dims if d != "event"]) for v in update_vars(ds))
    for lv, rv in factor_pairs(ds).values():  # ||U_e||^2 from the factors' Gram matrices
        L, R = (
            torch.from_numpy(np.asarray(ds[lv].values, np.float64)),
            torch.from_numpy(np.asarray(ds[rv].values, np.float64)),
        )
        sq = sq + Factored(L, R).sq_norms().numpy()
    frame = {"norm": np.sqrt(np.asarray(sq))}
    for c in ds.coords:
        if ds[c].dims == ("event",):
            frame[c] = ds[c].values
    import pandas as pd

    df = pd.DataFrame(frame)
    names = json.loads(ds.attrs["task_names"]) if "task_names" in ds.attrs else None
    if "task" in df:
        df["task_name"] = [names[t] if names else str(t) for t in df["task"]]
    if "advantage" in df:
        df["advantage_sign"] = np.sign(df["advantage"]).map({-1.0: "neg", 0.0: "zero", 1.0: "pos"})
    return df[["norm"] + [c for c in df.columns if c in ("task_name", "advantage_sign", "step")]]
