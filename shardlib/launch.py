"""Run one stage outside a notebook, for several processes or GPUs.

    accelerate launch --multi_gpu --num_processes 2 -m shardlib.launch rl out_dir=runs/x testbed=bandit
    torchrun --nproc_per_node 2 -m shardlib.launch rl out_dir=runs/x testbed=bandit device=cpu
    accelerate launch --multi_gpu --num_processes 2 -m shardlib.launch shards out_dir=runs/s store_path=runs/x/updates/events

Arguments are ``name=value`` pairs of the stage's parameters (values parsed as YAML). Calls the
stage module's ``run(params)``, the function its notebook calls, so it writes the same files
(``results.nc``, ``policy/``, ``updates/``, with ``online_sae=true`` the online shards); only the
main process writes. Stages: the kinds of :mod:`shardlib.stages` (``KINDS``): pretrain, rl, shards
(several processes), and model, planted, sparsity, frontier, analysis, toy, figures, compositional (one process).
"""

from __future__ import annotations

import sys

import yaml

from .stages import KINDS, module, params_class


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        print(__doc__, file=sys.stderr)
        return 2
    stage, pairs = argv[0], argv[1:]
    values = {}
    for a in pairs:
        if "=" not in a:
            print(f"error: argument {a!r} is not name=value", file=sys.stderr)
            return 2
        k, v = a.split("=", 1)
        try:
            values[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            print(f"error: argument {a!r}: not valid YAML ({str(e).splitlines()[0]})", file=sys.stderr)
            return 2
    try:
        p = params_class(stage).from_dict(values)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kwargs = {"progress": False} if KINDS[stage].progress else {}
    res = module(stage).run(p, **kwargs)
    acc = getattr(res, "accelerator", None)
    if acc is not None and acc.is_main_process:
        print(f"processes={acc.num_processes} distributed_type={acc.distributed_type}")
    if acc is not None and acc.num_processes > 1:
        # end the process group before exiting: a rank that exits with gloo's threads alive can abort
        # ("terminate called without an active exception"), failing a run whose work is done
        acc.wait_for_everyone()
        acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
