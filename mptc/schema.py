"""Give the syntax tree its meaning: fields, types, defaults, per-layer lists and checks.

Each block reads its fields through a `Fields` reader, which rejects unknown or repeated
names with a `did you mean` hint. Every error points at the offending value.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable
from typing import Any

from . import spec as S
from . import syntax as ast
from .choice import parse_choice
from .dims import MODULE_ATTRIBUTES
from .errors import MptcError, Span, SpecError, one_of, suggest
from .evaluate import CallValue, Sym, V, evaluate, evaluate_lets

# --- value converters: V -> python, errors at the value -----------------------------


def not_a(v: V, what: str, expected: str) -> SpecError:
    """`WHAT must be EXPECTED, got …`; a bare name where a number belongs is likely a misspelt constant."""
    got = v.value if isinstance(v.value, float) else v.kind
    hint = None
    if isinstance(v.value, Sym):
        hint = v.value.near or f"'{v.value.name}' is not a constant; define it with `let`"
    return SpecError(f"{what} must be {expected}, got {got}", v.span, hint)


def as_int(v: V, what: str, lo: int = 1, hi: int = S.MAX_INT) -> int:
    if isinstance(v.value, bool) or not isinstance(v.value, int):
        if isinstance(v.value, float) and v.value.is_integer():
            return as_int(V(int(v.value), v.span), what, lo, hi)
        raise not_a(v, what, "a whole number")
    if v.value < lo:
        raise SpecError(f"{what} must be at least {lo}, got {v.value}", v.span)
    if v.value > hi:
        raise SpecError(f"{what} must be at most {hi}, got {v.value}", v.span)
    return v.value


def as_float(v: V, what: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v.value, bool) or not isinstance(v.value, (int, float)):
        raise not_a(v, what, "a number")
    x = float(v.value)
    if not math.isfinite(x):  # evaluate refuses these; a value made in code is checked here too
        raise SpecError(f"{what} is not a finite number (it is {x})", v.span)
    if (lo is not None and x < lo) or (hi is not None and x >= hi):
        rng = f"in [{lo}, {hi})" if hi is not None else f"at least {lo}"
        raise SpecError(f"{what} must be {rng}, got {v.value}", v.span)
    return x


def as_prob(v: V, what: str) -> float:
    return as_float(v, what, 0.0, 1.0)


def as_pos_float(v: V, what: str) -> float:
    x = as_float(v, what)
    if x <= 0:
        raise SpecError(f"{what} must be positive, got {v.value}", v.span)
    return x


def as_bool(v: V, what: str) -> bool:
    if not isinstance(v.value, bool):
        raise SpecError(f"{what} must be true or false, got {v.kind}", v.span)
    return v.value


def as_choice(v: V, what: str, choices: tuple[str, ...]) -> str:
    name = v.value.name if isinstance(v.value, Sym) else None
    if name in choices:
        return name
    if name is None:
        raise SpecError(f"{what} must be one of {', '.join(choices)}; got {v.kind}", v.span)
    raise SpecError(f"unknown {what} '{name}'", v.span, suggest(name, choices) or one_of(choices))


def call_args(v: V, what: str, params: dict[str, Callable[[V], Any]], required: tuple[str, ...] = ()) -> dict:
    """Read a call's positional and keyword arguments by the order and names of `params`."""
    c: CallValue = v.value
    if len(c.args) > len(params):
        n = len(params)
        raise SpecError(f"{c.name}() takes at most {n} argument{'s' if n > 1 else ''}", c.args[n].span,
                        f"its arguments are {', '.join(params)}")
    got: dict[str, V] = dict(zip(params, c.args, strict=False))
    for k, a in c.kwargs.items():
        if k not in params:
            raise SpecError(
                f"unknown argument '{k}' for {c.name}()", a.span, suggest(k, list(params)) or one_of(tuple(params))
            )
        if k in got:
            raise SpecError(f"argument '{k}' given twice", a.span)
        got[k] = a
    for r in required:
        if r not in got:
            raise SpecError(f"{c.name}() needs `{r} = …`", v.span, f"write {c.name}({r} = …)")
    return {k: params[k](a) for k, a in got.items()}


def as_norm(v: V, what: str = "norm", allow_none: bool = False) -> S.Norm | None:
    kinds = S.NORMS + (("none",) if allow_none else ())
    if isinstance(v.value, Sym):
        kind = as_choice(v, what, kinds)
        return None if kind == "none" else S.Norm(kind)
    if isinstance(v.value, CallValue) and v.value.name in S.NORMS:
        kind = v.value.name
        params = {"eps": lambda a: as_pos_float(a, "eps")}
        if kind == "layernorm":
            params["bias"] = lambda a: as_bool(a, "bias")
        return S.Norm(kind, **call_args(v, what, params))
    if isinstance(v.value, CallValue):
        raise SpecError(f"unknown {what} '{v.value.name}'", v.span, suggest(v.value.name, kinds) or one_of(kinds))
    raise SpecError(f"{what} must be one of {', '.join(kinds)}; got {v.kind}", v.span)


def as_positions(v: V) -> S.Positions:
    if isinstance(v.value, CallValue) and v.value.name == "rope":
        p = S.Positions("rope", **call_args(v, "positions", {"theta": lambda a: as_pos_float(a, "theta"),
                                                              "scaling": as_rope_scaling}))
        if p.scaling is not None and p.scaling.kind == "yarn" and p.theta <= 1:
            raise SpecError(f"yarn scaling needs theta > 1, got {p.theta}", v.span,
                            "its ramp is measured in rotations of theta^(2j/R)")
        return p
    if isinstance(v.value, CallValue) and v.value.name == "learned":
        skip = {"skip_padding": lambda a: as_bool(a, "skip_padding")}
        return S.Positions("learned", **call_args(v, "positions", skip))
    if isinstance(v.value, CallValue):
        name = v.value.name
        raise SpecError(f"unknown positions '{name}'", v.span, suggest(name, S.POSITIONS) or one_of(S.POSITIONS))
    return S.Positions(as_choice(v, "positions", S.POSITIONS))


