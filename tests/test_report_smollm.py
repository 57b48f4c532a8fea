def test_step_seconds_compare_collecting_steps_with_the_others():
    import json

    import numpy as np
    import xarray as xr

    from shardlib.report_smollm import step_seconds

    sec = np.array([9.0, 1.0, 1.0, 3.0, 1.0, 1.0, 3.0])  # every third step collects; step 0 is the warm-up
    ds = xr.Dataset({"steps_per_s": ("step", 1 / sec)}, coords={"step": np.arange(7)})
    ds.attrs["config"] = json.dumps({"collect_every": 3})
    on, off = step_seconds(ds)
    assert (on, off) == (3.0, 1.0) and on / off == 3.0
    ds.attrs["config"] = json.dumps({"collect_every": 1})
    on, off = step_seconds(ds)
    assert np.isnan(on / off)


def test_the_rl_table_splits_reward_into_correct_and_bare_number_answers():
    """A run that learns the format clause and loses correct answers: its reward rises, its correct share does not."""
    import json

    import xarray as xr

    from shardlib.report_smollm import _text_rl

    def run(correct, bare, n=(40, 30), bonus=0.2):
        clauses = ["correct_add1", "correct_sub", "format"]
        ds = xr.Dataset(coords={"task": ["add1", "sub"], "clause": clauses})
        for w, i in (("init", 0), ("final", 1)):
            c = [[correct[0][i], 0.0], [0.0, correct[1][i]], [bonus * bare[0][i], bonus * bare[1][i]]]
            ds[f"eval_clause_{w}"] = (("clause", "task"), c)
            ds[f"eval_reward_{w}"] = ("task", [correct[t][i] + bonus * bare[t][i] for t in range(2)])
            ds[f"eval_bare_{w}"] = ("task", [bare[t][i] for t in range(2)])
        ds["eval_n"] = ("task", list(n))
        ds.attrs["config"] = json.dumps({"format_bonus": bonus, "temperature": 0.7})
        return ds

    grpo = run(correct=[(0.3, 0.1), (0.2, 0.1)], bare=[(0.0, 1.0), (0.0, 1.0)])  # reward +0.0 / +0.1
    sft = run(correct=[(0.3, 0.6), (0.2, 0.4)], bare=[(0.0, 1.0), (0.0, 1.0)])
    md = _text_rl({"rl_text": grpo, "sft_text": sft})
    assert "| rl_text | add1 | 0.30 | 0.30 | +0.00 | 0.30 → 0.10 (± 0.09) | 0.00 → 1.00 | 40 |" in md
    assert "| sft_text | sub | 0.20 | 0.60 | +0.40 | 0.20 → 0.40 (± 0.12) | 0.00 → 1.00 | 30 |" in md
    assert "rose by ≥ 0.05 on 1 of 2 families under GRPO (target ≥ 3: NOT met) and on 2 under" in md
    assert "correct answers rose by ≥ 0.05 on 0 under GRPO and 2 under SFT" in md
    # sub's 0.2 -> 0.4 on 30 prompts is 1.7 standard errors (sqrt((0.16 + 0.24) / 30) = 0.115): not counted as clear
    assert "more than twice its standard error (±, in the table) on 0 under GRPO and 1 under SFT" in md
    assert "plus the bare-number format clause (0.2)" in md
    # no format clause: the reward is the correct share, and the bare-number share is still the answers' form
    grpo = run(correct=[(0.3, 0.9), (0.2, 0.5)], bare=[(0.0, 0.25), (0.0, 0.0)], bonus=0.0)
    md = _text_rl({"rl_text": grpo, "sft_text": sft})
    assert "| rl_text | add1 | 0.30 | 0.90 | +0.60 | 0.30 → 0.90 (± 0.09) | 0.00 → 0.25 | 40 |" in md
    assert "Rewards are correct (1) only (no format clause)" in md
    # results written before the bare-number share was recorded: the column says so instead of failing
    md = _text_rl({"rl_text": grpo.drop_vars(["eval_bare_init", "eval_bare_final"]), "sft_text": sft})
    assert "| rl_text | add1 | 0.30 | 0.90 | +0.60 | 0.30 → 0.90 (± 0.09) | – | 40 |" in md
    # GRPO and SFT under another seed: their rows, and a sentence each
    sft1 = run([(0.3, 0.7), (0.2, 0.6)], [(0, 0), (0, 0)])
    sft1.attrs["config"] = json.dumps({"algorithm": "sft", "format_bonus": 0.0})
    md = _text_rl(
        {"rl_text": grpo, "sft_text": sft},
        {
            "runs/smollm_seed1/rl_text": run([(0.3, 0.4), (0.2, 0.2)], [(0, 0), (0, 0)]),
            "runs/smollm_seed1/sft_text": sft1,
        },
    )
    assert "| runs/smollm_seed1/rl_text | add1 | 0.30 | 0.40 | +0.10 | 0.30 → 0.40 (± 0.11) | 0.00 → 0.00 | 40 |" in md
    assert (
        "Under another seed (runs/smollm_seed1/rl_text, GRPO, the same configuration), held-out reward rose by ≥ 0.05 "
        "on 1 of 2 families and the correct share by more than twice its standard error on 0. " in md
    )
    assert (
        "Under another seed (runs/smollm_seed1/sft_text, the SFT control, the same configuration), held-out reward "
        "rose by ≥ 0.05 on 2 of 2 families and the correct share by more than twice its standard error on 2. " in md
    )


