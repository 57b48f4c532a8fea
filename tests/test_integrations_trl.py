"""shardlib.integrations.trl: update collection from TRL's GRPOTrainer (tiny offline Llama, CPU)."""

import importlib.util
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (it is in the test extra: pip install -e '.[test]')")

from transformers import TrainerCallback

from shardlib.integrations import trl as shard_trl
from shardlib.integrations.trl import collect_updates
from shardlib.updates import densify, open_store, update_vars

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ["model.layers.*.mlp.down_proj.weight", "model.layers.*.self_attn.q_proj.weight"]


@pytest.fixture(autouse=True, scope="module")
def _fresh_accelerate_state():
    """TRL's trainers set accelerate's process-wide state (e.g. mixed precision); reset it after this module so
    that the stages tested afterwards can build their own Accelerator."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _example():
    spec = importlib.util.spec_from_file_location("trl_grpo_example", ROOT / "examples" / "trl_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = _example()


class GradientProbe(TrainerCallback):
    """The selected parameters' accumulated gradient before clipping (a post-accumulate hook keeps a copy) and
    the clipped one the optimizer applies, per optimizer step."""

    def __init__(self, model, names):
        self.named = {n: p for n, p in model.named_parameters() if n in names}
        self.snap, self.unclipped, self.clipped = {}, {}, {}
        for n, p in self.named.items():
            p.register_post_accumulate_grad_hook(lambda p, n=n: self.snap.__setitem__(n, p.grad.detach().clone()))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.unclipped[state.global_step] = dict(self.snap)
        self.clipped[state.global_step] = {n: p.grad.detach().clone() for n, p in self.named.items()}


CONFIGS = {
    # TRL's default checkpointing (use_reentrant=False), gradient accumulation 2, clipping active
    "ckpt_accum2": dict(gradient_checkpointing=True, gradient_accumulation_steps=2),
    # reentrant checkpointing, 2 iterations per generation (rows reused, shuffled again)
    "reentrant_iter2": dict(
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        gradient_accumulation_steps=2,
        num_iterations=2,
    ),
    # no checkpointing, no accumulation, factored events
    "plain_factored": dict(gradient_checkpointing=False, gradient_accumulation_steps=1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short GRPO run per configuration, made on first use: (collection, probe, config)."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = CONFIGS[name]
            out = tmp_path_factory.mktemp(name)
            tr = ex.make_trainer(out / "trl", max_steps=3, max_grad_norm=0.05, **cfg)
            col = collect_updates(tr, PARAMS, out / "updates", columns=["task"], factored=name == "plain_factored")
            probe = GradientProbe(tr.model, col.params)
            tr.add_callback(probe)
            tr.train()
            cache[name] = (col, probe, cfg)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_steps_events_sum_to_minus_lr_times_the_unclipped_gradient(runs, name):
    col, probe, cfg = runs(name)
    ev = densify(open_store(col.event_store_path))
    gas = cfg["gradient_accumulation_steps"]
    rows = 4 * gas  # per_device_train_batch_size x accumulation: one event per completion
    assert sorted(set(ev.step.values.tolist())) == [0, 1, 2]
    errors = []
    for s in range(3):
        e = ev.isel(event=np.flatnonzero(ev.step.values == s))
        assert e.sizes["event"] == rows
        lr, clip = float(e.lr[0]), float(e.clip_coef[0])
        assert lr == pytest.approx(1e-2 * (1 - s / 3))  # TRL's linear schedule, read every step
        assert 0 < clip < 1 and clip == pytest.approx(0.05 / (float(e.grad_norm[0]) + 1e-6))
        for v in update_vars(e):
            n = e[v].attrs["param"]
            total = torch.from_numpy(e[v].values.astype(np.float64)).sum(0)
            ref = -lr * probe.unclipped[s][n].double()
            errors.append(float((total - ref).norm() / ref.norm()))
            # the optimizer got clip_coef x the unclipped gradient
            assert torch.allclose(probe.clipped[s][n], clip * probe.unclipped[s][n], rtol=1e-4, atol=1e-9)
    print(f"{name}: max relative error of a step's event sum {max(errors):.2e}")
    assert max(errors) < 1e-5
    # labels: rewards per function and their total, advantages centred per prompt group, completions of a group
    # share their prompt, tasks as the dataset says
    ra, rb = ev.reward_correct_a.values, ev.reward_correct_b.values
    task = ev.task.values
    assert np.isnan(rb[task == 0]).all() and np.isnan(ra[task == 1]).all()
    np.testing.assert_allclose(ev.reward.values, np.where(task == 0, ra, rb), rtol=1e-6)
    for g in np.unique(ev.group.values):
        sel = (ev.group.values == g) & (ev.iteration.values == 0)
        if sel.any():
            assert sel.sum() == 4 and abs(ev.advantage.values[sel].sum()) < 1e-4
            assert len(set(ev.prompt_hash.values[sel].tolist())) == 1
    assert (ev.completion_length.values >= 1).all() and (ev.completion_length.values <= 6).all()
    if cfg.get("num_iterations") == 2:  # step 1 reuses step 0's completions: same groups, second iteration
        s0, s1 = ev.step.values == 0, ev.step.values == 1
        assert set(ev.iteration.values[s1]) == {1} and set(ev.group.values[s1]) == set(ev.group.values[s0])
        assert sorted(ev.completion_hash.values[s1]) == sorted(ev.completion_hash.values[s0])
    steps = open_store(col.step_store_path)
    assert steps.sizes["event"] == 3


def test_factored_events_are_stored_factored(runs):
    col, _, _ = runs("plain_factored")
    ev = open_store(col.event_store_path)
    assert any(v.endswith("__left") for v in ev.data_vars) and not update_vars(ev)


def test_the_readme_example_runs_and_its_store_trains_in_notebook_03(tmp_path, monkeypatch):
    """The TRL page's block (docs/trl.md), run as written on a GRPOTrainer, then the shard stage under papermill."""
    readme = (ROOT / "docs" / "trl.md").read_text()
    section = readme[readme.index("# Updates from TRL") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)
    trainer = ex.make_trainer(tmp_path / "trl", max_steps=2, gradient_accumulation_steps=2)
    ns = {"trainer": trainer}
    exec(compile(block, "docs/trl.md", "exec"), ns)
    store = tmp_path / "runs" / "trl" / "updates" / "events"
    ev = open_store(store)
    assert ev.sizes["event"] == 2 * 8 and ev.attrs["source"] == "trl.GRPOTrainer"
    out = ex.run_shards(store, tmp_path / "shards", epochs=5, device="cpu")
    assert (out / "activations.nc").exists() and (out / "results.nc").exists()


