"""shardlib.fit: one SAE fit on events in memory (no store), its parameters, resume and held-out split."""

import dataclasses

import numpy as np
import pytest
import torch

from shardlib.config import ConfigError
from shardlib.fit import FitParams, encode_all, evaluate, fit, split_events
from shardlib.planted import planted_updates
from shardlib.shards import ShardParams

SHAPES = {"layer.w": (6, 5), "layer.b": (6,)}


def data(n=64, seed=0):
    updates, truth, _, _ = planted_updates(SHAPES, n_shards=3, n_events=n, active_per_event=1.0, seed=seed, noise=0.01)
    return updates, truth


def params(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "out"), n_latents=6, k=2, signed=True, epochs=4, batch_size=16)
    return FitParams.from_dict({**base, "device": "cpu", "checkpoint_every": 2, **kw})


def test_fit_trains_on_events_in_memory_and_resumes_exactly(tmp_path):
    x, truth = data()
    full = fit(params(tmp_path, out_dir=str(tmp_path / "full")), x, progress=False)
    assert full.store is None and full.stopped_at is None and len(full.history) == 4
    assert len(full.heldout_idx) == round(0.1 * 64) and len(full.train_idx) + len(full.heldout_idx) == 64
    assert np.intersect1d(full.train_idx, full.heldout_idx).size == 0
    p = params(tmp_path, out_dir=str(tmp_path / "killed"))
    assert fit(p, x, progress=False, stop_after=3).stopped_at == 3  # the last checkpoint is at epoch 2
    resumed = fit(p, x, progress=False)
    for k, v in full.sae.state_dict().items():
        assert torch.equal(v, resumed.sae.state_dict()[k]), k
    assert full.history == resumed.history
    m = evaluate(full.sae, x, full.heldout_idx)
    assert 0 <= m["fvu"] < 1 and m["l0"] <= 2
    idx, val, z = encode_all(full.sae, x)
    assert z.shape == (64, 6) and idx.shape == val.shape and (np.abs(val) > 0).sum(1).max() <= 2


def test_the_final_resume_point_holds_no_optimizer_and_a_fit_killed_after_it_trains_no_further(tmp_path):
    from shardlib.io import OPTIMIZER_FILE, CheckpointError

    x, _ = data()
    p = params(tmp_path)
    full = fit(p, x, progress=False)
    ckpt = tmp_path / "out" / "checkpoint"
    assert (ckpt / "sae").is_dir() and not (ckpt / OPTIMIZER_FILE).exists()  # Adam's moments: no step reads them
    again = fit(p, x, progress=False)  # (killed while writing the outputs) resumes at the end: no step is taken
    assert again.history == full.history
    for k, v in full.sae.state_dict().items():
        assert torch.equal(v, again.sae.state_dict()[k]), k
    killed = params(tmp_path, out_dir=str(tmp_path / "killed"))
    fit(killed, x, progress=False, stop_after=2)
    (tmp_path / "killed" / "checkpoint" / OPTIMIZER_FILE).unlink()  # a mid-training point must hold Adam's state
    with pytest.raises(CheckpointError, match="lacks optimizer.pt .training stopped at epoch 2 of 4.; delete"):
        fit(killed, x, progress=False)


def test_the_split_depends_only_on_the_seed():
    a, b = split_events(50, 0.2, seed=3), split_events(50, 0.2, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and len(a[1]) == 10
    assert not np.array_equal(split_events(50, 0.2, seed=4)[1], a[1])


def test_the_time_split_holds_out_the_last_events_whatever_the_seed(tmp_path):
    train, held = split_events(50, 0.2, seed=3, how="last")
    assert held.tolist() == list(range(40, 50)) and train.tolist() == list(range(40))
    assert np.array_equal(split_events(50, 0.2, seed=4, how="last")[1], held)
    with pytest.raises(ValueError, match="holdout 'first'"):
        split_events(50, 0.2, seed=3, how="first")
    with pytest.raises(ValueError, match="parameter 'holdout'"):
        FitParams.from_dict({"out_dir": str(tmp_path), "holdout": "first"})
    # a fit holds out what the split says
    x = {"w": torch.randn(20, 3, 4)}
    r = fit(
        FitParams(out_dir=str(tmp_path / "f"), n_latents=4, k=1, epochs=1, holdout_frac=0.25, holdout="last"),
        x,
        progress=False,
    )
    assert r.heldout_idx.tolist() == list(range(15, 20))


def test_fit_parameters_are_the_shard_stages_without_the_store(tmp_path):
    fit_names = {f.name for f in dataclasses.fields(FitParams)}
    shard_names = {f.name for f in dataclasses.fields(ShardParams)}
    stage_only = {"store_path", "params", "skip_zero_updates", "normalize", "online_shards_path", "eval_batch_size"}
    assert shard_names - fit_names == stage_only  # where the events come from, and how the stage encodes them
    assert issubclass(ShardParams, FitParams)
    with pytest.raises(ConfigError, match="store_path"):  # no placeholder store for events in memory
        FitParams.from_dict({"store_path": "planted"})
    with pytest.raises(ValueError, match="'k': 7 exceeds n_latents=6"):
        params(tmp_path, k=7)
    with pytest.raises(ValueError, match="store_path"):  # the stage names its missing store first
        ShardParams.from_dict({"k": 7, "n_latents": 6})


def test_fewer_than_two_events_is_an_error(tmp_path):
    x, _ = data(n=1)
    with pytest.raises(ValueError, match="1 event"):
        fit(params(tmp_path), x, progress=False)
