"""The toy-model stage (``notebooks/08_toy_models.ipynb``): toy models with published decompositions (L3D, APD,
SPD), decomposed by shardlib's SAE.

For each case (:data:`shardlib.toy_models.CASES`) and seed, :func:`make_case` trains the toy model and builds its
per-sample gradients and ground-truth circuits (:mod:`shardlib.toy_models`); :func:`fit_sae` trains the SAE on
them and scores it against the ground truth (every metric is defined in :mod:`shardlib.toy_metrics`), beside two
controls of the signed SAE (started at the truth; trained on gradients of single-feature samples); :func:`results`
sets the scores next to the published numbers (``PUBLISHED``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from .common import progress_bar
from .config import SEED_MAX, Params, param
from .toy_metrics import METRICS, coefficient_r, column_cos, columnwise, gradient_ml2r, own_output_share
from .toy_models import (
    CASES,
    INTERVENTION_DELTAS,
    TMCS_OUTPUTS,
    TMS,
    circuits,
    divergence_gradients,
    intervention_curve,
    sample_features,
    tmcs_circuits,
    train_tmcs,
    train_tms,
)

PUBLISHED = {
    # case: {metric: (value, source)}
    "tms_5_2": {
        "mmcs_apd": (0.998, "APD, Braun et al. 2025"),
        "mmcs_spd": (1.000, "SPD, Bushnaq et al. 2025"),
        "ml2r_spd": (0.99, "SPD, Bushnaq et al. 2025"),
        "recon_error_l3d": (0.19, "L3D, Chrisman et al. 2025"),
    },
    "tms_40_10": {"mmcs_apd": (0.996, "APD, Braun et al. 2025"), "mmcs_spd": (1.000, "SPD, Bushnaq et al. 2025")},
    "tmcs": {
        "recon_error_l3d": (0.064, "L3D, Chrisman et al. 2025"),
        "coef_r_l3d": (0.92, "L3D, Chrisman et al. 2025"),
    },
}


@dataclass(frozen=True)
class ToyParams(Params):
    """Parameters of the toy-model reproductions (``notebooks/08_toy_models.ipynb``)."""

    cases: list[str] = param(["tms_5_2", "tms_40_10", "tmcs"], "toy models: tms_5_2, tms_40_10, tmcs")
    seeds: list[int] = param([0, 1, 2], "seeds (toy-model training, gradient sampling and SAE)", ge=0, le=SEED_MAX)
    feature_prob: float = param(0.05, "probability a feature is active", gt=0, le=1)
    model_steps: int = param(4000, "toy-model training steps (Adam, batches of 1024)", ge=1)
    n_samples: int = param(
        8192, "samples drawn for the gradient data (those with no active feature are dropped)", ge=16
    )
    k: int = param(
        0, "SAE active latents per gradient (0 = each case's own: 1 on tms_5_2 and tmcs, 3 on tms_40_10)", ge=0
    )
    sae_activation: str = param(
        "batchtopk", "BatchTopK over the batch (as L3D) or TopK per gradient", choices=("topk", "batchtopk")
    )
    sae_steps: int = param(500, "SAE optimizer steps (the number of epochs follows from the number of gradients)", ge=1)
    latents_per_feature: int = param(
        1, "SAE latents per ground-truth feature (1 = as many shards as circuits, as L3D)", ge=1
    )
    lr: float = param(
        2e-2,
        "SAE learning rate (L3D uses 1e-2 with step decay; 2e-2 without decay fell into fewer poor optima on TMS 40->10)",
        gt=0,
    )
    batch_size: int = param(256, "SAE batch size", ge=1)
    activations: list[str] = param(["signed", "relu"], "activation variants: signed (L3D) and ReLU")
    truth_init: bool = param(
        True, "also train the signed SAE from the ground-truth circuits (diagnostic: where does training take them?)"
    )
    single_feature_control: bool = param(
        True,
        "also train the signed SAE on gradients of samples with exactly one active feature (diagnostic: do several active features cause a shortfall?)",
    )
    workers: int = param(
        2, "processes running (case, seed) jobs on CPU, one thread each (results do not depend on it)", ge=1
    )
    device: str = param(
        "cpu", "'cpu', 'cuda' or 'auto' (not 'cpu': jobs run one after another)", choices=("auto", "cpu", "cuda")
    )

    def check(self):
        bad = [c for c in self.cases if c not in CASES]
        if bad or not self.cases:
            raise ValueError(f"parameter 'cases': got {list(self.cases)}; accepted: {', '.join(CASES)}")
        bad = [a for a in self.activations if a not in ("signed", "relu")]
        if bad or not self.activations:
            raise ValueError(f"parameter 'activations': got {list(self.activations)}; accepted: signed, relu")
        too_big = [c for c in self.cases if self.k > CASES[c]["shape"][0] * self.latents_per_feature]
        if too_big:
            raise ValueError(
                f"parameter 'k': {self.k} exceeds the number of latents of {too_big}; use k <= "
                f"{min(CASES[c]['shape'][0] * self.latents_per_feature for c in too_big)} or 0 for each case's own"
            )


@dataclass
class ToyCase:
    """A trained toy model with its gradient data and ground truth (what every SAE of a (case, seed) shares)."""

    model: torch.nn.Module
    data: dict[str, torch.Tensor]
    """Per-sample divergence gradients ``{param: [N, *shape]}`` (all-zero gradients dropped)."""
    truth: dict[str, torch.Tensor]
    """Ground-truth circuits ``{param: [n_features, *shape]}``."""
    slice_param: str
    """The weight whose per-feature slices the column-wise MMCS compares: TMS ``W``, TMCS ``W_in``."""
    truth_slices: np.ndarray
    """Ground-truth slices [m, n]: TMS ``W[:, c]``; TMCS ``W_in``'s row i, transposed."""
    A: torch.Tensor | None
    """TMCS: the coefficients the model was trained to compute; else None."""
    data_single: dict[str, torch.Tensor]
    """Gradients of samples with exactly one active feature (the single-feature control)."""
    single_feature: np.ndarray
    """That feature, per gradient of ``data_single``."""
    model_metrics: dict[str, float] = field(default_factory=dict)
    """What the trained model itself scores (:func:`model_metrics`)."""

    def slices(self, dirs: dict[str, torch.Tensor]) -> np.ndarray:
        """Per-feature slices of shard directions, [F, m, n], comparable with ``truth_slices``."""
        d = dirs[self.slice_param]
        return (d if self.slice_param == "W" else d.transpose(1, 2)).numpy()


