"""The README's Results, generated from a run's results files: ``python -m shardlib report --run default``.

Writes the tables and every stage's Finding (:mod:`shardlib.findings`) between the markers
``<!-- results:begin -->`` and ``<!-- results:end -->`` of README.md; ``--check`` exits non-zero
when the README differs from what the run's results give (wall-clock lines, marked
``<!-- wall-clock -->``, are left out of the check: they differ from run to run). Also writes
``runs/<run>/report.html``: the figures, the Findings and the run's provenance, readable without Python.

The blocks are drawn by :mod:`shardlib.report_default` (a run of configs/default.yaml) and
:mod:`shardlib.report_smollm` (configs/smollm.yaml, between ``<!-- smollm:begin -->`` and
``<!-- smollm:end -->``) from the run's stages as :mod:`shardlib.runs` finds them.
"""

from __future__ import annotations

import base64
import html
import json
import re
import sys
from pathlib import Path

from . import findings
from .io import load_results
from .report_default import results_markdown
from .report_smollm import is_smollm_run, smollm_markdown
from .runs import WALL, ReportError, run_stages, wall_times

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SMOLLM_BEGIN, SMOLLM_END = "<!-- smollm:begin -->", "<!-- smollm:end -->"


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
        # the summary keeps every negative verdict: a headline alone would drop "Negative: ..." sentences
        negatives = [s.strip().rstrip(".") for s in re.findall(r"Negative: [^.]*(?:\.\d[^.]*)*\.?", text)]
        negatives = [n for n in negatives if n not in headline]  # a headline that is itself a Negative: once
        line = html.escape(headline) + "." + "".join(f" <b>{html.escape(n)}.</b>" for n in negatives)
        summary.append(f"<li><a href='#{stage}'>{html.escape(stage)}</a>: {line}</li>")
        if "figures" in found.values():  # the run's figures stage: each figure with its caption, at its Finding
            shown = [
                (figures_dir / f"{f}.png", cap)
                for f, (fig_kind, cap) in FIGURE_CAPTIONS.items()
                if fig_kind == kind and first[kind] == stage
            ]
        else:  # no figures stage (the SmolLM2 study): the PNGs the stage's notebook wrote
            shown = [(f, f"{stage}: {f.stem.replace('_', ' ')}") for f in sorted((run_dir / stage).glob("*.png"))]
        figs = [
            f"<figure><img alt='{f.stem}' src='data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
            for f, cap in shown
            if f.exists()
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
    times = re.sub(r"\s*<!--.*-->", "", wall_times(run_dir))
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
