"""The shard stage: fit a :class:`~shardlib.sae.ShardSAE` to an update store, offline or online.

Offline: :func:`train` reads a store (any store in the public format), holds out a
fraction of events for evaluation, trains with Accelerate (progress bar, periodic
metrics, checkpoints as safetensors + cfg.json, exact resume); :func:`run` is the stage
(train, then write ``sae/``, ``shards.nc`` and ``activations.nc`` in the public format of
:mod:`shardlib.shardfile`, and ``results.nc``: held-out and train metrics (FVU, L0, dead
fraction, dense fraction, shrinkage), the loss curve, parameter counts).

Online: :class:`OnlineTrainer` takes SAE steps on batches sampled from the RL loop's
ring buffer while RL runs (``shardlib.rl.train(..., on_step=...)``).
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .common import dense_parameter_count, deterministic, make_accelerator, peak_rss_bytes, progress_bar
from .config import Params, param
from .factored import Factored, factor_pairs, n_events, take
from .io import OPTIMIZER_FILE, load_optimizer, load_results, read_checkpoint, save_results, write_checkpoint
from .metrics import ReconStats
from .sae import SAEConfig, ShardSAE, sq_norms
from .shardfile import activations_dataset, shards_dataset
from .store import open_store, update_vars
from .trainer import TrainConfig, Trainer, build_trainer


@dataclass(frozen=True)
class ShardParams(Params):
    """Parameters of the shard-training stage (``notebooks/03_shards.ipynb``)."""

    store_path: str = param("", "update store (folder or .nc file) to train on")
    params: list[str] = param([], "glob patterns over the store's parameter names to use ([] = all)")
    n_latents: int = param(SAEConfig.n_latents, "number of latents (shards)", ge=1)
    k: int = param(SAEConfig.k, "active latents per event (TopK), or mean per event (BatchTopK)", ge=1)
    rank: int = param(SAEConfig.rank, "rank of each latent's factor per weight matrix (0 = dense baseline)", ge=0)
    activation: str = param(
        SAEConfig.activation, "TopK per event, or BatchTopK over the batch", choices=("topk", "batchtopk")
    )
    signed: bool = param(SAEConfig.signed, "TopK on |a| keeping the sign (L3D) instead of ReLU-TopK")
    epochs: int = param(30, "passes over the training events", ge=1)
    batch_size: int = param(TrainConfig.batch_size, "events per SAE step", ge=1)
    lr: float = param(
        TrainConfig.lr,
        "Adam learning rate, relative: each factor moves by about this fraction of its norm per step",
        gt=0,
    )
    lr_relative: bool = param(
        TrainConfig.lr_relative, "lr relative to each factor's width (False: one absolute Adam rate)"
    )
    lr_decay: float = param(
        TrainConfig.lr_decay, "fraction of the last steps over which the learning rate falls to 0", ge=0, le=1
    )
    resample_dead: bool = param(
        TrainConfig.resample_dead, "restart dead latents at the residuals of badly reconstructed events"
    )
    fire_frac: float = param(
        TrainConfig.fire_frac,
        "a latent fires on an event when its |code| is at least this fraction of the event's largest",
        ge=0,
        le=1,
    )
    encoder_bias: bool = param(SAEConfig.encoder_bias, "learn an encoder bias b_enc (fixed at 0 otherwise)")
    b_pre_rank: int = param(
        SAEConfig.b_pre_rank,
        "rank of each weight matrix's pre-encoder bias b_pre: 0 = dense, r > 0 = rank r; -1 = the SAE's rank when "
        "the store holds factored matrices (a dense b_pre would densify every event), else dense",
        ge=-1,
    )
    aux_k: int = param(TrainConfig.aux_k, "latents in the AuxK reconstruction (0 = n_latents // 2)", ge=0)
    aux_coef: float = param(TrainConfig.aux_coef, "weight of the AuxK loss", ge=0)
    dead_window: int = param(TrainConfig.dead_window, "a latent not fired within this many samples is dead", ge=1)
    skip_zero_updates: bool = param(
        True, "leave out events whose update is exactly zero (zero advantage: nothing reinforced)"
    )
    normalize: bool = param(
        False, "divide each event's update by its norm over all tensors (the norm is kept as the label update_norm)"
    )
    holdout_frac: float = param(0.1, "fraction of events held out for evaluation", ge=0, lt=1)
    checkpoint_every: int = param(10, "epochs between checkpoints", ge=1)
    device: str = param("auto", "'cpu', 'cuda' or 'auto'", choices=("auto", "cpu", "cuda"))
    online_shards_path: str = param(
        "", "shards.nc of an online SAE trained during the same RL run, to compare ('' = none)"
    )

    def check(self):
        if not self.store_path:
            raise ValueError(
                "parameter 'store_path': give the update store to train on (e.g. runs/default/rl_lm/updates/events)"
            )
        if self.k > self.n_latents:
            raise ValueError(f"parameter 'k': {self.k} exceeds n_latents={self.n_latents}")

    def sae_train_config(self) -> TrainConfig:
        """The SAE's architecture and training settings among these parameters (same names)."""
        arch = SAEConfig(**{f.name: getattr(self, f.name) for f in fields(SAEConfig)})
        return TrainConfig(arch, **{f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name != "sae"})


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


