"""Passes written as text: `grow_mlp(hidden = 4096)`, in `-p` options or a pipeline file.

The text uses the spec language's call syntax (same parser, same located errors).
"""

from __future__ import annotations

import contextlib
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from mptc.errors import MptcError, SpecError, suggest
from mptc.evaluate import CallValue, Sym, V, evaluate, evaluate_lets
from mptc.syntax import parse_calls

from . import PASSES, entry_point_names, find_pass
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
    cls = find_pass(c.name) if registry is PASSES else registry.get(c.name)
    if cls is None:
        known = list(registry) + ([n for n in entry_point_names() if n not in registry] if registry is PASSES else [])
        raise SpecError(f"unknown pass '{c.name}'", v.span, suggest(c.name, known) or
                        "passes: " + ", ".join(known))
    types = _field_types(cls)
    names = list(types)
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
    return cls(**{k: _argument(cls.name, k, types[k], a) for k, a in given.items()})


def _field_types(cls: type[Pass]) -> dict[str, Any]:
    """The pass's arguments (its init fields, in order) and their types, resolved from the annotations."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # an annotation naming something its module does not define
        raise MptcError(f"the arguments of pass '{cls.name}' have types that cannot be resolved: {e}",
                        hint="annotate its fields with int, float, bool, str, list[int], Init or X | None") from None
    return {f.name: hints.get(f.name, Any) for f in fields(cls) if f.init}


# Value constraints of built-in passes beyond their fields' types: the names a str field takes,
# and granularities (a str field that also takes a fraction such as 0.5).
CHOICES: dict[tuple[str, str], tuple[tuple[str, ...], str | None]] = {
    ("add_heads", "mode"): (("join", "kv"),
                            "join: new query heads join the kv groups; kv: they come with new kv heads"),
    ("reorder", "by"): (("weight", "activation", "taylor"), None),
    ("extract", "correct"): (("lsq",), "lsq: refit each shrunk projection's consumer by ridge least squares"),
    ("reorder", "what"): (("mlp", "heads", "both"), None),
}
GRANULARITIES = {("extract", "mlp"), ("extract", "mix"), ("extract", "heads"), ("extract", "task")}
NOUNS = {"layers": "a layer index", "drop_layers": "a layer index"}  # what one entry of a list field is called
# fields text cannot give, and what to do instead
NOT_TEXT = {("reorder", "calibration"): "use data = FILES (or --data FILES)",
            ("extract", "calibration"): "use data = FILES (or --data FILES)",
            ("extract", "held_out"): "use data = FILES (or --data FILES)"}


def _argument(pass_name: str, key: str, tp: Any, v: V):
    """The value of a pass argument written as text, converted to its field's type `tp`."""
    if (pass_name, key) in NOT_TEXT:
        raise SpecError(f"{key} cannot be written in a pass; {NOT_TEXT[pass_name, key]}", v.span)
    if (pass_name, key) in GRANULARITIES:
        x = v.value
        if isinstance(x, Sym):
            return x.name
        if isinstance(x, str):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return repr(float(x))
        raise SpecError(f"{key} must be a granularity such as s, m, l, xl or 0.5, got {v.kind}", v.span)
    if (pass_name, key) in CHOICES:
        choices, hint = CHOICES[pass_name, key]
        if not isinstance(v.value, Sym) or v.value.name not in choices:
            raise SpecError(f"{key} must be {' or '.join(choices)}, got {v.kind}", v.span, hint)
        return v.value.name
    return _convert(key, tp, v, tp)


def _convert(key: str, tp: Any, v: V, field_tp: Any):
    """`v` as a value of type `tp` (int, float, bool, str, list[T], Init, X | None, Literal[…]);
    a located error naming the field and its type otherwise."""
    x = v.value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if type(None) in args and isinstance(x, Sym) and x.name == "none":
            return None
        if len(options) == 1:
            return _convert(key, options[0], v, field_tp)
        for a in options:  # the first type the value fits
            with contextlib.suppress(SpecError):
                return _convert(key, a, v, field_tp)
        _wrong(key, tp, v, field_tp)
    if tp is Init:
        return _init(v)
    if tp is bool:
        if not isinstance(x, bool):
            _wrong(key, tp, v, field_tp)
        return x
    if tp is int:
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        if isinstance(x, bool) or not isinstance(x, int):
            _wrong(key, tp, v, field_tp)
        _check(key, x, v)
        return x
    if tp is float:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            _wrong(key, tp, v, field_tp)
        _check(key, x, v)
        return float(x)
    if tp is str:
        if isinstance(x, Sym):
            return x.name
        if not isinstance(x, str):
            _wrong(key, tp, v, field_tp)
        return x
    if origin is typing.Literal:
        got = x.name if isinstance(x, Sym) else x
        if isinstance(got, bool) or got not in args:
            raise SpecError(f"{key} must be {' or '.join(map(str, args))}, got {v.kind}", v.span)
        return got
    if origin is list and len(args) == 1:
        items = x if isinstance(x, list) else [v]  # one entry: a list of one
        entry = "layer index" if key in NOUNS else key
        return [_convert(entry, args[0], i, field_tp) for i in items]
    raise SpecError(f"{key} cannot be written in a pass (its type is {_type_text(field_tp)})", v.span)


DESCRIBE = {int: "a whole number", float: "a number", bool: "true or false", str: "a name or a string",
            Init: "zeros, normal(std = …) or copy(noise = …)"}


def _describe(key: str, tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(key, a) for a in args if a is not type(None))
    if origin is list and args:
        one = NOUNS.get(key) or _describe(key, args[0])
        return f"{one} or a list of them"
    if origin is typing.Literal:
        return " or ".join(map(str, args))
    return DESCRIBE.get(tp, _type_text(tp))


def _type_text(tp: Any) -> str:
    """A type as it is written in Python: `int | None`, `list[int]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_text(a) for a in args)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _wrong(key: str, tp: Any, v: V, field_tp: Any) -> typing.NoReturn:
    entry = key == "layer index"
    what = NOUNS["layers"] + " or a list of them" if entry else _describe(key, field_tp)
    name = "layers" if entry else key
    raise SpecError(f"{name} must be {what}, got {v.kind} ({name}: {_type_text(field_tp)})", v.span)


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
