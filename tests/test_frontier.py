import json

import numpy as np
import pytest
import xarray as xr

from shardlib import frontier
from shardlib.io import load_results, save_results


def write_point(d, rank, k, fvu):
    m = {f"heldout_{key}": 0.0 for key in ("l0", "dead_fraction", "dense_fraction")}
    ds = xr.Dataset({**m, "heldout_fvu": fvu, "train_fvu": fvu / 2, "n_parameters": 10 * (rank + 1)})
    save_results(ds, d / "results.nc", {"rank": rank, "k": k})


def test_frontier_combines_sweeps_over_rank_and_k(tmp_path):
    for store, scale in (("events", 1.0), ("steps", 0.5)):
        for rank, k in ((1, 1), (1, 4), (0, 1)):
            d = tmp_path / store / f"rank={rank},k={k}"
            d.mkdir(parents=True)
            write_point(d, rank, k, scale / (k * (rank + 1)))
        (tmp_path / store / "unfinished").mkdir()  # no results.nc: skipped
    p = frontier.FrontierParams.from_dict(
        {
            "out_dir": str(tmp_path / "out"),
            "sweep_names": ["events", "steps"],
            "sweep_dirs": [str(tmp_path / "events"), str(tmp_path / "steps")],
        }
    )
    ds = frontier.run(p)
    assert ds["rank"].values.tolist() == [0, 1] and ds["k"].values.tolist() == [1, 4]
    assert float(ds.fvu.sel(store="steps", rank=1, k=4)) == 0.5 / 8
    assert float(ds.train_fvu.sel(store="steps", rank=1, k=4)) == 0.5 / 16  # each point's training FVU beside it
    assert np.isnan(float(ds.fvu.sel(store="events", rank=0, k=4)))  # not in the sweep
    saved = load_results(tmp_path / "out" / "results.nc")
    assert json.loads(saved.attrs["config"])["sweep_names"] == ["events", "steps"]


def test_a_sweep_reads_only_the_points_its_config_lists(tmp_path):
    """A former config's points left in the sweep folder (rank 4 here) are not read once the runner has written
    this config's sweep.json."""
    from pathlib import Path

    from shardlib.runner import Stage, write_sweep_manifests

    for rank, k in ((1, 1), (0, 1), (4, 16)):
        d = tmp_path / "fe" / f"rank={rank},k={k}"
        d.mkdir(parents=True)
        write_point(d, rank, k, 0.5)
    assert frontier.combine_sweep(tmp_path / "fe")["rank"].values.tolist() == [0, 1, 4]  # no manifest: all
    stages = [Stage(f"fe[rank={r},k=1]", Path("nb.ipynb"), {}, [], tmp_path / "fe" / f"rank={r},k=1") for r in (1, 0)]
    write_sweep_manifests(stages)
    assert json.loads((tmp_path / "fe" / "sweep.json").read_text())["points"] == ["rank=1,k=1", "rank=0,k=1"]
    ds = frontier.combine_sweep(tmp_path / "fe")
    assert ds["rank"].values.tolist() == [0, 1] and ds["k"].values.tolist() == [1]


def test_pca_reference_matches_an_explicit_pca_and_the_factored_route_the_dense_one():
    """The Gram-matrix PCA gives the held-out FVU of numpy's PCA on dense data (components of the centred training
    events, the training mean added back, FVU over the held-out variance around its own mean), and a factored
    store gives the same Gram matrix through its factors as made dense."""
    import torch

    from shardlib.factored import Factored
    from shardlib.fit import split_events
    from shardlib.metrics import fvu

    g = torch.Generator().manual_seed(0)
    n, F, do, di = 30, 2, 12, 10  # F^2 (do + di) < do di: the factors' route
    left, right = torch.randn(n, F, do, generator=g), torch.randn(n, F, di, generator=g)
    f = Factored(left, right)
    vec = torch.randn(n, 5, generator=g)
    dense = {"w": f.dense(), "b": vec}
    G = frontier.gram_matrix({"w": f, "b": vec})
    np.testing.assert_allclose(G, frontier.gram_matrix(dense), rtol=1e-5, atol=1e-4)
    X = np.concatenate([dense["w"].reshape(n, -1).numpy(), vec.numpy()], 1).astype(np.float64)
    train, held = split_events(n, 0.3, 0)
    mu = X[train].mean(0)
    _, sv, Vt = np.linalg.svd(X[train] - mu, full_matrices=False)
    Vt = Vt[sv > 1e-9 * sv[0]]  # the centred training events span 20 directions: a 21st would be arbitrary
    ks = [1, 3, 8, 40]
    got = frontier.pca_heldout_fvu(G, train, held, ks)
    for k, v in zip(ks, got):
        P = Vt[:k]
        xhat = mu + (X[held] - mu) @ P.T @ P
        assert v == pytest.approx(fvu(X[held], xhat), rel=1e-4)
    assert got[0] > got[1] > got[2] >= got[3] - 1e-12  # more components never reconstruct worse


