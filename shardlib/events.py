"""Event labels: which reinforcement event type an update belongs to (one home for the definition)."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr


def event_types(acts: xr.Dataset) -> np.ndarray:
    """Event type per event: task family, the task's correctness clause when the store has one
    (LM: ``ok`` / ``wrong``), and the sign of the advantage, e.g. ``"max ok +"``."""
    names = json.loads(acts.attrs["task_names"]) if "task_names" in acts.attrs else None
    task = acts["task"].values
    label = [names[t] if names else str(t) for t in task]
    correct = [c for c in acts.coords if str(c).startswith("reward_correct_")]
    if correct:
        ok = np.any([acts[c].values > 0 for c in correct], axis=0)
        label = [f"{a} {'ok' if o else 'wrong'}" for a, o in zip(label, ok)]
    if "advantage" in acts.coords:
        sign = np.where(acts["advantage"].values > 0, "+", np.where(acts["advantage"].values < 0, "-", "0"))
        label = [f"{a} {s}" for a, s in zip(label, sign)]
    return np.array(label)


def event_type_labels(acts: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(type label per event, as :func:`event_types`; task index per event)."""
    return event_types(acts), acts["task"].values
