"""The README's block for the SmolLM2 study (configs/smollm.yaml): held-out reward under GRPO and the SFT control,
what storing per-event updates costs, the shard SAE on the factored store, and the sparsity of the updates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from . import findings
from .io import load_results
from .report_default import bullets, frontier_table, markdown_table
from .runs import WALL, ReportError, by_kind, recorded_config, run_stages, wall_times

SMOLLM_KINDS = ("model", "rl", "shards", "frontier", "sparsity", "analysis")


def is_smollm_run(run_dir) -> bool:
    """A run of configs/smollm.yaml (it has a stage of kind ``model``), reported in its own README block."""
    return "model" in run_stages(run_dir).values()


def _text_rl(runs: dict[str, xr.Dataset], replicas: dict[str, xr.Dataset] | None = None) -> str:
    """Per-family held-out reward before and after, GRPO (the first of ``runs``) and the SFT control (the second),
    with the share of correct answers (± the standard error of its change, two independent binomial shares of
    ``eval_n`` prompts) and the share of bare-number answers (what the format clause, if any, pays for);
    ``replicas``: GRPO or SFT under other seeds (runs of their own), as rows and a sentence each."""
    rows, rises, right, clear = [], {}, {}, {}
    replicas = replicas or {}
    grpo, sft = runs
    for stage, ds in {**runs, **replicas}.items():
        d = ds.eval_reward_final - ds.eval_reward_init
        rises[stage] = int((d >= 0.05).sum())
        right[stage] = clear[stage] = 0
        for t in ds.task.values:
            r = ds.sel(task=t)
            correct = [float(r[f"eval_clause_{w}"].sel(clause=f"correct_{t}")) for w in ("init", "final")]
            bare = [float(r[f"eval_bare_{w}"]) if f"eval_bare_{w}" in r else float("nan") for w in ("init", "final")]
            se = float(np.sqrt(sum(c * (1 - c) for c in correct) / max(int(r.eval_n), 1)))
            right[stage] += correct[1] - correct[0] >= 0.05
            clear[stage] += correct[1] - correct[0] > 2 * se
            rows.append(
                [
                    stage,
                    str(t),
                    f"{float(r.eval_reward_init):.2f}",
                    f"{float(r.eval_reward_final):.2f}",
                    f"{float(r.eval_reward_final - r.eval_reward_init):+.2f}",
                    f"{correct[0]:.2f} → {correct[1]:.2f} (± {se:.2f})",
                    f"{bare[0]:.2f} → {bare[1]:.2f}" if np.isfinite(bare).all() else "–",  # results before eval_bare
                    str(int(r.eval_n)),
                ]
            )
    head = ["stage", "family", "before", "after", "change", "correct", "bare number", "held-out prompts"]
    table = markdown_table(head, rows)
    cfg = recorded_config(runs[grpo])
    verdict = "met" if rises[grpo] >= 3 else "NOT met"
    bonus = cfg.get("format_bonus")
    reward = (
        f"correct (1) plus the bare-number format clause ({bonus})" if bonus else "correct (1) only (no format clause)"
    )
    return (
        table + f"\n\nHeld-out reward rose by ≥ 0.05 on {rises[grpo]} of {runs[grpo].sizes['task']} families "
        f"under GRPO (target ≥ 3: {verdict}) and on {rises[sft]} under the SFT control; the share of correct "
        f"answers rose by ≥ 0.05 on {right[grpo]} under GRPO and {right[sft]} under SFT, and by more than twice its "
        f"standard error (±, in the table) on {clear[grpo]} under GRPO and {clear[sft]} under SFT. "
        + "".join(
            f"Under another seed ({r}, {_algorithm(replicas[r])}, the same configuration), held-out reward rose by "
            f"≥ 0.05 on {rises[r]} of {replicas[r].sizes['task']} families and the correct share by more than twice "
            f"its standard error on {clear[r]}. "
            for r in replicas
        )
        + f"Rewards are {reward}, "
        f"one sampled completion per prompt at temperature {cfg.get('temperature')}; `correct` and `bare number` "
        'are the shares of held-out answers that are right and that are a bare number ("12"), before → after.'
    )


def store_cost(store_dir: Path) -> dict:
    """Events, bytes on disk per event, dense fp32 bytes per event, and the kept energy of a factored store."""
    from .factored import factor_pairs
    from .store import open_store

    ds = open_store(store_dir, verify=False)
    n = ds.sizes["event"]
    disk = sum(f.stat().st_size for f in Path(store_dir).glob("*.nc"))
    pairs = factor_pairs(ds)
    dense = 4 * sum(ds.sizes[f"{v}_dim0"] * ds.sizes[f"{v}_dim1"] for v in pairs)
    kept = np.array([ds[c].values for c in ds.coords if str(c).endswith("__kept")])
    return {
        "events": n,
        "matrices": len(pairs),
        "disk_per_event": disk / max(n, 1),
        "dense_per_event": dense,
        "kept_mean": float(kept.mean()) if kept.size else 1.0,
        "kept_min": float(kept.min()) if kept.size else 1.0,
    }


def step_seconds(ds: xr.Dataset) -> tuple[float, float]:
    """Median seconds of a step that collected updates and of one that did not, from the RL history (step 0, the
    warm-up, left out); NaN where there is no such step."""
    cfg = json.loads(ds.attrs.get("config", "{}"))
    every = int(cfg.get("collect_every", 1))
    steps, sec = ds.step.values, 1.0 / ds.steps_per_s.values
    on, off = sec[(steps % every == 0) & (steps > 0)], sec[(steps % every != 0) & (steps > 0)]
    return tuple(float(np.median(x)) if len(x) else float("nan") for x in (on, off))


def _text_storage(run_dir: Path, stage: str, rl: xr.Dataset) -> str:
    """Bytes per event of the GRPO stage's factored store against dense, and the cost of collecting (``rl``: its
    results)."""
    from .common import fmt_bytes

    c = store_cost(run_dir / stage / "updates" / "events")
    ratio = c["dense_per_event"] / c["disk_per_event"]
    on, off = step_seconds(rl)
    over = on / off
    rank = json.loads(rl.attrs.get("config", "{}")).get("collect_max_rank") or "exact"
    return (
        f"{c['events']} GRPO events, every one holding all {c['matrices']} collected matrices as factors (rank "
        f"≤ {rank}): "
        f"{fmt_bytes(c['disk_per_event'])} per event on disk (labels, text and netCDF overhead included) against "
        f"{fmt_bytes(c['dense_per_event'])} dense fp32: {ratio:.0f}× smaller (target ≥ 30×: "
        f"{'met' if ratio >= 30 else 'NOT met'}); the compression kept {c['kept_mean']:.3f} of each event's squared "
        f"norm on average (lowest {c['kept_min']:.3f}).\n\nA step that collected took {over:.2f}× as long as one that "
        f"did not ({on:.1f} s against {off:.1f} s, medians; target ≤ 1.5×: {'met' if over <= 1.5 else 'NOT met'}): a collecting step runs every "
        "completion's prompt on its own rows, as its per-event gradients need, where the others run the tokens a "
        "step's prompts share once (`share_prompts` in `shardlib/policy.py`); the capture and compression themselves "
        "cost little beside that (`benchmarks/bench_collect_smollm.py` times each part on one rollout). "
        f"{WALL}"  # timed: not checked
    )


def _text_sparsity(ds: xr.Dataset) -> str:
    rows = []
    for run in ds.run.values:
        r = ds.sel(run=run)
        ev = f"{float(r.unchanged.sel(scope='event', tau=0.0)):.3f}" if "event" in ds.scope.values else "–"
        rows.append(
            [
                str(run),
                f"{float(r.unchanged.sel(scope='cumulative', tau=0.0)):.4f}",
                f"{float(r.bf16_unchanged.sel(scope='cumulative')):.4f}",
                f"{float(r.mukherjee_unchanged.sel(scope='cumulative')):.4f}",
                ev,
            ]
        )
    return markdown_table(
        [
            "run",
            "exact fp32 unchanged",
            "bf16 unchanged",
            "Mukherjee et al. (bf16, \\|Δ\\| ≤ 1e-5)",
            f"single events, exact zeros (the mean over {recorded_config(ds).get('max_updates', '?')} drawn events of "
            "the collected matrices; a zero-advantage event is all zeros)",
        ],
        rows,
    )


def _text_sae_cost(stage: str, shards: xr.Dataset, frontier: xr.Dataset) -> str:
    from .common import fmt_bytes

    cfg = json.loads(shards.attrs.get("config", "{}"))
    rss = float(shards["peak_rss_bytes"]) if "peak_rss_bytes" in shards else float("nan")
    kmax = int(frontier.k.max())
    mem = (
        f"peak resident memory of its process {fmt_bytes(rss)} (target ≤ 8 GiB: "
        f"{'met' if rss <= 8 * 2**30 else 'NOT met'})"
        if np.isfinite(rss)
        else "peak memory not recorded"
    )
    return (
        f"The shard SAE (`{stage}`: {cfg.get('n_latents')} latents, k = {cfg.get('k')}, rank {cfg.get('rank')}, "
        f"{int(shards['n_parameters']):,} parameters against {int(shards['dense_n_parameters']):,} for dense "
        f"latents) trained on the factored store in {float(shards['train_seconds']):.0f} s, {mem}. {WALL}\n\n"
        f"The frontier reaches k = {kmax} (target k = 64: {'met' if kmax >= 64 else 'NOT met'})."
    )


def _event_ranks(frontier: xr.Dataset, store: str = "events") -> str:
    """The low ranks the frontier trained on the factored ``store`` ("rank-1 and rank-4")."""
    fvu = frontier.fvu.sel(store=store)
    ranks = [int(r) for r in frontier["rank"].values if r > 0 and not fvu.sel(rank=r).isnull().all()]
    return " and ".join(f"rank-{r}" for r in ranks) or "no low-rank"


def _algorithm(ds: xr.Dataset) -> str:
    return "the SFT control" if recorded_config(ds).get("algorithm") == "sft" else "GRPO"


def rl_replicas(run_dir: Path) -> dict[str, xr.Dataset]:
    """GRPO and the SFT control under other seeds: the RL results of sibling runs named ``<run>_seed<N>`` (e.g.
    ``python -m shardlib run --config configs/smollm.yaml --run smollm_seed1 --set seed=1 --only model rl_text
    sft_text``), labelled ``runs/<run>_seed<N>/<stage>``, GRPO first."""
    found = {}
    for d in sorted(run_dir.parent.glob(f"{run_dir.name}_seed*")):
        for stage, kind in run_stages(d).items():
            ds = load_results(d / stage / "results.nc") if kind == "rl" else None
            if ds is not None and "eval_n" in ds:
                found[f"runs/{d.name}/{stage}"] = ds
    return dict(sorted(found.items(), key=lambda kv: _algorithm(kv[1]) != "GRPO"))


def steps_sibling(run_dir: Path) -> Path | None:
    """The sibling run of configs/smollm_steps.yaml (``runs/<run>_steps``: step updates stored as rank-r factors)
    once its frontier has results."""
    d = run_dir.parent / f"{run_dir.name}_steps"
    kinds = run_stages(d)
    if not {"rl", "frontier"} <= set(kinds.values()):
        return None
    rl = next(s for s, k in kinds.items() if k == "rl")
    return d if recorded_config(load_results(d / rl / "results.nc")).get("collect_step_rank") else None


def _text_steps(steps_dir: Path) -> str:
    """The step-update frontier of the sibling run: what a compressed step costs and keeps, the held-out reward
    of its longer GRPO run, the frontier with its PCA baseline, and the run's wall time."""
    from .common import fmt_bytes

    kinds = run_stages(steps_dir)
    rl = next(s for s, k in kinds.items() if k == "rl")
    front = next(s for s, k in kinds.items() if k == "frontier")
    ds, fr = load_results(steps_dir / rl / "results.nc"), load_results(steps_dir / front / "results.nc")
    cfg = recorded_config(ds)
    c = store_cost(steps_dir / rl / "updates" / "steps")
    rewards = ", ".join(
        f"{t} {float(ds.eval_reward_init.sel(task=t)):.2f} → {float(ds.eval_reward_final.sel(task=t)):.2f} "
        f"(n = {int(ds.eval_n.sel(task=t))})"
        for t in ds.task.values
    )
    where = f"runs/{steps_dir.name}"
    return (
        f"#### Step updates (`{where}`, `configs/smollm_steps.yaml`)\n\n"
        f"GRPO with the settings above for {cfg.get('steps')} steps (`{where}/{rl}`), collecting no events: each "
        f"optimizer step's change of the {c['matrices']} MLP matrices is stored as the factors of its randomized "
        f"rank-{cfg.get('collect_step_rank')} SVD, {fmt_bytes(c['disk_per_event'])} per step on disk against "
        f"{fmt_bytes(c['dense_per_event'])} dense ({c['dense_per_event'] / c['disk_per_event']:.0f}× smaller). "
        f"The factors kept {c['kept_mean']:.3f} of a step's squared norm on average (lowest {c['kept_min']:.3f}), "
        "and the frontier below is of these parts. Held-out reward of this "
        f"longer run, before → after: {rewards}.\n\nHeld-out FVU of signed SAEs with 256 latents on the "
        f"{c['events']} steps (`{where}/{front}/results.nc`): `steps`, {_event_ranks(fr, 'steps')} latents over all "
        f"{c['matrices']} matrices, never densified; `steps_one_matrix`, dense latents on layer 15's down_proj; "
        "`steps_one_matrix_time`, the same with the last 20% of the steps held out instead of a random 20% (a split "
        "by time: a randomly held-out step lies between training steps that Adam's momentum makes alike); "
        "`PCA`, the top-k principal components of the same training steps (a dense code of k numbers per step; "
        "each component a full-rank direction over the same matrices).\n\n"
        + frontier_table(fr)
        + f"\n\n- `{where}/{front}`: {findings.finding('frontier', fr)}\n\n"
        + _training_length(steps_dir, fr)
        + _sweep_peaks(fr)
        + wall_times(steps_dir)
    )