def split_events(n: int, holdout_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout_frac))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


@torch.no_grad()
def evaluate(
    sae: ShardSAE, data: dict[str, torch.Tensor], idx: np.ndarray, batch_size: int = 512, device="cpu"
) -> dict:
    """Metrics (FVU from sufficient statistics, L0, dead/dense fractions, shrinkage) on events ``idx``."""
    sae.eval()
    stats = ReconStats()
    for s in range(0, len(idx), batch_size):
        b = {n: take(v, idx[s : s + batch_size]).to(device) for n, v in data.items()}
        out = sae(b)
        stats.update(sae.scaled_input(b), out.xhat, out.codes)
    return stats.result() if stats.n else {}


@torch.no_grad()
def encode_all(sae: ShardSAE, data: dict[str, torch.Tensor], batch_size: int = 512, device="cpu", splits=None):
    """Active latents of every event: (index [N, kk] with -1 padding, value [N, kk], dense codes [N, F]).

    ``splits`` (a sequence of event-index arrays) adds a fourth item: :func:`evaluate`'s metrics of each
    split, from the same forward passes (the SAE runs over the events once)."""
    sae.eval()
    codes = []
    n = n_events(data)
    member = [np.isin(np.arange(n), np.asarray(ix)) for ix in splits or ()]
    stats = [ReconStats() for _ in member]
    for s in range(0, n, batch_size):
        b = {k: take(v, slice(s, s + batch_size)).to(device) for k, v in data.items()}
        out = sae(b)
        codes.append(out.codes.cpu())
        xs = sae.scaled_input(b)
        for m, st in zip(member, stats):
            sel = torch.from_numpy(np.flatnonzero(m[s : s + batch_size])).to(out.codes.device)
            if len(sel):
                st.update(
                    {k: take(v, sel) for k, v in xs.items()},
                    {k: take(v, sel) for k, v in out.xhat.items()},
                    out.codes[sel],
                )
    z = torch.cat(codes)
    kk = max(1, int((z != 0).sum(1).max()))
    mag, idx = z.abs().topk(kk, dim=1)
    val = z.gather(1, idx)
    idx = torch.where(mag > 0, idx, torch.full_like(idx, -1))
    if splits is not None:
        return idx.numpy(), val.numpy(), z, [st.result() if st.n else {} for st in stats]
    return idx.numpy(), val.numpy(), z


def _checkpoint(path: Path, trainer: Trainer, epoch: int, history: list, fingerprint: str) -> None:
    state = {"epoch": epoch, "history": history, "fingerprint": fingerprint, **trainer.state()}
    write_checkpoint(path, state, {"sae": trainer.sae.save}, trainer.opt)


@dataclass
class ShardTraining:
    """What :func:`train` returns."""

    sae: ShardSAE
    """The trained SAE (on the training device)."""
    data: dict[str, torch.Tensor] | None = None
    """The updates trained on, ``{param: [event, *shape]}`` (None when stopped early)."""
    store: xr.Dataset | None = None
    """The store's labels for the same events (None when ``data`` was given)."""
    train_idx: np.ndarray | None = None
    heldout_idx: np.ndarray | None = None
    history: list[dict] | None = None
    """Per-epoch means of the training metrics."""
    seconds: float = float("nan")
    accelerator: object = None
    stopped_at: int | None = None
    """The epoch ``stop_after`` stopped at (as a kill would), else None."""


