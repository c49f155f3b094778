"""Two printers.

`format_spec(spec)`: the canonical text of a Spec. Every field is written out, per-layer
values collapse to one value when all layers agree; `parse(format_spec(s)) == s`.

`format_source(file)`: `mptc fmt`. Re-lays out the user's own text (constants, arithmetic
and comments kept) in the house style; formatting formatted text changes nothing.
"""

from __future__ import annotations

from . import spec as S
from . import syntax as ast

INDENT = "  "
MAX_INLINE = 88

# --- canonical spec printer --------------------------------------------------------


def _lit(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, S.Norm):
        args = f"eps = {_lit(x.eps)}" + (", bias = false" if x.kind == "layernorm" and not x.bias else "")
        return f"{x.kind}({args})"
    if x is None:
        return "none"
    if isinstance(x, tuple):
        return "[" + ", ".join(_lit(i) for i in x) + "]"
    if isinstance(x, S.Hyper):
        return f"lowrank(target = {x.target}, rank = {x.rank}, hidden = {x.hidden})"
    return str(x)


def _positions(p: S.Positions) -> str:
    return f"rope(theta = {_lit(p.theta)})" if p.kind == "rope" else p.kind


def _input(i: str | S.Patches | tuple) -> str:
    if isinstance(i, tuple):
        return "[" + ", ".join(_input(x) for x in i) + "]"
    if isinstance(i, S.Patches):
        return (f"patches(image = {i.image}, patch = {i.patch}, channels = {i.channels}, "
                f"cls = {_lit(i.cls)})")
    return i


def _str(x: str) -> str:
    """A string literal: quoted, with backslash, quote, line feed and tab escaped as the parser reads them."""
    return '"' + x.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def _task(t: S.Task) -> str:
    args = ([f"mix = {_str(t.mix)}"] if t.mix is not None else []) + \
        ([f"heads = {_str(t.heads)}"] if t.heads is not None else []) + ([f"skip = {_lit(t.skip)}"] if t.skip else [])
    return f"subnet({', '.join(args)})"


def _per_layer(values: list) -> str:
    if all(v == values[0] for v in values):
        return _lit(values[0])
    return "[" + ", ".join(_lit(v) for v in values) + "]"


def _block(head: str, fields: list[tuple[str, str]], depth: int) -> list[str]:
    pad = INDENT * depth
    inline = f"{pad}{head} {{ " + ", ".join(f"{k} = {v}" for k, v in fields) + " }"
    if not fields:
        return [f"{pad}{head} {{ }}"]
    if len(inline) <= MAX_INLINE:
        return [inline]
    return [f"{pad}{head} {{", *(f"{pad}{INDENT}{k} = {v}" for k, v in fields), f"{pad}}}"]


def format_spec(spec: S.Spec) -> str:
    out = [f"model {spec.name} {{"]
    if spec.vocab is not None:
        out.append(f"{INDENT}vocab = {spec.vocab}")
    if spec.context is not None:
        out.append(f"{INDENT}context = {spec.context}")
    if spec.conditions is not None:
        out.append(f"{INDENT}conditions = {spec.conditions}")
    out.append(f"{INDENT}width = {spec.width}")
    out.append(f"{INDENT}init = normal(std = {_lit(spec.init.std)})")
    e = spec.embed
    ef = [("input", _input(e.input)), ("positions", _positions(e.positions)), ("dropout", _lit(e.dropout)),
          ("norm", _lit(e.norm))]
    if e.segments:
        ef.append(("segments", str(e.segments)))
    if e.experts is not None:
        x = e.experts
        ef.append(("experts", f"moe(count = {x.count}, gate = {x.gate}" + (f", top = {x.top})" if x.top else ")")))
    for k in ("condition", "adaptive"):
        if getattr(e, k) is not None:
            ef.append((k, f"film(hidden = {getattr(e, k).hidden})"))
    if e.types:
        out += [f"{INDENT}embed {{", *(f"{INDENT * 2}{k} = {v}" for k, v in ef)]
        out += _block("types", [(t.name, str(t.size)) for t in e.types], 2)
        out.append(f"{INDENT}}}")
    else:
        out += _block("embed", ef, 1)
    ls = spec.layers
    out.append(f"{INDENT}layers {len(ls)} {{")
    for k in ("norm", "placement", "dropout"):
        out.append(f"{INDENT * 2}{k} = {_per_layer([getattr(layer, k) for layer in ls])}")
    for k in ("skippable", "modulate"):
        if any(getattr(layer, k) for layer in ls):
            out.append(f"{INDENT * 2}{k} = {_per_layer([getattr(layer, k) for layer in ls])}")
    if any(layer.hyper for layer in ls):
        out.append(f"{INDENT * 2}hyper = {_per_layer([layer.hyper for layer in ls])}")
    att = [layer.attention for layer in ls]
    keys = ["heads", "kv_heads", "head_dim", "value_dim", "mask", "bias", "out_bias", "dropout"]
    if any(a.rotary_dim not in (None, a.head_dim) for a in att):
        keys.append("rotary_dim")
    if any(a.window is not None for a in att):
        keys.append("window")
    if any(a.nested is not None for a in att):
        keys.append("nested")
    if any(a.qk_norm is not None for a in att):
        keys.append("qk_norm")
    out += _block("attention", [(k, _per_layer([getattr(a, k) for a in att])) for k in keys], 2)
    mlp = [layer.mlp for layer in ls]
    mkeys = ("hidden", "activation", "bias") + (("nested",) if any(m.nested for m in mlp) else ())
    out += _block("mlp", [(k, _per_layer([getattr(m, k) for m in mlp])) for k in mkeys], 2)
    out.append(f"{INDENT}}}")
    h = spec.head
    hf = [("norm", _lit(h.norm))]
    if h.kind == "lm":
        hf += [("tied", _lit(h.tied)), ("bias", _lit(h.bias))]
        if h.transform is not None:
            hf.append(("transform", f"dense(activation = {h.transform.activation}, norm = {_lit(h.transform.norm)})"))
    elif h.kind == "classify":
        hf += [("classes", str(h.classes)), ("pool", h.pool), ("pooler", _lit(h.pooler)), ("bias", _lit(h.bias))]
    out += _block(f"head {h.kind}", hf, 1)
    if spec.tasks:
        out += _block("tasks", [(t.name, _task(t)) for t in spec.tasks], 1)
    out.append("}")
    return "\n".join(out) + "\n"


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