def _shard_points(run_dir: Path) -> list[tuple[dict, xr.Dataset]]:
    """(recorded config, results) of every shard SAE of a run: its shard stages and the points of its sweeps."""
    from .frontier import sweep_folders

    out = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        points = [] if (d / "results.nc").is_file() else sweep_folders(d)  # a sweep's folder holds its points
        for f in [d / "results.nc", *(q / "results.nc" for q in points)]:
            if f.is_file():
                r = load_results(f)
                if "heldout_fvu" in r and "train_fvu" in r:
                    out.append((recorded_config(r), r))
    return out


def _split_key(cfg: dict) -> str:
    """What decides a shard fit's events and held-out split (``frontier.SPLIT_KEYS``, as the PCA baseline reads it)."""
    from .frontier import SPLIT_KEYS

    return json.dumps([cfg.get(key) for key in SPLIT_KEYS], sort_keys=True)


def _split_names(frontier: xr.Dataset) -> dict[str, str]:
    """The frontier's store names by what decides their events and split (:func:`_split_key`)."""
    from .frontier import sweep_folders

    cfg, names = recorded_config(frontier), {}
    for name, d in zip(cfg.get("sweep_names", []), cfg.get("sweep_dirs", [])):
        f = next((q / "results.nc" for q in sweep_folders(d) if (q / "results.nc").is_file()), None)
        if f is not None:
            names.setdefault(_split_key(recorded_config(load_results(f))), name)
    return names


