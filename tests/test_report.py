import pytest

from shardlib.report import BEGIN, END, ReportError, report_html, results_markdown, update_readme


def test_readme_results_are_generated_from_the_run_and_checked(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    md = results_markdown(run_dir)
    for heading in ("### RL on both testbeds", "### What shards mean", "### Toy models"):
        assert heading in md
    assert md.count("Finding: ") >= 10 and "figures/tiny/training_curves.png" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold numbers\n{END}\n\nafter\n")
    assert update_readme(run_dir, readme, check=True) is False  # stale
    assert update_readme(run_dir, readme) is False  # written now
    assert update_readme(run_dir, readme, check=True) is True
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith(f"{END}\n\nafter\n") and md in text
    readme.write_text(text.replace(md.split("| rl_bandit (GRPO) | ")[1][:10], "9.99 / 9.9"))  # a number typed by hand
    assert update_readme(run_dir, readme, check=True) is False
    html = report_html(run_dir).read_text()
    assert "Finding: " in html and "data:image/png;base64," in html and "git_commit" in html


def test_report_names_what_is_missing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers")
    with pytest.raises(ReportError, match="lacks the results of"):
        results_markdown(tmp_path)
    with pytest.raises(ReportError, match="has no <!-- results:begin -->"):
        update_readme(tmp_path, readme)
