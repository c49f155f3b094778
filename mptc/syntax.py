"""Source syntax: the lark parser and the syntax tree it produces.

The tree keeps every node's span (for errors) and the literal text of numbers and the
comments (for `mptc fmt`). Meaning is given later by `mptc.evaluate` and `mptc.schema`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args

from .errors import Source, Span, SpecError

# --- syntax tree -------------------------------------------------------------------


@dataclass
class Expr:
    span: Span


@dataclass
class Num(Expr):
    value: int | float
    text: str


@dataclass
class Bool(Expr):
    value: bool


@dataclass
class Str(Expr):
    value: str
    text: str


@dataclass
class Name(Expr):
    name: str


@dataclass
class BinOp(Expr):
    op: str  # one of + - * / // %
    left: Expr
    right: Expr


@dataclass
class Neg(Expr):
    operand: Expr


@dataclass
class Call(Expr):
    name: str
    args: list[Expr]
    kwargs: list[tuple[str, Expr]]


@dataclass
class ListExpr(Expr):
    items: list[Expr]


@dataclass
class Field:
    name: str
    value: Expr
    span: Span  # of the name


@dataclass
class Block:
    name: str
    arg: Expr | None
    body: list[Field | Block]
    span: Span  # of the name
    end_line: int = 0  # line of the closing brace


@dataclass
class Let:
    name: str
    value: Expr
    span: Span  # of the name


@dataclass
class Comment:
    line: int
    col: int
    text: str


@dataclass
class File:
    lets: list[Let]
    model: Block
    source: Source
    comments: list[Comment] = field(default_factory=list)


# --- parsing -----------------------------------------------------------------------

TOKEN_NAMES = {
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "EQUAL": "'='",
    "COMMA": "','",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "PERCENT": "'%'",
    "__ANON_0": "'//'",
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "LET": "'let'",
    "MODEL": "'model'",
    "TRUE": "'true'",
    "FALSE": "'false'",
    "$END": "end of file",
}


_comment_sink: list[list[Token]] = []


def _on_comment(tok: Token) -> Token:
    if _comment_sink:
        _comment_sink[-1].append(tok)
    return tok


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("mptc.grammar").joinpath("mpt.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        strict=True,
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks={"COMMENT": _on_comment},
    )


def _span(src: Source, obj) -> Span:
    return Span(obj.line, obj.column, obj.end_line, obj.end_column, src)


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return f"'{tok.value}'"


def _expected(names) -> str:
    pretty = sorted({TOKEN_NAMES.get(n, n.lower()) for n in names})
    if len(pretty) > 6:
        pretty = pretty[:6] + ["…"]
    return ", ".join(pretty)


def parse_file(text: str, name: str = "<spec>") -> File:
    """Parse spec text into a syntax tree; raise SpecError with a position on bad syntax."""
    src = Source(name, text)
    toks: list[Token] = []
    _comment_sink.append(toks)
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        span = Span(e.line, e.column, e.line, e.column + 1, src)
        hint = "strings use double quotes" if ch == "'" else None
        raise SpecError(f"unexpected character {ch!r}", span, hint) from None
    except lark.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            lines = text.splitlines() or [""]
            span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2, src)
        else:
            span = Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1, src)
        hint = None
        if "RBRACE" in e.expected and tok.type == "$END":
            hint = "a '{' is never closed"
        elif tok.type in ("LET", "MODEL", "TRUE", "FALSE"):
            hint = f"'{tok.value}' is a keyword and cannot be used as a name"
        raise SpecError(f"unexpected {_describe(tok)}; expected {_expected(e.expected)}", span, hint) from None
    except lark.UnexpectedEOF as e:
        lines = text.splitlines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2, src)
        raise SpecError(f"unexpected end of file; expected {_expected(e.expected)}", span) from None
    finally:
        _comment_sink.pop()
    comments = [Comment(t.line, t.column, str(t).rstrip()) for t in toks]
    return _ToAst(src, comments).transform(tree)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, src: Source, comments: list[Comment]):
        super().__init__()
        self.src = src
        self.comments = comments

    def _s(self, meta) -> Span:
        return _span(self.src, meta)

    def start(self, meta, items):
        lets = [i for i in items if isinstance(i, Let)]
        model = next(i for i in items if isinstance(i, Block))
        return File(lets, model, self.src, self.comments)

    def let_stmt(self, meta, items):
        name, value = items
        return Let(str(name), value, _span(self.src, name))

    def model(self, meta, items):
        name, body = items
        blk = Block("model", Name(_span(self.src, name), str(name)), body, self._s(meta))
        blk.end_line = meta.end_line
        return blk

    def body(self, meta, items):
        return [i for i in items if isinstance(i, (Field, Block))]

    def field(self, meta, items):
        name, value = items
        return Field(str(name), value, _span(self.src, name))

    def block(self, meta, items):
        name, arg, body = items
        blk = Block(str(name), arg, body, _span(self.src, name))
        blk.end_line = meta.end_line
        return blk

    def _bin(self, meta, op: str, items) -> BinOp:
        return BinOp(self._s(meta), op, items[0], items[1])

    def add(self, meta, items):
        return self._bin(meta, "+", items)

    def sub(self, meta, items):
        return self._bin(meta, "-", items)

    def mul(self, meta, items):
        return self._bin(meta, "*", items)

    def div(self, meta, items):
        return self._bin(meta, "/", items)

    def floordiv(self, meta, items):
        return self._bin(meta, "//", items)

    def mod(self, meta, items):
        return self._bin(meta, "%", items)

    def neg(self, meta, items):
        return Neg(self._s(meta), items[0])

    def unary(self, meta, items):  # unary plus
        return items[0]

    def int(self, meta, items):
        t = items[0]
        return Num(_span(self.src, t), int(str(t).replace("_", "")), str(t))

    def float(self, meta, items):
        t = items[0]
        return Num(_span(self.src, t), float(str(t).replace("_", "")), str(t))

    def true(self, meta, items):
        return Bool(self._s(meta), True)

    def false(self, meta, items):
        return Bool(self._s(meta), False)

    def string(self, meta, items):
        t = items[0]
        return Str(_span(self.src, t), bytes(str(t)[1:-1], "utf-8").decode("unicode_escape"), str(t))

    def name(self, meta, items):
        t = items[0]
        return Name(_span(self.src, t), str(t))

    def call(self, meta, items):
        name, *args = items
        pos: list[Expr] = []
        kw: list[tuple[str, Expr]] = []
        for a in args:
            if a is None:
                continue
            if isinstance(a, tuple):
                kw.append(a)
            elif kw:
                raise SpecError("positional argument after a keyword argument", a.span)
            else:
                pos.append(a)
        return Call(self._s(meta), str(name), pos, kw)

    def kwarg(self, meta, items):
        name, value = items
        return (str(name), value)

    def list(self, meta, items):
        return ListExpr(self._s(meta), [i for i in items if i is not None])
