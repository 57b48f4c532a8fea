import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardlib import runfolder, runner
from shardlib.runconfig import PipelineError, load_config
from shardlib.runfolder import STAGE_FILE, run_lock
from shardlib.runner import plan

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


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


def test_a_failing_stage_names_its_cell_and_keeps_the_notebook(tmp_path, caplog):
    cfg = load_config(TINY, [f"rl_lm.init_path={tmp_path / 'no_policy'}"])  # valid parameters, fails when it runs
    cfg["stages"] = {"rl_lm": cfg["stages"]["rl_lm"]}
    hidden = set(cfg["stages"]["rl_lm"]["params"]) - runner.notebook_parameters(ROOT / "notebooks" / "02_rl.ipynb")
    assert hidden  # the config sets parameters the short cell does not show: RLParams takes them
    with pytest.raises(PipelineError, match=r"stage 'rl_lm' failed in cell \d+ \(\w+: .*no_policy") as e:
        runner.run(cfg, runs_dir=tmp_path)
    assert "Passed unknown parameter" not in caplog.text  # checked by plan(), so not papermill's warning
    assert (tmp_path / "tiny" / "rl_lm" / "notebook.ipynb").exists()
    assert json.loads((tmp_path / "tiny" / "rl_lm" / ".stage.json").read_text())["status"] == "failed"
    assert "notebook.ipynb" in str(e.value)


