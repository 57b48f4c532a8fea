"""The GPU check's device report and one-file summary (``scripts/gpu_check.sh`` runs it).

    python scripts/gpu_summary.py device                                   # torch, CUDA, the GPU (JSON)
    python scripts/gpu_summary.py summarize --run-dir runs/gpu --study-rc 0 --study-seconds 412

``summarize`` writes ``<run>/gpu_check.json`` and its rendering ``<run>/gpu_check.md``: the device; the
study's exit status and wall time against the 8-minute target; every stage's status, seconds (its
``.stage.json``) and peak GPU memory (device-wide, from the ``nvidia-smi`` samples gpu_check.sh records
in ``<run>/gpu_check/gpu_memory.log``; null without a GPU); the policy's parameters; the RL stages'
completion tokens/s and steps/s (medians over steps of ``tokens_per_s`` / ``steps_per_s`` in
``results.nc``: rollout, update and update collection; the online SAE's steps are outside them); bytes
per event of every update store on disk against its dense fp32 size; the SAE step timing
(``benchmarks/bench_sae_step.py``) and the rows of ``benchmarks/bench_factored.py`` when they ran. Its tables
are :func:`shardlib.report_default.markdown_table`'s, its sizes :func:`shardlib.common.fmt_bytes`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardlib.common import fmt_bytes  # noqa: E402
from shardlib.report_default import markdown_table  # noqa: E402
from shardlib.runs import run_stages  # noqa: E402

TARGET_SECONDS = 480
CHECK_DIR = "gpu_check"


def device_info() -> dict:
    """torch and CUDA versions, whether a GPU is visible, its name and memory, CPU cores."""
    import torch

    info = {
        "device": "cpu",
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": None,
        "gpu_memory_gib": None,
        "gpu_count": 0,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(
            device="cuda",
            gpu_name=prop.name,
            gpu_memory_gib=prop.total_memory / 2**30,
            gpu_count=torch.cuda.device_count(),
        )
    return info


# ---------------------------------------------------------------------------
# what the run folder holds


def stage_records(run_dir: Path) -> dict[str, dict]:
    """Every stage folder's record (``.stage.json``: status, seconds; sweeps one per combination), with
    the time its record was last written (``finished``, unix seconds), in the order they finished."""
    rows = []
    for f in [*run_dir.glob("*/.stage.json"), *run_dir.glob("*/*/.stage.json")]:
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(st, dict):
            continue
        rows.append(
            (
                f.stat().st_mtime,
                st.get("stage") or str(f.parent.relative_to(run_dir)),
                {
                    "status": st.get("status"),
                    "seconds": st.get("seconds"),
                    "finished": f.stat().st_mtime,
                    "folder": str(f.parent.relative_to(run_dir)),
                },
            )
        )
    return {name: rec for _, name, rec in sorted(rows, key=lambda r: (r[0], r[1]))}


def read_memory_log(path: Path) -> list[tuple[float, float]]:
    """``(unix seconds, MiB used)`` samples of a log of lines ``<unix seconds> <MiB>`` (others skipped)."""
    rows = []
    if path is None or not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            rows.append((float(parts[0]), float(parts[1])))
        except ValueError:
            continue
    return rows


def stage_memory_peak(samples: list[tuple[float, float]], rec: dict, slack: float = 1.0) -> float | None:
    """Largest sample while the stage ran (``finished - seconds`` to ``finished``), or None."""
    if not samples or rec.get("status") != "done" or not rec.get("seconds"):
        return None
    start, end = rec["finished"] - rec["seconds"] - slack, rec["finished"] + slack
    inside = [m for t, m in samples if start <= t <= end]
    return max(inside) if inside else None


def rl_stats(stage_dir: Path) -> dict | None:
    """Medians over steps of an RL stage's ``tokens_per_s`` and ``steps_per_s`` (the first two steps, warm-up,
    left out when there are more than four), or None when its ``results.nc`` has none."""
    import numpy as np
    import xarray as xr

    f = stage_dir / "results.nc"
    if not f.exists():
        return None
    with xr.open_dataset(f) as ds:
        if "tokens_per_s" not in ds:
            return None
        tok = np.asarray(ds["tokens_per_s"].values, dtype=float)
        sps = np.asarray(ds["steps_per_s"].values, dtype=float)
        cfg = json.loads(ds.attrs.get("config", "{}"))
    skip = 2 if len(tok) > 4 else 0
    per_prompt = cfg.get("group_size", 1) if cfg.get("algorithm") == "grpo" else 1
    return {
        "testbed": cfg.get("testbed"),
        "algorithm": cfg.get("algorithm"),
        "steps": len(tok),
        "completions_per_step": cfg.get("prompts_per_step", 0) * per_prompt,
        "tokens_per_s_median": float(np.median(tok[skip:])),
        "steps_per_s_median": float(np.median(sps[skip:])),
    }


def store_stats(store: Path) -> dict | None:
    """Events, bytes on disk and per event of an update store folder, against the dense fp32 size of its
    tensors (factored matrices counted as d_out x d_in); from ``store.json`` and the first chunk's shapes."""
    import xarray as xr

    from shardlib.factored import factor_pairs
    from shardlib.io import NETCDF_ENGINE
    from shardlib.store import update_vars

    try:
        meta = json.loads((store / "store.json").read_text())
        chunks = sorted(meta["chunks"])
    except (OSError, ValueError, KeyError):
        return None
    if not chunks:
        return None
    events = sum(int(meta["chunks"][c]["events"]) for c in chunks)
    nbytes = sum((store / c).stat().st_size for c in chunks if (store / c).exists())
    with xr.open_dataset(store / chunks[0], engine=NETCDF_ENGINE) as ds:
        pairs, dense = factor_pairs(ds), update_vars(ds)
        dense_floats = sum(math.prod(ds[v].shape[1:]) for v in dense)
        dense_floats += sum(ds.sizes[f"{var}_dim0"] * ds.sizes[f"{var}_dim1"] for var in pairs)
        factors = [ds.sizes[f"{var}_factor"] for var in pairs]
    per_event = nbytes / events if events else None
    return {
        "kind": meta.get("kind"),
        "events": events,
        "chunks": len(chunks),
        "bytes_on_disk": nbytes,
        "bytes_per_event": per_event,
        "dense_fp32_bytes_per_event": 4 * dense_floats,
        "dense_over_disk": 4 * dense_floats / per_event if per_event else None,
        "tensors": len(dense) + len(pairs),
        "factored_tensors": len(pairs),
        "factors_per_event": max(factors) if factors else None,
    }