class Kill(Exception):
    pass


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Kill(f"killed after step {self.step}")


def test_a_killed_run_resumes_without_duplicated_or_lost_events(tmp_path):
    cfg = dict(max_steps=4, save_strategy="steps", save_steps=2)
    # first run: steps 0-1 flushed before checkpoint-2, then killed at the end of step 2 (global step 3)
    tr = ex.make_trainer(tmp_path / "trl", **cfg)
    col = collect_updates(tr, PARAMS, tmp_path / "updates")
    tr.add_callback(KillAt(3))
    with pytest.raises(Kill):
        tr.train()
    col.flush()  # as if the last chunk had reached the disk before the kill: steps 2 will be redone
    before = open_store(col.event_store_path)
    assert sorted(set(before.step.values.tolist())) == [0, 1, 2]
    assert (tmp_path / "trl" / "checkpoint-2").is_dir() and not (tmp_path / "trl" / "checkpoint-4").exists()

    tr2 = ex.make_trainer(tmp_path / "trl", **cfg)
    col2 = collect_updates(tr2, PARAMS, tmp_path / "updates")
    tr2.train(resume_from_checkpoint=True)
    ev = open_store(col2.event_store_path)
    steps, counts = np.unique(ev.step.values, return_counts=True)
    assert steps.tolist() == [0, 1, 2, 3] and counts.tolist() == [4, 4, 4, 4]
    kept = before.isel(event=np.flatnonzero(before.step.values < 2))
    again = ev.isel(event=np.flatnonzero(ev.step.values < 2))
    for v in update_vars(ev):  # steps before the checkpoint: the first run's events, untouched
        np.testing.assert_array_equal(kept[v].values, again[v].values)
    assert open_store(col2.step_store_path).sizes["event"] == 4