def test_the_frontier_sentence_names_the_ranks_the_event_sweep_trained():
    import numpy as np
    import xarray as xr

    from shardlib.report_smollm import _event_ranks

    fvu = np.full((2, 3, 2), np.nan)  # store x rank (0, 1, 4) x k
    fvu[0, 1] = fvu[0, 2] = [1.05, 1.04]  # events: ranks 1 and 4
    fvu[1, 0] = [1.07, 1.06]  # the one-matrix reference: dense
    ds = xr.Dataset(
        {"fvu": (("store", "rank", "k"), fvu)},
        coords={"store": ["events", "events_one_matrix"], "rank": [0, 1, 4], "k": [4, 64]},
    )
    assert _event_ranks(ds) == "rank-1 and rank-4"
    assert _event_ranks(ds.where(ds["rank"] != 4)) == "rank-1"


def test_the_step_section_reads_the_sibling_runs_store_rewards_and_frontier(tmp_path):
    """``runs/<run>_steps``: bytes and kept share of its factored step store, its held-out rewards, and its frontier
    table with the PCA rows; no sibling, no section."""
    import numpy as np
    import torch
    import xarray as xr

    from shardlib.factored import Factored
    from shardlib.io import save_results
    from shardlib.report_smollm import _text_steps, steps_sibling
    from shardlib.store import UpdateStore

    run, steps = tmp_path / "smollm", tmp_path / "smollm_steps"
    run.mkdir()
    assert steps_sibling(run) is None
    rl = xr.Dataset(coords={"task": ["add1", "sub"]})
    rl["eval_reward_init"], rl["eval_reward_final"] = ("task", [0.2, 0.1]), ("task", [0.5, 0.3])
    rl["eval_n"] = ("task", [40, 30])
    save_results(rl, steps / "rl_steps" / "results.nc", {"steps": 4, "collect_step_rank": 2, "collect_events": False})
    store = UpdateStore(steps / "rl_steps" / "updates" / "steps", "step", "step", "f")
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        f = Factored(torch.randn(1, 2, 30, generator=g), torch.randn(1, 2, 20, generator=g))
        store.append({"w": f}, {"step": np.array([step]), "w__kept": np.array([0.5 + 0.1 * step])}, step)
    store.flush()
    fr = xr.Dataset(coords={"store": ["steps", "steps_one_matrix"], "rank": [0, 1], "k": [4, 16]})
    fr["fvu"] = (("store", "rank", "k"), [[[np.nan, np.nan], [0.9, 0.8]], [[0.95, 0.85], [np.nan, np.nan]]])
    fr["pca_fvu"] = (("store", "k"), [[0.7, 0.5], [0.75, 0.55]])
    # the frontier's rank-1 points (5 epochs) and, beside them, a longer fit of one; and a time split's point
    for name, holdout in (("fs", "random"), ("ft", "last")):
        for k, held in ((4, 0.9), (16, 0.8)):
            cfg = {"store_path": "x", "rank": 1, "n_latents": 256, "k": k, "epochs": 5, "holdout": holdout}
            point = xr.Dataset({"heldout_fvu": held, "train_fvu": held - 0.1, "train_dead_fraction": 0.5})
            save_results(point, steps / name / f"rank=1,k={k}" / "results.nc", cfg)
    fr_cfg = {"sweep_dirs": [str(steps / "fs"), str(steps / "ft")], "sweep_names": ["steps", "steps_one_matrix"]}
    save_results(fr, steps / "frontier" / "results.nc", fr_cfg)
    assert steps_sibling(run) == steps
    long = xr.Dataset({"heldout_fvu": 0.6, "train_fvu": 0.2, "train_dead_fraction": 0.25})
    save_results(
        long,
        steps / "shards_long" / "results.nc",
        {
            "store_path": "x",
            "rank": 1,
            "n_latents": 256,
            "k": 16,
            "epochs": 40,
            "eval_batch_size": 16,
            "holdout": "random",
        },
    )
    # a fit that differs only in its number of latents is another group (alone: no row)
    other = xr.Dataset({"heldout_fvu": 0.55, "train_fvu": 0.1, "train_dead_fraction": 0.0})
    save_results(
        other,
        steps / "shards_64" / "results.nc",
        {"store_path": "x", "rank": 1, "n_latents": 64, "k": 16, "epochs": 40, "holdout": "random"},
    )
    md = _text_steps(steps)
    assert "| steps | 1 | 64 | 16 |" not in md and "| 0.550 |" not in md
    # the longer fit sits beside the frontier's point of the same store, split, rank and k, with that store's PCA
    assert "| steps | 1 | 256 | 16 | 5 | 5,000 | 100% | 0.800 | 0.700 | 0.50 | 0.500 |" in md
    assert "| steps | 1 | 256 | 16 | 40 | 5,000 | 100% | 0.600 | 0.200 | 0.25 | 0.500 |" in md
    assert "| steps | 1 | 4 |" not in md and "steps_one_matrix | 1 | 16" not in md  # one variant only: no row
    assert (
        "steps, rank 1, k = 16, with 40 epochs instead of 5 epochs and a 5,000-sample window: held-out FVU 0.800 → "
        "0.600, 67% of the way to PCA's 0.500 (training FVU 0.700 → 0.200)." in md
    )
    # a shorter dead-latent window at the frontier's length is another variant of the same point
    win = xr.Dataset({"heldout_fvu": 0.7, "train_fvu": 0.65, "train_dead_fraction": 0.0})
    worse = xr.Dataset({"heldout_fvu": 0.9, "train_fvu": 0.65, "train_dead_fraction": 0.0})
    save_results(
        worse,
        steps / "shards_worse" / "results.nc",
        {"store_path": "x", "rank": 1, "n_latents": 256, "k": 16, "epochs": 5, "dead_window": 10, "holdout": "random"},
    )
    win_cfg = {
        "store_path": "x",
        "rank": 1,
        "n_latents": 256,
        "k": 16,
        "epochs": 5,
        "dead_window": 100,
        "holdout": "random",
    }
    save_results(win, steps / "shards_win" / "results.nc", win_cfg)
    # a fit that passes PCA is "below" it, not more than 100% of the way
    past = xr.Dataset({"heldout_fvu": 0.4, "train_fvu": 0.1, "train_dead_fraction": 0.0})
    save_results(past, steps / "shards_past" / "results.nc", {**win_cfg, "epochs": 160})
    early = xr.Dataset({"heldout_fvu": 0.6, "train_fvu": 0.55, "train_dead_fraction": 0.1})
    save_results(early, steps / "shards_early" / "results.nc", {**win_cfg, "restart_until": 0.5})
    md = _text_steps(steps)
    assert "| steps | 1 | 256 | 16 | 5 | 100 | 100% | 0.700 | 0.650 | 0.00 | 0.500 |" in md
    assert "| steps | 1 | 256 | 16 | 5 | 100 | 50% | 0.600 | 0.550 | 0.10 | 0.500 |" in md
    assert "with 160 epochs and a dead-latent window of 100 samples instead of 5 epochs" in md
    assert "held-out FVU 0.800 → 0.400, below PCA's 0.500 (training FVU 0.700 → 0.100)." in md
    assert (
        "with a dead-latent window of 100 samples and restarts only in the first 50% of the steps instead of 5 "
        "epochs and a 5,000-sample window with restarts allowed to the end: held-out FVU 0.800 → 0.600, 67% of "
        "the way" in md
    )
    assert (
        "with a dead-latent window of 100 samples instead of 5 epochs and a 5,000-sample window: held-out FVU "
        "0.800 → 0.700, 33% of the way" in md
    )
    assert (
        "window of 10 samples instead of 5 epochs and a 5,000-sample window: held-out FVU 0.800 → 0.900, worse (" in md
    )
    assert "GRPO with the settings above for 4 steps (`runs/smollm_steps/rl_steps`)" in md
    assert "randomized rank-2 SVD" in md and "kept 0.650 of a step's squared norm on average (lowest 0.500)" in md
    assert "2.3 KiB dense" in md  # 30 x 20 float32 numbers a step
    assert "add1 0.20 → 0.50 (n = 40), sub 0.10 → 0.30 (n = 30)" in md
    assert "`steps`, rank-1 latents over all 1 matrices" in md
    assert "| steps | 1 | 0.90 | 0.80 |" in md and "| steps | PCA | 0.70 | 0.50 |" in md
    assert "| steps_one_matrix | dense | 0.95 | 0.85 |" in md and "| steps_one_matrix | PCA | 0.75 | 0.55 |" in md
    assert "reconstructs better than the SAE on steps (by 0.300), steps_one_matrix (by 0.300)" in md


def test_the_sweep_peaks_are_read_from_every_point_of_each_sweep(tmp_path):
    import xarray as xr

    from shardlib.io import save_results
    from shardlib.report_smollm import _sweep_peaks

    for rank, k, gib in ((1, 4, 3.0), (1, 64, 3.5), (4, 4, 9.0)):
        r = xr.Dataset({"peak_rss_bytes": gib * 2**30})
        save_results(r, tmp_path / "sweep" / f"rank={rank},k={k}" / "results.nc", {"rank": rank, "k": k})
    fr = xr.Dataset({"fvu": 1.0})
    fr.attrs["config"] = '{"sweep_dirs": ["%s"], "sweep_names": ["steps"]}' % (tmp_path / "sweep")
    text = _sweep_peaks(fr)
    assert "steps rank 1 3.0 GiB–3.5 GiB, steps rank 4 9.0 GiB–9.0 GiB" in text
    assert _sweep_peaks(xr.Dataset()) == ""
