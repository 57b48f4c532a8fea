"""Benchmark: a fair peer comparison of shardlib's shard SAE and EleutherAI sparsify's ``SparseCoder`` (issue 22).

    pip install -e '.[bench]'        # eai-sparsify 1.3.3, a benchmark-only extra
    OMP_NUM_THREADS=1 python benchmarks/bench_peer.py          # 15 minutes on one thread of a shared 2-core machine
    python benchmarks/bench_peer.py --table                    # the markdown tables of the results file

Each library is trained as its own users would, on the same planted stores (one per seed: a member of
``shardlib.planted.FAMILY``, at a width ``--d-model`` that makes the budgets fit one CPU thread), with the
same train/held-out split and the same batches (the shard stage's: 128 events, a fixed permutation per
epoch), in one process:

- **shardlib**: ``fit_planted`` at the shard stage's defaults (ReLU TopK, rank = the planted rank, Adam
  at the relative rate 0.03 decaying to 0 over the last 20% of the steps, AuxK 1/32 over latents not
  fired within 5,000 samples, dead-latent restarts, firing threshold 0.1 of an event's largest code);
- **sparsify**: its trainer's recipe (``sparsify/trainer.py``, ``TrainConfig`` defaults) on its own
  ``SparseCoder``: the default optimizer ``signum`` (schedule-free SignSGD, momentum 0.95, default rate
  5e-3 / sqrt(latents / 2**14), no warm-up or decay), ``b_dec`` from the first batch's mean, decoder
  set to unit norm before every step and the gradient parallel to it removed, loss ``fvu + auxk_alpha *
  auxk_loss`` from its forward pass (its AuxK: k_aux = d_in / 2, scaled by n_dead / k_aux), AuxK on at
  Gao et al.'s 1/32 (its default is 0), its dead threshold (10M tokens against its default 10B-token
  dataset: 0.1% of the run) counted in samples as 0.1% of this run's, and the schedule-free average
  (``optimizer.eval()``) evaluated, as its checkpoints hold. The data is scaled to coordinates of RMS 1,
  the scale of the language-model activations its rates are set for (FVU and recovery do not depend on
  it).

Both SAEs get the same latents (two per planted shard: ReLU codes, one per sign) and k (the shards
active per event). Learning rates: a pilot on a data seed of its own (``--pilot-seed``) at the first
budget sweeps each library's default rate times ``--pilot-mult`` and keeps the multiplier of lowest
held-out FVU; the grid is then that multiplier times ``--grid`` for both libraries, every point at the
first ``--select-seeds`` seeds and every budget; the rate of lowest mean held-out FVU over those seeds is
chosen per library and budget (never by recovery), and the other seeds run at it. Recovery of the planted
shards (MMCS(G->D), R@0.9, Hungarian MCC) is reported at the chosen rate, mean and std over all seeds.

Recipe ablation (at the chosen rate, budgets ``--ablation-budgets``): shardlib without dead-latent
restarts and without its firing threshold (``resample_dead=False``, ``fire_frac=0``; its AuxK stays on);
sparsify with shardlib's extras (AuxK as shardlib weighs it: 1/32, k_aux = latents / 2, unscaled,
over latents not fired within 5,000 samples, normalised by the residual's variance; firing threshold
0.1; dead latents restarted at the residuals of the batch's worst-reconstructed events with their
optimizer state reset).

Writes ``benchmarks/results/bench_peer.json`` (every fit, the pilot, the grid, the choices and what each
side was given) after every fit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib import metrics  # noqa: E402
from shardlib.common import flatten  # noqa: E402
from shardlib.fit import FitParams, split_events  # noqa: E402
from shardlib.planted import FAMILY, fit_planted, model_shapes, planted_updates  # noqa: E402
from shardlib.sae import dense  # noqa: E402

BATCH, HOLDOUT = 128, 0.1
SHARDLIB_LR = FitParams.__dataclass_fields__["lr"].default  # 0.03, relative
SPARSIFY_THRESHOLD_FRAC = 10_000_000 / 10_000_000_000  # dead_feature_threshold / its default dataset's tokens
SHARDLIB_DEAD_WINDOW = FitParams.__dataclass_fields__["dead_window"].default
SHARDLIB_FIRE_FRAC = FitParams.__dataclass_fields__["fire_frac"].default
SHARDLIB_AUX = FitParams.__dataclass_fields__["aux_coef"].default
GAO_AUXK_ALPHA = 1 / 32
TIMING_EPOCHS = 5
KEYS = ("mmcs_g2d", "r@0.9", "hungarian_mcc", "fvu", "seconds", "ms_per_step")


def sparsify_default_lr(n_latents: int) -> float:
    """sparsify's trainer, ``optimizer="signum"`` with ``lr=None``."""
    return 5e-3 / (n_latents / 2**14) ** 0.5


