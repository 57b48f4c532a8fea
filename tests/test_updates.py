import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from shardlib import policy as pol
from shardlib.rl import RLParams, train
from shardlib.updates import (
    RingBuffer,
    StoreError,
    UpdateCollector,
    UpdateStore,
    open_store,
    select_params,
    update_norms,
    update_vars,
)


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


def _write(ds, path):
    ds.to_netcdf(path)
    return path


def good_store():
    ds = xr.Dataset(
        {"w": (("event", "w_dim0", "w_dim1"), np.random.default_rng(0).normal(size=(5, 3, 2)).astype("float32"))},
        coords={"step": ("event", np.arange(5)), "task": ("event", np.array([0, 1, 0, 1, 0]))},
        attrs={"kind": "event", "convention": "sgd"},
    )
    ds["w"].attrs["param"] = "layer.weight"
    return ds


def test_store_written_by_hand_roundtrips(tmp_path):
    ds = good_store()
    out = open_store(_write(ds, tmp_path / "mine.nc"))
    assert np.array_equal(out["w"].values, ds["w"].values)
    df = update_norms(out)
    assert np.allclose(df["norm"], np.sqrt((ds["w"].values ** 2).sum((1, 2))))


def test_lazy_open_for_large_stores(tmp_path):
    out = open_store(_write(good_store(), tmp_path / "s.nc"), lazy_above_bytes=0)
    assert hasattr(out["w"].data, "chunks")


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda ds: ds.assign(w=ds["w"].assign_attrs(param=None).drop_attrs()), "no parameter variable"),
        (
            lambda ds: ds.assign(w=ds["w"].transpose("w_dim0", "event", "w_dim1")),
            "'w' has dims .* the first must be 'event'",
        ),
        (lambda ds: ds.assign(w=ds["w"].where(ds.step != 2, np.nan)), "'w' holds NaN or Inf"),
        (
            lambda ds: ds.assign_coords(reward=("label", np.arange(4.0))),
            "label 'reward' has dims \\('label',\\) \\(4 values\\) but the store has 5 events",
        ),
        (lambda ds: ds.drop_attrs(deep=False), "attribute 'kind'"),
    ],
)
def test_malformed_stores_are_rejected_naming_the_problem(tmp_path, breakage, message):
    bad = breakage(good_store())
    with pytest.raises(StoreError, match=message):
        open_store(_write(bad, tmp_path / "bad.nc"))


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")


def test_crash_mid_write_leaves_a_readable_store(tmp_path):
    s = UpdateStore(tmp_path / "st", "event", "sgd", "f")
    s.append({"w": torch.ones(2, 3)}, {"step": np.array([0, 0])}, 0)
    s.flush()
    s.append({"w": torch.ones(2, 3)}, {"step": np.array([1, 1])}, 1)

    class Boom(Exception):
        pass

    def explode(self, ds, first, last):  # the process dies while writing the second chunk
        from shardlib.io import atomic_write

        def half(tmp):
            Path(tmp).write_bytes(b"CDF\x01 half a file")
            raise Boom

        atomic_write(self.path / f"chunk-{first:08d}-{last:08d}.nc", half)

    orig = UpdateStore._write
    UpdateStore._write = explode
    try:
        with pytest.raises(Boom):
            s.flush()
    finally:
        UpdateStore._write = orig
    (tmp_path / "st" / "chunk-00000001-00000001.nc.x.tmp").write_bytes(b"garbage")  # a tmp file a SIGKILL left
    ds = open_store(tmp_path / "st")
    assert ds.sizes["event"] == 2 and ds["step"].values.tolist() == [0, 0]


def test_truncate_drops_events_from_resume_point(tmp_path):
    s = UpdateStore(tmp_path / "st", "event", "sgd", "f")
    for step in range(4):
        s.append({"w": torch.full((2, 1), float(step))}, {"step": np.array([step, step])}, step)
    s.flush()  # one chunk covering steps 0..3
    s.truncate_from(2)
    ds = open_store(tmp_path / "st")
    assert ds["step"].values.tolist() == [0, 0, 1, 1]


