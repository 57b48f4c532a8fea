"""The README's Results block for the default study (configs/default.yaml): one markdown table per stage kind
and :func:`results_markdown`, which sets them with every stage's Finding (:mod:`shardlib.findings`). The
SmolLM2 block (:mod:`shardlib.report_smollm`) draws its tables with :func:`markdown_table` too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from . import findings
from .findings import nanmean
from .io import load_results
from .runs import WALL, by_kind, input_stage, recorded_config, wall_times


def _glob(names: list[str]) -> str:
    """One name, or the names' common prefix and ``*`` (``analysis_*``)."""
    return names[0] if len(names) == 1 else os.path.commonprefix(names) + "*"


def _testbed(stage: str) -> str:
    return stage.split("_", 1)[-1]


def bullets(names, find: dict[str, str]) -> str:
    """One line per stage of ``names``: the stage and its Finding (``find``)."""
    return "\n".join(f"- `{s}`: {find[s]}" for s in names)


def _ms(da, digits: int = 3) -> str:
    return findings.mean_std(da, digits, missing="–")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, its rule, one line per row (cells as given)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _rl(runs: dict[str, xr.Dataset]) -> str:
    rows = []
    for stage, ds in runs.items():
        label = "SFT control" if recorded_config(ds).get("algorithm") == "sft" else "GRPO"
        fam = " / ".join(str(t) for t in ds.task.values)
        rows.append(
            [
                f"{stage} ({label})",
                fam,
                " / ".join(f"{v:.2f}" for v in ds.eval_reward_init.values),
                " / ".join(f"{v:.2f}" for v in ds.eval_reward_final.values),
                " / ".join(str(int(n)) for n in ds.eval_n.values),
            ]
        )
    return markdown_table(["stage", "task families", "before", "after", "held-out prompts"], rows)


def _sparsity(ds: xr.Dataset) -> str:
    rows = []
    for run in ds.run.values:
        r = ds.sel(run=run)
        rows.append(
            [
                str(run),
                f"{float(r.unchanged.sel(scope='cumulative', tau=0.0)):.4f}",
                f"{float(r.bf16_unchanged.sel(scope='cumulative')):.4f}",
                f"{float(r.mukherjee_unchanged.sel(scope='cumulative')):.4f}",
                f"{float(r.unchanged.sel(scope='step', tau=1e-5)):.3f}",
                f"{float(r.unchanged.sel(scope='event', tau=0.0)):.2f}",
                f"{float(r.rank_ratio.sel(scope='cumulative')):.2f}",
            ]
        )
    head = [
        "run",
        "cumulative, fp32 exact",
        "cumulative, bf16",
        "cumulative, bf16 & ≤1e-5 (Mukherjee)",
        "one step, \\|Δ\\| ≤ 1e-5",
        "one event, exact zero",
        "rank ratio (cumulative)",
    ]
    return markdown_table(head, rows)


def frontier_table(ds: xr.Dataset) -> str:
    rows = []
    for store in ds.store.values:
        for r in ds["rank"].values:
            label = "dense" if r == 0 else str(r)
            fvu = [float(ds.fvu.sel(store=store, rank=r, k=k)) for k in ds.k.values]
            if all(np.isnan(fvu)):  # a (store, rank) the sweeps did not train
                continue
            rows.append([f"{store}", label, *("–" if np.isnan(v) else f"{v:.2f}" for v in fvu)])
        if "pca_fvu" in ds and not ds.pca_fvu.sel(store=store).isnull().all():  # k components of the same events
            pca = [float(ds.pca_fvu.sel(store=store, k=k)) for k in ds.k.values]
            rows.append([f"{store}", "PCA", *("–" if np.isnan(v) else f"{v:.2f}" for v in pca)])
    return markdown_table(["store", "rank", *[f"k = {int(k)}" for k in ds.k.values]], rows)


