"""`format_source(file)`: `mptc fmt`. Re-lays out the user's own text (constants, arithmetic
and comments kept) in the house style; formatting formatted text changes nothing. (The
canonical text of a Spec, `format_spec`, lives beside the Spec in `mptc.spec`.)
"""

from __future__ import annotations

from . import syntax as ast
from .spec import INDENT, MAX_INLINE

# --- source formatter --------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}


def format_expr(e: ast.Expr, parent: int = 0) -> str:
    if isinstance(e, ast.Num):
        return e.text
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Str):
        return e.text
    if isinstance(e, ast.Name):
        return e.name
    if isinstance(e, ast.Neg):
        return "-" + format_expr(e.operand, 3)
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(format_expr(i) for i in e.items) + "]"
    if isinstance(e, ast.Call):
        args = [format_expr(a) for a in e.args] + [f"{k} = {format_expr(v)}" for k, v in e.kwargs]
        return f"{e.name}(" + ", ".join(args) + ")"
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        if e.op == "/" and isinstance(e.left, ast.Num) and isinstance(e.right, ast.Num):
            return f"{e.left.text}/{e.right.text}"  # a fraction literal: 1/8
        # left-associative: the right operand needs parentheses at equal precedence
        s = f"{format_expr(e.left, p)} {e.op} {format_expr(e.right, p + 1)}"
        return f"({s})" if p < parent else s
    raise AssertionError(e)


def _end_line(e: ast.Field | ast.Block) -> int:
    return e.end_line if isinstance(e, ast.Block) else e.value.span.end_line


class _SourcePrinter:
    def __init__(self, file: ast.File):
        self.src = file.source
        self.pending = sorted(file.comments, key=lambda c: (c.line, c.col))
        self.out: list[str] = []

    def _trailing(self, c: ast.Comment) -> bool:
        return self.src.line(c.line)[: c.col - 1].strip() != ""

    def comments_before(self, line: int, depth: int) -> None:
        while self.pending and self.pending[0].line < line:
            c = self.pending.pop(0)
            self.out.append(INDENT * depth + c.text)

    def trailing(self, line: int) -> str:
        if self.pending and self.pending[0].line == line and self._trailing(self.pending[0]):
            return "  " + self.pending.pop(0).text
        return ""

    def has_comments(self, first: int, last: int) -> bool:
        return any(first <= c.line <= last for c in self.pending)

    def entry(self, e: ast.Field | ast.Block, depth: int, last_on_line: bool) -> None:
        self.comments_before(e.span.line, depth)
        pad = INDENT * depth
        if isinstance(e, ast.Field):
            tail = self.trailing(_end_line(e)) if last_on_line else ""
            self.out.append(f"{pad}{e.name} = {format_expr(e.value)}" + tail)
            return
        head = e.name if e.arg is None else f"{e.name} {format_expr(e.arg)}"
        self.block(head, e, depth, last_on_line)

    def block(self, head: str, b: ast.Block, depth: int, last_on_line: bool = True) -> None:
        pad = INDENT * depth
        one_line = b.span.line == b.end_line and not self.has_comments(b.span.line, b.end_line - 1)
        if one_line and all(isinstance(x, ast.Field) for x in b.body):
            inner = ", ".join(f"{x.name} = {format_expr(x.value)}" for x in b.body)
            text = f"{pad}{head} {{ {inner} }}" if inner else f"{pad}{head} {{ }}"
            if len(text) <= MAX_INLINE:
                self.out.append(text + (self.trailing(b.end_line) if last_on_line else ""))
                return
        # a comment at the end of the header line belongs to an entry on that line, if any
        header_alone = not b.body or b.body[0].span.line > b.span.line
        self.out.append(f"{pad}{head} {{" + (self.trailing(b.span.line) if header_alone else ""))
        for x, nxt in zip(b.body, [*b.body[1:], None], strict=True):
            self.entry(x, depth + 1, nxt is None or nxt.span.line > _end_line(x))
        self.comments_before(b.end_line, depth + 1)
        self.out.append(f"{pad}}}" + self.trailing(b.end_line))

    def file(self, f: ast.File) -> str:
        items = sorted([*f.lets, f.model], key=lambda x: x.span.line)
        prev_kind = None
        for it in items:
            kind = "let" if isinstance(it, ast.Let) else "model"
            if prev_kind is not None and (kind != prev_kind or kind == "model"):
                self.out.append("")
            self.comments_before(it.span.line, 0)
            if isinstance(it, ast.Let):
                self.out.append(f"let {it.name} = {format_expr(it.value)}" + self.trailing(it.value.span.end_line))
            else:
                self.block(f"model {format_expr(it.arg)}", it, 0)
            prev_kind = kind
        self.comments_before(10**9, 0)
        return "\n".join(self.out).strip("\n") + "\n"


def format_source(file: ast.File) -> str:
    return _SourcePrinter(file).file(file)
