"""The on-disk update store: a writer (:class:`UpdateStore`), a reader (:func:`open_store`) and its checks.

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
and factored variables (vectors stay dense). :func:`~shardlib.factored.densify` turns a range of events dense; the
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

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .factored import LEFT, RIGHT, Factored, cat_factored, densify, factor_pairs
from .io import NETCDF_ENGINE, atomic_write, provenance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORE_META = "store.json"
STORE_FORMAT = 2
CHUNK_RE = re.compile(r"chunk-(\d{8})-(\d{8})\.nc")
MAX_STORE_STEP = 99_999_999
"""The last step a chunk name holds (8 digits)."""


class StoreError(ValueError):
    """An update store is malformed or belongs to another run."""


def var_name(param: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", param)


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


def open_update_stores(
    folder,
    *,
    events: bool,
    steps: bool,
    convention: str,
    fingerprint: str,
    dtype: str = "float32",
    config=None,
    seed=None,
    attrs=None,
) -> tuple[UpdateStore | None, UpdateStore | None]:
    """A run's pair of update stores under ``folder``: (the event store ``events/`` in ``convention``, the step
    store ``steps/``), each None when not wanted. Both carry the run's ``fingerprint``, ``config``, ``seed`` and
    ``attrs``; an existing store of the same run is reopened as it is (truncate it to resume)."""
    folder = Path(folder)
    event_store = step_store = None
    if events:
        event_store = UpdateStore(folder / "events", "event", convention, fingerprint, dtype, config, seed, attrs)
    if steps:
        step_store = UpdateStore(folder / "steps", "step", "step", fingerprint, dtype, config, seed, attrs)
    return event_store, step_store


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
