"""TRL GRPO on a tiny Llama with shardlib's update collection, then the shard and analysis stages on its store.

    python examples/trl_grpo.py --out runs/trl_example            # about a minute on a laptop CPU
    python examples/trl_grpo.py --out runs/trl_example --steps 40 --factored

Everything is built here, offline: a character-level tokenizer, a 2-layer Llama (random initialisation), a toy
dataset with two tasks (``task`` 0: prompts starting with 'a', rewarded by the share of the completion's letters
among 'abcd'; ``task`` 1: prompts starting with 'b', among 'efgh'), one reward function per task (``None`` on the other task's
prompts, so each event carries the reward of its own task). TRL runs with its defaults except ``bf16=False``
(exact event updates; see ``shardlib.integrations.trl``) and a small model's learning rate.

Then ``notebooks/03_shards.ipynb`` trains shards on ``<out>/updates/events`` under papermill, and the script prints
which shards fire on which event type (task x whether its reward was earned), from the stage's ``activations.nc``.
Last, ``notebooks/07_shard_analysis.ipynb`` runs on the shards with ``rl_dir=""`` (no shardlib RL run, so no
interventions: alignment with event types against shuffled labels and a random dictionary, seed stability, the
settings comparison, where shards live) and event types from the store label ``task`` (``--event-types``), and the
script prints its Finding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

VOCAB = "abcdefgh"
N_LATENTS = 8


def tiny_tokenizer():
    """A character-level tokenizer (pad 0, bos 1, eos 2, then one id per letter of ``VOCAB``), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, d_model: int = 16, n_layers: int = 2):
    import torch

    from shardlib.policy import tiny_lm

    torch.manual_seed(seed)
    return tiny_lm(3 + len(VOCAB), d_model=d_model, n_layers=n_layers, n_heads=2, d_ff=2 * d_model, max_len=64)


def toy_dataset(n: int = 16):
    """``n`` prompts, alternating task 0 ('a...') and task 1 ('b...')."""
    from datasets import Dataset

    prompts = [("a" if i % 2 == 0 else "b") + VOCAB[2 + i % 5] + VOCAB[3 + i % 4] for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "task": [i % 2 for i in range(n)]})


def _share(text: str, letters: str) -> float:
    """The fraction of the completion's letters (the decoded text puts spaces between tokens) among ``letters``."""
    chars = [c for c in text if c.isalpha()]
    return sum(c in letters for c in chars) / max(len(chars), 1)


def correct_a(completions, task, **kwargs):
    """Task 0: the share of the completion's letters among 'abcd' (None on task 1's prompts)."""
    return [_share(c, "abcd") if t == 0 else None for c, t in zip(completions, task)]


def correct_b(completions, task, **kwargs):
    """Task 1: the share of the completion's letters among 'efgh' (None on task 0's prompts)."""
    return [_share(c, "efgh") if t == 1 else None for c, t in zip(completions, task)]


def make_trainer(out_dir, seed: int = 0, **config):
    """A GRPOTrainer on the toy task: 4 completions per prompt, completions of at most 6 tokens; ``config``
    overrides any ``GRPOConfig`` field."""
    from trl import GRPOConfig, GRPOTrainer

    kw = dict(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
    kw.update(config)
    return GRPOTrainer(
        model=tiny_llama(seed),
        reward_funcs=[correct_a, correct_b],
        args=GRPOConfig(**kw),
        train_dataset=toy_dataset(),
        processing_class=tiny_tokenizer(),
    )


def run_shards(store_path, out_dir, **params):
    """``notebooks/03_shards.ipynb`` on ``store_path`` under papermill (small SAE settings unless overridden)."""
    p = dict(store_path=str(store_path), n_latents=N_LATENTS, k=2, epochs=20, batch_size=32)
    return run_notebook("03_shards.ipynb", out_dir, {**p, **params})


def run_analysis(shards_dir, out_dir, **params):
    """``notebooks/07_shard_analysis.ipynb`` on a shard stage's folder under papermill, with ``rl_dir=""``
    (alignment only: no interventions) and small settings unless overridden."""
    p = dict(
        shards_dir=str(shards_dir),
        rl_dir="",
        event_type_label="task",
        extra_seeds=[1],
        settings_k=[1, 2],
        settings_normalize=[False, True],
    )
    return run_notebook("07_shard_analysis.ipynb", out_dir, {**p, **params})


def run_notebook(name: str, out_dir, params: dict) -> Path:
    """The study's notebook ``name`` under papermill with ``params``, executed into ``out_dir/notebook.ipynb``."""
    import papermill as pm

    root = Path(__file__).resolve().parent.parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        str(root / "notebooks" / name),
        str(out_dir / "notebook.ipynb"),
        parameters={**params, "out_dir": str(out_dir)},
        kernel_name="python3",
        progress_bar=False,
        cwd=str(root),
    )
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/trl_example")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--factored", action="store_true", help="store factored event updates")
    ap.add_argument(
        "--event-types",
        default="task",
        help="store label whose values are the analysis's event types ('' = shardlib's: task x reward earned)",
    )
    a = ap.parse_args(argv)
    out = Path(a.out)

    from shardlib.integrations.trl import collect_updates
    from shardlib.updates import open_store

    trainer = make_trainer(out / "trl", max_steps=a.steps, save_strategy="steps", save_steps=8)
    collect_updates(
        trainer,
        params=["model.layers.*.mlp.*.weight", "model.layers.*.self_attn.*.weight"],
        store_dir=out / "updates",
        columns=["task"],
        factored=a.factored,
    )
    trainer.train()

    ev = open_store(out / "updates" / "events")
    print(f"{ev.sizes['event']} events over {len(set(ev.step.values.tolist()))} steps; labels: {sorted(ev.coords)}")
    run_shards(out / "updates" / "events", out / "shards")

    import numpy as np

    from shardlib import events, shardfile
    from shardlib.io import load_results

    acts = load_results(out / "shards" / "activations.nc")
    dense = shardfile.dense_codes(acts, N_LATENTS)
    table = dense.groupby(events.event_types(acts)).mean()
    print("mean |activation| of each shard per event type:")
    print(table.round(3).to_string())
    print("most specific shard per event type:", {t: int(np.argmax(r)) for t, r in zip(table.index, table.values)})

    from shardlib.findings import finding

    run_analysis(out / "shards", out / "analysis", event_type_label=a.event_types)
    print(finding("analysis", load_results(out / "analysis" / "results.nc")))


if __name__ == "__main__":
    main()