def train(
    p: ShardParams, progress: bool = True, stop_after: int | None = None, data=None, init_directions=None
) -> ShardTraining:
    """Train offline on ``p.store_path``; resumes from ``out_dir/checkpoint``.

    ``data`` ({name: [N, *shape]}) replaces the store; ``init_directions`` ({name: [F, *shape]})
    starts the decoder and encoder there instead of at random (``ShardSAE.set_directions_``).

    Runs with ``torch.use_deterministic_algorithms(True)``: the backward of the gathered
    factors (an accumulating index_put) otherwise adds in a thread-dependent order on CPU,
    and two runs of the same config drift apart.
    """
    with deterministic():
        return _train(p, progress, stop_after, data, init_directions)


def _train(p: ShardParams, progress: bool, stop_after: int | None, data, init_directions) -> ShardTraining:
    from accelerate.utils import set_seed

    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(p.device)
    set_seed(p.seed)
    store = None
    if data is None:
        data, store = load_updates(p.store_path, p.params, p.skip_zero_updates, p.normalize)
    n = n_events(data)
    if n < 2:
        raise ValueError(f"store {p.store_path} holds {n} event(s); an SAE needs at least 2")
    train_idx, held_idx = split_events(n, p.holdout_frac, p.seed)
    train_data = {k: take(v, train_idx) for k, v in data.items()}
    cfg = p.sae_train_config()
    steps_per_epoch = math.ceil(len(train_idx) / p.batch_size)
    trainer = build_trainer(
        cfg,
        train_data,
        device=acc.device,
        accelerator=acc,
        total_steps=p.epochs * steps_per_epoch,
        init_directions=init_directions,
    )
    ckpt = out / "checkpoint"
    start, history = 0, []
    st = read_checkpoint(ckpt, p.fingerprint(), "epoch", p.epochs, ["sae", OPTIMIZER_FILE])
    if st is not None:
        sae = ShardSAE.load(ckpt / "sae").to(acc.device)
        trainer = Trainer(sae, cfg, trainer.variance, acc, trainer.total_steps)
        load_optimizer(trainer.opt, ckpt)
        trainer.load_state(st)
        start, history = st["epoch"], st["history"]
    sae = trainer.sae
    t0 = time.perf_counter()
    bar = progress_bar(
        total=p.epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="shards", disable=not progress
    )
    for epoch in range(start, p.epochs):
        perm = train_idx[np.random.default_rng([p.seed, epoch]).permutation(len(train_idx))]
        sums = {}
        for s in range(0, len(perm), p.batch_size):
            chunk = perm[s : s + p.batch_size]
            if len(chunk) < acc.num_processes:  # too few events to give every process one
                bar.update(1)
                continue
            chunk = chunk[acc.process_index :: acc.num_processes]
            m = trainer.step({k: take(v, chunk).to(acc.device) for k, v in data.items()})
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + v / steps_per_epoch
            bar.update(1)
        sums["epoch"] = epoch
        history.append(sums)
        bar.set_postfix(rec=f"{sums['rec']:.3f}", l0=f"{sums['l0']:.1f}")
        done = epoch + 1
        if done % p.checkpoint_every == 0 or done == p.epochs:
            if acc.is_main_process:
                _checkpoint(ckpt, trainer, done, history, p.fingerprint())
            acc.wait_for_everyone()
        if stop_after is not None and done - start >= stop_after and done < p.epochs:
            bar.close()
            return ShardTraining(sae, accelerator=acc, stopped_at=done)
    bar.close()
    return ShardTraining(sae, data, store, train_idx, held_idx, history, time.perf_counter() - t0, acc)


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
    acc.wait_for_everyone()
    return ShardRun(results, files, len(res.train_idx), len(res.heldout_idx), acc)


def write_outputs(p: ShardParams, res: ShardTraining) -> dict[str, Path]:
    """Write ``sae/``, ``shards.nc``, ``activations.nc`` and ``results.nc`` into ``out_dir``."""
    out = Path(p.out_dir)
    sae, data = res.sae.cpu(), res.data
    sae.save(out / "sae")
    idx, val, z, (held, train_m) = encode_all(sae, data, splits=(res.heldout_idx, res.train_idx))
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
