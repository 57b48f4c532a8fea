"""One offline fit of a :class:`~shardlib.sae.ShardSAE` on events held in memory: :class:`FitParams` (the SAE,
its training and the held-out split), :func:`fit` (Accelerate, checkpoints as safetensors + cfg.json, exact
resume), the held-out split (:func:`split_events`) and the metrics and codes of a trained SAE
(:func:`evaluate`, :func:`encode_all`).

The shard stage (:mod:`shardlib.shards`) and the compositional testbed fit on events read from an update store;
the planted control and the toy models fit on events they make themselves, and so do not depend on the store
(nor on its module's code: the runner's per-stage fingerprints follow imports).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .common import deterministic, make_accelerator, progress_bar
from .config import Params, param
from .factored import n_events, take
from .io import OPTIMIZER_FILE, CheckpointError, load_optimizer, read_checkpoint, write_checkpoint
from .metrics import ReconStats
from .sae import SAEConfig, ShardSAE
from .trainer import TrainConfig, Trainer, build_trainer


@dataclass(frozen=True)
class FitParams(Params):
    """Parameters of one offline SAE fit on events in memory: the SAE, its training and the held-out split.
    The shard stage's :class:`~shardlib.shards.ShardParams` adds where the events come from."""

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
        "the events hold factored matrices (a dense b_pre would densify every event), else dense",
        ge=-1,
    )
    aux_k: int = param(TrainConfig.aux_k, "latents in the AuxK reconstruction (0 = n_latents // 2)", ge=0)
    aux_coef: float = param(TrainConfig.aux_coef, "weight of the AuxK loss", ge=0)
    dead_window: int = param(TrainConfig.dead_window, "a latent not fired within this many samples is dead", ge=1)
    restart_until: float = param(
        TrainConfig.restart_until,
        "restart dead latents only in the first this fraction of the steps (1: while the rate is above 0)",
        ge=0,
        le=1,
    )
    holdout_frac: float = param(0.1, "fraction of events held out for evaluation", ge=0, lt=1)
    holdout: str = param(
        "random",
        "which events are held out: a random draw, or the last in the store's order (its collection order: a split "
        "by time, for step updates, whose neighbours Adam's momentum makes alike)",
        choices=("random", "last"),
    )
    checkpoint_every: int = param(10, "epochs between checkpoints", ge=1)
    device: str = param("auto", "'cpu', 'cuda' or 'auto'", choices=("auto", "cpu", "cuda"))

    def check(self):
        if self.k > self.n_latents:
            raise ValueError(f"parameter 'k': {self.k} exceeds n_latents={self.n_latents}")

    def sae_train_config(self) -> TrainConfig:
        """The SAE's architecture and training settings among these parameters (same names)."""
        arch = SAEConfig(**{f.name: getattr(self, f.name) for f in fields(SAEConfig)})
        return TrainConfig(arch, **{f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name != "sae"})