def _planted(ds: xr.Dataset) -> str:
    rows = []
    for r in ds["rank"].values:
        s = ds.sel(rank=r)
        rows.append(
            [
                "dense" if r == 0 else f"rank {r}",
                _ms(s.mmcs_g2d),
                _ms(s.mmcs_d2g, 2),
                f"{_ms(s['r_at_0.9'], 2)} ({_ms(s.uniqueness, 2)})",
                _ms(s.hungarian_mcc),
                _ms(s.fvu),
                f"{int(s.n_parameters.values.ravel()[0]):,}",
                f"{float(s.seed_stability):.2f}",
            ]
        )
    head = [
        "SAE",
        "MMCS(G→D)",
        "MMCS(D→G)",
        "R@0.9 (uniqueness)",
        "Hungarian MCC",
        "held-out FVU",
        "parameters",
        "seed stability",
    ]
    out = markdown_table(head, rows)
    if "family_mmcs_g2d" in ds:
        fam, times = [], []
        for m in ds.member.values:
            for kind in ds.sae.values:
                f = ds.sel(member=m, sae=kind)
                fam.append(
                    [
                        str(m),
                        f"{kind} ({int(f.family_n_parameters.values.ravel()[0]):,} parameters)",
                        _ms(f.family_mmcs_g2d),
                        _ms(f["family_r_at_0.9"], 2),
                        _ms(f.family_fvu),
                        _ms(f.family_dead_fraction, 2),
                    ]
                )
                times.append(f"{m} {kind} {float(f.family_seconds.mean()):.0f} s")
        n_seeds = ds.sizes["family_seed"]
        out += (
            f"\n\nThe planted family, each member fitted at the shard stage's defaults ({n_seeds} seed(s)):\n\n"
            + markdown_table(["member", "SAE", "MMCS(G→D)", "R@0.9", "held-out FVU", "dead"], fam)
            + f"\n\nFitting times of the family's SAEs: {', '.join(times)}. {WALL}"  # wall-clock: not checked
        )
    return out


STUDY_TARGET_MIN = 6
"""Minutes the default study should take on 2 CPU cores (issue 21: it stays as it was)."""

ALIGNMENT_ROWS = {
    "nmi": "NMI",
    "ari": "ARI",
    "purity": "purity",
    "auroc": "best (latent, sign) AUROC",
    "types_matched": "types matched at \\|cos\\| > 0.9",
    "type_match": "type-mean match (Hungarian \\|cos\\|)",
}


def _alignment_rows(ds: xr.Dataset, name: str) -> list[list[str]]:
    """One row per alignment metric: the SAE, the dictionaries fitted to the same events, and chance."""
    rows = []
    fitted = "nmi_kmeans" in ds
    for m, label in ALIGNMENT_ROWS.items():
        d = 1 if m == "types_matched" else 3
        rand = f"{nanmean(ds[f'{m}_random']):.{d}f}"
        if f"{m}_random_std" in ds:
            rand += f" ± {nanmean(ds[f'{m}_random_std']):.{d}f}"
        row = [name, label, _ms(ds[m], d)]
        row += [_ms(ds[f"{m}_{b}"], d) if fitted else "n/a" for b in ("kmeans", "pca", "events", "oracle")]
        rows.append(row + [_ms(ds[f"{m}_shuffled"], d), rand])
    return rows


