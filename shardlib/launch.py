"""Run one stage's training outside a notebook, for several processes or GPUs.

    accelerate launch --multi_gpu --num_processes 2 -m shardlib.launch rl out_dir=runs/x testbed=bandit
    torchrun --nproc_per_node 2 -m shardlib.launch rl out_dir=runs/x testbed=bandit device=cpu
    accelerate launch --multi_gpu --num_processes 2 -m shardlib.launch shards out_dir=runs/s store_path=runs/x/updates/events

Arguments are ``name=value`` pairs of the stage's parameters (values parsed as YAML).
Writes the same files as the notebook's training cell (``results.nc``, ``policy/``,
``updates/``); only the main process writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("rl", "pretrain", "shards"):
        print(__doc__, file=sys.stderr)
        return 2
    stage, pairs = argv[0], argv[1:]
    values = {}
    for a in pairs:
        if "=" not in a:
            print(f"error: argument {a!r} is not name=value", file=sys.stderr)
            return 2
        k, v = a.split("=", 1)
        values[k] = yaml.safe_load(v)
    from .io import save_results

    if stage == "rl":
        from .rl import RLParams, train

        p = RLParams.from_dict(values)
        res = train(p, progress=False)
        ds, acc = res["results"], res["accelerator"]
        if acc.is_main_process:
            save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
            ds.attrs["num_processes"] = acc.num_processes
            print(f"processes={acc.num_processes} distributed_type={acc.distributed_type}")
    elif stage == "shards":
        from .shards import ShardParams, train, write_outputs

        p = ShardParams.from_dict(values)
        res = train(p, progress=False)
        acc = res["accelerator"]
        if acc.is_main_process:
            write_outputs(p, res)
            print(f"processes={acc.num_processes} distributed_type={acc.distributed_type}")
        acc.wait_for_everyone()
    else:
        from .pretrain import PretrainParams, train

        p = PretrainParams.from_dict(values)
        save_results(train(p, progress=False), Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
