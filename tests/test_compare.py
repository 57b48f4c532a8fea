import numpy as np
import xarray as xr

from shardlib.__main__ import main
from shardlib.compare import compare_runs
from shardlib.io import save_results


def write(run, rel, **vars_):
    f = run / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    save_results(xr.Dataset({k: ("x", np.asarray(v, dtype=float)) for k, v in vars_.items()}), f)


def test_compare_ignores_provenance_and_wall_clock_but_not_values(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "s/results.nc", fvu=[0.5, np.nan], train_seconds=[1.0, 2.0])
    write(b, "s/results.nc", fvu=[0.5, np.nan], train_seconds=[9.0, 9.0])  # other times, other 'created'
    write(a, "t/results.nc", l0=[1.0, 2.0])
    write(b, "t/results.nc", l0=[1.0, 2.5])
    write(a, "u/results.nc", l0=[1.0])
    rows = {r.path: r for r in compare_runs(a, b)}
    assert rows["s/results.nc"].status == "identical"
    assert rows["t/results.nc"].status == "differs" and "l0 (max |diff| 0.5)" in rows["t/results.nc"].detail
    assert rows["u/results.nc"].status == "missing"
    assert main(["compare", str(a), str(b)]) == 1
    assert "1 of 3 results files identical" in capsys.readouterr().out
    assert main(["compare", str(a / "s"), str(b / "s")]) == 0


def test_compare_looks_both_ways(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "s/results.nc", fvu=[0.5])
    write(b, "s/results.nc", fvu=[0.5])
    write(b, "s/updates/chunk-00000009-00000011.nc", w=[1.0])  # an extra chunk in the second run only
    rows = {r.path: r for r in compare_runs(a, b)}
    assert rows["s/updates/chunk-00000009-00000011.nc"].status == "missing"
    assert "only in run B" in rows["s/updates/chunk-00000009-00000011.nc"].detail
    assert main(["compare", str(a), str(b)]) == 1 and main(["compare", str(b), str(a)]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 results files identical" in out and "only in run A" in out
