"""The Finding of every stage: one or two sentences with the stage's numbers and baselines, computed
from its results (never typed by hand), saying plainly when a result is negative.

Every notebook ends with ``print(findings.finding("<stage>", ds))``; the functions take the
stage's results Dataset (as written to ``results.nc``).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from .stages import KINDS


def nanmean_std(x) -> tuple[float, float]:
    """``np.nanmean`` and ``np.nanstd`` as floats, without their warnings when every value is NaN (then NaN,
    NaN): a tiny run's intervention effects can all be zero, and a reader should not see a warning for it."""
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return (float(x.mean()), float(x.std())) if x.size else (float("nan"), float("nan"))


def nanmean(x) -> float:
    """The mean of :func:`nanmean_std`."""
    return nanmean_std(x)[0]


def _cfg(ds: xr.Dataset) -> dict:
    return json.loads(ds.attrs.get("config", "{}"))


def mean_std(da, digits: int = 3, missing: str = "n/a") -> str:
    """mean ± std over the finite values of a DataArray or array (std omitted for one value)."""
    v = np.asarray(da, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return missing
    return f"{v.mean():.{digits}f}" if len(v) == 1 else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


_ms = mean_std


CHANGE = 0.01  # a mean reward change smaller than this is reported as unchanged


def _verdict(a: float, b: float) -> str:
    if b - a >= CHANGE:
        return "raised"
    return "did NOT change (negative)" if abs(b - a) < CHANGE else "LOWERED (negative)"


def pretrain(ds: xr.Dataset) -> str:
    a, b = float(ds.eval_reward_init.mean()), float(ds.eval_reward_final.mean())
    per = ", ".join(
        f"{t} {float(x):.2f}→{float(y):.2f}"
        for t, x, y in zip(ds.task.values, ds.eval_reward_init, ds.eval_reward_final)
    )
    verdict = _verdict(a, b)
    return f"Pretraining {verdict} the held-out reward from {a:.2f} to {b:.2f} (mean over task families; {per})."


def model(ds: xr.Dataset) -> str:
    per = ", ".join(f"{t} {float(a):.2f} (n={int(n)})" for t, a, n in zip(ds.task.values, ds.accuracy, ds.n))
    band = [str(t) for t, b in zip(ds.task.values, ds.in_band) if int(b)]
    lo, hi = float(ds.attrs["band_low"]), float(ds.attrs["band_high"])
    kept = ", ".join(band) if band else "none (negative: GRPO has nothing to reinforce on these families)"
    return (
        f"{ds.attrs['model']} ({int(ds.attrs['n_params']):,} parameters) starts with held-out accuracy {per}; "
        f"families inside the {lo:.0%}-{hi:.0%} band worth fine-tuning: {kept}."
    )


def rl(ds: xr.Dataset) -> str:
    cfg = _cfg(ds)
    name = "SFT" if cfg.get("algorithm") == "sft" else "GRPO"
    a, b = ds.eval_reward_init.values, ds.eval_reward_final.values
    up = int((b - a >= CHANGE).sum())
    per = ", ".join(f"{t} {x:.2f}→{y:.2f}" for t, x, y in zip(ds.task.values, a, b))
    verdict = _verdict(float(np.nanmean(a)), float(np.nanmean(b)))
    return (
        f"{name} on the {cfg.get('testbed', '?')} testbed {verdict} the held-out reward from {np.nanmean(a):.2f} to "
        f"{np.nanmean(b):.2f}; it rose (by {CHANGE} or more) on {up} of {len(a)} task families ({per})."
    )


def shards(ds: xr.Dataset) -> str:
    cfg = _cfg(ds)
    fvu, l0 = float(ds.heldout_fvu), float(ds.heldout_l0)
    # dead on the training events: on a few held-out events (18 of SmolLM2's) at most k per event can fire, so many
    # latents fire on none of them whatever the SAE learnt
    dead = float(ds.train_dead_fraction if "train_dead_fraction" in ds else ds.heldout_dead_fraction)
    where = "training" if "train_dead_fraction" in ds else "held-out"
    size = f"{cfg.get('n_latents', '?')} latents, k = {cfg.get('k', '?')}, rank {cfg.get('rank', '?')}"
    out = (
        f"The SAE ({size}) reconstructs held-out updates with FVU {fvu:.3f} at L0 {l0:.1f}; {dead:.0%} of latents "
        f"fire on no {where} event."
    )
    if fvu >= 1:
        out += " Negative: it predicts held-out updates no better than their mean (FVU ≥ 1)."
    elif fvu > 0.5:
        out += " Negative: it misses most of the held-out variance."
    return out


def planted(ds: xr.Dataset) -> str:
    parts = []
    for r in ds["rank"].values:
        s = ds.sel(rank=r)
        label = "dense" if r == 0 else f"rank {r}"
        parts.append(f"{label}: MMCS(G→D) {_ms(s.mmcs_g2d)}, R@0.9 {_ms(s['r_at_0.9'])}, held-out FVU {_ms(s.fvu)}")
    mmcs = ds.mmcs_g2d.mean("seed")
    passing = ["dense" if r == 0 else f"rank {r}" for r in ds["rank"].values if float(mmcs.sel(rank=r)) >= 0.95]
    verdict = (
        f"passes (MMCS(G→D) ≥ 0.95) for {', '.join(passing)}"
        if passing
        else "FAILS (negative): no SAE reaches MMCS 0.95"
    )
    out = f"The planted positive control {verdict}, over {ds.sizes['seed']} seeds: " + "; ".join(parts) + "."
    if "family_mmcs_g2d" in ds:
        fam = []
        for m in ds.member.values:
            for kind in ds.sae.values:
                f = ds.sel(member=m, sae=kind)
                fam.append(f"{m} {kind} {_ms(f.family_mmcs_g2d)} (R@0.9 {_ms(f['family_r_at_0.9'], 2)})")
        ok = (ds.family_mmcs_g2d >= 0.99) & (ds["family_r_at_0.9"] >= 1.0)
        n_ok, n = int(ok.sum()), int(ok.size)
        verdict = "recovers every member" if n_ok == n else f"falls short (negative) on {n - n_ok} of {n} fits"
        out += (
            f" On the planted family at the shard stage's defaults (signed TopK with one latent per shard, ReLU with"
            f" two), the SAE {verdict} (target MMCS ≥ 0.99 and R@0.9 = 1, over {ds.sizes['family_seed']}"
            f" seed(s)): MMCS(G→D) " + "; ".join(fam) + "."
        )
    return out


def sparsity(ds: xr.Dataset) -> str:
    parts, sparse = [], []
    for run in ds.run.values:
        exact = float(ds.unchanged.sel(run=run, scope="cumulative", tau=0.0))
        muk = float(ds.mukherjee_unchanged.sel(run=run, scope="cumulative"))
        parts.append(f"{run}: {muk:.2%} unchanged by Mukherjee et al.'s measure, {exact:.2%} exactly in fp32")
        if muk >= 0.5:
            sparse.append(str(run))
    if sparse:
        verdict = f"sparse (half or more unchanged in bf16 at |Δ| ≤ 1e-5) in {', '.join(sparse)}"
    else:
        verdict = "NOT sparse in any run (Mukherjee et al.: bf16, |Δ| ≤ 1e-5, report 70-95% unchanged)"
    return f"Cumulative updates are {verdict}: " + "; ".join(parts) + "."


def frontier(ds: xr.Dataset) -> str:
    i = np.unravel_index(np.nanargmin(ds.fvu.values), ds.fvu.shape)
    where = {d: ds[d].values[j] for d, j in zip(ds.fvu.dims, i)}
    best = float(ds.fvu.values[i])
    reached = [str(s) for s in ds.store.values if bool((ds.fvu.sel(store=s) <= 0.1).any())]
    rank = "dense" if where["rank"] == 0 else f"rank {where['rank']}"
    out = f"Lowest held-out FVU {best:.3f} ({where['store']} updates, {rank}, k = {where['k']}). "
    if "pca_fvu" in ds:
        out += _frontier_pca(ds)
    train = ds.train_fvu.values if "train_fvu" in ds else np.array([np.nan])
    if np.isfinite(train).any():  # held-out against training: generalisation, or a fit that did not get far
        out += (
            f"On their own training updates the same SAEs reach FVU {np.nanmin(train):.3f} to {np.nanmax(train):.3f}. "
        )
    if reached:
        return out + f"FVU ≤ 0.1 is reached on: {', '.join(reached)}."
    return out + "Negative: no SAE reaches FVU 0.1 on any store."


def _frontier_pca(ds: xr.Dataset) -> str:
    """Each store's best SAE against PCA with as many components as its k (the baseline fitted to the same
    events and split): where PCA reconstructs better, say so."""
    parts, behind = [], []
    for s in ds.store.values:
        f = ds.fvu.sel(store=s)
        if np.isnan(f.values).all() or np.isnan(ds.pca_fvu.sel(store=s).values).all():
            continue
        i = np.unravel_index(np.nanargmin(f.values), f.shape)
        at = {d: f[d].values[j] for d, j in zip(f.dims, i)}
        sae, pca = float(f.values[i]), float(ds.pca_fvu.sel(store=s, k=at["k"]))
        if np.isnan(pca):  # the outer join of sweeps over different k: no PCA at this k
            continue
        parts.append(f"{s}: best SAE {sae:.3f} at k = {at['k']}, PCA with {at['k']} components {pca:.3f}")
        if pca < sae:
            behind.append(f"{s} (by {sae - pca:.3f})")
    if not parts:
        return ""
    out = "Against PCA fitted to the same training updates (held-out FVU; one seed): " + "; ".join(parts) + ". "
    if behind:
        out += f"Negative: PCA's dense code of k numbers reconstructs better than the SAE on {', '.join(behind)}. "
    return out


def _beats(a, b) -> bool:
    """Mean of ``a`` above mean of ``b`` by more than the larger of their spreads over seeds."""
    (ma, sa), (mb, sb) = nanmean_std(a), nanmean_std(b)
    return ma - mb > max(sa, sb)


def analysis(ds: xr.Dataset) -> str:
    n_types = int(np.asarray(ds.n_types).ravel()[0]) if "n_types" in ds else 0
    zero = f" ({int(ds.n_zero_events)} zero updates left out)" if "n_zero_events" in ds else ""
    events = f" on {int(ds.n_events)} events{zero}" if "n_events" in ds else ""
    fitted = "nmi_kmeans" in ds
    base = (
        f"k-means {_ms(ds.nmi_kmeans)}, PCA {_ms(ds.nmi_pca)}, drawn events {_ms(ds.nmi_events)}, the type means "
        f"as a dictionary {_ms(ds.nmi_oracle)}; "
        if fitted
        else ""
    )
    rand_std = f" ± {nanmean(ds.nmi_random_std):.3f} over dictionaries" if "nmi_random_std" in ds else ""
    out = (
        f"Over {ds.sizes['sae_seed']} SAE seeds{events}, NMI between shards and the {n_types} event types is "
        f"{_ms(ds.nmi)} ({base}random dictionaries {nanmean(ds.nmi_random):.3f}{rand_std}, shuffled labels "
        f"{_ms(ds.nmi_shuffled)}); {_ms(ds.types_matched, 1)} of {n_types} type-mean updates have a shard at "
        f"|cos| > 0.9 ("
        + (
            f"k-means {_ms(ds.types_matched_kmeans, 1)}, drawn events {_ms(ds.types_matched_events, 1)}, "
            if fitted
            else ""
        )
        + f"random {nanmean(ds.types_matched_random):.1f})."
    )
    if "seed_stability" in ds and ds.sizes.get("sae_seed", 1) > 1:
        out += (
            f" The shard directions of the {ds.sizes['sae_seed']} SAE seeds match one to one at mean |cos| "
            f"{float(ds.seed_stability):.3f} (Hungarian)."
        )
    if not _beats(ds.nmi, ds.nmi_random):
        out += " Negative: shards align with event types no better than random dictionaries of the same structure."
    elif fitted and not _beats(ds.nmi, ds.nmi_kmeans):
        out += (
            " Negative: the SAE aligns with event types no better than k-means on the same updates (within the "
            "spread over seeds): here it finds clusters, nothing more."
        )
    if "moves" in ds:
        out += (
            f" Above the evaluation's noise floor, {nanmean(ds.moves):.0%} of the {ds.sizes['intervened_shard']} "
            f"shards added at their own size move reward (random directions from the updates' span at the same "
            f"sizes: {nanmean(ds.random_moves):.0%})"
        )
        if nanmean(ds.moves) > 0:
            out += (
                f"; specificity of what moves {nanmean(ds.specificity):.2f} (random {nanmean(ds.random_specificity):.2f}); "
                f"the largest effect is on the shard's own task in {nanmean(ds.own_task_hit):.0%} (shuffled tasks "
                f"{float(ds.own_task_null):.0%}, p = {float(ds.own_task_p):.2f})."
            )
        else:
            out += ". Negative: no shard moves reward above the noise floor, so no effect is attributed to any shard."
        if nanmean(ds.moves) > 0 and nanmean(ds.moves) <= nanmean(ds.random_moves):
            out += " Negative: shards move reward no more often than random directions of the same size."
        if nanmean(ds.moves) > 0 and not float(ds.own_task_p) < 0.05:
            out += " Negative: shards hit their own task no more often than with shuffled tasks."
    elif "specificity" in ds:  # results written before the noise floor existed
        out += f" Adding a shard changes reward with specificity {nanmean(ds.specificity):.2f} (no noise floor)."
    else:
        why = ds.attrs.get("interventions", "not in the results")
        out += f" Interventions (adding or ablating shards): {why}; no effect on reward is reported."
    if "setting_nmi" in ds:
        s = ds.setting_nmi.to_series()
        k, norm = s.idxmax()
        fvu = float(ds.setting_heldout_fvu.sel(setting_k=k, setting_normalize=norm))
        matched = float(ds.setting_types_matched.sel(setting_k=k, setting_normalize=norm))
        km = (
            f", k-means {float(ds.setting_nmi_kmeans.sel(setting_k=k, setting_normalize=norm)):.3f}"
            if "setting_nmi_kmeans" in ds
            else ""
        )
        which = "Best setting for event types" if s.size > 1 else "The one other setting tried"
        out += (
            f" {which}: k = {k}, {'unit-normalised' if norm else 'raw'} updates "
            f"(NMI {s.max():.3f}{km}, {matched:.0f} of {n_types} types matched, held-out FVU {fvu:.3f})."
        )
    return out


def compositional(ds: xr.Dataset) -> str:
    f1 = {m: ds.f1.sel(approach=m) for m in ds.approach.values}
    names = {
        "sae": "SAE",
        "kmeans": "k-means (one cluster per event)",
        "kmeans_dict": "k-means as a dictionary",
        "pca": "PCA",
    }
    base = ", ".join(f"{names.get(m, m)} {_ms(f1[m])}" for m in ("kmeans", "kmeans_dict", "pca"))
    matched = ", ".join(f"{names.get(m, m)} {_ms(ds.types_matched.sel(approach=m), 1)}" for m in ("sae", "kmeans"))
    of = f" of {int(ds.n_nonzero_events)} nonzero" if "n_nonzero_events" in ds else ""
    out = (
        f"On the compositional bandit ({int(ds.n_events)}{of} events, {int(ds.n_heads)} computations each, "
        f"{int(ds.n_zero_events)} zero updates left out), held-out per-event multi-label micro-F1 over "
        f"{ds.sizes['sae_seed']} SAE seeds: SAE {_ms(f1['sae'])}; {base}; oracle dictionary (the computations' means) "
        f"{_ms(f1['oracle'])}; random dictionaries {_ms(ds.f1_random)}. Computation means matched at |cos| > 0.9 "
        f"(of {int(ds.n_computations)}): {matched}."
    )
    kmeans = ("kmeans_dict", "kmeans")
    not_beaten = [names[m] for m in kmeans if not _beats(f1["sae"], f1[m])]
    if not_beaten:
        out += (
            f" Negative: the SAE does not beat {' or '.join(not_beaten)} by more than the spread over seeds; on events "
            "that carry several computations it recovers them no better than clustering."
        )
    else:
        by = ", ".join(f"{nanmean(f1['sae']) - nanmean(f1[m]):.3f} over {names[m]}" for m in kmeans)
        out += f" The SAE beats both k-means baselines by more than the spread over seeds (by {by})."
    if not _beats(f1["sae"], ds.f1_random):
        out += " Negative: the SAE does no better than random dictionaries."
    return out


def toy(ds: xr.Dataset) -> str:
    parts = []
    for case in ds.case.values:
        for act in ds.activation.values:
            s = ds.sel(case=case, activation=act)
            parts.append(
                f"{case} {act}: per-feature MMCS {_ms(s.mmcs_columnwise)}, reconstruction error {_ms(s.recon_error)}"
            )
    published = "; ".join(f"{k[len('published_') :]} = {v}" for k, v in ds.attrs.items() if k.startswith("published_"))
    return "Toy models, over seeds: " + "; ".join(parts) + (f". Published: {published}." if published else ".")


def figures(ds: xr.Dataset) -> str:
    names = [str(f) for f in ds.figure.values] if "figure" in ds.coords else []
    if not names:
        return "Negative: no figure could be made (their inputs are missing)."
    return f"{len(names)} figures written from the run's results: {', '.join(names)}."


# the Finding of every stage kind: the function of this module named after it
FINDINGS = {kind: globals()[kind] for kind in KINDS}


def finding(stage: str, ds: xr.Dataset) -> str:
    """``Finding: ...`` for a stage kind (``FINDINGS``) from its results Dataset."""
    if stage not in FINDINGS:
        raise ValueError(f"no finding for stage kind {stage!r}; kinds: {', '.join(FINDINGS)}")
    return "Finding: " + FINDINGS[stage](ds)