def _at_least_one(v: V, what: str) -> float:
    x = as_float(v, what)
    if x < 1:
        raise SpecError(f"{what} must be at least 1, got {v.value}", v.span, "a scaling factor stretches the context")
    return x


def as_rope_scaling(v: V) -> S.RopeScaling | None:
    """`linear(factor = 8)`, `dynamic(factor = 2, original = 2048)`, `llama3(factor = 8, low = 1, high = 4,
    original = 8192)`, `yarn(factor = 4, original = 32768, beta_fast = 32, beta_slow = 1, attention = …)`."""
    if _is_none(v):
        return None
    kinds = S.ROPE_SCALINGS
    if not isinstance(v.value, CallValue):
        if isinstance(v.value, Sym) and v.value.name in kinds:
            raise SpecError(f"{v.value.name} scaling needs its factor", v.span, f"write {v.value.name}(factor = …)")
        raise SpecError(f"scaling must be one of {', '.join(kinds)} (called with its arguments) or none, got {v.kind}",
                        v.span, "write scaling = linear(factor = 4.0)")
    kind = v.value.name
    if kind not in kinds:
        raise SpecError(f"unknown rope scaling '{kind}'", v.span, suggest(kind, kinds) or one_of(kinds))
    convs = {
        "factor": lambda a: _at_least_one(a, "factor"),
        "original": lambda a: as_int(a, "original", lo=2),
        "low": lambda a: as_pos_float(a, "low"),
        "high": lambda a: as_pos_float(a, "high"),
        "beta_fast": lambda a: as_pos_float(a, "beta_fast"),
        "beta_slow": lambda a: as_pos_float(a, "beta_slow"),
        "attention": lambda a: as_pos_float(a, "attention"),
        "truncate": lambda a: as_bool(a, "truncate"),
        "short": lambda a: _factors(a, "short"),
        "long": lambda a: _factors(a, "long"),
    }
    names = S.ROPE_SCALING_ARGS[kind]
    required = {"linear": ("factor",), "longrope": ("factor", "original", "short", "long")}.get(kind,
                                                                                            ("factor", "original"))
    args = call_args(v, "scaling", {k: convs[k] for k in names}, required=required)
    f = args["factor"]
    if kind == "yarn" and "attention" not in args:  # transformers' default: 0.1·ln(factor) + 1
        args["attention"] = 0.1 * math.log(f) + 1.0 if f > 1 else 1.0
    if kind == "longrope" and "attention" not in args:  # transformers' default: √(1 + ln(factor) / ln(original))
        args["attention"] = math.sqrt(1 + math.log(f) / math.log(args["original"])) if f > 1 else 1.0
    sc = S.RopeScaling(kind, **args)
    if kind == "llama3" and sc.high <= sc.low:
        raise SpecError(f"llama3 scaling needs high > low, got low = {sc.low}, high = {sc.high}", v.span,
                        "Llama 3.1 uses low = 1.0, high = 4.0")
    if kind == "yarn" and sc.beta_fast <= sc.beta_slow:
        raise SpecError(f"yarn scaling needs beta_fast > beta_slow, got {sc.beta_fast} and {sc.beta_slow}", v.span,
                        "the defaults are beta_fast = 32, beta_slow = 1")
    return sc


def _factors(v: V, what: str) -> tuple[float, ...]:
    """longrope's per-frequency divisors: a list of positive numbers, one per rotated pair of dims."""
    if not isinstance(v.value, list) or not v.value:
        raise SpecError(f"{what} must be a list of positive numbers, one per pair of rotated dims, got {v.kind}",
                        v.span)
    return tuple(as_pos_float(i, f"a {what} factor") for i in v.value)


def as_embed_scale(v: V) -> float | str | None:
    """`scale = sqrt_width` (× √D, Gemma), a positive number, or none."""
    if _is_none(v):
        return None
    if isinstance(v.value, Sym):
        if v.value.name == "sqrt_width":
            return "sqrt_width"
        raise SpecError(f"unknown embedding scale '{v.value.name}'", v.span,
                        suggest(v.value.name, ("sqrt_width",)) or "write scale = sqrt_width, or a number")
    return as_pos_float(v, "scale")


def as_softcap(v: V, what: str) -> float | None:
    if _is_none(v):
        return None
    return as_pos_float(v, what)


def as_input(v: V) -> str | S.Patches | tuple:
    if isinstance(v.value, list):  # multi-modal: [patches(…), tokens], concatenated in this order
        parts = tuple(as_input(i) for i in v.value)
        kinds = sorted("tokens" if p == "tokens" else "patches" for p in parts)
        if kinds != ["patches", "tokens"]:
            raise SpecError("a multi-modal input lists one patches(…) and tokens", v.span,
                            "write input = [patches(image = 224, patch = 16), tokens]")
        return parts
    if isinstance(v.value, CallValue) and v.value.name == "patches":
        args = call_args(
            v,
            "input",
            {
                "image": lambda a: as_int(a, "image"),
                "patch": lambda a: as_int(a, "patch"),
                "channels": lambda a: as_int(a, "channels"),
                "cls": lambda a: as_bool(a, "cls"),
                "distill": lambda a: as_bool(a, "distill"),
            },
            required=("image", "patch"),
        )
        p = S.Patches(**args)
        if p.distill and not p.cls:
            raise SpecError("a distillation token sits after the class token", v.span,
                            "set cls = true (DeiT has both), or distill = false")
        if p.image % p.patch:
            raise SpecError(f"image size {p.image} is not a multiple of patch size {p.patch}", v.span)
        return p
    choice = as_choice(v, "input", ("tokens", "patches"))
    if choice == "patches":
        raise SpecError("patches need their sizes", v.span, "write patches(image = 224, patch = 16, channels = 3)")
    return choice


