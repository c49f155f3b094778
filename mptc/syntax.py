"""Source syntax: the lark parser and the syntax tree it produces.

The tree keeps every node's span (for errors) and the literal text of numbers and the
comments (for `mptc fmt`). Meaning is given later by `mptc.evaluate` and `mptc.schema`.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Token, Tree, v_args
from lark.visitors import Transformer_NonRecursive

from .errors import Source, Span, SpecError
from .spec import MAX_DEPTH, MAX_INT

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
    """The LALR parser of grammar/mpt.lark, checked strictly (no conflicts, no colliding terminals) when it is
    built; lark keeps the built tables in a cache file that starts with the grammar's hash, so later runs
    skip that analysis (most of the start-up time of `mptc check`)."""
    grammar = resources.files("mptc.grammar").joinpath("mpt.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        strict=True,
        cache=_cache_file(),
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks={"COMMENT": _on_comment},
        start=["start", "pass_list"],
    )


def _cache_file() -> str | bool:
    """The parser cache in the user's own cache dir (a pickle: never in a folder others may write),
    or no cache when that dir cannot be made."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mptc"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if root.stat().st_uid != os.getuid() or not os.access(root, os.W_OK):
            return False
    except (OSError, RuntimeError):
        return False
    return str(root / f"grammar-py{sys.version_info[0]}{sys.version_info[1]}.lark-cache")


def _span(src: Source, obj) -> Span:
    return Span(obj.line, obj.column, obj.end_line, obj.end_column, src)


def _node_span(src: Source, node: Tree) -> Span:
    """The span of a tree node; the end of the text for a node without position (all its tokens filtered)."""
    return _eof_span(src) if node.meta.empty else _span(src, node.meta)


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return f"'{tok.value}'"


def _expected(names) -> str:
    pretty = sorted({TOKEN_NAMES.get(n, n.lower()) for n in names})
    if len(pretty) > 6:
        pretty = pretty[:6] + ["…"]
    return ", ".join(pretty)


KEYWORDS = ("let", "model", "true", "false")
ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
_BRACES = re.compile(r'"([^"\\\n]|\\.)*"|#[^\n]*|[{}]')


def _unclosed_hint(text: str) -> str:
    """Which '{' is never closed: one whose '}' is indented less than its line, else the innermost open one."""
    lines = text.split("\n")  # as the parser counts lines
    indent = [len(ln) - len(ln.lstrip()) for ln in lines]
    open_: list[int] = []  # line numbers of the open braces
    for m in _BRACES.finditer(text):
        if m.group() not in ("{", "}"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        if m.group() == "{":
            open_.append(line)
        elif open_:
            opener = open_.pop()
            if lines[line - 1].lstrip().startswith("}") and indent[line - 1] < indent[opener - 1]:
                return f"the '{{' on line {opener} looks unclosed: the '}}' on line {line} is indented less"
    return f"the '{{' on line {open_[-1]} is never closed" if open_ else "a '{' is never closed"


def _unescape(t: Token, src: Source) -> str:
    """The value of a STRING token: quotes removed, escapes replaced."""

    def one(m: re.Match) -> str:
        if m.group(1) not in ESCAPES:
            col = t.column + 1 + m.start()
            raise SpecError(f"unknown escape '\\{m.group(1)}' in a string", Span(t.line, col, t.line, col + 2, src),
                            "known escapes: " + " ".join("\\" + c for c in ESCAPES))
        return ESCAPES[m.group(1)]

    return re.sub(r"\\(.)", one, str(t)[1:-1])


def _bounds(item) -> tuple[int, int, int, int]:
    """(start_pos, end_pos, end_line, end_column) of a token or a tree from the parser's value stack."""
    m = item if isinstance(item, Token) else item.meta
    return m.start_pos, m.end_pos, m.end_line, m.end_column


def _eof_span(src: Source) -> Span:
    lines = src.text.split("\n")
    if len(lines) > 1 and lines[-1] == "":  # a final line break ends the last line
        lines.pop()
    return Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2, src)


