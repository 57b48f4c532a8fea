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
import math
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from .io import NETCDF_ENGINE, atomic_write, provenance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORE_META = "store.json"
STORE_FORMAT = 2
CHUNK_RE = re.compile(r"chunk-(\d{8})-(\d{8})\.nc")


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


# ---------------------------------------------------------------------------
# ring buffer


class RingBuffer:
    """Fixed-capacity buffer of the most recent updates (flattened per parameter)."""

    def __init__(self, shapes: dict[str, tuple], capacity: int, dtype=torch.float32):
        if capacity < 1:
            raise ValueError(f"ring buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.shapes = capacity, dict(shapes)
        self.data = {n: torch.zeros((capacity, *s), dtype=dtype) for n, s in shapes.items()}
        self.labels: dict[str, np.ndarray] = {}
        self.size = 0
        self.cursor = 0
        self.total_added = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def add(self, updates: dict[str, torch.Tensor], labels: dict[str, np.ndarray]) -> None:
        n = next(iter(updates.values())).shape[0]
        first = max(0, n - self.capacity)  # more events than capacity: only the last `capacity` stay
        idx = (self.cursor + torch.arange(first, n)) % self.capacity
        for k, v in updates.items():
            self.data[k][idx] = v[first:].to(self.data[k].dtype)
        for k, v in labels.items():
            if k not in self.labels:
                self.labels[k] = np.zeros(self.capacity, dtype=np.asarray(v).dtype)
            self.labels[k][idx.numpy()] = np.asarray(v)[first:]
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.total_added += n

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise ValueError("ring buffer is empty")
        idx = torch.randint(self.size, (n,), generator=generator)
        return {k: v[idx].float() for k, v in self.data.items()}

    def save(self, path) -> None:
        """Contents and position into folder ``path`` (part of an RL checkpoint)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.data.items()}, str(path / "data.safetensors"))
        np.savez(path / "labels.npz", **self.labels)
        (path / "state.json").write_text(
            json.dumps(
                {
                    "size": self.size,
                    "cursor": self.cursor,
                    "total_added": self.total_added,
                    "capacity": self.capacity,
                    "shapes": {k: list(v) for k, v in self.shapes.items()},
                }
            )
        )

    def load(self, path) -> None:
        """Restore what ``save`` wrote; the buffer must have the same capacity and tensors."""
        from safetensors.torch import load_file

        path = Path(path)
        st = json.loads((path / "state.json").read_text())
        if st["capacity"] != self.capacity or st["shapes"] != {k: list(v) for k, v in self.shapes.items()}:
            raise ValueError(
                f"{path} holds a ring buffer of capacity {st['capacity']} over {st['shapes']}; this one has "
                f"capacity {self.capacity} over {self.shapes}"
            )
        data = load_file(str(path / "data.safetensors"))
        self.data = {k: data[k].to(self.data[k].dtype) for k in self.data}
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
            if old.get("format") != STORE_FORMAT:
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

    def append(self, updates: dict[str, torch.Tensor], labels: dict[str, np.ndarray], step: int) -> None:
        for k, v in updates.items():
            self._pending_updates.setdefault(k, []).append(v.detach().to("cpu", DTYPES[self.dtype]))
        for k, v in labels.items():
            self._pending_labels.setdefault(k, []).append(np.asarray(v))
        self._pending_steps.append(step)

    def flush(self) -> None:
        if not self._pending_steps:
            return
        first, last = min(self._pending_steps), max(self._pending_steps)
        data_vars = {}
        for name, parts in self._pending_updates.items():
            arr = torch.cat(parts)
            if arr.dtype == torch.bfloat16:  # netCDF has no bfloat16: store the exact values as float32
                arr = arr.float()
            a = arr.numpy()
            vn = var_name(name)
            dims = ("event",) + tuple(f"{vn}_dim{i}" for i in range(a.ndim - 1))
            data_vars[vn] = xr.Variable(dims, a, attrs={"param": name})
        coords = {k: ("event", np.concatenate(v)) for k, v in self._pending_labels.items()}
        ds = xr.Dataset(data_vars, coords=coords)
        self._write(ds, first, last)
        self._pending_updates, self._pending_labels, self._pending_steps = {}, {}, []

    def _write(self, ds: xr.Dataset, first: int, last: int, replaces: str | None = None) -> None:
        """Write one chunk atomically, then list it (steps, events, SHA-256) in ``store.json``, dropping the
        entry of the chunk it ``replaces`` in the same write."""
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
    return meta


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
    parts, ranges = [], []
    for f in files:
        try:
            ds = xr.open_dataset(f, engine=NETCDF_ENGINE, chunks={} if lazy else None)
        except Exception as e:
            raise StoreError(f"{f} is not a readable netCDF file: {e}") from e
        validate_store(ds, where=str(f))
        r = _check_chunk(ds, f, meta)
        if r is not None:
            ranges.append((r, f))
        parts.append(ds if lazy else ds.load())
        if not lazy:
            ds.close()
    ranges.sort()
    for ((a0, a1), fa), ((b0, b1), fb) in itertools.pairwise(ranges):
        if b0 <= a1:
            raise StoreError(
                f"{fb.name} (steps {b0}-{b1}) overlaps {fa.name} (steps {a0}-{a1}) in {path}: the same steps "
                "stored twice; remove the copy, or rerun the stage that wrote the store"
            )
    out = (
        parts[0]
        if len(parts) == 1
        else xr.concat(
            parts, dim="event", data_vars="all", coords="different", compat="equals", combine_attrs="override"
        )
    )
    return out


def update_vars(ds: xr.Dataset) -> list[str]:
    """Names of the store's parameter variables (those with a ``param`` attribute)."""
    return [v for v in ds.data_vars if "param" in ds[v].attrs]


def validate_store(ds: xr.Dataset, where: str = "store") -> None:
    if ds.attrs.get("kind") not in ("event", "step"):
        raise StoreError(f"{where}: dataset attribute 'kind' must be 'event' or 'step', got {ds.attrs.get('kind')!r}")
    names = update_vars(ds)
    if not names:
        raise StoreError(f"{where}: no parameter variable (a data variable with attribute 'param') found")
    if "event" not in ds.dims:
        raise StoreError(f"{where}: no 'event' dimension")
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


def flat_updates(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """``{param name: array [event, *shape]}`` of a store."""
    return {ds[v].attrs["param"]: np.asarray(ds[v].values, dtype=np.float32) for v in update_vars(ds)}


# ---------------------------------------------------------------------------
# the collector


class UpdateCollector:
    """Collects per-event and per-step updates of selected parameters from any PyTorch loop.

    Usage in a hand-written loop::

        col = UpdateCollector(model, ["*.weight"], lr=1e-3, event_store=store)
        with col.capture():
            loss = per_event_losses.sum()
            loss.backward()
        col.before_step(); opt.step(); col.after_step(step, labels)

    Per-event updates need every selected parameter to be an ``nn.Linear`` weight or bias.
    """

    def __init__(
        self,
        model: nn.Module,
        params,
        *,
        lr: float,
        optimizer=None,
        convention: str = "sgd",
        event_store: UpdateStore | None = None,
        step_store: UpdateStore | None = None,
        buffer: RingBuffer | None = None,
        events: bool = True,
        scale: float = 1.0,
        every: int = 1,
        group_by: str | None = None,
    ):
        if convention not in ("sgd", "adam"):
            raise ValueError(f"convention must be 'sgd' or 'adam', got {convention!r}")
        if convention == "adam" and optimizer is None:
            raise ValueError("convention='adam' needs the optimizer (its second moments precondition each event)")
        self.model, self.lr, self.optimizer, self.convention = model, lr, optimizer, convention
        self.params = select_params(model, params)
        self.event_store, self.step_store, self.buffer = event_store, step_store, buffer
        self.events, self.scale, self.every, self.group_by = events, scale, every, group_by
        self._linear = {}
        if events:
            owners = {}
            for mname, mod in model.named_modules():
                for pname, _p in mod.named_parameters(recurse=False):
                    owners[f"{mname}.{pname}" if mname else pname] = (mname, mod, pname)
            for n in self.params:
                mname, mod, pname = owners[n]
                if not isinstance(mod, nn.Linear):
                    raise ValueError(
                        f"per-event updates need nn.Linear parameters; {n!r} belongs to a {type(mod).__name__}. "
                        "Narrow the selection to Linear layers, or collect step updates only"
                    )
                self._linear.setdefault(mname, (mod, {}))[1][pname] = n
        self._acts: dict[str, list] = {}
        self._grads: dict[str, list] = {}
        self._event_grads: list[dict[str, torch.Tensor]] = []
        self._before: dict[str, torch.Tensor] = {}
        self._handles = []

    def active(self, step: int) -> bool:
        return step % self.every == 0

    @contextmanager
    def capture(self, enabled: bool = True):
        """Record layer inputs and output gradients of one forward/backward."""
        if not (enabled and self.events):
            yield
            return
        self._acts = {m: [] for m in self._linear}
        self._grads = {m: [] for m in self._linear}

        def fwd_hook(mname):
            def hook(mod, inputs, output):
                self._acts[mname].append(inputs[0].detach())
                if output.requires_grad:
                    output.register_hook(lambda g: self._grads[mname].append(g.detach()))

            return hook

        handles = [mod.register_forward_hook(fwd_hook(m)) for m, (mod, _) in self._linear.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._event_grads.append(self._per_event_grads())

    def _per_event_grads(self) -> dict[str, torch.Tensor]:
        out = {}
        for mname, (_mod, pnames) in self._linear.items():
            if len(self._acts[mname]) != 1 or len(self._grads[mname]) != 1:
                raise RuntimeError(
                    f"layer {mname} ran {len(self._acts[mname])} forward(s) and {len(self._grads[mname])} backward(s) "
                    "inside one capture; capture exactly one forward and backward"
                )
            x = self._acts[mname][0].float()
            d = self._grads[mname][0].float()
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            d = d.reshape(d.shape[0], -1, d.shape[-1])
            for pname, full in pnames.items():
                if pname == "weight":
                    out[full] = torch.einsum("nto,nti->noi", d, x) * self.scale
                else:
                    out[full] = d.sum(1) * self.scale
        self._acts, self._grads = {}, {}
        return out

    def before_step(self) -> None:
        if self.step_store is not None:
            self._before = {n: p.detach().float().clone() for n, p in self.params.items()}

    def event_gradients(self) -> dict[str, torch.Tensor]:
        """Raw per-event gradients captured since the last step, concatenated over micro-batches."""
        return (
            {n: torch.cat([g[n] for g in self._event_grads]) for n in self._event_grads[0]} if self._event_grads else {}
        )

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
                u = -self.lr * g
                if self.convention == "adam":
                    u = u * self._preconditioner(n).to(u.device)
                updates[n] = u
            if gather is not None:
                updates = {n: gather(u.contiguous()) for n, u in updates.items()}
            updates = {n: u.cpu() for n, u in updates.items()}
            if self.group_by is not None and labels:
                updates, labels = group_events(updates, labels, self.group_by)
            if self.event_store is not None:
                self.event_store.append(updates, labels or {}, step)
            if self.buffer is not None:
                self.buffer.add(updates, labels or {})
        if self.step_store is not None and self._before:
            delta = {n: (p.detach().float() - self._before[n]).cpu()[None] for n, p in self.params.items()}
            self.step_store.append(delta, {"step": np.array([step])}, step)
            self._before = {}
        return updates

    def flush(self) -> None:
        for s in (self.event_store, self.step_store):
            if s is not None:
                s.flush()


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


def fmt_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    i = min(len(units) - 1, int(math.log(max(n, 1), 1024)))
    return f"{n / 1024**i:.1f} {units[i]}"


def update_norms(ds: xr.Dataset):
    """A pandas frame: each event's update norm (over all stored tensors) with its labels.

    Adds ``task_name`` (from the store's ``task_names`` attribute when present) and
    ``advantage_sign`` columns for grouping by event type.
    """
    sq = sum((ds[v].astype("float64") ** 2).sum([d for d in ds[v].dims if d != "event"]) for v in update_vars(ds))
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
