import pytest

from shardlib.report import ReportError, results_markdown, update_readme


def test_report_names_what_is_missing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers")
    with pytest.raises(ReportError, match="lacks the results of"):
        results_markdown(tmp_path)
    with pytest.raises(ReportError, match="has no <!-- results:begin -->"):
        update_readme(tmp_path, readme)
