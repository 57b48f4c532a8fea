"""A tiny GRPO run with ``collect_updates`` on the processes ``accelerate launch`` starts (CPU, gloo).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/trl_two_process.py OUT

Used by ``tests/test_integrations_trl.py``. The main process also writes ``OUT/grads.pt``: per optimizer step,
the selected parameters' gradient as the optimizer's clipping sees it (after the all-reduce across processes,
before clipping) and the step's learning rate.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ["model.layers.*.mlp.down_proj.weight", "model.layers.*.self_attn.q_proj.weight"]


def main(out: Path) -> None:
    from shardlib.integrations.trl import collect_updates

    spec = importlib.util.spec_from_file_location("trl_grpo_example", ROOT / "examples" / "trl_grpo.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    tr = ex.make_trainer(out / "trl", max_steps=2, gradient_accumulation_steps=2, max_grad_norm=0.05)
    col = collect_updates(tr, PARAMS, out / "updates", columns=["task"])
    grads, lrs = {}, {}
    clip = tr._clip_grad_norm  # collect_updates' wrapper; the all-reduce has happened when the trainer clips

    def _clip_grad_norm(model):
        step = tr.state.global_step
        grads[step] = {n: p.grad.detach().clone() for n, p in col.params.items()}
        lrs[step] = tr.lr_scheduler.get_last_lr()[0]
        return clip(model)

    tr._clip_grad_norm = _clip_grad_norm
    tr.train()
    acc = tr.accelerator
    print(f"processes={acc.num_processes} distributed_type={acc.distributed_type} rank={acc.process_index}")
    if acc.is_main_process:
        torch.save({"grads": grads, "lr": lrs, "num_processes": acc.num_processes}, out / "grads.pt")
    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group: a rank exiting with gloo's threads alive can abort


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # leave without C++ static destructors: under load a gloo thread can still be joinable when they run, and
    # std::terminate then aborts a rank whose work is done (seen once in a full test run on 2 busy cores)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
