import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardlib import runner
from shardlib.io import load_results
from shardlib.runner import PipelineError, load_config, plan

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    records = runner.run(load_config(TINY), runs_dir=runs)
    return runs / "tiny", records


def test_tiny_pipeline_writes_notebooks_results_and_plots(tiny_run):
    run_dir, records = tiny_run
    assert all(r["status"] == "done" for r in records) and len(records) == len(plan(load_config(TINY), run_dir.parent))
    for stage in ("pretrain", "rl_bandit", "rl_lm", "sft_lm", "shards_bandit", "shards_lm", "planted", "sparsity", "frontier",
                  "analysis_bandit", "analysis_lm", "toy_models", "figures", "frontier_events/rank=1,k=1", "lr_sweep/lr=0.01"):
        d = run_dir / stage
        nb = json.loads((d / "notebook.ipynb").read_text())
        assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
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


def test_a_stage_hashes_only_the_library_code_its_notebook_reaches():
    names = lambda nb: {f.name for f in runner.library_files(ROOT / "notebooks" / nb)}  # noqa: E731
    rl_code, toy_code, fig_code = names("02_rl.ipynb"), names("08_toy_models.ipynb"), names("09_figures.ipynb")
    assert {"rl.py", "updates.py", "shards.py", "sae.py"} <= rl_code and "toy.py" not in rl_code  # a toy edit keeps RL runs
    assert {"toy.py", "shards.py", "rl.py"} <= toy_code  # toy -> shards -> rl (make_accelerator), found inside functions
    assert {"figures.py", "fig_toy_models.py", "toy.py"} <= fig_code  # figure scripts and what they import
    assert runner.library_digest(ROOT / "notebooks" / "02_rl.ipynb") != runner.library_digest(ROOT / "notebooks" / "08_toy_models.ipynb")


def test_config_overrides_and_references():
    cfg = load_config(TINY, ["seed=3", "rl_lm.steps=9"])
    stages = {s.name: s for s in plan(cfg, "/r")}
    assert stages["rl_lm"].params["steps"] == 9 and stages["rl_lm"].params["seed"] == 3
    assert stages["rl_lm"].params["init_path"] == "/r/tiny/pretrain/policy"
    assert stages["rl_lm"].deps == ["pretrain"]
    with pytest.raises(PipelineError, match="no stage 'nope'"):
        load_config(TINY, ["nope.steps=1"])
    with pytest.raises(PipelineError, match="expected key=value"):
        load_config(TINY, ["steps"])


def test_a_failing_stage_names_its_cell_and_keeps_the_notebook(tmp_path):
    cfg = load_config(TINY, ["rl_bandit.stepz=3"])
    cfg["stages"] = {"rl_bandit": cfg["stages"]["rl_bandit"]}
    with pytest.raises(PipelineError, match=r"stage 'rl_bandit' failed in cell \d+ \(ConfigError: unknown parameter\(s\) \['stepz'\]") as e:
        runner.run(cfg, runs_dir=tmp_path)
    assert (tmp_path / "tiny" / "rl_bandit" / "notebook.ipynb").exists()
    assert "notebook.ipynb" in str(e.value)


def test_plain_papermill_cli_runs_a_notebook_alone_and_validates(tmp_path):
    nb = ROOT / "notebooks" / "02_rl.ipynb"
    ok = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(tmp_path / "ok.ipynb"), "-p", "out_dir", str(tmp_path / "o"),
                         "-p", "steps", "3", "-p", "eval_prompts", "16", "-p", "device", "cpu", "-k", "python3"],
                        capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "o" / "results.nc").exists()
    bad = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(tmp_path / "bad.ipynb"), "-p", "out_dir", str(tmp_path / "b"),
                          "-p", "steps", "-2", "-k", "python3"], capture_output=True, text=True, timeout=240)
    assert bad.returncode != 0
    assert "parameter 'steps': got -2 (int); accepted: int >= 1" in bad.stderr + bad.stdout
    assert not (tmp_path / "b" / "results.nc").exists()


@pytest.mark.parametrize("nb", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(nb):
    data = json.loads(nb.read_text())
    for c in data["cells"]:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None
    assert data["metadata"]["kernelspec"]["name"] == "python3"


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
