"""Rewrite each stage notebook's ``parameters`` cell from its Params class.

    python scripts/sync_params.py [--check]

The cell shows ``out_dir``, ``seed`` and the stage's defining parameters (``shown`` in
``shardlib/stages.py``; every field where it names none), each as a line ``# <doc>`` and
``name = <literal>``, in field order, then one line naming the class whose ``describe()`` lists
the rest: the notebook takes every field all the same (``Params.from_namespace`` reads the names
papermill injects). A value already in the cell is kept (a notebook may show another example
store), a new field gets its default. ``--check`` exits 1 when a cell differs from what would be
written.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib.runner import params_class  # noqa: E402
from shardlib.stages import by_notebook  # noqa: E402


def literal(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(x)}" for k, x in v.items()) + "}"
    return repr(v)


def cell_source(cls, old: dict, shown: tuple[str, ...] = ()) -> str:
    fields = dataclasses.fields(cls)
    unknown = set(shown) - {f.name for f in fields}
    if unknown:
        raise SystemExit(f"stages.py shows {sorted(unknown)}, which {cls.__name__} has no field for")
    lines = []
    if shown:  # out_dir and seed, then the shown fields in the order stages.py lists them
        by_name = {f.name: f for f in fields}
        fields = [by_name[name] for name in dict.fromkeys(("out_dir", "seed", *shown))]
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines += [f"# {f.metadata.get('doc', f.name)}", f"{f.name} = {literal(old.get(f.name, default))}"]
    if shown:
        lines += [
            f"# every other parameter of {cls.__name__} ({cls.__module__}) keeps its default unless set here, by a",
            f"# config or by papermill -p; {cls.__name__}.describe() lists them, the next cell shows the values in force",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--reset", nargs="*", default=[], help="names whose value is reset to the class default")
    args = ap.parse_args(argv)
    changed = []
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cls = params_class(nb_path)
        if cls is None:
            continue
        nb = json.loads(nb_path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        src = "".join(cell["source"])
        old = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(src).body}
        for name in args.reset:
            old.pop(name, None)
        kind = by_notebook(nb_path.name)
        new = cell_source(cls, old, kind.shown if kind else ())
        if new != src:
            changed.append(nb_path.name)
            if not args.check:
                cell["source"] = new.splitlines(keepends=True)
                nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    print(("differ: " if args.check else "rewritten: ") + (", ".join(changed) or "none"))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
