import numpy as np
import pytest
import torch

from shardlib.common import flatten
from shardlib.planted import PlantedParams, model_shapes, planted_updates, run_control


def test_model_shapes_come_from_the_tiny_llama():
    s = model_shapes(16, 32, 1, ("mlp",))
    assert s == {
        "model.layers.0.mlp.gate_proj.weight": (32, 16),
        "model.layers.0.mlp.up_proj.weight": (32, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 32),
    }


def test_planted_truth_is_unit_sparse_low_rank_and_zipfian():
    shapes = {"a": (8, 6), "b": (6, 8), "c": (5, 5)}
    data, truth, codes, freq = planted_updates(
        shapes,
        n_shards=6,
        n_events=20000,
        active_per_event=2.0,
        rank=2,
        tensors_per_shard=2,
        zipf=1.0,
        noise=0.0,
        seed=0,
    )
    G = flatten(truth)
    assert np.allclose(np.linalg.norm(G, axis=1), 1, atol=1e-5)
    for j in range(6):
        touched = [n for n in shapes if truth[n][j].abs().sum() > 0]
        assert len(touched) == 2
        assert all(torch.linalg.matrix_rank(truth[n][j]) == 2 for n in touched)
    assert np.all(np.diff(freq) <= 0) and freq.sum() == pytest.approx(2.0)
    assert (codes != 0).sum(1).float().mean().item() == pytest.approx(2.0, abs=0.05)
    recon = codes @ torch.tensor(G)
    assert torch.allclose(torch.cat([data[n].reshape(20000, -1) for n in shapes], 1), recon.float(), atol=1e-5)


def test_control_runs_and_reports_every_metric(tmp_path):
    p = PlantedParams.from_dict(
        dict(
            out_dir=str(tmp_path),
            n_events=64,
            n_shards=3,
            n_latents=6,
            k=2,
            ranks=[1, 0],
            seeds=[0, 1],
            epochs=2,
            batch_size=32,
            d_model=16,
            d_ff=32,
            n_layers=1,
            device="cpu",
        )
    )
    ds, saes = run_control(p, progress=False)
    for v in ("mmcs_g2d", "mmcs_d2g", "r_at_0.9", "uniqueness", "hungarian_mcc", "fvu", "l0", "seed_stability"):
        assert v in ds and np.isfinite(ds[v].values).all(), v
    assert ds.sizes == {"rank": 2, "seed": 2, "truth": 3}
    assert ds.n_parameters.sel(rank=1, seed=0).item() < ds.n_parameters.sel(rank=0, seed=0).item()


def test_bad_planted_parameters():
    with pytest.raises(ValueError, match="tensors"):
        PlantedParams.from_dict({"tensors": ["conv"]})
    with pytest.raises(ValueError, match="ranks"):
        PlantedParams.from_dict({"ranks": [-1]})


def test_family_members_have_vectors_heavy_tails_and_exact_zipf_firing():
    from shardlib.planted import FAMILY, family_store

    shapes, (data, truth, codes, freq) = family_store("mixed_rank2", 3000, 0)
    assert any(len(s) == 1 for s in shapes.values())  # RMSNorm weight vectors
    active = (codes != 0).sum(1)
    assert (active == FAMILY["mixed_rank2"]["active"]).all()
    assert freq[0] > 3 * freq[-1]  # Zipf-weighted
    mags = codes[codes != 0].abs()
    assert mags.max() > 10 * mags.median()  # log-normal: heavy-tailed
    touched = [sum(bool(truth[n][j].abs().sum() > 0) for n in shapes) for j in range(24)]
    assert set(touched) <= {1, 2} and len(set(touched)) == 2
    for n, s in shapes.items():
        if len(s) == 2:
            assert all(torch.linalg.matrix_rank(truth[n][j]) in (0, 2) for j in range(24))


def test_family_fit_reports_recovery_per_member_kind_and_seed(tmp_path):
    from shardlib.planted import fit_family

    p = PlantedParams.from_dict(
        {"out_dir": str(tmp_path), "family": ["attn_heavy"], "family_events": 64, "family_seeds": [0], "device": "cpu"}
    )
    import shardlib.shards as sh

    orig = sh.ShardParams.from_dict.__func__
    sh.ShardParams.from_dict = classmethod(lambda cls, d: orig(cls, {**d, "epochs": 1}))
    try:
        ds = fit_family(p, progress=False)
    finally:
        sh.ShardParams.from_dict = classmethod(orig)
    assert ds.family_mmcs_g2d.sizes == {"member": 1, "sae": 2, "family_seed": 1}
    assert np.isfinite(ds.family_mmcs_g2d.values).all()
    n = ds.family_n_parameters.sel(member="attn_heavy", family_seed=0)
    D = ds.family_dims.sel(member="attn_heavy").item()  # b_pre
    assert n.sel(sae="relu").item() - D == 2 * (n.sel(sae="signed").item() - D)  # two latents per shard
    with pytest.raises(ValueError, match="family"):
        PlantedParams.from_dict({"family": ["nope"]})