def split_events(n: int, holdout_frac: float, seed: int, how: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) event indices, sorted: ``round(n * holdout_frac)`` events held out, drawn at random
    (``how="random"``, from ``seed``) or the last ones (``how="last"``: a split by time where events are stored in
    the order they were collected)."""
    n_hold = int(round(n * holdout_frac))
    if how == "last":
        return np.arange(n - n_hold), np.arange(n - n_hold, n)
    if how != "random":
        raise ValueError(f"holdout {how!r}: use 'random' or 'last'")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


@torch.no_grad()
def evaluate(
    sae: ShardSAE, data: dict[str, torch.Tensor], idx: np.ndarray, batch_size: int = 512, device="cpu"
) -> dict:
    """Metrics (FVU from sufficient statistics, L0, dead/dense fractions, shrinkage) on events ``idx``."""
    sae.eval()
    stats, grams = ReconStats(), {}
    for s in range(0, len(idx), batch_size):
        b = {n: take(v, idx[s : s + batch_size]).to(device) for n, v in data.items()}
        z, terms = sae.recon_terms(b, grams)
        stats.update_terms(sae.scaled_input(b), terms, z)
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
    stats, grams = [ReconStats() for _ in member], {}
    for s in range(0, n, batch_size):
        b = {k: take(v, slice(s, s + batch_size)).to(device) for k, v in data.items()}
        z, terms = sae.recon_terms(b, grams)
        codes.append(z.cpu())
        xs = sae.scaled_input(b)
        for m, st in zip(member, stats):
            sel = torch.from_numpy(np.flatnonzero(m[s : s + batch_size])).to(z.device)
            if len(sel):
                st.update_terms(
                    {k: take(v, sel) for k, v in xs.items()},
                    {k: tuple(t[sel] for t in ts) for k, ts in terms.items()},
                    z[sel],
                )
    z = torch.cat(codes)
    kk = max(1, int((z != 0).sum(1).max()))
    mag, idx = z.abs().topk(kk, dim=1)
    val = z.gather(1, idx)
    idx = torch.where(mag > 0, idx, torch.full_like(idx, -1))
    if splits is not None:
        return idx.numpy(), val.numpy(), z, [st.result() if st.n else {} for st in stats]
    return idx.numpy(), val.numpy(), z


def _checkpoint(path: Path, trainer: Trainer, epoch: int, history: list, fingerprint: str, final: bool) -> None:
    """The resume point after ``epoch`` epochs; the ``final`` one (training done) without Adam's moments, which
    no later step reads (twice the SAE's size: 3.1 GB at rank 4 over SmolLM2's 90 MLP matrices)."""
    state = {"epoch": epoch, "history": history, "fingerprint": fingerprint, **trainer.state()}
    write_checkpoint(path, state, {"sae": trainer.sae.save}, None if final else trainer.opt)


@dataclass
class ShardTraining:
    """What :func:`fit` (and the shard stage's :func:`~shardlib.shards.train`) returns."""

    sae: ShardSAE
    """The trained SAE (on the training device)."""
    data: dict[str, torch.Tensor] | None = None
    """The updates trained on, ``{param: [event, *shape]}`` (None when stopped early)."""
    store: xr.Dataset | None = None
    """The store's labels for the same events (set by :func:`~shardlib.shards.train` when it read a store)."""
    train_idx: np.ndarray | None = None
    heldout_idx: np.ndarray | None = None
    history: list[dict] | None = None
    """Per-epoch means of the training metrics."""
    seconds: float = float("nan")
    accelerator: object = None
    stopped_at: int | None = None
    """The epoch ``stop_after`` stopped at (as a kill would), else None."""


def fit(
    p: FitParams, data: dict, progress: bool = True, stop_after: int | None = None, init_directions=None
) -> ShardTraining:
    """Train an SAE on ``data`` ({name: [N, *shape]}, a :class:`~shardlib.factored.Factored` batch for a factored
    matrix), holding out ``p.holdout_frac`` of the events; resumes from ``out_dir/checkpoint``.
    ``init_directions`` ({name: [F, *shape]}) starts the decoder and encoder there instead of at random
    (``ShardSAE.set_directions_``).

    Runs with ``torch.use_deterministic_algorithms(True)``: the backward of the gathered
    factors (an accumulating index_put) otherwise adds in a thread-dependent order on CPU,
    and two runs of the same config drift apart.
    """
    with deterministic():
        return _fit(p, data, progress, stop_after, init_directions)


def _fit(p: FitParams, data: dict, progress: bool, stop_after: int | None, init_directions) -> ShardTraining:
    from accelerate.utils import set_seed

    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(p.device)
    set_seed(p.seed)
    n = n_events(data)
    if n < 2:
        raise ValueError(f"the data hold {n} event(s); an SAE needs at least 2")
    train_idx, held_idx = split_events(n, p.holdout_frac, p.seed, p.holdout)
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
    st = read_checkpoint(ckpt, p.fingerprint(), "epoch", p.epochs, ["sae"])
    if st is not None:
        if st["epoch"] < p.epochs and not (ckpt / OPTIMIZER_FILE).exists():
            raise CheckpointError(
                f"{ckpt} lacks {OPTIMIZER_FILE} (training stopped at epoch {st['epoch']} of {p.epochs}); delete "
                f"{ckpt} (the stage then starts over) or run the stage with --force"
            )
        sae = ShardSAE.load(ckpt / "sae").to(acc.device)
        trainer = Trainer(sae, cfg, trainer.variance, acc, trainer.total_steps)
        if st["epoch"] < p.epochs:  # the final resume point has no optimizer state: no step follows it
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
                _checkpoint(ckpt, trainer, done, history, p.fingerprint(), final=done == p.epochs)
            acc.wait_for_everyone()
        if stop_after is not None and done - start >= stop_after and done < p.epochs:
            bar.close()
            return ShardTraining(sae, accelerator=acc, stopped_at=done)
    bar.close()
    return ShardTraining(sae, data, None, train_idx, held_idx, history, time.perf_counter() - t0, acc)