def test_a_sweep_over_a_store_gets_its_pca_baseline_and_the_finding_weighs_the_sae_against_it(tmp_path):
    import torch

    from shardlib.findings import finding
    from shardlib.store import UpdateStore

    g = torch.Generator().manual_seed(1)
    store = UpdateStore(tmp_path / "store", "event", "sgd", "f")
    x = torch.randn(20, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank 2: PCA with 2 components is exact
    store.append({"w": x.reshape(20, 2, 3)}, {"step": np.zeros(20, dtype=np.int64)}, 0)
    store.flush()
    cfg = {"store_path": str(tmp_path / "store"), "params": [], "skip_zero_updates": True, "normalize": False}
    cfg |= {"holdout_frac": 0.25, "seed": 0}
    for k in (1, 2):
        d = tmp_path / "sweep" / f"rank=1,k={k}"
        d.mkdir(parents=True)
        m = {f"heldout_{key}": 0.0 for key in ("l0", "dead_fraction", "dense_fraction")}
        fvu = 0.6 - 0.1 * k  # the best SAE: k = 2
        save_results(
            xr.Dataset({**m, "heldout_fvu": fvu, "n_parameters": 10}), d / "results.nc", cfg | {"rank": 1, "k": k}
        )
    p = frontier.FrontierParams.from_dict(
        {"out_dir": str(tmp_path / "out"), "sweep_names": ["events"], "sweep_dirs": [str(tmp_path / "sweep")]}
    )
    ds = frontier.run(p)
    assert ds.pca_fvu.dims == ("store", "k") and float(ds.pca_fvu.sel(store="events", k=2)) < 1e-6
    assert 0 < float(ds.pca_fvu.sel(store="events", k=1)) < 1
    text = finding("frontier", ds)
    assert "PCA with 2 components 0.000" in text and "PCA's dense code of k numbers reconstructs better" in text


def test_pca_of_many_events_takes_the_lanczos_route_and_agrees_with_the_dense_one():
    from shardlib.fit import split_events

    rng = np.random.default_rng(0)
    X = rng.standard_normal((700, 40)) * np.linspace(3, 0.1, 40)  # more events than features, a decaying spectrum
    G = X @ X.T
    train, held = split_events(700, 0.2, 0)
    few = frontier.pca_heldout_fvu(G, train, held, [1, 4, 16])  # 4 * 16 < 560: Lanczos
    mu = X[train].mean(0)
    _, _, Vt = np.linalg.svd(X[train] - mu, full_matrices=False)
    for k, v in zip([1, 4, 16], few):
        r = (X[held] - mu) - (X[held] - mu) @ Vt[:k].T @ Vt[:k]
        assert v == pytest.approx((r**2).sum() / ((X[held] - X[held].mean(0)) ** 2).sum(), rel=1e-8)


def test_pca_reference_uses_the_shard_stages_events_and_refuses_what_it_cannot_match(tmp_path, monkeypatch):
    """Zero updates skipped and every update normalised as the shard stage does (against numpy's PCA on
    load_updates' own output); the dense route in blocks of events gives the same Gram matrix; no baseline (None)
    for sweeps whose points read different events, for a store that is gone, for under 2 held-out events; a sweep
    without a baseline beside one with it gets NaN."""
    import torch

    from shardlib.fit import split_events
    from shardlib.metrics import fvu
    from shardlib.shards import load_updates
    from shardlib.store import UpdateStore

    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 4, 5, generator=g) * torch.linspace(3, 0.1, 24)[:, None, None]
    x[5] = 0  # a zero update: left out by the shard stage, so by its baseline too
    store = UpdateStore(tmp_path / "store", "event", "sgd", "f")
    store.append({"w": x}, {"step": np.zeros(24, dtype=np.int64)}, 0)
    store.flush()
    cfg = {"store_path": str(tmp_path / "store"), "params": [], "skip_zero_updates": True, "normalize": True}
    cfg |= {"holdout_frac": 0.25, "seed": 3}
    data, _ = load_updates(cfg["store_path"], (), True, True)
    X = data["w"].reshape(23, -1).double().numpy()
    train, held = split_events(23, 0.25, 3)
    mu = X[train].mean(0)
    _, sv, Vt = np.linalg.svd(X[train] - mu, full_matrices=False)
    want = [fvu(X[held], mu + (X[held] - mu) @ Vt[:k].T @ Vt[:k]) for k in (1, 3)]
    np.testing.assert_allclose(frontier.pca_reference([cfg, cfg], [1, 3]), want, rtol=1e-5)
    full = frontier.gram_matrix(data)
    monkeypatch.setattr(frontier, "GRAM_BLOCK_BYTES", 4 * 20 * 5)  # 5 events a block
    np.testing.assert_allclose(frontier.gram_matrix(data), full, atol=1e-6)  # float32 products, unit updates
    assert frontier.pca_reference([cfg, cfg | {"normalize": False}], [1]) is None  # different events
    assert frontier.pca_reference([cfg | {"store_path": str(tmp_path / "gone")}], [1]) is None
    assert frontier.pca_reference([cfg | {"holdout_frac": 0.05}], [1]) is None  # one held-out event
    for name, c in (("a", cfg), ("b", {"rank": 1})):  # b: a sweep whose points read no store
        for k in (1, 3):
            d = tmp_path / name / f"rank=1,k={k}"
            d.mkdir(parents=True)
            m = {f"heldout_{key}": 0.0 for key in ("l0", "dead_fraction", "dense_fraction")}
            save_results(
                xr.Dataset({**m, "heldout_fvu": 0.9, "n_parameters": 1}), d / "results.nc", c | {"k": k, "rank": 1}
            )
    p = frontier.FrontierParams.from_dict(
        {
            "out_dir": str(tmp_path / "out"),
            "sweep_names": ["a", "b"],
            "sweep_dirs": [str(tmp_path / "a"), str(tmp_path / "b")],
        }
    )
    ds = frontier.run(p)
    np.testing.assert_allclose(ds.pca_fvu.sel(store="a").values, want, rtol=1e-5)
    assert ds.pca_fvu.sel(store="b").isnull().all()
