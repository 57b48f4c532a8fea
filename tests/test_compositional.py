import json

import numpy as np
import pytest
import torch

from shardlib import compositional as C
from shardlib import policy as pol
from shardlib.findings import finding
from shardlib.rl import RLParams, make_testbed
from shardlib.tasks import ContextualBandit


def planted(n=400, heads=2, per_head=3, dim=24, seed=0):
    """Events that each hold one orthogonal component per head, with a random sign and comparable size."""
    rng = np.random.default_rng(seed)
    G = np.linalg.qr(rng.standard_normal((dim, heads * per_head)))[0].T  # orthonormal components
    comp = np.stack([h * per_head + rng.integers(per_head, size=n) for h in range(heads)], 1)
    sign = rng.choice([-1.0, 1.0], size=n)
    X = sign[:, None] * sum(rng.uniform(0.7, 1.3, size=(n, 1)) * G[comp[:, h]] for h in range(heads))
    truth = np.zeros((n, heads * per_head), dtype=bool)
    truth[np.arange(n)[:, None], comp] = True
    return X, truth, sign, G


def test_micro_f1_counts_every_event_and_computation():
    truth = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    assert C.multilabel_scores(truth, truth) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    pred = np.array([[1, 0, 0], [1, 1, 1]], dtype=bool)  # TP 3, FP 1, FN 1
    s = C.multilabel_scores(pred, truth)
    assert s["precision"] == 0.75 and s["recall"] == 0.75 and s["f1"] == pytest.approx(0.75)


def test_unit_labels_take_the_computations_on_most_of_a_units_events():
    units = np.array([[1, 0], [1, 0], [1, 0], [0, 0]], dtype=bool)
    truth = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    labels = C.unit_labels(units, truth, 0.5)
    assert labels.tolist() == [[True, True, False], [False, False, False]]  # 3/3 and 2/3; unit 1 never fires
    assert C.predicted_sets(units, labels)[:, 0].tolist() == [True, True, True, False]


def test_signed_units_and_topk_encoding():
    codes = np.array([[0.5, 0.0, -2.0]])
    assert C.code_units(codes).tolist() == [[True, False, False, False, False, True]]
    assert C.code_units(codes, signed=False).tolist() == [[True, False, True]]
    D = np.eye(3)
    assert C.topk_units(np.array([[0.1, -3.0, 2.0]]), D, 2).tolist() == [[False, False, False, True, True, False]]


def test_a_perfect_dictionary_gives_f1_one_and_clustering_does_not():
    X, truth, sign, G = planted()
    train, held = np.arange(300), np.arange(300, 400)
    units = C.topk_units(X, G, 2)
    assert C.score_units(units, truth, train, held)["f1"] == 1.0
    means = C.computation_means(X[train], truth[train], sign[train])
    assert C.types_matched(means, G) == len(G)  # the least-squares means are the planted components
    assert C.score_units(C.topk_units(X, means, 2), truth, train, held)["f1"] == 1.0
    # one cluster per event: clusters that are the combinations of computations, each labelled with both, also
    # score 1; clusters that are single computations reach precision 1, recall 1/2, F1 2/3
    combo = truth[:, :3].argmax(1) * 3 + truth[:, 3:].argmax(1)
    assert C.score_units(np.eye(9, dtype=bool)[combo], truth, train, held)["f1"] == 1.0
    single = C.score_units(truth[:, :3], truth, train, held)
    assert single["precision"] == 1.0 and single["recall"] == 0.5 and single["f1"] == pytest.approx(2 / 3)


def test_one_head_bandit_is_unchanged():
    a, b = ContextualBandit(), ContextualBandit(n_heads=1)
    assert torch.equal(a.centres, b.centres) and a.task_names == b.task_names and a.clause_names == ["hit", "miss"]
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sa, sb = a.sample(16, ga), b.sample(16, gb)
    assert sa.keys() == sb.keys() == {"prompt", "task"} and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(0)
    m1 = pol.MLPPolicy(8, 4, 32)
    torch.manual_seed(0)
    m2 = pol.MLPPolicy(8, 4, 32, n_heads=1)
    assert m1.config == m2.config == {"kind": "mlp", "context_dim": 8, "n_actions": 4, "hidden": 32}
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert list(m1.state_dict()) == list(m2.state_dict())
    assert make_testbed(RLParams()).max_new_tokens == 1


