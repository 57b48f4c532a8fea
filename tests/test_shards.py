import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from shardlib import events, fit, shardfile, shards
from shardlib.common import flatten
from shardlib.io import load_results
from shardlib.planted import planted_updates
from shardlib.sae import SAEConfig, ShardSAE
from shardlib.trainer import TrainConfig
from shardlib.updates import StoreError, UpdateStore


def make_store(path, n=96, seed=0):
    shapes = {"layer.w": (6, 5), "layer.b": (6,)}
    data, truth, codes, _ = planted_updates(shapes, n_shards=3, n_events=n, active_per_event=1.0, seed=seed, noise=0.01)
    st = UpdateStore(path, "event", "sgd", "test", attrs={"task_names": json.dumps(["a", "b", "c"])})
    task = np.abs(codes.numpy()).argmax(1)
    step, adv = np.arange(n) // 8, np.sign(codes.numpy().sum(1))
    for s in np.unique(step):  # one append per step: a chunk's steps match its labels
        i = step == s
        st.append(
            {k: v[torch.from_numpy(i)] for k, v in data.items()},
            {"step": step[i], "task": task[i], "advantage": adv[i]},
            int(s),
        )
    st.flush()
    return data, truth


def params(tmp_path, **kw):
    base = dict(
        out_dir=str(tmp_path / "out"),
        store_path=str(tmp_path / "store"),
        n_latents=6,
        k=2,
        rank=1,
        signed=True,
        epochs=4,
        batch_size=16,
        device="cpu",
        checkpoint_every=2,
    )
    return shards.ShardParams.from_dict({**base, **kw})


def test_offline_training_writes_public_outputs(tmp_path):
    data, _ = make_store(tmp_path / "store")
    p = params(tmp_path)
    files = shards.run(p, progress=False).files
    assert not (Path(p.out_dir) / "checkpoint").exists()  # the resume point is removed once the outputs are written
    sh = load_results(files["shards"])
    dirs = shardfile.shard_directions(sh)
    assert set(dirs) == {"layer.w", "layer.b"} and dirs["layer.w"].shape == (6, 6, 5)
    total = np.sqrt(sum((v.reshape(6, -1) ** 2).sum(1) for v in dirs.values()))
    assert np.allclose(total, 1, atol=1e-5)  # unit norm over all tensors together
    assert sh["layer.w__U"].dims == ("shard", "layer.w_dim0", "rank")
    assert json.loads(sh.attrs["sae_config"])["rank"] == 1 and "git_commit" in sh.attrs
    acts = load_results(files["activations"])
    assert acts.sizes["event"] == 96 and set(acts["split"].values) == {"train", "heldout"}
    assert (acts["index"].values < 6).all() and "task" in acts.coords
    freq = (acts["index"].values[:, :, None] == np.arange(6)).any(1).mean(0)
    assert np.allclose(freq, sh["frequency"].values)
    m = load_results(files["results"])
    for key in ("fvu", "l0", "dead_fraction", "dense_fraction", "shrinkage", "shrinkage_weighted"):
        assert np.isfinite(float(m[f"heldout_{key}"])), key
    assert float(m.heldout_l0) <= 2
    table = shardfile.dense_codes(acts, 6).groupby(events.event_types(acts)).mean()
    assert table.shape[1] == 6 and all(lbl.split()[0] in "abc" for lbl in table.index)


def test_the_saved_sae_is_the_trained_one_whether_linked_from_the_final_checkpoint_or_written(tmp_path):
    make_store(tmp_path / "store")
    p = params(tmp_path, epochs=2)
    res = shards.train(p, progress=False)
    ckpt = Path(p.out_dir) / "checkpoint" / "sae" / "sae.safetensors"
    shards.save_sae(res.sae, Path(p.out_dir), p)  # the final checkpoint holds this SAE: sae/ links to its file
    assert (Path(p.out_dir) / "sae" / "sae.safetensors").stat().st_ino == ckpt.stat().st_ino
    other = p.replace(epochs=5)  # another fit's checkpoint: sae/ is written anew
    shards.save_sae(res.sae, Path(p.out_dir), other)
    assert (Path(p.out_dir) / "sae" / "sae.safetensors").stat().st_ino != ckpt.stat().st_ino
    saved = ShardSAE.load(Path(p.out_dir) / "sae")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in res.sae.state_dict().items())
    assert not (Path(p.out_dir) / "sae.tmp").exists()


def test_resume_is_exact(tmp_path):
    make_store(tmp_path / "store")
    full = shards.train(params(tmp_path, out_dir=str(tmp_path / "full")), progress=False)
    p = params(tmp_path, out_dir=str(tmp_path / "killed"))
    assert shards.train(p, progress=False, stop_after=3).stopped_at == 3  # last checkpoint at epoch 2
    resumed = shards.train(p, progress=False)
    for k, v in full.sae.state_dict().items():
        assert torch.equal(v, resumed.sae.state_dict()[k]), k
    assert full.history == resumed.history


