import json

import numpy as np
import xarray as xr

from shardlib.events import event_type_labels, event_types


def acts(**coords):
    n = len(next(iter(coords.values())))
    ds = xr.Dataset(
        {"index": (("event", "slot"), np.zeros((n, 1), dtype=np.int32))},
        coords={k: ("event", np.asarray(v)) for k, v in coords.items()},
    )
    ds.attrs["task_names"] = json.dumps(["max", "rev"])
    return ds


def test_event_types_cross_task_correctness_and_advantage_sign():
    a = acts(
        task=[0, 0, 1, 1],
        reward_correct_max=[1.0, 0.0, 0.0, 0.0],
        reward_correct_rev=[0.0, 0.0, 1.0, 0.0],
        advantage=[0.5, -0.2, 0.0, -1.0],
    )
    assert event_types(a).tolist() == ["max ok +", "max wrong -", "rev ok 0", "rev wrong -"]
    labels, task = event_type_labels(a)
    assert labels.tolist() == event_types(a).tolist() and task.tolist() == [0, 0, 1, 1]


def test_event_types_without_clauses_use_task_and_sign():
    a = acts(task=[1, 0], advantage=[1.0, -1.0])
    assert event_types(a).tolist() == ["rev +", "max -"]