def test_another_runs_store_is_never_overwritten(tmp_path):
    UpdateStore(tmp_path / "st", "event", "sgd", "run-a")
    with pytest.raises(StoreError, match="another run"):
        UpdateStore(tmp_path / "st", "event", "sgd", "run-b")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        UpdateStore(tmp_path / "other", "event", "sgd", "run-a")


def test_ring_buffer_keeps_the_most_recent_and_bounds_memory():
    b = RingBuffer({"w": (2,)}, capacity=5)
    for i in range(3):
        b.add({"w": torch.full((3, 2), float(i))}, {"step": np.full(3, i)})
    assert b.size == 5 and b.total_added == 9 and b.nbytes == 5 * 2 * 4
    assert sorted(b.labels["step"].tolist()) == [1, 1, 2, 2, 2]
    s = b.sample(100, torch.Generator().manual_seed(0))["w"]
    assert set(s[:, 0].tolist()) <= {1.0, 2.0}


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
    from shardlib.updates import group_events

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


def test_ring_buffer_save_and_load_round_trip(tmp_path):
    from shardlib.updates import RingBuffer

    buf = RingBuffer({"w": (2, 3)}, capacity=4)
    buf.add({"w": torch.arange(30, dtype=torch.float32).view(5, 2, 3)}, {"task": np.arange(5)})  # wraps around
    buf.save(tmp_path / "b")
    other = RingBuffer({"w": (2, 3)}, capacity=4)
    other.load(tmp_path / "b")
    assert torch.equal(other.data["w"], buf.data["w"]) and (other.labels["task"] == buf.labels["task"]).all()
    assert (other.size, other.cursor, other.total_added) == (4, 1, 5)
    # five events into four slots: the last four stay, the newest where the cursor left off
    assert other.data["w"][:, 0, 0].tolist() == [24.0, 6.0, 12.0, 18.0] and other.labels["task"].tolist() == [
        4,
        1,
        2,
        3,
    ]
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer({"w": (2, 3)}, capacity=8).load(tmp_path / "b")


def three_chunk_store(path, fingerprint="run-a", scale=1.0):
    """Steps 0-8, 4 events a step, one chunk per 3 steps (as an RL stage writes it)."""
    s = UpdateStore(path, "event", "sgd", fingerprint)
    for step in range(9):
        s.append({"w": torch.full((4, 2, 3), scale * (step + 1))}, {"step": np.full(4, step)}, step)
        if step % 3 == 2:
            s.flush()
    return path


def test_a_store_refuses_gaps_foreign_copied_and_changed_chunks(tmp_path):
    import shutil

    good = three_chunk_store(tmp_path / "good")
    assert open_store(good)["step"].values.tolist() == np.repeat(np.arange(9), 4).tolist()
    names = [f.name for f in sorted(good.glob("chunk-*.nc"))]
    assert names == ["chunk-00000000-00000002.nc", "chunk-00000003-00000005.nc", "chunk-00000006-00000008.nc"]
    other = three_chunk_store(tmp_path / "other", fingerprint="run-b", scale=-1.0)  # another seed's run

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(good, d)
        change(d)
        return d

    gap = broken("gap", lambda d: (d / names[1]).unlink())  # the deleted middle chunk
    with pytest.raises(
        StoreError, match=r"chunk-00000003-00000005.nc \(steps 3-5, 12 events\) is missing: the store has a gap"
    ):
        open_store(gap)
    appended = broken("appended", lambda d: shutil.copy(other / names[2], d / "chunk-00000009-00000011.nc"))
    with pytest.raises(StoreError, match="chunk-00000009-00000011.nc is not part of this store"):
        open_store(appended)
    copied = broken("copied", lambda d: shutil.copy(d / names[0], d / "chunk-00000000-00000002 (copy).nc"))
    with pytest.raises(StoreError, match=r"\(copy\).nc is not part of this store"):
        open_store(copied)
    swapped = broken("swapped", lambda d: shutil.copy(other / names[1], d / names[1]))
    with pytest.raises(StoreError, match="chunk-00000003-00000005.nc differs from the chunk the run wrote"):
        open_store(swapped)
    with pytest.raises(StoreError, match="comes from another run"):
        open_store(swapped, verify=False)  # without checksums, the chunk's fingerprint still tells

    def flip_a_byte(d):
        raw = bytearray((d / names[2]).read_bytes())
        raw[-200] ^= 0xFF
        (d / names[2]).write_bytes(bytes(raw))

    with pytest.raises(StoreError, match="chunk-00000006-00000008.nc differs"):
        open_store(broken("bitrot", flip_a_byte))


