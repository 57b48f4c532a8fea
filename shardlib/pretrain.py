"""Supervised pretraining of the tiny causal LM on tagged synthetic tasks.

The pretrained policy must be *partly* competent so that RL has something to
reinforce: it is trained on answers that are wrong with probability ``label_noise``
(random digits of the right length), for a limited number of steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import policy as pol
from .common import make_accelerator, progress_bar, step_generator
from .config import Params, param
from .tasks import TASKS, SyntheticTasks, check_task_names


@dataclass(frozen=True)
class PretrainParams(Params):
    """Parameters of the pretrain stage (``notebooks/01_pretrain.ipynb``)."""

    tasks: list[str] = param(["max", "rev", "sort", "par"], "task families of the mixture", choices=tuple(TASKS))
    n_digits: int = param(4, "digits per prompt", ge=1, le=12)
    init_path: str = param("", "start from this causal-LM checkpoint folder instead of a fresh tiny Llama")
    d_model: int = param(64, "hidden size of the fresh tiny Llama", ge=8)
    n_layers: int = param(2, "layers of the fresh tiny Llama", ge=1)
    n_heads: int = param(4, "attention heads of the fresh tiny Llama", ge=1)
    d_ff: int = param(128, "MLP width of the fresh tiny Llama", ge=8)
    steps: int = param(300, "optimizer steps", ge=1)
    batch_size: int = param(64, "sequences per step", ge=1)
    lr: float = param(3e-3, "AdamW learning rate", gt=0)
    label_noise: float = param(0.3, "probability that a training answer is replaced by random digits", ge=0, lt=1)
    eval_prompts: int = param(256, "held-out prompts for the evaluation", ge=1)
    device: str = param("auto", "'cpu', 'cuda' or 'auto'", choices=("auto", "cpu", "cuda"))

    def check(self):
        check_task_names(self.tasks)
        if self.d_model % self.n_heads:
            raise ValueError(f"parameter 'n_heads': {self.n_heads} must divide d_model={self.d_model}")


def train(p: PretrainParams, progress: bool = True) -> xr.Dataset:
    """Pretrain, save ``out_dir/policy``, return loss curve and per-task evaluation."""
    from accelerate.utils import set_seed

    acc = make_accelerator(p.device)
    set_seed(p.seed)
    tasks = SyntheticTasks(tuple(p.tasks), p.n_digits)
    if p.init_path:
        model = pol.load_policy(p.init_path)
        pol.check_vocab(model, tasks)
    else:
        torch.manual_seed(p.seed)
        model = pol.tiny_lm(
            tasks.vocab_size,
            p.d_model,
            p.n_layers,
            p.n_heads,
            p.d_ff,
            max_len=tasks.prompt_len + tasks.max_new_tokens + 4,
        )
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    model, opt = acc.prepare(model, opt)
    base = pol.unwrap(model)
    init = pol.evaluate(base, tasks, p.eval_prompts, p.seed, device=acc.device)
    losses, times = [], []
    for step in progress_bar(range(p.steps), desc="pretrain", disable=not progress):
        t0 = time.perf_counter()
        gen = step_generator(p.seed, step, acc.process_index)
        batch = tasks.sample(p.batch_size, gen)
        target, mask = tasks.sft_targets(batch, p.label_noise, gen)
        logp, _ = pol.logprobs(model, batch["prompt"].to(acc.device), target.to(acc.device), tasks.vocab_size)
        m = mask.to(acc.device).float()
        loss = -(logp * m).sum() / m.sum()
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
    final = pol.evaluate(base, tasks, p.eval_prompts, p.seed, device=acc.device)
    if acc.is_main_process:
        pol.save_policy(base, Path(p.out_dir) / "policy", extra={"tasks": list(p.tasks), "n_digits": p.n_digits})
    clauses = list(final["clauses"])
    return xr.Dataset(
        {
            "loss": ("step", np.array(losses)),
            "step_time": ("step", np.array(times)),
            "eval_reward_init": ("task", init["reward"]),
            "eval_reward_final": ("task", final["reward"]),
            "eval_clause_final": (("clause", "task"), [final["clauses"][c] for c in clauses]),
            "eval_n": ("task", final["n"]),
        },
        coords={"step": np.arange(p.steps), "task": list(p.tasks), "clause": clauses},
        attrs={
            "n_parameters": sum(x.numel() for x in base.parameters()),
            "policy_config": json.dumps(base.config.to_dict(), default=str),
        },
    )


def run(p: PretrainParams, progress: bool = True) -> xr.Dataset:
    """The stage: pretrain, then write ``results.nc`` (the policy is in ``policy/``)."""
    from accelerate import PartialState

    from .io import save_results

    ds = train(p, progress=progress)
    if PartialState().is_main_process:  # several processes: one writer
        save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds
