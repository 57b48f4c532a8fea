"""RL fine-tuning (GRPO; REINFORCE with a baseline is its one-epoch special case) and the SFT control.

One loop for both testbeds, through Hugging Face Accelerate: CPU by default, a GPU when
present, several processes under ``accelerate launch`` / ``torchrun``, mixed precision
and gradient accumulation as options. Every optimizer step can hand its per-event and
per-step parameter updates to an :class:`~shardlib.updates.UpdateCollector`.

GRPO as in TRL / DeepSeekMath: G completions per prompt; advantage
``(r - mean_group) / std_group`` (``scale_rewards=False`` drops the std, one of Dr. GRPO's two
changes; the other is its loss aggregation, ``loss_type="dr_grpo"``); token-level clipped
surrogate with ``clip_eps`` on log-probabilities of the policy at the sampling ``temperature``
(logits divided by it, as TRL does); optional KL to the frozen starting policy with the k3
estimator ``exp(ref - logp) - (ref - logp) - 1`` (Schulman, "Approximating KL divergence", 2020; as TRL's GRPO).

Loss aggregation, under TRL's names (``loss_type``), for a micro-batch of completions with token
losses ``l_t``: ``grpo`` = mean over completions of each one's token mean; ``bnpo`` (default) =
sum over the micro-batch's tokens / their number; ``dr_grpo`` = sum / (completions x
max_new_tokens); ``dapo`` = sum / (tokens of the whole step's rollout, over processes). Event
updates decompose the step's loss ``L = sum_e l_e``, so with ``bnpo`` and ``dapo`` an event's
update depends on how many tokens the other completions of its micro-batch (or step) have; with
``grpo`` and ``dr_grpo`` each event's update is its own.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import policy as pol
from .collector import UpdateCollector, select_params, selection_summary
from .common import make_accelerator, progress_bar, step_generator
from .io import OPTIMIZER_FILE, CheckpointError, load_optimizer, read_checkpoint, write_checkpoint
from .ring import RingBuffer
from .rl_params import RLParams
from .store import open_update_stores
from .tasks import ContextualBandit, SyntheticTasks, TextTasks


def make_testbed(p: RLParams):
    if p.testbed == "bandit":
        return ContextualBandit(
            p.n_clusters,
            p.n_arms,
            p.context_dim,
            p.context_noise,
            p.shared_arms,
            p.rare_cluster_prob,
            p.negative_rewards,
            p.env_seed,
            p.n_heads,
        )
    if p.testbed == "text":
        return TextTasks.from_folder(p.init_path, tuple(p.tasks), p.format_bonus, p.max_new_tokens)
    return SyntheticTasks(tuple(p.tasks), p.n_digits, p.format_bonus, p.spurious_bonus)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale:
        a = a / (r.std(1, keepdim=True) + eps)
    return a.reshape(-1)


def aggregate(tok: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int, step_tokens) -> torch.Tensor:
    """A micro-batch's loss from its masked token losses [N, L] (see the module docstring for the
    four ``loss_type``s). ``step_tokens``: the rollout's tokens per micro-batch (``dapo``), so that
    after Accelerate divides each micro-batch by the accumulation steps the step's loss is
    ``sum / rollout tokens``."""
    if loss_type == "bnpo":
        return tok.sum() / mask.sum().clamp(min=1)
    if loss_type == "grpo":
        return (tok.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return tok.sum() / (tok.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        return tok.sum() / torch.as_tensor(step_tokens).clamp(min=1)
    raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")


def grpo_token_loss(logp, old_logp, adv, mask, clip_eps, ref_logp=None, kl_beta=0.0):
    """Per-token loss [N, L] (masked) of the clipped surrogate plus beta * k3 KL."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    loss = -surr
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + kl_beta * kl
    return loss * mask, kl * mask


