import pytest

from shardlib.report import stale_reading_numbers, update_readme
from shardlib.report_default import results_markdown
from shardlib.runs import ReportError


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

    from shardlib.report import _strip_wall
    from shardlib.report_default import _planted
    from shardlib.runs import WALL

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


def test_a_smollm_run_fills_its_own_readme_block(tmp_path, monkeypatch, stage_folder):
    from shardlib import report

    stage_folder(tmp_path / "run" / "model", "shardlib.instruct", "InstructParams", b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        f"a\n{report.BEGIN}\nold default\n{report.END}\n{report.SMOLLM_BEGIN}\nold\n{report.SMOLLM_END}\n"
    )
    monkeypatch.setattr(report, "smollm_markdown", lambda run_dir: "new smollm")
    assert not report.update_readme(tmp_path / "run", readme)
    text = readme.read_text()
    assert "old default" in text and "new smollm" in text and "\nold\n" not in text


def test_check_fails_on_a_number_the_results_do_not_print():
    text = "# x\n\n### Reading the results\n\nNMI 0.605 against 0.642; k = 4; 12 types.\n\n## Next\n\n0.999 elsewhere\n"
    assert stale_reading_numbers(text, "NMI 0.605 ± 0.005, random 0.642") == []
    assert stale_reading_numbers(text, "NMI 0.605 ± 0.005") == ["0.642"]  # typed by hand, or stale
    assert stale_reading_numbers("no reading here 0.123", "") == []