def _training_length(run_dir: Path, frontier: xr.Dataset) -> str:
    """Held-out and training FVU of the run's SAEs on a frontier store's events and split, fitted at one rank, k and
    number of latents for more epochs, with another dead-latent window or with restarts stopped earlier (the longer
    fits beside the frontier), against the frontier's PCA baseline; each variant compared with the fewest epochs,
    the widest window and restarts to the end (a frontier point where it is one)."""
    from .trainer import TrainConfig

    names = _split_names(frontier)
    groups: dict[tuple, dict[tuple[int, int], xr.Dataset]] = {}
    for c, r in _shard_points(run_dir):
        store = names.get(_split_key(c))
        if store is not None:
            variant = (
                int(c["epochs"]),
                -int(c.get("dead_window", TrainConfig.dead_window)),
                -float(c.get("restart_until", TrainConfig.restart_until)),
            )
            key = (store, int(c["rank"]), int(c["k"]), int(c.get("n_latents", 0)))
            groups.setdefault(key, {})[variant] = r
    rows, sentences = [], []
    for (store, rank, k, n_lat), variants in sorted(groups.items()):
        if len(variants) < 2:
            continue
        try:
            pca = float(frontier.pca_fvu.sel(store=store, k=k))
        except (KeyError, AttributeError):
            pca = float("nan")
        label = "dense" if rank == 0 else str(rank)
        base, *others = sorted(variants.items())
        for (e, w, u), r in [base, *others]:
            rows.append(
                [
                    store,
                    label,
                    str(n_lat),
                    str(k),
                    str(e),
                    f"{-w:,}",
                    f"{-u:.0%}",
                    f"{float(r.heldout_fvu):.3f}",
                    f"{float(r.train_fvu):.3f}",
                    f"{float(r.train_dead_fraction):.2f}",
                    f"{pca:.3f}",
                ]
            )
        (e0, w0, u0), r0 = base
        h0 = float(r0.heldout_fvu)
        for (e, w, u), r in others:
            h = float(r.heldout_fvu)
            closed = (h0 - h) / (h0 - pca) if h0 > pca and h <= h0 else float("nan")  # worse: no share
            how = [
                f"{e} epochs" if e != e0 else "",
                f"a dead-latent window of {-w:,} samples" if w != w0 else "",
                f"restarts only in the first {-u:.0%} of the steps" if u != u0 else "",
            ]
            sentences.append(
                f"{store}, {'dense' if rank == 0 else f'rank {rank}'}, k = {k}, with "
                + " and ".join(x for x in how if x)
                + f" instead of {e0} epochs and a {-w0:,}-sample window"
                + (" with restarts allowed to the end" if u != u0 else "")
                + f": held-out FVU {h0:.3f} → {h:.3f}"
                + (
                    f", below PCA's {pca:.3f}"
                    if h < pca
                    else f", {closed:.0%} of the way to PCA's {pca:.3f}"
                    if np.isfinite(closed)
                    else ""
                )
                + (", worse" if h > h0 else "")
                + f" (training FVU {float(r0.train_fvu):.3f} → {float(r.train_fvu):.3f})."
            )
    if not rows:
        return ""
    return (
        "Longer fits: SAEs on a frontier store's events and split, at one rank and k, trained for more epochs (each fit with "
        "its own learning-rate schedule) or restarting latents that fired on none of a shorter window of samples "
        "(`dead_window`; AuxK and resampling act on latents dead by that window), the restarts either until the rate "
        "reaches 0 or only in the first part of the steps (`restart_until`); one seed. `dead` is the fraction of "
        "latents that fire on no training event after training.\n\n"
        + markdown_table(
            [
                "store",
                "rank",
                "latents",
                "k",
                "epochs",
                "dead window",
                "restarts until",
                "held-out FVU",
                "training FVU",
                "dead",
                "PCA held-out FVU",
            ],
            rows,
        )
        + "\n\n"
        + " ".join(sentences)
        + "\n\n"
    )