def test_plain_papermill_cli_runs_a_notebook_alone_and_validates(tmp_path):
    nb = str(ROOT / "notebooks" / "01_pretrain.ipynb")
    small = ["-p", "steps", "3", "-p", "batch_size", "8", "-p", "eval_prompts", "8", "-p", "d_model", "16"]
    small += ["-p", "d_ff", "32", "-p", "n_heads", "2", "-p", "device", "cpu"]
    ok = subprocess.run(
        [sys.executable, "-m", "papermill", nb, str(tmp_path / "ok.ipynb"), "-p", "out_dir", str(tmp_path / "o")]
        + small
        + ["-k", "python3"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "o" / "results.nc").exists() and (tmp_path / "o" / "policy").is_dir()
    # the parameters cell does not show d_ff; papermill warns, and the notebook takes it all the same
    assert "Passed unknown parameter: d_ff" in ok.stderr
    assert json.loads((tmp_path / "o" / "policy" / "config.json").read_text())["intermediate_size"] == 32
    bad = subprocess.run(
        [sys.executable, "-m", "papermill", nb, str(tmp_path / "bad.ipynb"), "-p", "out_dir", str(tmp_path / "b")]
        + ["-p", "steps", "-2", "-k", "python3"],
        capture_output=True,
        text=True,
        timeout=240,
    )
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


# ---------------------------------------------------------------------------
# safety of runs: the reproductions


def _tiny(tmp_path, stages=None, **top):
    cfg = load_config(TINY)
    if stages is not None:
        cfg["stages"] = {k: cfg["stages"][k] for k in stages}
    cfg.update(top)
    return cfg


def test_run_name_dotdot_cannot_delete_the_repositorys_figures(tmp_path, capsys):
    from shardlib.__main__ import main

    runs = tmp_path / "repo" / "runs"
    runs.mkdir(parents=True)
    victim = tmp_path / "repo" / "figures"  # what runs/../figures would reach
    victim.mkdir()
    (victim / "fig_keep.py").write_text("precious")
    for name in ("..", "../escaped_run", "/abs/path", ".", "a/b", "", "x" * 101):
        assert (
            main(["run", "--config", str(TINY), "--run", name, "--only", "figures", "--runs-dir", str(runs), "--quiet"])
            == 1
        )
        assert "run name" in capsys.readouterr().err
    assert (victim / "fig_keep.py").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["figures", "runs"] and not any(runs.iterdir())
    assert main(["figures", "--run", "..", "--runs-dir", str(runs)]) == 1
    with pytest.raises(PipelineError, match="run name '..' is not allowed"):
        plan({**load_config(TINY), "run": ".."})  # the default runs folder: refused before any path is formed


def test_stage_names_references_notebooks_and_runs_folders_stay_inside(tmp_path):
    cfg = _tiny(tmp_path)
    st = cfg["stages"]
    bad = [
        ({"stages": {"../../../victim": st["pretrain"]}}, "stage name '../../../victim' is not allowed"),
        ({"stages": {"pretrain": {**st["pretrain"], "notebook": "../../evil.ipynb"}}}, "leaves the notebook folder"),
        ({"stages": {"pretrain": {**st["pretrain"], "notebook": "/etc/passwd"}}}, "must be a .ipynb file"),
        (
            {
                "stages": {
                    "pretrain": st["pretrain"],
                    "rl_lm": {**st["rl_lm"], "params": {"init_path": "@pretrain/../../x"}},
                }
            },
            "leaves the folder of stage 'pretrain'",
        ),
        (
            {
                "stages": {
                    "pretrain": st["pretrain"],
                    "lr_sweep": {**st["lr_sweep"], "sweep": {"algorithm": ["../../x"]}},
                }
            },
            "sweep value algorithm='../../x' cannot name a folder",
        ),
    ]
    for change, message in bad:
        with pytest.raises(PipelineError, match=message):
            plan({**cfg, **change}, tmp_path / "runs")
    from shardlib.runconfig import ROOT as REPO

    for runs in (REPO, REPO.parent, REPO / "figures", REPO / "shardlib" / "x"):
        with pytest.raises(PipelineError, match="among the repository's own files"):
            plan(cfg, runs)
    assert plan(cfg, REPO / "runs" / "sub")[0].out_dir == REPO / "runs" / "sub" / "tiny" / "pretrain"
    assert not (tmp_path / "runs").exists()


def test_a_config_cannot_run_code_through_parameter_names_or_values(tmp_path):
    marker = tmp_path / "marker"
    evil = f"x = 1\nopen({str(marker)!r}, 'w').write('hi')\ny"
    cfg = _tiny(tmp_path, ["rl_bandit"])
    for params, message in [
        ({evil: 1}, "is not a Python identifier"),
        ({"import": 1}, "is not a Python identifier"),
        ({"stepz": 3}, "02_rl.ipynb has no parameter 'stepz'"),
        ({"out_dir": "/tmp/elsewhere"}, "'out_dir' is set by the runner"),
        ({"steps": b'"+open("x","w").write("1")+"'}, "of type bytes is not allowed"),
    ]:
        cfg["stages"]["rl_bandit"]["params"] = params
        with pytest.raises(PipelineError, match=message):
            runner.run(cfg, runs_dir=tmp_path / "runs")
    assert not marker.exists() and not (tmp_path / "runs").exists()
    (tmp_path / "bad.yaml").write_text("run: x\nstages: {a: {notebook: 01_pretrain.ipynb, params: {steps: [1, }}\n")
    with pytest.raises(PipelineError, match=r"bad.yaml: not valid YAML \(line 2"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "setting,message",
    [
        ("rl_bandit.lr=.nan", "'lr': got nan; accepted: a finite float > 0"),
        ("rl_bandit.temperature=.inf", "'temperature': got inf"),
        ("shards_bandit.holdout_frac=.nan", "parameter 'holdout_frac': got nan"),
        ("rl_bandit.steps=2.5", "parameter 'steps': got 2.5"),
        ("rl_bandit.online_k=99", "parameter 'online_k': 99 exceeds online_n_latents"),
        ("seed=1.7", "seed must be an integer from 0 to 4294967295 (2**32 - 1), got 1.7"),
        ("seed=abc", "seed must be an integer from 0 to 4294967295 (2**32 - 1), got 'abc'"),
        ("seed=true", "seed must be an integer from 0 to 4294967295 (2**32 - 1), got True"),
        ("rl_lm.steps=[a", "not valid YAML"),
        ("seed=99999999999999999999999", "seed must be an integer from 0 to 4294967295"),
        ("seed=-1", "seed must be an integer from 0 to 4294967295"),
        ("rl_lm.steps=99999999999999999999", "'steps': got 99999999999999999999; accepted: int >= 1 of at most"),
        ("rl_bandit.steps=1.0e+30", "'steps': got 1000000000000000019884624838656; accepted: int >= 1 of at most"),
        ("rl_bandit.steps=200000000", "more optimizer steps than an update store numbers"),
        ("planted.seeds=[0, 4294967296]", "parameter 'seeds': got [0, 4294967296] (list); accepted: list >= 0 <="),
        ("pretrain.tasks=[max, nope]", "parameter 'tasks': got ['max', 'nope'] (list); accepted: list one of 'add'"),
        ("rl_lm.tasks=[]", "parameter 'tasks': got []; accepted: a non-empty list of distinct task names"),
        ("rl_lm.tasks=[max, max]", "parameter 'tasks': got ['max', 'max']; accepted: a non-empty list of distinct"),
        ("rl_lm.steps=*x", "found undefined alias"),
    ],
)
def test_bad_values_are_named_before_any_stage_runs(tmp_path, capsys, monkeypatch, setting, message):
    from shardlib.__main__ import main

    monkeypatch.setattr(runner, "_execute", lambda *a, **k: pytest.fail(f"a stage ran with {setting}"))
    assert main(["run", "--config", str(TINY), "--set", setting, "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_the_runner_never_deletes_a_folder_it_did_not_write(tmp_path):
    cfg = _tiny(tmp_path, ["pretrain"])
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "precious.txt").write_text("mine")
    with pytest.raises(PipelineError, match="holds files but no valid .stage.json.*will not delete it"):
        runner.run(cfg, runs_dir=tmp_path / "runs")
    (stage / ".stage.json").write_text(
        json.dumps({"fingerprint": "x", "status": "done", "params": {"out_dir": "/elsewhere"}})
    )
    with pytest.raises(PipelineError, match="will not delete it"):  # a record for another folder is not this folder's
        runner.run(cfg, runs_dir=tmp_path / "runs")
    assert (stage / "precious.txt").read_text() == "mine"


def test_a_run_cannot_nest_inside_another_runs_folder(tmp_path):
    stage = tmp_path / "runs" / "default" / "rl_lm"
    stage.mkdir(parents=True)
    (stage / ".stage.json").write_text("{}")
    with pytest.raises(PipelineError, match="inside another run's folder"):
        plan({**load_config(TINY), "run": "rl_lm"}, tmp_path / "runs" / "default")
    with pytest.raises(PipelineError, match="braces are not allowed"):
        plan(load_config(TINY), tmp_path / "r{seed}")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(PipelineError, match="makes a cycle"):
        load_config(tmp_path / "a.yaml")


def _timing_notebook(folder: Path) -> Path:
    """A stage notebook of seconds: marks its start with the file ``started`` in its folder, waits until the file
    ``until`` exists and holds ``until_text`` (two minutes at most), then ``wait`` s, writes its start and end times, its ``OMP_NUM_THREADS`` and its working folder to ``times.json`` in its
    folder; raises at once when ``fail``."""
    import nbformat

    folder.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell(
            'out_dir = ""\nseed = 0\nwait = 0.0\nuntil = ""\nuntil_text = ""\ninp = ""\nfail = False',
            metadata={"tags": ["parameters"]},
        ),
        nbformat.v4.new_code_cell(
            "import json, os, pathlib, time\n"
            "t0 = time.time()\n"
            "pathlib.Path(out_dir, 'started').touch()\n"
            "assert not fail, 'asked to fail'\n"
            "def arrived():\n"
            "    return pathlib.Path(until).exists() and until_text in pathlib.Path(until).read_text()\n"
            "while until and not arrived() and time.time() < t0 + 120:\n"
            "    time.sleep(0.05)\n"
            "time.sleep(wait)\n"
            "threads = os.environ.get('OMP_NUM_THREADS')\n"
            "pathlib.Path(out_dir, 'times.json').write_text(json.dumps([t0, time.time(), threads, os.getcwd()]))"
        ),
    ]
    nbformat.write(nb, folder / "timing.ipynb")
    return folder


def _cli_run_of_waiting_stages(tmp_path, run: str, names, until: Path, *extra: str):
    """`python -m shardlib run` on a config of timing stages ``names`` that wait until the file ``until`` exists
    (SIGINT acts as in a terminal, not ignored as in a background job); the config is ``<run>.yaml`` in
    ``tmp_path``. Returns (command, process, the stages' record files) once every stage has written its record."""
    import signal
    import time

    nbs = _timing_notebook(tmp_path / "nbs")
    config = tmp_path / f"{run}.yaml"
    config.write_text(
        f"run: {run}\nstages:\n"
        + "".join(f"  {s}: {{notebook: timing.ipynb, params: {{until: {until}}}}}\n" for s in names)
    )
    args = [sys.executable, "-m", "shardlib", "run", "--config", str(config), "--notebooks-dir", str(nbs)]
    args += ["--runs-dir", str(tmp_path / "runs"), "--quiet", *extra]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    states = [tmp_path / "runs" / run / s / STAGE_FILE for s in names]
    for _ in range(1200):
        if all(f.exists() for f in states) or proc.poll() is not None:
            break
        time.sleep(0.05)
    return args, proc, states


def test_two_concurrent_cli_runs_on_one_run_name(tmp_path):
    """A real second process: the first holds the lock while it runs a stage (one that waits until the second has
    been refused); the second is refused."""
    args, first, _ = _cli_run_of_waiting_stages(tmp_path, "tiny", ["wait"], tmp_path / "refused")
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    (tmp_path / "refused").touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "IPKernelApp" not in err, err[-2000:]  # no kernel log in a successful run
    assert second.returncode == 1 and f"in use by process {first.pid}" in second.stderr, second.stderr


def test_jobs_run_independent_stages_at_once_and_inputs_first(tmp_path):
    nbs = _timing_notebook(tmp_path / "nbs")
    stages = {
        # each waits until the other has started: together they finish only if they run at the same time
        "a": {"notebook": "timing.ipynb", "params": {"until": str(tmp_path / "runs" / "jobs" / "b" / "started")}},
        "b": {"notebook": "timing.ipynb", "params": {"until": str(tmp_path / "runs" / "jobs" / "a" / "started")}},
        "c": {"notebook": "timing.ipynb", "params": {"inp": "@a"}},
    }
    cfg = {"run": "jobs", "seed": 0, "stages": stages}
    cwd = Path.cwd()
    records = runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], jobs=2, log=lambda *_: None)
    assert [r["stage"] for r in records] == ["a", "b", "c"] and all(r["status"] == "done" for r in records)
    t = {s: json.loads((tmp_path / "runs" / "jobs" / s / "times.json").read_text()) for s in stages}
    assert t["b"][0] < t["a"][1] and t["a"][0] < t["b"][1]  # a and b ran at the same time
    assert t["c"][0] >= t["a"][1]  # c reads a: it started after a finished
    assert {v[2] for v in t.values()} == {"1"}  # each kernel computes with one thread (the default)
    for name, v in t.items():  # each kernel ran in its own stage folder; the runner's folder did not move
        assert Path(v[3]) == (tmp_path / "runs" / "jobs" / name).resolve()
    assert Path.cwd() == cwd
    again = runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], jobs=2, log=lambda *_: None)
    assert [r["status"] for r in again] == ["skipped"] * 3
    two = runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], jobs=3, threads=2, log=lambda *_: None)
    assert [r["status"] for r in two] == ["done"] * 3  # another thread count: another fingerprint
    assert {json.loads((tmp_path / "runs" / "jobs" / s / "times.json").read_text())[2] for s in stages} == {"2"}
    assert Path.cwd() == cwd  # (papermill's cwd= used to chdir the process: threads left it in a deleted folder)
    with pytest.raises(PipelineError, match="jobs must be a whole number from 1 to 1024, got 0"):
        runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], jobs=0)


