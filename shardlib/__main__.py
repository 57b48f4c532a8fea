"""Command line: ``python -m shardlib run|figures|report|compare``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .runconfig import ROOT, PipelineError, check_name, load_config
from .runfolder import runs_folder
from .runner import default_jobs, run


def _os_error(e: OSError) -> str:
    """One line for an I/O error: the file, what went wrong, what to do."""
    import errno

    what = e.strerror or str(e)
    where = f"{e.filename}: " if e.filename else ""
    full = "free some disk space (or give --runs-dir on another disk) and run the same command again: finished stages are kept"
    hint = {
        errno.ENOSPC: full,
        errno.EDQUOT: full,
        errno.EROFS: "that file system is read-only; give a writable folder with --runs-dir",
        errno.EACCES: "that folder is not writable for you; give a writable folder with --runs-dir",
        errno.EPERM: "that folder is not writable for you; give a writable folder with --runs-dir",
        errno.EISDIR: "a file is expected there, not a folder: rerun the stage that writes it (run --only STAGE --force)",
        errno.ENOTDIR: "a folder is expected there, not a file: rerun the stage that writes it (run --only STAGE --force)",
        errno.ELOOP: "it is a symbolic link where none is expected: replace it by a plain file or folder",
    }.get(e.errno, "check that the path exists and is writable, then run the same command again")
    return f"error: {where}{what}; {hint}"


def parser() -> argparse.ArgumentParser:
    """The command line: run, figures, report, compare."""
    ap = argparse.ArgumentParser(prog="python -m shardlib", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the stage notebooks in order with papermill")
    r.add_argument(
        "--config", default=str(ROOT / "configs" / "default.yaml"), help="YAML config (default: configs/default.yaml)"
    )
    r.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override: seed=1, run=NAME, or STAGE.PARAM=VALUE (repeatable)",
    )
    r.add_argument("--run", dest="run_name", help="run name (folder under runs/); default: the config's")
    r.add_argument("--runs-dir", help="where runs go (default: runs/ in the repository)")
    r.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (their inputs must exist)")
    r.add_argument("--force", action="store_true", help="rerun stages even when unchanged")
    r.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output")
    r.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="stages run at once when their inputs are ready (default: the cores over --threads, at most 4); "
        "the numbers do not depend on it; notebook output is streamed only with --jobs 1",
    )
    r.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads of each stage's kernel (default 1; part of a stage's fingerprint, since sums can round "
        "differently with another count)",
    )
    r.add_argument(
        "--notebooks-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also allow stage notebooks from this folder (default: only notebooks/; repeatable)",
    )
    f = sub.add_parser("figures", help="regenerate every figure from a run's results (no retraining)")
    f.add_argument("--run", default="default", help="run name (folder under runs/), default: default")
    f.add_argument("--runs-dir", help="where runs are (default: runs/ in the repository)")
    f.add_argument("--out", help="output folder (default: figures/<run>/)")
    rp = sub.add_parser("report", help="write the README's Results (and runs/<run>/report.html) from a run's results")
    rp.add_argument("--run", default="default", help="run name (folder under runs/), default: default")
    rp.add_argument("--runs-dir", help="where runs are (default: runs/ in the repository)")
    rp.add_argument(
        "--readme",
        default=None,
        help="the file to write the results into (default: the repository's README.md; docs/smollm.md for a run of "
        "configs/smollm.yaml)",
    )
    rp.add_argument("--check", action="store_true", help="only check: exit 1 when the README differs from the results")
    c = sub.add_parser(
        "compare", help="compare the results files of two runs (values only; provenance and timings left out)"
    )
    c.add_argument("run_a", help="a run folder, e.g. runs/default")
    c.add_argument("run_b", help="the run folder to compare it with")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(_os_error(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # asyncio would report the stages' unfinished polling tasks as the interpreter exits
        logging.getLogger("asyncio").disabled = True
        then = (
            "the stages that were running stay 'running' in their records: run the same command again to resume them"
            if args.cmd == "run"
            else "run the same command again"
        )
        print(f"error: interrupted (Ctrl-C); {then}", file=sys.stderr)
        return 130


def _report(args) -> int:
    """``report``: write (or ``--check``) a run's Results block and its report.html."""
    from .report import ReportError, is_smollm_run, report_html, update_readme

    run_dir = runs_folder(args.runs_dir) / check_name("run", args.run)
    readme = args.readme or str(ROOT / ("docs/smollm.md" if is_smollm_run(run_dir) else "README.md"))
    try:
        current = update_readme(run_dir, readme, check=args.check)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        verdict = "matches" if current else "DIFFERS from"
        print(f"README results {verdict} {run_dir} (wall-clock times aside)")
        if not current:  # the usual cause on a fresh clone: another CPU (docs/running.md, "Across machines")
            where = (f" --runs-dir {args.runs_dir}" if args.runs_dir else "") + (
                f" --readme {args.readme}" if args.readme else ""
            )
            print(
                "  a run repeats its numbers exactly on the machine that made them, not on another CPU; "
                f"`python -m shardlib report --run {run_dir.name}{where}` writes this run's numbers into {readme}"
            )
        return 0 if current else 1
    print(f"README results {'unchanged' if current else 'written'} from {run_dir}; report: {report_html(run_dir)}")
    return 0


def _main(args) -> int:
    if args.cmd == "report":
        return _report(args)
    if args.cmd == "compare":
        from pathlib import Path

        from .compare import compare_runs

        for d in (args.run_a, args.run_b):
            if not Path(d).is_dir():
                print(f"error: {d} is not a run folder", file=sys.stderr)
                return 1
        rows = compare_runs(args.run_a, args.run_b)
        for r in rows:
            if r.status != "identical":
                print(f"{r.status}: {r.path} {r.detail}")
        same = sum(r.status == "identical" for r in rows)
        print(f"{same} of {len(rows)} results files identical (values; provenance and wall-clock times left out)")
        return 0 if rows and same == len(rows) else 1
    if args.cmd == "figures":
        from .figures import make_all

        run_dir = runs_folder(args.runs_dir) / check_name("run", args.run)
        if not run_dir.exists():
            print(f"error: {run_dir} does not exist; run the study first (python -m shardlib run)", file=sys.stderr)
            return 1
        written = make_all(run_dir, args.out)
        if not written:
            print(f"error: no figure could be made from {run_dir}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "run":
        t0 = time.perf_counter()
        cfg = load_config(args.config, args.sets)
        if args.run_name is not None:
            cfg["run"] = check_name("run", args.run_name)
        jobs = default_jobs(max(1, args.threads)) if args.jobs is None else args.jobs
        if not args.quiet and jobs == 1:
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            logging.getLogger("papermill").setLevel(logging.INFO)
        else:  # what papermill logs on a failure ("Kernel died ...") the runner's one error line says
            logging.getLogger("papermill").setLevel(logging.CRITICAL)
        records = run(
            cfg,
            force=args.force,
            runs_dir=args.runs_dir,
            only=args.only,
            log_output=not args.quiet,
            notebook_dirs=args.notebooks_dir,
            jobs=jobs,
            threads=args.threads,
        )
        total = sum(r["seconds"] for r in records)
        print(
            "stage wall times: "
            + ", ".join(f"{r['stage']} {r['seconds']:.1f}s ({r['status']})" for r in records)
            + f"; sum {total:.1f}s; wall {time.perf_counter() - t0:.1f}s, {jobs} stage(s) at a time, {args.threads} thread(s) each"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
