"""A run's YAML config (``configs/*.yaml``): bounded loading, ``extends``, ``--set`` overrides, and the checks that
make a config data, not code (names, seeds, values). :mod:`shardlib.runner` plans and runs what it loads.

YAML is read with a bounded loader: at most ``MAX_YAML_ALIASES`` aliases expanding to ``MAX_YAML_NODES`` values, no
recursive alias, nesting at most ``MAX_YAML_DEPTH`` deep, no key given twice in a mapping, and a config of at most
``MAX_CONFIG_BYTES`` of UTF-8 text. Every refusal is one :class:`PipelineError` line naming the problem and the fix.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from .config import SEED_MAX

ROOT = Path(__file__).resolve().parent.parent


class PipelineError(RuntimeError):
    pass


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


SWEEP_VALUE_RE = re.compile(r"[A-Za-z0-9_.+-]{1,60}")


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
                        f"duplicate key {short(key)} (first given on line {first[key].line + 1})",
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


def short(v, n: int = 80) -> str:
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


def check_seed(seed, where: str) -> int:
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise PipelineError(
            f"{where}: seed must be an integer from 0 to {SEED_MAX} (2**32 - 1), got {short(seed)}; e.g. --set seed=1"
        )
    return seed


def check_value(where: str, v, depth: int = 0):
    """Parameter values are YAML data: None, booleans, numbers, strings, and lists/mappings of them."""
    if depth > 8:
        raise PipelineError(f"{where}: nested too deeply")
    if v is None or isinstance(v, (bool, int, float, str)) and type(v) in (bool, int, float, str):
        return
    if type(v) is list:
        for x in v:
            check_value(where, x, depth + 1)
        return
    if type(v) is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise PipelineError(f"{where}: mapping keys must be strings, got {short(k)}")
            check_value(where, x, depth + 1)
        return
    raise PipelineError(
        f"{where}: value {short(v)} of type {type(v).__name__} is not allowed; use numbers, strings, booleans, null, "
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
    cfg["seed"] = check_seed(cfg["seed"], str(path))
    check_name("run", cfg["run"])
    return cfg
