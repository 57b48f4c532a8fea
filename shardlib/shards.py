"""The shard stage: fit a :class:`~shardlib.sae.ShardSAE` to an update store, offline or online.

Offline: :func:`train` reads a store (any store in the public format, :func:`load_updates`) and fits on its
events with :func:`shardlib.fit.fit` (a held-out fraction of events for evaluation, Accelerate, progress bar,
periodic metrics, checkpoints as safetensors + cfg.json, exact resume); :func:`run` is the stage
(train, then write ``sae/``, ``shards.nc`` and ``activations.nc`` in the public format of
:mod:`shardlib.shardfile`, and ``results.nc``: held-out and train metrics (FVU, L0, dead
fraction, dense fraction, shrinkage), the loss curve, parameter counts).

Online: :class:`OnlineTrainer` takes SAE steps on batches sampled from the RL loop's
ring buffer while RL runs (``shardlib.rl.train(..., on_step=...)``).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .common import dense_parameter_count, deterministic, peak_rss_bytes
from .config import param
from .factored import Factored, factor_pairs, n_events, take
from .fit import FitParams, ShardTraining, encode_all, fit
from .io import (
    OPTIMIZER_FILE,
    CheckpointError,
    atomic_dir,
    commit_dir,
    load_optimizer,
    load_results,
    read_checkpoint,
    save_results,
)
from .sae import ShardSAE, sq_norms
from .shardfile import activations_dataset, shards_dataset
from .store import open_store, update_vars
from .trainer import TrainConfig, Trainer, build_trainer


@dataclass(frozen=True)
class ShardParams(FitParams):
    """Parameters of the shard-training stage (``notebooks/03_shards.ipynb``): where the events come from, and
    the fit's (:class:`~shardlib.fit.FitParams`)."""

    store_path: str = param("", "update store (folder or .nc file) to train on")
    params: list[str] = param([], "glob patterns over the store's parameter names to use ([] = all)")
    skip_zero_updates: bool = param(
        True, "leave out events whose update is exactly zero (zero advantage: nothing reinforced)"
    )
    normalize: bool = param(
        False, "divide each event's update by its norm over all tensors (the norm is kept as the label update_norm)"
    )
    online_shards_path: str = param(
        "", "shards.nc of an online SAE trained during the same RL run, to compare ('' = none)"
    )
    eval_batch_size: int = param(
        512,
        "events per forward pass when every event is encoded and scored after training (memory grows with it "
        "and with k on factored events)",
        ge=1,
    )

    def check(self):
        if not self.store_path:
            raise ValueError(
                "parameter 'store_path': give the update store to train on (e.g. runs/default/rl_lm/updates/events)"
            )
        super().check()


def load_updates(store_path, patterns=(), skip_zero: bool = False, normalize: bool = False) -> tuple[dict, xr.Dataset]:
    """Updates of a store as ``{param: float32 tensor [event, *shape]}`` (a :class:`Factored` batch for a
    factored matrix variable: never made dense), and the store (labels).

    ``skip_zero`` leaves out events whose update is exactly zero in every tensor (the
    returned store is subset to the same events; its attribute ``n_zero_skipped`` counts them);
    ``normalize`` divides each event's update by its norm over all tensors, kept as the label
    ``update_norm``.
    """
    ds = open_store(store_path)
    pairs = factor_pairs(ds)
    names = {ds[v].attrs["param"]: v for v in update_vars(ds)}
    names.update({ds[lv].attrs["param"]: v for v, (lv, _) in pairs.items()})
    if patterns:
        names = {p: v for p, v in names.items() if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)}
        if not names:
            raise ValueError(f"parameter 'params': {list(patterns)} matches none of the store's tensors {list(names)}")

    def tensor(v):
        return torch.from_numpy(np.asarray(ds[v].values, dtype=np.float32))

    data = {p: Factored(*(tensor(lr) for lr in pairs[v])) if v in pairs else tensor(v) for p, v in names.items()}
    ds = ds.drop_vars([x for v in names.values() for x in pairs.get(v, ())])
    ds = ds.assign_coords(store_event=("event", np.arange(ds.sizes["event"])))
    if skip_zero:
        nonzero = (
            sum(
                (sq_norms(v.to(torch.float64)) > 0) if isinstance(v, Factored) else (v != 0).reshape(len(v), -1).any(1)
                for v in data.values()
            ).numpy()
            > 0
        )
        keep = np.flatnonzero(nonzero)
        data = {p: take(v, keep) for p, v in data.items()}
        ds = ds.isel(event=keep)
        ds.attrs["n_zero_skipped"] = int((~nonzero).sum())
    if normalize:
        norm = torch.sqrt(sum(sq_norms(v if isinstance(v, Factored) else v.double()).double() for v in data.values()))
        scale = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)).float()
        data = {
            p: v.scaled(scale) if isinstance(v, Factored) else v * scale.view(-1, *([1] * (v.ndim - 1)))
            for p, v in data.items()
        }
        ds = ds.assign_coords(update_norm=("event", norm.numpy()))
    return data, ds