def test_clear_messages(tmp_path, monkeypatch):
    tr = ex.make_trainer(tmp_path / "trl")
    no_head = r"'model.embed_tokens.weight' \(Embedding\).*'model.layers.\*.mlp.down_proj.weight'\)"
    with pytest.raises(ValueError, match=no_head):
        collect_updates(tr, ["*.weight"], tmp_path / "u")
    with pytest.raises(ValueError, match=r"\['lm_head.weight'\] belong to the LM head.*fused"):
        collect_updates(tr, ["lm_head.weight", *PARAMS], tmp_path / "u")
    with pytest.raises(TypeError, match="attaches to a trl.GRPOTrainer"):
        collect_updates(object(), PARAMS, tmp_path / "u")
    monkeypatch.setattr(shard_trl, "_trl_version", lambda: "0.19.1")
    with pytest.raises(RuntimeError, match=r"supports trl 1.16.x .*trl 0.19.1 is installed.*trl==1.16.0"):
        collect_updates(tr, PARAMS, tmp_path / "u")
    monkeypatch.undo()
    bf = ex.make_trainer(tmp_path / "trl_bf16", bf16=True)
    with pytest.warns(UserWarning, match=r"bf16=True .*bf16 autocast.*bf16=False"):
        collect_updates(bf, PARAMS, tmp_path / "u_bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        collect_updates(tr, PARAMS, tmp_path / "u_fp32")  # float32: no warning
    with pytest.raises(RuntimeError, match="already called"):
        collect_updates(tr, PARAMS, tmp_path / "u_fp32")


def test_two_processes_gather_events_and_labels_into_the_main_process_stores(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo): the main process's event store holds
    both processes' completions, labelled, and a step's events sum to -lr x the all-reduced (averaged over the
    processes) unclipped gradient."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "trl_two_process.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    r = subprocess.run([*cmd, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes=2 distributed_type=DistributedType.MULTI_CPU" in r.stdout
    ref = torch.load(tmp_path / "grads.pt")
    assert ref["num_processes"] == 2
    ev = densify(open_store(tmp_path / "updates" / "events"))
    rows = 4 * 2 * 2  # per_device_train_batch_size x accumulation x processes: one event per completion
    steps, counts = np.unique(ev.step.values, return_counts=True)
    assert steps.tolist() == [0, 1] and counts.tolist() == [rows, rows]
    errors = []
    for s in range(2):
        sel = ev.step.values == s
        e = ev.isel(event=np.flatnonzero(sel))
        assert np.unique(e.process.values, return_counts=True)[1].tolist() == [rows // 2, rows // 2]
        assert float(e.lr[0]) == pytest.approx(ref["lr"][s])
        for v in update_vars(e):
            n = e[v].attrs["param"]
            total = torch.from_numpy(e[v].values.astype(np.float64)).sum(0)
            want = -ref["lr"][s] * ref["grads"][s][n].double()
            errors.append(float((total - want).norm() / want.norm()))
        # labels travel with their updates: rewards, tasks and advantages per prompt group (groups are whole
        # within a process), equal completions of a prompt have equal updates, zero advantage, zero update
        for g in np.unique(e.group.values):
            gs = e.group.values == g
            assert gs.sum() == 4 and len(set(e.process.values[gs].tolist())) == 1
            assert len(set(e.prompt_hash.values[gs].tolist())) == 1 and len(set(e.task.values[gs].tolist())) == 1
            assert abs(e.advantage.values[gs].sum()) < 1e-4
        upd = np.concatenate([e[v].values.reshape(rows, -1) for v in update_vars(e)], axis=1)
        for i in range(rows):
            if e.advantage.values[i] == 0:
                assert not upd[i].any()
            for j in range(i):
                if (e.prompt_hash.values[i], e.completion_hash.values[i]) == (
                    e.prompt_hash.values[j],
                    e.completion_hash.values[j],
                ):
                    np.testing.assert_allclose(upd[i], upd[j], rtol=1e-4, atol=1e-12)
    assert sorted(set(ev.process.values.tolist())) == [0, 1]
    task = ev.task.values
    assert np.isfinite(ev.reward.values).all() and np.isfinite(ev.advantage.values).all()
    assert (
        np.isnan(ev.reward_correct_b.values[task == 0]).all() and np.isnan(ev.reward_correct_a.values[task == 1]).all()
    )
    np.testing.assert_allclose(ev.reward.values, np.where(task == 0, ev.reward_correct_a, ev.reward_correct_b))
    print(f"2 processes: max relative error of a step's event sum {max(errors):.2e}")
    assert max(errors) < 1e-5
    assert open_store(tmp_path / "updates" / "steps").sizes["event"] == 2