def test_a_stage_waits_while_the_declared_memory_of_running_ones_and_its_own_would_pass_the_machines(
    tmp_path, monkeypatch
):
    nbs = _timing_notebook(tmp_path / "nbs")
    run = tmp_path / "runs" / "mem"
    stages = {  # a machine of 10 GiB: a and b (6 GiB each) never side by side; c (declares none) beside a
        "a": {"notebook": "timing.ipynb", "params": {"until": str(run / "c" / "started")}, "memory_gb": 6},
        "b": {"notebook": "timing.ipynb", "params": {}, "memory_gb": 6},
        "c": {"notebook": "timing.ipynb", "params": {"wait": 0.5}},
    }
    monkeypatch.setattr(runner, "machine_memory_gb", lambda: 10.0)
    logged = []
    cfg = {"run": "mem", "seed": 0, "stages": stages}
    runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], jobs=2, log=logged.append)
    t = {s: json.loads((run / s / "times.json").read_text()) for s in stages}
    assert t["b"][0] >= t["a"][1] and t["c"][0] < t["a"][1]  # b after a; c beside it
    assert any(
        "b: waits for memory (6 GiB declared; running stages hold 6 of the machine's 10 GiB)" in m for m in logged
    )
    assert json.loads((run / "a" / STAGE_FILE).read_text())["status"] == "done"
    for bad in ("lots", -1, True):
        cfg["stages"]["b"]["memory_gb"] = bad
        with pytest.raises(PipelineError, match="memory_gb must be a number of GiB"):
            runner.plan(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs])


