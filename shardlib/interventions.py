"""What shards do: parameter interventions on the policy the shards' updates fine-tuned.

Interventions (the parameter-space analogue of the maze policy's "cheese vector"): ``theta_base + alpha *
size_i * shard_i`` with ``size_i`` the shard's component in the fine-tune's total change, both signs, and
ablation ``theta_final - <delta_total, shard> shard``; reward per task family on fixed held-out prompts.
Effects count only above the evaluation's noise floor (the unchanged policy under other sampling seeds);
nulls: random directions from the span of the stored updates at the same sizes, and shuffled shard tasks
for the own-task hit rate.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr

from .metrics import unit_rows

if TYPE_CHECKING:
    from .analysis import AnalysisInputs, AnalysisParams


def add_direction(model, direction: dict[str, torch.Tensor], alpha: float):
    """A copy of ``model`` with ``alpha * direction`` added to the named parameters."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, d in direction.items():
            params[name].add_(alpha * d.to(params[name].dtype))
    return m


def project_out(model, direction: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]):
    """``model`` minus the component of ``delta`` along the (unit) ``direction``."""
    c = float(sum((direction[n] * delta[n]).sum() for n in direction))
    return add_direction(model, direction, -c), c


def param_delta(base, final, names) -> dict[str, torch.Tensor]:
    pb, pf = dict(base.named_parameters()), dict(final.named_parameters())
    return {n: (pf[n] - pb[n]).detach().float() for n in names}