def test_same_seed_same_shards(tmp_path):
    make_store(tmp_path / "store")
    a = shards.train(params(tmp_path, out_dir=str(tmp_path / "a")), progress=False).sae
    b = shards.train(params(tmp_path, out_dir=str(tmp_path / "b")), progress=False).sae
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_store_in_the_wrong_format_is_rejected_before_training(tmp_path):
    ds = xr.Dataset({"w": (("x", "event"), np.zeros((3, 4)), {"param": "w"})}, attrs={"kind": "event"})
    ds.to_netcdf(tmp_path / "bad.nc")
    with pytest.raises(StoreError, match="'w' has dims \\('x', 'event'\\)"):
        shards.train(params(tmp_path, store_path=str(tmp_path / "bad.nc")), progress=False)
    with pytest.raises(ValueError, match="store_path"):
        shards.ShardParams.from_dict({})


def test_zero_updates_are_skipped_and_indexed(tmp_path):
    st = UpdateStore(tmp_path / "store", "event", "sgd", "t")
    w = torch.randn(10, 3, 2)
    w[[1, 4]] = 0
    st.append({"w": w}, {"step": np.zeros(10, dtype=int)}, 0)
    st.flush()
    data, ds = shards.load_updates(tmp_path / "store", skip_zero=True)
    assert data["w"].shape[0] == 8 and ds["store_event"].values.tolist() == [0, 2, 3, 5, 6, 7, 8, 9]


def test_stage_parameters_give_the_nested_training_config():
    """The shard stage's flat parameters and the RL stage's ``online_*`` ones each build one TrainConfig; their
    defaults are TrainConfig's."""
    from shardlib.rl import RLParams

    p = shards.ShardParams.from_dict({"store_path": "s", "n_latents": 8, "k": 2, "rank": 2, "lr": 0.01, "seed": 4})
    cfg = p.sae_train_config()
    assert cfg.sae == SAEConfig(n_latents=8, k=2, rank=2) and cfg.lr == 0.01 and cfg.seed == 4
    assert shards.ShardParams.from_dict({"store_path": "s"}).sae_train_config() == TrainConfig()
    rp = RLParams.from_dict(
        {"online_n_latents": 8, "online_k": 2, "online_lr": 0.01, "online_batch_size": 16, "seed": 4}
    )
    assert rp.online_train_config() == TrainConfig(SAEConfig(n_latents=8, k=2), batch_size=16, lr=0.01, seed=4)
    assert RLParams.from_dict({}).online_train_config() == TrainConfig()


