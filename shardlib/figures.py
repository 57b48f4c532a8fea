"""Regenerate every figure from a run's results: ``python -m shardlib figures [--run NAME]``.

Each figure is one script ``figures/fig_<name>.py`` defining ``NAME``, ``INPUTS`` (result
files relative to the run folder) and ``make(run_dir) -> Figure``. Figures are written as
PNG and PDF into ``figures/<run>/``, byte-identical when regenerated from the same results.
A figure whose inputs are missing is skipped with a message naming them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from .config import Params, param
from .runconfig import ROOT

FIG_DIR = ROOT / "figures"


def scripts() -> list[Path]:
    return sorted(FIG_DIR.glob("fig_*.py"))


def make_all(run_dir, out_dir=None, log=print) -> dict[str, list[Path]]:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plotting

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or FIG_DIR / run_dir.name)
    written = {}
    for script in scripts():
        spec = importlib.util.spec_from_file_location(script.stem, script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        missing = [f for f in mod.INPUTS if not (run_dir / f).exists()]
        if missing:
            log(f"{mod.NAME}: skipped, missing {missing} in {run_dir}")
            continue
        plt.rcdefaults()
        plotting.style()
        fig = mod.make(run_dir)
        written[mod.NAME] = plotting.save(fig, out_dir / mod.NAME)
        plt.close(fig)
        log(f"{mod.NAME}: {', '.join(str(p) for p in written[mod.NAME])}")
    return written


@dataclass(frozen=True)
class FiguresParams(Params):
    """Parameters of the figures stage (``notebooks/09_figures.ipynb``)."""

    inputs: list[str] = param(
        [], "stage folders of one run whose results the figures read (their parent is the run folder)"
    )

    def check(self):
        if not self.inputs:
            raise ValueError("parameter 'inputs': give at least one stage folder of the run")
        parents = {str(Path(i).parent) for i in self.inputs}
        if len(parents) != 1:
            raise ValueError(
                f"parameter 'inputs': all folders must be in one run folder, got parents {sorted(parents)}"
            )

    def run_dir(self) -> Path:
        return Path(self.inputs[0]).parent


@dataclass
class FiguresRun:
    """What :func:`run` returns: the list of figures (also in ``results.nc``) and their files."""

    results: object
    written: dict[str, list[Path]]


def run(p: FiguresParams) -> FiguresRun:
    """The stage: every figure from the run's results into ``out_dir``; ``results.nc`` lists them."""
    import xarray as xr

    from .io import save_results

    written = make_all(p.run_dir(), p.out_dir)
    ds = xr.Dataset(coords={"figure": list(written)})
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return FiguresRun(ds, written)
