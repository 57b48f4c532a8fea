import numpy as np
import pytest
import torch

from shardlib import alignment, analysis, metrics


def test_auroc_reference_values():
    assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert metrics.auroc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 1])) == 0.5
    assert metrics.auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0


def test_coherence_is_sign_free_in_rank1():
    rng = np.random.default_rng(0)
    axis = rng.normal(size=30)
    signed = np.array([s * axis + 0.01 * rng.normal(size=30) for s in rng.choice([-1, 1], 200)])
    types = np.zeros(200, int)
    assert metrics.coherence(signed, types)["0"] < 0.2  # + and - cancel in the mean
    assert metrics.coherence_rank1(signed, types)["0"] > 0.99  # one axis whatever the sign
    unrelated = rng.normal(size=(50, 400))
    assert metrics.coherence_rank1(unrelated, np.zeros(50, int))["0"] < 0.1


def test_analysis_without_an_rl_run_on_a_store_labelled_by_its_writer(tmp_path):
    """rl_dir = "" (a store written by another trainer): alignment with its baselines, on the event types a
    store label names (here ``kind``; the store has no ``task``), and no interventions nor online comparison."""
    from shardlib import shards
    from shardlib.findings import finding
    from shardlib.io import load_results
    from shardlib.planted import planted_updates
    from shardlib.updates import UpdateStore

    n = 64
    data, _, codes, _ = planted_updates({"w": (6, 5), "b": (6,)}, n_shards=3, n_events=n, active_per_event=1.0)
    kind, step = np.abs(codes.numpy()).argmax(1), np.arange(n) // 8
    st = UpdateStore(tmp_path / "store", "event", "sgd", "test")
    for s in np.unique(step):
        i = step == s
        labels = {"step": step[i], "kind": kind[i], "advantage": np.sign(codes.numpy().sum(1))[i]}
        st.append({k: v[torch.from_numpy(i)] for k, v in data.items()}, labels, int(s))
    st.flush()
    sp = dict(store_path=str(tmp_path / "store"), n_latents=4, k=1, rank=1, epochs=3, batch_size=16, device="cpu")
    shards.run(shards.ShardParams.from_dict({**sp, "out_dir": str(tmp_path / "shards")}), progress=False)

    p = analysis.AnalysisParams(
        out_dir=str(tmp_path / "analysis"),
        shards_dir=str(tmp_path / "shards"),
        rl_dir="",
        event_type_label="kind",
        extra_seeds=[],
        settings_k=[1],
        settings_normalize=[False],
    )
    analysis.run(p, progress=False)
    ds = load_results(tmp_path / "analysis" / "results.nc")
    for m in alignment.ALIGNMENT_METRICS:
        assert {m, f"setting_{m}", f"{m}_random_std"} | {f"{m}_{b}" for b in alignment.BASELINES} <= set(ds.data_vars)
    for m in alignment.ALIGNMENT_METRICS:  # the setting that is the shard stage's own SAE: its row, reused
        own = float(ds[f"setting_{m}"].sel(setting_k=1, setting_normalize=False))
        assert own == pytest.approx(float(ds[m].sel(sae_seed=0)), nan_ok=True)
    assert int(ds.n_events) + int(ds.n_zero_events) == n
    assert ds.n_types.values.tolist() == [3] and sorted(ds.event_type.values) == ["0", "1", "2"]
    assert not {"add_effect", "ablate_effect", "specificity", "online_type_match"} & set(ds.data_vars)
    assert "not run: rl_dir is empty" in ds.attrs["interventions"]
    assert "Interventions (adding or ablating shards): not run: rl_dir is empty" in finding("analysis", ds)
    with pytest.raises(KeyError, match="event_type_label 'nope'"):
        analysis.analyse(p.replace(event_type_label="nope"), progress=False)
