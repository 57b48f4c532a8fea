import json

import numpy as np
import pytest
import xarray as xr

from shardlib.events import event_type_labels, event_types


def acts(names, **coords):
    n = len(next(iter(coords.values())))
    ds = xr.Dataset(
        {"index": (("event", "slot"), np.zeros((n, 1), dtype=np.int32))},
        coords={k: ("event", np.asarray(v)) for k, v in coords.items()},
    )
    ds.attrs["task_names"] = json.dumps(names)
    return ds


def test_bandit_types_are_cluster_by_arm_taken_not_advantage_sign():
    a = acts(["cluster0", "cluster1"], task=[0, 0, 1, 1], action=[0, 2, 1, 1], advantage=[1.0, -1.0, 0.5, -0.5])
    assert event_types(a).tolist() == ["cluster0 arm0", "cluster0 arm2", "cluster1 arm1", "cluster1 arm1"]
    assert event_types(a, "coarse").tolist() == ["cluster0", "cluster0", "cluster1", "cluster1"]
    labels, task = event_type_labels(a)
    assert labels.tolist() == event_types(a).tolist() and task.tolist() == [0, 0, 1, 1]


def test_lm_types_are_task_by_correctness_with_format_only_where_it_varies():
    a = acts(
        ["max", "rev"],
        task=[0, 0, 1, 1],
        reward_correct_max=[1.0, 0, 0, 0],
        reward_correct_rev=[0, 0, 1.0, 0],
        reward_format=[0.1, 0.1, 0.1, 0.1],
        advantage=[0.5, -0.2, 0.0, -1.0],
    )
    assert event_types(a).tolist() == ["max ok", "max wrong", "rev ok", "rev wrong"]
    b = a.assign_coords(reward_format=("event", [0.1, 0.0, 0.1, 0.1]))
    assert event_types(b).tolist() == ["max ok", "max wrong nofmt", "rev ok", "rev wrong"]
    with pytest.raises(ValueError, match="level"):
        event_types(a, "medium")