def _alignment(runs: dict[str, xr.Dataset]) -> str:
    """The analysis stages' alignment table, event counts, type coherence and settings table."""
    rows, settings, coh, counts = [], [], [], []
    for stage, ds in runs.items():
        name = _testbed(stage)
        n = int(np.asarray(ds.n_types).ravel()[0])
        rows += _alignment_rows(ds, name)
        if "n_events" in ds:
            counts.append(
                f"{name}: {int(ds.n_events)} events, {n} types ({int(ds.n_zero_events)} zero updates left out)"
            )
        big = ds.type_count.values >= 20  # small types read high (1/sqrt(n) for unrelated directions)
        c = ds.type_coherence.values[big]
        if not big.any():
            coh.append(f"{name}: no type has ≥ 20 events")
        else:
            c1 = ds.type_coherence_rank1.values[big] if "type_coherence_rank1" in ds else None
            sign_free = (
                f"; sign-free (top singular share) {np.nanmin(c1):.2f}–{np.nanmax(c1):.2f} (median {np.nanmedian(c1):.2f})"
                if c1 is not None
                else ""
            )
            coh.append(
                f"{name}: {int(big.sum())} of {n} types have ≥ 20 events; signed coherence "
                f"{np.nanmin(c):.2f}–{np.nanmax(c):.2f} (median {np.nanmedian(c):.2f}){sign_free}"
            )
        if "setting_nmi" in ds:
            for k in ds.setting_k.values:
                for norm in ds.setting_normalize.values:
                    s = ds.sel(setting_k=k, setting_normalize=norm)
                    km = f"{float(s.setting_nmi_kmeans):.3f}" if "setting_nmi_kmeans" in s else "n/a"
                    settings.append(
                        [
                            name,
                            str(int(k)),
                            "unit" if bool(norm) else "raw",
                            f"{float(s.setting_nmi):.3f} ({km} / {float(s.setting_nmi_random):.3f})",
                            f"{float(s.setting_types_matched):.0f} of {n} ({float(s.setting_types_matched_kmeans):.0f} / "
                            f"{float(s.setting_types_matched_random):.1f})"
                            if "setting_types_matched_kmeans" in s
                            else f"{float(s.setting_types_matched):.0f} of {n}",
                            f"{float(s.setting_heldout_fvu):.3f}",
                        ]
                    )
    head = [
        "testbed",
        "metric",
        "SAE",
        "k-means",
        "PCA",
        "drawn events",
        "type means",
        "shuffled labels",
        "random dict. (5 seeds)",
    ]
    out = markdown_table(head, rows)
    if counts:
        out += "\n\nEvents aligned: " + "; ".join(counts) + "."
    if coh:
        out += "\n\nCoherence of the event types (1 = one computation): " + "; ".join(coh) + "."
    if settings:  # the table is in notebook 07 and report.html; the README names the best setting in the Findings
        out += (
            f"\n\nWhat the SAE's settings do ({len(settings)} SAEs: k × raw or unit-normalised updates, each beside "
            "k-means and random dictionaries): notebook 07's table; the Findings name the best setting."
        )
    return out


COMPOSITIONAL_NAMES = {
    "sae": "SAE",
    "kmeans": "k-means, one cluster per event",
    "kmeans_dict": "k-means centroids as a dictionary (top-k)",
    "pca": "PCA directions (top-k)",
    "oracle": "the computations' means (oracle, top-k)",
}


def _compositional(ds: xr.Dataset) -> str:
    rows = [
        [
            COMPOSITIONAL_NAMES.get(str(m), str(m)),
            _ms(ds.f1.sel(approach=m)),
            _ms(ds.precision.sel(approach=m)),
            _ms(ds.recall.sel(approach=m)),
            _ms(ds.types_matched.sel(approach=m), 1),
        ]
        for m in ds.approach.values
    ]
    rows.append(["random dictionaries", _ms(ds.f1_random), "", "", ""])
    head = ["dictionary", "micro-F1", "precision", "recall", f"of {int(ds.n_computations)} computations matched"]
    return markdown_table(head, rows)


def _interventions(runs: dict[str, xr.Dataset]) -> str:
    rows = []
    for stage, ds in runs.items():
        if "moves" not in ds:
            continue
        rows.append(
            [
                _testbed(stage),
                ", ".join(f"{t} {v:.3f}" for t, v in zip(ds.task.values, ds.noise_floor.values)),
                f"{nanmean(ds.moves):.2f} ({nanmean(ds.random_moves):.2f})",
                f"{nanmean(ds.specificity):.2f} ({nanmean(ds.random_specificity):.2f})",
                f"{nanmean(ds.own_task_hit):.2f} ({float(ds.own_task_null):.2f}; p = {float(ds.own_task_p):.2f})",
                f"{nanmean(ds.ablate_moves):.2f}",
            ]
        )
    head = [
        "testbed",
        "noise floor per task",
        "share of shards moving reward above it (random span directions)",
        "specificity above the floor (random)",
        "own-task hit rate (shuffled-task null; p)",
        "share of shards whose ablation moves reward",
    ]
    return markdown_table(head, rows)


def _toy(ds: xr.Dataset) -> str:
    rows = []
    for case in ds.case.values:
        for act in ds.activation.values:
            s = ds.sel(case=case, activation=act)
            rows.append(
                [
                    str(case),
                    str(act),
                    _ms(s.mmcs_columnwise),
                    _ms(s.mmcs_truth_init),
                    _ms(s.mmcs_single_feature),
                    _ms(s.mmcs_whole, 2),
                    _ms(s.recon_error),
                    _ms(s.coef_r),
                ]
            )
    head = [
        "case",
        "activation",
        "MMCS per feature",
        "started at the truth",
        "one active feature per sample",
        "MMCS whole-direction",
        "reconstruction error",
        "coefficient r",
    ]
    pub = "; ".join(f"{k[len('published_') :]} = {v}" for k, v in ds.attrs.items() if k.startswith("published_"))
    return markdown_table(head, rows) + (f"\n\nPublished: {pub}." if pub else "")


