"""The README's Results, generated from a run's results files: ``python -m shardlib report --run default``.

Writes the tables and every stage's Finding (:mod:`shardlib.findings`) between the markers
``<!-- results:begin -->`` and ``<!-- results:end -->`` of README.md; ``--check`` exits non-zero
when the README differs from what the run's results give (wall-clock lines, marked
``<!-- wall-clock -->``, are left out of the check: they differ from run to run). Also writes
``runs/<run>/report.html``: the figures, the Findings and the run's provenance, readable without Python.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from . import findings, stages
from .findings import nanmean
from .io import load_results, sweep_points
from .runner import params_class_name
from .stages import KINDS, kind_of

BEGIN, END, WALL = "<!-- results:begin -->", "<!-- results:end -->", "<!-- wall-clock -->"


class ReportError(RuntimeError):
    pass


def stage_kind(folder: Path) -> str | None:
    """The kind (:data:`shardlib.stages.KINDS`) of the stage whose results lie in ``folder``: the kind of the
    ``Params`` class its executed notebook (``notebook.ipynb``) validates with, or else of the one ``Params``
    class whose fields hold every parameter its ``results.nc`` records (a stage run by ``shardlib.launch``);
    None when neither tells."""
    nb = folder / "notebook.ipynb"
    if nb.exists():
        found = params_class_name(nb)
        if found is not None and kind_of(*found) is not None:
            return kind_of(*found)
    try:
        keys = set(json.loads(load_results(folder / "results.nc").attrs.get("config", "{}")))
    except (OSError, ValueError):
        return None
    fits = [k for k in KINDS if keys and keys <= {f.name for f in dataclasses.fields(stages.params_class(k))}]
    return fits[0] if len(fits) == 1 else None


def run_stages(run_dir) -> dict[str, str]:
    """``{stage folder: kind}`` for every stage folder of a run that holds results (``<folder>/results.nc``)
    of a known kind, in the order of ``KINDS``, then of folder name: whatever the config named them."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    found = {}
    for d in sorted(run_dir.iterdir()):
        kind = stage_kind(d) if (d / "results.nc").is_file() else None
        if kind is not None:
            found[d.name] = kind
    order = list(KINDS)
    return dict(sorted(found.items(), key=lambda item: (order.index(item[1]), item[0])))


def _by_kind(run_dir: Path, kinds, how: str) -> dict[str, list[str]]:
    """The run's stage folders of each of ``kinds``; a ReportError naming the kinds the run has no results of."""
    found = run_stages(run_dir)
    by = {k: [s for s, kind in found.items() if kind == k] for k in kinds}
    missing = [k for k, names in by.items() if not names]
    if missing:
        raise ReportError(f"{run_dir} lacks the results of {missing} (stage kinds); run the study first ({how})")
    return by


def _input_stage(path, names) -> str:
    """Which of the stage folders ``names`` a path a stage read (its parameter, as recorded) lies in."""
    return next((p for p in reversed(Path(str(path)).parts) if p in names), "?")


def _glob(names: list[str]) -> str:
    """One name, or the names' common prefix and ``*`` (``analysis_*``)."""
    return names[0] if len(names) == 1 else os.path.commonprefix(names) + "*"


def _cfg(ds: xr.Dataset) -> dict:
    return json.loads(ds.attrs.get("config", "{}"))


def _testbed(stage: str) -> str:
    return stage.split("_", 1)[-1]


def _bullets(names, find: dict[str, str]) -> str:
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
        label = "SFT control" if _cfg(ds).get("algorithm") == "sft" else "GRPO"
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


def _frontier(ds: xr.Dataset) -> str:
    rows = []
    for store in ds.store.values:
        for r in ds["rank"].values:
            label = "dense" if r == 0 else str(r)
            fvu = [float(ds.fvu.sel(store=store, rank=r, k=k)) for k in ds.k.values]
            if all(np.isnan(fvu)):  # a (store, rank) the sweeps did not train
                continue
            rows.append([f"{store}", label, *("–" if np.isnan(v) else f"{v:.2f}" for v in fvu)])
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
        "type means (oracle)",
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


