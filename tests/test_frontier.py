import json

import numpy as np
import xarray as xr

from shardlib import frontier
from shardlib.io import load_results, save_results


def write_point(d, rank, k, fvu):
    m = {f"heldout_{key}": 0.0 for key in ("l0", "dead_fraction", "dense_fraction")}
    ds = xr.Dataset({**m, "heldout_fvu": fvu, "n_parameters": 10 * (rank + 1)})
    save_results(ds, d / "results.nc", {"rank": rank, "k": k})


def test_frontier_combines_sweeps_over_rank_and_k(tmp_path):
    for store, scale in (("events", 1.0), ("steps", 0.5)):
        for rank, k in ((1, 1), (1, 4), (0, 1)):
            d = tmp_path / store / f"rank={rank},k={k}"
            d.mkdir(parents=True)
            write_point(d, rank, k, scale / (k * (rank + 1)))
        (tmp_path / store / "unfinished").mkdir()  # no results.nc: skipped
    p = frontier.FrontierParams.from_dict(
        {
            "out_dir": str(tmp_path / "out"),
            "sweep_names": ["events", "steps"],
            "sweep_dirs": [str(tmp_path / "events"), str(tmp_path / "steps")],
        }
    )
    ds = frontier.run(p)
    assert ds["rank"].values.tolist() == [0, 1] and ds["k"].values.tolist() == [1, 4]
    assert float(ds.fvu.sel(store="steps", rank=1, k=4)) == 0.5 / 8
    assert np.isnan(float(ds.fvu.sel(store="events", rank=0, k=4)))  # not in the sweep
    saved = load_results(tmp_path / "out" / "results.nc")
    assert json.loads(saved.attrs["config"])["sweep_names"] == ["events", "steps"]


def test_a_sweep_reads_only_the_points_its_config_lists(tmp_path):
    """A former config's points left in the sweep folder (rank 4 here) are not read once the runner has written
    this config's sweep.json."""
    from pathlib import Path

    from shardlib.runner import Stage, write_sweep_manifests

    for rank, k in ((1, 1), (0, 1), (4, 16)):
        d = tmp_path / "fe" / f"rank={rank},k={k}"
        d.mkdir(parents=True)
        write_point(d, rank, k, 0.5)
    assert frontier.combine_sweep(tmp_path / "fe")["rank"].values.tolist() == [0, 1, 4]  # no manifest: all
    stages = [Stage(f"fe[rank={r},k=1]", Path("nb.ipynb"), {}, [], tmp_path / "fe" / f"rank={r},k=1") for r in (1, 0)]
    write_sweep_manifests(stages)
    assert json.loads((tmp_path / "fe" / "sweep.json").read_text())["points"] == ["rank=1,k=1", "rank=0,k=1"]
    ds = frontier.combine_sweep(tmp_path / "fe")
    assert ds["rank"].values.tolist() == [0, 1] and ds["k"].values.tolist() == [1]