def completion_hash(comp: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """A stable 63-bit hash of each completion's tokens (up to its mask): which answer was reinforced."""
    import hashlib

    rows = [c[m].numpy().astype(np.int64).tobytes() for c, m in zip(comp.cpu(), mask.cpu().bool())]
    return np.array(
        [int.from_bytes(hashlib.blake2b(r, digest_size=8).digest(), "little") >> 1 for r in rows], dtype=np.int64
    )


def _labels(step: int, rank: int, ro: Rollout, epoch: int, bandit: bool = False, testbed=None) -> dict[str, np.ndarray]:
    """Labels of a step's events: where they come from, their rewards (every clause), and what was
    reinforced (``action`` = the arm taken on the bandit; ``answer`` = the first completion token on the
    synthetic tasks; ``completion_hash`` = the completion's tokens; on text tasks the prompt and completion text).
    The compositional bandit (several heads) has per head ``cluster_h<h>`` and ``action_h<h>`` instead of
    ``action``: each event's set of reinforced computations, (head, its cluster, its arm), is known."""
    n = len(ro.total)
    lab = {
        "step": np.full(n, step, dtype=np.int64),
        "epoch": np.full(n, epoch, dtype=np.int64),
        "rank": np.full(n, rank, dtype=np.int64),
        "group": ro.group.numpy().astype(np.int64),
        "task": ro.rep["task"].numpy().astype(np.int64),
        "reward": ro.total.numpy().astype(np.float32),
        "advantage": ro.adv.numpy().astype(np.float32),
        "length": ro.mask.sum(1).numpy().astype(np.int64),
        "completion_hash": completion_hash(ro.comp, ro.mask),
    }
    if bandit and "clusters" in ro.rep:  # the compositional bandit: every head's cluster and arm
        for h in range(ro.rep["clusters"].shape[1]):
            lab[f"cluster_h{h}"] = ro.rep["clusters"][:, h].numpy().astype(np.int64)
            lab[f"action_h{h}"] = ro.comp[:, h].numpy().astype(np.int64)
    elif bandit:
        lab["action"] = ro.comp[:, 0].numpy().astype(np.int64)
    elif isinstance(testbed, SyntheticTasks):  # what the event pushes up or down: its first answer token
        lab["answer"] = np.array([testbed.vocab[t] for t in ro.comp[:, 0].tolist()])
    for c, v in ro.clauses.items():
        lab[f"reward_{c}"] = v.numpy().astype(np.float32)
    if hasattr(testbed, "event_texts"):
        lab.update(testbed.event_texts(ro.rep, ro.comp, ro.mask))
    return lab


@dataclass
class RLResult:
    """What :func:`train` returns."""

    results: xr.Dataset | None
    """Training curves and the before/after evaluation (main process; None elsewhere or when stopped)."""
    model: torch.nn.Module | None = None
    """The trained policy (unwrapped)."""
    accelerator: Any = None
    collector: UpdateCollector | None = None
    buffer: RingBuffer | None = None
    """The ring buffer of recent event updates (``buffer_capacity > 0``)."""
    stopped_at: int | None = None
    """The step ``stop_after`` stopped at (as a kill would), else None."""
    online: Any = None
    """The :class:`~shardlib.shards.OnlineTrainer` (``run`` with ``online_sae``), else None."""


@dataclass
class Rollout:
    """One rollout step on this process: prompts (repeated per completion), completions, rewards."""

    rep: dict[str, torch.Tensor]
    comp: torch.Tensor
    mask: torch.Tensor
    clauses: dict[str, torch.Tensor]
    total: torch.Tensor
    adv: torch.Tensor
    group: torch.Tensor


def train(p: RLParams, progress: bool = True, log=print, stop_after: int | None = None, on_step=None) -> RLResult:
    """Run the fine-tune (cleanrl style: one loop, read top to bottom).

    Resumes from ``out_dir/checkpoint`` when it exists and was written with the same
    parameters. ``stop_after`` stops (as a kill would) after that many rollout steps.
    ``on_step(step, buffer)`` is called after every rollout step (online SAE training). The
    ring buffer, and ``on_step`` when it has ``save(path)``/``load(path)`` (``OnlineTrainer``
    does), are saved with every checkpoint and restored on resume, so a killed run's online SAE
    continues exactly where the checkpoint left it.
    """
    from accelerate.utils import set_seed

    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(p.device, p.mixed_precision, p.grad_accum)
    set_seed(p.seed)
    testbed = make_testbed(p)
    model = initial_policy(p, testbed)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if p.kl_beta > 0 else None
    optimizer = _adam(model, p.lr)

    ckpt = out / "checkpoint"
    start, history, model, optimizer = resume(p, ckpt, model, optimizer, log)
    if start == 0 and acc.is_main_process:  # the starting point, for cumulative-update analyses
        pol.save_policy(model, out / "init_policy")
    model, optimizer = acc.prepare(model, optimizer)
    ref = ref.to(acc.device) if ref is not None else None
    base = pol.unwrap(model)

    collector, buffer = make_collector(p, acc, base, optimizer, testbed, start, ckpt, log)
    if start and on_step is not None and hasattr(on_step, "load"):
        if not (ckpt / "on_step").exists():
            raise CheckpointError(
                f"{ckpt} holds no on_step/ (online SAE) state, so the online SAE cannot resume exactly; "
                f"delete {ckpt} (the stage then starts over) or run the stage with --force"
            )
        on_step.load(ckpt / "on_step")
    if acc.is_main_process and start == 0:
        init_eval = pol.evaluate(base, testbed, p.eval_prompts, p.seed, p.temperature, acc.device)
        init_eval["samples"] = _samples(base, testbed, p, acc.device)
        check_signal(p, testbed, init_eval)
    else:
        init_eval = history[0]["init_eval"] if history else None

    show = progress and acc.is_main_process
    bar = progress_bar(total=p.steps, initial=start, desc=f"{p.algorithm}:{p.testbed}", disable=not show)
    for step in range(start, p.steps):
        t0 = time.perf_counter()
        model.eval()
        ro = rollout(p, testbed, base, step, acc)
        stats = optimize(p, acc, model, optimizer, ref, ro, step, collector, testbed)
        row = metrics_row(step, ro, stats, acc, testbed, time.perf_counter() - t0)
        if not history:
            row["init_eval"] = init_eval
        history.append(row)
        if on_step is not None and acc.is_main_process:
            on_step(step, buffer)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}")
        done = step + 1
        if done % p.checkpoint_every == 0 or done == p.steps:
            _checkpoint(acc, model, optimizer, ckpt, done, history, p, collector, buffer, on_step)
        if stop_after is not None and done - start >= stop_after and done < p.steps:
            bar.close()
            return RLResult(None, base, acc, collector, buffer, stopped_at=done)
    bar.close()

    final_eval = pol.evaluate(base, testbed, p.eval_prompts, p.seed, p.temperature, acc.device)
    ds = None
    if acc.is_main_process:
        extra = {"tasks": list(p.tasks), "n_digits": p.n_digits} if p.testbed == "lm" else None
        pol.save_policy(base, out / "policy", extra=extra, tokenizer=getattr(testbed, "tokenizer", None))
        final_eval["samples"] = _samples(base, testbed, p, acc.device)
        ds = history_dataset(history, testbed, history[0]["init_eval"], final_eval)
    acc.wait_for_everyone()
    return RLResult(ds, base, acc, collector, buffer)