def _is_none(v: V) -> bool:
    return isinstance(v.value, Sym) and v.value.name == "none"


def as_transform(v: V) -> S.Transform | None:
    if _is_none(v):
        return None
    if isinstance(v.value, CallValue) and v.value.name == "dense":
        return S.Transform(**call_args(v, "transform", {
            "activation": lambda a: as_choice(a, "activation", S.PLAIN_ACTIVATIONS),
            "norm": lambda a: as_norm(a, "norm", allow_none=True),
        }))
    raise SpecError(f"transform must be dense(activation = …, norm = …) or none, got {v.kind}", v.span,
                    "write transform = dense(activation = gelu, norm = layernorm(eps = 1e-12))")


def as_init(v: V) -> S.Init:
    if isinstance(v.value, CallValue) and v.value.name == "normal":
        return S.Init(**call_args(v, "init", {"std": lambda a: as_pos_float(a, "std")}))
    raise SpecError(f"init must be normal(std = …), got {v.kind}", v.span)


# --- block reader ---------------------------------------------------------------------


class Fields:
    """The entries of one block, taken by name; what is left over is an error."""

    def __init__(self, block: ast.Block, env: dict[str, V], where: str, fields: tuple, blocks: tuple = ()):
        self.block, self.env, self.where = block, env, where
        self.names = tuple(fields) + tuple(blocks)
        self.fields: dict[str, tuple[ast.Field, V]] = {}
        self.blocks: dict[str, ast.Block] = {}
        for e in block.body:
            first = self.fields[e.name][0] if e.name in self.fields else self.blocks.get(e.name)
            if first is not None:
                raise SpecError(f"'{e.name}' is set twice in {where}", e.span,
                                f"it is first set on line {first.span.line}")
            if isinstance(e, ast.Field):
                if e.name not in fields:
                    self._unknown(e, "field", blocks if e.name in blocks else None)
                self.fields[e.name] = (e, evaluate(e.value, env))
            else:
                if e.name not in blocks:
                    self._unknown(e, "block", fields if e.name in fields else None)
                self.blocks[e.name] = e

    def _unknown(self, e, kind: str, other: tuple | None) -> None:
        if other is not None:
            shape = f"{e.name} {{ … }}" if kind == "field" else f"{e.name} = …"
            actual = "block" if kind == "field" else "field"
            raise SpecError(f"'{e.name}' is a {actual} here", e.span, f"write `{shape}`")
        raise SpecError(
            f"unknown {kind} '{e.name}' in {self.where}", e.span, suggest(e.name, self.names) or one_of(self.names)
        )

    def get(self, name: str) -> V | None:
        f = self.fields.get(name)
        return f[1] if f else None

    def take(self, name: str, conv: Callable[[V], Any], default: Any = None) -> Any:
        v = self.get(name)
        return default if v is None else conv(v)

    def need(self, name: str, conv: Callable[[V], Any]) -> Any:
        v = self.get(name)
        if v is None:
            raise SpecError(f"{self.where} needs `{name} = …`", self.block.span)
        return conv(v)


class PerLayer:
    """Per-layer fields: a single value, or a list with one value per layer."""

    def __init__(self, fields: Fields, n: int, path: str, spans: dict):
        self.f, self.n, self.path, self.spans = fields, n, path, spans

    def take(self, name: str, conv: Callable[[V], Any], default: Any = None, listy: bool = False) -> list:
        """`listy`: the field's own value is a list, so only a list of lists is per layer."""
        v = self.f.get(name)
        if v is None:
            return [default(i) if callable(default) else default for i in range(self.n)]
        self.spans[f"{self.path}.{name}"] = v
        per_layer = isinstance(v.value, list) and (not listy or _nested_list(v))
        if per_layer:
            if len(v.value) != self.n:
                raise SpecError(
                    f"'{name}' lists {_count(len(v.value), 'value')} but there {'is' if self.n == 1 else 'are'} "
                    f"{_count(self.n, 'layer')}",
                    v.span,
                    "give one value per layer, or a single value for all of them",
                )
            return [conv(i) for i in v.value]
        x = conv(v)
        return [x] * self.n


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def layer_span(spans: dict, path: str, layer: int, fallback: Span) -> Span:
    """The span of a per-layer value at `layer` (the list item when it is a list)."""
    v = spans.get(path)
    if v is None:
        return fallback
    if isinstance(v.value, list):
        return v.value[layer].span
    return v.span


# --- the model ---------------------------------------------------------------------------

MODEL_FIELDS = ("vocab", "context", "width", "init", "conditions")
MODEL_BLOCKS = ("embed", "layers", "head", "tasks")
EMBED_FIELDS = ("input", "positions", "dropout", "norm", "segments", "experts", "condition", "adaptive", "scale")
LAYER_FIELDS = ("norm", "placement", "dropout", "skippable", "modulate", "hyper", "parallel", "shared_norm")
ATTN_FIELDS = ("heads", "kv_heads", "head_dim", "value_dim", "mask", "bias", "out_bias", "dropout", "rotary_dim",
               "window", "nested", "qk_norm", "softcap", "scale", "qk_norm_over", "rope")
MLP_FIELDS = ("hidden", "activation", "bias", "nested", "experts", "top_k", "normalize", "shared", "shared_gate")
HEAD_FIELDS = {
    "lm": ("norm", "tied", "bias", "transform", "softcap"),
    "classify": ("norm", "classes", "pool", "pooler", "bias"),
    "span": ("norm", "bias"),
    "none": ("norm",),
}