def n_parameters(run_dir: Path) -> int | None:
    """The policy's parameters, as the run's pretraining stage (found by kind) recorded them."""
    import xarray as xr

    stage = next((s for s, kind in run_stages(run_dir).items() if kind == "pretrain"), None)
    if stage is None:
        return None
    with xr.open_dataset(run_dir / stage / "results.nc") as ds:
        n = ds.attrs.get("n_parameters")
    return int(n) if n is not None else None


# ---------------------------------------------------------------------------
# the summary


def _clean(x):
    """JSON-safe: NaN and inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


BENCH_KEYS = [
    "d_model",
    "dense_bytes_per_event",
    "factored_bytes_per_event",
    "bytes_ratio_exact",
    "speed_ratio_exact",
    "sae_dense_s_per_step",
    "sae_factored_s_per_step",
    "sae_speed_ratio",
    "recovery_factored_mmcs",
    "recovery_dense_mmcs",
]


def summarize(
    run_dir: Path,
    config: str = "",
    sets=(),
    only=(),
    study_rc: int | None = None,
    study_seconds: float | None = None,
    timeout: float | None = None,
    bench_rc: int | None = None,
    target_seconds: float = TARGET_SECONDS,
) -> dict:
    """The whole summary as one dict (see the module docstring); :func:`write_summary` writes it."""
    run_dir = Path(run_dir)
    check = run_dir / CHECK_DIR
    device = _load_json(check / "device.json") or device_info()
    samples = read_memory_log(check / "gpu_memory.log")
    stages = stage_records(run_dir)
    for rec in stages.values():
        rec["gpu_memory_peak_mib"] = stage_memory_peak(samples, rec)
    if study_rc is None:
        status = None
    elif study_rc == 0:
        status = "done"
    elif study_rc == 124:
        status = f"stopped at the {timeout:g} s limit" if timeout else "timed out"
    else:
        status = f"failed (exit {study_rc})"
    rl = {}
    for name, rec in stages.items():
        s = rl_stats(run_dir / rec["folder"])
        if s is not None:
            rl[name] = s
    stores = {}
    for f in sorted(run_dir.glob("*/updates/*/store.json")) + sorted(run_dir.glob("*/*/updates/*/store.json")):
        s = store_stats(f.parent)
        if s is not None:
            stores[str(f.parent.relative_to(run_dir))] = s
    bench = _load_json(check / "bench_factored.json")
    done = [r["seconds"] for r in stages.values() if r["status"] == "done" and r["seconds"]]
    summary = {
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "config": config,
        "sets": list(sets),
        "only": list(only),
        "device": device,
        "study": {
            "status": status,
            "exit_code": study_rc,
            "wall_seconds": study_seconds,
            "timeout_seconds": timeout,
            "target_seconds": target_seconds,
            "within_target": (status == "done" and study_seconds is not None and study_seconds <= target_seconds)
            if status is not None
            else None,
            "stage_seconds_total": sum(done),
        },
        "stages": stages,
        "gpu_memory": {
            "source": "nvidia-smi memory.used, device-wide (CUDA contexts included), sampled every 0.5 s",
            "peak_mib": max(m for _, m in samples),
            "samples": len(samples),
        }
        if samples
        else None,
        "policy_parameters": n_parameters(run_dir),
        "rl": rl,
        "stores": stores,
        "sae_step": _load_json(check / "sae_step.json"),
        "bench_factored": {
            "exit_code": bench_rc,
            "tokens": bench.get("tokens"),
            "sae": bench.get("sae"),
            "threads": bench.get("threads"),
            "rows": [{k: r.get(k) for k in BENCH_KEYS} for r in bench.get("rows", [])],
        }
        if bench
        else ({"exit_code": bench_rc} if bench_rc is not None else None),
    }
    return _clean(summary)


def _f(x, fmt="{:.3g}", none="–"):
    if x is None:
        return none
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def _bytes(n) -> str:
    return fmt_bytes(n, digits=2)


def _head(s: dict) -> list[str]:
    d, st = s["device"], s["study"]
    gpu = f"{d['gpu_name']} ({d['gpu_memory_gib']:.0f} GiB)" if d.get("gpu_name") else "none (CPU only)"
    met = "met" if st["within_target"] else "not met" if st["within_target"] is not None else "–"
    return [
        f"# GPU check: {Path(s['run_dir']).name}",
        f"Written {s['written']} from `{s['run_dir']}` (config `{s['config'] or '?'}`"
        + (f", --set {' '.join(s['sets'])}" if s["sets"] else "")
        + (f", --only {' '.join(s['only'])}" if s["only"] else "")
        + ").",
        f"- Device: **{d['device']}**; GPU: {gpu}; torch {d['torch']} (CUDA {d.get('cuda') or '–'}); "
        f"{d['cpu_count']} CPU cores.\n"
        f"- Study: {st['status'] or 'not run'}; wall time {_f(st['wall_seconds'], '{:.1f} s')} "
        f"(target ≤ {st['target_seconds']:g} s: {met}); stage times add up to {st['stage_seconds_total']:.1f} s.\n"
        f"- Policy: {_f(s['policy_parameters'], '{:,}')} parameters.\n"
        f"- Peak GPU memory (device-wide): {_f((s['gpu_memory'] or {}).get('peak_mib'), '{:.0f} MiB')}.",
    ]


def _stages_rl_stores(s: dict) -> list[str]:
    out = [
        "## Stages",
        markdown_table(
            ["stage", "status", "seconds", "peak GPU memory (MiB)"],
            [
                [name, r["status"], _f(r["seconds"], "{:.1f}"), _f(r["gpu_memory_peak_mib"], "{:.0f}")]
                for name, r in s["stages"].items()
            ],
        ),
    ]
    if s["rl"]:
        head = ["stage", "testbed", "algorithm", "steps", "completions / step", "completion tokens / s", "steps / s"]
        rows = [
            [name, r["testbed"], r["algorithm"], r["steps"], r["completions_per_step"]]
            + [_f(r["tokens_per_s_median"], "{:.0f}"), _f(r["steps_per_s_median"], "{:.2f}")]
            for name, r in s["rl"].items()
        ]
        out += ["## RL throughput (medians over steps: rollout, update and collection)", markdown_table(head, rows)]
    if s["stores"]:
        head = ["store", "events", "tensors (factored)", "on disk", "per event", "dense fp32 per event", "dense / disk"]
        rows = [
            [name, r["events"], f"{r['tensors']} ({r['factored_tensors']})", _bytes(r["bytes_on_disk"])]
            + [
                _bytes(r["bytes_per_event"]),
                _bytes(r["dense_fp32_bytes_per_event"]),
                _f(r["dense_over_disk"], "{:.1f}x"),
            ]
            for name, r in s["stores"].items()
        ]
        out += ["## Update stores (bytes on disk, labels and netCDF overhead included)", markdown_table(head, rows)]
    return out


def _benchmarks(s: dict) -> list[str]:
    out = []
    sae = s.get("sae_step")
    if sae and "devices" in sae:
        head = ["device", "s / step, no dead latents", "s / step, all dead (AuxK, restarts)", "peak memory (MiB)"]
        rows = [
            [dev, _f(r["no_dead_s_per_step"], "{:.4f}"), _f(r["all_dead_s_per_step"], "{:.4f}")]
            + [_f(r.get("all_dead_peak_memory_mib"), "{:.0f}")]
            for dev, r in sae["devices"].items()
        ]
        ratio = sae.get("cpu_over_gpu")
        out += [
            f"## SAE step ({sae.get('stage', '?')}'s online SAE: {sae['n_latents']} latents, k = {sae['k']}, "
            f"rank {sae['rank']}, {sae['events_per_step']} events of {sae['tensors']} tensors, "
            f"{sae['factored_tensors']} factored; benchmarks/bench_sae_step.py)",
            markdown_table(head, rows),
            "CPU / GPU time per step: "
            + (
                f"{ratio['no_dead']:.1f}x (no dead), {ratio['all_dead']:.1f}x (all dead)."
                if ratio
                else "– (no GPU: CPU only)."
            ),
        ]
    elif sae:
        out.append(f"SAE step: skipped ({sae.get('skipped')}).")
    b = s.get("bench_factored")
    if b and b.get("rows"):
        head = ["d_model", "bytes / event dense", "factored", "ratio", "collection speed-up", "SAE s / step dense"]
        rows = [
            [r["d_model"], _bytes(r["dense_bytes_per_event"]), _bytes(r["factored_bytes_per_event"])]
            + [_f(r["bytes_ratio_exact"], "{:.1f}x"), _f(r["speed_ratio_exact"], "{:.1f}x")]
            + [_f(r["sae_dense_s_per_step"], "{:.3f}"), _f(r["sae_factored_s_per_step"], "{:.3f}")]
            + [_f(r["recovery_factored_mmcs"], "{:.3f}")]
            for r in b["rows"]
        ]
        out += [
            f"## benchmarks/bench_factored.py (CPU, {b['threads']} threads; {b['tokens']} tokens per event)",
            markdown_table([*head, "factored", "MMCS factored"], rows),
        ]
    elif b:
        out.append(f"benchmarks/bench_factored.py: no results (exit {b.get('exit_code')}).")
    return out


def render(s: dict) -> str:
    """The summary as markdown."""
    return "\n\n".join(_head(s) + _stages_rl_stores(s) + _benchmarks(s)) + "\n"


def write_summary(run_dir: Path, **kwargs) -> tuple[Path, Path]:
    """Write ``<run>/gpu_check.json`` and ``<run>/gpu_check.md``; returns their paths."""
    s = summarize(run_dir, **kwargs)
    j, m = Path(run_dir) / "gpu_check.json", Path(run_dir) / "gpu_check.md"
    j.write_text(json.dumps(s, indent=1))
    m.write_text(render(s))
    return j, m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("device", help="print the device report (JSON)")
    m = sub.add_parser("summarize", help="write <run>/gpu_check.json and gpu_check.md")
    m.add_argument("--run-dir", required=True)
    m.add_argument("--config", default="")
    m.add_argument("--sets", nargs="*", default=[])
    m.add_argument("--only", nargs="*", default=[])
    m.add_argument("--study-rc", type=int)
    m.add_argument("--study-seconds", type=float)
    m.add_argument("--timeout", type=float)
    m.add_argument("--bench-rc", type=int)
    m.add_argument("--target-seconds", type=float, default=TARGET_SECONDS)
    args = ap.parse_args(argv)
    if args.cmd == "device":
        print(json.dumps(device_info(), indent=1))
    else:
        j, md = write_summary(
            Path(args.run_dir),
            config=args.config,
            sets=args.sets,
            only=args.only,
            study_rc=args.study_rc,
            study_seconds=args.study_seconds,
            timeout=args.timeout,
            bench_rc=args.bench_rc,
            target_seconds=args.target_seconds,
        )
        print(md.read_text())
        print(f"summary: {j} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