def check_signal(p: RLParams, testbed, ev: dict, min_prompts: int = 16) -> None:
    """Text tasks under GRPO: a family whose held-out prompts (``min_prompts`` or more) all earn zero reward
    gives groups of equal rewards, zero advantages and nothing to learn; stop before training."""
    if not (p.testbed == "text" and p.algorithm == "grpo" and p.require_signal):
        return
    dead = [
        f"{t} (0 of {n})" for t, r, n in zip(testbed.task_names, ev["reward"], ev["n"]) if n >= min_prompts and r == 0
    ]
    if dead:
        raise ValueError(
            f"parameter 'tasks': the starting policy earns no reward on {', '.join(dead)} held-out prompts, so GRPO "
            "has nothing to reinforce there; drop those families (the model stage measures each one), raise "
            "max_new_tokens, or set require_signal: false"
        )


def _samples(model, testbed, p: RLParams, device=None, n: int = 8) -> dict | None:
    """Text tasks: ``n`` held-out questions (the same before and after) with a sampled completion each."""
    if not hasattr(testbed, "event_texts"):
        return None
    from .instruct import samples

    return samples(model, testbed, n, p.seed, p.temperature, device)


def _adam(model, lr: float) -> torch.optim.Adam:
    """The policy's optimizer, fused: one pass over each tensor a step."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def resume(p: RLParams, ckpt: Path, model, optimizer, log=print):
    """(steps done, history, policy, optimizer): from the checkpoint when there is one (checked by
    :func:`~shardlib.io.read_checkpoint`), else (0, [], the given policy and optimizer)."""
    needs = ["policy", OPTIMIZER_FILE] + (["buffer"] if p.collect_params and p.buffer_capacity else [])
    state = read_checkpoint(ckpt, p.fingerprint(), "step", p.steps, needs)
    if state is None:
        return 0, [], model, optimizer
    model = pol.load_policy(ckpt / "policy")
    optimizer = _adam(model, p.lr)
    load_optimizer(optimizer, ckpt)
    log(f"resuming from checkpoint at step {state['step']}")
    return state["step"], state["history"], model, optimizer


def initial_policy(p: RLParams, testbed) -> torch.nn.Module:
    """The policy the fine-tune starts from: ``init_path`` (checked against the testbed), or a fresh bandit MLP."""
    if p.init_path:
        model = pol.load_policy(p.init_path)
        extra = pol.load_extra(p.init_path)
        if p.testbed == "lm":
            pol.check_vocab(model, testbed)
            for key in ("tasks", "n_digits"):
                if key in extra and list(np.atleast_1d(extra[key])) != list(np.atleast_1d(getattr(p, key))):
                    raise ValueError(
                        f"parameter {key!r}={getattr(p, key)!r} differs from the pretrained policy's {extra[key]!r}"
                    )
        return model
    torch.manual_seed(p.seed)
    if p.n_heads > 1:  # the context is one per head, side by side; one output head per action token
        return pol.MLPPolicy(p.context_dim * p.n_heads, p.n_arms, p.hidden, p.n_heads, p.shared_trunk)
    return pol.MLPPolicy(p.context_dim, p.n_arms, p.hidden)


def make_collector(p: RLParams, acc, base, optimizer, testbed, start: int, ckpt: Path, log=print):
    """(collector, ring buffer) for ``collect_params``, or (None, None). Stores are opened on the main process
    and truncated to the resume point; the buffer is restored from the checkpoint."""
    if not p.collect_params:
        return None, None
    sel = select_params(base, p.collect_params)
    if acc.is_main_process:
        log("collecting updates of:\n" + selection_summary(sel))
    attrs = {"task_names": json.dumps(list(testbed.task_names)), "testbed": p.testbed, "algorithm": p.algorithm}
    estore, sstore = open_update_stores(
        Path(p.out_dir) / "updates",
        events=p.collect_events and acc.is_main_process,
        steps=p.collect_steps and acc.is_main_process,
        convention=p.convention,
        fingerprint=p.fingerprint(),
        dtype=p.store_dtype,
        config=p.to_dict(),
        seed=p.seed,
        attrs=attrs,
    )
    for s in (estore, sstore):
        if s is not None:
            s.truncate_from(start * p.inner_epochs)
    buffer = None
    if p.buffer_capacity:
        factored = [n for n, t in sel.items() if p.collect_factored and t.ndim == 2]
        buffer = RingBuffer({n: tuple(t.shape) for n, t in sel.items()}, p.buffer_capacity, torch.float32, factored)
        if start:
            buffer.load(ckpt / "buffer")
    if p.collect_factored and acc.num_processes > 1:
        raise ValueError(
            f"parameter 'collect_factored': factored events from {acc.num_processes} processes are not gathered "
            "yet; run one process, or collect dense events (collect_factored: false)"
        )
    collector = UpdateCollector(
        base,
        p.collect_params,
        lr=p.lr,
        optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        convention=p.convention,
        event_store=estore,
        step_store=sstore,
        buffer=buffer,
        events=p.collect_events,
        scale=1.0 / acc.num_processes,
        every=p.collect_every,
        group_by="group" if p.group_events else None,
        factored=p.collect_factored,
        max_rank=p.collect_max_rank or None,
        step_rank=p.collect_step_rank or None,
    )
    return collector, buffer


def rollout(p: RLParams, testbed, base, step: int, acc) -> Rollout:
    """Sample this step's prompts and (GRPO) G completions each, or (SFT) the correct answers; score them."""
    gen = step_generator(p.seed, step, acc.process_index)
    batch = testbed.sample(p.prompts_per_step, gen)
    if p.algorithm == "grpo":
        G = p.group_size
        rep = {k: v.repeat_interleave(G, 0) for k, v in batch.items()}
        comp, mask = pol.sample_batch(base, testbed, rep, gen, p.temperature, acc.device)
        clauses = testbed.rewards(rep, comp, mask)
        total = sum(clauses.values())
        adv = group_advantages(total, G, p.scale_rewards)
        group = torch.arange(p.prompts_per_step).repeat_interleave(G)
    else:
        rep = batch
        comp, mask = testbed.sft_targets(batch)
        clauses = testbed.rewards(rep, comp, mask)
        total = sum(clauses.values())
        adv = torch.ones_like(total)  # SFT = every target reinforced with advantage 1
        group = torch.arange(p.prompts_per_step)
    group = group + (step * acc.num_processes + acc.process_index) * p.prompts_per_step
    return Rollout(rep, comp, mask, clauses, total, adv, group)


