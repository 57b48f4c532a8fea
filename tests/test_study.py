"""The tiny study end to end (notebook smoke tests): configs/tiny.yaml through the papermill runner once per
module (two stages at a time), then what a reader and the report get from it. Its tests stay in this one file so
that ``pytest -n 2 --dist loadfile`` (the README's test command) makes the run once, on one worker."""

import json
from pathlib import Path

import pytest

from shardlib import runner
from shardlib.__main__ import main as shardlib_main
from shardlib.io import load_results
from shardlib.report import BEGIN, END, report_html, update_readme
from shardlib.report_default import results_markdown
from shardlib.runconfig import load_config
from shardlib.runner import plan

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# the first test sets up the whole tiny pipeline (18 stages, each a kernel that imports torch, xarray and
# matplotlib): about 5 minutes on 2 cores shared with the other xdist worker, past the suite's 300 s default
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole papermill pipeline on configs/tiny.yaml: (run folder, stage records)."""
    runs = tmp_path_factory.mktemp("runs")
    return runs / "tiny", runner.run(load_config(TINY), runs_dir=runs, jobs=2)


def test_readme_results_are_generated_from_the_run_and_checked(tiny_run, tmp_path, capsys):
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
    argv = ["report", "--check", "--run", run_dir.name, "--runs-dir", str(run_dir.parent), "--readme", str(readme)]
    assert shardlib_main(argv) == 1  # the command line says why a fresh clone's check can fail, and the fix
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "not on another CPU" in out
    assert f"report --run {run_dir.name} --runs-dir {run_dir.parent} --readme {readme}`" in out
    html = report_html(run_dir).read_text()
    assert "Finding: " in html and "data:image/png;base64," in html and "git_commit" in html


def test_report_html_without_a_figures_stage_shows_each_stages_own_figures_and_keeps_negatives(tiny_run, tmp_path):
    """A run with no figures stage (the SmolLM2 study's) gets the PNGs each stage's notebook wrote, under that
    stage's Finding; the summary at the top keeps every "Negative:" sentence beside the headline."""
    import html as html_text
    import re
    import shutil

    from shardlib import findings
    from shardlib.runs import run_stages

    run_dir, _ = tiny_run
    copy = tmp_path / "nofig"
    shutil.copytree(run_dir, copy, ignore=lambda d, names: [n for n in names if n in ("figures", "report.html")])
    html = report_html(copy).read_text()
    pngs = sorted(copy.glob("*/*.png"))
    assert pngs and all(f"<figcaption>{f.parent.name}: {f.stem.replace('_', ' ')}</figcaption>" in html for f in pngs)
    summary = html.split("<h2>Findings</h2>")[1].split("</ul>")[0]
    negative = 0
    for stage, kind in run_stages(copy).items():
        text = findings.finding(kind, load_results(copy / stage / "results.nc"))
        for part in text.split("Negative: ")[1:]:
            negative += 1
            whole = re.split(r"\.(?!\d)", part)[0]  # the sentence, to its first period that is not a decimal point
            assert f"<b>{html_text.escape('Negative: ' + whole)}.</b>" in summary
    assert negative == summary.count("<b>Negative: ")


def test_report_html_has_a_card_for_every_shard(tiny_run):
    """The reader's front page: every shard of both shard stages has a card with its top events in readable form
    (decoded text for the LM), every image is embedded, and nothing points outside the file."""
    import re

    from shardlib.browse import Browser

    run_dir, _ = tiny_run
    html = report_html(run_dir).read_text()
    for stage, analysis in (("shards_bandit", "analysis_bandit"), ("shards_lm", "analysis_lm")):
        n = load_results(run_dir / stage / "shards.nc").sizes["shard"]
        section = html.split(f"<section id='cards-{analysis}'>")[1].split("</section>")[0]
        b = Browser(run_dir / stage, run_dir / analysis)
        fires = b.index()["fires on"]
        for i in range(n):  # a card for every shard that fires; the silent ones named in one line
            card_or_line = f"<h3 id='shard-{i}'>Shard {i}</h3>" if fires[i] else f"<span id='shard-{i}'>{i}</span>"
            assert card_or_line in section
        assert ("fire on no event and have no card" in section) == bool((fires == 0).any())
        firing = int(b.index()["fires on"].idxmax())
        card = b.card(firing).html
        assert card.count("<tr>") >= 5 and "Where it lives" in card and "Nearest by cosine" in card
        if stage == "shards_lm":
            assert "&lt;bos&gt;" in card and "→" in card  # the synthetic tokens decoded: "<bos> add 3 1 4 1 ="
        else:
            assert "→ arm" in card
    assert not re.search(r"(src|href)=['\"](https?:|//)", html)  # no external URLs
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r"<img[^>]*src=['\"]([^'\"]+)", html))
    assert "<a href='#cards-analysis_lm'>Shard cards</a>" in html