def make_case(case: str, seed: int, p: ToyParams) -> ToyCase:
    """Train the case's toy model and build its gradient data and ground truth (no SAE yet)."""
    spec = CASES[case]
    n, m = spec["shape"]
    g = torch.Generator().manual_seed(seed + 2)
    x = sample_features(p.n_samples, n, p.feature_prob, g)
    x = x[(x > 0).any(1)]
    reference = "sample" if spec["model"] == "tms" else "zero"
    if spec["model"] == "tms":
        model = train_tms(n, m, p.feature_prob, p.model_steps, seed=seed)
        truth, A = circuits(model), None
        slice_param, truth_slices = "W", model.W.detach().numpy()
    else:
        model, A = train_tmcs(n, m, TMCS_OUTPUTS, p.feature_prob, p.model_steps, seed=seed)
        truth = tmcs_circuits(model)
        slice_param = "W_in"
        truth_slices = truth["W_in"][torch.arange(n), torch.arange(n)].numpy().T  # [hidden, inputs]: input i's W_in row

    def gradients(x):
        d = divergence_gradients(model, x, g, reference)
        nonzero = torch.stack([v.reshape(len(x), -1).abs().sum(1) for v in d.values()]).sum(0) > 0
        return {
            k: v[nonzero] for k, v in d.items()
        }, nonzero  # an all-zero gradient (every output dead) carries no circuit

    data, _ = gradients(x)
    one = torch.zeros(len(x), n)  # as many samples, each with exactly one active feature
    feature = torch.randint(n, (len(x),), generator=g)
    one[torch.arange(len(x)), feature] = torch.rand(len(x), generator=g)
    single, kept = gradients(one)
    made = ToyCase(model, data, truth, slice_param, truth_slices, A, single, feature[kept].numpy())
    made.model_metrics = model_metrics(made)  # once per model, not once per activation variant
    return made