def make_store(member: str, d_model: int, n_events: int, seed: int):
    """``family_store`` at width ``d_model`` (64 is the family's own): (names, data, planted directions [S, D])."""
    m = FAMILY[member]
    shapes = model_shapes(d_model, 2 * d_model, m["n_layers"], m["patterns"])
    lo, hi = m["tensors"]
    args = (m["n_shards"], n_events, m["active"], m["rank"], hi, m["zipf"], m["noise"], True, seed)
    data, truth, _, _ = planted_updates(
        shapes, *args, min_tensors_per_shard=lo, coefficients=m["coefficients"], exact_active=True
    )
    names = list(shapes)
    return names, data, flatten(truth, names)


def heldout_fvu(x: torch.Tensor, xhat: torch.Tensor) -> float:
    """sum ||x - xhat||^2 / sum ||x - mean||^2 over the held-out events (float64): the same for both libraries."""
    x, xhat = x.double(), xhat.double()
    return float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def shardlib_fit(store, seed, epochs, lr, n_latents, k, rank, tmp, ablate=False):
    names, data, G = store
    settings = {
        "out_dir": tempfile.mkdtemp(dir=tmp),  # a fresh folder: no checkpoint to resume from
        "seed": seed,
        "n_latents": n_latents,
        "k": k,
        "rank": rank,
        "signed": False,
        "device": "cpu",
        "epochs": epochs,
        "batch_size": BATCH,
        "holdout_frac": HOLDOUT,
        "lr": lr,
        "checkpoint_every": epochs,
    }
    if ablate:  # the two extras shardlib's shard stage adds to a TopK SAE, both parameters
        settings.update(resample_dead=False, fire_frac=0.0)
    row, res = fit_planted(settings, data, G, names)
    steps = epochs * math.ceil(len(res.train_idx) / BATCH)
    with torch.no_grad():
        held = {n: v[res.heldout_idx] for n, v in data.items()}
        xhat = {n: dense(v) * res.sae.scale for n, v in res.sae(held).xhat.items()}  # in the input's units
        fvu = heldout_fvu(_cat(held, names), _cat(xhat, names))
    return {
        **{k_: float(row[k_]) for k_ in ("mmcs_g2d", "r@0.9", "hungarian_mcc")},
        "fvu": fvu,
        "seconds": row["seconds"],
        "ms_per_step": 1000 * row["seconds"] / steps,
        "steps": steps,
        "samples": epochs * len(res.train_idx),
        "n_parameters": row["n_parameters"],
    }


def _cat(tensors, names):
    return torch.cat([tensors[n].reshape(len(tensors[n]), -1) for n in names], 1)