def test_online_trainer_learns_from_the_ring_buffer():
    from shardlib.updates import RingBuffer

    shapes = {"w": (6, 5)}
    data, truth, _, _ = planted_updates(shapes, n_shards=2, n_events=512, active_per_event=1.0, seed=1, noise=0.0)
    buf = RingBuffer(shapes, capacity=128)
    cfg = TrainConfig(SAEConfig(n_latents=4, k=1, signed=True), batch_size=32, lr=0.01)
    online = shards.OnlineTrainer(cfg, warmup=64, steps_per_rl_step=4)
    for step in range(0, 512, 16):
        buf.add({"w": data["w"][step : step + 16]}, {})
        online(step // 16, buf)
    assert online.trainer is not None and len(online.history) == 4 * (512 // 16 - 64 // 16 + 1)
    assert online.history[-1]["rec"] < online.history[0]["rec"]
    from shardlib.metrics import mmcs

    assert mmcs(flatten(truth), flatten(online.sae.directions()))[0] > 0.9


def test_two_process_training_matches_one_process(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU: gradients averaged over batch halves."""
    import os
    import subprocess
    import sys

    from shardlib.metrics import hungarian_mcc

    make_store(tmp_path / "store", n=128)
    args = [
        f"store_path={tmp_path / 'store'}",
        "device=cpu",
        "n_latents=6",
        "k=2",
        "signed=true",
        "epochs=3",
        "batch_size=32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "shardlib.launch",
            "shards",
            f"out_dir={tmp_path / 'two'}",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "processes=2 distributed_type=DistributedType.MULTI_CPU" in two.stdout
    one = subprocess.run(
        [sys.executable, "-m", "shardlib.launch", "shards", f"out_dir={tmp_path / 'one'}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = shardfile.shard_directions(load_results(tmp_path / "one" / "shards.nc"))
    b = shardfile.shard_directions(load_results(tmp_path / "two" / "shards.nc"))
    flat = lambda d: np.concatenate([d[k].reshape(6, -1) for k in sorted(d)], 1)
    assert hungarian_mcc(flat(a), flat(b)) > 0.999
    fa = float(load_results(tmp_path / "one" / "results.nc").heldout_fvu)
    fb = float(load_results(tmp_path / "two" / "results.nc").heldout_fvu)
    assert abs(fa - fb) < 1e-3


def factored_store(path, n=96, seed=0):
    from shardlib.planted import planted_factored

    data, truth, _ = planted_factored({"l.w": (8, 6), "l.u": (6, 8)}, n_shards=3, n_events=n, active=1, seed=seed)
    st = UpdateStore(path, "event", "sgd", "test")
    st.append(data, {"step": np.zeros(n, dtype=int)}, 0)
    st.flush()
    return data, truth


def test_a_factored_store_and_its_densified_twin_give_the_same_sae(tmp_path):
    """Trained on the factors (never dense) or on the dense twin, with the same seed: the same shards,
    codes and held-out metrics."""
    from shardlib.updates import Factored, densify, open_store

    factored_store(tmp_path / "store")
    densify(open_store(tmp_path / "store")).to_netcdf(tmp_path / "twin.nc")
    kw = dict(epochs=3, resample_dead=True, dead_window=32, aux_k=2)
    a = shards.train(params(tmp_path, out_dir=str(tmp_path / "a"), **kw), progress=False)
    b = shards.train(
        params(tmp_path, out_dir=str(tmp_path / "b"), store_path=str(tmp_path / "twin.nc"), b_pre_rank=1, **kw),
        progress=False,
    )
    assert isinstance(a.data["l.w"], Factored) and a.sae.b_pre_rank == 1 and b.sae.b_pre_rank == 1
    for n, d in b.sae.directions().items():
        assert torch.allclose(a.sae.directions()[n], d, atol=1e-4)
    za, zb = fit.encode_all(a.sae, a.data)[2], fit.encode_all(b.sae, b.data)[2]
    assert torch.allclose(za, zb, atol=1e-4)
    ea, eb = fit.evaluate(a.sae, a.data, a.heldout_idx), fit.evaluate(b.sae, b.data, b.heldout_idx)
    assert ea["fvu"] == pytest.approx(eb["fvu"], rel=1e-4) and ea["l0"] == eb["l0"]


def test_the_shard_stage_runs_on_a_factored_store(tmp_path):
    from shardlib.planted import factored_cosines

    _, truth = factored_store(tmp_path / "store", n=256)
    r = shards.run(params(tmp_path, n_latents=3, k=1, epochs=30), progress=False)
    assert float(r.results["heldout_fvu"]) < 0.2
    curve = r.results["curve_resampled"].values  # restarts per step, by epoch: recorded for every epoch
    assert curve.shape == (30,) and np.isfinite(curve).all() and (curve >= 0).all()
    assert factored_cosines(truth, r.files and shards.ShardSAE.load(tmp_path / "out" / "sae")).max(1).min() > 0.9


def test_the_shard_stage_records_the_restarts_of_each_epoch(tmp_path):
    """More latents than the events need and a short dead window: latents die and are restarted, and
    ``curve_resampled`` (restarts per step, each epoch's mean) says in which epochs."""
    factored_store(tmp_path / "store", n=64)
    kw = dict(n_latents=12, k=1, epochs=4, resample_dead=True, dead_window=8, restart_until=0.5)
    r = shards.run(params(tmp_path, **kw), progress=False)
    curve = r.results["curve_resampled"].values
    assert curve.shape == (4,) and curve[:2].sum() > 0 and (curve[2:] == 0).all()  # none after half the steps


def test_online_trainer_learns_from_a_factored_ring_buffer():
    from shardlib.planted import factored_cosines, planted_factored
    from shardlib.updates import Factored, RingBuffer

    shapes = {"w": (8, 6)}
    data, truth, _ = planted_factored(shapes, n_shards=2, n_events=512, active=1, seed=1, noise=0.0)
    buf = RingBuffer(shapes, capacity=128, factored=["w"])
    cfg = TrainConfig(SAEConfig(n_latents=4, k=1, signed=True), batch_size=32)
    online = shards.OnlineTrainer(cfg, warmup=64, steps_per_rl_step=4)
    for step in range(0, 512, 16):
        buf.add({"w": data["w"].take(slice(step, step + 16))}, {})
        online(step // 16, buf)
    assert isinstance(buf.data["w"], Factored) and buf.nbytes == 128 * data["w"].n_factors * (8 + 6) * 4
    assert online.sae.b_pre_rank == 1 and online.history[-1]["rec"] < online.history[0]["rec"]
    assert factored_cosines(truth, online.sae).max(1).min() > 0.9