@dataclass
class SAEFit:
    """One SAE fitted to a toy case's gradients, and what it scores (see ``METRICS``)."""

    sae: object
    mmcs_columnwise: float
    mmcs_whole: float
    ml2r_share: float
    recon_error: float
    l0: float
    dead_fraction: float
    coef_r: float
    n_datapoints: int
    ml2r_gradient: float = float("nan")
    """Only for the table's SAE (not the controls)."""
    own_output_share: float = float("nan")
    """TMS, only for the table's SAE."""
    curves: np.ndarray | None = None
    """TMS, only for the table's SAE: intervention curves [shard, delta, output]."""


def sae_params(case: str, seed: int, activation: str, p: ToyParams, n_datapoints: int, tag: str = ""):
    """The :class:`~shardlib.fit.FitParams` of one toy SAE on ``n_datapoints`` gradients (``tag``: a
    control's, in its folder name). Checkpoints go to ``out_dir/sae/<fingerprint of p>/``: a rerun with the
    same parameters resumes, and one with other toy-model parameters never picks up an SAE of other data."""
    from .fit import FitParams

    n = CASES[case]["shape"][0]
    epochs = max(1, math.ceil(p.sae_steps / math.ceil(n_datapoints / p.batch_size)))
    return FitParams.from_dict(
        {
            "out_dir": f"{p.out_dir}/sae/{p.fingerprint()[:12]}/{case}_{activation}_{tag}seed{seed}",
            "seed": seed,
            "n_latents": n * p.latents_per_feature,
            "k": p.k or CASES[case]["k"],
            "rank": 1,
            "activation": p.sae_activation,
            "signed": activation == "signed",
            "epochs": epochs,
            "lr": p.lr,
            "batch_size": p.batch_size,
            "holdout_frac": 0.0,
            "checkpoint_every": epochs,
            "device": p.device,
            # the toy reproductions keep the settings they were tuned and measured with (L3D-like: one
            # absolute Adam rate, an encoder bias, no restarts or decay; the README's analysis of the
            # TMS 40->10 gap was measured with them), not the shard stage's defaults
            "lr_relative": False,
            "lr_decay": 0.0,
            "resample_dead": False,
            "fire_frac": 0.0,
            "encoder_bias": True,
        }
    )


def fit_sae(
    made: ToyCase, case: str, seed: int, activation: str, p: ToyParams, *, init_directions=None, single_feature=False
) -> SAEFit:
    """Train the SAE on a case's gradients (or, with ``single_feature``, on the single-feature
    control's), started at ``init_directions`` when given (the truth-start control).

    Only the table's SAE (neither control) also gets the gradient ML2R and, on TMS, the
    intervention curves. Checkpoints go where :func:`sae_params` puts them.
    """
    from .common import flatten
    from .fit import fit
    from .metrics import abs_cos

    data = made.data_single if single_feature else made.data
    N = len(next(iter(data.values())))
    tag = ("truthinit_" if init_directions is not None else "") + ("data_single_" if single_feature else "")
    sp = sae_params(case, seed, activation, p, N, tag)
    sae = fit(sp, data, progress=False, init_directions=init_directions).sae.cpu()
    dirs = sae.directions()
    slices = made.slices(dirs)
    col_mmcs, share = columnwise(slices, made.truth_slices)
    best = column_cos(slices, made.truth_slices).argmax(0)  # the shard matched to each feature
    names = list(data)
    whole = abs_cos(flatten(made.truth, names), flatten(dirs, names))
    coef_r = float("nan")
    if made.A is not None:
        coef_r = coefficient_r(dirs["b"].numpy()[whole.argmax(1)], made.A.numpy())
    with torch.no_grad():
        sae.eval()
        xh, z, *_ = sae(data)
        num = sum(((data[k] / sae.scale - xh[k]) ** 2).sum() for k in data)
        den = sum(((data[k] / sae.scale) ** 2).sum() for k in data)
    freq = (z != 0).float().mean(0)
    fit = SAEFit(
        sae,
        mmcs_columnwise=col_mmcs,
        mmcs_whole=float(whole.max(1).mean()),
        ml2r_share=share,
        recon_error=float(num / den),
        l0=float((z != 0).sum(1).float().mean()),
        dead_fraction=float((freq == 0).float().mean()),
        coef_r=coef_r,
        n_datapoints=N,
    )
    if init_directions is None and not single_feature:  # the SAE of the table (not a control)
        fit.ml2r_gradient = gradient_ml2r(sae, made.data_single, made.single_feature, best)  # magnitude at best match
        if isinstance(made.model, TMS):  # W0 + delta * shard: which outputs move?
            fit.curves = np.stack(
                [intervention_curve(made.model, {k: v[i] for k, v in dirs.items()}) for i in range(len(dirs["W"]))]
            )
            fit.own_output_share = own_output_share(fit.curves, best)
    return fit