def _sweep_peaks(frontier: xr.Dataset) -> str:
    """The peak resident memory of a frontier's SAE stages, lowest to highest per (store, rank), from each sweep
    point's ``results.nc`` (the folders the frontier's config names)."""
    from .common import fmt_bytes
    from .frontier import sweep_folders

    cfg = recorded_config(frontier)
    peaks: dict[tuple[str, int], list[float]] = {}
    for name, d in zip(cfg.get("sweep_names", []), cfg.get("sweep_dirs", [])):
        for folder in sweep_folders(d):
            f = folder / "results.nc"
            if f.is_file():
                r = load_results(f)
                if "peak_rss_bytes" in r:
                    key = (name, int(recorded_config(r).get("rank", -1)))
                    peaks.setdefault(key, []).append(float(r.peak_rss_bytes))
    if not peaks:
        return ""
    parts = [
        f"{store} {'dense' if rank == 0 else f'rank {rank}'} {fmt_bytes(min(v))}–{fmt_bytes(max(v))}"
        for (store, rank), v in sorted(peaks.items())
    ]
    return "Peak resident memory of the frontier's SAE stages: " + ", ".join(parts) + f". {WALL}\n\n"


STUDY_TARGET_MIN = 20
"""Minutes the whole SmolLM2 study should take on 2 CPU cores (issue 21)."""


