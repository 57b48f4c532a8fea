"""What a stage's results depend on, hashed: its notebook, the shardlib modules the notebook reaches (directly or
through other modules, read statically from their imports), its parameters, inputs and CPU thread count. A stage
whose fingerprint is unchanged since it last finished is skipped (:mod:`shardlib.runner`)."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .runconfig import ROOT

if TYPE_CHECKING:
    from .runner import Stage


def _notebook_digest(nb: Path) -> str:
    """Hash of a notebook's code and markdown (not its outputs)."""
    data = json.loads(nb.read_text())
    cells = [(c["cell_type"], "".join(c["source"])) for c in data["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def _shardlib_imports(source: str, package_relative: bool) -> set[str]:
    """shardlib modules a piece of code imports anywhere (function bodies included); "*" = all of them."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "shardlib":
                    found.add("*")
                elif a.name.startswith("shardlib."):
                    found.add(a.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if (package_relative and node.level == 1) or (
                node.level == 0 and (mod == "shardlib" or mod.startswith("shardlib."))
            ):
                parts = mod.split(".")[1:] if node.level == 0 else ([mod.split(".")[0]] if mod else [])
                if parts:
                    found.add(parts[0])
                else:  # from shardlib import a, b / from . import a: modules or package attributes
                    found.update(a.name for a in node.names)
    return found


def library_files(notebook: Path) -> list[Path]:
    """Files of the library a notebook's code can reach: the shardlib modules it imports, what those
    import in turn, and, when ``shardlib.figures`` is among them, the figure scripts and their imports."""
    pkg = ROOT / "shardlib"
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    todo = set()
    for c in cells:
        src = "".join(c["source"])
        try:
            todo |= _shardlib_imports(src, package_relative=False)
        except SyntaxError:  # IPython magics: be safe, the whole library
            todo.add("*")
    if "*" in todo:
        todo = {f.stem for f in pkg.glob("*.py")}
    files, seen = {pkg / "__init__.py"}, set()
    while todo:
        name = todo.pop()
        f = pkg / f"{name}.py"
        if name in seen or not f.exists():  # a package attribute (e.g. __version__), not a module
            continue
        seen.add(name)
        files.add(f)
        todo |= _shardlib_imports(f.read_text(), package_relative=True) - seen
        if name == "figures":
            for script in sorted((ROOT / "figures").glob("fig_*.py")):
                files.add(script)
                todo |= _shardlib_imports(script.read_text(), package_relative=False) - seen
    return sorted(files)


def library_digest(notebook: Path) -> str:
    """Hash of the library code a notebook can reach (``library_files``): editing a module reruns
    only the stages whose notebooks import it, directly or through other modules."""
    h = hashlib.sha256()
    for f in library_files(notebook):
        h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return h.hexdigest()


def fingerprint(stage: Stage, dep_prints: dict[str, str], threads: int = 1) -> str:
    """What a stage's results depend on: its notebook, library code, parameters, inputs, and the number of CPU
    threads its kernel computes with (sums can round differently with another thread count)."""
    blob = json.dumps(
        {
            "nb": _notebook_digest(stage.notebook),
            "lib": library_digest(stage.notebook),
            "params": stage.params,
            "deps": {d: dep_prints[d] for d in stage.deps},
            "threads": threads,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
