"""shardlib.updates: the face that re-exports the public names of factored, ring, store and collector."""

import ast
import importlib
from pathlib import Path

from shardlib import updates


def test_every_public_name_is_the_object_of_the_module_that_holds_it():
    tree = ast.parse(Path(updates.__file__).read_text())
    sources = {a.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names}
    assert set(sources) == set(updates.__all__)
    assert set(sources.values()) == {"collector", "common", "factored", "ring", "store"}
    for name, module in sources.items():
        assert getattr(updates, name) is getattr(importlib.import_module(f"shardlib.{module}"), name), name
    # the face defines nothing of its own: only the docstring, the imports and __all__
    assert all(isinstance(n, ast.ImportFrom | ast.Assign) for n in tree.body[1:])
