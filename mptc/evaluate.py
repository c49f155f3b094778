"""Evaluate syntax-tree expressions to located values (a value plus the span it came from)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import syntax as ast
from .errors import Span, SpecError, suggest


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
        return V(_binop(expr.op, a, b, s), s)
    raise AssertionError(f"unhandled expression {expr!r}")


def _known(v: V, env: dict[str, V]) -> V:
    if isinstance(v.value, Sym):
        raise SpecError(f"unknown constant '{v.value.name}'", v.span, v.value.near or "define it first with `let`")
    return v


def _binop(op: str, a: V, b: V, span: Span) -> Any:
    if isinstance(a.value, list) or isinstance(b.value, list):
        if op == "+" and isinstance(a.value, list) and isinstance(b.value, list):
            return a.value + b.value
        if op == "*":
            lst, n = (a, b) if isinstance(a.value, list) else (b, a)
            return [V(i.value, i.span) for _ in range(_times(n)) for i in lst.value]
        if op == "+":
            other = b if isinstance(a.value, list) else a
            raise SpecError(f"'+' joins two lists, got a list and {other.kind}", other.span)
        raise SpecError(f"'{op}' is not defined for lists", span, "lists support `+` (concatenate) and `* n` (repeat)")
    x, y = _num(a, op), _num(b, op)
    if op in ("/", "//", "%") and y == 0:
        raise SpecError("division by zero", b.span)
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
