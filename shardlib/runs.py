"""A run folder read back: its stages found by kind (whatever the config named their folders), the parameters
each stage recorded, and the stages' wall times.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import xarray as xr

from . import stages
from .io import load_results, sweep_points
from .runner import params_class_name
from .stages import KINDS, kind_of

WALL = "<!-- wall-clock -->"  # marks a line of wall-clock times: it differs from run to run


class ReportError(RuntimeError):
    pass


def stage_kind(folder: Path) -> str | None:
    """The kind (:data:`shardlib.stages.KINDS`) of the stage whose results lie in ``folder``: the kind of the
    ``Params`` class its executed notebook (``notebook.ipynb``) validates with, or else of the one ``Params``
    class whose fields hold every parameter its ``results.nc`` records (a stage run by ``shardlib.launch``);
    None when neither tells."""
    nb = folder / "notebook.ipynb"
    if nb.exists():
        found = params_class_name(nb)
        if found is not None and kind_of(*found) is not None:
            return kind_of(*found)
    try:
        keys = set(json.loads(load_results(folder / "results.nc").attrs.get("config", "{}")))
    except (OSError, ValueError):
        return None
    fits = [k for k in KINDS if keys and keys <= {f.name for f in dataclasses.fields(stages.params_class(k))}]
    return fits[0] if len(fits) == 1 else None


def run_stages(run_dir) -> dict[str, str]:
    """``{stage folder: kind}`` for every stage folder of a run that holds results (``<folder>/results.nc``)
    of a known kind, in the order of ``KINDS``, then of folder name: whatever the config named them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    found = {}
    for d in sorted(run_dir.iterdir()):
        kind = stage_kind(d) if (d / "results.nc").is_file() else None
        if kind is not None:
            found[d.name] = kind
    order = list(KINDS)
    return dict(sorted(found.items(), key=lambda item: (order.index(item[1]), item[0])))


def by_kind(run_dir: Path, kinds, how: str) -> dict[str, list[str]]:
    """The run's stage folders of each of ``kinds``; a ReportError naming the kinds the run has no results of."""
    found = run_stages(run_dir)
    by = {k: [s for s, kind in found.items() if kind == k] for k in kinds}
    missing = [k for k, names in by.items() if not names]
    if missing:
        raise ReportError(f"{run_dir} lacks the results of {missing} (stage kinds); run the study first ({how})")
    return by


def input_stage(path, names) -> str:
    """Which of the stage folders ``names`` a path a stage read (its parameter, as recorded) lies in."""
    return next((p for p in reversed(Path(str(path)).parts) if p in names), "?")


def recorded_config(ds: xr.Dataset) -> dict:
    """The parameters a stage recorded with its results (the ``config`` attribute)."""
    return json.loads(ds.attrs.get("config", "{}"))


def wall_times(run_dir: Path, target_min: float | None = None) -> str:
    """The stages' wall times (in the order they finished), their sum, and the span from the first start to the
    last finish with the number of stages run at once (``--jobs``), weighed against ``target_min`` minutes when
    given."""
    records = []
    for f in run_dir.glob("**/.stage.json"):
        points = sweep_points(f.parent.parent)  # a point a former config swept: not part of this run
        if points is not None and f.parent.name not in points:
            continue
        st = json.loads(f.read_text())
        if "seconds" in st:
            records.append((st.get("finished", f.stat().st_mtime), st.get("stage", f.parent.name), st))
    if not records:
        return ""
    records.sort(key=lambda r: r[0])
    body = ", ".join(f"{n} {st['seconds']:.0f} s" for _, n, st in records)
    total = sum(st["seconds"] for _, _, st in records)
    text = f"Stage wall times of this run: {body}; they add up to {total / 60:.1f} min."
    if all("started" in st for _, _, st in records):
        spans = sorted((st["started"], st["finished"]) for _, _, st in records)
        end, gap = spans[0][1], 0.0
        for a, b in spans[1:]:  # the longest time no stage ran: one invocation of the runner has none
            gap, end = max(gap, a - end), max(end, b)
        if gap > MAX_IDLE_S:
            return (
                f"{text} The stages did not all run in one invocation (for {gap / 60:.0f} min none ran), so no span "
                f"from the first start to the last end is given. {WALL}"
            )
        span = end - spans[0][0]  # the last finish less the first start
        jobs = sorted({st.get("jobs", 1) for _, _, st in records})
        text += (
            f" From the first stage's start to the last one's end: {span / 60:.1f} min ({span:.0f} s), "
            f"{' or '.join(map(str, jobs))} stage(s) at a time (`--jobs`)"
        )
        if target_min is not None:
            text += f" (target ≤ {target_min:g} min: {'met' if span <= 60 * target_min else 'NOT met'})"
        text += "."
    return f"{text} {WALL}"


MAX_IDLE_S = 60.0
"""Within one run of the runner a stage starts as soon as another ends; a longer time with none running means the
stages' records come from several runs (a stage rerun alone later), whose span would mean nothing."""
