"""Event types: which computation a reinforcement event reinforced (one home for the definition).

An event update is ``A * grad log pi(action | context)``: it carries the event's identity only
through the context and the action it reinforces. So an event type names
both, never the sign of the advantage (a hit and a miss in one context push the same "rewarded
action over taken action" computation, with opposite signs):

- bandit: ``cluster × arm taken`` (``"cluster2 arm1"``); the coarse level is the cluster;
- synthetic-task LM: ``task × first answer token`` (``"par ans 1"``): the answer the event pushes up
  (positive advantage) or down (negative), whether or not it is correct; a correct and a wrong
  answer "1" to a parity prompt move the same logit, so they are one computation with two signs;
- text tasks (stores without the ``answer`` label): ``task × correctness`` (``"add1 ok"``), crossed
  with the format clause where it varies within the store (``"add1 wrong nofmt"``); the coarse level
  is the task.

Stores written before the ``action`` label existed fall back to the cluster (bandit).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr


def event_types(acts: xr.Dataset, level: str = "fine") -> np.ndarray:
    """Event type per event from a store's (or ``activations.nc``'s) labels; ``level="coarse"``: task/cluster only."""
    if level not in ("fine", "coarse"):
        raise ValueError(f"level must be 'fine' or 'coarse', got {level!r}")
    names = json.loads(acts.attrs["task_names"]) if "task_names" in acts.attrs else None
    label = np.array([names[t] if names else str(t) for t in acts["task"].values], dtype=object)
    if level == "coarse":
        return label.astype(str)
    if "action" in acts.coords:  # bandit: the arm taken
        label = label + np.array([f" arm{a}" for a in acts["action"].values], dtype=object)
    if "answer" in acts.coords:  # synthetic LM: the answer token reinforced, not its correctness
        return (label + np.array([f" ans {a}" for a in acts["answer"].values], dtype=object)).astype(str)
    correct = [c for c in acts.coords if str(c).startswith("reward_correct_")]
    if correct:
        ok = np.any([acts[c].values > 0 for c in correct], axis=0)
        label = label + np.where(ok, " ok", " wrong").astype(object)
        if "reward_format" in acts.coords:
            fmt = acts["reward_format"].values > 0
            if fmt.any() and not fmt.all():  # only where the clause varies
                label = label + np.where(fmt, "", " nofmt").astype(object)
    return label.astype(str)


def event_type_labels(acts: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(fine type label per event, as :func:`event_types`; task index per event)."""
    return event_types(acts), acts["task"].values