def train(
    p: ShardParams, progress: bool = True, stop_after: int | None = None, data=None, init_directions=None
) -> ShardTraining:
    """Train offline on ``p.store_path`` (:func:`load_updates` with ``p``'s patterns, zero-update skipping and
    normalisation) through :func:`~shardlib.fit.fit`; resumes from ``out_dir/checkpoint``. ``data``
    ({name: [N, *shape]}) replaces the store; ``init_directions`` as :func:`~shardlib.fit.fit`'s."""
    store = None
    if data is None:
        data, store = load_updates(p.store_path, p.params, p.skip_zero_updates, p.normalize)
        n = n_events(data)
        if n < 2:
            raise ValueError(f"store {p.store_path} holds {n} event(s); an SAE needs at least 2")
    res = fit(p, data, progress, stop_after, init_directions)
    res.store = store if res.stopped_at is None else None
    return res


@dataclass
class ShardRun:
    """What :func:`run` returns: the stage's metrics and where its files are (None on other processes)."""

    results: xr.Dataset | None
    """The content of ``results.nc``."""
    files: dict[str, Path] | None
    """``shards``, ``activations``, ``results``: the files written (``sae/`` beside them)."""
    n_train: int
    n_heldout: int
    accelerator: object = None


def run(p: ShardParams, progress: bool = True) -> ShardRun:
    """The stage: train, then (main process) write ``sae/``, ``shards.nc``, ``activations.nc`` and ``results.nc``."""
    res = train(p, progress=progress)
    acc = res.accelerator
    results = files = None
    if acc.is_main_process:
        files = write_outputs(p, res)
        results = load_results(files["results"])
        # the resume point is spent once the outputs are written (and is the SAE with Adam's moments: 5 GB for the
        # dense reference on one SmolLM2 matrix); a rerun killed after this point trains again
        shutil.rmtree(Path(p.out_dir) / "checkpoint", ignore_errors=True)
    acc.wait_for_everyone()
    return ShardRun(results, files, len(res.train_idx), len(res.heldout_idx), acc)


def write_outputs(p: ShardParams, res: ShardTraining) -> dict[str, Path]:
    """Write ``sae/``, ``shards.nc``, ``activations.nc`` and ``results.nc`` into ``out_dir``."""
    out = Path(p.out_dir)
    sae, data = res.sae.cpu(), res.data
    save_sae(sae, out, p)
    idx, val, z, (held, train_m) = encode_all(
        sae, data, batch_size=p.eval_batch_size, splits=(res.heldout_idx, res.train_idx)
    )
    freq = (z != 0).float().mean(0).numpy()
    mean_act = (z.abs().sum(0) / (z != 0).sum(0).clamp(min=1)).numpy()
    shards = shards_dataset(sae, freq, mean_act)
    shards.attrs["store_path"] = p.store_path
    save_results(shards, out / "shards.nc", p.to_dict(), p.seed)
    acts = activations_dataset(idx, val, res.heldout_idx, res.store)
    save_results(acts, out / "activations.nc", p.to_dict(), p.seed)
    hist = res.history
    metrics = xr.Dataset(
        {
            **{f"heldout_{k}": v for k, v in held.items()},
            **{f"train_{k}": v for k, v in train_m.items()},
            **{f"curve_{k}": ("epoch", [h[k] for h in hist]) for k in ("loss", "rec", "aux", "l0", "dead")},
            # latents restarted per step (the epoch's mean); a history from before it was recorded: NaN
            "curve_resampled": ("epoch", [h.get("resampled", float("nan")) for h in hist]),
            "n_parameters": sae.n_parameters(),
            "dense_n_parameters": dense_parameter_count(sae.shapes, sae.n_latents),
            "train_seconds": res.seconds,
            "peak_rss_bytes": peak_rss_bytes(),  # the stage's process: loading, training and encoding
            "n_zero_skipped": int(res.store.attrs.get("n_zero_skipped", 0)) if res.store is not None else 0,
        },
        coords={"epoch": [h["epoch"] for h in hist]},
    )
    save_results(metrics, out / "results.nc", p.to_dict(), p.seed)
    return {"shards": out / "shards.nc", "activations": out / "activations.nc", "results": out / "results.nc"}


