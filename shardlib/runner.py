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

What a config may do (it is data, not code): name a run and stages (letters, digits and
``_ . -``; never a path), choose notebooks inside ``notebooks/`` (or a folder given with
``--notebooks-dir`` on the command line), and give each stage parameters that its notebook's
``parameters`` cell already defines, as YAML scalars, lists and mappings. Anything else is
refused before any file is touched. Every file the runner writes is inside
``<runs>/<run>/``; it deletes only stage folders that carry its own record (``.stage.json``)
and refuses to reuse a non-empty folder without one; it marks that record ``stale`` before it empties the folder,
and trusts a ``done`` record only while the files it lists are there. It writes through no symbolic link inside the
runs folder (the runs folder itself may be one). A run holds ``<runs>/<run>/.shardlib.lock``
while it executes, so a second ``shardlib run`` on the same run is refused.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import errno
import hashlib
import itertools
import json
import keyword
import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import yaml

from .config import SEED_MAX

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
STAGE_FILE = ".stage.json"


class PipelineError(RuntimeError):
    pass


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SWEEP_VALUE_RE = re.compile(r"[A-Za-z0-9_.+-]{1,60}")
LOCK_FILE = ".shardlib.lock"


def check_name(kind: str, name) -> str:
    """A run or stage name: one folder name (letters, digits, ``_ . -``, starting with a letter
    or digit), never a path such as ``..`` or ``/abs``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PipelineError(
            f"{kind} name {name!r} is not allowed: use 1-100 letters, digits, '_', '.' or '-', starting with a "
            f"letter or digit (it names one folder, never a path), e.g. {kind}: my_{kind}"
        )
    return name


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that a config may not use (anchors and aliases, duplicate keys, deep nesting); ``fix`` says
    what to write instead."""

    def __init__(self, problem: str, mark, fix: str):
        super().__init__(problem=problem, problem_mark=mark)
        self.fix = fix


MAX_YAML_DEPTH = 32
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000
MAX_CONFIG_BYTES = 1 << 20
MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, bounded for configs. A few hundred bytes of nested aliases (``&a [x, x]``, ``&b [*a,
    *a]``, ...: the "billion laughs") expand to gigabytes once walked, so a config may hold at most
    ``MAX_YAML_ALIASES`` aliases, expanding to at most ``MAX_YAML_NODES`` values, none of them recursive; a key given
    twice in one mapping (YAML keeps the last one silently) and nesting deeper than ``MAX_YAML_DEPTH`` are refused
    too, each with the line they are on."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                raise RefusedYAML(
                    f"more than {MAX_YAML_ALIASES} aliases (*{event.anchor})",
                    event.start_mark,
                    "write the values out, or share settings with extends:",
                )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_YAML_DEPTH:
            raise RefusedYAML(f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark, "flatten it")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            key = "<<" if key_node.tag == MERGE_TAG else self.construct_object(key_node, deep=True)
            try:
                if key in first:
                    raise RefusedYAML(
                        f"duplicate key {_short(key)} (first given on line {first[key].line + 1})",
                        key_node.start_mark,
                        "keep one of them",
                    )
                first[key] = key_node.start_mark
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                pass
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict, open_: set) -> int:
    """Values ``node`` stands for once its aliases are expanded (each shared node counted once per use, computed
    once); refuses more than ``MAX_YAML_NODES`` and aliases that contain themselves."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise RefusedYAML("an alias refers to a value that contains it", node.start_mark, "remove the recursion")
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else ()
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    size = 1 + sum(_expanded_size(c, sizes, open_) for c in children)
    open_.discard(id(node))
    if size > MAX_YAML_NODES:
        raise RefusedYAML(
            f"expands to more than {MAX_YAML_NODES} values (through its aliases)",
            node.start_mark,
            "write a smaller config; aliases may not multiply values",
        )
    sizes[id(node)] = size
    return size


def load_yaml(text: str, where: str):
    """``text`` parsed with :class:`ConfigLoader`; a :class:`PipelineError` naming ``where`` when it is refused."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise _yaml_error(where, e) from None


