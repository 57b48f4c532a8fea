import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from shardlib import rl
from shardlib.updates import open_store

TIMING = ["tokens_per_s", "steps_per_s"]


def bandit(tmp_path, name, **kw):
    base = dict(
        out_dir=str(tmp_path / name),
        testbed="bandit",
        steps=8,
        prompts_per_step=8,
        group_size=4,
        eval_prompts=64,
        device="cpu",
        checkpoint_every=2,
        collect_params=["*"],
    )
    return rl.RLParams.from_dict({**base, **kw})


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = rl.group_advantages(r, 4)
    assert torch.allclose(a[:4].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(a[4:], torch.zeros(4))  # identical rewards: no signal
    assert torch.allclose(rl.group_advantages(r, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_clipped_surrogate_and_k3_kl():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5]]))  # ratio 2 on the first token
    loss, kl = rl.grpo_token_loss(
        logp, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), 0.2, ref_logp=old, kl_beta=0.0
    )
    assert loss[0, 0].item() == pytest.approx(-1.2)  # clipped at 1 + eps
    assert loss[0, 1].item() == 0.0  # masked
    assert kl[0, 0].item() == pytest.approx(0.5 - np.log(0.5) - 1)


def test_same_seed_same_numbers(tmp_path):
    a = rl.train(bandit(tmp_path, "a"), progress=False).results
    b = rl.train(bandit(tmp_path, "b"), progress=False).results
    assert a.drop_vars(TIMING).identical(b.drop_vars(TIMING))
    ea, eb = open_store(tmp_path / "a/updates/events"), open_store(tmp_path / "b/updates/events")
    assert ea.drop_attrs().equals(eb.drop_attrs())
    c = rl.train(bandit(tmp_path, "c", seed=1), progress=False).results
    assert not np.allclose(a.reward, c.reward)


def test_resume_after_kill_repeats_and_loses_nothing(tmp_path):
    full = rl.train(bandit(tmp_path, "full"), progress=False).results
    p = bandit(tmp_path, "killed")
    stopped = rl.train(p, progress=False, stop_after=5)  # killed after step 5; last checkpoint at 4
    assert stopped.stopped_at == 5
    resumed = rl.train(p, progress=False).results
    assert resumed.drop_vars(TIMING).identical(full.drop_vars(TIMING))
    ev_full, ev_res = open_store(tmp_path / "full/updates/events"), open_store(tmp_path / "killed/updates/events")
    assert ev_res.sizes["event"] == ev_full.sizes["event"] == 8 * 8 * 4
    assert ev_res.drop_attrs().equals(ev_full.drop_attrs())
    st = open_store(tmp_path / "killed/updates/steps")
    assert st["step"].values.tolist() == list(range(8))


def test_resume_continues_the_online_sae_exactly(tmp_path):
    from shardlib.shards import OnlineTrainer

    kw = dict(
        buffer_capacity=128, online_sae=True, online_warmup=32, online_batch_size=16, online_n_latents=8, online_k=2
    )
    full_p = bandit(tmp_path, "full", **kw)
    full = OnlineTrainer.from_rl(full_p)
    rl.train(full_p, progress=False, on_step=full)
    p = bandit(tmp_path, "killed", **kw)
    rl.train(p, progress=False, stop_after=5, on_step=OnlineTrainer.from_rl(p))  # killed after step 5; checkpoint at 4
    resumed = OnlineTrainer.from_rl(p)  # a fresh process: nothing in memory
    rl.train(p, progress=False, on_step=resumed)
    assert full.trainer is not None and len(resumed.history) == len(full.history)
    assert [h["rec"] for h in resumed.history] == [h["rec"] for h in full.history]
    for k, v in full.sae.state_dict().items():
        assert torch.equal(v, resumed.sae.state_dict()[k]), k


def test_changed_parameters_do_not_resume_silently(tmp_path):
    rl.train(bandit(tmp_path, "x"), progress=False, stop_after=2)
    with pytest.raises(RuntimeError, match="other parameters"):
        rl.train(bandit(tmp_path, "x", lr=0.5), progress=False)