def case_row(made: ToyCase, case: str, seed: int, activation: str, p: ToyParams) -> tuple[dict, SAEFit]:
    """The results-table row of one (case, seed, activation) (every ``METRICS`` key), with the table's SAE fit.

    The controls (truth start, single-feature data) run for the signed variant only. SAEs resume
    from their checkpoints, so calling this again after ``run`` with the same parameters returns
    the table's numbers without training again.
    """
    fit = fit_sae(made, case, seed, activation, p)
    row = {k: getattr(fit, k) for k in METRICS if hasattr(fit, k)}
    nan = float("nan")
    row["mmcs_truth_init"] = row["mmcs_single_feature"] = row["recon_error_single_feature"] = nan
    if p.truth_init and activation == "signed":
        row["mmcs_truth_init"] = fit_sae(made, case, seed, activation, p, init_directions=made.truth).mmcs_columnwise
    if p.single_feature_control and activation == "signed":
        single = fit_sae(made, case, seed, activation, p, single_feature=True)
        row["mmcs_single_feature"], row["recon_error_single_feature"] = single.mmcs_columnwise, single.recon_error
    return {**row, **made.model_metrics}, fit


def run_case(case: str, seed: int, activation: str, p: ToyParams) -> tuple[dict, SAEFit]:
    """One (case, seed, activation) alone, on one CPU thread: the toy model, its gradients, the SAE and its row."""
    with one_thread():
        return case_row(make_case(case, seed, p), case, seed, activation, p)


