"""The pipeline: run the stage notebooks in order with papermill.

A config (``configs/*.yaml``) names the run, the seed, and an ordered mapping of
stages, each a notebook and its parameters::

    run: default
    seed: 0
    stages:
      pretrain: {notebook: 01_pretrain.ipynb, params: {steps: 400}}
      rl_lm:    {notebook: 02_rl.ipynb, params: {testbed: lm, init_path: "@pretrain/policy"}}

``extends: other.yaml`` deep-merges this file over another. A parameter string
``@stage/path`` is a path inside an earlier stage's folder (and makes that stage an
input). Every stage gets ``out_dir`` (``runs/<run>/<stage>``) and ``seed``.

A papermill sweep is a stage with ``sweep: {param: [v1, v2, ...], ...}``: it expands to
one run of its notebook per combination, in ``runs/<run>/<stage>/<p1>=<v1>,<p2>=<v2>/``;
``@stage`` (the sweep's folder) makes every combination an input of a later stage.

``memory_gb: 11`` (a stage's, or each of a sweep's combinations') is the peak memory it is known to need:
with ``--jobs`` above 1, a stage does not start beside running ones when their declared memory and its own
would pass the machine's; it waits for them (stages that declare nothing count as none).

A stage whose notebook, parameters, inputs and library code (the shardlib modules its
notebook imports, directly or through other modules: :mod:`shardlib.fingerprint`) are
unchanged since it last finished is skipped; one that was interrupted re-runs in its folder (RL stages resume from their
checkpoint); one whose configuration changed starts from an empty folder.

What a config may do (it is data, not code): name a run and stages (letters, digits and
``_ . -``; never a path), choose notebooks inside ``notebooks/`` (or a folder given with
``--notebooks-dir`` on the command line), and give each stage parameters that its notebook's
``Params`` class defines (:func:`settable`), as YAML scalars, lists and mappings. Anything else is
refused before any file is touched. Every file the runner writes is inside
``<runs>/<run>/``; it deletes only stage folders that carry its own record (``.stage.json``)
and refuses to reuse a non-empty folder without one; it marks that record ``stale`` before it empties the folder,
and trusts a ``done`` record only while the files it lists are there. It writes through no symbolic link inside the
runs folder (the runs folder itself may be one). A run holds ``<runs>/<run>/.shardlib.lock``
while it executes, so a second ``shardlib run`` on the same run is refused (:mod:`shardlib.runfolder`). The
config itself is loaded and checked by :mod:`shardlib.runconfig`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import itertools
import json
import keyword
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

from .fingerprint import fingerprint
from .runconfig import ROOT, SWEEP_VALUE_RE, PipelineError, check_name, check_seed, check_value, short
from .runfolder import (
    LOCK_FILE,
    STAGE_FILE,
    check_no_links,
    fresh_stage_dir,
    inside,
    is_record,
    missing_output,
    read_state,
    refuse_link,
    run_lock,
    runs_folder,
    stage_files,
    write_state,
)

NOTEBOOKS = ROOT / "notebooks"


@dataclasses.dataclass
class Stage:
    name: str
    notebook: Path
    params: dict
    deps: list[str]
    out_dir: Path
    memory_gb: float = 0.0


def machine_memory_gb() -> float:
    """The machine's physical memory in GiB (what declared ``memory_gb`` is weighed against)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def notebook_parameters(nb: Path) -> set[str]:
    """Names the notebook's ``parameters`` cell assigns. A config may set these and every field of the notebook's
    ``Params`` class (:func:`settable`): a cell shows a stage's defining parameters only."""
    for c in json.loads(nb.read_text())["cells"]:
        if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", []):
            names = set()
            for node in ast.parse("".join(c["source"])).body:
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else []
                )
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
            return names
    raise PipelineError(
        f"notebook {nb} has no cell tagged 'parameters'; papermill needs one to receive a config's parameters"
    )


