import numpy as np
import pytest
import torch
from torch import nn

from shardlib import analysis, metrics


def test_auroc_reference_values():
    assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert metrics.auroc(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 1])) == 0.5
    assert metrics.auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0


def test_alignment_separates_structure_from_baselines():
    rng = np.random.default_rng(1)
    T, D = 3, 40
    means = rng.normal(size=(T, D))
    types = rng.integers(0, T, 900)
    updates = means[types] + 0.05 * rng.normal(size=(900, D))
    codes = np.eye(T)[types] * 2.0
    dirs = means / np.linalg.norm(means, axis=1, keepdims=True)
    rand = rng.normal(size=(T, D))
    a = analysis.alignment(codes, types, updates, dirs, rand, k=1)
    assert (
        a["purity"] == 1.0 and a["auroc"] == 1.0 and a["nmi"] == pytest.approx(1.0) and a["ari"] == pytest.approx(1.0)
    )
    assert a["type_match"] > 0.99 and a["types_matched"] == a["n_types"] == 3
    assert a["auroc_shuffled"] < 0.6 and abs(a["ari_shuffled"]) < 0.02 and a["nmi_shuffled"] < 0.02
    assert a["type_match_random"] < 0.6 and a["types_matched_random"] == 0 and a["purity_shuffled"] < 0.5
    assert a["ari_random"] < a["ari"]  # random projections find some of the clusters the data has, not all


def test_random_dictionary_has_the_sae_structure():
    d = analysis.random_dictionary({"w": (6, 5), "b": (6,)}, 4, rank=1)
    norm = torch.sqrt((d["w"] ** 2).sum((1, 2)) + (d["b"] ** 2).sum(1))
    assert torch.allclose(norm, torch.ones(4))
    assert all(torch.linalg.matrix_rank(d["w"][i]) == 1 for i in range(4))


def test_a_zero_shard_changes_nothing_and_ablation_removes_the_component():
    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    m = analysis.add_direction(base, {"weight": torch.zeros(2, 3)}, 10.0)
    assert torch.equal(m(x), base(x))
    d = {"weight": torch.zeros(2, 3)}
    d["weight"][0, 0] = 1.0
    delta = {"weight": torch.full((2, 3), 0.5)}
    final = analysis.add_direction(base, delta, 1.0)
    ablated, c = analysis.project_out(final, d, delta)
    assert c == pytest.approx(0.5)
    assert ablated.weight[0, 0].item() == pytest.approx(base.weight[0, 0].item(), abs=1e-6)
    assert ablated.weight[1, 1].item() == pytest.approx(final.weight[1, 1].item())


def test_specificity():
    s = analysis.specificity(np.array([[0.0, 1.0, 0.0], [1.0, 1.0, -1.0], [0.0, 0.0, 0.0]]))
    assert s[0] == 1.0 and s[1] == pytest.approx(1 / 3) and np.isnan(s[2])


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
    for m in analysis.ALIGNMENT_METRICS:
        assert {m, f"{m}_shuffled", f"{m}_random", f"setting_{m}"} <= set(ds.data_vars)
    assert ds.n_types.values.tolist() == [3] and sorted(ds.event_type.values) == ["0", "1", "2"]
    assert not {"add_effect", "ablate_effect", "specificity", "online_type_match"} & set(ds.data_vars)
    assert "not run: rl_dir is empty" in ds.attrs["interventions"]
    assert "Interventions (adding or ablating shards): not run: rl_dir is empty" in finding("analysis", ds)
    with pytest.raises(KeyError, match="event_type_label 'nope'"):
        analysis.analyse(p.replace(event_type_label="nope"), progress=False)