def _times(run_dir: Path) -> str:
    """The stages' wall times (in the order they finished), their sum, and the span from the first start to the
    last finish with the number of stages run at once (``--jobs``)."""
    records = []
    for f in run_dir.glob("**/.stage.json"):
        points = sweep_points(f.parent.parent)  # a point a former config swept: not part of this run
        if points is not None and f.parent.name not in points:
            continue
        st = json.loads(f.read_text())
        if "seconds" in st:
            records.append((st.get("finished", f.stat().st_mtime), st.get("stage", f.parent.name), st))
    if not records:
        return ""
    records.sort(key=lambda r: r[0])
    body = ", ".join(f"{n} {st['seconds']:.0f} s" for _, n, st in records)
    total = sum(st["seconds"] for _, _, st in records)
    text = f"Stage wall times of this run: {body}; they add up to {total / 60:.1f} min."
    if all("started" in st for _, _, st in records):
        span = max(st["finished"] for _, _, st in records) - min(st["started"] for _, _, st in records)
        jobs = sorted({st.get("jobs", 1) for _, _, st in records})
        text += (
            f" From the first stage's start to the last one's end: {span / 60:.1f} min, "
            f"{' or '.join(map(str, jobs))} stage(s) at a time (`--jobs`)."
        )
    return f"{text} {WALL}"


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
    by = _by_kind(run_dir, DEFAULT_KINDS, "make study")
    ds = {s: load_results(run_dir / s / "results.nc") for names in by.values() for s in names}
    find = {s: findings.finding(k, ds[s]) for k, names in by.items() for s in names}
    one = {k: names[0] for k, names in by.items()}
    # the RL runs whose events a compositional stage reads are reported with it
    fed = [_input_stage(_cfg(ds[s]).get("store_path", ""), by["rl"]) for s in by["compositional"]]
    rl = {s: ds[s] for s in by["rl"] if s not in fed}
    analysis = {s: ds[s] for s in by["analysis"]}
    fig = f"figures/{run_dir.name}"
    cfg = _cfg(ds[one["pretrain"]])
    sections = [
        f"Generated by `python -m shardlib report --run {run_dir.name}` from `runs/{run_dir.name}/*/results.nc` "
        f"(seed {cfg.get('seed', '?')}); every number below is read from those files.",
        _times(run_dir),
        "### RL on both testbeds\n\nHeld-out mean reward per task family before → after fine-tuning "
        "(`eval_reward_init/final`, one sample per prompt at temperature 1).\n\n" + _rl(rl),
        _bullets(rl, find),
        f"![training curves]({fig}/training_curves.png)",
        f"### Are RL updates sparse?\n\nFraction of parameters unchanged (`{one['sparsity']}/results.nc`).\n\n"
        + _sparsity(ds[one["sparsity"]]),
        _bullets(by["sparsity"], find),
        f"![sparsity]({fig}/sparsity.png)",
        "### Can updates be reconstructed sparsely?\n\nHeld-out FVU of the LM's update stores "
        f"(`{one['frontier']}/results.nc`).\n\n" + _frontier(ds[one["frontier"]]),
        _bullets(by["frontier"] + by["shards"], find),
        f"![frontier]({fig}/frontier.png)",
        "### Positive control: planted shards\n\n" + _planted(ds[one["planted"]]),
        _bullets(by["planted"], find),
        "### What shards mean: alignment with event types\n\nMean ± std over SAE seeds "
        f"(`{_glob(by['analysis'])}/results.nc`); event types as defined in `shardlib/events.py`.\n\n"
        + _alignment(analysis),
        _bullets(analysis, find),
        f"![shard heatmap]({fig}/shard_event_heatmap.png)",
        "### Where events carry several computations: SAE against clustering\n\nThe two-head bandit "
        f"(`{fed[0]}`): every event reinforces one computation per head (head, its context cluster, the arm it "
        "took). Held-out per-event multi-label micro-F1 of each event's predicted set of computations (a unit's "
        "label set: the computations present in more than half of the training events it is active on), mean ± std "
        f"over SAE seeds (`{one['compositional']}/results.nc`).\n\n" + _compositional(ds[one["compositional"]]),
        _bullets(by["compositional"], find),
        "### What shards do: interventions\n\n" + _interventions(analysis),
        f"![interventions]({fig}/intervention.png)",
        f"### Toy models: published decompositions\n\nMean ± std over seeds (`{one['toy']}/results.nc`).\n\n"
        + _toy(ds[one["toy"]]),
        _bullets(by["toy"], find),
        f"![toy models]({fig}/toy_models.png)",
        f"![toy interventions]({fig}/toy_intervention.png)",
    ]
    return "\n\n".join(s for s in sections if s)