def shard_sizes(raw: np.ndarray, codes: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Each shard's size in parameter space: the sum over the events it fires on of the event update's
    component along it, ``sum_e |<x_e, d_i>|`` (``raw``: the stored updates, unnormalised; ``D``: unit
    directions). One event's component is far too small to move a policy's reward; the sum is how far the
    stored updates moved the policy along the shard."""
    proj = np.abs(np.asarray(raw, dtype=np.float64) @ np.asarray(D, dtype=np.float64).T)
    return (proj * (np.asarray(codes) != 0)).sum(0)


def span_directions(raw: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` unit directions drawn from the span of the stored updates (Gaussian combinations of the events):
    the intervention null, in the space the updates occupy rather than anywhere in parameter space."""
    w = np.random.default_rng(seed).standard_normal((n, len(raw)))
    return unit_rows(w @ np.asarray(raw, dtype=np.float64))


def _unflatten(v: np.ndarray, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = torch.from_numpy(np.ascontiguousarray(v[i : i + size]).reshape(shape)).float()
        i += size
    return out


def intervention_effects(p: AnalysisParams, inp: AnalysisInputs, shard_ids: np.ndarray, event_sizes, randoms):
    """Reward change per task family of adding each shard (``alpha`` × its size, both signs) to the base policy
    and of ablating it from the fine-tuned one; the same additions for ``randoms`` (unit rows, at the shards'
    sizes in turn); and the evaluation noise: the unchanged base policy under ``noise_seeds`` other sampling
    seeds on the same prompts. A shard's size is its component in the fine-tune's actual change,
    ``|<theta_final - theta_base, shard>|`` (what ablation removes): the space the policy moved in, whatever
    the optimizer. ``event_sizes`` (:func:`shard_sizes`, the summed components of the stored events) are kept
    beside it; with Adam and stored updates ``-lr * gradient`` they are on another scale."""
    from .policy import evaluate, evaluate_seeds, load_policy
    from .rl import RLParams, make_testbed

    rp = RLParams.from_dict(json.loads(xr.open_dataset(Path(p.rl_dir) / "results.nc").attrs["config"]))
    testbed = make_testbed(rp)
    base = load_policy(Path(p.rl_dir) / "init_policy").eval()
    final = load_policy(Path(p.rl_dir) / "policy").eval()
    names, shapes = inp.names, {n: inp.dirs[n].shape[1:] for n in inp.names}
    delta = param_delta(base, final, names)
    coef = np.array([float(sum((torch.from_numpy(inp.dirs[n][i]) * delta[n]).sum() for n in names)) for i in shard_ids])
    sizes = np.abs(coef)
    rand_sizes = sizes[np.arange(len(randoms)) % len(sizes)]

    def ev(m):
        return np.array(evaluate(m, testbed, p.eval_prompts, p.seed, rp.temperature)["reward"])

    # the base policy's own draw and its noise draws on the same prompts, encoded once
    draws = evaluate_seeds(base, testbed, p.eval_prompts, p.seed, [None, *range(1, 1 + p.noise_seeds)], rp.temperature)
    r_base, r_final = np.array(draws[0]["reward"]), ev(final)
    noise = np.array([np.array(d["reward"]) - r_base for d in draws[1:]])
    add, add_rand, abl = [], [], []
    for i, size in zip(shard_ids, sizes):
        d = {n: torch.from_numpy(inp.dirs[n][i]) for n in names}
        add.append([ev(add_direction(base, d, a * size)) - r_base for a in p.alphas])
        abl.append(ev(project_out(final, d, delta)[0]) - r_final)
    for r, size in zip(randoms, rand_sizes):
        d = _unflatten(r, shapes)
        add_rand.append([ev(add_direction(base, d, a * size)) - r_base for a in p.alphas])
    return xr.Dataset(
        {
            "add_effect": (("shard", "alpha", "task"), np.array(add)),
            "shard_size": ("shard", sizes),
            "shard_event_size": ("shard", np.asarray(event_sizes, dtype=float)),
            "random_add_effect": (("random", "alpha", "task"), np.array(add_rand)),
            "random_size": ("random", np.asarray(rand_sizes, dtype=float)),
            "ablate_effect": (("shard", "task"), np.array(abl)),
            "ablate_coefficient": ("shard", np.array(coef)),
            "noise_effect": (("noise_seed", "task"), noise.reshape(p.noise_seeds, len(r_base))),
            "reward_base": ("task", r_base),
            "reward_final": ("task", r_final),
        },
        coords={
            "shard": shard_ids,
            "alpha": list(p.alphas),
            "task": list(testbed.task_names),
            "random": np.arange(len(randoms)),
            "noise_seed": np.arange(p.noise_seeds),
        },
        attrs={"update_norm": float(sum((d**2).sum() for d in delta.values()).sqrt())},
    )


def specificity(effect: np.ndarray) -> np.ndarray:
    """max_t |E_t| / sum_t |E_t| per row (1 = the whole effect on one task; 1/T = spread evenly); NaN where a
    row has no effect. Scale-free: pass only effects above the noise floor (:func:`effect_scores`)."""
    a = np.abs(effect)
    total = a.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, a.max(-1) / total, np.nan)  # no effect at all: undefined


def effect_scores(effect: np.ndarray, floor: np.ndarray) -> dict[str, np.ndarray]:
    """Per direction, from its effects [direction, alpha, task] and the noise floor [task]: whether any effect
    exceeds the floor (``moves``), how many (alpha, task) cells do, the sign with the larger total effect
    above the floor, the specificity of that sign's above-floor effects, and its most-moved task (-1: none)."""
    a = np.abs(effect)
    above = np.where(a > floor, a, 0.0)
    best_alpha = above.sum(-1).argmax(1)
    best = above[np.arange(len(a)), best_alpha]
    moves = best.sum(-1) > 0
    return {
        "moves": moves.astype(float),
        "n_above": (above > 0).sum((1, 2)).astype(float),
        "best_alpha": best_alpha,
        "specificity": specificity(best),
        "top_task": np.where(moves, best.argmax(-1), -1),
    }


def own_task_null(own: np.ndarray, top: np.ndarray, n_perm: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Own-task hit rate under shuffled shard tasks: the shards' own tasks permuted among the shards that move
    reward (``top`` >= 0), so that a task every direction hits hardest gives no credit. Returns the null's mean,
    its 95th percentile, and the share of permutations at or above the observed rate (a p-value)."""
    keep = top >= 0
    if not keep.any():
        return float("nan"), float("nan"), float("nan")
    o, t = own[keep], top[keep]
    observed = float((o == t).mean())
    rng = np.random.default_rng(seed)
    null = np.array([(rng.permutation(o) == t).mean() for _ in range(n_perm)])
    return float(null.mean()), float(np.quantile(null, 0.95)), float((null >= observed).mean())


def intervention_results(
    p: AnalysisParams, inp: AnalysisInputs, codes: np.ndarray, task: np.ndarray, X: np.ndarray, D: np.ndarray
) -> xr.Dataset:
    """:func:`intervention_effects` on the most frequent shards, each added at its own size in the fine-tune
    and against as many random directions from the updates' span at the same sizes, scored against the
    evaluation's noise floor (the largest change of the unchanged policy across sampling seeds, per task):
    which directions move reward above it, the specificity of what does, and whether a shard's largest
    effect falls on its own task (the task over whose events its mean |activation| is highest), with that hit rate's shuffled-task null."""
    raw = X * inp.store["update_norm"].values[:, None] if "update_norm" in inp.store.coords else X
    order = np.argsort(-inp.shards["frequency"].values)
    ids = order[: p.n_shards]
    randoms = span_directions(raw, p.n_random, p.seed + 1)
    eff = intervention_effects(p, inp, ids, shard_sizes(raw, codes[:, ids], D[ids]), randoms)
    floor = np.abs(eff["noise_effect"].values).max(0)
    absolute = np.abs(codes)
    own = np.array(
        [
            np.argmax([absolute[task == t, i].mean() if (task == t).any() else -1 for t in range(eff.sizes["task"])])
            for i in ids
        ]
    )
    sc = effect_scores(eff["add_effect"].values, floor)
    rs = effect_scores(eff["random_add_effect"].values, floor)
    out = eff.rename({"shard": "intervened_shard"})
    out["noise_floor"] = ("task", floor)
    out["own_task"] = ("intervened_shard", own)
    for name in ("moves", "n_above", "specificity"):
        out[name] = ("intervened_shard", sc[name])
        out[f"random_{name}"] = ("random", rs[name])
    hit = np.where(sc["top_task"] >= 0, (sc["top_task"] == own).astype(float), np.nan)
    out["own_task_hit"] = ("intervened_shard", hit)
    null_mean, null_p95, p_value = own_task_null(own, sc["top_task"], seed=p.seed)
    out["own_task_null"], out["own_task_null_p95"], out["own_task_p"] = null_mean, null_p95, p_value
    abl = np.abs(eff["ablate_effect"].values)
    out["ablate_moves"] = ("intervened_shard", (abl > floor).any(1).astype(float))
    return out