def test_after_a_failure_no_stage_starts_and_the_running_ones_finish(tmp_path):
    """Stage "slow" finishes a second after "bad" has recorded its failure (not after a fixed time: under load, bad's
    kernel can start later than slow's by more than any fixed wait), so the runner knows of the failure when slow's
    dependant "later" would become ready."""
    nbs = _timing_notebook(tmp_path / "nbs")
    bad_state = tmp_path / "runs" / "fails" / "bad" / ".stage.json"
    stages = {
        "slow": {
            "notebook": "timing.ipynb",
            "params": {"until": str(bad_state), "until_text": '"failed"', "wait": 1.0},
        },
        "bad": {"notebook": "timing.ipynb", "params": {"fail": True}},
        "later": {"notebook": "timing.ipynb", "params": {"inp": "@slow"}},
    }
    cfg = {"run": "fails", "seed": 0, "stages": stages}
    with pytest.raises(PipelineError, match=r"stage 'bad' failed in cell \d+ \(AssertionError: asked to fail"):
        runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], jobs=2, log=lambda *_: None)
    run = tmp_path / "runs" / "fails"
    assert json.loads((run / "slow" / ".stage.json").read_text())["status"] == "done"
    assert json.loads((run / "bad" / ".stage.json").read_text())["status"] == "failed"
    assert not (run / "later").exists()  # never started


