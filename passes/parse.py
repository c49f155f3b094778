"""Passes written as text: `grow_mlp(hidden = 4096)`, in `-p` options or a pipeline file.

The text uses the spec language's call syntax (same parser, same located errors).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

from mptc.errors import MptcError, SpecError, suggest
from mptc.evaluate import CallValue, Sym, V, evaluate, evaluate_lets
from mptc.syntax import parse_calls

from . import PASSES
from .base import Pass, argument_problem
from .engine import Init

INIT_KINDS = ("zeros", "normal", "copy")


def parse_passes(text: str, name: str = "<passes>", registry: dict[str, type[Pass]] | None = None) -> list[Pass]:
    """Pass objects from text holding calls (one per line or comma-separated)."""
    registry = registry or PASSES
    out = []
    for call in parse_calls(text, name):
        v = evaluate(call, evaluate_lets([]))
        out.append(_make(v, registry))
    return out


def load_pipeline(options: list[str], file: str | None = None) -> list[Pass]:
    """The passes of `-p` options (each named `-p N` in errors) and of a pipeline file, in order."""
    out = []
    if file is not None:
        try:
            text = Path(file).read_text()
        except OSError as e:
            raise MptcError(f"cannot read {file}: {e.strerror}") from None
        out += parse_passes(text, file)
    for i, opt in enumerate(options, 1):
        out += parse_passes(opt, f"-p {i}")
    if not out:
        raise MptcError("no passes given", hint='add -p "grow_mlp(hidden = 4096)" or --passes FILE')
    return out


def _make(v: V, registry: dict[str, type[Pass]]) -> Pass:
    c: CallValue = v.value
    cls = registry.get(c.name)
    if cls is None:
        raise SpecError(f"unknown pass '{c.name}'", v.span, suggest(c.name, list(registry)) or
                        "passes: " + ", ".join(registry))
    names = [f.name for f in fields(cls)]
    if len(c.args) > len(names):
        raise SpecError(f"{c.name}() takes at most {len(names)} arguments", c.args[len(names)].span)
    given = dict(zip(names, c.args, strict=False))
    for k, a in c.kwargs.items():
        if k not in names:
            raise SpecError(f"unknown argument '{k}' for {c.name}()", a.span,
                            suggest(k, names) or "arguments: " + ", ".join(names))
        if k in given:
            raise SpecError(f"argument '{k}' given twice", a.span)
        given[k] = a
    return cls(**{k: _value(k, a) for k, a in given.items()})


def _value(key: str, v: V):
    x = v.value
    if key == "init":
        return _init(v)
    if key in ("mlp", "heads", "mix", "task"):  # granularities: a name, a fraction, or a string like "s,s,m"
        if isinstance(x, Sym):
            return x.name
        if isinstance(x, str):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return repr(float(x))
        raise SpecError(f"{key} must be a granularity such as s, m, l, xl or 0.5, got {v.kind}", v.span)
    if key in ("by", "what"):
        choices = ("weight", "activation") if key == "by" else ("mlp", "heads", "both")
        if not isinstance(x, Sym) or x.name not in choices:
            raise SpecError(f"{key} must be {' or '.join(choices)}, got {v.kind}", v.span)
        return x.name
    if key == "calibration":
        raise SpecError("calibration data cannot be written in a pass; use --data FILES", v.span)
    if key in ("layers", "drop_layers"):
        items = x if isinstance(x, list) else [v]
        for i in items:
            if isinstance(i.value, bool) or not isinstance(i.value, int):
                raise SpecError(f"layers must be a layer index or a list of them, got {i.kind}", i.span)
            _check("layer index", i.value, i)
        return [i.value for i in items]
    if key == "mode":
        if not isinstance(x, Sym) or x.name not in ("join", "kv"):
            raise SpecError(f"mode must be join or kv, got {v.kind}", v.span,
                            "join: new query heads join the kv groups; kv: they come with new kv heads")
        return x.name
    if key == "factor":
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise SpecError(f"factor must be a number, got {v.kind}", v.span)
        _check(key, x, v)
        return float(x)
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if isinstance(x, bool) or not isinstance(x, int):
        raise SpecError(f"{key} must be a whole number, got {v.kind}", v.span)
    _check(key, x, v)
    return x


def _check(key: str, x, v: V) -> None:
    """Refuse, at the argument's place in the text, a value no pass could use (see `argument_problem`)."""
    problem = argument_problem(key, x)
    if problem:
        raise SpecError(problem, v.span)


def _init(v: V) -> Init:
    x = v.value
    if isinstance(x, Sym) and x.name in INIT_KINDS:
        return Init(x.name)
    if isinstance(x, CallValue) and x.name in ("normal", "copy"):
        key = "std" if x.name == "normal" else "noise"
        args = dict(zip([key], x.args, strict=False)) | x.kwargs
        for k, a in args.items():
            if k != key:
                raise SpecError(f"unknown argument '{k}' for {x.name}()", a.span, f"write {x.name}({key} = …)")
            if isinstance(a.value, bool) or not isinstance(a.value, (int, float)) or not (
                    math.isfinite(a.value) and a.value >= 0):
                shown = a.value if isinstance(a.value, (int, float)) and not isinstance(a.value, bool) else a.kind
                raise SpecError(f"{key} must be a finite non-negative number, got {shown}", a.span)
        a = args.get(key)
        return Init(x.name, float(a.value) if a is not None else None)
    raise SpecError("init must be zeros, normal(std = …) or copy(noise = …)", v.span,
                    suggest(x.name, INIT_KINDS) if isinstance(x, (Sym, CallValue)) else None)
