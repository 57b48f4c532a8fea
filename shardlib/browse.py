"""Shard cards: what one shard fires on and what it does, for a reader (in JupyterLab, notebook 07 and
``report.html``), after the feature pages of SAE dashboards (SAELens, Neuronpedia).

    from shardlib.browse import Browser
    b = Browser("runs/default/shards_lm", "runs/default/analysis_lm")  # the analysis folder is optional
    b.card(3)          # displays in JupyterLab (``_repr_html_``)
    b.index()          # one row per shard: frequency, dominant event type, effect

A card shows: the top events the shard fires on for each sign, in readable form (language models: the
prompt and completion text; the bandit: context cluster and arm), with reward, advantage, event type and
activation; events across activation quantiles; a histogram of its activations; its event-type split
with counts; where it lives (squared-norm share per tensor; for matrices, the output and input
coordinates — neurons — that carry most of it); what adding and ablating it does per task against the
analysis's noise floor; and its nearest type-mean update, other shards and online shard by cosine.
Everything is read from the shard stage's ``shards.nc`` and ``activations.nc`` and the analysis stage's
``results.nc``; nothing is trained or evaluated here.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .io import load_results
from .shardfile import dense_codes

QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
TEXT_CHARS = 160
CHAT_USER, CHAT_END = (
    "<|im_start|>user\n",
    "<|im_end|>",
)  # the ChatML markers of SmolLM2's template  # a prompt longer than this shows its end (a chat prompt's end is the question)


@dataclass
class ShardCard:
    """One shard's card as HTML (shown by JupyterLab)."""

    shard: int
    html: str

    def _repr_html_(self) -> str:
        return self.html


def _esc(x) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='card'><tr>{th}</tr>{body}</table>"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return f"<img alt='activation histogram' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