def model_metrics(made: ToyCase) -> dict:
    """What the trained toy model itself scores (no SAE): the ceilings the shards are read against."""
    model, out = made.model, {"coef_r_model": float("nan"), "own_output_share_truth": float("nan")}
    if made.A is not None:  # TMCS: how well the model's own outputs f(e_i) follow A
        with torch.no_grad():
            out["coef_r_model"] = coefficient_r(model(torch.eye(len(made.A))).numpy(), made.A.numpy())
    if isinstance(model, TMS):  # the intervention along the ground-truth circuits themselves
        unit = {
            k: v / made.truth["W"].flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1))) for k, v in made.truth.items()
        }
        curves = np.stack(
            [intervention_curve(model, {k: v[i] for k, v in unit.items()}) for i in range(len(unit["W"]))]
        )
        out["own_output_share_truth"] = own_output_share(curves, np.arange(len(curves)))
    return out


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread inside the block (CPU reductions may add in another order with
    another thread count; one thread everywhere keeps the numbers independent of ``workers``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _job(case: str, seed: int, p: ToyParams) -> list[tuple[dict, np.ndarray | None]]:
    """One (case, seed): the toy model once, then an SAE per activation variant: (row, intervention curves)."""
    with one_thread():
        made = make_case(case, seed, p)
        out = []
        for act in p.activations:
            row, fit = case_row(made, case, seed, act, p)
            out.append((row, fit.curves))
        return out


def run(p: ToyParams, progress: bool = True) -> xr.Dataset:
    """The stage: :func:`results` of every (case, activation, seed), written to ``results.nc``."""
    from pathlib import Path

    from .io import save_results

    ds = results(p, progress)
    save_results(ds, Path(p.out_dir) / "results.nc", p.to_dict(), p.seed)
    return ds


def results(p: ToyParams, progress: bool = True) -> xr.Dataset:
    import concurrent.futures as cf
    import multiprocessing as mp

    keys = list(METRICS)
    vals = {k: np.full((len(p.cases), len(p.activations), len(p.seeds)), np.nan) for k in keys}
    jobs = [(i, s) for i in range(len(p.cases)) for s in range(len(p.seeds))]
    jobs.sort(key=lambda j: -math.prod(CASES[p.cases[j[0]]]["shape"]))  # biggest first: the workers finish together
    bar = progress_bar(total=len(jobs), desc="toys", disable=not progress)
    if p.workers > 1 and p.device == "cpu":
        # fork (as torch's DataLoader workers): spawn would re-run a calling script without a main guard
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with cf.ProcessPoolExecutor(p.workers, mp_context=ctx) as pool:
            futures = {pool.submit(_job, p.cases[i], p.seeds[s], p): (i, s) for i, s in jobs}
            results = {}
            for f in cf.as_completed(futures):
                results[futures[f]] = f.result()
                bar.update(1)
    else:
        results = {}
        for i, s in jobs:
            results[(i, s)] = _job(p.cases[i], p.seeds[s], p)
            bar.update(1)
    bar.close()
    for (i, s), per_act in results.items():
        for j, (m, _) in enumerate(per_act):
            for k in keys:
                vals[k][i, j, s] = m[k]
    ds = xr.Dataset(
        {k: (("case", "activation", "seed"), v, {"description": METRICS[k]}) for k, v in vals.items()},
        coords={"case": list(p.cases), "activation": list(p.activations), "seed": list(p.seeds)},
    )
    if "tms_5_2" in p.cases:  # the intervention curves of one run, for the figure
        curves = results[(list(p.cases).index("tms_5_2"), 0)][0][1]
        ds["intervention_tms_5_2"] = (
            ("shard", "delta", "output"),
            curves,
            {
                "description": f"TMS 5->2, seed {p.seeds[0]}, {p.activations[0]}: mean |output change| under W0 + delta * ||W|| * shard"
            },
        )
        ds = ds.assign_coords(delta=INTERVENTION_DELTAS)
    for case in p.cases:
        for metric, (v, src) in PUBLISHED.get(case, {}).items():
            ds.attrs[f"published_{case}_{metric}"] = f"{v} ({src})"
    return ds


def comparison_table(ds: xr.Dataset):
    """Mean ± std over seeds next to the published numbers, as a pandas frame."""
    import pandas as pd

    rows = []
    for case in ds.case.values:
        for act in ds.activation.values:
            sel = ds.sel(case=case, activation=act)
            row = {"case": str(case), "activation": str(act)}
            for k in (
                "mmcs_columnwise",
                "mmcs_truth_init",
                "mmcs_single_feature",
                "mmcs_whole",
                "ml2r_share",
                "ml2r_gradient",
                "own_output_share",
                "own_output_share_truth",
                "recon_error",
                "l0",
                "dead_fraction",
                "coef_r",
                "coef_r_model",
            ):
                v = sel[k].values
                row[k] = "–" if np.isnan(v).all() else f"{float(np.nanmean(v)):.3f} ± {float(np.nanstd(v)):.3f}"
            pub = PUBLISHED.get(str(case), {})
            row["published"] = "; ".join(f"{m} {v} ({src})" for m, (v, src) in pub.items())
            rows.append(row)
    return pd.DataFrame(rows)