def test_hand_written_chunk_folders_are_checked_for_overlaps_and_step_labels(tmp_path):
    import shutil

    good = three_chunk_store(tmp_path / "good")
    d = tmp_path / "hand"
    d.mkdir()
    for f in good.glob("chunk-*.nc"):
        shutil.copy(f, d / f.name)
    assert open_store(d).sizes["event"] == 36  # no store.json: accepted, steps checked
    shutil.copy(d / "chunk-00000003-00000005.nc", d / "chunk-00000005-00000006.nc")
    with pytest.raises(StoreError, match="step labels run 3-5, outside the steps 5-6 its name promises"):
        open_store(d)
    (d / "chunk-00000005-00000006.nc").unlink()
    shutil.copy(d / "chunk-00000000-00000002.nc", d / "chunk-00000000-00000003.nc")  # an extra copy of steps 0-2
    with pytest.raises(StoreError, match=r"overlaps chunk-00000000-00000002.nc \(steps 0-2\)"):
        open_store(d)
    (d / "notes.nc").write_bytes(b"")
    with pytest.raises(StoreError, match=r"\['notes.nc'\] are not chunk files"):
        open_store(d)


def test_a_folder_without_store_json_refuses_two_files_holding_the_same_steps(tmp_path):
    import shutil

    good = three_chunk_store(tmp_path / "good")
    d = tmp_path / "plain"  # a store folder by hand: plain file names, no store.json
    d.mkdir()
    for i, f in enumerate(sorted(good.glob("chunk-*.nc"))):
        shutil.copy(f, d / f"part{i}.nc")
    assert open_store(d).sizes["event"] == 36
    shutil.copy(d / "part1.nc", d / "steps_3_to_5.nc")  # the copy under a plain new name: steps 3-5 twice
    with pytest.raises(StoreError, match=r"steps_3_to_5.nc and part1.nc in .* both hold events of step 3"):
        open_store(d)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda e: e.pop("sha256"), r"lacks or mistypes \['sha256'\]"),
        (lambda e: e.update(events="12"), r"lacks or mistypes \['events'\]"),
        (lambda e: e.clear(), r"lacks or mistypes \['first', 'last', 'events', 'sha256'\]"),
    ],
)
def test_a_store_json_entry_without_its_fields_is_a_store_error(tmp_path, edit, message):
    d = three_chunk_store(tmp_path / "st")
    meta = json.loads((d / "store.json").read_text())
    edit(meta["chunks"]["chunk-00000003-00000005.nc"])
    (d / "store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"store.json: the entry of chunk 'chunk-00000003-00000005.nc' " + message):
        open_store(d)
    with pytest.raises(StoreError, match=message):  # resuming the store too
        UpdateStore(d, "event", "sgd", "run-a")


def test_a_store_json_without_a_chunk_mapping_is_a_store_error(tmp_path):
    d = three_chunk_store(tmp_path / "st")
    meta = json.loads((d / "store.json").read_text())
    (d / "store.json").write_text(json.dumps({**meta, "chunks": sorted(meta["chunks"])}))  # a list, not a mapping
    with pytest.raises(StoreError, match="holds no chunk list"):
        open_store(d)
    with pytest.raises(StoreError, match="no chunk list"):
        UpdateStore(d, "event", "sgd", "run-a")


def test_resuming_a_store_drops_unlisted_chunks_and_stale_tmp_files(tmp_path):
    d = three_chunk_store(tmp_path / "st")
    (d / "chunk-00000009-00000009.nc.abc.tmp").write_bytes(b"half")  # a kill during a chunk write
    import shutil

    shutil.copy(d / "chunk-00000006-00000008.nc", d / "chunk-00000009-00000011.nc")  # written, not yet listed
    s = UpdateStore(d, "event", "sgd", "run-a")
    assert not list(d.glob("*.tmp"))
    s.truncate_from(7)  # resume at step 7
    assert open_store(d)["step"].values.tolist() == np.repeat(np.arange(7), 4).tolist()
    assert json.loads((d / "store.json").read_text())["chunks"]["chunk-00000006-00000006.nc"]["events"] == 4


def test_a_kill_while_writing_the_first_store_json_does_not_block_the_store(tmp_path):
    d = tmp_path / "st"
    d.mkdir()
    (d / "store.json.abc123.tmp").write_text("{half")  # what the kill left
    s = UpdateStore(d, "event", "sgd", "f")
    s.append({"w": torch.ones(2, 3)}, {"step": np.array([0, 0])}, 0)
    s.flush()
    assert open_store(d).sizes["event"] == 2 and not list(d.glob("*.tmp"))


# ---------------------------------------------------------------------------
# factored event updates


def seq_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def seq_losses(model, x, y):  # x [E, T, 6]: one event = a sequence of T tokens
    return nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none").sum(1)


def test_factorize_exact_and_compressed_match_the_dense_update():
    from shardlib.updates import factorize

    g = torch.Generator().manual_seed(0)
    d, x = (
        torch.randn(4, 7, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 7, 6, generator=g, dtype=torch.float64),
    )
    dense = torch.einsum("eto,eti->eoi", d, x)
    f, kept = factorize(d, x)
    assert torch.allclose(f.dense(), dense.float(), rtol=1e-5, atol=1e-5) and (kept == 1).all()
    assert torch.allclose(f.sq_norms(), (dense.float() ** 2).sum((1, 2)), rtol=1e-5)
    c, kept = factorize(d, x, max_rank=5)  # rank(U_e) <= min(5, 6, 7) = 5: exact
    assert c.left.shape == (4, 5, 5) and torch.allclose(c.dense(), dense.float(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(kept, torch.ones(4), atol=1e-5)
    c2, kept2 = factorize(d, x, max_rank=2)
    sv = torch.linalg.svdvals(dense)
    best = (sv[:, :2] ** 2).sum(1) / (sv**2).sum(1)  # Eckart-Young: the best rank-2 keeps this share
    assert torch.allclose(kept2.double(), best, rtol=1e-4)
    err = ((c2.dense().double() - dense) ** 2).sum((1, 2)) / (dense**2).sum((1, 2))
    assert torch.allclose(err, 1 - best, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("max_rank", [None, 2])
def test_collector_writes_factored_events_that_densify_to_the_dense_events(tmp_path, max_rank):
    from shardlib.updates import densify, factor_pairs

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


def test_factored_chunks_with_different_factor_counts_open_as_one_store(tmp_path):
    from shardlib.updates import Factored, densify

    es = UpdateStore(tmp_path / "ev", "event", "sgd", "f")
    g = torch.Generator().manual_seed(0)
    parts = []
    for step, m in enumerate((2, 5)):
        f = Factored(torch.randn(3, m, 4, generator=g), torch.randn(3, m, 6, generator=g))
        parts.append(f.dense())
        es.append({"w": f}, {"step": np.full(3, step)}, step)
        es.flush()  # one chunk per step
    ds = open_store(tmp_path / "ev")
    assert ds.sizes["w_factor"] == 5 and ds.sizes["event"] == 6
    np.testing.assert_allclose(densify(ds)["w"].values, torch.cat(parts).numpy(), rtol=1e-5, atol=1e-6)


def _factored_ds(L, R, **attrs):
    return xr.Dataset(
        {
            "w__left": (("event", "w_factor", "w_dim0"), L, {"param": attrs.get("pl", "w")}),
            "w__right": (("event", "w_factor", "w_dim1"), R, {"param": attrs.get("pr", "w")}),
        },
        coords={"step": ("event", np.zeros(len(L), int))},
        attrs={"kind": "event", "convention": "sgd"},
    )


def test_malformed_factored_stores_are_rejected_naming_the_problem(tmp_path):
    L, R = np.random.randn(4, 3, 5), np.random.randn(4, 3, 6)
    good = _factored_ds(L, R)
    good.to_netcdf(tmp_path / "good.nc")
    assert open_store(tmp_path / "good.nc").sizes["event"] == 4
    Ln = L.copy()
    Ln[1, 0, 0] = np.nan
    Lp = L.copy()
    Lp[2, 2] = 0  # a padding row on the left only
    cases = {
        "nan": (_factored_ds(Ln, R), "NaN or Inf"),
        "pad": (_factored_ds(Lp, R), "one side only"),
        "param": (_factored_ds(L, R, pr="v"), "same 'param'"),
        "orphan": (_factored_ds(L, R).drop_vars("w__right"), "matching"),
        "shape": (
            _factored_ds(L, R)
            .drop_vars("w__right")
            .assign(w__right=(("event", "other", "w_dim1"), np.random.randn(4, 2, 6), {"param": "w"})),
            "expected",
        ),
        "both": (_factored_ds(L, R).assign(w=(("event", "a", "b"), np.zeros((4, 5, 6)), {"param": "w"})), "both"),
    }
    for name, (ds, msg) in cases.items():
        ds.to_netcdf(tmp_path / f"{name}.nc")
        with pytest.raises(StoreError, match=msg):
            open_store(tmp_path / f"{name}.nc")


def test_factored_collection_refuses_what_it_cannot_do():
    m = seq_mlp()
    opt = torch.optim.Adam(m.parameters())
    with pytest.raises(ValueError, match="convention='sgd'"):
        UpdateCollector(m, ["*"], lr=0.1, optimizer=opt, convention="adam", factored=True)
    with pytest.raises(ValueError, match="max_rank"):
        UpdateCollector(m, ["*"], lr=0.1, factored=True, max_rank=0)


def test_factored_store_trains_the_shard_sae_and_reports_norms_like_its_dense_twin(tmp_path):
    from shardlib.sae import dense
    from shardlib.shards import load_updates
    from shardlib.updates import Factored, densify

    g = torch.Generator().manual_seed(0)
    f = Factored(torch.randn(8, 3, 4, generator=g), torch.randn(8, 3, 6, generator=g))
    es = UpdateStore(tmp_path / "ev", "event", "sgd", "f")
    es.append({"w": f, "b": torch.randn(8, 4, generator=g)}, {"step": np.zeros(8, int)}, 0)
    es.flush()
    ds = open_store(tmp_path / "ev")
    densify(ds).to_netcdf(tmp_path / "twin.nc")
    a, _ = load_updates(tmp_path / "ev")
    b, _ = load_updates(tmp_path / "twin.nc")
    assert isinstance(a["w"], Factored) and not isinstance(b["w"], Factored)  # loaded factored: never densified
    assert set(a) == {"w", "b"} and all(torch.allclose(dense(a[n]), b[n], atol=1e-6) for n in a)
    np.testing.assert_allclose(
        update_norms(ds)["norm"], update_norms(open_store(tmp_path / "twin.nc"))["norm"], rtol=1e-5
    )
