"""Train shards: fit a :class:`~shardlib.sae.ShardSAE` to an update store, offline or online.

Offline: :func:`train` reads a store (any store in the public format), holds out a
fraction of events for evaluation, trains with Accelerate (progress bar, periodic
metrics, checkpoints as safetensors + cfg.json, exact resume) and :func:`write_outputs`
writes the public outputs:

- ``shards.nc``: one variable per parameter tensor, dims ``("shard", <tensor axes>)`` =
  each latent's dense unit-norm decoder direction (norm over all tensors together),
  attribute ``param``; the low-rank factors (``<var>__U``, ``<var>__V``); per-shard
  ``frequency`` and ``mean_activation``; the SAE config and provenance as attributes.
- ``activations.nc``: for every event of the store, the indices and values of its active
  latents (dims ``("event", "slot")``, index -1 = empty slot), with the store's labels and
  ``split`` (train / heldout).
- ``results.nc``: held-out and train metrics (FVU, L0, dead fraction, dense fraction,
  shrinkage), the loss curve, parameter counts.

Online: :class:`OnlineTrainer` takes SAE steps on batches sampled from the RL loop's
ring buffer while RL runs (``shardlib.rl.train(..., on_step=...)``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .config import Params, param
from .io import atomic_dir, commit_dir, read_checkpoint
from .metrics import ReconStats
from .sae import ShardSAE, aux_loss
from .updates import open_store, update_vars


@dataclass(frozen=True)
class ShardParams(Params):
    """Parameters of the shard-training stage (``notebooks/03_shards.ipynb``)."""

    store_path: str = param("", "update store (folder or .nc file) to train on")
    params: list[str] = param([], "glob patterns over the store's parameter names to use ([] = all)")
    n_latents: int = param(32, "number of latents (shards)", ge=1)
    k: int = param(4, "active latents per event (TopK), or mean per event (BatchTopK)", ge=1)
    rank: int = param(1, "rank of each latent's factor per weight matrix (0 = dense baseline)", ge=0)
    activation: str = param("topk", "TopK per event, or BatchTopK over the batch", choices=("topk", "batchtopk"))
    signed: bool = param(False, "TopK on |a| keeping the sign (L3D) instead of ReLU-TopK")
    epochs: int = param(30, "passes over the training events", ge=1)
    batch_size: int = param(128, "events per SAE step", ge=1)
    lr: float = param(3e-3, "Adam learning rate", gt=0)
    aux_k: int = param(0, "latents in the AuxK reconstruction (0 = n_latents // 2)", ge=0)
    aux_coef: float = param(1 / 32, "weight of the AuxK loss", ge=0)
    dead_window: int = param(5000, "a latent not fired within this many samples is dead", ge=1)
    skip_zero_updates: bool = param(
        True, "leave out events whose update is exactly zero (zero advantage: nothing reinforced)"
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


def load_updates(store_path, patterns=(), skip_zero: bool = False) -> tuple[dict[str, torch.Tensor], xr.Dataset]:
    """Updates of a store as ``{param: float32 tensor [event, *shape]}``, and the store (labels).

    ``skip_zero`` leaves out events whose update is exactly zero in every tensor (the
    returned store is subset to the same events).
    """
    ds = open_store(store_path)
    names = {ds[v].attrs["param"]: v for v in update_vars(ds)}
    if patterns:
        names = {p: v for p, v in names.items() if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)}
        if not names:
            raise ValueError(
                f"parameter 'params': {list(patterns)} matches none of the store's tensors {list(update_vars(ds))}"
            )
    data = {p: torch.from_numpy(np.asarray(ds[v].values, dtype=np.float32)) for p, v in names.items()}
    ds = ds.assign_coords(store_event=("event", np.arange(ds.sizes["event"])))
    if skip_zero:
        nonzero = sum((v != 0).reshape(len(v), -1).any(1).int() for v in data.values()) > 0
        keep = np.flatnonzero(nonzero.numpy())
        data = {p: v[keep] for p, v in data.items()}
        ds = ds.isel(event=keep)
    return data, ds


def split_events(n: int, holdout_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout_frac))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def init_from_data(sae: ShardSAE, data: dict[str, torch.Tensor]) -> None:
    """Input scale (mean squared norm 1) and b_pre = data mean, both saved with the model."""
    with torch.no_grad():
        sq = sum((v.double() ** 2).reshape(len(v), -1).sum(1) for v in data.values())
        sae.scale.fill_(float(sq.mean().sqrt().clamp(min=1e-30)))
        for j, n in enumerate(sae.names):
            sae.b_pre[str(j)].copy_(data[n].double().mean(0).float() / sae.scale)


def total_variance(data: dict[str, torch.Tensor], scale: float) -> float:
    return float(
        sum(((v.double() / scale - v.double().mean(0) / scale) ** 2).sum() for v in data.values())
        / len(next(iter(data.values())))
    )


class Trainer:
    """One SAE and its optimizer; ``step(batch)`` is one training step (shared offline and online)."""

    def __init__(
        self, sae: ShardSAE, lr: float, aux_k: int, aux_coef: float, dead_window: int, variance: float, accelerator=None
    ):
        self.sae, self.aux_coef, self.dead_window = sae, aux_coef, dead_window
        # several processes: each takes a slice of every batch; gradients are averaged and
        # firing records combined across processes, so every process keeps the same SAE
        self.acc = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
        self.aux_k = aux_k or max(1, sae.n_latents // 2)
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr)
        self.variance = max(variance, 1e-30)
        self.samples = 0
        self.last_fired = torch.zeros(sae.n_latents, dtype=torch.long)

    def dead(self) -> torch.Tensor:
        return (self.samples - self.last_fired) > self.dead_window

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        sae = self.sae
        sae.train()
        xhat, z, a, y = sae(batch)
        xn = {n: batch[n] / sae.scale for n in sae.names}
        N = z.shape[0]
        rec = sum(((xn[n] - xhat[n]) ** 2).sum() for n in sae.names) / (N * self.variance)
        dead = self.dead().to(z.device)
        yc = {n: xhat[n] - sae.b_pre[str(j)] for j, n in enumerate(sae.names)}
        aux = aux_loss(sae, a, y, yc, dead, self.aux_k) if self.aux_coef > 0 else rec.new_zeros(())
        loss = rec + self.aux_coef * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.acc is not None:
            for prm in sae.parameters():
                if prm.grad is None:
                    prm.grad = torch.zeros_like(prm)
                prm.grad = self.acc.reduce(prm.grad, "mean")
            N = int(self.acc.reduce(torch.tensor(N, device=z.device), "sum"))
        self.opt.step()
        sae.normalize_decoder_()
        self.samples += N
        fired = (z != 0).any(0)
        if self.acc is not None:
            fired = self.acc.reduce(fired.float(), "sum") > 0
        fired = fired.cpu()
        self.last_fired[fired] = self.samples
        return {
            "loss": float(loss.detach()),
            "rec": float(rec.detach()),
            "aux": float(aux.detach()),
            "l0": float((z != 0).sum(1).float().mean()),
            "dead": float(dead.float().mean()),
        }

    def state(self) -> dict:
        return {"samples": self.samples, "last_fired": self.last_fired.tolist()}

    def load_state(self, st: dict) -> None:
        self.samples = st["samples"]
        self.last_fired = torch.tensor(st["last_fired"], dtype=torch.long)


@torch.no_grad()
def evaluate(
    sae: ShardSAE, data: dict[str, torch.Tensor], idx: np.ndarray, batch_size: int = 512, device="cpu"
) -> dict:
    """Metrics (FVU from sufficient statistics, L0, dead/dense fractions, shrinkage) on events ``idx``."""
    sae.eval()
    stats = ReconStats()
    for s in range(0, len(idx), batch_size):
        b = {n: v[idx[s : s + batch_size]].to(device) for n, v in data.items()}
        xhat, z, *_ = sae(b)
        stats.update({n: b[n] / sae.scale for n in sae.names}, xhat, z)
    return stats.result() if stats.n else {}


@torch.no_grad()
def encode_all(sae: ShardSAE, data: dict[str, torch.Tensor], batch_size: int = 512, device="cpu"):
    """Active latents of every event: (index [N, kk] with -1 padding, value [N, kk], dense codes [N, F])."""
    sae.eval()
    codes = []
    n = len(next(iter(data.values())))
    for s in range(0, n, batch_size):
        b = {k: v[s : s + batch_size].to(device) for k, v in data.items()}
        _, z, *_ = sae(b)
        codes.append(z.cpu())
    z = torch.cat(codes)
    kk = max(1, int((z != 0).sum(1).max()))
    mag, idx = z.abs().topk(kk, dim=1)
    val = z.gather(1, idx)
    idx = torch.where(mag > 0, idx, torch.full_like(idx, -1))
    return idx.numpy(), val.numpy(), z


def _checkpoint(path: Path, trainer: Trainer, epoch: int, history: list, fingerprint: str) -> None:
    tmp = atomic_dir(path)
    trainer.sae.save(tmp / "sae")
    torch.save(trainer.opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(
        json.dumps({"epoch": epoch, "history": history, "fingerprint": fingerprint, **trainer.state()})
    )
    commit_dir(tmp, path)


def train(
    p: ShardParams, progress: bool = True, stop_after: int | None = None, data=None, init_directions=None
) -> dict:
    """Train offline on ``p.store_path``; resumes from ``out_dir/checkpoint``.

    ``data`` ({name: [N, *shape]}) replaces the store; ``init_directions`` ({name: [F, *shape]})
    starts the decoder and encoder there instead of at random (``ShardSAE.set_directions_``).

    Runs with ``torch.use_deterministic_algorithms(True)``: the backward of the gathered
    factors (an accumulating index_put) otherwise adds in a thread-dependent order on CPU,
    and two runs of the same config drift apart.

    Returns ``{"sae", "data", "store", "train_idx", "heldout_idx", "history", "seconds"}``.
    """
    with deterministic():
        return _train(p, progress, stop_after, data, init_directions)


@contextlib.contextmanager
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` inside the block, the previous setting after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(p: ShardParams, progress: bool, stop_after: int | None, data, init_directions) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .rl import make_accelerator

    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(p.device)
    set_seed(p.seed)
    if data is None:
        data, store = load_updates(p.store_path, p.params, p.skip_zero_updates)
    else:
        store = None
    n = len(next(iter(data.values())))
    if n < 2:
        raise ValueError(f"store {p.store_path} holds {n} event(s); an SAE needs at least 2")
    train_idx, held_idx = split_events(n, p.holdout_frac, p.seed)
    sae = ShardSAE(
        {k: tuple(v.shape[1:]) for k, v in data.items()}, p.n_latents, p.k, p.rank, p.activation, p.signed, seed=p.seed
    )
    init_from_data(sae, {k: v[train_idx] for k, v in data.items()})
    if init_directions is not None:
        sae.set_directions_(init_directions)
    sae.to(acc.device)
    variance = total_variance({k: v[train_idx] for k, v in data.items()}, float(sae.scale))
    trainer = Trainer(sae, p.lr, p.aux_k, p.aux_coef, p.dead_window, variance, accelerator=acc)
    ckpt = out / "checkpoint"
    start, history = 0, []
    st = read_checkpoint(ckpt, p.fingerprint(), "epoch", p.epochs, ["sae", "optimizer.pt"])
    if st is not None:
        trainer.sae = sae = ShardSAE.load(ckpt / "sae").to(acc.device)
        trainer.opt = torch.optim.Adam(sae.parameters(), lr=p.lr)
        trainer.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        trainer.load_state(st)
        start, history = st["epoch"], st["history"]
    t0 = time.perf_counter()
    steps_per_epoch = math.ceil(len(train_idx) / p.batch_size)
    bar = tqdm(total=p.epochs * steps_per_epoch, initial=start * steps_per_epoch, desc="shards", disable=not progress)
    for epoch in range(start, p.epochs):
        perm = train_idx[np.random.default_rng([p.seed, epoch]).permutation(len(train_idx))]
        sums = {}
        for s in range(0, len(perm), p.batch_size):
            chunk = perm[s : s + p.batch_size]
            if len(chunk) < acc.num_processes:  # too few events to give every process one
                bar.update(1)
                continue
            chunk = chunk[acc.process_index :: acc.num_processes]
            b = {k: v[chunk].to(acc.device) for k, v in data.items()}
            m = trainer.step(b)
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
            return {"sae": sae, "stopped_at": done}
    bar.close()
    return {
        "sae": sae,
        "data": data,
        "store": store,
        "train_idx": train_idx,
        "heldout_idx": held_idx,
        "history": history,
        "seconds": time.perf_counter() - t0,
        "device": acc.device,
        "accelerator": acc,
    }


def dense_parameter_count(shapes: dict[str, tuple], n_latents: int) -> int:
    """Parameters of the dense (full-rank) SAE of the same size: encoder, decoder, biases."""
    D = sum(math.prod(s) for s in shapes.values())
    return 2 * n_latents * D + n_latents + D


def shards_dataset(sae: ShardSAE, frequency=None, mean_activation=None) -> xr.Dataset:
    """The public ``shards.nc`` content: dense unit directions per tensor, factors, statistics."""
    from .updates import var_name

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


def write_outputs(p: ShardParams, res: dict) -> dict[str, Path]:
    """Write ``sae/``, ``shards.nc``, ``activations.nc`` and ``results.nc`` into ``out_dir``."""
    from .io import save_results

    out = Path(p.out_dir)
    sae, data = res["sae"].cpu(), res["data"]
    sae.save(out / "sae")
    idx, val, z = encode_all(sae, data)
    held = evaluate(sae, data, res["heldout_idx"])
    train_m = evaluate(sae, data, res["train_idx"])
    freq = (z != 0).float().mean(0).numpy()
    mean_act = (z.abs().sum(0) / (z != 0).sum(0).clamp(min=1)).numpy()
    shards = shards_dataset(sae, freq, mean_act)
    shards.attrs["store_path"] = p.store_path
    save_results(shards, out / "shards.nc", p.to_dict(), p.seed)
    split = np.array(["train"] * len(idx), dtype=object)
    split[res["heldout_idx"]] = "heldout"
    labels = {}
    store = res.get("store")
    if store is not None:
        labels = {c: ("event", store[c].values) for c in store.coords if store[c].dims == ("event",)}
    acts = xr.Dataset(
        {"index": (("event", "slot"), idx.astype(np.int32)), "value": (("event", "slot"), val.astype(np.float32))},
        coords={**labels, "split": ("event", split.astype(str))},
    )
    if store is not None and "task_names" in store.attrs:
        acts.attrs["task_names"] = store.attrs["task_names"]
    save_results(acts, out / "activations.nc", p.to_dict(), p.seed)
    hist = res["history"]
    metrics = xr.Dataset(
        {
            **{f"heldout_{k}": v for k, v in held.items()},
            **{f"train_{k}": v for k, v in train_m.items()},
            **{f"curve_{k}": ("epoch", [h[k] for h in hist]) for k in ("loss", "rec", "aux", "l0", "dead")},
            "n_parameters": sae.n_parameters(),
            "dense_n_parameters": dense_parameter_count(sae.shapes, sae.n_latents),
            "train_seconds": res.get("seconds", float("nan")),
        },
        coords={"epoch": [h["epoch"] for h in hist]},
    )
    save_results(metrics, out / "results.nc", p.to_dict(), p.seed)
    return {"shards": out / "shards.nc", "activations": out / "activations.nc", "results": out / "results.nc"}


def dense_codes(acts: xr.Dataset, n_latents: int):
    """|activation| of every shard on every event, as a pandas frame [event, shard], from ``activations.nc``."""
    import pandas as pd

    idx, val = acts["index"].values, acts["value"].values
    dense = np.zeros((idx.shape[0], n_latents), dtype=np.float32)
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    ok = idx.reshape(-1) >= 0
    dense[rows[ok], idx.reshape(-1)[ok]] = np.abs(val.reshape(-1)[ok])
    return pd.DataFrame(dense)


def event_types(acts: xr.Dataset) -> np.ndarray:
    """Event type per event: task family, the task's correctness clause when the store has one
    (LM: ``ok`` / ``wrong``), and the sign of the advantage, e.g. ``"max ok +"``."""
    names = json.loads(acts.attrs["task_names"]) if "task_names" in acts.attrs else None
    task = acts["task"].values
    label = [names[t] if names else str(t) for t in task]
    correct = [c for c in acts.coords if str(c).startswith("reward_correct_")]
    if correct:
        ok = np.any([acts[c].values > 0 for c in correct], axis=0)
        label = [f"{a} {'ok' if o else 'wrong'}" for a, o in zip(label, ok)]
    if "advantage" in acts.coords:
        sign = np.where(acts["advantage"].values > 0, "+", np.where(acts["advantage"].values < 0, "-", "0"))
        label = [f"{a} {s}" for a, s in zip(label, sign)]
    return np.array(label)


class OnlineTrainer:
    """Trains a ShardSAE from the RL loop's ring buffer while RL runs.

    Pass it as ``rl.train(..., on_step=trainer)``: after every RL step, once the buffer holds
    ``warmup`` events, it takes ``steps_per_rl_step`` SAE steps on batches sampled from the
    buffer. The SAE is built at warm-up from the buffer's tensor shapes; the input scale and
    ``b_pre`` come from the buffer's contents then. Memory: the buffer's capacity, never the run.
    """

    def __init__(self, p: ShardParams, warmup: int = 256, steps_per_rl_step: int = 1):
        self.p, self.warmup, self.k_steps = p, warmup, steps_per_rl_step
        self.sae: ShardSAE | None = None
        self.trainer: Trainer | None = None
        self.gen = torch.Generator().manual_seed(p.seed)
        self.history: list[dict] = []

    @classmethod
    def from_rl(cls, rp) -> OnlineTrainer:
        """The online trainer an RL stage's ``online_*`` parameters describe."""
        p = ShardParams.from_dict(
            {
                "out_dir": rp.out_dir,
                "seed": rp.seed,
                "store_path": "ring buffer",
                "n_latents": rp.online_n_latents,
                "k": rp.online_k,
                "rank": rp.online_rank,
                "lr": rp.online_lr,
                "batch_size": rp.online_batch_size,
            }
        )
        return cls(p, warmup=rp.online_warmup, steps_per_rl_step=rp.online_steps_per_rl_step)

    def __call__(self, step: int, buffer) -> None:
        if buffer is None or buffer.size < self.warmup:
            return
        if self.trainer is None:
            p = self.p
            self.sae = ShardSAE(buffer.shapes, p.n_latents, p.k, p.rank, p.activation, p.signed, seed=p.seed)
            snapshot = {n: v[: buffer.size].float() for n, v in buffer.data.items()}
            init_from_data(self.sae, snapshot)
            self.trainer = self._trainer(total_variance(snapshot, float(self.sae.scale)))
        with deterministic():  # as offline training: else the gather backward adds in thread order
            for _ in range(self.k_steps):
                m = self.trainer.step(buffer.sample(self.p.batch_size, self.gen))
                m["rl_step"] = step
                self.history.append(m)

    def _trainer(self, variance: float) -> Trainer:
        p = self.p
        return Trainer(self.sae, p.lr, p.aux_k, p.aux_coef, p.dead_window, variance)

    def save(self, path) -> None:
        """SAE, optimizer, sampling generator and history into folder ``path`` (saved with each RL checkpoint)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.gen.get_state(), path / "generator.pt")
        state = {"history": self.history, "trainer": None}
        if self.trainer is not None:
            self.sae.save(path / "sae")
            torch.save(self.trainer.opt.state_dict(), path / "optimizer.pt")
            state["trainer"] = {**self.trainer.state(), "variance": self.trainer.variance}
        (path / "state.json").write_text(json.dumps(state))

    def load(self, path) -> None:
        """Restore what ``save`` wrote: a resumed RL run continues the online SAE where it stopped."""
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        self.gen.set_state(torch.load(path / "generator.pt", weights_only=True))
        self.history = state["history"]
        if state["trainer"] is not None:
            self.sae = ShardSAE.load(path / "sae")
            self.trainer = self._trainer(state["trainer"]["variance"])
            self.trainer.opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
            self.trainer.load_state(state["trainer"])


def frontier(sweep_dir) -> xr.Dataset:
    """Combine a sweep of shard stages (subfolders of ``sweep_dir``) into held-out metrics over (rank, k)."""
    rows = []
    for d in sorted(Path(sweep_dir).iterdir()):
        f = d / "results.nc"
        if not f.exists():
            continue
        with xr.open_dataset(f) as r:
            cfg = json.loads(r.attrs["config"])
            m = {k: float(r[f"heldout_{k}"]) for k in ("fvu", "l0", "dead_fraction", "dense_fraction")}
            m["n_parameters"] = float(r["n_parameters"])
        rows.append(xr.Dataset(m).expand_dims(rank=[cfg["rank"]], k=[cfg["k"]]))
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no finished shard runs (subfolders with results.nc)")
    return xr.combine_by_coords(rows).sortby(["rank", "k"])


@dataclass(frozen=True)
class FrontierParams(Params):
    """Parameters of the reconstruction frontier (``notebooks/06_frontier.ipynb``)."""

    sweep_dirs: list[str] = param([], "folders of shard-stage sweeps over k and rank, one per store")
    sweep_names: list[str] = param([], "a name per sweep folder (e.g. events, steps)")

    def check(self):
        if len(self.sweep_dirs) != len(self.sweep_names) or not self.sweep_dirs:
            raise ValueError("parameters 'sweep_dirs' and 'sweep_names': one name per folder, at least one folder")