def test_an_edited_or_half_replaced_checkpoint_is_refused_or_recovered(tmp_path):
    import json
    import shutil

    from shardlib.io import CheckpointError

    full = rl.train(bandit(tmp_path, "full"), progress=False).results
    p = bandit(tmp_path, "x")
    rl.train(p, progress=False, stop_after=6)  # checkpoint at step 6
    ck = tmp_path / "x" / "checkpoint"
    state = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps({**state, "step": 3}))  # the edit: 6 -> 3
    with pytest.raises(CheckpointError, match="step is 3 but its history holds 6 rows"):
        rl.train(p, progress=False)
    (ck / "state.json").write_text(json.dumps(state))
    shutil.rmtree(ck / "buffer", ignore_errors=True)
    os.remove(ck / "optimizer.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        rl.train(p, progress=False)
    # a kill between commit_dir's two renames: only checkpoint.old is left; the run resumes from it
    q = bandit(tmp_path, "y")
    rl.train(q, progress=False, stop_after=6)
    ck = tmp_path / "y" / "checkpoint"
    os.replace(ck, ck.with_name("checkpoint.old"))
    resumed = rl.train(q, progress=False).results
    assert resumed.drop_vars(TIMING).identical(full.drop_vars(TIMING))
    assert (
        open_store(tmp_path / "y/updates/events")
        .drop_attrs()
        .equals(open_store(tmp_path / "full/updates/events").drop_attrs())
    )


def test_bandit_rl_learns(tmp_path):
    ds = rl.train(
        bandit(
            tmp_path,
            "learn",
            steps=150,
            lr=0.01,
            prompts_per_step=32,
            group_size=8,
            collect_params=[],
            eval_prompts=512,
        ),
        progress=False,
    ).results
    assert (ds.eval_reward_final > ds.eval_reward_init + 0.2).all()


@pytest.mark.parametrize("algorithm", ["grpo", "sft"])
def test_lm_stage_runs_with_accumulation_and_kl(tmp_path, tiny_lm_dir, algorithm):
    p = rl.RLParams.from_dict(
        dict(
            out_dir=str(tmp_path / "lm"),
            testbed="lm",
            init_path=tiny_lm_dir,
            algorithm=algorithm,
            steps=2,
            prompts_per_step=4,
            group_size=2,
            grad_accum=2,
            kl_beta=0.1,
            inner_epochs=2,
            eval_prompts=8,
            device="cpu",
            collect_params=["*.mlp.down_proj.weight"],
        )
    )
    ds = rl.train(p, progress=False).results
    assert ds.sizes["step"] == 2 and np.isfinite(ds.loss).all()
    ev = open_store(tmp_path / "lm/updates/events")
    assert ev.sizes["event"] == 2 * 2 * (8 if algorithm == "grpo" else 4)
    assert (tmp_path / "lm/policy/model.safetensors").exists()


def test_two_process_accelerate_launch_on_cpu(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` with device=cpu runs 2 gloo processes."""
    out = tmp_path / "mp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "-m",
        "shardlib.launch",
        "rl",
        f"out_dir={out}",
        "testbed=bandit",
        "device=cpu",
        "steps=4",
        "prompts_per_step=4",
        "group_size=4",
        "eval_prompts=32",
        "checkpoint_every=2",
        "collect_params=['*']",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes=2 distributed_type=DistributedType.MULTI_CPU" in r.stdout
    from shardlib.io import load_results

    ds = load_results(out / "results.nc")
    single = rl.train(bandit(tmp_path, "single", steps=4, prompts_per_step=4, eval_prompts=32), progress=False).results
    assert set(ds.data_vars) == set(single.data_vars) and ds.attrs["num_processes"] == 2
    ev = open_store(out / "updates/events")
    assert ev.sizes["event"] == 4 * 2 * 4 * 4  # steps x processes x prompts x group
    assert sorted(set(ev["rank"].values.tolist())) == [0, 1]


def test_loss_aggregation_under_trl_names():
    tok = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]])  # masked token losses
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert rl.aggregate(tok, mask, "bnpo", 3, 99).item() == pytest.approx(4 / 3)  # tokens of the micro-batch
    assert rl.aggregate(tok, mask, "grpo", 3, 99).item() == pytest.approx((2 / 2 + 2 / 1) / 2)  # per-completion means
    assert rl.aggregate(tok, mask, "dr_grpo", 3, 99).item() == pytest.approx(4 / (2 * 3))  # constant
    assert rl.aggregate(tok, mask, "dapo", 3, 8).item() == pytest.approx(4 / 8)  # the step's tokens
    with pytest.raises(ValueError, match="loss_type"):
        rl.aggregate(tok, mask, "mean", 3, 8)


def test_events_record_what_was_reinforced(tmp_path):
    from shardlib.tasks import ContextualBandit

    rl.train(bandit(tmp_path, "b", steps=2, loss_type="grpo"), progress=False)
    ev = open_store(tmp_path / "b/updates/events")
    best = ContextualBandit().best_arm.numpy()
    hit = ev["action"].values == best[ev["task"].values]
    assert np.array_equal(hit, ev["reward_hit"].values > 0)  # the arm taken explains the reward
    assert len(np.unique(ev["completion_hash"].values)) == len(np.unique(ev["action"].values))  # one hash per arm


def test_lm_stage_collects_factored_events_equal_to_its_dense_twin(tmp_path, tiny_lm_dir):
    from shardlib.updates import densify, factor_pairs

    stores = {}
    for factored in (False, True):
        p = rl.RLParams.from_dict(
            dict(
                out_dir=str(tmp_path / f"lm{factored}"),
                testbed="lm",
                init_path=tiny_lm_dir,
                steps=2,
                prompts_per_step=4,
                group_size=2,
                grad_accum=2,
                eval_prompts=8,
                device="cpu",
                collect_params=["*.mlp.down_proj.weight", "*.mlp.up_proj.weight"],
                collect_factored=factored,
            )
        )
        rl.train(p, progress=False)
        stores[factored] = open_store(tmp_path / f"lm{factored}/updates/events")
    dense, fac = stores[False], stores[True]
    assert len(factor_pairs(fac)) == len(dense.data_vars) == 4  # two layers x two matrices
    back = densify(fac)
    for v in dense.data_vars:
        np.testing.assert_allclose(back[v].values, dense[v].values, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="collect_factored"):
        rl.RLParams.from_dict({"collect_factored": True, "convention": "adam"})