def _strip_wall(text: str) -> str:
    """The text without wall-clock lines and blank lines (what ``--check`` compares)."""
    return "\n".join(line for line in text.splitlines() if WALL not in line and line.strip())


READING = "### Reading the results"
NUMBER = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\d])")  # a measured value: two decimals or more


def stale_reading_numbers(text: str, generated: str) -> list[str]:
    """The numbers of the hand-written reading (from ``READING`` to the next ``## `` heading) that the generated
    Results do not print: a reading may only quote what the results files say."""
    if READING not in text:
        return []
    reading = text.split(READING, 1)[1].split("\n## ", 1)[0]
    return sorted({x for x in NUMBER.findall(reading) if x not in generated})


def update_readme(run_dir, readme, check: bool = False) -> bool:
    """Write (or, with ``check``, compare) the Results block; returns whether the README was already current:
    its Results block is the one the run generates and every number of its reading is one the block prints
    (:func:`stale_reading_numbers`)."""
    readme = Path(readme)
    text = readme.read_text()
    begin, end, render = (
        (SMOLLM_BEGIN, SMOLLM_END, smollm_markdown) if is_smollm_run(run_dir) else (BEGIN, END, results_markdown)
    )
    if begin not in text or end not in text:
        raise ReportError(f"{readme} has no {begin} ... {end} markers to write the results between")
    head, rest = text.split(begin, 1)
    old, tail = rest.split(end, 1)
    new = "\n" + render(run_dir) + "\n"
    current = _strip_wall(old) == _strip_wall(new)
    if not check and old != new:
        readme.write_text(head + begin + new + end + tail)
    stale = stale_reading_numbers(head + tail, new)
    if stale:
        print(f"{readme}: the reading quotes numbers the results do not print: {', '.join(stale)}", file=sys.stderr)
    return current and not stale


# each figure (figures/<name>.png) with its caption, shown under the first stage of its kind
FIGURE_CAPTIONS = {
    "training_curves": ("rl", "Training reward of the RL runs and the SFT control."),
    "sparsity": ("sparsity", "Share of parameters the fine-tunes left unchanged, under each lens."),
    "frontier": ("frontier", "Held-out FVU against L0 of the SAEs on the update stores."),
    "planted": ("planted", "Recovery of planted low-rank shards (the positive control)."),
    "shard_event_heatmap": ("analysis", "Mean |activation| of each shard by event type."),
    "intervention": ("analysis", "Reward change per task when a shard is added."),
    "online_offline": ("analysis", "Online shards (trained during RL) against offline ones."),
    "toy_models": ("toy", "SAEs on toy-model gradients against the published decompositions."),
    "toy_intervention": ("toy", "Toy models: what adding a recovered component does."),
}
PAGE_STYLE = (
    "body{font-family:sans-serif;max-width:70em;margin:auto;padding:0 1em}img{max-width:100%}"
    "figure{margin:1em 0}figcaption{font-size:0.9em;color:#333}li{margin:0.3em 0}"
)


