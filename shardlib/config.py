"""Frozen, validated stage configs.

Every notebook has one ``parameters`` cell of literals; the next cell calls
``Params.from_namespace(globals())`` which builds a frozen dataclass, rejecting
unknown names, wrong types and out-of-range values with a message that names the
parameter, what was given and what is accepted (papermill itself only warns on
unknown names). Each field carries its documentation in ``metadata["doc"]``
(cleanrl style: one docstring per field), and its accepted range or choices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


SEED_MAX = 2**32 - 1
"""The largest seed: every generator the stages seed (numpy's legacy one included) accepts 0..2**32 - 1."""
INT_LIMIT = 2**31 - 1
"""Whole-number parameters without a bound of their own lie in -INT_LIMIT..INT_LIMIT (a count, size or number of
steps beyond it would overflow inside a stage, or never finish)."""


def param(default, doc: str, *, choices=None, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with documentation and validation metadata."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


# Names IPython puts in a notebook's globals; never parameters.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def _accepted(f: dataclasses.Field, tp) -> str:
    m = f.metadata
    parts = [getattr(tp, "__name__", str(tp))]
    if m.get("choices") is not None:
        parts.append("one of " + ", ".join(repr(c) for c in m["choices"]))
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if m.get(key) is not None:
            parts.append(f"{sym} {m[key]}")
    return " ".join(parts)


def _coerce(name: str, value: Any, tp, f: dataclasses.Field):
    origin = typing.get_origin(tp)
    bad = ConfigError(f"parameter {name!r}: got {value!r} ({type(value).__name__}); accepted: {_accepted(f, tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
    elif tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():  # papermill -p 1e3 gives a float
            value = int(value)
        if not isinstance(value, int):
            raise bad
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"parameter {name!r}: got {value!r}; accepted: a finite {_accepted(f, tp)}")
    elif tp is str:
        if not isinstance(value, str):
            raise bad
    elif origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if inner is float and isinstance(value, list):  # YAML's 1 in a list of floats
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not isinstance(value, list) or not all(
            isinstance(v, inner) and (inner is bool or not isinstance(v, bool)) for v in value
        ):
            raise bad
        if inner is float and not all(math.isfinite(v) for v in value):
            raise ConfigError(f"parameter {name!r}: got {value!r}; accepted: a list of finite floats")
        value = tuple(value)  # frozen
    else:  # pragma: no cover - a programming error in a Params subclass
        raise TypeError(f"unsupported parameter type {tp} for {name}")
    m = f.metadata
    items = value if isinstance(value, tuple) else (value,)
    whole = tp is int or (origin is list and typing.get_args(tp) == (int,))
    if whole and m.get("le") is m.get("lt") is None and any(abs(v) > INT_LIMIT for v in items):
        raise ConfigError(
            f"parameter {name!r}: got {value!r}; accepted: {_accepted(f, tp)} of at most {INT_LIMIT} (2**31 - 1)"
        )
    for v in items:
        if m.get("choices") is not None and v not in m["choices"]:
            raise bad
        if m.get("ge") is not None and v < m["ge"]:
            raise bad
        if m.get("gt") is not None and v <= m["gt"]:
            raise bad
        if m.get("le") is not None and v > m["le"]:
            raise bad
        if m.get("lt") is not None and v >= m["lt"]:
            raise bad
    return value


@dataclass(frozen=True)
class Params:
    """Base of every stage's parameters."""

    out_dir: str = param("runs/scratch", "folder the stage writes its results into")
    seed: int = param(0, "seed of every random number generator of the stage", ge=0, le=SEED_MAX)

    def __post_init__(self):
        """A direct construction (``RLParams(checkpoint_every=0)``) is checked as :meth:`from_dict` checks: every
        value against its type and bounds, then :meth:`check`, before any compute starts."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # the coerced value (a float for 1, a tuple for a list), as from_dict's
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name], f))
        self.check()

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown} for {cls.__name__}; accepted: {sorted(fields)}")
        return cls(**values)  # the defaults fill the rest; __post_init__ coerces and checks every value

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]):
        """Build from a notebook's globals: every public non-module name is a parameter."""
        values = {
            k: v
            for k, v in namespace.items()
            if not k.startswith("_")
            and k not in _IPYTHON_NAMES
            and not isinstance(v, (types.ModuleType, types.FunctionType, type))
        }
        return cls.from_dict(values)

    def check(self) -> None:
        """Cross-field checks; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> str:
        """Hash of every parameter but ``out_dir``: identifies a run's checkpoints and stores."""
        d = self.to_dict()
        d.pop("out_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes):
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def describe(cls) -> str:
        """One line per parameter: name, default, accepted values, documentation."""
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{f.name} = {default!r}  [{_accepted(f, hints[f.name])}]  {f.metadata['doc']}")
        return "\n".join(lines)