def optimize(p: RLParams, acc, model, optimizer, ref, ro: Rollout, step: int, collector, testbed) -> dict[str, float]:
    """``inner_epochs`` optimizer steps on one rollout (``grad_accum`` micro-batches each), collecting
    event and step updates where ``collector`` is active; returns mean loss, KL and entropy."""
    vs = getattr(testbed, "vocab_size", None)
    prompt_d, comp_d, mask_d, adv_d = (x.to(acc.device) for x in (ro.rep["prompt"], ro.comp, ro.mask, ro.adv))
    pmask_d = ro.rep["prompt_mask"].to(acc.device) if "prompt_mask" in ro.rep else None  # text: left padding
    temp = p.temperature if p.algorithm == "grpo" else 1.0  # SFT: the likelihood of the targets
    with torch.no_grad():
        ref_logp = pol.logprobs(ref, prompt_d, comp_d, vs, temp, pmask_d)[0] if ref is not None else None
    # the sampling policy's log-probabilities: those of the first inner epoch's forward passes, detached (no optimizer
    # step comes before that epoch's last micro-batch has gone forward), not a forward pass of their own
    old_logp = torch.zeros(comp_d.shape, device=acc.device)
    rollout_tokens = mask_d.float().sum()
    if acc.num_processes > 1:
        rollout_tokens = acc.reduce(rollout_tokens, "sum") / acc.num_processes
    model.train()
    n_micro = p.grad_accum
    mb = ro.comp.shape[0] // n_micro
    parts = n_micro * p.inner_epochs  # the mean over micro-batches and inner epochs
    stats = {"loss": 0.0, "kl": 0.0, "entropy": 0.0}
    for epoch in range(p.inner_epochs):
        opt_step = step * p.inner_epochs + epoch
        collect = collector is not None and collector.active(opt_step)
        for m in range(n_micro):
            sl = slice(m * mb, (m + 1) * mb)
            with acc.accumulate(model):
                with collector.capture(collect) if collector is not None else nullcontext():
                    pmask = None if pmask_d is None else pmask_d[sl]
                    # a pass collecting events keeps every event's own rows (its per-event gradients read them); the
                    # others (step updates need only the parameters' change) run each prompt's shared tokens once
                    own_rows = collect and collector.events
                    logp, ent = pol.logprobs(
                        model, prompt_d[sl], comp_d[sl], vs, temp, pmask, share_prompts=not own_rows
                    )
                    if epoch == 0:
                        old_logp[sl] = logp.detach()
                    msk = mask_d[sl].float()
                    ntok = msk.sum().clamp(min=1)
                    if p.algorithm == "grpo":
                        ref_sl = None if ref_logp is None else ref_logp[sl]
                        tok, kl = grpo_token_loss(logp, old_logp[sl], adv_d[sl], msk, p.clip_eps, ref_sl, p.kl_beta)
                    else:
                        tok, kl = -logp * msk, torch.zeros_like(logp)
                    loss = aggregate(tok, msk, p.loss_type, testbed.max_new_tokens, rollout_tokens / n_micro)
                    acc.backward(loss)
                if acc.sync_gradients and collect:
                    collector.before_step()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stats["loss"] += float(loss.detach()) / parts
            stats["kl"] += float(kl.detach().sum() / ntok) / parts
            stats["entropy"] += float((ent.detach() * msk).sum() / ntok) / parts
        if collect:
            labels = _labels(opt_step, acc.process_index, ro, epoch, p.testbed == "bandit", testbed)
            if acc.num_processes > 1:
                # text labels stay with the main process's store only when there is one process
                labels = {k: acc.gather(torch.from_numpy(v)).numpy() for k, v in labels.items() if v.dtype != object}
            collector.after_step(opt_step, labels, gather=acc.gather if acc.num_processes > 1 else None)
    return stats