def report_html(run_dir) -> Path:
    """``run_dir/report.html``, the reader's front page (one file, no server, images embedded): every stage's
    Finding as a short summary linking to its section, the figures captioned and tied to the Finding they
    support, each shard stage's index of shards (sortable) with every shard's card (:mod:`shardlib.browse`),
    and the run's provenance."""
    from .browse import SORT_SCRIPT, STYLE, Browser, stage_dirs

    run_dir = Path(run_dir)
    summary, sections, cards = [], [], []
    prov = None
    found = run_stages(run_dir)
    figures_dir = run_dir / next((s for s, k in found.items() if k == "figures"), "figures")
    first = {}  # the first stage of each kind, where its figures go
    for stage, kind in found.items():
        first.setdefault(kind, stage)
    for stage, kind in found.items():
        ds = load_results(run_dir / stage / "results.nc")
        prov = prov or {
            k: str(ds.attrs.get(k)) for k in ("git_commit", "git_dirty", "torch_version", "python_version", "created")
        }
        text = findings.finding(kind, ds)
        headline = text.split(". ")[0].removeprefix("Finding: ").rstrip(".")
        summary.append(f"<li><a href='#{stage}'>{html.escape(stage)}</a>: {html.escape(headline)}.</li>")
        figs = [
            f"<figure><img alt='{f}' src='data:image/png;base64,{base64.b64encode((figures_dir / f'{f}.png').read_bytes()).decode()}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
            for f, (fig_kind, cap) in FIGURE_CAPTIONS.items()
            if fig_kind == kind and first[kind] == stage
            if (figures_dir / f"{f}.png").exists()
        ]
        sections.append(f"<h2 id='{stage}'>{html.escape(stage)}</h2><p>{html.escape(text)}</p>" + "".join(figs))
        if kind == "analysis":
            shards_dir = stage_dirs(ds, run_dir)
            if shards_dir is not None:
                page = Browser(shards_dir, run_dir / stage).html(title=f"Shards of {shards_dir.name} ({stage})")
                cards.append(f"<section id='cards-{stage}'>{page}</section>")
                summary[-1] = summary[-1].replace("</li>", f" <a href='#cards-{stage}'>Shard cards</a>.</li>")
    parts = [f"<h1>shardlib run {html.escape(run_dir.name)}</h1>", "<h2>Findings</h2><ul>" + "".join(summary) + "</ul>"]
    parts += sections + cards
    if prov:
        parts.append("<h2>Provenance</h2><pre>" + html.escape(json.dumps(prov, indent=1)) + "</pre>")
    times = re.sub(r"\s*<!--.*-->", "", _times(run_dir))
    if times:
        parts.append(f"<p>{html.escape(times)}</p>")
    out = run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(
        f"<!doctype html><meta charset='utf-8'><title>shardlib run {html.escape(run_dir.name)}</title>"
        f"<style>{PAGE_STYLE}</style>{STYLE}{SORT_SCRIPT}<body>" + "\n".join(parts) + "</body>"
    )
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------
# The SmolLM2 study (configs/smollm.yaml): its own block of the README

SMOLLM_BEGIN, SMOLLM_END = "<!-- smollm:begin -->", "<!-- smollm:end -->"
SMOLLM_KINDS = ("model", "rl", "shards", "frontier", "sparsity", "analysis")


def is_smollm_run(run_dir) -> bool:
    """A run of configs/smollm.yaml (it has a stage of kind ``model``), reported in its own README block."""
    return "model" in run_stages(run_dir).values()


