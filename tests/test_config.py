import dataclasses
import json
from pathlib import Path

import pytest

from shardlib.config import ConfigError
from shardlib.pretrain import PretrainParams
from shardlib.rl import RLParams

NB = Path(__file__).resolve().parent.parent / "notebooks"


def test_defaults_validate_and_freeze():
    p = RLParams.from_dict({"out_dir": "x"})
    assert p.testbed == "bandit" and p.tasks == ("max", "rev", "sort", "par")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.lr = 1.0


def test_unknown_name_is_named_with_accepted_names():
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['stepz'\].*accepted: .*'steps'"):
        RLParams.from_dict({"stepz": 3})


@pytest.mark.parametrize(
    "name,value,fragment",
    [
        ("steps", "10", "parameter 'steps': got '10' \\(str\\); accepted: int >= 1"),
        ("steps", 0, "parameter 'steps': got 0 .*>= 1"),
        ("steps", True, "parameter 'steps': got True \\(bool\\)"),
        ("lr", -1.0, "parameter 'lr': got -1.0 .*> 0"),
        ("testbed", "maze", "parameter 'testbed': got 'maze' .*one of 'bandit', 'lm'"),
        ("collect_params", "*.weight", "parameter 'collect_params': got '\\*.weight' \\(str\\)"),
    ],
)
def test_wrong_type_or_range_names_parameter_value_and_accepted(name, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RLParams.from_dict({name: value})


def test_float_that_is_an_integer_is_accepted_for_int():  # papermill -p steps 1e3 gives a float
    assert RLParams.from_dict({"steps": 1e3}).steps == 1000


def test_cross_field_check():
    with pytest.raises(ValueError, match="init_path"):
        RLParams.from_dict({"testbed": "lm"})
    with pytest.raises(ValueError, match="n_heads"):
        PretrainParams.from_dict({"d_model": 30, "n_heads": 4})


def test_direct_construction_is_checked_as_from_dict_is():
    """``RLParams(**values)`` (as a script or a test builds it) refuses what from_dict refuses, before any compute:
    a bound (checkpoint_every=0 once reached a ZeroDivisionError in train) and a cross-field check."""
    with pytest.raises(ConfigError, match="parameter 'checkpoint_every': got 0"):
        RLParams(checkpoint_every=0)
    with pytest.raises(ValueError, match="init_path"):
        RLParams(testbed="text", tasks=["add1"])
    assert RLParams(steps=3).steps == 3
    direct = RLParams(lr=1, tasks=["max", "rev"])  # coerced as from_dict coerces: the same run, the same checkpoints
    assert direct.lr == 1.0 and isinstance(direct.lr, float) and direct.tasks == ("max", "rev")
    assert direct.fingerprint() == RLParams.from_dict({"lr": 1, "tasks": ["max", "rev"]}).fingerprint()


def test_from_namespace_ignores_ipython_and_modules():
    import math

    ns = {"In": [], "Out": {}, "_i1": "", "math": math, "get_ipython": print, "RLParams": RLParams, "steps": 5}
    assert RLParams.from_namespace(ns).steps == 5


def _params_cell(nb):
    cells = [
        c for c in json.loads((NB / nb).read_text())["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    assert len(cells) == 1, f"{nb} must have exactly one parameters cell"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("nb,cls", [("01_pretrain.ipynb", PretrainParams), ("02_rl.ipynb", RLParams)])
def test_notebook_parameters_are_literals_matching_the_dataclass(nb, cls):
    import ast

    ns = {}
    tree = ast.parse(_params_cell(nb))
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{nb}: parameters cell holds only assignments"
        ns[node.targets[0].id] = ast.literal_eval(node.value)
    from shardlib.stages import by_notebook

    fields = {f.name for f in dataclasses.fields(cls)}
    shown = {"out_dir", "seed", *by_notebook(nb).shown}
    assert set(ns) == shown < fields  # the cell shows the stage's defining parameters; the class has them all
    p = cls.from_dict(ns)
    default = cls.from_dict({"out_dir": p.out_dir})
    assert p == default


def test_every_notebook_parameters_cell_matches_its_params_class():
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, str(root / "scripts/sync_params.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr + " (run scripts/sync_params.py)"
