"""shardlib.collector: per-event and per-step updates from a PyTorch loop (dense and factored), the
conventions, parameter selection and event grouping."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from shardlib import policy as pol
from shardlib.collector import UpdateCollector, group_events, select_params
from shardlib.factored import densify, factor_pairs
from shardlib.rl import RLParams, train
from shardlib.store import UpdateStore, open_store, update_vars


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def per_event_losses(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_selection_by_glob_and_empty_selection_error():
    m = mlp()
    assert list(select_params(m, "*.weight")) == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match="no parameter matches"):
        select_params(m, "*.mlp.*")


def test_non_linear_parameter_is_rejected_for_event_updates():
    m = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="belongs to a Embedding"):
        UpdateCollector(m, ["0.weight"], lr=0.1)
    UpdateCollector(m, ["0.weight"], lr=0.1, events=False)  # step updates work for any tensor


def test_hand_written_loop_event_updates_sum_to_step_and_match_per_sample_gradients(tmp_path):
    m = mlp()
    lr = 0.05
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    es = UpdateStore(tmp_path / "ev", "event", "sgd", "f")
    ss = UpdateStore(tmp_path / "st", "step", "step", "f")
    col = UpdateCollector(m, ["*"], lr=lr, event_store=es, step_store=ss)
    x, y = torch.randn(7, 6), torch.randint(3, (7,))
    with col.capture():
        loss = per_event_losses(m, x, y).sum()
        loss.backward()
    grads = col.event_gradients()
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n].sum(0), p.grad, atol=1e-6), n
        # reference: each event's gradient by its own backward pass
        ref = torch.autograd.grad(per_event_losses(m, x[2:3], y[2:3]).sum(), p)[0]
        assert torch.allclose(grads[n][2], ref, atol=1e-6), n
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    col.before_step()
    opt.step()
    ups = col.after_step(0, {"step": np.zeros(7, dtype=np.int64), "task": y.numpy()})
    col.flush()
    ev, st = open_store(tmp_path / "ev"), open_store(tmp_path / "st")
    assert ev.sizes["event"] == 7 and st.sizes["event"] == 1
    for n, p in m.named_parameters():
        total = torch.as_tensor(ev[n].values).sum(0)
        assert torch.allclose(total, p.detach() - before[n], atol=1e-6)  # SGD: sum of events = step
        assert torch.allclose(torch.as_tensor(st[n].values[0]), p.detach() - before[n], atol=1e-7)
        assert torch.allclose(ups[n], torch.as_tensor(ev[n].values))
    assert ev[update_vars(ev)[0]].attrs["param"] == "0.weight"
    assert ev.attrs["kind"] == "event" and ev.attrs["convention"] == "sgd"


class Block(nn.Module):
    """Two linear layers, optionally under activation checkpointing (reentrant or not)."""

    def __init__(self, reentrant=None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.reentrant = nn.Linear(6, 5), nn.Linear(5, 3), reentrant

    def body(self, x):
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x):
        if self.reentrant is None:
            return self.body(x)
        x = x.requires_grad_() if self.reentrant else x  # reentrant checkpoints need an input that requires grad
        return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [None, True, False], ids=["plain", "reentrant", "non_reentrant"])
def test_forwards_without_gradient_do_not_count(reentrant):
    """Generation-like no_grad forwards and the recompute of activation checkpointing inside one capture: only
    the forward whose output receives the gradient makes the (x, delta) pairs, and the events match plain
    per-sample gradients."""
    m = Block(reentrant)
    col = UpdateCollector(m, ["*.weight", "*.bias"], lr=1.0)
    x, y = torch.randn(7, 6), torch.randint(3, (7,))
    with col.capture():
        with torch.no_grad():
            m(x[:3])  # a "generation" pass, never differentiated
        per_event_losses(m, x, y).sum().backward()
    grads = col.event_gradients()
    ref = Block(None)
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n].sum(0), p.grad, atol=1e-6), n
        want = torch.autograd.grad(per_event_losses(ref, x[4:5], y[4:5]).sum(), dict(ref.named_parameters())[n])[0]
        assert torch.allclose(grads[n][4], want, atol=1e-6), n


def test_a_layer_reached_twice_or_never_is_a_clear_error():
    m = mlp()
    col = UpdateCollector(m, ["0.weight"], lr=1.0)
    x, y = torch.randn(4, 6), torch.randint(3, (4,))
    twice = r"layer 0 ran 2 forward\(s\).*2 of its outputs received a gradient"
    with pytest.raises(RuntimeError, match=twice), col.capture():
        (per_event_losses(m, x, y).sum() + per_event_losses(m, x, y).sum()).backward()
    with pytest.raises(RuntimeError, match=r"layer 0 ran 1 forward\(s\).*received no gradient"), col.capture():
        m(x)


def test_non_linear_patterns_are_named_with_what_can_be_collected():
    m = pol.tiny_lm(10, d_model=8, n_layers=2, n_heads=2, d_ff=16)
    with pytest.raises(ValueError) as e:
        UpdateCollector(m, ["*.weight"], lr=0.1)
    msg = str(e.value)
    assert "'model.embed_tokens.weight' (Embedding)" in msg and "'model.norm.weight' (LlamaRMSNorm)" in msg
    assert "'model.layers.*.mlp.down_proj.weight'" in msg


def test_adam_convention_preconditions_each_event():
    m = mlp()
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    col = UpdateCollector(m, ["2.weight"], lr=0.01, optimizer=opt, convention="adam")
    x, y = torch.randn(4, 6), torch.randint(3, (4,))
    with col.capture():
        per_event_losses(m, x, y).sum().backward()
    g = col.event_gradients()["2.weight"]
    opt.step()
    u = col.after_step(0)["2.weight"]
    v = opt.state[m[2].weight]["exp_avg_sq"] / (1 - 0.999)
    assert torch.allclose(u, -0.01 * g / (v.sqrt() + 1e-8), atol=1e-6)


def test_lm_event_gradients_sum_to_the_rl_step_gradient(tmp_path, tiny_lm_dir):
    """Inside the real GRPO step (token-level loss, several linear layers)."""
    from shardlib import rl
    from shardlib.tasks import SyntheticTasks

    model = pol.load_policy(tiny_lm_dir)
    tasks = SyntheticTasks()
    col = UpdateCollector(model, ["*.mlp.*.weight", "*.self_attn.q_proj.weight"], lr=1.0)
    g = torch.Generator().manual_seed(0)
    b = tasks.sample(3, g)
    prompt = b["prompt"].repeat_interleave(4, 0)
    comp, mask = pol.sample(model, prompt, tasks.max_new_tokens, g, vocab_size=tasks.vocab_size)
    adv = torch.randn(12)
    with col.capture():
        logp, _ = pol.logprobs(model, prompt, comp, tasks.vocab_size)
        tok, _ = rl.grpo_token_loss(logp, logp.detach(), adv, mask.float(), 0.2)
        (tok.sum() / mask.sum()).backward()
    grads = col.event_gradients()
    named = dict(model.named_parameters())
    for n, ge in grads.items():
        assert ge.shape == (12, *named[n].shape)
        assert torch.allclose(ge.sum(0), named[n].grad, atol=1e-5), n


def test_subsampling_and_half_precision_storage(tmp_path):
    p = RLParams.from_dict(
        dict(
            out_dir=str(tmp_path / "r"),
            testbed="bandit",
            steps=6,
            prompts_per_step=4,
            group_size=2,
            eval_prompts=8,
            device="cpu",
            collect_params=["net.2.*"],
            collect_every=3,
            store_dtype="bfloat16",
        )
    )
    train(p, progress=False)
    ev = open_store(tmp_path / "r/updates/events")
    assert sorted(set(ev["step"].values.tolist())) == [0, 3]
    w = ev["net.2.weight"].values
    assert np.array_equal(w, torch.tensor(w).bfloat16().float().numpy())  # values are exactly bf16
    assert json.loads(ev.attrs["task_names"]) == [f"cluster{k}" for k in range(4)]


def test_grouping_events_per_prompt_sums_updates_and_averages_rewards(tmp_path):

    ups = {"w": torch.arange(8.0).view(4, 2)}
    labels = {
        "group": np.array([5, 5, 7, 7]),
        "reward": np.array([1.0, 0.0, 1.0, 1.0], dtype=np.float32),
        "task": np.array([2, 2, 0, 0]),
    }
    out, lab = group_events(ups, labels)
    assert out["w"].tolist() == [[2.0, 4.0], [10.0, 12.0]]
    assert (
        lab["reward"].tolist() == [0.5, 1.0] and lab["task"].tolist() == [2, 0] and lab["n_events"].tolist() == [2, 2]
    )
    p = RLParams.from_dict(
        dict(
            out_dir=str(tmp_path / "g"),
            testbed="bandit",
            steps=2,
            prompts_per_step=4,
            group_size=3,
            eval_prompts=8,
            device="cpu",
            collect_params=["*"],
            group_events=True,
        )
    )
    train(p, progress=False)
    ev = open_store(tmp_path / "g/updates/events")
    assert ev.sizes["event"] == 2 * 4 and (ev["n_events"].values == 3).all()


def seq_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def seq_losses(model, x, y):  # x [E, T, 6]: one event = a sequence of T tokens
    return nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none").sum(1)


@pytest.mark.parametrize("max_rank", [None, 2])
def test_collector_writes_factored_events_that_densify_to_the_dense_events(tmp_path, max_rank):

    x, y = torch.randn(5, 4, 6), torch.randint(3, (5, 4))
    stores = {}
    for factored in (False, True):
        m = seq_mlp()
        es = UpdateStore(tmp_path / f"ev{factored}", "event", "sgd", "f")
        col = UpdateCollector(m, ["*"], lr=0.1, event_store=es, factored=factored, max_rank=max_rank)
        for step in range(2):  # two steps in one chunk
            with col.capture():
                seq_losses(m, x[:, : 3 + step], y[:, : 3 + step]).sum().backward()  # 3 then 4 tokens
            col.after_step(step, {"step": np.full(5, step)})
        col.flush()
        stores[factored] = open_store(tmp_path / f"ev{factored}")
    dense, fac = stores[False], stores[True]
    pairs = factor_pairs(fac)
    assert set(pairs) == {"0.weight", "2.weight"} and "0.bias" in update_vars(fac)  # vectors stay dense
    assert fac["0.weight__left"].dims == ("event", "0.weight_factor", "0.weight_dim0")
    back = densify(fac)
    for v in ("0.weight", "2.weight"):
        if max_rank is None:
            np.testing.assert_allclose(back[v].values, dense[v].values, rtol=1e-5, atol=1e-6)
        else:  # compressed: within the energy the label says was dropped
            kept = fac[v + "__kept"].values
            err = ((back[v].values - dense[v].values) ** 2).sum((1, 2)) / (dense[v].values ** 2).sum((1, 2))
            np.testing.assert_allclose(err, 1 - kept, atol=1e-4)
    np.testing.assert_allclose(densify(fac, slice(2, 4))["2.weight"].values, back["2.weight"].values[2:4])


def test_factored_collection_refuses_what_it_cannot_do():
    m = seq_mlp()
    opt = torch.optim.Adam(m.parameters())
    with pytest.raises(ValueError, match="convention='sgd'"):
        UpdateCollector(m, ["*"], lr=0.1, optimizer=opt, convention="adam", factored=True)
    with pytest.raises(ValueError, match="max_rank"):
        UpdateCollector(m, ["*"], lr=0.1, factored=True, max_rank=0)


def test_the_accessors_give_the_latest_capture_and_the_kept_fractions():
    m = seq_mlp()
    col = UpdateCollector(m, ["*.weight"], lr=0.1, factored=True, max_rank=2)
    with pytest.raises(RuntimeError, match="no capture since the last step"):
        col.last_event_gradients()
    assert col.kept_fractions() == {}
    x, y = torch.randn(6, 4, 6), torch.randint(3, (6, 4))
    for part in (slice(0, 2), slice(2, 6)):  # two micro-batches of one step
        with col.capture():
            seq_losses(m, x[part], y[part]).sum().backward()
    assert col.last_event_gradients()["0.weight"].n_events == 4
    kept = col.kept_fractions()
    assert set(kept) == {"0.weight__kept", "2.weight__kept"} and kept["0.weight__kept"].shape == (6,)
    ups = col.after_step(0)
    assert ups["0.weight"].n_events == 6 and col.kept_fractions() == {}
    with col.capture():
        seq_losses(m, x, y).sum().backward()
    grads = col.pop_event_gradients()
    assert grads["2.weight"].n_events == 6 and col.event_gradients() == {}


def test_factored_events_of_several_processes_are_refused_by_one_check():
    from shardlib.collector import NotGatheredError, check_gatherable

    check_gatherable(True, 1)
    check_gatherable(False, 4)
    with pytest.raises(ValueError, match=r"factored=True: factored events from 2 processes are not gathered yet"):
        check_gatherable(True, 2)
    m = seq_mlp()
    col = UpdateCollector(m, ["*.weight"], lr=0.1, factored=True)
    with col.capture():
        seq_losses(m, torch.randn(3, 4, 6), torch.randint(3, (3, 4))).sum().backward()
    with pytest.raises(NotImplementedError, match="from several processes are not gathered yet") as e:
        col.after_step(0, gather=lambda t: t)
    assert isinstance(e.value, NotGatheredError)


def test_step_rank_stores_each_steps_change_as_factors_with_its_kept_share(tmp_path):
    """``step_rank``: weight matrices' step updates as randomized factors (the kept label is what the factors
    keep of the parameters' actual change); vectors stay dense; events are not needed."""
    m = mlp()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    ss = UpdateStore(tmp_path / "st", "step", "step", "f")
    col = UpdateCollector(m, ["*"], lr=0.05, step_store=ss, events=False, step_rank=2)
    x, y = torch.randn(7, 6), torch.randint(3, (7,))
    changes = []
    for step in range(2):
        with col.capture():
            per_event_losses(m, x, y).sum().backward()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        col.before_step()
        opt.step()
        opt.zero_grad()
        col.after_step(step)
        changes.append({n: p.detach() - before[n] for n, p in m.named_parameters()})
    col.flush()
    st = open_store(tmp_path / "st")
    assert set(factor_pairs(st)) == {"0.weight", "2.weight"} and st.sizes["event"] == 2
    back = densify(st)
    for n in ("0.weight", "2.weight"):
        true = torch.stack([c[n] for c in changes]).numpy()
        err = ((back[n].values - true) ** 2).sum((1, 2)) / (true**2).sum((1, 2))
        np.testing.assert_allclose(err, 1 - st[n + "__kept"].values, atol=1e-4)
    assert (st["0.weight__kept"].values < 0.99).all()  # Adam's sign-like steps of a 5x6 matrix: not rank 2
    np.testing.assert_allclose(back["0.bias"].values[1], changes[1]["0.bias"].numpy(), atol=1e-7)
    with pytest.raises(ValueError, match="step_rank"):
        UpdateCollector(m, ["*"], lr=0.1, step_rank=0)
