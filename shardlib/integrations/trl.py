"""Per-event and per-step parameter updates from Hugging Face TRL's ``GRPOTrainer``.

Attach before ``trainer.train()``; no subclass::

    from shardlib.integrations.trl import collect_updates

    trainer = GRPOTrainer(model=model, reward_funcs=[...], args=GRPOConfig(...), train_dataset=dataset)
    collect_updates(trainer, params=["model.layers.*.mlp.down_proj.weight"], store_dir="runs/trl/updates")
    trainer.train()  # or trainer.train(resume_from_checkpoint=True)

writes an event store (one event per completion and optimizer step, ``<store_dir>/events``) and a step store
(``<store_dir>/steps``) in shardlib's store format (:mod:`shardlib.store`), which ``open_store`` and the
shard stage (``notebooks/03_shards.ipynb``) read.

What an event is: completion ``e``'s share of the step's gradient, ``u_e = -lr * grad l_e`` (``convention
="sgd"``), where ``l_e`` is the completion's term of TRL's loss *as TRL normalises it* (per micro-batch token
or sequence means, the gradient-accumulation divisor, the mean over processes). So a step's events sum to
``-lr`` times the step's *unclipped* gradient of the selected parameters; the optimizer applied the clipped one,
``clip_coef`` times it (both labelled), and, with the default AdamW, preconditioned (``convention="adam"``
applies each step's preconditioner to every event). With ``loss_type`` grpo or bnpo the normaliser is a
micro-batch mean, so an event's update depends on the other rows of its micro-batch; dr_grpo and dapo use a
constant normaliser.

Labels (one value per event): ``step`` (optimizer step, 0-based), ``iteration`` (pass over the generation
batch, ``num_iterations > 1``), ``micro_batch``, ``process``, ``reward`` (weighted total) and
``reward_<func>`` per reward function (NaN where a function returned None), ``advantage``, ``group`` (prompt
group, unique in the run), ``generation_step``, ``completion_length`` (tokens), ``completion_hash`` and
``prompt_hash`` (64-bit hashes of the token ids), the dataset columns named in ``columns``, ``lr`` (this step's learning rate from the optimizer, after
the schedule), ``grad_norm`` (pre-clip norm over all parameters, as the trainer computed it; NaN without
clipping) and ``clip_coef``.

How it attaches (checked against trl 1.16): it wraps, on the trainer instance only, ``training_step`` (a
capture around each micro-batch's forward and backward: only forwards whose output receives a gradient count,
so generation, the old-policy and reference log-prob passes and the recompute of gradient checkpointing do
not), ``_generate_and_score_completions`` and ``_calculate_rewards`` (rewards per function and a row id that
follows each completion through TRL's shuffle and split), ``_prepare_inputs`` (which rows a micro-batch
holds) and ``_clip_grad_norm`` (the pre-clip norm); a ``TrainerCallback`` does the rest (the optimizer,
learning rate, step boundaries, flushes before each checkpoint, truncation when resuming).

Limits: the LM head cannot be collected (TRL computes it inside a fused log-prob kernel, never calling
``lm_head`` as a module), nor any parameter that is not an ``nn.Linear`` weight or bias (embeddings, norms);
factored events from several processes are not gathered yet; bf16/fp16 autocast (TRL's default ``bf16=True``)
makes event updates approximate (see the warning it raises); other trl versions are refused unless
``allow_untested_trl=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..collector import (
    UpdateCollector,
    check_convention,
    check_gatherable,
    non_linear_message,
    param_owners,
    select_params,
)
from ..store import open_update_stores

SUPPORTED_TRL = ("1.16",)
"""trl release series whose GRPOTrainer internals this module was written and tested against."""

_WRAPPED = ("training_step", "_prepare_inputs", "_generate_and_score_completions", "_calculate_rewards")
_ROW = "shardlib_row"
_RESERVED = (
    "reward",
    "advantage",
    "group",
    "generation_step",
    "completion_length",
    "completion_hash",
    "prompt_hash",
    "iteration",
    "micro_batch",
    "process",
    "step",
    "lr",
    "grad_norm",
    "clip_coef",
)  # the column that carries each completion's row id through TRL's shuffle and split
_FINGERPRINT_ARGS = (
    "output_dir",
    "seed",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_generations",
    "num_iterations",
    "max_completion_length",
    "loss_type",
    "beta",
    "temperature",
)


def _trl_version() -> str:
    import trl

    return trl.__version__


def check_trl_version(allow_untested: bool = False) -> str:
    """The installed trl version; an error (a warning with ``allow_untested``) outside :data:`SUPPORTED_TRL`."""
    v = _trl_version()
    series = ".".join(v.split(".")[:2])
    if series not in SUPPORTED_TRL:
        msg = (
            f"shardlib.integrations.trl supports trl {', '.join(s + '.x' for s in SUPPORTED_TRL)} (tested with "
            f"1.16.0); trl {v} is installed. It relies on GRPOTrainer internals (training_step, _prepare_inputs, "
            "_generate_and_score_completions, _calculate_rewards, _clip_grad_norm) that other releases may change. "
            "Install trl==1.16.0, or pass allow_untested_trl=True and check the sum of a step's events against "
            "its gradient"
        )
        if not allow_untested:
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=3)
    return v


def _hash_rows(ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """One int64 per row: a hash of the row's token ids where ``mask`` is set."""
    out = np.zeros(ids.shape[0], dtype=np.int64)
    ids, mask = ids.detach().cpu(), mask.detach().cpu().bool()
    for i in range(ids.shape[0]):
        toks = ids[i][mask[i]].numpy().astype(np.int64).tobytes()
        out[i] = np.frombuffer(hashlib.blake2b(toks, digest_size=8).digest(), dtype=np.int64)[0]
    return out