class Browser:
    """The cards of one shard stage (``shards_dir``), with the analysis of the same shards when given."""

    def __init__(self, shards_dir, analysis_dir=None):
        from .events import event_types

        self.shards_dir = Path(shards_dir)
        self.shards = load_results(self.shards_dir / "shards.nc")
        self.acts = load_results(self.shards_dir / "activations.nc")
        self.analysis = None
        if analysis_dir is not None and (Path(analysis_dir) / "results.nc").exists():
            self.analysis = load_results(Path(analysis_dir) / "results.nc")
        self.n = self.shards.sizes["shard"]
        self.names = list(json.loads(self.shards.attrs["sae_config"])["shapes"])
        self.codes = dense_codes(self.acts, self.n, signed=True).values
        label = json.loads(self.analysis.attrs.get("config", "{}")).get("event_type_label", "") if self.analysis else ""
        if label and label in self.acts.coords:
            self.types = np.array([str(v) for v in self.acts[label].values])
        elif "task" in self.acts.coords:
            self.types = event_types(self.acts)
        else:
            self.types = np.full(self.acts.sizes["event"], "")
        self.task_names = json.loads(self.acts.attrs["task_names"]) if "task_names" in self.acts.attrs else None
        self._gram = None

    # -- what a reader sees of one event -------------------------------------------------------------
    def describe(self, e: int) -> str:
        """Event ``e`` in readable form: prompt → completion (language models), cluster → arm (bandit)."""
        a = self.acts
        if "prompt_text" in a.coords:
            prompt = str(a["prompt_text"].values[e])
            if CHAT_USER in prompt:  # a chat template: the user's message is the question
                prompt = prompt.split(CHAT_USER)[-1].split(CHAT_END)[0]
            if len(prompt) > TEXT_CHARS:
                prompt = "…" + prompt[-TEXT_CHARS:]
            return f"<code>{_esc(prompt)}</code> → <b><code>{_esc(a['completion_text'].values[e])}</code></b>"
        task = ""
        if "task" in a.coords:
            t = int(a["task"].values[e])
            task = self.task_names[t] if self.task_names else f"task {t}"
        if "action" in a.coords:
            return f"{_esc(task)} → arm {int(a['action'].values[e])}"
        return _esc(task or f"event {e}")

    def _event_rows(self, i: int, events) -> list[list]:
        a, rows = self.acts, []
        for e in events:
            row = [f"{self.codes[e, i]:+.3g}", self.describe(e), _esc(self.types[e])]
            for c in ("reward", "advantage", "step"):
                row.append(f"{float(a[c].values[e]):.3g}" if c in a.coords else "")
            rows.append(row)
        return rows

    # -- the card ------------------------------------------------------------------------------------
    def card(self, shard: int, n_top: int = 5) -> ShardCard:
        """Shard ``shard``'s card."""
        i = int(shard)
        if not 0 <= i < self.n:
            raise IndexError(f"shard {i}: this stage has shards 0..{self.n - 1}")
        z = self.codes[:, i]
        fires = np.flatnonzero(z != 0)
        head = ["activation", "event", "event type", "reward", "advantage", "step"]
        parts = [
            f"<h3 id='shard-{i}'>Shard {i}</h3>",
            f"<p>Fires on {len(fires)} of {len(z)} events ({len(fires) / max(len(z), 1):.1%}): "
            f"{int((z > 0).sum())} positive, {int((z < 0).sum())} negative.</p>",
        ]
        for sign, name in ((1, "positive"), (-1, "negative")):
            sel = np.flatnonzero(sign * z > 0)
            top = sel[np.argsort(-sign * z[sel])][:n_top]
            if len(top):
                parts.append(f"<h4>Top {name} events</h4>" + _table(head, self._event_rows(i, top)))
        if len(fires):
            order = fires[np.argsort(np.abs(z[fires]))]
            picks = list(dict.fromkeys(order[min(int(q * len(order)), len(order) - 1)] for q in QUANTILES))
            parts.append(
                "<h4>Events across activation quantiles (10–90%)</h4>" + _table(head, self._event_rows(i, picks))
            )
            parts.append(self._histogram(z[fires]))
            parts.append(self._type_split(fires))
        parts.append(self._where(i))
        parts.append(self._effects(i))
        parts.append(self._nearest(i))
        return ShardCard(i, "<div class='shard-card'>" + "\n".join(p for p in parts if p) + "</div>")

    def _histogram(self, values: np.ndarray) -> str:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3.2, 1.6))
        ax.hist(values, bins=30, color="tab:blue")
        ax.set_xlabel("activation (events it fires on)")
        ax.set_ylabel("events")
        return _png(fig)

    def _type_split(self, fires: np.ndarray) -> str:
        types, counts = np.unique(self.types[fires], return_counts=True)
        total = {t: int((self.types == t).sum()) for t in types}
        order = np.argsort(-counts)[:8]
        rows = [
            [_esc(types[j]), str(counts[j]), f"{counts[j] / len(fires):.0%}", f"{counts[j] / total[types[j]]:.0%}"]
            for j in order
        ]
        return "<h4>Event types it fires on</h4>" + _table(
            ["event type", "events", "share of its firings", "share of the type's events"], rows
        )

    def _parts(self, i: int) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
        """Shard ``i`` per tensor: (U, V) factors of a low-rank matrix, else its dense values."""
        out = {}
        for n in self.names:
            if f"{n}__U" in self.shards:
                out[n] = (self.shards[f"{n}__U"].values[i], self.shards[f"{n}__V"].values[i])
            else:
                out[n] = self.shards[n].values[i]
        return out

    def _where(self, i: int) -> str:
        rows, norms = [], {}
        for n, v in self._parts(i).items():
            if isinstance(v, tuple):
                U, V = v
                UtU, VtV = U.T @ U, V.T @ V
                norms[n] = float((UtU * VtV).sum())
                out_sq = np.einsum("or,rs,os->o", U, VtV, U)
                in_sq = np.einsum("ir,rs,is->i", V, UtU, V)
            elif v.ndim == 2:
                norms[n] = float((v**2).sum())
                out_sq, in_sq = (v**2).sum(1), (v**2).sum(0)
            else:
                norms[n] = float((v**2).sum())
                out_sq, in_sq = v.reshape(-1) ** 2, None
            rows.append((n, out_sq, in_sq))
        total = sum(norms.values()) or 1.0
        shown = []
        for n, out_sq, in_sq in sorted(rows, key=lambda r: -norms[r[0]])[:6]:
            top = lambda sq: ", ".join(f"{j} ({sq[j] / max(sq.sum(), 1e-30):.0%})" for j in np.argsort(-sq)[:5])
            shown.append([_esc(n), f"{norms[n] / total:.0%}", top(out_sq), top(in_sq) if in_sq is not None else ""])
        return "<h4>Where it lives</h4>" + _table(
            ["tensor", "share of squared norm", "top output coordinates (share)", "top input coordinates (share)"],
            shown,
        )

    def _effects(self, i: int) -> str:
        ds = self.analysis
        if ds is None or "intervened_shard" not in ds.coords or i not in ds.intervened_shard.values:
            why = "no analysis given" if ds is None else "not among the shards the analysis intervened on"
            return f"<h4>What it does</h4><p>Not measured ({why}).</p>"
        s = ds.sel(intervened_shard=i)
        floor = ds.noise_floor.values if "noise_floor" in ds else np.zeros(ds.sizes["task"])

        def cell(v, f):
            return f"<b>{v:+.3f}</b>" if abs(v) > f else f"{v:+.3f}"

        rows = [
            [f"add {float(a):+g} × size"] + [cell(v, f) for v, f in zip(s.add_effect.sel(alpha=a).values, floor)]
            for a in ds.alpha.values
        ]
        rows.append(["ablate from the fine-tuned policy"] + [cell(v, f) for v, f in zip(s.ablate_effect.values, floor)])
        rows.append(["noise floor"] + [f"{f:.3f}" for f in floor])
        size = f" Its size: {float(s.shard_size):.3g}." if "shard_size" in s else ""
        return (
            "<h4>What it does (Δ reward per task; bold: above the noise floor)</h4>"
            + _table(["intervention"] + [str(t) for t in ds.task.values], rows)
            + f"<p>Own task (the task whose events give it the highest mean |activation|): {_esc(ds.task.values[int(s.own_task)])}.{size}</p>"
        )

    def gram(self) -> np.ndarray:
        """Cosine between every pair of shards (from factors where the matrices are low rank)."""
        if self._gram is None:
            G = np.zeros((self.n, self.n))
            for n in self.names:
                if f"{n}__U" in self.shards:
                    U, V = self.shards[f"{n}__U"].values, self.shards[f"{n}__V"].values
                    G += np.einsum("ior,joq,ins,jnq->ij", U, U, V, V, optimize=True)
                else:
                    W = self.shards[n].values.reshape(self.n, -1)
                    G += W @ W.T
            d = np.sqrt(np.clip(np.diag(G), 1e-30, None))
            self._gram = G / d[:, None] / d[None, :]
        return self._gram

    def _nearest(self, i: int) -> str:
        items = []
        cos = self.gram()[i].copy()
        cos[i] = 0
        near = np.argsort(-np.abs(cos))[:3]
        items.append("other shards: " + ", ".join(f"<a href='#shard-{j}'>{j}</a> ({cos[j]:+.2f})" for j in near))
        ds = self.analysis
        if ds is not None and "shard_type_cos" in ds:
            c = ds.shard_type_cos.sel(shard=i).values
            j = np.argsort(-np.abs(c))[:3]
            items.append("type-mean updates: " + ", ".join(f"{_esc(ds.event_type.values[k])} ({c[k]:+.2f})" for k in j))
        if ds is not None and "online_nearest" in ds:
            items.append(
                f"online shard: {int(ds.online_nearest.sel(shard=i))} ({float(ds.online_nearest_cos.sel(shard=i)):+.2f})"
            )
        return "<h4>Nearest by cosine</h4><ul>" + "".join(f"<li>{x}</li>" for x in items) + "</ul>"

    # -- the index -------------------------------------------------------------------------------------
    def index(self):
        """One row per shard: how often it fires, its dominant event type and that type's share of its firings,
        and (where the analysis intervened on it) its largest reward change above the noise floor."""
        import pandas as pd

        rows = []
        for i in range(self.n):
            fires = self.codes[:, i] != 0
            t, c = np.unique(self.types[fires], return_counts=True) if fires.any() else ([""], [0])
            j = int(np.argmax(c))
            rows.append(
                {
                    "shard": i,
                    "fires on": int(fires.sum()),
                    "frequency": float(fires.mean()),
                    "dominant type": str(t[j]),
                    "dominant share": float(c[j] / max(fires.sum(), 1)),
                    "largest effect": self._largest_effect(i),
                }
            )
        return pd.DataFrame(rows).set_index("shard")

    def _largest_effect(self, i: int) -> float:
        ds = self.analysis
        if ds is None or "intervened_shard" not in ds.coords or i not in ds.intervened_shard.values:
            return float("nan")
        eff = np.abs(ds.add_effect.sel(intervened_shard=i).values)
        floor = ds.noise_floor.values if "noise_floor" in ds else 0.0
        above = np.where(eff > floor, eff, 0.0)
        return float(above.max())

    def html(self, n_top: int = 5, title: str = "") -> str:
        """The index (sortable: click a column) and every shard's card, as one HTML fragment."""
        idx = self.index()
        rows = [
            [
                f"<a href='#shard-{i}'>{i}</a>",
                str(r["fires on"]),
                f"{r['frequency']:.3f}",
                _esc(r["dominant type"]),
                f"{r['dominant share']:.2f}",
                _effect_text(r["largest effect"]),
            ]
            for i, r in idx.iterrows()
        ]
        head = ["shard", "fires on", "frequency", "dominant type", "dominant share", "largest effect above noise"]
        th = "".join(f"<th onclick='sortTable(this)'>{_esc(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        silent = [int(i) for i, r in idx.iterrows() if r["fires on"] == 0]
        cards = "\n".join(self.card(i, n_top).html for i in range(self.n) if i not in silent)
        # a shard that fires on no event has nothing to show: one line names them all (each still an anchor)
        none = (
            f"<p>{len(silent)} of {self.n} shards fire on no event and have no card: "
            + ", ".join(f"<span id='shard-{i}'>{i}</span>" for i in silent)
            + ".</p>\n"
            if silent
            else ""
        )
        return (
            f"<h2>{_esc(title)}</h2>" if title else ""
        ) + f"<table class='card sortable'><tr>{th}</tr>{body}</table>\n{none}{cards}"


def _effect_text(v: float) -> str:
    """The index's effect column: blank when not measured, "within noise" when nothing passed the noise floor."""
    return "" if np.isnan(v) else ("within noise" if v == 0 else f"{v:.3f}")


SORT_SCRIPT = """<script>
function sortTable(th) {
  const table = th.closest('table'), col = Array.from(th.parentNode.children).indexOf(th);
  const rows = Array.from(table.rows).slice(1), asc = th.dataset.asc !== '1';
  const key = r => { const t = r.cells[col].innerText; const x = parseFloat(t); return isNaN(x) ? t : x; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => table.appendChild(r)); th.dataset.asc = asc ? '1' : '0';
}
</script>"""
STYLE = (
    "<style>table.card{border-collapse:collapse;font-size:0.85em;margin:0.3em 0}"
    "table.card td,table.card th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
    "table.sortable th{cursor:pointer;background:#f3f3f3}.shard-card{border-top:2px solid #888;margin-top:1em}"
    "code{white-space:pre-wrap}</style>"
)


def cards_page(shards_dir, analysis_dir=None, n_top: int = 5, title: str = "") -> str:
    """A stage's shard index and cards with the page's style and sort script (for ``report.html``)."""
    return STYLE + SORT_SCRIPT + Browser(shards_dir, analysis_dir).html(n_top, title)


def card(shards_dir, shard: int, analysis_dir=None, n_top: int = 5) -> ShardCard:
    """One card without keeping a :class:`Browser`."""
    return Browser(shards_dir, analysis_dir).card(shard, n_top)


def stage_dirs(analysis: xr.Dataset, run_dir: Path) -> Path | None:
    """The shard stage folder an analysis read, found in ``run_dir`` by name when the run has moved."""
    cfg = json.loads(analysis.attrs.get("config", "{}"))
    d = Path(cfg.get("shards_dir", ""))
    if (d / "shards.nc").exists():
        return d
    d = Path(run_dir) / d.name
    return d if (d / "shards.nc").exists() else None