def _short(v, n: int = 80) -> str:
    """``repr(v)``, cut to ``n`` characters for an error line."""
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _yaml_error(where: str, e: Exception) -> PipelineError:
    mark = getattr(e, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if isinstance(e, RefusedYAML):
        return PipelineError(f"{where}{at}: {problem}; {e.fix}")
    return PipelineError(
        f"{where}: not valid YAML{at}: {problem}; fix the syntax (quote strings that hold ':', '[' or '#')"
    )


def _check_seed(seed, where: str) -> int:
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise PipelineError(
            f"{where}: seed must be an integer from 0 to {SEED_MAX} (2**32 - 1), got {_short(seed)}; e.g. --set seed=1"
        )
    return seed


def _check_value(where: str, v, depth: int = 0):
    """Parameter values are YAML data: None, booleans, numbers, strings, and lists/mappings of them."""
    if depth > 8:
        raise PipelineError(f"{where}: nested too deeply")
    if v is None or isinstance(v, (bool, int, float, str)) and type(v) in (bool, int, float, str):
        return
    if type(v) is list:
        for x in v:
            _check_value(where, x, depth + 1)
        return
    if type(v) is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise PipelineError(f"{where}: mapping keys must be strings, got {_short(k)}")
            _check_value(where, x, depth + 1)
        return
    raise PipelineError(
        f"{where}: value {_short(v)} of type {type(v).__name__} is not allowed; use numbers, strings, booleans, null, "
        "or lists/mappings of them (quote dates and other special YAML values)"
    )


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path, sets: list[str] = (), _seen: tuple = ()) -> dict:
    """Load a YAML config (following ``extends``) and apply ``key=value`` overrides.

    ``--set seed=1`` sets a top-level key; ``--set rl_lm.steps=100`` a stage parameter.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config {path} does not exist or is not a file; configs live in {ROOT / 'configs'}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise PipelineError(
            f"config {path} is {path.stat().st_size} bytes; a config is a short YAML text (at most {MAX_CONFIG_BYTES})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(
            f"config {path} is not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "give a YAML config, e.g. configs/tiny.yaml"
        ) from None
    cfg = load_yaml(text, f"config {path}")
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise PipelineError(f"config {path}: expected a mapping of run, seed, stages; got {type(cfg).__name__}")
    if "extends" in cfg:
        ext = cfg.pop("extends")
        if not isinstance(ext, str):
            raise PipelineError(f"config {path}: extends must be a file name, got {ext!r}")
        parent = (path.parent / ext).resolve()
        if parent in _seen or parent == path.resolve():
            raise PipelineError(
                f"config {path}: extends {ext!r} makes a cycle ({' -> '.join(str(x) for x in (*_seen, parent))})"
            )
        cfg = _merge(load_config(parent, (), (*_seen, path.resolve())), cfg)
    unknown = set(cfg) - {"run", "seed", "stages", "runs_dir"}
    if unknown:
        raise PipelineError(
            f"{path}: unknown top-level key(s) {sorted(unknown)}; accepted: run, seed, stages, runs_dir, extends"
        )
    for s in sets:
        if "=" not in s:
            raise PipelineError(f"--set {s!r}: expected key=value, e.g. --set rl_lm.steps=100")
        key, raw = s.split("=", 1)
        value = load_yaml(raw, f"--set {s!r}")
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] not in ("run", "seed", "runs_dir"):
                raise PipelineError(
                    f"--set {s!r}: top-level keys are run, seed, runs_dir; stage parameters are STAGE.NAME"
                )
            cfg[parts[0]] = value
        elif len(parts) == 2:
            stage, name = parts
            if stage not in (cfg.get("stages") or {}):
                raise PipelineError(f"--set {s!r}: no stage {stage!r}; stages: {list(cfg.get('stages') or {})}")
            if not isinstance(cfg["stages"][stage].get("params") or {}, dict):
                raise PipelineError(f"{path}: stage {stage!r}: params must be a mapping")
            cfg["stages"][stage]["params"] = {**(cfg["stages"][stage].get("params") or {}), name: value}
        else:
            raise PipelineError(f"--set {s!r}: expected KEY=VALUE or STAGE.PARAM=VALUE")
    cfg.setdefault("seed", 0)
    cfg.setdefault("run", path.stem)
    if not cfg.get("stages"):
        raise PipelineError(f"{path}: no stages")
    if not isinstance(cfg["stages"], dict) or not all(isinstance(v, dict) for v in cfg["stages"].values()):
        raise PipelineError(f"{path}: stages must map each stage name to a mapping with notebook, params (and sweep)")
    cfg["seed"] = _check_seed(cfg["seed"], str(path))
    check_name("run", cfg["run"])
    return cfg


@dataclasses.dataclass
class Stage:
    name: str
    notebook: Path
    params: dict
    deps: list[str]
    out_dir: Path


def runs_folder(runs_dir=None, cfg: dict | None = None) -> Path:
    """The folder runs go into (absolute). ``runs/`` of the repository by default; a folder inside
    the repository must be inside ``runs/``, and the repository itself or a folder above it is
    refused (a run there could overwrite the project's own files)."""
    runs = Path(runs_dir or (cfg or {}).get("runs_dir") or ROOT / "runs").expanduser().resolve()
    if "{" in str(runs) or "}" in str(runs):
        raise PipelineError(
            f"runs folder {runs}: braces are not allowed in its path (papermill formats paths with them)"
        )
    root = ROOT.resolve()
    inside_root = runs == root or root in runs.parents
    if (
        runs == root
        or runs in root.parents
        or (inside_root and not (runs == root / "runs" or root / "runs" in runs.parents))
    ):
        raise PipelineError(
            f"runs folder {runs} would put runs among the repository's own files; use runs/ (the default) "
            "or a folder outside the repository (--runs-dir)"
        )
    return runs


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


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
        if _inside(nb, d) and nb.resolve() != d.resolve():
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
        if Path(rest).is_absolute() or ".." in Path(rest).parts or not _inside(target, run_dir / dep):
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
    seed = _check_seed(cfg.get("seed", 0), "config")
    stages, seen, groups = [], set(), {}
    for name, spec in cfg["stages"].items():
        check_name("stage", name)
        if not isinstance(spec, dict):
            raise PipelineError(f"stage {name!r}: expected a mapping with notebook, params (and sweep)")
        unknown = set(spec) - {"notebook", "params", "sweep"}
        if unknown:
            raise PipelineError(f"stage {name!r}: unknown key(s) {sorted(unknown)}; accepted: notebook, params, sweep")
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
            _check_value(f"stage {name!r}: parameter {k!r}", v)
            params[k] = _resolve(name, k, v, run_dir, seen, groups, deps)
        for k, vals in sweep.items():
            for v in vals:
                _check_value(f"stage {name!r}: sweep {k!r}", v)
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
                _refuse_link(d)
            if not _inside(out, run_dir) or out.resolve() == run_dir.resolve():  # belt and braces
                raise PipelineError(f"stage {sname!r}: folder {out} is not inside the run folder {run_dir}")
            sp = {**params, **combo, "out_dir": str(out), "seed": seed}
            stages.append(Stage(sname, nb, sp, sorted(set(deps)), out))
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
            if (package_relative and node.level == 1) or (
                node.level == 0 and (mod == "shardlib" or mod.startswith("shardlib."))
            ):
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


def fingerprint(stage: Stage, dep_prints: dict[str, str], threads: int = 1) -> str:
    """What a stage's results depend on: its notebook, library code, parameters, inputs, and the number of CPU
    threads its kernel computes with (sums can round differently with another thread count)."""
    blob = json.dumps(
        {
            "nb": _notebook_digest(stage.notebook),
            "lib": library_digest(stage.notebook),
            "params": stage.params,
            "deps": {d: dep_prints[d] for d in stage.deps},
            "threads": threads,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_state(out: Path) -> dict:
    """The runner's record of a stage folder, or {} when it is missing or unreadable."""
    try:
        state = json.loads((out / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


STATUSES = ("running", "done", "failed", "stale")
"""A stage record's status; ``stale``: the folder is being emptied (a forced rerun or a changed configuration), so
whatever a kill left in it is emptied again by the next run."""


def _is_record(state: dict, st: Stage) -> bool:
    """Whether ``state`` is a record this runner wrote for this very stage folder."""
    try:
        return (
            isinstance(state.get("fingerprint"), str)
            and state.get("status") in STATUSES
            and Path(state["params"]["out_dir"]).resolve() == st.out_dir.resolve()
        )
    except (KeyError, TypeError):
        return False


def _write_state(out: Path, state: dict) -> None:
    from .io import atomic_write

    atomic_write(out / STAGE_FILE, lambda t: Path(t).write_text(json.dumps(state, indent=1)))


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir/.shardlib.lock`` while the block runs (``fcntl.flock``: the kernel
    releases it when the holder exits, however it exits, so a lock left by a dead process is simply
    taken). A second run is refused with the owner (pid, host, start time) the file names."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    _refuse_link(lock)
    try:  # O_NOFOLLOW: a link put there after the check is not followed either
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _link_error(lock) from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        os.close(fd)
        host = f" on host {owner['host']}" if owner.get("host") not in (None, socket.gethostname()) else ""
        raise PipelineError(
            f"run folder {run_dir} is in use by process {owner.get('pid', '?')}{host} (since {owner.get('started', '?')}); "
            "wait for it to finish or stop it, or use another run name (--run)"
        ) from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    try:
        yield lock
    finally:
        os.ftruncate(fd, 0)  # the file stays (removing it could let two processes lock two files)
        os.close(fd)


def _stage_files(out: Path) -> list[str]:
    """The files a finished stage left in its folder (relative paths; its record aside), listed in its record."""
    files = []
    for folder, _, names in os.walk(out):  # does not follow links
        files += [os.path.relpath(os.path.join(folder, n), out) for n in names]
    return sorted(f for f in files if f != STAGE_FILE)


def _missing_output(out: Path, state: dict) -> str | None:
    """The first output a ``done`` record lists that is no longer a plain file in the stage folder (deleted, or
    replaced by a folder or a link), or why the record cannot tell; None when every one is there."""
    files = state.get("outputs")
    if not isinstance(files, list):
        return "its record lists no outputs"
    for rel in files:
        f = out / str(rel)
        if f.is_symlink() or not f.is_file():
            return f"{rel} is missing or not a file"
    return None


def check_no_links(run_dir: Path, stages: list[Stage]) -> None:
    """Refuse a symbolic link where the runner writes inside the runs folder: the run folder, its lock file, the
    stage and sweep folders (the runs folder itself may be a link: it was resolved)."""
    paths = {run_dir, run_dir / LOCK_FILE}
    for st in stages:
        paths |= {p for p in [st.out_dir, *st.out_dir.parents] if run_dir in p.parents}
    for p in sorted(paths):
        _refuse_link(p)


def _refuse_link(p: Path) -> None:
    if p.is_symlink():
        raise _link_error(p)


def _link_error(p: Path) -> PipelineError:
    try:
        target = f" (to {os.readlink(p)})"
    except OSError:
        target = ""
    return PipelineError(
        f"{p} is a symbolic link{target}; the runner writes nothing through links inside the runs folder: replace "
        "it by a plain folder or file (or remove it), or use another run name (--run)"
    )


def _check_stage_folder_links(out: Path) -> None:
    """Refuse a stage folder holding a symbolic link anywhere (a resumed stage would write through it)."""
    for folder, dirs, names in os.walk(out):
        for n in sorted(dirs + names):
            _refuse_link(Path(folder, n))


def _empty_stage_dir(out: Path, state: dict) -> None:
    """Empty the runner's own stage folder: its record is marked ``stale`` first (atomically), then every file
    but the record goes, links removed, not followed; a kill on the way leaves a ``stale`` record, whose folder
    the next run empties again."""
    _write_state(out, {**state, "status": "stale"})
    for child in sorted(out.iterdir()):
        if child.name == STAGE_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _fresh_stage_dir(st: Stage, state: dict, fp: str, force: bool) -> None:
    """Make ``st.out_dir`` ready: keep it (resume) when its record matches, empty it when the runner's own record
    says the configuration changed (or ``force``, or a former emptying was cut short, or a finished stage's outputs
    are gone), refuse when it holds files without such a record, or a symbolic link."""
    out = st.out_dir
    if out.exists() and not out.is_dir():
        raise PipelineError(
            f"stage {st.name!r}: {out} is a file, not a stage folder; move it away or choose another run name (--run)"
        )
    if out.is_dir():
        if not _is_record(state, st):
            if any(out.iterdir()):
                raise PipelineError(
                    f"stage {st.name!r}: {out} holds files but no valid {STAGE_FILE}, so the runner did not write it and "
                    "will not delete it; move or delete that folder yourself, or choose another run name (--run)"
                )
        elif (
            force
            or state["fingerprint"] != fp
            or state["status"] == "stale"
            or (state["status"] == "done" and _missing_output(out, state))
        ):
            _empty_stage_dir(out, state)  # the runner's own folder: start clean
    out.mkdir(parents=True, exist_ok=True)
    _check_stage_folder_links(out)


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

    _write_state(st.out_dir, {**record, "status": "running"})
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
        )
    except OSError as e:  # papermill saving the executed notebook (a full disk) names no file
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(out_nb)) from None
        raise
    except PipelineError:
        raise
    except Exception as e:  # a failing cell, a kernel that died
        _write_state(st.out_dir, {**record, "status": "failed"})
        raise _failure(st, e, out_nb) from None
    dt = time.perf_counter() - t0
    times = {"seconds": round(dt, 2), "started": round(started, 2), "finished": round(time.time(), 2)}
    _write_state(st.out_dir, {**record, "status": "done", **times, "outputs": _stage_files(st.out_dir)})
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
            raise PipelineError(f"{name} must be a whole number from 1 to {MAX_JOBS}, got {_short(v)}")
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
        state = _read_state(st.out_dir)
        if _is_record(state, st) and state["fingerprint"] == fp and state["status"] == "done" and not force:
            missing = _missing_output(st.out_dir, state)
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

    jobs = cfg["jobs"]
    waiting = {st.name for _, st, _, _ in todo}  # not finished yet: a later stage that reads one waits
    failure, idents = None, {}  # idents: the thread each running stage executes in (jobs > 1)

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
                for t in ready[: jobs - len(running)]:
                    k, st, fp, state = t
                    todo.remove(t)
                    _fresh_stage_dir(st, state, fp, force)
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