def _lm_head_params(model) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _check_trainer(trainer, trl_version: str) -> None:
    """``trainer`` is a GRPOTrainer not collected from yet, with every method :class:`TRLCollection` wraps."""
    from trl import GRPOTrainer

    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"collect_updates attaches to a trl.GRPOTrainer; got a {type(trainer).__name__}")
    if getattr(trainer, "_shardlib_collection", None) is not None:
        raise RuntimeError("collect_updates was already called on this trainer; call it once")
    missing = [m for m in (*_WRAPPED, "_clip_grad_norm") if not callable(getattr(trainer, m, None))]
    if missing:
        raise RuntimeError(
            f"this GRPOTrainer (trl {trl_version}) has no {missing}; shardlib.integrations.trl needs trl==1.16.0"
        )


def _warn_autocast(args) -> None:
    """Warn (at the caller of :func:`collect_updates`) that bf16/fp16 autocast makes event updates approximate."""
    if args.bf16 or args.fp16:
        kind = "bf16" if args.bf16 else "fp16"
        warnings.warn(
            f"{kind}=True (TRL's default): the forward and backward run under {kind} autocast, so each layer's "
            f"output gradient arrives in {kind} and the weight gradient is a {kind} matmul. Event updates are "
            f"formed in float32 from those {kind} values: they are the per-completion gradients up to {kind} "
            "rounding, and a step's events sum to the gradient the optimizer sees only to a few 1e-3 relative "
            "(about 1e-7 in float32). Train with bf16=False (and fp16=False) for exact event updates",
            stacklevel=4,
        )