def smollm_markdown(run_dir) -> str:
    """The README's SmolLM2 block for a run of configs/smollm.yaml, its stages found by kind (:func:`run_stages`):
    the GRPO and SFT runs (by ``algorithm``), the shard SAE over every collected matrix and the one over a few
    (the analysis's; by their ``params``)."""
    run_dir = Path(run_dir)
    by = by_kind(run_dir, SMOLLM_KINDS, "make study CONFIG=configs/smollm.yaml RUN=smollm")
    ds = {s: load_results(run_dir / s / "results.nc") for names in by.values() for s in names}
    find = {s: findings.finding(k, ds[s]) for k, names in by.items() for s in names}
    algo = {s: recorded_config(ds[s]).get("algorithm") for s in by["rl"]}
    grpo, sft = (
        next((s for s in by["rl"] if algo[s] != "sft"), None),
        next((s for s in by["rl"] if algo[s] == "sft"), None),
    )
    if grpo is None or sft is None:
        raise ReportError(f"{run_dir} lacks a GRPO run or its SFT control (stages of kind rl: {by['rl']})")
    replicas = rl_replicas(run_dir)
    shards = sorted(by["shards"], key=lambda s: bool(recorded_config(ds[s]).get("params")))  # every matrix first
    whole, one = shards[0], shards[-1]
    frontier, sparsity, analysis = by["frontier"][0], by["sparsity"][0], by["analysis"][0]
    return "\n\n".join(
        [
            f"Generated by `python -m shardlib report --run {run_dir.name}` from `runs/{run_dir.name}/*/results.nc` and "
            "the run's update store; every number below is read from those files.",
            wall_times(run_dir, target_min=STUDY_TARGET_MIN),
            bullets(by["model"], find),
            "#### GRPO against the SFT control\n\n" + _text_rl({grpo: ds[grpo], sft: ds[sft]}, replicas),
            bullets([grpo, sft], find),
            "#### (1) What storing per-event updates costs\n\n" + _text_storage(run_dir, grpo, ds[grpo]),
            "#### (2, 3) Shards on the factored store; do updates reconstruct sparsely?\n\nHeld-out FVU of signed SAEs "
            f"with 256 latents (`{frontier}/results.nc`): `events`, {_event_ranks(ds[frontier])} latents over all 90 "
            "matrices, never densified; `events_one_matrix`, the dense reference on one matrix (layer 15's "
            "down_proj), its events made dense; `PCA`, the top-k principal components of the same training events "
            "(a dense code of k numbers per event, each component a full-rank direction: the baseline fitted to the "
            "same data).\n\n" + frontier_table(ds[frontier]),
            bullets([whole, frontier], find),
            _text_sae_cost(whole, ds[whole], ds[frontier]),
            *([longer] if (longer := _training_length(run_dir, ds[frontier]).strip()) else []),
            *([_text_steps(steps)] if (steps := steps_sibling(run_dir)) is not None else []),
            "#### Are RL updates sparse on a real model?\n\nFraction of parameters unchanged "
            f"(`{sparsity}/results.nc`).\n\n" + _text_sparsity(ds[sparsity]),
            bullets([sparsity], find),
            f"#### What shards mean and do\n\nOne matrix's shards (`{one}`: layer 15's down_proj, 64 latents; "
            "the analysis makes events and shards dense), against event types (task × correct, and format where it varies; "
            f"`shardlib/events.py`) and as interventions on the fine-tuned policy (`{analysis}/results.nc`).",
            bullets([one, analysis], find),
        ]
    )