def _text_rl(runs: dict[str, xr.Dataset]) -> str:
    """Per-family held-out reward before and after, GRPO (the first of ``runs``) and the SFT control (the second)."""
    rows, rises = [], {}
    grpo, sft = runs
    for stage, ds in runs.items():
        d = ds.eval_reward_final - ds.eval_reward_init
        rises[stage] = int((d >= 0.05).sum())
        for t in ds.task.values:
            r = ds.sel(task=t)
            rows.append(
                [
                    stage,
                    str(t),
                    f"{float(r.eval_reward_init):.2f}",
                    f"{float(r.eval_reward_final):.2f}",
                    f"{float(r.eval_reward_final - r.eval_reward_init):+.2f}",
                    str(int(r.eval_n)),
                ]
            )
    table = markdown_table(["stage", "family", "before", "after", "change", "held-out prompts"], rows)
    cfg = _cfg(runs[grpo])
    verdict = "met" if rises[grpo] >= 3 else "NOT met"
    return (
        table + f"\n\nHeld-out reward rose by ≥ 0.05 on {rises[grpo]} of {runs[grpo].sizes['task']} families "
        f"under GRPO (target ≥ 3: {verdict}) and on {rises[sft]} under the SFT control. Rewards are correct "
        f"(1) plus the bare-number format clause ({cfg.get('format_bonus')}), one sampled completion per prompt at "
        f"temperature {cfg.get('temperature')}."
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


def collection_overhead(ds: xr.Dataset) -> float:
    """Median seconds of a step that collected updates over one that did not, from the RL history (step 0, the
    warm-up, left out); NaN when every step collected."""
    cfg = json.loads(ds.attrs.get("config", "{}"))
    every = int(cfg.get("collect_every", 1))
    steps, sec = ds.step.values, 1.0 / ds.steps_per_s.values
    on, off = sec[(steps % every == 0) & (steps > 0)], sec[(steps % every != 0) & (steps > 0)]
    return float(np.median(on) / np.median(off)) if len(on) and len(off) else float("nan")


def _text_storage(run_dir: Path, stage: str, rl: xr.Dataset) -> str:
    """Bytes per event of the GRPO stage's factored store against dense, and the cost of collecting (``rl``: its
    results)."""
    from .common import fmt_bytes

    c = store_cost(run_dir / stage / "updates" / "events")
    ratio = c["dense_per_event"] / c["disk_per_event"]
    over = collection_overhead(rl)
    rank = json.loads(rl.attrs.get("config", "{}")).get("collect_max_rank") or "exact"
    return (
        f"{c['events']} GRPO events, every one holding all {c['matrices']} collected matrices as factors (rank "
        f"≤ {rank}): "
        f"{fmt_bytes(c['disk_per_event'])} per event on disk (labels, text and netCDF overhead included) against "
        f"{fmt_bytes(c['dense_per_event'])} dense fp32: {ratio:.0f}× smaller (target ≥ 30×: "
        f"{'met' if ratio >= 30 else 'NOT met'}); the compression kept {c['kept_mean']:.3f} of each event's squared "
        f"norm on average (lowest {c['kept_min']:.3f}). A step that collected took {over:.2f}× as long as one that "
        f"did not (median; target ≤ 1.5×: {'met' if over <= 1.5 else 'NOT met'})."
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
            "Mukherjee et al. (bf16, |Δ| ≤ 1e-5)",
            "single events, exact zeros (collected matrices; a zero-advantage event is all zeros)",
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
        f"latents) trained on the factored store in {float(shards['train_seconds']):.0f} s, {mem}; the frontier "
        f"reaches k = {kmax} (target k = 64: {'met' if kmax >= 64 else 'NOT met'})."
    )


def smollm_markdown(run_dir) -> str:
    """The README's SmolLM2 block for a run of configs/smollm.yaml, its stages found by kind (:func:`run_stages`):
    the GRPO and SFT runs (by ``algorithm``), the shard SAE over every collected matrix and the one over a few
    (the analysis's; by their ``params``)."""
    run_dir = Path(run_dir)
    by = _by_kind(run_dir, SMOLLM_KINDS, "make study CONFIG=configs/smollm.yaml RUN=smollm")
    ds = {s: load_results(run_dir / s / "results.nc") for names in by.values() for s in names}
    find = {s: findings.finding(k, ds[s]) for k, names in by.items() for s in names}
    algo = {s: _cfg(ds[s]).get("algorithm") for s in by["rl"]}
    grpo, sft = (
        next((s for s in by["rl"] if algo[s] != "sft"), None),
        next((s for s in by["rl"] if algo[s] == "sft"), None),
    )
    if grpo is None or sft is None:
        raise ReportError(f"{run_dir} lacks a GRPO run or its SFT control (stages of kind rl: {by['rl']})")
    shards = sorted(by["shards"], key=lambda s: bool(_cfg(ds[s]).get("params")))  # every matrix first
    whole, one = shards[0], shards[-1]
    frontier, sparsity, analysis = by["frontier"][0], by["sparsity"][0], by["analysis"][0]
    return "\n\n".join(
        [
            f"Generated by `python -m shardlib report --run {run_dir.name}` from `runs/{run_dir.name}/*/results.nc` and "
            "the run's update store; every number below is read from those files.",
            _times(run_dir),
            _bullets(by["model"], find),
            "#### GRPO against the SFT control\n\n" + _text_rl({grpo: ds[grpo], sft: ds[sft]}),
            _bullets([grpo, sft], find),
            "#### (1) What storing per-event updates costs\n\n" + _text_storage(run_dir, grpo, ds[grpo]),
            "#### (2, 3) Shards on the factored store; do updates reconstruct sparsely?\n\nHeld-out FVU of signed SAEs "
            f"with 256 latents (`{frontier}/results.nc`): `events`, rank-1 latents over all 90 matrices, never "
            "densified; `events_one_matrix`, the dense reference on one matrix (layer 15's down_proj), its events "
            "made dense.\n\n" + _frontier(ds[frontier]),
            _bullets([whole, frontier], find),
            _text_sae_cost(whole, ds[whole], ds[frontier]),
            "#### Are RL updates sparse on a real model?\n\nFraction of parameters unchanged "
            f"(`{sparsity}/results.nc`).\n\n" + _text_sparsity(ds[sparsity]),
            _bullets([sparsity], find),
            f"#### What shards mean and do\n\nOne matrix's shards (`{one}`: layer 15's down_proj, 64 latents; "
            "the analysis makes events and shards dense), against event types (task × correct × format, "
            f"`shardlib/events.py`) and as interventions on the fine-tuned policy (`{analysis}/results.nc`).",
            _bullets([analysis], find),
        ]
    )