def to_spec(file: ast.File) -> S.Spec:
    env = evaluate_lets(file.lets)
    m = file.model
    name = m.arg.name  # type: ignore[union-attr]
    f = Fields(m, env, f"model '{name}'", MODEL_FIELDS, MODEL_BLOCKS)
    spans: dict[str, Any] = {"model": V(Sym(name), m.span)}
    for k in MODEL_FIELDS:
        if f.get(k) is not None:
            spans[k] = f.get(k)

    width = f.need("width", lambda v: as_int(v, "width"))
    vocab = f.take("vocab", lambda v: as_int(v, "vocab"))
    context = f.take("context", lambda v: as_int(v, "context"))
    init = f.take("init", as_init, S.Init())
    conditions = f.take("conditions", lambda v: as_int(v, "conditions"))
    embed = _embed(f.blocks.get("embed"), env, spans)
    if "layers" not in f.blocks:
        raise SpecError(f"model '{name}' has no `layers N {{ … }}` block", m.span)
    layers = _layers(f.blocks["layers"], env, width, spans, embed.positions.kind == "rope")
    if "head" not in f.blocks:
        raise SpecError(f"model '{name}' has no `head … {{ … }}` block", m.span, "write `head lm { … }`, "
                        "`head classify { classes = … }` or `head none { }`")
    head = _head(f.blocks["head"], env, spans)
    tasks = _tasks(f.blocks["tasks"], env, spans) if "tasks" in f.blocks else ()
    spec = S.Spec(name, width, tuple(layers), head, vocab=vocab, context=context, conditions=conditions,
                  embed=embed, init=init, tasks=tasks, spans=spans)
    _check(spec, m, spans)
    return spec


def _embed(b: ast.Block | None, env: dict, spans: dict) -> S.Embed:
    if b is None:
        return S.Embed()
    if b.arg is not None:
        raise SpecError("`embed` takes no argument", b.arg.span)
    f = Fields(b, env, "embed", EMBED_FIELDS, ("types",))
    for k in EMBED_FIELDS:
        if f.get(k) is not None:
            spans[f"embed.{k}"] = f.get(k)
    if "types" in f.blocks:
        spans["embed.types"] = f.blocks["types"]
    return S.Embed(
        input=f.take("input", as_input, "tokens"),
        positions=f.take("positions", as_positions, S.Positions()),
        dropout=f.take("dropout", lambda v: as_prob(v, "dropout"), 0.0),
        norm=f.take("norm", lambda v: as_norm(v, "norm", allow_none=True)),
        segments=f.take("segments", lambda v: as_int(v, "segments", lo=0), 0),
        types=_types(f.blocks["types"], env) if "types" in f.blocks else (),
        experts=f.take("experts", as_experts),
        condition=f.take("condition", lambda v: as_film(v, "condition")),
        adaptive=f.take("adaptive", lambda v: as_film(v, "adaptive")),
        scale=f.take("scale", as_embed_scale),
    )


def _types(b: ast.Block, env: dict) -> tuple[S.TokenType, ...]:
    """`types { text = 256, image = 1024 }`: named, consecutive id ranges with their sizes."""
    _no_arg(b)
    out, seen = [], set()
    for e in b.body:
        if isinstance(e, ast.Block):
            raise SpecError(f"'{e.name}' in types must be a size", e.span, f"write `{e.name} = 256`")
        if e.name in seen:
            raise SpecError(f"token type '{e.name}' is declared twice", e.span)
        seen.add(e.name)
        _parameter_name(e.name, e.span)
        out.append(S.TokenType(e.name, as_int(evaluate(e.value, env), f"the size of token type '{e.name}'")))
    if not out:
        raise SpecError("types needs at least one `name = size`", b.span)
    return tuple(out)


def _parameter_name(name: str, span: Span) -> None:
    """A token type's name becomes part of a parameter's name (`embed.types.NAME.weight`), so it must be
    usable as a module attribute: not a Python keyword, nor a name a torch module already has."""
    if keyword.iskeyword(name) or name in MODULE_ATTRIBUTES:
        raise SpecError(f"'{name}' cannot name a token type: it is reserved in the parameter names", span,
                        f"choose another name, such as '{name}_tokens'")


def as_film(v: V, what: str) -> S.Film | None:
    if _is_none(v):
        return None
    if isinstance(v.value, CallValue) and v.value.name == "film":
        return S.Film(**call_args(v, what, {"hidden": lambda a: as_int(a, "hidden")}, required=("hidden",)))
    raise SpecError(f"{what} must be film(hidden = …) or none, got {v.kind}", v.span,
                    f"write {what} = film(hidden = 32)")


def as_hyper(v: V) -> S.Hyper | None:
    if _is_none(v):
        return None
    if isinstance(v.value, CallValue) and v.value.name == "lowrank":
        targets = tuple(S.HYPER_TARGETS)
        return S.Hyper(**call_args(v, "hyper", {
            "target": lambda a: as_choice(a, "target", targets),
            "rank": lambda a: as_int(a, "rank"),
            "hidden": lambda a: as_int(a, "hidden"),
        }, required=("target",)))
    raise SpecError(f"hyper must be lowrank(target = …, rank = …, hidden = …) or none, got {v.kind}", v.span,
                    "write hyper = lowrank(target = q, rank = 4, hidden = 32)")


def _tasks(b: ast.Block, env: dict, spans: dict) -> tuple[S.Task, ...]:
    """`tasks { chat = "xl", fast = subnet(mix = "s,s,m", heads = l, skip = [2]) }`."""
    _no_arg(b)
    out, seen = [], {}
    for e in b.body:
        if isinstance(e, ast.Block):
            raise SpecError(f"'{e.name}' in tasks must be a sub-network", e.span, f'write `{e.name} = "s,m,l"`')
        if e.name in seen:
            raise SpecError(f"task '{e.name}' is declared twice", e.span)
        v = evaluate(e.value, env)
        seen[e.name] = spans[f"tasks.{e.name}"] = v
        if isinstance(v.value, (str, Sym)):
            out.append(S.Task(e.name, mix=v.value if isinstance(v.value, str) else v.value.name))
            continue
        if not (isinstance(v.value, CallValue) and v.value.name == "subnet"):
            raise SpecError(f"task '{e.name}' must be a granularity string or subnet(mix = …, heads = …, "
                            f"skip = […]), got {v.kind}", v.span)
        args = call_args(v, "task", {
            "mix": lambda a: _granularity_text(a), "heads": lambda a: _granularity_text(a),
            "skip": lambda a: tuple(as_int(i, "a layer index", lo=0) for i in _as_list(a, "skip")),
        })
        out.append(S.Task(e.name, **args))
    return tuple(out)