def test_ctrl_c_stops_the_stages_running_side_by_side_and_they_resume(tmp_path):
    """SIGINT (Ctrl-C, or `timeout --signal=INT`) to a run with two stages running: it ends in seconds, not when
    the stages would have finished, and leaves them `running`, so the next run resumes them."""
    import signal
    import time

    stop = tmp_path / "never"
    _, proc, states = _cli_run_of_waiting_stages(tmp_path, "long", ["a", "b"], stop, "--jobs", "2")
    time.sleep(1.0)  # both kernels started and waiting
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 20
    assert err.startswith("error: interrupted (Ctrl-C); ") and err.count("\n") == 1, err  # no traceback, no kernel log
    assert [json.loads(f.read_text())["status"] for f in states] == ["running", "running"]
    stop.touch()
    records = runner.run(
        load_config(tmp_path / "long.yaml"),
        runs_dir=tmp_path / "runs",
        notebook_dirs=[tmp_path / "nbs"],
        jobs=2,
        log=lambda *_: None,
    )
    assert [r["status"] for r in records] == ["done", "done"]


@pytest.mark.parametrize("errno_,fragment", [(28, "free some disk space"), (30, "read-only; give a writable folder")])
def test_io_errors_end_in_one_error_line(tmp_path, capsys, monkeypatch, errno_, fragment):
    from shardlib import __main__ as cli

    def fail(*a, **k):
        raise OSError(errno_, os.strerror(errno_), str(tmp_path / "runs" / "tiny" / "pretrain" / "results.nc"))

    monkeypatch.setattr(cli, "run", fail)
    assert cli.main(["run", "--config", str(TINY), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {tmp_path}/runs/tiny/pretrain/results.nc: ")
        and fragment in err
        and err.count("\n") == 1
    )


# ---------------------------------------------------------------------------
# reliability, second round (issue 25)


def test_a_kill_inside_a_forced_reruns_deletion_reruns_the_stage_instead_of_skipping_it(tmp_path, monkeypatch):
    """The forced rerun marks the record stale before it deletes; a kill after the first file went (simulated here)
    leaves a stale record, so the next run empties the folder and runs the stage again, not "unchanged, skipped"."""
    nbs = _timing_notebook(tmp_path / "nbs")
    cfg = {"run": "r", "seed": 0, "stages": {"a": {"notebook": "timing.ipynb", "params": {}}}}
    kw = dict(runs_dir=tmp_path / "runs", notebook_dirs=[nbs], log=lambda *_: None)
    stage = tmp_path / "runs" / "r" / "a"
    assert [r["status"] for r in runner.run(cfg, **kw)] == ["done"]
    real_unlink, calls = os.unlink, []

    def killed_after_one(path, *a, **k):  # the runner dies right after deleting one file
        real_unlink(path, *a, **k)
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, force=True, **kw)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert len(calls) == 1 and json.loads((stage / STAGE_FILE).read_text())["status"] == "stale"
    assert [r["status"] for r in runner.run(cfg, **kw)] == ["done"]  # rerun, not skipped
    assert json.loads((stage / "times.json").read_text()) and (stage / "notebook.ipynb").is_file()
    assert [r["status"] for r in runner.run(cfg, **kw)] == ["skipped"]