def _bad_characters(src: Source, e: lark.UnexpectedCharacters) -> SpecError:
    text, pos = src.text, e.pos_in_stream
    ch = text[pos] if pos < len(text) else ""
    span = Span(e.line, e.column, e.line, e.column + 1, src)
    if re.match(r"[0-9]|\.[0-9]", text[pos : pos + 2]):  # ASCII digits only: '¹'.isdigit() is true
        word = re.match(r"[.0-9][A-Za-z0-9_.]*", text[pos:]).group()  # type: ignore[union-attr]
        span = Span(e.line, e.column, e.line, e.column + len(word), src)
        return SpecError(f"malformed number '{word}'", span, "numbers look like 12, 1_000, 0.5 or 1e-6")
    hint = {"'": "strings use double quotes", '"': "a string must end on the line where it starts"}.get(ch)
    return SpecError(f"unexpected character {ch!r}", span, hint)


def _entry(stack: list) -> list:
    """The unfinished entry at the end of the parser's value stack: what follows `{` or the finished entries."""
    for i in range(len(stack) - 1, 0, -1):
        prev = stack[i - 1]
        if (isinstance(prev, Token) and prev.type == "LBRACE") or (
            isinstance(prev, Tree) and prev.data.startswith("__body")
        ):
            return stack[i:]
    return []


def _cut_entry(src: Source, stack: list, tok: Token, expected: set[str]) -> SpecError | None:
    """An entry cut short at a line end (`width =`, `width`, `width 64`), so the next line was read as part of it."""
    only_brace = expected == {"LBRACE"}  # `name arg` or `model name`, then no '{'
    entry = stack[-2:] if only_brace else _entry(stack)
    if not entry or not isinstance(entry[0], Token):
        return None
    first = entry[0]
    head = list(itertools.takewhile(lambda x: _line(x) == first.line, entry))
    spill = entry[len(head) :]  # at most the next line's entry name
    if len(spill) > 1 or (spill and not (isinstance(spill[0], Token) and spill[0].type == "NAME")):
        return None
    kinds = [x.type if isinstance(x, Token) else "expr" for x in head]
    end, end_line, end_col = _bounds(head[-1])[1:]
    cut = tok.type == "$END" or _line(spill[0] if spill else tok) > end_line
    if kinds == ["NAME"] and cut:
        want = "'=' or '{'"
    elif kinds == ["NAME", "EQUAL"] and cut:
        want = "a value"
    elif len(kinds) == 2 and kinds[1] != "EQUAL" and (cut or only_brace):
        want = "'{'"
    else:
        return None
    span = Span(end_line, end_col, end_line, end_col + 1, src)
    if not cut:
        span = Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1, src)
    header = " ".join(src.text[_bounds(first)[0] : end].split())
    hint = None
    if want == "'{'" and first.type == "NAME":
        hint = f"for a field, write `{first} = {src.text[_bounds(head[1])[0] : end]}`"
    return SpecError(f"expected {want} after `{header}`", span, hint)


def _clip(text: str, keep: int = 24) -> str:
    """A long literal shortened for a message: `99999999…9999 (5000 characters)`."""
    return text if len(text) <= keep else f"{text[:8]}…{text[-4:]} ({len(text)} characters)"


def _line(item) -> int:
    return item.line if isinstance(item, Token) else item.meta.line


def _bad_token(src: Source, e: lark.UnexpectedToken) -> SpecError:
    tok = e.token
    if tok.type == "$END":
        span = _eof_span(src)
    else:
        span = Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1, src)
    stack = e.interactive_parser.parser_state.value_stack if e.interactive_parser else []
    cut = _cut_entry(src, stack, tok, set(e.expected))
    if cut:
        return cut
    if tok.type in ("LET", "MODEL", "TRUE", "FALSE") and "NAME" in e.expected:
        return SpecError(f"'{tok.value}' is a keyword and cannot be used as a name", span)
    prev = stack[-1] if stack else None
    if tok.type == "EQUAL" and isinstance(prev, Token) and prev.type in ("TRUE", "FALSE"):  # f(true = 1)
        return SpecError(f"'{prev.value}' is a keyword and cannot be used as a name", _span(src, prev))
    hint = None
    if "RBRACE" in e.expected and tok.type == "$END":
        hint = _unclosed_hint(src.text)
    elif tok.type == "MODEL":
        hint = "a file defines a single model"
    return SpecError(f"unexpected {_describe(tok)}; expected {_expected(e.expected)}", span, hint)


def parse_file(text: str, name: str = "<spec>") -> File:
    """Parse spec text into a syntax tree; raise SpecError with a position on bad syntax."""
    return _parse(text, name, "start")


def parse_calls(text: str, name: str = "<passes>") -> list[Call]:
    """Parse a list of calls, such as a pipeline of passes: `grow_mlp(hidden = 4096), add_layers(n = 2)`."""
    return _parse(text, name, "pass_list")