def metrics_row(step: int, ro: Rollout, stats: dict[str, float], acc, testbed, seconds: float) -> dict:
    """One row of the training history, averaged (rewards, losses) or summed (per-task counts) over processes."""
    means = {
        "reward": float(ro.total.mean()),
        "tokens": float(ro.mask.sum()),
        **stats,
        **{f"clause/{c}": float(v.mean()) for c, v in ro.clauses.items()},
    }
    n_tasks = len(testbed.task_names)
    task_sum = torch.zeros(n_tasks).index_add_(0, ro.rep["task"], ro.total)
    task_cnt = torch.zeros(n_tasks).index_add_(0, ro.rep["task"], torch.ones_like(ro.total))
    vec = torch.tensor(list(means.values()))
    if acc.num_processes > 1:
        vec = acc.reduce(vec.to(acc.device), "mean").cpu()
        task_sum = acc.reduce(task_sum.to(acc.device), "sum").cpu()
        task_cnt = acc.reduce(task_cnt.to(acc.device), "sum").cpu()
    m = dict(zip(means, vec.tolist()))
    return {
        "step": step,
        "reward": m["reward"],
        "tokens_per_s": m["tokens"] * acc.num_processes / seconds,
        "steps_per_s": 1.0 / seconds,
        "loss": m["loss"],
        "kl": m["kl"],
        "entropy": m["entropy"],
        "clauses": {c: m[f"clause/{c}"] for c in ro.clauses},
        "task_reward": (task_sum / task_cnt.clamp(min=1)).where(task_cnt > 0, torch.tensor(float("nan"))).tolist(),
    }