def _granularity_text(v: V) -> str:
    if isinstance(v.value, str):
        return v.value
    if isinstance(v.value, Sym):
        return v.value.name
    raise SpecError(f"a granularity must be a name (s, m, l, xl) or a string like \"s,s,m\", got {v.kind}", v.span)


def _as_list(v: V, what: str) -> list[V]:
    if not isinstance(v.value, list):
        raise SpecError(f"{what} must be a list, got {v.kind}", v.span)
    return v.value


def as_experts(v: V) -> S.Experts | None:
    if _is_none(v):
        return None
    if isinstance(v.value, CallValue) and v.value.name == "moe":
        return S.Experts(**call_args(v, "experts", {
            "count": lambda a: as_int(a, "count", lo=2),
            "gate": lambda a: as_choice(a, "gate", ("token", "condition")),
            "top": lambda a: as_int(a, "top"),
        }, required=("count",)))
    raise SpecError(f"experts must be moe(count = …, gate = token | condition, top = k) or none, got {v.kind}",
                    v.span, "write experts = moe(count = 4, gate = token, top = 2)")


def as_fractions(v: V) -> tuple[float, ...] | None:
    """Nested granularities: increasing fractions in (0, 1] ending at 1, e.g. [1/8, 1/4, 1/2, 1]."""
    if _is_none(v):
        return None
    if not isinstance(v.value, list) or not v.value:
        raise SpecError(f"nested must be a list of fractions such as [1/8, 1/4, 1/2, 1], got {v.kind}", v.span)
    out = [as_float(i, "a nested granularity") for i in v.value]
    for i, x in zip(v.value, out, strict=True):
        if not 0 < x <= 1:
            raise SpecError(f"a nested granularity must be in (0, 1], got {i.value}", i.span)
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise SpecError("nested granularities must increase", v.span, "write them smallest first: [1/8, 1/4, 1/2, 1]")
    if out[-1] != 1:
        raise SpecError("the last nested granularity must be 1 (the whole layer)", v.value[-1].span)
    return tuple(out)


def _nested_list(v: V) -> bool:
    """A list-valued field given per layer: a list holding lists (or `none`s)."""
    return isinstance(v.value, list) and any(isinstance(i.value, list) for i in v.value)


def _listy_span(spans: dict, path: str, layer: int, fallback: Span) -> Span:
    """The span of a list-valued per-layer field at `layer`: the inner list when given per layer."""
    v = spans.get(path)
    if v is None:
        return fallback
    if _nested_list(v):
        return v.value[layer].span
    return v.span


def _check_levels(levels: tuple[float, ...] | None, n: int, what: str, span: Span) -> None:
    for f in levels or ():
        if abs(n * f - round(n * f)) > 1e-9 or round(n * f) < 1:
            raise SpecError(f"granularity {f:g} of {n} {what} is not a whole number ({n * f:g})", span,
                            f"choose fractions k/{n} so that every level keeps whole {what}")


def _no_arg(b: ast.Block) -> None:
    if b.arg is not None:
        raise SpecError(f"`{b.name}` takes no argument", b.arg.span, f"write `{b.name} {{ … }}`")