def _parse(text: str, name: str, start: str):
    src = Source(name, text)
    toks: list[Token] = []
    _comment_sink.append(toks)
    try:
        tree = _parser().parse(text, start=start)
    except lark.UnexpectedCharacters as e:
        raise _bad_characters(src, e) from None
    except lark.UnexpectedToken as e:
        raise _bad_token(src, e) from None
    except lark.UnexpectedEOF as e:
        raise SpecError(f"unexpected end of file; expected {_expected(e.expected)}", _eof_span(src)) from None
    except lark.LarkError as e:  # any other complaint of the parser: at the end of the text
        raise SpecError(f"cannot parse this text: {e}", _eof_span(src)) from None
    finally:
        _comment_sink.pop()
    comments = [Comment(t.line, t.column, str(t).rstrip()) for t in toks]
    _check_depth(src, tree)
    try:
        return _ToAst(src, comments).transform(tree)
    except lark.exceptions.VisitError as e:  # an error raised while building the tree, at the node it came from
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        span = _node_span(src, e.obj) if isinstance(e.obj, Tree) else _span(src, e.obj)
        raise SpecError(f"cannot read this: {e.orig_exc}", span) from None


NESTING = frozenset({"model", "block", "list", "call", "neg", "add", "sub", "mul", "div", "floordiv", "mod"})


def _check_depth(src: Source, tree: Tree) -> None:
    """Refuse nesting deeper than MAX_DEPTH (blocks, lists, calls, operators) before anything recurses over it."""
    stack: list[tuple[Tree, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in NESTING:
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"nesting is deeper than {MAX_DEPTH} levels (of blocks, lists, calls and operators)",
                                _node_span(src, node), "name the inner parts with `let` constants, or flatten them")
        stack.extend((c, depth) for c in node.children if isinstance(c, Tree))


@v_args(meta=True)
class _ToAst(Transformer_NonRecursive):
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

    def _name(self, tok: Token) -> str:
        """A name being defined (constant, field, block, argument), which may not be a keyword."""
        if tok in KEYWORDS:
            raise SpecError(f"'{tok}' is a keyword and cannot be used as a name", _span(self.src, tok))
        return str(tok)

    def pass_list(self, meta, items):
        return [i for i in items if isinstance(i, Call)]

    def let_stmt(self, meta, items):
        name, value = items
        return Let(self._name(name), value, _span(self.src, name))

    def model(self, meta, items):
        name, body = items
        header = Span(meta.line, meta.column, name.end_line, name.end_column, self.src)  # `model NAME`
        blk = Block("model", Name(_span(self.src, name), str(name)), body, header)
        blk.end_line = meta.end_line
        return blk

    def body(self, meta, items):
        return [i for i in items if isinstance(i, (Field, Block))]

    def field(self, meta, items):
        name, value = items
        return Field(self._name(name), value, _span(self.src, name))

    def block(self, meta, items):
        name, arg, body = items
        blk = Block(self._name(name), arg, body, _span(self.src, name))
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
        digits = str(t).replace("_", "").lstrip("0") or "0"
        if len(digits) > len(str(MAX_INT)) or int(digits) > MAX_INT:  # length first: int() of 5000 digits fails
            raise SpecError(f"number '{_clip(str(t))}' is too large", _span(self.src, t),
                            f"whole numbers go up to {MAX_INT} (2^63 - 1)")
        return Num(_span(self.src, t), int(digits), str(t))

    def float(self, meta, items):
        t = items[0]
        value = float(str(t).replace("_", ""))
        if value == float("inf"):
            raise SpecError(f"number '{_clip(str(t))}' is too large", _span(self.src, t),
                            "numbers go up to about 1.8e308")
        return Num(_span(self.src, t), value, str(t))

    def true(self, meta, items):
        return Bool(self._s(meta), True)

    def false(self, meta, items):
        return Bool(self._s(meta), False)

    def string(self, meta, items):
        t = items[0]
        return Str(_span(self.src, t), _unescape(t, self.src), str(t))

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
                raise SpecError("positional argument after a keyword argument", a.span,
                                "put positional arguments first, or name this one")
            else:
                pos.append(a)
        return Call(self._s(meta), str(name), pos, kw)

    def kwarg(self, meta, items):
        name, value = items
        return (self._name(name), value)

    def list(self, meta, items):
        return ListExpr(self._s(meta), [i for i in items if i is not None])