def _shardlib_style_aux(sae, x, out, dead, k_aux):
    """shardlib's AuxK (``shardlib.sae.aux_loss``) on a SparseCoder: the top-``k_aux`` dead latents reconstruct
    the residual, no bias, ``||e - e_hat||^2 / sum ||e - mean e||^2``, unscaled."""
    from sparsify.utils import decoder_impl

    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    e = (x - out.sae_out).detach()
    pre = torch.relu(torch.nn.functional.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
    idx = pre.masked_fill(~dead[None], -float("inf")).topk(min(k_aux, n_dead), dim=1).indices
    e_hat = decoder_impl(idx, pre.gather(1, idx), sae.W_dec.mT)
    return ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum().clamp(min=1e-30)


@torch.no_grad()
def _restart_dead(sae, opt, x, out, dead):
    """shardlib's restart (``Trainer.resample_dead_``) on a SparseCoder: each dead latent's decoder and encoder
    rows at the unit residual of one of the batch's worst-reconstructed events, encoder bias 0, and its
    schedule-free state (z) set to the same values."""
    idx = torch.nonzero(dead).flatten()
    e = x - out.sae_out
    err = (e**2).sum(1)
    m = min(len(idx), int((err > 0).sum()))
    if m == 0:
        return idx[:0]
    idx, worst = idx[:m], err.topk(m).indices
    d = e[worst] / e[worst].norm(dim=1, keepdim=True)
    for prm, val in ((sae.W_dec, d), (sae.encoder.weight, d), (sae.encoder.bias, 0.0)):
        prm[idx] = val
        st = opt.state.get(prm, {})
        if "z" in st:
            st["z"][idx] = val
    return idx


def sparsify_fit(store, seed, epochs, lr, n_latents, k, extras=False, threshold=None):
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    names, data, G = store
    X = _cat(data, names)
    train_idx, held_idx = split_events(len(X), HOLDOUT, seed)
    # the scale of language-model activations (coordinates of RMS 1), from the training events
    X = X * (X.shape[1] / X[train_idx].pow(2).sum(1).mean()).sqrt()
    steps = epochs * math.ceil(len(train_idx) / BATCH)
    samples_total = epochs * len(train_idx)
    if threshold is None:  # sparsify's dead_feature_threshold, counted in samples, scaled to this run
        threshold = max(1, round(SPARSIFY_THRESHOLD_FRAC * samples_total))
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # as its trainer: torch.manual_seed(init seed), then the SparseCoder
    sae = SparseCoder(X.shape[1], SparseCoderConfig(num_latents=n_latents, k=k), "cpu", dtype=torch.float32)
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(n_latents, dtype=torch.long)  # sparsify's num_tokens_since_fired
    last_fired = torch.zeros(n_latents, dtype=torch.long)  # extras: shardlib's firing record
    samples, step, n_restarts = 0, 0, 0
    for epoch in range(epochs):  # the shard stage's batches
        perm = train_idx[np.random.default_rng([seed, epoch]).permutation(len(train_idx))]
        for s in range(0, len(perm), BATCH):
            x = X[perm[s : s + BATCH]]
            if step == 0:  # its trainer: b_dec from the first batch's mean
                sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()  # its trainer, before every forward pass
            if extras:
                dead = (samples - last_fired) > SHARDLIB_DEAD_WINDOW
                out = sae(x)
                loss = out.fvu + SHARDLIB_AUX * _shardlib_style_aux(sae, x, out, dead, n_latents // 2)
            else:
                out = sae(x, dead_mask=since_fired > threshold)
                loss = out.fvu + GAO_AUXK_ALPHA * out.auxk_loss
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            samples += len(x)
            step += 1
            with torch.no_grad():
                since_fired += len(x)
                since_fired[out.latent_indices.flatten()] = 0
                if extras:  # fired: at least fire_frac of the event's largest code
                    a = out.latent_acts
                    ok = (a > 0) & (a >= SHARDLIB_FIRE_FRAC * a.max(1, keepdim=True).values)
                    last_fired[out.latent_indices[ok].unique()] = samples
                    dead = (samples - last_fired) > SHARDLIB_DEAD_WINDOW
                    if dead.any():
                        restarted = _restart_dead(sae, opt, x, out, dead)
                        last_fired[restarted] = samples
                        n_restarts += len(restarted)
    opt.eval()  # the schedule-free average: what its checkpoints hold
    dt = time.perf_counter() - t0
    D = sae.W_dec.detach().numpy()
    row = metrics.recovery(G, D / np.linalg.norm(D, axis=1, keepdims=True))
    with torch.no_grad():
        held = X[held_idx]
        fvu = heldout_fvu(held, sae(held).sae_out)
    return {
        **{k_: float(row[k_]) for k_ in ("mmcs_g2d", "r@0.9", "hungarian_mcc")},
        "fvu": fvu,
        "seconds": dt,
        "ms_per_step": 1000 * dt / steps,
        "steps": steps,
        "samples": samples_total,
        "n_parameters": sum(p.numel() for p in sae.parameters()),
        "dead_threshold_samples": SHARDLIB_DEAD_WINDOW if extras else threshold,
        "n_restarts": n_restarts,
    }


DEFAULT_LR = {"shardlib": lambda F: SHARDLIB_LR, "sparsify": sparsify_default_lr}
LIBS = ("shardlib", "sparsify")


def fit(lib, store, seed, epochs, lr, F, k, rank, tmp, ablate=False):
    if lib == "shardlib":
        return shardlib_fit(store, seed, epochs, lr, F, k, rank, tmp, ablate)
    return sparsify_fit(store, seed, epochs, lr, F, k, extras=ablate)


def summarize(rows: list[dict]) -> dict:
    return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))] for k in KEYS}