def params_class_name(nb: Path) -> tuple[str, str] | None:
    """``(module, class name)`` of the ``Params`` class a notebook validates its parameters with (``from shardlib.M
    import XParams`` and ``XParams.from_namespace(...)`` in its code), read without importing anything; None for
    a notebook that uses none. An executed notebook (a stage folder's ``notebook.ipynb``) names the same class."""
    imported, used = {}, set()
    for c in json.loads(nb.read_text())["cells"]:
        if c["cell_type"] != "code":
            continue
        try:
            tree = ast.parse("".join(c["source"]))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shardlib"):
                imported.update({a.asname or a.name: (node.module, a.name) for a in node.names})
            elif isinstance(node, ast.Attribute) and node.attr == "from_namespace" and isinstance(node.value, ast.Name):
                used.add(node.value.id)
    return next((imported[name] for name in sorted(used) if name in imported), None)


def params_class(nb: Path):
    """The ``Params`` class a notebook validates its parameters with (:func:`params_class_name`), or None."""
    import importlib

    found = params_class_name(nb)
    return None if found is None else getattr(importlib.import_module(found[0]), found[1])


def settable(nb: Path) -> set[str]:
    """The parameters a config may give a notebook's stage: its ``parameters`` cell's names and, where the notebook
    validates them with a ``Params`` class, every field of that class (``Params.from_namespace`` reads the names
    papermill injects, shown in the cell or not)."""
    cls = params_class(nb)
    return notebook_parameters(nb) | ({f.name for f in dataclasses.fields(cls)} if cls is not None else set())


class _KnownParameters(logging.Filter):
    """Drops papermill's "Passed unknown parameter" warning: :func:`plan` has checked every name against
    :func:`settable`, so a name the short parameters cell does not show is one its Params class takes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


@contextlib.contextmanager
def _quiet_known_parameters():
    logger, drop = logging.getLogger("papermill"), _KnownParameters()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def validate(stages: list[Stage]) -> None:
    """Validate every stage's parameters with its notebook's ``Params`` class before anything runs:
    a bad value in the last stage is named in a second, not after the stages before it."""
    from .config import ConfigError

    for st in stages:
        cls = params_class(st.notebook)
        if cls is None:
            continue
        try:
            cls.from_dict(st.params)
        except (ConfigError, ValueError) as e:
            raise PipelineError(f"stage {st.name!r}: {e}") from None


def _notebook(name: str, spec: dict, notebook_dirs) -> Path:
    rel = spec.get("notebook")
    if not isinstance(rel, str) or not rel.endswith(".ipynb"):
        raise PipelineError(f"stage {name!r}: notebook must be a .ipynb file name in {NOTEBOOKS}, got {rel!r}")
    dirs = [NOTEBOOKS, *(Path(d) for d in notebook_dirs or ())]
    if any("{" in str(d) or "}" in str(d) for d in dirs) or "{" in rel or "}" in rel:
        raise PipelineError(
            f"stage {name!r}: braces are not allowed in notebook paths (papermill formats paths with them)"
        )
    for d in dirs:
        nb = d / rel
        if inside(nb, d) and nb.resolve() != d.resolve():
            if nb.is_file():
                return nb
        else:
            raise PipelineError(
                f"stage {name!r}: notebook {rel!r} leaves the notebook folder {d}; name a notebook inside it "
                "(other folders are allowed only with --notebooks-dir on the command line)"
            )
    raise PipelineError(f"stage {name!r}: notebook {rel!r} does not exist in {', '.join(str(d) for d in dirs)}")


def _resolve(name: str, k: str, v, run_dir: Path, seen: set, groups: dict, deps: list):
    """A parameter value with ``@stage/path`` made a path inside that stage's folder (recorded in ``deps``)."""
    if isinstance(v, list):
        return [_resolve(name, k, x, run_dir, seen, groups, deps) for x in v]
    if isinstance(v, str) and v.startswith("@"):
        dep, _, rest = v[1:].partition("/")
        if dep not in seen:
            raise PipelineError(
                f"stage {name!r}: parameter {k!r}={v!r} refers to {dep!r}, which is not an earlier stage"
            )
        target = run_dir / dep / rest if rest else run_dir / dep
        if Path(rest).is_absolute() or ".." in Path(rest).parts or not inside(target, run_dir / dep):
            raise PipelineError(
                f"stage {name!r}: parameter {k!r}={v!r} leaves the folder of stage {dep!r}; "
                "name a path inside it, e.g. @rl_lm/updates/events"
            )
        deps.extend(groups.get(dep, [dep]))
        return str(target)
    return v


