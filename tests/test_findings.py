import json

import numpy as np
import pytest
import xarray as xr

from shardlib.findings import finding


def rl_results(init, final, algorithm="grpo"):
    return xr.Dataset(
        {"eval_reward_init": ("task", init), "eval_reward_final": ("task", final)},
        coords={"task": ["a", "b"]},
        attrs={"config": json.dumps({"algorithm": algorithm, "testbed": "lm"})},
    )


def test_rl_finding_states_numbers_and_says_when_negative():
    up = finding("rl", rl_results([0.2, 0.4], [0.8, 0.3]))
    assert up.startswith("Finding: GRPO on the lm testbed raised the held-out reward from 0.30 to 0.55")
    assert "rose (by 0.01 or more) on 1 of 2 task families (a 0.20→0.80, b 0.40→0.30)" in up
    down = finding("rl", rl_results([0.5, 0.5], [0.4, 0.5], "sft"))
    assert "SFT on the lm testbed LOWERED (negative)" in down


def test_frontier_finding_names_the_best_point_and_a_negative():
    fvu = np.array([[[0.5, 0.3]], [[0.9, 0.8]]])  # store x rank x k
    ds = xr.Dataset(
        {"fvu": (("store", "rank", "k"), fvu)}, coords={"store": ["events", "steps"], "rank": [1], "k": [1, 4]}
    )
    assert finding("frontier", ds) == (
        "Finding: Lowest held-out FVU 0.300 (events updates, rank 1, k = 4). Negative: no SAE reaches FVU 0.1 on any store."
    )
    assert "FVU ≤ 0.1 is reached on: steps" in finding(
        "frontier", ds.assign(fvu=ds.fvu.where(ds.store != "steps", 0.05))
    )
    trained = finding("frontier", ds.assign(train_fvu=ds.fvu * 0.5))  # the points' own training FVU, where recorded
    assert "On their own training updates the same SAEs reach FVU 0.150 to 0.450. Negative: no SAE" in trained


def test_shards_finding_says_how_far_the_reconstruction_falls_short():
    def run(fvu):
        ds = xr.Dataset({f"heldout_{k}": v for k, v in {"fvu": fvu, "l0": 8.0, "dead_fraction": 0.5}.items()})
        ds.attrs["config"] = json.dumps({"n_latents": 256, "k": 8, "rank": 1})
        return finding("shards", ds)

    assert run(0.2).endswith("FVU 0.200 at L0 8.0; 50% of latents fire on no held-out event.")  # no negative
    # where the training events' dead fraction is recorded it is the one reported (a few held-out events let at
    # most k latents each fire)
    ds = xr.Dataset({"heldout_fvu": 0.2, "heldout_l0": 8.0, "heldout_dead_fraction": 0.9, "train_dead_fraction": 0.1})
    assert finding("shards", ds).endswith("; 10% of latents fire on no training event.")
    assert run(0.7).endswith("Negative: it misses most of the held-out variance.")
    assert run(1.044).endswith("Negative: it predicts held-out updates no better than their mean (FVU ≥ 1).")


def test_analysis_finding_compares_with_the_random_dictionary():
    seeds = [0, 1]
    ds = xr.Dataset(
        {
            **{
                f"{m}{s}": ("sae_seed", v)
                for m, base in (("nmi", 0.2), ("ari", 0.1), ("types_matched", 1.0))
                for s, v in (("", [base, base]), ("_random", [0.3, 0.3]), ("_shuffled", [0.0, 0.0]))
            },
            "n_types": ("sae_seed", [8, 8]),
        },
        coords={"sae_seed": seeds},
    )
    text = finding("analysis", ds)
    assert "NMI between shards and the 8 event types is 0.200 ± 0.000 (random dictionaries 0.300" in text
    assert "Negative: shards align with event types no better than random dictionaries" in text


def test_analysis_finding_says_when_k_means_does_as_well():
    ds = xr.Dataset(
        {
            **{
                f"{m}{s}": ("sae_seed", v)
                for m in ("nmi", "types_matched")
                for s, v in (
                    ("", [0.60, 0.62]),
                    ("_kmeans", [0.61, 0.63]),
                    ("_pca", [0.5, 0.5]),
                    ("_events", [0.4, 0.4]),
                    ("_oracle", [0.7, 0.7]),
                    ("_random", [0.3, 0.3]),
                    ("_random_std", [0.02, 0.02]),
                    ("_shuffled", [0.0, 0.0]),
                )
            },
            "n_types": ("sae_seed", [8, 8]),
            "n_events": 100,
            "n_zero_events": 40,
            "moves": ("intervened_shard", [1.0, 0.0]),
            "random_moves": ("random", [1.0, 1.0]),
            "specificity": ("intervened_shard", [0.9, np.nan]),
            "random_specificity": ("random", [0.5, 0.6]),
            "own_task_hit": ("intervened_shard", [1.0, np.nan]),
            "own_task_null": 0.4,
            "own_task_p": 0.4,
        },
        coords={"sae_seed": [0, 1]},
    )
    text = finding("analysis", ds)
    assert "on 100 events (40 zero updates left out)" in text and "k-means 0.620 ± 0.010" in text
    assert (
        "the type means as a dictionary 0.700" in text and "random dictionaries 0.300 ± 0.020 over dictionaries" in text
    )
    assert "Negative: the SAE aligns with event types no better than k-means" in text
    assert "Negative: shards move reward no more often than random directions" in text
    stable = finding("analysis", ds.assign(seed_stability=0.61))
    assert "The shard directions of the 2 SAE seeds match one to one at mean |cos| 0.610 (Hungarian)." in stable
    dims = ("setting_k", "setting_normalize")

    def settings(ks):  # the settings comparison over k (unit-normalised updates only)
        grid = np.linspace(0.5, 0.6, len(ks))[:, None]
        coords = {"setting_k": ks, "setting_normalize": [True]}
        return ds.assign(
            setting_nmi=xr.DataArray(grid, coords, dims),
            setting_heldout_fvu=xr.DataArray(grid + 0.3, coords, dims),
            setting_types_matched=xr.DataArray(grid * 0 + 2, coords, dims),
        )

    one = finding("analysis", settings([4]))
    assert "The one other setting tried: k = 4, unit-normalised updates (NMI 0.500" in one and "Best" not in one
    assert "Best setting for event types: k = 8, unit-normalised updates (NMI 0.600" in finding(
        "analysis", settings([4, 8])
    )
    assert "Negative: shards hit their own task no more often than with shuffled tasks" in text
    with pytest.raises(ValueError, match="no finding for stage kind 'nope'"):
        finding("nope", ds)


def test_one_stage_registry_for_launch_findings_and_notebooks():
    """Every kind of shardlib.stages has a Finding, a Params class in its module with a run(), and a notebook that
    validates its parameters with that class."""
    from shardlib import findings, launch, runner, stages

    assert set(findings.FINDINGS) == set(stages.KINDS)
    assert launch.KINDS is stages.KINDS
    for name, kind in stages.KINDS.items():
        cls = stages.params_class(name)
        assert callable(stages.module(name).run)
        assert runner.params_class(runner.NOTEBOOKS / kind.notebook) is cls
        assert stages.kind_of(f"shardlib.{kind.module}", kind.params) == name