def test_a_done_record_is_trusted_only_while_its_outputs_are_there(tmp_path):
    nbs = _timing_notebook(tmp_path / "nbs")
    cfg = {"run": "r", "seed": 0, "stages": {"a": {"notebook": "timing.ipynb", "params": {}}}}
    logged = []
    kw = dict(runs_dir=tmp_path / "runs", notebook_dirs=[nbs], log=logged.append)
    out = tmp_path / "runs" / "r" / "a"
    runner.run(cfg, **kw)
    assert json.loads((out / STAGE_FILE).read_text())["outputs"] == ["notebook.ipynb", "started", "times.json"]
    (out / "times.json").unlink()
    (out / "times.json").mkdir()  # the results file replaced by a folder
    assert [r["status"] for r in runner.run(cfg, **kw)] == ["done"]
    assert "times.json is missing or not a file: running it again from an empty folder" in logged[-3]
    assert (out / "times.json").is_file()
    (out / "notebook.ipynb").unlink()  # an output deleted by hand
    assert [r["status"] for r in runner.run(cfg, **kw)] == ["done"]
    assert [r["status"] for r in runner.run(cfg, **kw)] == ["skipped"]


def test_the_runner_writes_through_no_symlink_inside_the_runs_folder(tmp_path, monkeypatch):
    nbs = _timing_notebook(tmp_path / "nbs")
    cfg = {"run": "r", "seed": 0, "stages": {"a": {"notebook": "timing.ipynb", "params": {}}}}
    kw = dict(notebook_dirs=[nbs], log=lambda *_: None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("mine")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r").symlink_to(elsewhere)  # the run folder a link (issue: ln -s "$PWD" runs/R2)
    with pytest.raises(PipelineError, match=rf"{runs / 'r'} is a symbolic link \(to {elsewhere}\)"):
        runner.run(cfg, runs_dir=runs, **kw)
    (runs / "r").unlink()
    (runs / "r").mkdir()
    (runs / "r" / ".shardlib.lock").symlink_to(elsewhere / "precious.txt")  # the lock a link
    with pytest.raises(PipelineError, match=r"\.shardlib\.lock is a symbolic link"):
        runner.run(cfg, runs_dir=runs, **kw)
    (runs / "r" / ".shardlib.lock").unlink()
    (runs / "r" / "a").symlink_to(elsewhere)  # a stage folder a link
    with pytest.raises(PipelineError, match=r"/r/a is a symbolic link"):
        runner.run(cfg, runs_dir=runs, **kw)
    (runs / "r" / "a").unlink()
    (runs / "r" / ".shardlib.lock").symlink_to(elsewhere / "precious.txt")
    monkeypatch.setattr(runfolder, "refuse_link", lambda p: None)  # a link put there after the check: not followed
    with pytest.raises(PipelineError, match=r"\.shardlib\.lock is a symbolic link"), run_lock(runs / "r"):
        pass
    monkeypatch.undo()
    (runs / "r" / ".shardlib.lock").unlink()
    assert (elsewhere / "precious.txt").read_text() == "mine" and sorted(os.listdir(elsewhere)) == ["precious.txt"]
    # the runs folder itself may be a link to a folder of your choice; a resumed stage's notebook may not be one
    (tmp_path / "my_runs").symlink_to(runs)
    assert [r["status"] for r in runner.run(cfg, runs_dir=tmp_path / "my_runs", **kw)] == ["done"]
    state = json.loads((runs / "r" / "a" / STAGE_FILE).read_text())
    (runs / "r" / "a" / STAGE_FILE).write_text(json.dumps({**state, "status": "running"}))  # interrupted: resumes
    (runs / "r" / "a" / "notebook.ipynb").unlink()
    (runs / "r" / "a" / "notebook.ipynb").symlink_to(elsewhere / "precious.txt")
    with pytest.raises(PipelineError, match=r"a/notebook.ipynb is a symbolic link"):
        runner.run(cfg, runs_dir=runs, **kw)
    assert (elsewhere / "precious.txt").read_text() == "mine" and sorted(os.listdir(elsewhere)) == ["precious.txt"]


def _crash_notebook(folder: Path) -> Path:
    """A stage notebook that kills its own kernel (``action='die'``) or fails as a full disk does (``'full'``)."""
    import nbformat

    folder.mkdir(exist_ok=True)
    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell('out_dir = ""\nseed = 0\naction = ""', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import os, signal\n"
            "if action == 'die':\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "if action == 'full':\n"
            "    raise OSError(28, 'No space left on device', os.path.join(out_dir, 'results.nc'))"
        ),
    ]
    nbformat.write(nb, folder / "crash.ipynb")
    return folder