GIVEN = {
    "shardlib": (
        "fit_planted at the shard stage's defaults: ReLU TopK, rank = the planted rank, Adam at a relative rate"
        " (lr / sqrt(width) per tensor; default 0.03), linear decay to 0 over the last 20% of steps, AuxK 1/32"
        " (k_aux = latents/2) over latents not fired within 5,000 samples, dead-latent restarts at the worst"
        " residuals, firing threshold 0.1 of the event's largest code, b_pre = data mean, input scaled to mean"
        " squared norm 1, no encoder bias"
    ),
    "sparsify": (
        "its trainer's recipe: SparseCoder (dense ReLU TopK, encoder bias), signum = schedule-free SignSGD"
        " momentum 0.95 (default rate 5e-3/sqrt(latents/2**14); no warm-up or decay), b_dec = first batch's"
        " mean, decoder unit norm before each step and its parallel gradient removed, loss fvu + 1/32 auxk_loss"
        " from its forward (k_aux = d_in/2, scaled by n_dead/k_aux), dead threshold 0.1% of the run's samples"
        " (its 10M of a 10B-token default), evaluated at the schedule-free average; data scaled to coordinates"
        " of RMS 1"
    ),
    "shardlib ablation": "the same without dead-latent restarts and without the firing threshold (AuxK kept)",
    "sparsify ablation": (
        "the same with shardlib's extras: AuxK 1/32 unscaled (k_aux = latents/2, over latents not fired within"
        " 5,000 samples, normalised by the residual's variance) in place of its own, firing threshold 0.1,"
        " dead latents restarted at the worst residuals with their schedule-free state reset"
    ),
}


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(args.threads)
    if args.timing_only:
        add_timing(args)
        return
    ablation_budgets = args.budgets[:1] if args.ablation_budgets is None else args.ablation_budgets
    t_start, cpu_start = time.perf_counter(), time.process_time()
    result = settings(args, ablation_budgets)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(result, out, t_start, cpu_start, tmp)
        # 1. pilot: where each library's rate lies, by held-out FVU, on a data seed of its own
        center = pilot(bench, args)
        result["pilot_choice"] = center
        # 2. the grid, every point at the selection seeds and every budget
        bench.stores = {seed: make_store(args.member, args.d_model, args.events, seed) for seed in args.seeds}
        select, rest = args.seeds[: args.select_seeds], args.seeds[args.select_seeds :]
        for seed in select:
            for epochs in args.budgets:
                for lib in LIBS:
                    for g in args.grid:
                        bench.fit_row("own", seed, epochs, lib, center[lib] * g)
        # 3. the rate of lowest mean held-out FVU over the selection seeds, per library and budget
        chosen = choose_rates(result["rows"], args.budgets)
        result["chosen_mult"] = chosen
        #    and the other seeds at the chosen rate
        for seed in rest:
            for epochs in args.budgets:
                for lib in LIBS:
                    bench.fit_row("own", seed, epochs, lib, chosen[f"{lib} | {epochs}"])
        # 4. the recipe ablation at the chosen rate
        for seed in args.seeds:
            for epochs in ablation_budgets:
                for lib in LIBS:
                    bench.fit_row("ablation", seed, epochs, lib, chosen[f"{lib} | {epochs}"])
        # 5. time per step, the four recipes interleaved
        measure_timing(result, bench.stores[args.seeds[0]], args.seeds[0], args.timing_rounds, tmp)
    result["summary"] = summary(result)
    bench.save()
    print(markdown(result))
    print(f"wall time {result['wall_seconds']:.0f} s, CPU time {result['cpu_seconds']:.0f} s")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--member", default="attn_heavy", choices=list(FAMILY))
    ap.add_argument("--d-model", type=int, default=16, help="width of the tiny Llama the shards live in (family: 64)")
    ap.add_argument("--events", type=int, default=4096)
    ap.add_argument("--budgets", nargs="+", type=int, default=[30, 80], help="epochs over the training events")
    ap.add_argument("--ablation-budgets", nargs="*", type=int, default=None, help="default: the first budget")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="data, split and SAE seeds")
    ap.add_argument("--select-seeds", type=int, default=2, help="how many of --seeds run the whole grid")
    ap.add_argument("--pilot-seed", type=int, default=99)
    ap.add_argument("--pilot-mult", nargs="+", type=float, default=[1, 1 / 4, 1 / 16, 1 / 64])
    ap.add_argument("--grid", nargs="+", type=float, default=[2, 1, 0.5], help="times the pilot's multiplier")
    ap.add_argument("--timing-rounds", type=int, default=3, help="interleaved rounds of the time-per-step measurement")
    ap.add_argument("--timing-only", action="store_true", help="only add the interleaved time per step to --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_peer.json"))
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out's results; no training")
    return ap.parse_args(argv)


