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
    assert "NMI between shards and the 8 event types is 0.200 ± 0.000 (random dictionary 0.300" in text
    assert "Negative: shards align with event types no better than a random dictionary" in text
    with pytest.raises(ValueError, match="no finding for stage kind 'nope'"):
        finding("nope", ds)
