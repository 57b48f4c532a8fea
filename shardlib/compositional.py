"""The compositional testbed's stage: per-event multi-label recovery, SAE against clustering.

In the plain bandit and the LM tasks every event reinforces one computation, so clustering the
updates is the natural tool and an SAE cannot show what it adds. The compositional bandit
(``RLParams.n_heads`` >= 2, :class:`~shardlib.tasks.ContextualBandit`) has one context, arm and
reward clause per head, so every event reinforces ``n_heads`` computations at once, each a
(head, that head's cluster, the arm that head took), and its store records them per event
(``cluster_h<h>``, ``action_h<h>``). Events with a zero update (zero advantage) are left out and counted.

For every SAE seed, on that seed's train/held-out split of the events:

- the shard SAE (:func:`shardlib.fit.fit`, signed latents, ``k`` = the number of heads by default);
- k-means with K = the SAE's latents on the SAE's input (unit-normalised when the SAE normalises), one
  cluster per event (``kmeans``), and its centroids as a dictionary with the SAE's top-k signed encoding
  (``kmeans_dict``: each event takes its k most similar centroids);
- PCA's top directions with the same encoding (``pca``);
- the oracle (``oracle``, the ceiling): the computations' mean updates (least squares of the events on their
  signed sets of computations) as the dictionary, the same encoding;
- random dictionaries with the SAE's structure (``random``, chance), over ``n_random`` dictionary seeds.

Scoring is the same for all: a *unit* is a latent with a sign (a signed code's + and - are two units), a
centroid or a direction with a sign; a unit's label set is the computations present in more than
``label_threshold`` of the training events it is active on; an event's predicted set is the union of its
active units' label sets; per-event multi-label micro-F1 compares held-out events' predicted and true
sets. Beside it, type-mean matches: how many computations' mean updates have a dictionary direction
within |cos| > ``match_threshold``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from .config import Params, param
from .io import save_results
from .metrics import topk_codes, unit_rows

METHODS = ("sae", "kmeans", "kmeans_dict", "pca", "oracle", "random")
"""The methods scored, in the order results and plots show them."""


@dataclass(frozen=True)
class CompositionalParams(Params):
    """Parameters of the compositional-testbed stage (``notebooks/10_compositional.ipynb``)."""

    store_path: str = param("", "event store of a compositional bandit run (the rl stage with n_heads >= 2)")
    sae_seeds: list[int] = param([0, 1, 2], "SAE seeds; each also draws its own train/held-out split of the events")
    n_latents: int = param(32, "SAE latents; also k-means' K and the number of PCA and random directions", ge=1)
    k: int = param(
        0, "active latents (units) per event for the SAE and every dictionary (0 = the number of heads)", ge=0
    )
    rank: int = param(1, "rank of each SAE latent per weight matrix (0 = dense); random dictionaries share it", ge=0)
    signed: bool = param(True, "signed TopK latents (each latent's + and - are two units)")
    normalize: bool = param(True, "unit-normalise every event's update (the SAE's and every baseline's input)")
    epochs: int = param(10, "SAE: passes over the training events", ge=1)
    batch_size: int = param(128, "SAE: events per step", ge=1)
    holdout_frac: float = param(0.2, "fraction of events held out for scoring", gt=0, lt=1)
    max_events: int = param(0, "at most this many nonzero events, drawn at random (0 = all)", ge=0)
    n_random: int = param(5, "random dictionaries per SAE seed (chance)", ge=1)
    label_threshold: float = param(
        0.5, "a unit's label set: computations present in more than this share of its training events", ge=0, lt=1
    )
    match_threshold: float = param(
        0.9, "a computation's mean update is matched by a direction at |cos| above this", gt=0, lt=1
    )
    device: str = param("auto", "SAE: 'cpu', 'cuda' or 'auto'", choices=("auto", "cpu", "cuda"))

    def check(self):
        if not self.store_path:
            raise ValueError(
                "parameter 'store_path': give the event store of a compositional bandit run "
                "(e.g. runs/default/rl_bandit2/updates/events)"
            )
        if not self.sae_seeds or len(set(self.sae_seeds)) != len(self.sae_seeds):
            raise ValueError(
                f"parameter 'sae_seeds': got {list(self.sae_seeds)}; accepted: distinct seeds, at least one"
            )
        if self.k > self.n_latents:
            raise ValueError(f"parameter 'k': {self.k} exceeds n_latents={self.n_latents}")


# ---------------------------------------------------------------------------
# scoring functions (any dictionary, any labels)


def topk_units(X: np.ndarray, D: np.ndarray, k: int, signed: bool = True) -> np.ndarray:
    """Active units of a fixed dictionary under top-k encoding: each row of ``X`` takes the ``k`` directions of
    ``D`` with the largest |projection| (``signed``; else the largest positive projection, as a ReLU TopK).
    Returns a boolean matrix [N, 2F] (signed: unit 2f = direction f with a positive code, 2f + 1 = negative)
    or [N, F]."""
    proj = np.asarray(X, dtype=np.float64) @ unit_rows(D).T
    return code_units(topk_codes(proj, k, signed), signed)


def code_units(codes: np.ndarray, signed: bool = True) -> np.ndarray:
    """Active units of codes [N, F]: with ``signed`` [N, 2F] (unit 2f: code f > 0, unit 2f + 1: code f < 0),
    else [N, F] (code f != 0)."""
    codes = np.asarray(codes)
    if not signed:
        return codes != 0
    out = np.zeros((codes.shape[0], 2 * codes.shape[1]), dtype=bool)
    out[:, 0::2], out[:, 1::2] = codes > 0, codes < 0
    return out


def unit_labels(units: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Each unit's label set [U, C]: the computations (columns of ``truth`` [N, C], bool) present in more than
    ``threshold`` of the events the unit is active on (``units`` [N, U], bool). A unit never active: no labels."""
    units, truth = np.asarray(units, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    count = units.sum(0)
    share = (units.T @ truth) / np.where(count > 0, count, 1.0)[:, None]
    return (share > threshold) & (count > 0)[:, None]


def predicted_sets(units: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each event's predicted set of computations [N, C]: the union of its active units' label sets."""
    return (np.asarray(units, dtype=np.float64) @ np.asarray(labels, dtype=np.float64)) > 0


def multilabel_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 of predicted sets against true sets (bool [N, C]), over all
    (event, computation) pairs: F1 = 2 TP / (2 TP + FP + FN), 1 exactly when every set is right."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
    }


def score_units(units: np.ndarray, truth: np.ndarray, train: np.ndarray, held: np.ndarray, threshold: float = 0.5):
    """Label the units on the ``train`` events, then :func:`multilabel_scores` on the ``held`` events."""
    labels = unit_labels(units[train], truth[train], threshold)
    return multilabel_scores(predicted_sets(units[held], labels), truth[held])


def computation_means(X: np.ndarray, truth: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Each computation's mean update [C, D] in a compositional store: least squares of the events ``X`` on
    their signed sets of computations (``truth`` [N, C] times ``sign`` [N], the advantage's sign), both centred,
    so that computations that occur together are told apart. A computation with no event: a zero row."""
    S = np.asarray(truth, dtype=np.float64) * np.asarray(sign, dtype=np.float64)[:, None]
    X = np.asarray(X, dtype=np.float64)
    M = np.linalg.lstsq(S - S.mean(0), X - X.mean(0), rcond=None)[0]
    M[~np.asarray(truth, dtype=bool).any(0)] = 0
    return M


def types_matched(means: np.ndarray, D: np.ndarray, t: float = 0.9) -> int:
    """How many nonzero rows of ``means`` have a direction of ``D`` within |cos| > ``t``."""
    means = means[np.linalg.norm(means, axis=1) > 0]
    if not len(means) or not len(D):
        return 0
    return int((np.abs(unit_rows(means) @ unit_rows(D).T).max(1) > t).sum())


# ---------------------------------------------------------------------------
# the store's ground truth


def store_truth(store: xr.Dataset) -> tuple[np.ndarray, list[str]]:
    """The events' true sets of computations [N, C] (bool) and the computations' names (``"h0 c2 arm1"``): one
    computation per head, (head, that head's cluster, the arm it took), from the labels ``cluster_h<h>`` and
    ``action_h<h>`` of a compositional bandit's store."""
    heads = sorted(int(str(c)[len("cluster_h") :]) for c in store.coords if str(c).startswith("cluster_h"))
    if len(heads) < 2:
        raise ValueError(
            "parameter 'store_path': the store has no per-head labels (cluster_h0, cluster_h1, ...): make it with the "
            "rl stage at testbed 'bandit' and n_heads >= 2"
        )
    cfg = json.loads(store.attrs.get("config", "{}"))
    K = int(cfg.get("n_clusters", max(int(store[f"cluster_h{h}"].max()) for h in heads) + 1))
    A = int(cfg.get("n_arms", max(int(store[f"action_h{h}"].max()) for h in heads) + 1))
    n = store.sizes["event"]
    truth = np.zeros((n, len(heads) * K * A), dtype=bool)
    for h in heads:
        col = h * K * A + store[f"cluster_h{h}"].values.astype(np.int64) * A + store[f"action_h{h}"].values
        truth[np.arange(n), col] = True
    names = [f"h{h} c{c} arm{a}" for h in heads for c in range(K) for a in range(A)]
    return truth, names


# ---------------------------------------------------------------------------
# the stage


def run(p: CompositionalParams, progress: bool = False) -> xr.Dataset:
    """The stage: for every SAE seed, train the SAE and fit every baseline on that seed's training events, score
    them on its held-out events; write ``results.nc``."""
    out = Path(p.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = load_events(p)
    k = p.k or ev.n_heads
    means = computation_means(ev.X, ev.truth, ev.sign)  # the reference for type-mean matches (all events)
    rows, rand_rows = [], []
    tmp = tempfile.mkdtemp(prefix="sae_", dir=out)  # the SAEs' checkpoints: removed at the end, never resumed
    for s in p.sae_seeds:
        shutil.rmtree(tmp)
        row, rand = score_seed(p, ev, s, k, means, tmp, progress)
        rows.append(row)
        rand_rows.append(rand)
    shutil.rmtree(tmp)
    ds = results_dataset(p, ev, k, means, rows, rand_rows)
    save_results(ds, out / "results.nc", p.to_dict(), p.seed)
    return ds


@dataclass
class Events:
    """The stage's events (the nonzero ones, or ``max_events`` of them): what :func:`load_events` returns."""

    data: dict
    """The updates, ``{param: [event, *shape]}``, as the SAE trains on them."""
    store: xr.Dataset
    """The store's labels for the same events."""
    X: np.ndarray
    """The updates flattened, float64 [N, D]: every baseline's input."""
    truth: np.ndarray
    """True sets of computations [N, C] (:func:`store_truth`)."""
    computations: list[str]
    """The computations' names (``"h0 c2 arm1"``), one per column of ``truth``."""
    sign: np.ndarray
    """The advantage's sign [N]."""
    n_heads: int
    """Computations per event (the bandit's heads)."""
    n_nonzero: int
    """Nonzero events in the store (before ``max_events``)."""
    n_zero: int
    """Events left out: their update is exactly zero."""


def load_events(p: CompositionalParams) -> Events:
    """The store's nonzero events (unit-normalised with ``normalize``), ``max_events`` of them drawn at random."""
    from .common import flatten
    from .factored import take
    from .shards import load_updates

    data, store = load_updates(p.store_path, skip_zero=True, normalize=p.normalize)
    n_zero = int(store.attrs.get("n_zero_skipped", 0))
    truth, comp_names = store_truth(store)
    n_heads = int(truth.sum(1).max())
    n_nonzero = store.sizes["event"]
    if p.max_events and store.sizes["event"] > p.max_events:
        keep = np.sort(np.random.default_rng(p.seed).choice(store.sizes["event"], p.max_events, replace=False))
        data = {k: take(v, keep) for k, v in data.items()}
        store, truth = store.isel(event=keep), truth[keep]
    X = flatten(data, list(data)).astype(np.float64)
    sign = np.sign(store["advantage"].values)
    return Events(data, store, X, truth, comp_names, sign, n_heads, n_nonzero, n_zero)


def score_seed(p: CompositionalParams, ev: Events, seed: int, k: int, means: np.ndarray, tmp: str, progress=False):
    """One SAE seed: the SAE, k-means, PCA and the oracle fitted on the seed's training events, every method's
    scores on its held-out events, keyed ``(method, score)`` (``random``: the mean over ``n_random``
    dictionaries), and ``fvu``; beside the row, each random dictionary's F1."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    tr, ho, z, fvu, sae_dirs = train_sae(p, ev, seed, k, tmp, progress)
    X, truth, F = ev.X, ev.truth, p.n_latents
    Xc = X - X[tr].mean(0)
    km = KMeans(n_clusters=min(F, len(tr)), n_init=3, random_state=seed).fit(Xc[tr])
    one_hot = np.eye(km.n_clusters, dtype=bool)[km.predict(Xc)]
    pca = PCA(n_components=min(F, len(tr), X.shape[1]), random_state=seed).fit(X[tr]).components_
    oracle = computation_means(X[tr], truth[tr], ev.sign[tr])
    oracle = oracle[np.linalg.norm(oracle, axis=1) > 0]
    dicts = {"kmeans_dict": km.cluster_centers_, "pca": pca, "oracle": oracle}
    units = {
        "sae": code_units(z, p.signed),
        "kmeans": one_hot,
        **{m: topk_units(Xc, D, k, p.signed) for m, D in dicts.items()},
    }
    directions = {"sae": sae_dirs, "kmeans": km.cluster_centers_, **dicts}
    row = {}
    for m, U in units.items():
        row.update({(m, key): v for key, v in method_scores(p, U, directions[m], truth, tr, ho, means).items()})
    rand = random_scores(p, ev, Xc, seed, k, tr, ho, means)
    for key in rand[0]:
        row[("random", key)] = float(np.mean([r[key] for r in rand]))
    row["fvu"] = float(fvu)
    return row, [r["f1"] for r in rand]


def train_sae(p: CompositionalParams, ev: Events, seed: int, k: int, tmp: str, progress: bool = False):
    """The shard SAE of one seed on its training events (checkpoints in ``tmp``): (training indices, held-out
    indices, codes of every event [N, F], held-out FVU, the latents' directions flattened [F, D])."""
    from .common import flatten
    from .fit import FitParams, encode_all, evaluate, fit

    sp = FitParams.from_dict(
        dict(
            out_dir=tmp,
            seed=seed,
            n_latents=p.n_latents,
            k=k,
            rank=p.rank,
            signed=p.signed,
            epochs=p.epochs,
            batch_size=p.batch_size,
            holdout_frac=p.holdout_frac,
            device=p.device,
        )
    )
    res = fit(sp, ev.data, progress=progress)
    z = encode_all(res.sae, ev.data, device=res.accelerator.device)[2].cpu().numpy()
    fvu = evaluate(res.sae, ev.data, res.heldout_idx, device=res.accelerator.device).get("fvu", float("nan"))
    directions = flatten({n: v.detach().cpu() for n, v in res.sae.directions().items()}, list(ev.data))
    return res.train_idx, res.heldout_idx, z, fvu, directions


def method_scores(p: CompositionalParams, units, directions, truth, tr, ho, means) -> dict[str, float]:
    """A method's scores: held-out multi-label F1, precision and recall of its ``units``, the computation means
    its ``directions`` match, its mean number of active units on held-out events."""
    sc = score_units(units, truth, tr, ho, p.label_threshold)
    sc["types_matched"] = types_matched(means, directions, p.match_threshold)
    sc["l0"] = float(units[ho].sum(1).mean())
    return sc


def random_scores(p: CompositionalParams, ev: Events, Xc, seed: int, k: int, tr, ho, means) -> list[dict]:
    """:func:`method_scores` of ``n_random`` random dictionaries with the SAE's structure (chance)."""
    from .alignment import random_dictionary
    from .common import flatten
    from .sae import shapes_of

    names, shapes = list(ev.data), shapes_of(ev.data)
    rand = []
    for j in range(p.n_random):
        R = flatten(random_dictionary(shapes, p.n_latents, p.rank, 1000 * seed + 7 + j), names)
        rand.append(method_scores(p, topk_units(Xc, R, k, p.signed), R, ev.truth, tr, ho, means))
    return rand


def results_dataset(p: CompositionalParams, ev: Events, k: int, means, rows: list[dict], rand_rows) -> xr.Dataset:
    """``results.nc``: every score per SAE seed and method, the random dictionaries' F1, the counts."""
    scores = ("f1", "precision", "recall", "types_matched", "l0")
    ds = xr.Dataset(
        {
            **{key: (("sae_seed", "approach"), [[r[(m, key)] for m in METHODS] for r in rows]) for key in scores},
            "f1_random": (("sae_seed", "random_seed"), rand_rows),
            "sae_heldout_fvu": ("sae_seed", [r["fvu"] for r in rows]),
            "n_events": ev.store.sizes["event"],
            "n_nonzero_events": ev.n_nonzero,
            "n_zero_events": ev.n_zero,
            "n_heads": ev.n_heads,
            "k": k,
            "n_computations": int((np.linalg.norm(means, axis=1) > 0).sum()),
            "computation_events": ("computation", ev.truth.sum(0)),
        },
        coords={
            "sae_seed": list(p.sae_seeds),
            "approach": list(METHODS),
            "random_seed": np.arange(p.n_random),
            "computation": ev.computations,
        },
    )
    ds["f1"].attrs["long_name"] = "held-out per-event multi-label micro-F1 (predicted vs true sets of computations)"
    ds["types_matched"].attrs["long_name"] = f"computation means with a direction at |cos| > {p.match_threshold}"
    ds["n_zero_events"].attrs["long_name"] = "events left out: their update is exactly zero (zero advantage)"
    ds["n_events"].attrs["long_name"] = "events scored: the nonzero events, or max_events of them drawn at random"
    return ds