def _callback(outer: TRLCollection):
    """The ``TrainerCallback`` that drives ``outer``: the optimizer and learning rate, step boundaries, flushes
    before each checkpoint and at the end, truncation when resuming."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            outer._begin(state, optimizer)

        def on_step_begin(self, args, state, control, **kw):
            outer._micro = 0

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if outer.collector is not None and outer.collector.active(state.global_step):
                outer.collector.before_step()

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            outer._after_step(state, optimizer)

        def on_step_end(self, args, state, control, **kw):
            if control.should_save:  # before the checkpoint is written: a resume from it loses no events
                outer.flush()

        def on_epoch_end(self, args, state, control, **kw):
            if control.should_save:
                outer.flush()

        def on_train_end(self, args, state, control, **kw):
            outer.flush()

    return _Callback()


class TRLCollection:
    """What :func:`collect_updates` attached: the collector, the stores' paths, the run's labels."""

    def __init__(
        self,
        trainer,
        params,
        store_dir,
        *,
        convention: str = "sgd",
        events: bool = True,
        steps: bool = True,
        factored: bool = False,
        max_rank: int | None = None,
        every: int = 1,
        store_dtype: str = "float32",
        fingerprint: str | None = None,
        columns=(),
        allow_untested_trl: bool = False,
    ):
        self.trl_version = check_trl_version(allow_untested_trl)
        _check_trainer(trainer, self.trl_version)
        if not (events or steps):
            raise ValueError("nothing to collect: events=False and steps=False")
        check_convention(convention, factored)
        self.trainer, self.args, self.acc = trainer, trainer.args, trainer.accelerator
        self.model = self.acc.unwrap_model(trainer.model)
        check_gatherable(factored, self.acc.num_processes)
        self.params = select_params(self.model, params)
        self._check_selection(events)
        # validates the selection now (non-Linear parameters are named); the collector itself is built when
        # training starts, once the optimizer (convention='adam') exists
        self._spec = dict(
            params=params,
            events=events,
            every=every,
            factored=factored,
            max_rank=max_rank,
            convention=convention,
            scale=1.0 / self.acc.num_processes,
        )
        UpdateCollector(self.model, params, lr=self.args.learning_rate, events=events, factored=factored)
        _warn_autocast(self.args)
        self.convention, self.every = convention, every
        self.store_dir = Path(store_dir)
        self.event_store_path = self.store_dir / "events" if events else None
        self.step_store_path = self.store_dir / "steps" if steps else None
        self.fingerprint = fingerprint or self._fingerprint(params, convention, factored, max_rank)
        self.event_store, self.step_store = self._open_stores(
            events, steps, convention, factored, max_rank, store_dtype
        )
        self.collector: UpdateCollector | None = None
        self.reward_names = [str(n) for n in trainer.reward_func_names]
        self.columns = [columns] if isinstance(columns, str) else list(columns)
        clash = [c for c in self.columns if c in _RESERVED or c.startswith("reward_")]
        if clash:
            raise ValueError(f"columns {clash} would overwrite labels collect_updates writes; rename them")
        self._table: dict[str, np.ndarray] = {}
        self._pending: list[dict[str, np.ndarray]] = []
        self._rows = None
        self._iteration = 0
        self._since_generation = 0
        self._generated = False
        self._micro = 0
        self._rewards = None
        self._grad_norm = float("nan")
        self._wrap()
        self.callback = _callback(self)
        trainer.add_callback(self.callback)
        trainer._shardlib_collection = self

    # -- attaching -------------------------------------------------------------------------------

    def _check_selection(self, events: bool) -> None:
        """Per-event updates need ``nn.Linear`` parameters outside the LM head (TRL never calls the head)."""
        owners = param_owners(self.model)
        head_params = _lm_head_params(self.model)
        head_modules = {owners[n][0] for n in head_params}
        bad = [n for n in self.params if not isinstance(owners[n][1], nn.Linear)]
        if events and bad:
            raise ValueError(non_linear_message(self.model, bad, owners, exclude=head_modules))
        head = sorted(head_params & set(self.params)) if events else []
        if head:
            raise ValueError(
                f"{head} belong to the LM head, which TRL's GRPOTrainer computes inside a fused log-prob kernel "
                "(the layer is never called as a module), so its per-event updates cannot be captured. Collect "
                "decoder layers instead (e.g. 'model.layers.*.mlp.down_proj.weight'), or the head's step updates "
                "only (events=False)"
            )

    def _open_stores(self, events, steps, convention, factored, max_rank, store_dtype):
        """(event store, step store) on the main process, each None when not collected; (None, None) elsewhere."""
        if not self.acc.is_main_process:
            return None, None
        config = {
            "trl_version": self.trl_version,
            "params": list(self.params),
            "convention": convention,
            "factored": factored,
            "max_rank": max_rank,
            **{k: getattr(self.args, k, None) for k in _FINGERPRINT_ARGS},
            "max_grad_norm": self.args.max_grad_norm,
            "bf16": bool(self.args.bf16),
            "gradient_checkpointing": bool(self.args.gradient_checkpointing),
        }
        attrs = {
            "source": "trl.GRPOTrainer",
            "reward_funcs": json.dumps(list(self.trainer.reward_func_names)),
            "loss_type": str(self.args.loss_type),
        }
        return open_update_stores(
            self.store_dir,
            events=events,
            steps=steps,
            convention=convention,
            fingerprint=self.fingerprint,
            dtype=store_dtype,
            config=config,
            seed=self.args.seed,
            attrs=attrs,
        )

    def _fingerprint(self, params, convention, factored, max_rank) -> str:
        desc = {
            "model": type(self.model).__name__,
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "params": sorted(self.params),
            "patterns": [params] if isinstance(params, str) else list(params),
            "convention": convention,
            "factored": factored,
            "max_rank": max_rank,
            **{k: getattr(self.args, k, None) for k in _FINGERPRINT_ARGS},
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _wrap(self) -> None:
        tr = self.trainer
        orig = {m: getattr(tr, m) for m in (*_WRAPPED, "_clip_grad_norm")}

        def _calculate_rewards(*a, **kw):
            out = orig["_calculate_rewards"](*a, **kw)
            self._rewards = out.detach()
            return out

        def _generate_and_score_completions(inputs):
            self._rewards = None
            out = orig["_generate_and_score_completions"](inputs)
            if tr.model.training and self.collector is not None:
                out[_ROW] = torch.arange(len(out["advantages"]), device=out["advantages"].device)
                self._table = self._generation_labels(out, inputs)
                self._since_generation, self._generated = 0, True
            return out

        def _prepare_inputs(batch):
            self._generated = False
            out = orig["_prepare_inputs"](batch)
            if tr.model.training and isinstance(out, dict) and _ROW in out:
                self._rows = out[_ROW].detach().cpu().numpy()
                self._iteration = self._since_generation // max(1, tr.args.steps_per_generation)
                self._since_generation += 1
            return out

        def training_step(model, inputs, num_items_in_batch=None):
            col = self.collector
            step = tr.state.global_step
            active = col is not None and col.active(step)
            self._rows = None
            with col.capture(active) if col is not None else nullcontext():
                loss = orig["training_step"](model, inputs, num_items_in_batch)
            if active:
                self._record_micro_batch(step)
            self._micro += 1
            return loss

        def _clip_grad_norm(model):
            norm = orig["_clip_grad_norm"](model)
            self._grad_norm = float(norm)
            return norm

        for name, fn in (
            ("_calculate_rewards", _calculate_rewards),
            ("_generate_and_score_completions", _generate_and_score_completions),
            ("_prepare_inputs", _prepare_inputs),
            ("training_step", training_step),
            ("_clip_grad_norm", _clip_grad_norm),
        ):
            setattr(tr, name, fn)

    # -- per generation, micro-batch and step ------------------------------------------------------

    def _generation_labels(self, out: dict, inputs: list[dict]) -> dict[str, np.ndarray]:
        tr, acc = self.trainer, self.acc
        n = len(out["advantages"])
        P, pi = acc.num_processes, acc.process_index
        labels: dict[str, np.ndarray] = {}
        if self._rewards is not None:
            rpf = self._rewards.float()
            weights = tr.reward_weights.to(rpf.device).float()
            total = (rpf * weights).nansum(1)
            total[torch.isnan(rpf).all(1)] = float("nan")
            local = slice(pi * n, (pi + 1) * n)
            for i, name in enumerate(self.reward_names):
                labels[f"reward_{name}"] = rpf[local, i].cpu().numpy().astype(np.float64)
            labels["reward"] = total[local].cpu().numpy().astype(np.float64)
        labels["advantage"] = out["advantages"].detach().float().cpu().numpy().astype(np.float64)
        G = int(tr.num_generations)
        gas, spg = int(self.args.gradient_accumulation_steps), max(1, int(self.args.steps_per_generation))
        per_step = max(1, math.ceil(gas / spg))  # generations one optimizer step may hold
        key = tr.state.global_step * per_step + self._micro // spg
        groups_per_generation = max(1, (n * P) // G)
        labels["group"] = (key * groups_per_generation + (pi * n + np.arange(n)) // G).astype(np.int64)
        labels["generation_step"] = np.full(n, tr.state.global_step, dtype=np.int64)
        cmask = out["completion_mask"]
        labels["completion_length"] = cmask.sum(1).cpu().numpy().astype(np.int64)
        labels["completion_hash"] = _hash_rows(out["completion_ids"], cmask)
        labels["prompt_hash"] = _hash_rows(out["prompt_ids"], out["prompt_mask"])
        for c in self.columns:
            if any(c not in x for x in inputs):
                raise KeyError(f"collect_updates(columns=[{c!r}]): the dataset has no column {c!r}")
            v = np.asarray([x[c] for x in inputs])
            if v.dtype.kind not in "biuf" or v.shape != (n,):
                raise ValueError(
                    f"dataset column {c!r} holds {v.dtype} values of shape {v.shape[1:]}; event labels are one "
                    "number (bool, int or float) per completion"
                )
            labels[c] = v.astype(np.float64) if v.dtype.kind == "f" else v.astype(np.int64)
        return labels

    def _record_micro_batch(self, step: int) -> None:
        if self._rows is None:
            raise RuntimeError(
                "a GRPOTrainer micro-batch carried no row ids: its inputs did not come from "
                "_generate_and_score_completions as wrapped by collect_updates (trl version mismatch?)"
            )
        rows = self._rows
        grads = self.collector.last_event_gradients() if self.collector.events else {}
        n_ev = next((v.shape[0] if torch.is_tensor(v) else v.n_events for v in grads.values()), len(rows))
        if n_ev != len(rows):
            raise RuntimeError(
                f"step {step}: the micro-batch's backward produced {n_ev} events for {len(rows)} completions; "
                "each completion's forward must be one row of the batch"
            )
        lab = {k: v[rows] for k, v in self._table.items()}
        lab["iteration"] = np.full(len(rows), self._iteration, dtype=np.int64)
        lab["micro_batch"] = np.full(len(rows), self._micro, dtype=np.int64)
        lab["process"] = np.full(len(rows), self.acc.process_index, dtype=np.int64)
        self._pending.append(lab)

    def _begin(self, state, optimizer) -> None:
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        s = self._spec
        self.collector = UpdateCollector(
            self.model,
            s["params"],
            lr=self.args.learning_rate,
            optimizer=opt if s["convention"] == "adam" else None,
            convention=s["convention"],
            event_store=self.event_store,
            step_store=self.step_store,
            events=s["events"],
            scale=s["scale"],
            every=s["every"],
            factored=s["factored"],
            max_rank=s["max_rank"],
        )
        # resuming from a checkpoint at step S (or starting over at 0): the stores keep steps < S only
        for store in (self.event_store, self.step_store):
            if store is not None:
                store.truncate_from(state.global_step)
        self._pending, self._micro = [], 0

    def _after_step(self, state, optimizer) -> None:
        col = self.collector
        step = state.global_step
        if col is None or not col.active(step):
            self._pending = []
            return
        opt = getattr(optimizer, "optimizer", optimizer)
        lrs = {}
        for group in opt.param_groups:
            ids = {id(p) for p in group["params"]}
            for n, p in col.params.items():
                if id(p) in ids:
                    lrs[n] = float(group["lr"])
        col.lr = lrs
        max_norm = self.args.max_grad_norm
        norm = self._grad_norm if max_norm and max_norm > 0 else float("nan")
        clip = min(1.0, max_norm / (norm + 1e-6)) if max_norm and max_norm > 0 else 1.0
        self._grad_norm = float("nan")
        labels = None
        if col.events:
            labels = {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
            n = len(labels["advantage"])
            lr0 = next(iter(lrs.values()))
            labels.update(
                step=np.full(n, step, dtype=np.int64),
                lr=np.full(n, lr0, dtype=np.float64),
                grad_norm=np.full(n, norm, dtype=np.float64),
                clip_coef=np.full(n, clip, dtype=np.float64),
            )
            if self.acc.num_processes > 1:
                labels = {k: self._gather(v) for k, v in labels.items()}
        self._pending = []
        col.after_step(step, labels, gather=self.acc.gather if self.acc.num_processes > 1 else None)

    def _gather(self, v: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(v)).to(self.acc.device)
        return self.acc.gather(t).cpu().numpy()

    def flush(self) -> None:
        """Write the events collected so far (done before every checkpoint and at the end of training)."""
        if self.collector is not None:
            self.collector.flush()


def collect_updates(trainer, params, store_dir, **kwargs) -> TRLCollection:
    """Attach update collection to a ``trl.GRPOTrainer`` before ``trainer.train()``.

    ``params``: glob patterns over the model's parameter names (``nn.Linear`` weights and biases for events,
    e.g. ``"model.layers.*.mlp.down_proj.weight"``). ``store_dir``: the folder that receives ``events/`` (one
    event per completion and optimizer step) and ``steps/`` (one per step). Options: ``convention``
    (``"sgd"`` or ``"adam"``), ``events``/``steps`` (which stores), ``factored``/``max_rank`` (factored event
    storage, one process), ``every`` (collect every n-th optimizer step), ``store_dtype``, ``fingerprint``
    (identifies the run: a store of another run is never overwritten), ``columns`` (numeric dataset columns
    kept as event labels, e.g. ``["task"]``), ``allow_untested_trl``.
    See the module docstring for the labels and the limits.
    """
    return TRLCollection(trainer, params, store_dir, **kwargs)
