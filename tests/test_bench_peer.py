"""benchmarks/bench_peer.py on a tiny store: it runs end to end, chooses rates by held-out FVU and prints its table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sparsify")
pytest.importorskip("schedulefree")

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "benchmarks" / "bench_peer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_peer"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_peer_tiny(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "peer.json"
    argv = ["--events", "256", "--budgets", "2", "3", "--seeds", "0", "1", "--pilot-mult", "1", "0.1"]
    bench.main([*argv, "--grid", "1", "0.5", "--out", str(out)])
    result = json.loads(out.read_text())
    own = [r for r in result["rows"] if r["recipe"] == "own"]
    assert len(own) == 2 * 2 * 2 * 2  # libraries x budgets x seeds x grid points
    for key, mult in result["chosen_mult"].items():  # the lowest mean held-out FVU of its grid
        lib, epochs = key.split(" | ")
        fvu = {}
        for r in own:
            if r["lib"] == lib and r["epochs"] == int(epochs):
                fvu.setdefault(r["mult"], []).append(r["fvu"])
        assert sum(fvu[mult]) == min(sum(v) for v in fvu.values())
    abl = [r for r in result["rows"] if r["recipe"] == "ablation"]
    assert {r["lib"] for r in abl} == {"shardlib", "sparsify"} and {r["epochs"] for r in abl} == {2}
    assert len(result["summary"]) == 6 and all(s["n_seeds"] == 2 for s in result["summary"])
    capsys.readouterr()
    bench.main(["--table", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| sparsify | ablation |" in table and "held-out FVU" in table
