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

A stage whose notebook, parameters, inputs and library code (the shardlib modules its
notebook imports, directly or through other modules: ``library_files``) are
unchanged since it last finished is skipped; one that was interrupted re-runs in its folder (RL stages resume from their
checkpoint); one whose configuration changed starts from an empty folder.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
STAGE_FILE = ".stage.json"


class PipelineError(RuntimeError):
    pass


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path, sets: list[str] = ()) -> dict:
    """Load a YAML config (following ``extends``) and apply ``key=value`` overrides.

    ``--set seed=1`` sets a top-level key; ``--set rl_lm.steps=100`` a stage parameter.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"config {path} does not exist; configs live in {ROOT / 'configs'}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if "extends" in cfg:
        parent = (path.parent / cfg.pop("extends")).resolve()
        cfg = _merge(load_config(parent), cfg)
    unknown = set(cfg) - {"run", "seed", "stages", "runs_dir"}
    if unknown:
        raise PipelineError(f"{path}: unknown top-level key(s) {sorted(unknown)}; accepted: run, seed, stages, runs_dir, extends")
    for s in sets:
        if "=" not in s:
            raise PipelineError(f"--set {s!r}: expected key=value, e.g. --set rl_lm.steps=100")
        key, raw = s.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] not in ("run", "seed", "runs_dir"):
                raise PipelineError(f"--set {s!r}: top-level keys are run, seed, runs_dir; stage parameters are STAGE.NAME")
            cfg[parts[0]] = value
        elif len(parts) == 2:
            stage, name = parts
            if stage not in cfg.get("stages", {}):
                raise PipelineError(f"--set {s!r}: no stage {stage!r}; stages: {list(cfg.get('stages', {}))}")
            cfg["stages"][stage].setdefault("params", {})[name] = value
        else:
            raise PipelineError(f"--set {s!r}: expected KEY=VALUE or STAGE.PARAM=VALUE")
    cfg.setdefault("seed", 0)
    cfg.setdefault("run", path.stem)
    if not cfg.get("stages"):
        raise PipelineError(f"{path}: no stages")
    return cfg


@dataclass
class Stage:
    name: str
    notebook: Path
    params: dict
    deps: list[str]
    out_dir: Path


def plan(cfg: dict, runs_dir=None) -> list[Stage]:
    """Resolve stage folders, ``@stage/...`` references and dependencies, in config order."""
    runs = Path(runs_dir or cfg.get("runs_dir") or ROOT / "runs")
    run_dir = runs / str(cfg["run"])
    stages, seen, groups = [], set(), {}
    for name, spec in cfg["stages"].items():
        unknown = set(spec) - {"notebook", "params", "sweep"}
        if unknown:
            raise PipelineError(f"stage {name!r}: unknown key(s) {sorted(unknown)}; accepted: notebook, params, sweep")
        nb = NOTEBOOKS / spec["notebook"]
        if not nb.exists():
            raise PipelineError(f"stage {name!r}: notebook {nb} does not exist")
        params, deps = {}, []

        def resolve(k, v):
            if isinstance(v, list):
                return [resolve(k, x) for x in v]
            if isinstance(v, str) and v.startswith("@"):
                dep, _, rest = v[1:].partition("/")
                if dep not in seen:
                    raise PipelineError(f"stage {name!r}: parameter {k!r}={v!r} refers to {dep!r}, which is not an earlier stage")
                deps.extend(groups.get(dep, [dep]))
                return str(run_dir / dep / rest) if rest else str(run_dir / dep)
            return v

        for k, v in (spec.get("params") or {}).items():
            params[k] = resolve(k, v)
        sweep = spec.get("sweep") or {}
        if not isinstance(sweep, dict) or any(not isinstance(v, list) or not v for v in sweep.values()):
            raise PipelineError(f"stage {name!r}: sweep must map parameter names to non-empty lists")
        combos = [dict(zip(sweep, vals)) for vals in itertools.product(*sweep.values())] if sweep else [{}]
        groups[name] = []
        for combo in combos:
            tag = ",".join(f"{k}={v}" for k, v in combo.items())
            sname = f"{name}[{tag}]" if tag else name
            out = run_dir / name / tag if tag else run_dir / name
            sp = {**params, **combo, "out_dir": str(out), "seed": int(cfg["seed"])}
            stages.append(Stage(sname, nb, sp, sorted(set(deps)), out))
            groups[name].append(sname)
        seen.add(name)
    return stages


def _notebook_digest(nb: Path) -> str:
    """Hash of a notebook's code and markdown (not its outputs)."""
    data = json.loads(nb.read_text())
    cells = [(c["cell_type"], "".join(c["source"])) for c in data["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def _shardlib_imports(source: str, package_relative: bool) -> set[str]:
    """shardlib modules a piece of code imports anywhere (function bodies included); "*" = all of them."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "shardlib":
                    found.add("*")
                elif a.name.startswith("shardlib."):
                    found.add(a.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if (package_relative and node.level == 1) or (node.level == 0 and (mod == "shardlib" or mod.startswith("shardlib."))):
                parts = mod.split(".")[1:] if node.level == 0 else ([mod.split(".")[0]] if mod else [])
                if parts:
                    found.add(parts[0])
                else:  # from shardlib import a, b / from . import a: modules or package attributes
                    found.update(a.name for a in node.names)
    return found


def library_files(notebook: Path) -> list[Path]:
    """Files of the library a notebook's code can reach: the shardlib modules it imports, what those
    import in turn, and, when ``shardlib.figures`` is among them, the figure scripts and their imports."""
    pkg = ROOT / "shardlib"
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    todo = set()
    for c in cells:
        src = "".join(c["source"])
        try:
            todo |= _shardlib_imports(src, package_relative=False)
        except SyntaxError:  # IPython magics: be safe, the whole library
            todo.add("*")
    if "*" in todo:
        todo = {f.stem for f in pkg.glob("*.py")}
    files, seen = {pkg / "__init__.py"}, set()
    while todo:
        name = todo.pop()
        f = pkg / f"{name}.py"
        if name in seen or not f.exists():  # a package attribute (e.g. __version__), not a module
            continue
        seen.add(name)
        files.add(f)
        todo |= _shardlib_imports(f.read_text(), package_relative=True) - seen
        if name == "figures":
            for script in sorted((ROOT / "figures").glob("fig_*.py")):
                files.add(script)
                todo |= _shardlib_imports(script.read_text(), package_relative=False) - seen
    return sorted(files)


def library_digest(notebook: Path) -> str:
    """Hash of the library code a notebook can reach (``library_files``): editing a module reruns
    only the stages whose notebooks import it, directly or through other modules."""
    h = hashlib.sha256()
    for f in library_files(notebook):
        h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return h.hexdigest()


def fingerprint(stage: Stage, dep_prints: dict[str, str]) -> str:
    blob = json.dumps(
        {"nb": _notebook_digest(stage.notebook), "lib": library_digest(stage.notebook), "params": stage.params,
         "deps": {d: dep_prints[d] for d in stage.deps}},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_state(out: Path) -> dict:
    f = out / STAGE_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def _write_state(out: Path, state: dict) -> None:
    from .io import atomic_write

    atomic_write(out / STAGE_FILE, lambda t: Path(t).write_text(json.dumps(state, indent=1)))


def run(cfg: dict, force: bool = False, runs_dir=None, only: list[str] | None = None, log=print, log_output: bool = False) -> list[dict]:
    """Execute the stages; returns one record per stage (name, status, seconds)."""
    import papermill as pm

    stages = plan(cfg, runs_dir)
    if only:
        expanded = []
        for o in only:
            expanded += [s.name for s in stages if s.name == o or s.name.startswith(o + "[")]
        missing = {o for o in only if not any(s.name == o or s.name.startswith(o + "[") for s in stages)}
        if missing:
            raise PipelineError(f"--only: no stage(s) {sorted(missing)}; stages: {[s.name for s in stages]}")
    prints, records = {}, []
    n = len(stages)
    for k, st in enumerate(stages, 1):
        fp = fingerprint(st, prints)
        prints[st.name] = fp
        if only and st.name not in expanded:
            continue
        state = _read_state(st.out_dir)
        if state.get("fingerprint") == fp and state.get("status") == "done" and not force:
            log(f"[{k}/{n}] {st.name}: unchanged, skipped (--force reruns)")
            records.append({"stage": st.name, "status": "skipped", "seconds": 0.0})
            continue
        if st.out_dir.exists() and (force or state.get("fingerprint") != fp):
            shutil.rmtree(st.out_dir)  # configuration changed (or --force): start clean
        st.out_dir.mkdir(parents=True, exist_ok=True)
        _write_state(st.out_dir, {"fingerprint": fp, "status": "running", "params": st.params})
        log(f"[{k}/{n}] {st.name}: running {st.notebook.name} -> {st.out_dir}")
        t0 = time.perf_counter()
        out_nb = st.out_dir / "notebook.ipynb"
        try:
            pm.execute_notebook(
                str(st.notebook), str(out_nb), parameters=st.params, kernel_name="python3",
                cwd=str(st.out_dir), progress_bar=False, log_output=log_output,
            )
        except pm.PapermillExecutionError as e:
            _write_state(st.out_dir, {"fingerprint": fp, "status": "failed", "params": st.params})
            raise PipelineError(
                f"stage {st.name!r} failed in cell {e.exec_count} ({e.ename}: {e.evalue}); "
                f"the executed notebook is at {out_nb}"
            ) from None
        dt = time.perf_counter() - t0
        _write_state(st.out_dir, {"fingerprint": fp, "status": "done", "params": st.params, "seconds": round(dt, 2)})
        log(f"[{k}/{n}] {st.name}: done in {dt:.1f} s")
        records.append({"stage": st.name, "status": "done", "seconds": dt})
    return records