def _layers(b: ast.Block, env: dict, width: int, spans: dict, rope: bool) -> list[S.Layer]:
    if b.arg is None:
        raise SpecError("`layers` needs a count", b.span, "write `layers 12 { … }`")
    count = evaluate(b.arg, env)
    n = as_int(count, "the number of layers")
    if n > S.MAX_LAYERS:  # before any per-layer value is expanded
        raise SpecError(f"a model has at most {S.MAX_LAYERS} layers, got {n}", count.span,
                        "a per-layer list has exactly one value per layer")
    spans["layers"] = count
    lf = Fields(b, env, "layers", LAYER_FIELDS, ("attention", "mlp"))
    pl = PerLayer(lf, n, "layers", spans)
    norm = pl.take("norm", as_norm, S.Norm("layernorm"))
    placement = pl.take("placement", lambda v: as_choice(v, "placement", S.PLACEMENTS), "pre")
    dropout = pl.take("dropout", lambda v: as_prob(v, "dropout"), 0.0)
    skippable = pl.take("skippable", lambda v: as_bool(v, "skippable"), False)
    modulate = pl.take("modulate", lambda v: as_bool(v, "modulate"), False)
    hyper = pl.take("hyper", as_hyper, None)
    parallel = pl.take("parallel", lambda v: as_bool(v, "parallel"), False)
    shared = pl.take("shared_norm", lambda v: as_bool(v, "shared_norm"), False)
    _check_parallel(placement, parallel, shared, spans, b.span)

    ab = lf.blocks.get("attention")
    if ab is None:
        raise SpecError("`layers` needs an `attention { heads = … }` block", b.span)
    _no_arg(ab)
    af = PerLayer(Fields(ab, env, "attention", ATTN_FIELDS), n, "layers.attention", spans)
    if af.f.get("heads") is None:
        raise SpecError("attention needs `heads = …`", ab.span)
    heads = af.take("heads", lambda v: as_int(v, "heads"))
    kv = af.take("kv_heads", lambda v: as_int(v, "kv_heads"), lambda i: heads[i])
    hd_given = af.f.get("head_dim") is not None
    head_dim = af.take("head_dim", lambda v: as_int(v, "head_dim"), lambda i: width // heads[i])
    value_dim = af.take("value_dim", lambda v: as_int(v, "value_dim"), lambda i: head_dim[i])
    mask = af.take("mask", lambda v: as_choice(v, "mask", S.MASKS), "causal")
    bias = af.take("bias", lambda v: as_bool(v, "bias"), True)
    out_bias = af.take("out_bias", lambda v: as_bool(v, "out_bias"), lambda i: bias[i])
    adrop = af.take("dropout", lambda v: as_prob(v, "dropout"), 0.0)
    rot_v = af.f.get("rotary_dim")
    if rot_v is not None and not rope:
        raise SpecError("rotary_dim needs rotary positions", rot_v.span,
                        "set `embed { positions = rope(theta = …) }`, or remove rotary_dim")
    rotary = af.take("rotary_dim", lambda v: as_int(v, "rotary_dim"), lambda i: head_dim[i] if rope else None)
    window = af.take("window", lambda v: None if _is_none(v) else as_int(v, "window"), None)
    qk_norm = af.take("qk_norm", lambda v: as_norm(v, "qk_norm", allow_none=True), None)
    softcap = af.take("softcap", lambda v: as_softcap(v, "softcap"), None)
    ascale = af.take("scale", lambda v: None if _is_none(v) else as_pos_float(v, "scale"), None)
    qk_over = af.take("qk_norm_over", lambda v: as_choice(v, "qk_norm_over", ("head", "all")), "head")
    lrope = af.take("rope", lambda v: _layer_rope(v, rope), None)
    for i in range(n):
        if rotary[i] is not None and rotary[i] > head_dim[i]:
            raise SpecError(f"rotary_dim = {rotary[i]} exceeds head_dim = {head_dim[i]} in layer {i}",
                            layer_span(spans, "layers.attention.rotary_dim", i, ab.span))
        hspan = layer_span(spans, "layers.attention.heads", i, ab.span)
        if not hd_given and width % heads[i]:
            raise SpecError(
                f"width {width} is not divisible by heads = {heads[i]}",
                hspan,
                "set `head_dim` explicitly, or use a number of heads that divides the width",
            )
        if heads[i] % kv[i]:
            raise SpecError(
                f"kv_heads = {kv[i]} does not divide heads = {heads[i]}",
                layer_span(spans, "layers.attention.kv_heads", i, ab.span),
                f"each kv head serves a whole group of query heads; use {_divisors(heads[i])}",
            )

    mb = lf.blocks.get("mlp")
    if mb is None:
        raise SpecError("`layers` needs an `mlp { hidden = … }` block", b.span)
    _no_arg(mb)
    mf = PerLayer(Fields(mb, env, "mlp", MLP_FIELDS), n, "layers.mlp", spans)
    hidden = mf.take("hidden", lambda v: as_int(v, "hidden"), 4 * width)
    act = mf.take("activation", lambda v: as_choice(v, "activation", S.ACTIVATIONS), "gelu")
    mbias = mf.take("bias", lambda v: as_bool(v, "bias"), True)
    mnest = mf.take("nested", as_fractions, None, listy=True)
    moe = _moe_fields(mf, n, mnest, spans, mb.span)
    anest = af.take("nested", as_fractions, None, listy=True)
    for i in range(n):
        if qk_over[i] == "all" and (qk_norm[i] is None or anest[i] is not None):
            why = "needs a qk_norm" if qk_norm[i] is None else "cannot be nested: its gain covers every head"
            raise SpecError(f"layer {i}: qk_norm_over = all {why}",
                            layer_span(spans, "layers.attention.qk_norm_over", i, ab.span),
                            "set qk_norm = rmsnorm(…)" if qk_norm[i] is None else "use qk_norm_over = head")
        _check_levels(mnest[i], hidden[i], "hidden units", _listy_span(spans, "layers.mlp.nested", i, mb.span))
        _check_levels(anest[i], kv[i], "kv head groups", _listy_span(spans, "layers.attention.nested", i, ab.span))

    return [
        S.Layer(
            attention=S.Attention(heads[i], kv[i], head_dim[i], value_dim[i], mask[i], bias[i], out_bias[i], adrop[i],
                                  rotary[i], window[i], anest[i], qk_norm[i], softcap[i], ascale[i],
                                  qk_norm_over=qk_over[i], rope=lrope[i]),
            mlp=S.MLP(hidden[i], act[i], mbias[i], mnest[i], *moe[i]),
            norm=norm[i],
            placement=placement[i],
            dropout=dropout[i],
            skippable=skippable[i],
            modulate=modulate[i],
            hyper=hyper[i],
            parallel=parallel[i],
            shared_norm=shared[i],
        )
        for i in range(n)
    ]


def _layer_rope(v: V, rope: bool) -> S.Positions | None:
    """A layer's own `rope(theta = …, scaling = …)` (Gemma 3: local and global layers), or none."""
    if _is_none(v):
        return None
    if not rope:
        raise SpecError("a layer's rope needs rotary positions", v.span,
                        "set `embed { positions = rope(theta = …) }`, or remove the layer's rope")
    p = as_positions(v)
    if p.kind != "rope":
        raise SpecError(f"a layer's rope must be rope(theta = …, scaling = …), got {p.kind}", v.span)
    return p


def _check_parallel(placement: list[str], parallel: list[bool], shared: list[bool], spans: dict, fallback: Span
                    ) -> None:
    """A parallel layer has pre-norms (its sublayers read the same input); a shared norm needs a parallel layer."""
    for i, (pl, par, sh) in enumerate(zip(placement, parallel, shared, strict=True)):
        if par and pl != "pre":
            raise SpecError(f"layer {i} is parallel, so its norms sit before the sublayers: placement must be pre, "
                            f"got {pl}", layer_span(spans, "layers.placement", i, fallback),
                            "GPT-NeoX, Falcon and Phi-2 use placement = pre with parallel = true")
        if sh and not par:
            raise SpecError(f"shared_norm needs parallel = true (layer {i} is sequential)",
                            layer_span(spans, "layers.shared_norm", i, fallback),
                            "a sequential layer normalises each sublayer's own input; set parallel = true")


def _moe_fields(mf: PerLayer, n: int, nested: list, spans: dict, fallback: Span) -> list[tuple]:
    """Per layer (experts, top_k, normalize, shared, shared_gate) of a mixture-of-experts MLP; a dense
    layer (experts = none) takes none of the other fields."""
    experts = mf.take("experts", lambda v: None if _is_none(v) else as_int(v, "experts"), None)
    top_k = mf.take("top_k", lambda v: None if _is_none(v) else as_int(v, "top_k"), None)
    normalize = mf.take("normalize", lambda v: as_bool(v, "normalize"), True)
    shared = mf.take("shared", lambda v: None if _is_none(v) else as_int(v, "shared"), None)
    sgate = mf.take("shared_gate", lambda v: as_bool(v, "shared_gate"), False)
    out = []
    for i in range(n):
        def at(key: str, i: int = i) -> Span:
            return layer_span(spans, f"layers.mlp.{key}", i, fallback)

        e = experts[i]
        if e is None:
            for key, v in (("top_k", top_k[i]), ("shared", shared[i]), ("shared_gate", sgate[i] or None),
                           ("normalize", None if normalize[i] else False)):
                if v is not None:
                    raise SpecError(f"{key} applies to a mixture-of-experts MLP, and layer {i}'s has no experts",
                                    at(key), "set `experts = N` in the mlp block, or remove " + key)
            out.append((None, None, True, None, False))
            continue
        k = top_k[i] if top_k[i] is not None else min(2, e)
        if k > e:
            raise SpecError(f"top_k = {k} exceeds experts = {e} in layer {i}", at("top_k"),
                            f"route each token to at most {e} experts")
        if nested[i]:
            raise SpecError(f"layer {i}: a mixture-of-experts MLP cannot be nested (MatFormer)", at("nested"),
                            "remove `nested`, or `experts`")
        if sgate[i] and shared[i] is None:
            raise SpecError("shared_gate gates the shared expert, and there is none", at("shared_gate"),
                            "add `shared = N` (its hidden size), or remove shared_gate")
        out.append((e, k, normalize[i], shared[i], sgate[i]))
    return out


def _divisors(n: int) -> str:
    """`one of 1, 2, 4` for a small n (found up to √n, so this stays fast); `a divisor of n` beyond 10^8."""
    if n > 10**8:
        return f"a divisor of {n}"
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return "one of " + ", ".join(str(d) for d in sorted({*small, *(n // d for d in small)}))


def _head(b: ast.Block, env: dict, spans: dict) -> S.Head:
    if b.arg is None:
        raise SpecError("`head` needs a kind", b.span,
                        "write `head lm { … }`, `head classify { … }` or `head none { }`")
    arg = evaluate(b.arg, env)
    extra: dict[str, V] = {}
    if isinstance(arg.value, CallValue):  # head classify(classes = 10) { … }
        extra = dict(arg.value.kwargs)
        if arg.value.args:
            raise SpecError("head arguments are named", arg.value.args[0].span, "write classify(classes = 10)")
        arg = V(Sym(arg.value.name), arg.span)
    kind = as_choice(arg, "head", S.HEADS)
    f = Fields(b, env, f"head {kind}", HEAD_FIELDS[kind])
    for k, v in extra.items():
        if k not in HEAD_FIELDS[kind]:
            raise SpecError(f"unknown argument '{k}' for head {kind}", v.span,
                            suggest(k, HEAD_FIELDS[kind]) or one_of(HEAD_FIELDS[kind]))
        if k in f.fields:
            raise SpecError(f"'{k}' is set twice in head {kind}", v.span)
        f.fields[k] = (None, v)  # type: ignore[assignment]
    for k in HEAD_FIELDS[kind]:
        if f.get(k) is not None:
            spans[f"head.{k}"] = f.get(k)
    spans["head"] = arg
    norm = f.take("norm", lambda v: as_norm(v, "norm", allow_none=True))
    if kind == "lm":
        return S.Head("lm", norm, tied=f.take("tied", lambda v: as_bool(v, "tied"), False),
                      bias=f.take("bias", lambda v: as_bool(v, "bias"), False),
                      transform=f.take("transform", as_transform),
                      softcap=f.take("softcap", lambda v: as_softcap(v, "softcap")))
    if kind == "classify":
        return S.Head(
            "classify",
            norm,
            bias=f.take("bias", lambda v: as_bool(v, "bias"), True),
            classes=f.need("classes", lambda v: as_int(v, "classes")),
            pool=f.take("pool", lambda v: as_choice(v, "pool", S.POOLS), "first"),
            pooler=f.take("pooler", lambda v: as_bool(v, "pooler"), False),
        )
    if kind == "span":
        return S.Head("span", norm, bias=f.take("bias", lambda v: as_bool(v, "bias"), True), classes=2)  # start, end
    return S.Head("none", norm)


def _check(spec: S.Spec, m: ast.Block, spans: dict) -> None:
    """Whole-model checks that relate fields of different blocks."""
    pos = spec.embed.positions.kind
    pspan = spans.get("embed.positions")
    if spec.reads_tokens:
        if spec.vocab is None:
            raise SpecError(f"model '{spec.name}' reads tokens but has no `vocab = …`", m.span,
                            "set the vocabulary size, or `embed { input = patches(…) }` for images")
        if pos in ("learned", "sinusoidal") and spec.context is None:
            raise SpecError(f"{pos} positions{'' if pspan else ' (the default)'} need `context = …`",
                            pspan.span if pspan else m.span,
                            "set `context` to the longest sequence, or use `embed { positions = rope }` or none")
    if spec.head.kind == "lm":
        if spec.vocab is None:
            raise SpecError("an lm head needs `vocab = …`", spans["head"].span)
        if spec.head.tied and not spec.reads_tokens:
            raise SpecError("a tied lm head needs token input", spans["head.tied"].span,
                            "tying shares the token embedding, and a patch input has none; set tied = false")
    if not spec.reads_tokens and spec.patches.cls is False and spec.head.kind == "classify" \
            and spec.head.pool == "first":
        raise SpecError("pool = first needs a class token", spans.get("head.pool", spans["head"]).span,
                        "set patches(…, cls = true) or pool = mean")
    if spec.head.kind == "classify" and spec.head.pool == "none" and spec.head.pooler:
        raise SpecError("pool = none classifies every position, so there is no pooled vector for the pooler",
                        spans["head.pooler"].span, "set pooler = false, or pool = first")
    if pos == "rope":
        _check_rope_scaling(spec, spans, pspan.span if pspan else m.span)
        for i, layer in enumerate(spec.layers):
            a = layer.attention
            if a.rotary % 2:
                field = "rotary_dim" if "layers.attention.rotary_dim" in spans else "head_dim"
                raise SpecError(
                    f"rope needs an even {field}, layer {i} has {a.rotary}",
                    layer_span(spans, f"layers.attention.{field}", i, pspan.span if pspan else m.span),
                    "rotary embeddings rotate pairs of dimensions",
                )
    _check_mpt(spec, m, spans)
    if spec.embed.segments and (not spec.reads_tokens or spec.multimodal):
        raise SpecError("segments (token_type_ids) need token input", spans["embed.segments"].span)



def _check_rope_scaling(spec: S.Spec, spans: dict, fallback: Span) -> None:
    """longrope lists one short and one long factor per rotated pair of dims of every layer it serves;
    dynamic's exponent R/(R − 2) needs R ≥ 4 rotated dims."""
    for i, ly in enumerate(spec.layers):
        sc = spec.layer_rope(i).scaling
        if sc is None:
            continue
        where = layer_span(spans, "layers.attention.rope" if ly.attention.rope is not None else "embed.positions", i,
                           fallback)
        r = ly.attention.rotary
        if sc.kind == "dynamic" and r < 4:
            raise SpecError(f"dynamic scaling needs at least 4 rotated dims, layer {i} rotates {r}", where,
                            "its base grows with the exponent R/(R − 2)")
        for k in ("short", "long") if sc.kind == "longrope" else ():
            if len(getattr(sc, k)) != r // 2:
                raise SpecError(f"longrope lists {len(getattr(sc, k))} {k} factors, but layer {i} rotates {r // 2} "
                                f"pairs of dims", where, f"give one factor per pair: rotary_dim / 2 = {r // 2}")


def _check_mpt(spec: S.Spec, m: ast.Block, spans: dict) -> None:
    """Checks of the multi-parameter features: types, experts, conditions."""
    e = spec.embed
    if e.types:
        blk = spans["embed.types"]
        total = sum(t.size for t in e.types)
        if not spec.reads_tokens or spec.multimodal:
            raise SpecError("token types need token input (and only token input)", blk.span)
        if total != spec.vocab:
            raise SpecError(f"the token types cover {total} ids but vocab = {spec.vocab}", blk.span,
                            "the types' sizes must add up to the vocabulary (ids are split in their order)")
        if e.experts is not None:
            raise SpecError("token types and expert embeddings are alternatives", spans["embed.experts"].span,
                            "use one of them")
    if any(ly.modulate for ly in spec.layers) and not e.types:
        raise SpecError("modulate needs token types", spans["layers.modulate"].span,
                        "declare them: embed { types { text = …, image = … } }")
    needs = [(k, spans[f"embed.{k}"]) for k in ("condition",) if getattr(e, k) is not None]
    if any(ly.hyper for ly in spec.layers):
        needs.append(("hyper", spans["layers.hyper"]))
    for i, ly in enumerate(spec.layers):
        role = S.HYPER_TARGETS[ly.hyper.target] if ly.hyper else None
        nested = (ly.mlp.nested and role and role.startswith("mlp.")) or (ly.attention.nested and role and
                                                                           role.startswith("attn."))
        if nested:
            raise SpecError(f"layer {i}: a hypernetwork delta on a nested projection is not supported",
                            layer_span(spans, "layers.hyper", i, m.span), "target a projection that is not nested")
        if ly.mlp.moe and role and role.startswith("mlp."):
            raise SpecError(f"layer {i}: a hypernetwork delta on a mixture-of-experts MLP is not supported",
                            layer_span(spans, "layers.hyper", i, m.span), "target an attention projection")
    for t in spec.tasks:
        try:
            parse_choice(spec, t.mix, heads=t.heads, skip=t.skip)
        except MptcError as err:
            raise SpecError(f"task '{t.name}': {err.message}", spans[f"tasks.{t.name}"].span, err.hint) from None
    if e.experts is not None and e.experts.gate == "condition":
        needs.append(("experts", spans["embed.experts"]))
    if needs and spec.conditions is None:
        k, v = needs[0]
        raise SpecError(f"{k} reads the side input, but the model declares no `conditions = …`", v.span,
                        "add `conditions = N` (the size of the `conditions` input vector) to the model")
    if e.experts is not None:
        v = spans["embed.experts"]
        if not spec.reads_tokens:
            raise SpecError("expert embeddings need token input", v.span)
        if e.experts.top is not None and e.experts.top > e.experts.count:
            raise SpecError(f"top = {e.experts.top} exceeds count = {e.experts.count}", v.span)
        if spec.head.tied:
            raise SpecError("a tied head needs a single token table, and expert embeddings have several",
                            spans["head.tied"].span, "set tied = false")


def parse(text: str, name: str = "<spec>") -> S.Spec:
    """Parse and check spec text."""
    return to_spec(ast.parse_file(text, name))