DEFAULT_KINDS = (
    "pretrain",
    "rl",
    "shards",
    "frontier",
    "planted",
    "sparsity",
    "analysis",
    "compositional",
    "toy",
    "figures",
)


def results_markdown(run_dir) -> str:
    """The README's Results block (between the markers) for a run of configs/default.yaml, or of any config with a
    stage of each of ``DEFAULT_KINDS``: its stages are found by kind (:func:`run_stages`), not by folder name."""
    run_dir = Path(run_dir)
    by = by_kind(run_dir, DEFAULT_KINDS, "make study")
    ds = {s: load_results(run_dir / s / "results.nc") for names in by.values() for s in names}
    find = {s: findings.finding(k, ds[s]) for k, names in by.items() for s in names}
    one = {k: names[0] for k, names in by.items()}
    # the RL runs whose events a compositional stage reads are reported with it
    fed = [input_stage(recorded_config(ds[s]).get("store_path", ""), by["rl"]) for s in by["compositional"]]
    rl = {s: ds[s] for s in by["rl"] if s not in fed}
    analysis = {s: ds[s] for s in by["analysis"]}
    fig = f"figures/{run_dir.name}"
    cfg = recorded_config(ds[one["pretrain"]])
    sections = [
        f"Generated by `python -m shardlib report --run {run_dir.name}` from `runs/{run_dir.name}/*/results.nc` "
        f"(seed {cfg.get('seed', '?')}); every number below is read from those files.",
        wall_times(run_dir, target_min=STUDY_TARGET_MIN),
        "### RL on both testbeds\n\nHeld-out mean reward per task family before → after fine-tuning "
        "(`eval_reward_init/final`, one sample per prompt at temperature 1).\n\n" + _rl(rl),
        bullets(rl, find),
        f"![training curves]({fig}/training_curves.png)",
        f"### Are RL updates sparse?\n\nFraction of parameters unchanged (`{one['sparsity']}/results.nc`).\n\n"
        + _sparsity(ds[one["sparsity"]]),
        bullets(by["sparsity"], find),
        f"![sparsity]({fig}/sparsity.png)",
        "### Can updates be reconstructed sparsely?\n\nHeld-out FVU of the LM's update stores "
        f"(`{one['frontier']}/results.nc`); `PCA`: the top-k principal components of the same training updates, on "
        "the SAEs' held-out split (a dense code of k numbers per update).\n\n" + frontier_table(ds[one["frontier"]]),
        bullets(by["frontier"] + by["shards"], find),
        f"![frontier]({fig}/frontier.png)",
        "### Positive control: planted shards\n\n" + _planted(ds[one["planted"]]),
        bullets(by["planted"], find),
        "### What shards mean: alignment with event types\n\nMean ± std over SAE seeds "
        f"(`{_glob(by['analysis'])}/results.nc`); event types as defined in `shardlib/events.py`.\n\n"
        + _alignment(analysis),
        bullets(analysis, find),
        f"![shard heatmap]({fig}/shard_event_heatmap.png)",
        "### Where events carry several computations: SAE against clustering\n\nThe two-head bandit "
        f"(`{fed[0]}`): every event reinforces one computation per head (head, its context cluster, the arm it "
        "took). Held-out per-event multi-label micro-F1 of each event's predicted set of computations (a unit's "
        "label set: the computations present in more than half of the training events it is active on), mean ± std "
        f"over SAE seeds (`{one['compositional']}/results.nc`).\n\n" + _compositional(ds[one["compositional"]]),
        bullets(by["compositional"], find),
        "### What shards do: interventions\n\n" + _interventions(analysis),
        f"![interventions]({fig}/intervention.png)",
        f"### Toy models: published decompositions\n\nMean ± std over seeds (`{one['toy']}/results.nc`).\n\n"
        + _toy(ds[one["toy"]]),
        bullets(by["toy"], find),
        f"![toy models]({fig}/toy_models.png)",
        f"![toy interventions]({fig}/toy_intervention.png)",
    ]
    return "\n\n".join(s for s in sections if s)