def test_tiny_pipeline_writes_notebooks_results_and_plots(tiny_run):
    run_dir, records = tiny_run
    assert all(r["status"] == "done" for r in records) and len(records) == len(plan(load_config(TINY), run_dir.parent))
    for stage in (
        "pretrain",
        "rl_bandit",
        "rl_lm",
        "sft_lm",
        "shards_bandit",
        "shards_lm",
        "planted",
        "sparsity",
        "frontier",
        "analysis_bandit",
        "analysis_lm",
        "toy_models",
        "figures",
        "frontier_events/rank=0,k=1",
        "lr_sweep/lr=0.01",
    ):
        d = run_dir / stage
        nb = json.loads((d / "notebook.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
        last = [c for c in nb["cells"] if c["cell_type"] == "code"][-1]
        text = "".join("".join(o.get("text", "")) for o in last["outputs"])
        assert text.startswith("Finding: ") and "?" not in text, (
            stage,
            text[:200],
        )  # every notebook ends with its Finding
        assert (d / "notebook.ipynb").stat().st_size < 2_000_000, stage  # no pages of progress bars
        ds = load_results(d / "results.nc")
        cfg = json.loads(ds.attrs["config"])
        assert cfg["out_dir"] == str(d) and ds.attrs["seed"] == 0
        for key in ("git_commit", "git_dirty", "python_version", "torch_version", "shardlib_version", "created"):
            assert key in ds.attrs
    assert (run_dir / "pretrain" / "pretrain.png").exists()
    assert (run_dir / "rl_lm" / "reward_by_task.png").exists()
    assert (run_dir / "rl_lm" / "updates" / "events").is_dir()
    assert (run_dir / "rl_lm" / "update_norms.png").exists()
    assert (run_dir / "rl_lm" / "online_shards.nc").exists()
    for f in ("shards.nc", "activations.nc", "sae/cfg.json", "sae/sae.safetensors", "shards_by_event_type.png"):
        assert (run_dir / "shards_lm" / f).exists(), f
    assert (run_dir / "planted" / "planted_recovery.png").exists()
    assert (run_dir / "sparsity" / "sparsity_lenses.png").exists()
    assert (run_dir / "frontier" / "frontier.png").exists()
    assert (run_dir / "analysis_lm" / "intervention_effects.png").exists()


def test_unchanged_stages_are_skipped_and_changes_rerun(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    cfg = load_config(TINY)
    recs = runner.run(cfg, runs_dir=run_dir.parent)
    assert {r["status"] for r in recs} == {"skipped"}
    cfg = load_config(TINY, ["rl_bandit.lr=0.02"])
    recs = runner.run(cfg, runs_dir=run_dir.parent, only=["rl_bandit"])
    assert [(r["stage"], r["status"]) for r in recs] == [("rl_bandit", "done")]


def test_figures_regenerate_byte_identical_from_results(tiny_run, tmp_path):
    from shardlib.figures import make_all, scripts

    run_dir, _ = tiny_run
    a = make_all(run_dir, tmp_path / "a", log=lambda *_: None)
    b = make_all(run_dir, tmp_path / "b", log=lambda *_: None)
    assert set(a) == {s.stem[4:] for s in scripts()}  # every figure script made its figure
    for name in a:
        for pa, pb in zip(a[name], b[name]):
            assert pa.read_bytes() == pb.read_bytes(), pa
    skipped = []
    assert make_all(tmp_path / "empty_run", tmp_path / "c", log=skipped.append) == {}
    assert len(skipped) == len(scripts()) and "missing" in skipped[0]