def plan(cfg: dict, runs_dir=None, notebook_dirs=()) -> list[Stage]:
    """Resolve stage folders, ``@stage/...`` references and dependencies, in config order.

    Validates everything a config names before any file is touched: run and stage names are
    single folder names, notebooks lie in ``notebooks/`` (or ``notebook_dirs``), parameter names
    are those of the notebook's ``parameters`` cell, values are YAML data, ``@stage/path``
    stays inside that stage's folder and sweep values make plain folder names."""
    runs = runs_folder(runs_dir, cfg)
    run_dir = runs / check_name("run", cfg["run"])
    for d in [run_dir, *run_dir.parents]:
        if (d / STAGE_FILE).exists() or (d != run_dir and (d / LOCK_FILE).exists()):
            raise PipelineError(
                f"run folder {run_dir} would lie inside another run's folder {d}; give a runs folder of its own (--runs-dir)"
            )
    seed = check_seed(cfg.get("seed", 0), "config")
    stages, seen, groups = [], set(), {}
    for name, spec in cfg["stages"].items():
        check_name("stage", name)
        if not isinstance(spec, dict):
            raise PipelineError(f"stage {name!r}: expected a mapping with notebook, params (and sweep)")
        unknown = set(spec) - {"notebook", "params", "sweep", "memory_gb"}
        if unknown:
            raise PipelineError(
                f"stage {name!r}: unknown key(s) {sorted(unknown)}; accepted: notebook, params, sweep, memory_gb"
            )
        memory = spec.get("memory_gb", 0)
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0 <= memory < 1e6:
            raise PipelineError(
                f"stage {name!r}: memory_gb must be a number of GiB (the stage's peak memory), got {memory!r}"
            )
        nb = _notebook(name, spec, notebook_dirs)
        known = settable(nb)
        params, deps = {}, []
        stage_params = spec.get("params") or {}
        sweep = spec.get("sweep") or {}
        if not isinstance(stage_params, dict):
            raise PipelineError(f"stage {name!r}: params must be a mapping of parameter names to values")
        if not isinstance(sweep, dict) or any(not isinstance(v, list) or not v for v in sweep.values()):
            raise PipelineError(f"stage {name!r}: sweep must map parameter names to non-empty lists")
        for k in [*stage_params, *sweep]:
            if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k):
                raise PipelineError(
                    f"stage {name!r}: parameter name {k!r} is not a Python identifier; names are those of "
                    f"{nb.name}'s parameters cell"
                )
            if k in ("out_dir", "seed"):
                raise PipelineError(
                    f"stage {name!r}: parameter {k!r} is set by the runner; set seed at the top level "
                    "(seed: 1 or --set seed=1) and the folder with the run name (--run)"
                )
            if k not in known:
                raise PipelineError(
                    f"stage {name!r}: {nb.name} has no parameter {k!r}; its parameters: {sorted(known)}"
                )

        for k, v in stage_params.items():
            check_value(f"stage {name!r}: parameter {k!r}", v)
            params[k] = _resolve(name, k, v, run_dir, seen, groups, deps)
        for k, vals in sweep.items():
            for v in vals:
                check_value(f"stage {name!r}: sweep {k!r}", v)
                if isinstance(v, (list, dict)) or not SWEEP_VALUE_RE.fullmatch(str(v)):
                    raise PipelineError(
                        f"stage {name!r}: sweep value {k}={v!r} cannot name a folder; sweep over numbers, booleans or "
                        "plain strings (letters, digits, '_', '.', '+', '-')"
                    )
        combos = [dict(zip(sweep, vals)) for vals in itertools.product(*sweep.values())] if sweep else [{}]
        groups[name] = []
        for combo in combos:
            tag = ",".join(f"{k}={v}" for k, v in combo.items())
            sname = f"{name}[{tag}]" if tag else name
            out = run_dir / name / tag if tag else run_dir / name
            for d in (d for d in [out, *out.parents] if run_dir in d.parents):
                refuse_link(d)
            if not inside(out, run_dir) or out.resolve() == run_dir.resolve():  # belt and braces
                raise PipelineError(f"stage {sname!r}: folder {out} is not inside the run folder {run_dir}")
            sp = {**params, **combo, "out_dir": str(out), "seed": seed}
            stages.append(Stage(sname, nb, sp, sorted(set(deps)), out, float(memory)))
            groups[name].append(sname)
        seen.add(name)
    return stages