def add_timing(args) -> None:
    """``--timing-only``: add the interleaved time per step to an existing results file."""
    result = json.loads(Path(args.out).read_text())
    seed = result["seeds"][0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(result["member"], result["d_model"], result["events"], seed)
        measure_timing(result, store, seed, args.timing_rounds, tmp)
    result["timing_wall_seconds"] = time.perf_counter() - t0
    result["timing_load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))


def settings(args, ablation_budgets: list[int]) -> dict:
    """The results file's start: the machine, the versions and what the run was given; no fits yet."""
    m = FAMILY[args.member]
    F = 2 * m["n_shards"]
    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
        "sparsify": _version("eai-sparsify"),
        "member": args.member,
        "d_model": args.d_model,
        "events": args.events,
        "holdout_frac": HOLDOUT,
        "batch_size": BATCH,
        "n_latents": F,
        "k": m["active"],
        "shardlib_rank": m["rank"],
        "budgets_epochs": args.budgets,
        "ablation_budgets_epochs": ablation_budgets,
        "seeds": args.seeds,
        "select_seeds": args.seeds[: args.select_seeds],
        "pilot_seed": args.pilot_seed,
        "pilot_mult": args.pilot_mult,
        "grid_mult": args.grid,
        "default_lr": {lib: DEFAULT_LR[lib](F) for lib in LIBS},
        "given": GIVEN,
        "pilot": [],
        "rows": [],
    }


class Bench:
    """One run: the fits' shared settings and data stores, and the results file, written after every fit."""

    def __init__(self, result: dict, out: Path, t_start: float, cpu_start: float, tmp: str):
        self.result, self.out, self.t_start, self.cpu_start, self.tmp = result, out, t_start, cpu_start, tmp
        self.F, self.k, self.rank = result["n_latents"], result["k"], result["shardlib_rank"]
        self.stores: dict[int, tuple] = {}

    def save(self) -> None:
        self.result["wall_seconds"] = time.perf_counter() - self.t_start
        self.result["cpu_seconds"] = time.process_time() - self.cpu_start
        self.result["load_average_end"] = os.getloadavg()  # the machine is shared: ms / step depends on it
        self.out.write_text(json.dumps(self.result, indent=1))

    def add(self, key: str, row: dict) -> None:
        """Keep a finished fit's ``row`` under ``result[key]``, print it and save."""
        self.result[key].append(row)
        shown = {k_: round(v, 4) if isinstance(v, float) else v for k_, v in row.items()}
        print(json.dumps(shown), flush=True)
        self.save()

    def fit(self, lib, store, seed, epochs, lr, ablate=False) -> dict:
        return fit(lib, store, seed, epochs, lr, self.F, self.k, self.rank, self.tmp, ablate)

    def fit_row(self, recipe: str, seed: int, epochs: int, lib: str, mult: float) -> None:
        """Fit ``lib``'s ``recipe`` ("own" or "ablation") at ``mult`` times its default rate on seed ``seed``."""
        lr = mult * DEFAULT_LR[lib](self.F)
        row = {"lib": lib, "recipe": recipe, "epochs": epochs, "seed": seed, "mult": mult, "lr": lr}
        row.update(self.fit(lib, self.stores[seed], seed, epochs, lr, ablate=recipe == "ablation"))
        self.add("rows", row)


def pilot(bench: Bench, args) -> dict[str, float]:
    """Each library at every ``--pilot-mult`` times its default rate on the pilot seed, at the first budget; the
    multiplier of lowest held-out FVU per library."""
    store = make_store(args.member, args.d_model, args.events, args.pilot_seed)
    for lib in LIBS:
        for mult in args.pilot_mult:
            lr = mult * DEFAULT_LR[lib](bench.F)
            row = {"lib": lib, "mult": mult, "lr": lr, "epochs": args.budgets[0]}
            row.update(bench.fit(lib, store, args.pilot_seed, args.budgets[0], lr))
            bench.add("pilot", row)
    center = {}
    for lib in LIBS:
        pil = [r for r in bench.result["pilot"] if r["lib"] == lib]
        center[lib] = min(pil, key=lambda r: r["fvu"])["mult"]
    return center


def choose_rates(rows: list[dict], budgets: list[int]) -> dict[str, float]:
    """Per ``"<library> | <budget>"``: the multiplier of lowest mean held-out FVU among ``rows``."""
    chosen = {}
    for lib in LIBS:
        for epochs in budgets:
            by = {}
            for r in rows:
                if r["lib"] == lib and r["epochs"] == epochs:
                    by.setdefault(r["mult"], []).append(r["fvu"])
            chosen[f"{lib} | {epochs}"] = min(by, key=lambda mu: np.mean(by[mu]))
    return chosen


def measure_timing(result: dict, store, seed: int, rounds: int, tmp: str) -> None:
    """Time per step of the four recipes (each library, own and ablation), interleaved: the machine may be shared
    and a fit's own time depends on its load. The minimum over ``rounds`` of a short fit at ``seed`` and the
    first budget's chosen rate, into ``result["timing_ms_per_step"]``."""
    m = FAMILY[result["member"]]
    F, k, rank = result["n_latents"], result["k"], m["rank"]
    timing = {}
    for _ in range(rounds):
        for lib in ("shardlib", "sparsify"):
            for ablate in (False, True):
                lr = result["chosen_mult"][f"{lib} | {result['budgets_epochs'][0]}"] * DEFAULT_LR[lib](F)
                r = fit(lib, store, seed, TIMING_EPOCHS, lr, F, k, rank, tmp, ablate)
                timing.setdefault(f"{lib} | {'ablation' if ablate else 'own'}", []).append(r["ms_per_step"])
    result["timing_epochs"] = TIMING_EPOCHS
    result["timing_ms_per_step_all"] = timing
    result["timing_ms_per_step"] = {key: min(v) for key, v in timing.items()}


def summary(result: dict) -> list[dict]:
    """Mean and std over seeds per library x budget x recipe, at the chosen rate."""
    out = []
    for lib in ("shardlib", "sparsify"):
        for recipe in ("own", "ablation"):
            for epochs in result["budgets_epochs"]:
                mult = result["chosen_mult"][f"{lib} | {epochs}"]
                rs = [
                    r
                    for r in result["rows"]
                    if r["lib"] == lib and r["recipe"] == recipe and r["epochs"] == epochs and r["mult"] == mult
                ]
                if rs:
                    lr = rs[0]["lr"]
                    out.append(
                        {"lib": lib, "recipe": recipe, "epochs": epochs, "samples": rs[0]["samples"], "mult": mult}
                        | {"lr": lr, "n_seeds": len(rs), **summarize(rs)}
                    )
    return out


def markdown(result: dict) -> str:
    """The peer table (chosen rates) and the grid (held-out FVU at every rate)."""
    name = {"own": "own recipe", "ablation": "ablation"}
    lines = [
        "| library | recipe | samples | lr (× default) | MMCS(G→D) | R@0.9 | Hungarian MCC | held-out FVU "
        "| ms / step (fits) | ms / step (interleaved) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    timing = result.get("timing_ms_per_step", {})
    for s in result.get("summary") or summary(result):
        lines.append(
            f"| {s['lib']} | {name[s['recipe']]} | {s['samples']:,} | {s['lr']:.3g} (×{s['mult']:.3g}) | "
            f"{s['mmcs_g2d'][0]:.3f} ± {s['mmcs_g2d'][1]:.3f} | {s['r@0.9'][0]:.2f} ± {s['r@0.9'][1]:.2f} | "
            f"{s['hungarian_mcc'][0]:.3f} ± {s['hungarian_mcc'][1]:.3f} | {s['fvu'][0]:.4f} ± {s['fvu'][1]:.4f} | "
            f"{s['ms_per_step'][0]:.1f} | {timing.get(s['lib'] + ' | ' + s['recipe'], float('nan')):.1f} |"
        )
    lines += [
        "",
        "Grid (own recipe, selection seeds; the rate of lowest mean held-out FVU is chosen, marked *):",
        "",
        "| library | samples | lr (× default) | held-out FVU | MMCS(G→D) |",
        "|---|---|---|---|---|",
    ]
    sel = result.get("select_seeds", result["seeds"])
    own = [r for r in result["rows"] if r["recipe"] == "own" and r["seed"] in sel]
    for lib in ("shardlib", "sparsify"):
        for epochs in result["budgets_epochs"]:
            for mult in sorted({r["mult"] for r in own if r["lib"] == lib}, reverse=True):
                rs = [r for r in own if r["lib"] == lib and r["epochs"] == epochs and r["mult"] == mult]
                if not rs:
                    continue
                v = summarize(rs)
                star = " *" if result.get("chosen_mult", {}).get(f"{lib} | {epochs}") == mult else ""
                lines.append(
                    f"| {lib} | {rs[0]['samples']:,} | {rs[0]['lr']:.3g} (×{mult:.3g}){star} | "
                    f"{v['fvu'][0]:.4f} ± {v['fvu'][1]:.4f} | {v['mmcs_g2d'][0]:.3f} ± {v['mmcs_g2d'][1]:.3f} |"
                )
    pil = result.get("pilot", [])
    if pil:
        lines += ["", f"Pilot (data seed {result['pilot_seed']}, held-out FVU by multiplier of the default rate): "]
        for lib in ("shardlib", "sparsify"):
            parts = [f"×{r['mult']:.3g} {r['fvu']:.4f}" for r in pil if r["lib"] == lib]
            lines.append(f"- {lib}: " + ", ".join(parts))
    return "\n".join(lines)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