def test_a_dead_kernel_and_a_full_disk_inside_a_stage_are_one_error_line(tmp_path, monkeypatch):
    nbs = _crash_notebook(tmp_path / "nbs")
    config = tmp_path / "crash.yaml"
    config.write_text("run: c\nstages:\n  die: {notebook: crash.ipynb, params: {action: die}}\n")
    args = [sys.executable, "-m", "shardlib", "run", "--config", str(config), "--notebooks-dir", str(nbs)]
    args += ["--runs-dir", str(tmp_path / "runs"), "--quiet"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    nb = tmp_path / "runs" / "c" / "die" / "notebook.ipynb"
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: stage 'die' failed: its kernel died") and str(nb) in done.stderr
    cfg = {"run": "c", "seed": 0, "stages": {"full": {"notebook": "crash.ipynb", "params": {"action": "full"}}}}
    with pytest.raises(PipelineError) as e:
        runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], log=lambda *_: None)
    msg = str(e.value)
    assert "(OSError: [Errno 28] No space left on device" in msg and "full/results.nc" in msg and "\n" not in msg
    assert "free some disk space" in msg and str(tmp_path / "runs" / "c" / "full" / "notebook.ipynb") in msg
    import papermill

    def saving_fails(*a, **k):  # papermill saving the executed notebook on a full disk: an OSError naming no file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(papermill, "execute_notebook", saving_fails)
    with pytest.raises(OSError) as e:
        runner.run(cfg, runs_dir=tmp_path / "runs", notebook_dirs=[nbs], log=lambda *_: None)
    assert e.value.filename == str(tmp_path / "runs" / "c" / "full" / "notebook.ipynb") and e.value.errno == 28