def _checkpoint(
    acc, model, optimizer, ckpt: Path, step: int, history, p: RLParams, collector, buffer=None, on_step=None
) -> None:
    """Flush stores, then write policy + optimizer (+ ring buffer, online trainer) + state atomically (state.json last)."""
    if collector is not None:
        collector.flush()
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    savers = {"policy": lambda d: pol.save_policy(pol.unwrap(model), d)}
    if buffer is not None:
        savers["buffer"] = buffer.save
    if on_step is not None and hasattr(on_step, "save"):
        savers["on_step"] = on_step.save
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    write_checkpoint(ckpt, {"step": step, "history": history, "fingerprint": p.fingerprint()}, savers, opt)


def history_dataset(history: list[dict], testbed, init_eval: dict, final_eval: dict) -> xr.Dataset:
    """Training curves and the before/after evaluation as an xarray Dataset."""
    steps = np.array([h["step"] for h in history])
    clauses = list(history[0]["clauses"])
    ds = xr.Dataset(
        {
            "reward": ("step", [h["reward"] for h in history]),
            "loss": ("step", [h["loss"] for h in history]),
            "kl": ("step", [h["kl"] for h in history]),
            "entropy": ("step", [h["entropy"] for h in history]),
            "tokens_per_s": ("step", [h["tokens_per_s"] for h in history]),
            "steps_per_s": ("step", [h["steps_per_s"] for h in history]),
            "clause_reward": (("step", "clause"), [[h["clauses"][c] for c in clauses] for h in history]),
            "task_reward": (("step", "task"), [h["task_reward"] for h in history]),
            "eval_reward_init": ("task", init_eval["reward"]),
            "eval_reward_final": ("task", final_eval["reward"]),
            "eval_clause_init": (("clause", "task"), [init_eval["clauses"][c] for c in clauses]),
            "eval_clause_final": (("clause", "task"), [final_eval["clauses"][c] for c in clauses]),
            "eval_n": ("task", init_eval["n"]),
        },
        coords={"step": steps, "task": list(testbed.task_names), "clause": clauses},
    )
    if "bare" in init_eval:  # text tasks: the answer's form, whatever the format clause pays
        for when, ev in (("init", init_eval), ("final", final_eval)):
            ds[f"eval_bare_{when}"] = (
                "task",
                ev["bare"],
                {"description": "share of held-out answers that are a bare number"},
            )
    if init_eval.get("samples") and final_eval.get("samples"):  # text tasks: what the policy says, before and after
        a, b = init_eval["samples"], final_eval["samples"]
        ds["sample_task"] = ("sample", np.array(a["task"], dtype=object))
        ds["sample_prompt"] = ("sample", np.array(a["prompt"], dtype=object))
        for when, s in (("init", a), ("final", b)):
            ds[f"sample_completion_{when}"] = ("sample", np.array(s["completion"], dtype=object))
            ds[f"sample_reward_{when}"] = ("sample", np.array(s["reward"], dtype=float))
    ds["reward"].attrs["long_name"] = "mean total reward of the step's rollouts"
    ds["eval_reward_init"].attrs["long_name"] = "mean reward on held-out prompts, starting policy"
    ds["eval_reward_final"].attrs["long_name"] = "mean reward on held-out prompts, fine-tuned policy"
    return ds


def run(p: RLParams, progress: bool = True) -> RLResult:
    """The stage, the same from a notebook and from ``launch.py``: fine-tune (with the online SAE when
    ``online_sae``), then on the main process write ``results.nc`` and, when the online SAE warmed
    up, ``online_sae/`` and ``online_shards.nc``."""
    from .io import save_results
    from .shardfile import shards_dataset
    from .shards import OnlineTrainer

    online = OnlineTrainer.from_rl(p) if p.online_sae else None
    res = train(p, progress=progress, on_step=online)
    res.online = online
    acc, out = res.accelerator, Path(p.out_dir)
    if acc.is_main_process:
        res.results.attrs["num_processes"] = acc.num_processes
        save_results(res.results, out / "results.nc", p.to_dict(), p.seed)
        if online is not None and online.sae is not None:
            online.sae.save(out / "online_sae")
            save_results(shards_dataset(online.sae), out / "online_shards.nc", p.to_dict(), p.seed)
    acc.wait_for_everyone()
    return res