@pytest.mark.parametrize("shared", [False, True])
def test_two_head_bandit_rewards_each_head_from_its_own_cluster(shared, tmp_path):
    bandit = ContextualBandit(n_heads=2, env_seed=0)
    assert torch.equal(bandit.head_centres[0], ContextualBandit().centres)  # head 0 is the one-head bandit's
    batch = bandit.sample(64, torch.Generator().manual_seed(0))
    cl = batch["clusters"]
    assert batch["prompt"].shape == (64, 16) and cl.shape == (64, 2)
    assert torch.equal(batch["task"], cl[:, 0] + 4 * cl[:, 1])
    assert bandit.task_names[int(batch["task"][0])] == f"h0c{int(cl[0, 0])} h1c{int(cl[0, 1])}"
    best = bandit.best_arm[cl]
    wrong1 = best.clone()
    wrong1[:, 1] = (best[:, 1] + 1) % 4
    r = bandit.rewards(batch, wrong1, torch.ones_like(wrong1, dtype=torch.bool))
    assert r["hit_h0"].eq(1).all() and r["hit_h1"].eq(0).all() and r["miss_h1"].eq(0).all()
    # the policy: one arm per head, the completion's log-probability one term per head
    model = pol.MLPPolicy(16, 4, 8, n_heads=2, shared_trunk=shared)
    comp, mask = pol.sample(model, batch["prompt"], 2, torch.Generator().manual_seed(1))
    assert comp.shape == (64, 2) and mask.all()
    logp, _ = pol.logprobs(model, batch["prompt"], comp)
    assert logp.shape == (64, 2)
    pol.save_policy(model, tmp_path / "p")
    again = pol.load_policy(tmp_path / "p")
    assert torch.allclose(pol.logprobs(again, batch["prompt"], comp)[0], logp)
    if not shared:  # each head sees only its own context: head 1's logits ignore head 0's slice
        x = batch["prompt"].clone()
        x[:, :8] = 0
        assert torch.equal(model(x)[:, 1], model(batch["prompt"])[:, 1])


@pytest.fixture(scope="module")
def store2(tmp_path_factory):
    from shardlib.rl import run

    out = tmp_path_factory.mktemp("rl2")
    p = RLParams.from_dict(
        dict(
            out_dir=str(out),
            testbed="bandit",
            n_heads=2,
            steps=4,
            prompts_per_step=8,
            group_size=4,
            eval_prompts=32,
            lr=0.01,
            collect_params=["*"],
            collect_steps=False,
            device="cpu",
        )
    )
    run(p, progress=False)
    return out / "updates" / "events"


def test_the_store_knows_every_events_computations(store2):
    from shardlib.updates import open_store

    st = open_store(store2)
    assert "action" not in st.coords
    truth, names = C.store_truth(st)
    assert truth.shape == (st.sizes["event"], 32) and (truth.sum(1) == 2).all()
    best = ContextualBandit(n_heads=2).best_arm.numpy()
    for h in (0, 1):
        hit = st[f"action_h{h}"].values == best[st[f"cluster_h{h}"].values]
        assert np.array_equal(hit.astype(np.float32), st[f"reward_hit_h{h}"].values)
    e = 0
    on = [names[j] for j in np.flatnonzero(truth[e])]
    assert on == [f"h{h} c{int(st[f'cluster_h{h}'][e])} arm{int(st[f'action_h{h}'][e])}" for h in (0, 1)]


def test_stage_scores_every_method_and_states_a_finding(store2, tmp_path):
    p = C.CompositionalParams.from_dict(
        dict(
            out_dir=str(tmp_path),
            store_path=str(store2),
            sae_seeds=[0, 1],
            n_latents=8,
            epochs=1,
            batch_size=16,
            n_random=2,
            device="cpu",
        )
    )
    ds = C.run(p)
    assert list(ds.approach.values) == list(C.METHODS) and ds.f1.shape == (2, len(C.METHODS))
    assert ((ds.f1 >= 0) & (ds.f1 <= 1)).all() and int(ds.k) == 2 and int(ds.n_heads) == 2
    assert int(ds.n_events) + int(ds.n_zero_events) == 4 * 8 * 4
    assert (tmp_path / "results.nc").exists() and [f.name for f in tmp_path.iterdir()] == ["results.nc"]
    assert json.loads(ds.attrs["config"])["store_path"] == str(store2)
    text = finding("compositional", ds)
    assert text.startswith("Finding: On the compositional bandit") and "k-means as a dictionary" in text
    with pytest.raises(ValueError, match="store_path"):
        C.CompositionalParams.from_dict({})


def test_finding_says_when_the_sae_does_not_beat_k_means():
    import xarray as xr

    methods = list(C.METHODS)

    def results(sae):
        f1 = np.array([[sae, 0.5, 0.55, 0.3, 0.8, 0.2], [sae + 0.02, 0.5, 0.57, 0.3, 0.8, 0.2]])
        return xr.Dataset(
            {
                "f1": (("sae_seed", "approach"), f1),
                "types_matched": (("sae_seed", "approach"), np.ones_like(f1)),
                "f1_random": (("sae_seed", "random_seed"), [[0.2, 0.21], [0.19, 0.2]]),
                "n_events": 100,
                "n_zero_events": 5,
                "n_heads": 2,
                "n_computations": 32,
            },
            coords={"sae_seed": [0, 1], "approach": methods},
        )

    assert "Negative: the SAE does not beat k-means as a dictionary" in finding("compositional", results(0.56))
    good = finding("compositional", results(0.7))
    assert "Negative" not in good and "beats both k-means baselines" in good and "over k-means as a dictionary" in good