def write_sweep_manifests(stages: list[Stage]) -> None:
    """Write ``<sweep folder>/sweep.json`` listing the point folders of every sweep in the plan, so that a
    stage combining a sweep reads this config's points only (folders of points a former config swept stay
    on disk, and are ignored)."""
    from .io import SWEEP_MANIFEST, atomic_write

    points: dict[Path, list[str]] = {}
    for st in stages:
        if "[" in st.name:
            points.setdefault(st.out_dir.parent, []).append(st.out_dir.name)
    for folder, names in points.items():
        text = json.dumps({"points": names}, indent=1)
        if not (folder / SWEEP_MANIFEST).exists() or (folder / SWEEP_MANIFEST).read_text() != text:
            atomic_write(folder / SWEEP_MANIFEST, lambda tmp, text=text: Path(tmp).write_text(text))


def _failure(st: Stage, e: Exception, out_nb: Path) -> PipelineError:
    """One line for a stage that failed: the cell and its error, or a kernel that died; the executed notebook."""
    import papermill as pm

    from .io import NEARLY_FULL_BYTES

    where = f"the executed notebook is at {out_nb}" if out_nb.exists() else f"its folder is {st.out_dir}"
    if isinstance(e, pm.PapermillExecutionError):
        lines = str(e.evalue).splitlines() or [""]
        what = f"failed in cell {e.exec_count} ({e.ename}: {lines[0]}{' ...' if len(lines) > 1 else ''})"
    elif type(e).__name__ == "DeadKernelError":
        what = "failed: its kernel died (killed, or out of memory)"
    else:
        what = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        free = shutil.disk_usage(st.out_dir).free
    except OSError:
        free = NEARLY_FULL_BYTES
    full = free < NEARLY_FULL_BYTES or re.search(r"Errno (28|122)\b|No space left|quota exceeded", what, re.I)
    fix = (
        f"free some disk space ({free >> 20} MiB free there) and run the same command again: finished stages are kept"
        if full
        else "fix the cause and run the same command again (the stage resumes)"
        if "kernel died" in what
        else ""
    )
    return PipelineError(f"stage {st.name!r} {what}; {where}" + (f"; {fix}" if fix else ""))


def _execute(st: Stage, record: dict, log_output: bool) -> float:
    """Run one stage's notebook with papermill in its folder; returns its wall time in seconds (recorded in
    ``.stage.json`` with its start and end, seconds since the epoch, and the files it left)."""
    import papermill as pm

    write_state(st.out_dir, {**record, "status": "running"})
    started = time.time()
    t0 = time.perf_counter()
    out_nb = st.out_dir / "notebook.ipynb"
    try:
        pm.execute_notebook(
            str(st.notebook),
            str(out_nb),
            parameters=st.params,
            kernel_name="python3",
            # the kernel starts in the stage folder (nbclient's resources path); papermill's own cwd= would
            # os.chdir the whole runner process, which stages running in threads would race on
            resources={"metadata": {"path": str(st.out_dir)}},
            progress_bar=False,
            log_output=log_output,
            # the kernel's own log (not the notebook's output) at CRITICAL: ipykernel warns on every start that its
            # local TCP sockets are not encrypted, and logs "KeyboardInterrupt caught in kernel" (and, after a
            # Ctrl-C, ZMQ tracebacks) when the runner interrupts it on shutdown, as jupyter_client does
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
            # every cell has run and written its files (atomically) when the kernel is shut down: stop it at once
            # (nbclient's "immediate") rather than asking it to exit and polling until it has (its default,
            # "graceful"), which took 1.3-1.5 s per stage more once torch was loaded (measured on 2 idle cores)
            shutdown_kernel="immediate",
        )
    except OSError as e:  # papermill saving the executed notebook (a full disk) names no file
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(out_nb)) from None
        raise
    except PipelineError:
        raise
    except Exception as e:  # a failing cell, a kernel that died
        write_state(st.out_dir, {**record, "status": "failed"})
        raise _failure(st, e, out_nb) from None
    dt = time.perf_counter() - t0
    times = {"seconds": round(dt, 2), "started": round(started, 2), "finished": round(time.time(), 2)}
    write_state(st.out_dir, {**record, "status": "done", **times, "outputs": stage_files(st.out_dir)})
    return dt


