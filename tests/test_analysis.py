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
    rand = [rng.normal(size=(T, D)) for _ in range(5)]
    a = analysis.alignment(codes, types, updates, dirs, rand, k=1)
    assert (
        a["purity"] == 1.0 and a["auroc"] == 1.0 and a["nmi"] == pytest.approx(1.0) and a["ari"] == pytest.approx(1.0)
    )
    assert a["type_match"] > 0.99 and a["types_matched"] == a["n_types"] == 3
    assert a["auroc_shuffled"] < 0.6 and abs(a["ari_shuffled"]) < 0.02 and a["nmi_shuffled"] < 0.02
    assert a["type_match_random"] < 0.6 and a["types_matched_random"] == 0 and a["purity_shuffled"] < 0.5
    assert a["ari_random"] < a["ari"]  # random projections find some of the clusters the data has, not all
    assert a["ari_random_std"] > 0  # five random dictionaries: a spread, not one draw
    # well-separated clusters, one computation per event: the fitted baselines find them as well as the SAE
    assert a["types_matched_oracle"] == 3 and a["type_match_oracle"] == pytest.approx(1.0)
    assert a["nmi_kmeans"] > 0.95 and a["types_matched_kmeans"] == 3
    assert a["types_matched_events"] <= 3 and 0 <= a["nmi_pca"] <= 1


def test_coherence_is_sign_free_in_rank1():
    rng = np.random.default_rng(0)
    axis = rng.normal(size=30)
    signed = np.array([s * axis + 0.01 * rng.normal(size=30) for s in rng.choice([-1, 1], 200)])
    types = np.zeros(200, int)
    assert metrics.coherence(signed, types)["0"] < 0.2  # + and - cancel in the mean
    assert metrics.coherence_rank1(signed, types)["0"] > 0.99  # one axis whatever the sign
    unrelated = rng.normal(size=(50, 400))
    assert metrics.coherence_rank1(unrelated, np.zeros(50, int))["0"] < 0.1


def test_effect_scores_count_only_effects_above_the_noise_floor():
    floor = np.array([0.1, 0.1, 0.1])
    effect = np.array(
        [
            [[0.0, 0.05, 0.0], [0.0, 0.5, -0.2]],  # moves task 1 (alpha +), and task 2
            [[0.09, -0.09, 0.05], [0.0, 0.0, 0.0]],  # noise only: one prompt's worth would score 1.0 unfloored
        ]
    )
    sc = analysis.effect_scores(effect, floor)
    assert sc["moves"].tolist() == [1.0, 0.0] and sc["n_above"].tolist() == [2.0, 0.0]
    assert sc["top_task"].tolist() == [1, -1] and sc["best_alpha"][0] == 1
    assert sc["specificity"][0] == pytest.approx(0.5 / 0.7) and np.isnan(sc["specificity"][1])


def test_own_task_null_credits_no_task_every_direction_hits():
    own = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    top = np.zeros(8, int)  # task 0 is hit hardest by every shard
    null_mean, p95, p = analysis.own_task_null(own, top)
    assert null_mean == pytest.approx(0.25) and p > 0.3  # observed 0.25: no better than shuffled tasks
    assert np.isnan(analysis.own_task_null(own, -np.ones(8, int))[0])


def test_shard_sizes_and_span_directions():
    raw = np.array([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]])
    codes = np.array([[1.0], [0.0], [-1.0]])
    assert analysis.shard_sizes(raw, codes, np.array([[1.0, 0.0]])).tolist() == [5.0]
    r = analysis.span_directions(raw[:, :1], 3, seed=0)
    assert np.allclose(np.abs(r), 1.0)  # the span of events along one axis is that axis


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
        assert {m, f"setting_{m}", f"{m}_random_std"} | {f"{m}_{b}" for b in analysis.BASELINES} <= set(ds.data_vars)
    assert int(ds.n_events) + int(ds.n_zero_events) == n
    assert ds.n_types.values.tolist() == [3] and sorted(ds.event_type.values) == ["0", "1", "2"]
    assert not {"add_effect", "ablate_effect", "specificity", "online_type_match"} & set(ds.data_vars)
    assert "not run: rl_dir is empty" in ds.attrs["interventions"]
    assert "Interventions (adding or ablating shards): not run: rl_dir is empty" in finding("analysis", ds)
    with pytest.raises(KeyError, match="event_type_label 'nope'"):
        analysis.analyse(p.replace(event_type_label="nope"), progress=False)
