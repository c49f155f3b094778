"""Evaluate syntax-tree expressions to located values (a value plus the span it came from)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import syntax as ast
from .errors import Span, SpecError, suggest
from .spec import MAX_INT, MAX_LAYERS


@dataclass(frozen=True)
class Sym:
    """A bare identifier that is not a `let` constant: `causal`, `gelu`, `lm`, …"""

    name: str
    near: str | None = field(default=None, compare=False)  # `did you mean` a constant, for errors


@dataclass
class CallValue:
    name: str
    args: list[V]
    kwargs: dict[str, V]


@dataclass
class V:
    """A located value: int, float, bool, str, Sym, CallValue or list[V]."""

    value: Any
    span: Span

    @property
    def kind(self) -> str:
        v = self.value
        if isinstance(v, bool):
            return "a boolean"
        if isinstance(v, int):
            return "an integer"
        if isinstance(v, float):
            return "a number"
        if isinstance(v, str):
            return "a string"
        if isinstance(v, Sym):
            return f"the name '{v.name}'"
        if isinstance(v, CallValue):
            return f"a call to '{v.name}'"
        return "a list"


def _num(v: V, op: str) -> int | float:
    if isinstance(v.value, bool) or not isinstance(v.value, (int, float)):
        raise SpecError(f"'{op}' needs numbers, got {v.kind}", v.span)
    return v.value


def evaluate(expr: ast.Expr, env: dict[str, V]) -> V:
    """Evaluate `expr` with `let` constants from `env`; unknown names stay symbols."""
    s = expr.span
    if isinstance(expr, ast.Num):
        return V(expr.value, s)
    if isinstance(expr, (ast.Bool, ast.Str)):
        return V(expr.value, s)
    if isinstance(expr, ast.Name):
        if expr.name in env:
            return V(env[expr.name].value, s)
        return V(Sym(expr.name, suggest(expr.name, list(env))), s)
    if isinstance(expr, ast.Neg):
        v = evaluate(expr.operand, env)
        return V(-_num(_known(v, env), "-"), s)
    if isinstance(expr, ast.ListExpr):
        _list_size(len(expr.items), s)
        return V([evaluate(i, env) for i in expr.items], s)
    if isinstance(expr, ast.Call):
        kwargs: dict[str, V] = {}
        for name, e in expr.kwargs:
            if name in kwargs:
                raise SpecError(f"argument '{name}' given twice", e.span)
            kwargs[name] = evaluate(e, env)
        return V(CallValue(expr.name, [evaluate(a, env) for a in expr.args], kwargs), s)
    if isinstance(expr, ast.BinOp):
        a = _known(evaluate(expr.left, env), env)
        b = _known(evaluate(expr.right, env), env)
        return V(_bounded(_binop(expr.op, a, b, s), s), s)
    raise AssertionError(f"unhandled expression {expr!r}")


def _known(v: V, env: dict[str, V]) -> V:
    if isinstance(v.value, Sym):
        raise SpecError(f"unknown constant '{v.value.name}'", v.span, v.value.near or "define it first with `let`")
    return v


def _binop(op: str, a: V, b: V, span: Span) -> Any:
    if isinstance(a.value, list) or isinstance(b.value, list):
        if op == "+" and isinstance(a.value, list) and isinstance(b.value, list):
            _list_size(len(a.value) + len(b.value), span)
            return a.value + b.value
        if op == "*":
            lst, n = (a, b) if isinstance(a.value, list) else (b, a)
            times = _times(n)
            _list_size(len(lst.value) * times, span)
            return [V(i.value, i.span) for _ in range(times) for i in lst.value]
        if op == "+":
            other = b if isinstance(a.value, list) else a
            raise SpecError(f"'+' joins two lists, got a list and {other.kind}", other.span)
        raise SpecError(f"'{op}' is not defined for lists", span, "lists support `+` (concatenate) and `* n` (repeat)")
    x, y = _num(a, op), _num(b, op)
    if op in ("/", "//", "%") and y == 0:
        raise SpecError("division by zero", b.span)
    try:
        if op == "+":
            return x + y
        if op == "-":
            return x - y
        if op == "*":
            return x * y
        if op == "/":
            return x / y
        if op == "//":
            return x // y
        return x % y
    except OverflowError:  # float // or % beyond the float range
        return math.inf


def _bounded(x: Any, span: Span) -> Any:
    """An arithmetic result, refused when it leaves int64 (whole numbers) or is not finite (numbers)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    if isinstance(x, int) and abs(x) > MAX_INT:
        raise SpecError(f"{_quote(span)} is too large for a whole number", span,
                        f"whole numbers go up to {MAX_INT} (2^63 - 1)")
    if isinstance(x, float) and not math.isfinite(x):
        raise SpecError(f"{_quote(span)} is not a finite number (it is {x})", span, "numbers go up to about 1.8e308")
    return x


def _quote(span: Span) -> str:
    """The source text of a one-line span, as `a * b`, or 'this value' when it is long or spans lines."""
    text = span.source.line(span.line)[span.col - 1 : span.end_col - 1] if span.source else ""
    return f"`{text}`" if text and span.end_line == span.line and len(text) <= 40 else "this value"


def _list_size(n: int, span: Span) -> None:
    """Refuse a list longer than MAX_LAYERS before it is made: lists hold per-layer values."""
    if n > MAX_LAYERS:
        raise SpecError(f"a list holds at most {MAX_LAYERS} values, this one would hold {n}", span,
                        f"a per-layer list has exactly one value per layer, and a model has at most {MAX_LAYERS} "
                        "layers")


def _times(n: V) -> int:
    """How many times `list * n` repeats the list: a whole number, 0 or more."""
    x = n.value
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not x.is_integer()):
        shown = x if isinstance(x, float) else n.kind
        raise SpecError(f"a list can be repeated only a whole number of times, got {shown}", n.span)
    if x < 0:
        raise SpecError(f"a list cannot be repeated a negative number of times ({x})", n.span)
    return int(x)


def evaluate_lets(lets: list[ast.Let]) -> dict[str, V]:
    env: dict[str, V] = {}
    for let in lets:
        if let.name in env:
            raise SpecError(f"constant '{let.name}' is defined twice", let.span,
                            f"it is first defined on line {env[let.name].span.line}")
        env[let.name] = evaluate(let.value, env)
    return env
