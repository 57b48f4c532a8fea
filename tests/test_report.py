import pytest

from shardlib.report import ReportError, results_markdown, stale_reading_numbers, update_readme


def test_report_names_what_is_missing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers")
    with pytest.raises(ReportError, match="lacks the results of"):
        results_markdown(tmp_path)
    with pytest.raises(ReportError, match="has no <!-- results:begin -->"):
        update_readme(tmp_path, readme)


def test_wall_clock_numbers_are_left_out_of_the_check():
    """Two runs with the same results and other fitting times: the same checked text (a fresh clone's
    `make study` used to fail its README check on the planted family's times)."""
    import numpy as np
    import xarray as xr

    from shardlib.report import WALL, _planted, _strip_wall

    def planted(seconds):
        one = ("rank", "seed")
        ds = xr.Dataset(
            {k: (one, np.full((1, 2), 0.5)) for k in ("mmcs_g2d", "mmcs_d2g", "r_at_0.9", "uniqueness", "fvu")},
            coords={"rank": [1], "seed": [0, 1], "member": ["attn_heavy"], "sae": ["signed"], "family_seed": [0]},
        )
        ds["hungarian_mcc"] = (one, np.full((1, 2), 0.5))
        ds["n_parameters"] = (one, np.full((1, 2), 10))
        ds["seed_stability"] = ("rank", [0.9])
        fam = ("member", "sae", "family_seed")
        for k in ("mmcs_g2d", "r_at_0.9", "fvu", "dead_fraction", "n_parameters"):
            ds[f"family_{k}"] = (fam, np.ones((1, 1, 1)))
        ds["family_seconds"] = (fam, np.full((1, 1, 1), seconds))
        return _planted(ds)

    a, b = planted(24.0), planted(31.0)
    assert a != b and "24 s" in a and WALL in a
    assert _strip_wall(a) == _strip_wall(b) and "attn_heavy" in _strip_wall(a)


def test_collection_overhead_compares_collecting_steps_with_the_others():
    import json

    import numpy as np
    import xarray as xr

    from shardlib.report import collection_overhead

    sec = np.array([9.0, 1.0, 1.0, 3.0, 1.0, 1.0, 3.0])  # every third step collects; step 0 is the warm-up
    ds = xr.Dataset({"steps_per_s": ("step", 1 / sec)}, coords={"step": np.arange(7)})
    ds.attrs["config"] = json.dumps({"collect_every": 3})
    assert collection_overhead(ds) == 3.0
    ds.attrs["config"] = json.dumps({"collect_every": 1})
    assert np.isnan(collection_overhead(ds))


def test_a_smollm_run_fills_its_own_readme_block(tmp_path, monkeypatch):
    from shardlib import report

    _stage(tmp_path / "run" / "model", "shardlib.instruct", "InstructParams", b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        f"a\n{report.BEGIN}\nold default\n{report.END}\n{report.SMOLLM_BEGIN}\nold\n{report.SMOLLM_END}\n"
    )
    monkeypatch.setattr(report, "smollm_markdown", lambda run_dir: "new smollm")
    assert not report.update_readme(tmp_path / "run", readme)
    text = readme.read_text()
    assert "old default" in text and "new smollm" in text and "\nold\n" not in text


def _stage(folder, module, params, results=None):
    """A stage folder as the runner leaves it: its executed notebook (naming its Params class) and results."""
    import json

    folder.mkdir(parents=True)
    code = f"from {module} import {params}\np = {params}.from_namespace(globals())\n"
    nb = {"cells": [{"cell_type": "code", "source": [code], "metadata": {}}]}
    (folder / "notebook.ipynb").write_text(json.dumps(nb))
    if results is not None:
        (folder / "results.nc").write_bytes(results)


def test_stages_are_found_by_kind_whatever_their_folder_names(tmp_path):
    """A stage's kind comes from its notebook's Params class, or else from the parameters its results record."""
    import xarray as xr

    from shardlib.io import save_results
    from shardlib.report import is_smollm_run, run_stages

    _stage(tmp_path / "my_grpo", "shardlib.rl", "RLParams", b"")
    _stage(tmp_path / "zz_model", "shardlib.instruct", "InstructParams", b"")
    _stage(tmp_path / "no_results", "shardlib.rl", "RLParams")  # not run yet: not a stage with results
    (tmp_path / "launched").mkdir()  # run by shardlib.launch: results only
    save_results(xr.Dataset(), tmp_path / "launched" / "results.nc", {"sweep_dirs": ["x"], "sweep_names": ["a"]})
    (tmp_path / "other").mkdir()  # parameters no Params class holds
    save_results(xr.Dataset(), tmp_path / "other" / "results.nc", {"nothing_like_it": 1})
    assert run_stages(tmp_path) == {"zz_model": "model", "my_grpo": "rl", "launched": "frontier"}
    assert is_smollm_run(tmp_path) and not is_smollm_run(tmp_path / "my_grpo")


def test_markdown_table():
    from shardlib.report import markdown_table

    assert markdown_table(["a", "b"], [["1", 2]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"


def test_check_fails_on_a_number_the_results_do_not_print():
    text = "# x\n\n### Reading the results\n\nNMI 0.605 against 0.642; k = 4; 12 types.\n\n## Next\n\n0.999 elsewhere\n"
    assert stale_reading_numbers(text, "NMI 0.605 ± 0.005, random 0.642") == []
    assert stale_reading_numbers(text, "NMI 0.605 ± 0.005") == ["0.642"]  # typed by hand, or stale
    assert stale_reading_numbers("no reading here 0.123", "") == []