def _interrupt_threads(idents: list[int]) -> None:
    """Raise KeyboardInterrupt in these threads (each a stage's papermill execution, which unwinds as it does
    on Ctrl-C in the main thread; its kernel exits with the runner, whose death its parent poller sees). The
    stage's record stays ``running``: the next run resumes it."""
    import ctypes

    for ident in idents:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))


def default_jobs(threads: int = 1) -> int:
    """Stages run at once by default: as many as the machine's cores hold at ``threads`` threads each (at least
    1, at most 4: the study's stages seldom have more than a few ready at a time)."""
    return max(1, min(4, (os.cpu_count() or 1) // threads))


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def kernel_threads(threads: int):
    """Kernels started inside the block compute with ``threads`` CPU threads (torch, OpenMP, BLAS read these
    variables when they start); the runner's own environment is restored after."""
    old = {v: os.environ.get(v) for v in THREAD_VARS}
    os.environ.update({v: str(threads) for v in THREAD_VARS})
    try:
        yield
    finally:
        for v, val in old.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val


def run(
    cfg: dict,
    force: bool = False,
    runs_dir=None,
    only: list[str] | None = None,
    log=print,
    log_output: bool = False,
    notebook_dirs=(),
    jobs: int = 1,
    threads: int = 1,
) -> list[dict]:
    """Execute the stages; returns one record per stage (name, status, seconds), in config order.

    Everything is validated (:func:`plan`) before any file is touched; the run folder is locked
    while the stages execute. Each stage's kernel computes with ``threads`` CPU threads (part of its
    fingerprint: another count can round sums differently). With ``jobs`` > 1, up to that many stages whose
    inputs are finished run at once (each in its own kernel, started in config order); their numbers do not
    depend on ``jobs``, and notebook output is not streamed (``log_output`` applies to ``jobs=1`` only).
    After a stage fails, no further stage starts; the ones running finish, then the first failure is raised."""
    for name, v in (("jobs", jobs), ("threads", threads)):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_JOBS:
            raise PipelineError(f"{name} must be a whole number from 1 to {MAX_JOBS}, got {short(v)}")
    stages = plan(cfg, runs_dir, notebook_dirs)
    validate(stages)
    selected = _selected(stages, only)
    run_dir = runs_folder(runs_dir, cfg) / cfg["run"]
    check_no_links(run_dir, stages)
    records = {}
    with run_lock(run_dir), kernel_threads(threads), _quiet_known_parameters():
        write_sweep_manifests(stages)
        todo = _to_execute(stages, selected, force, threads, records, log)
        _execute_all(todo, len(stages), {**cfg, "jobs": jobs, "threads": threads}, force, records, log, log_output)
    return [records[st.name] for st in stages if st.name in records]


MAX_JOBS = 1024
"""The most stages at once (``jobs``) and CPU threads per kernel (``threads``)."""


def _selected(stages: list[Stage], only) -> set[str]:
    """Names of the stages ``--only`` selects (a sweep's name selects its combinations); all without it."""
    if not only:
        return {s.name for s in stages}
    picked = {s.name for o in only for s in stages if s.name == o or s.name.startswith(o + "[")}
    missing = {o for o in only if not any(s.name == o or s.name.startswith(o + "[") for s in stages)}
    if missing:
        raise PipelineError(f"--only: no stage(s) {sorted(missing)}; stages: {[s.name for s in stages]}")
    return picked


def _to_execute(stages, selected, force, threads, records, log) -> list[tuple]:
    """(position, stage, fingerprint, record) of the selected stages to execute, in config order; a stage whose
    ``done`` record has this fingerprint and whose outputs are all there is skipped (in ``records``)."""
    prints, todo, n = {}, [], len(stages)
    for k, st in enumerate(stages, 1):
        fp = fingerprint(st, prints, threads)
        prints[st.name] = fp
        if st.name not in selected:
            continue
        state = read_state(st.out_dir)
        if is_record(state, st) and state["fingerprint"] == fp and state["status"] == "done" and not force:
            missing = missing_output(st.out_dir, state)
            if missing is None:
                log(f"[{k}/{n}] {st.name}: unchanged, skipped (--force reruns)")
                records[st.name] = {"stage": st.name, "status": "skipped", "seconds": 0.0}
                continue
            log(f"[{k}/{n}] {st.name}: finished before, but {missing}: running it again from an empty folder")
        todo.append((k, st, fp, state))
    return todo


def _execute_all(todo: list, n: int, cfg: dict, force: bool, records: dict, log, log_output: bool) -> None:
    """Execute the stages of ``todo`` as their inputs finish, ``cfg["jobs"]`` at a time (in threads when more than
    one; in this thread otherwise, so that Ctrl-C stops it at once); raise the first failure once the running ones
    finish. Ctrl-C stops the running stages too, not waiting for them."""
    import concurrent.futures as cf

    jobs, budget = cfg["jobs"], machine_memory_gb()
    waiting = {st.name for _, st, _, _ in todo}  # not finished yet: a later stage that reads one waits
    failure, idents = None, {}  # idents: the thread each running stage executes in (jobs > 1)
    held_back = set()  # stages logged as waiting for memory

    def in_thread(st: Stage, record: dict) -> float:
        idents[st.name] = threading.get_ident()
        try:
            return _execute(st, record, log_output=False)  # side by side: output not streamed
        finally:
            idents.pop(st.name, None)

    def start(pool, st: Stage, record: dict) -> cf.Future:
        if jobs > 1:
            return pool.submit(in_thread, st, record)
        done = cf.Future()
        try:
            done.set_result(_execute(st, record, log_output))
        except Exception as e:
            done.set_exception(e)
        return done

    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {}
        try:
            while todo or running:
                ready = [t for t in todo if not (set(t[1].deps) & waiting)] if failure is None else []
                for t in ready:
                    k, st, fp, state = t
                    if len(running) >= jobs:
                        break
                    held = sum(s.memory_gb for _, s in running.values())
                    if running and held + st.memory_gb > budget:  # waits for memory; a smaller stage may start
                        if st.name not in held_back:
                            held_back.add(st.name)
                            log(
                                f"[{k}/{n}] {st.name}: waits for memory ({st.memory_gb:g} GiB declared; running "
                                f"stages hold {held:g} of the machine's {budget:.0f} GiB)"
                            )
                        continue
                    todo.remove(t)
                    fresh_stage_dir(st, state, fp, force)
                    record = {"fingerprint": fp, "run": cfg["run"], "stage": st.name, "params": st.params}
                    record |= {"jobs": jobs, "threads": cfg["threads"]}
                    log(f"[{k}/{n}] {st.name}: running {st.notebook.name} -> {st.out_dir}")
                    running[start(pool, st, record)] = (k, st)
                if not running:
                    break  # a stage failed: nothing more starts
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    k, st = running.pop(fut)
                    try:
                        dt = fut.result()
                    except Exception as e:  # raised below, after the running stages finish
                        failure = failure or e
                        log(f"[{k}/{n}] {st.name}: failed")
                        continue
                    waiting.discard(st.name)
                    log(f"[{k}/{n}] {st.name}: done in {dt:.1f} s")
                    records[st.name] = {"stage": st.name, "status": "done", "seconds": dt}
        except BaseException:  # Ctrl-C (or SIGINT from `timeout`): stop the running stages too, not wait for them
            _interrupt_threads(list(idents.values()))
            cf.wait(running, timeout=60)
            raise
    if failure is not None:
        raise failure