def save_sae(sae: ShardSAE, out: Path, p: ShardParams) -> None:
    """Write ``out/sae`` (atomically). Where the final checkpoint of this fit holds the SAE (training ends by
    writing it, and :func:`run` removes it once the outputs are written), ``sae/`` is hard links to its files
    rather than a second copy (1.5 GB at rank 4 over SmolLM2's MLP matrices: about 4 s)."""
    ckpt, tmp = out / "checkpoint", atomic_dir(out / "sae")
    try:
        st = read_checkpoint(ckpt, p.fingerprint(), "epoch", p.epochs, ["sae"])
    except CheckpointError:  # another fit's, or damaged: not this SAE
        st = None
    try:
        if st is None or st["epoch"] != p.epochs:
            raise FileNotFoundError(ckpt / "sae")
        for f in (ckpt / "sae").iterdir():
            (tmp / f.name).hardlink_to(f)
    except OSError:  # no final checkpoint of this fit, or a file system without hard links: write it
        shutil.rmtree(tmp)
        tmp.mkdir()
        sae.save(tmp)
    commit_dir(tmp, out / "sae")


class OnlineTrainer:
    """Trains a ShardSAE from the RL loop's ring buffer while RL runs.

    Pass it as ``rl.train(..., on_step=trainer)``: after every RL step, once the buffer holds
    ``warmup`` events, it takes ``steps_per_rl_step`` SAE steps on batches of ``cfg.batch_size`` events
    sampled from the buffer. The SAE is built at warm-up (:func:`~shardlib.trainer.build_trainer`) from
    the buffer's contents then. Memory: the buffer's capacity, never the run; a buffer of factored events
    (``collect_factored``) is trained on factored, never made dense. The SAE trains on :attr:`device` (the
    GPU when ``device`` allows one and one is visible); the buffer stays in host memory and each sampled
    batch is moved there.
    """

    def __init__(self, cfg: TrainConfig, warmup: int = 256, steps_per_rl_step: int = 1, device: str = "auto"):
        self.cfg, self.warmup, self.k_steps, self.device_setting = cfg, warmup, steps_per_rl_step, device
        self.trainer: Trainer | None = None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.history: list[dict] = []

    @property
    def sae(self) -> ShardSAE | None:
        """The online SAE (None before warm-up)."""
        return None if self.trainer is None else self.trainer.sae

    @property
    def device(self) -> torch.device:
        """Where the SAE trains: ``cuda`` when ``device`` is not ``cpu`` and a GPU is visible, else ``cpu``."""
        return torch.device("cuda" if self.device_setting != "cpu" and torch.cuda.is_available() else "cpu")

    @classmethod
    def from_rl(cls, rp) -> OnlineTrainer:
        """The online trainer an RL stage's ``online_*`` parameters describe."""
        return cls(rp.online_train_config(), rp.online_warmup, rp.online_steps_per_rl_step, rp.device)

    def __call__(self, step: int, buffer) -> None:
        if buffer is None or buffer.size < self.warmup:
            return
        if self.trainer is None:
            self.trainer = build_trainer(self.cfg, buffer.contents(), device=self.device)
        with deterministic():  # as offline training: else the gather backward adds in thread order
            for _ in range(self.k_steps):
                batch = {n: v.to(self.device) for n, v in buffer.sample(self.cfg.batch_size, self.gen).items()}
                m = self.trainer.step(batch)
                m["rl_step"] = step
                self.history.append(m)

    def save(self, path) -> None:
        """SAE, optimizer, sampling generator and history into folder ``path`` (saved with each RL checkpoint)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.gen.get_state(), path / "generator.pt")
        state = {"history": self.history, "trainer": None}
        if self.trainer is not None:
            self.sae.save(path / "sae")
            torch.save(self.trainer.opt.state_dict(), path / OPTIMIZER_FILE)
            state["trainer"] = {**self.trainer.state(), "variance": self.trainer.variance}
        (path / "state.json").write_text(json.dumps(state))

    def load(self, path) -> None:
        """Restore what ``save`` wrote: a resumed RL run continues the online SAE where it stopped."""
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        self.gen.set_state(torch.load(path / "generator.pt", weights_only=True))
        self.history = state["history"]
        if state["trainer"] is not None:
            sae = ShardSAE.load(path / "sae").to(self.device)
            self.trainer = Trainer(sae, self.cfg, state["trainer"]["variance"])
            load_optimizer(self.trainer.opt, path)
            self.trainer.load_state(state["trainer"])
