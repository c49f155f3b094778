"""The typed architecture spec: what a `.mpt` file means, with every per-layer value expanded.

A Spec compares by value (spans are kept aside for errors), so `parse(print(spec)) == spec`.
Dimension symbols (docs/architecture.md): D = width, V = vocab, L = len(layers), and per layer
H = heads, G = kv_heads, K = head_dim (query/key), Dv = value_dim, F = mlp hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu")
PLAIN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")
GATED = {"swiglu": "silu", "geglu": "gelu"}
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
MASKS = ("causal", "bidirectional")
PLACEMENTS = ("pre", "post")
HEADS = ("lm", "classify", "none")
POOLS = ("first", "mean")

# Limits of what a spec may say, checked where the value is read, before anything is expanded.
MAX_LAYERS = 1024  # `layers N`; a list holds at most this many values (a per-layer list has one per layer)
MAX_INT = 2**63 - 1  # whole numbers and integer arithmetic stay within int64
MAX_ELEMENTS = 2**60  # elements of one parameter tensor (its bytes must fit in int64 at 8 bytes each)
MAX_DEPTH = 100  # nesting of blocks, lists, calls and operators


@dataclass(frozen=True)
class Norm:
    kind: str  # layernorm | rmsnorm
    eps: float = 1e-5
    bias: bool = True  # layernorm only: an additive shift beside the gain


@dataclass(frozen=True)
class Positions:
    kind: str = "learned"  # learned | sinusoidal | rope | none
    theta: float = 10000.0  # rope base; frequencies θ_i = theta^(−2i/K), "rotate half" layout


@dataclass(frozen=True)
class Patches:
    """ViT-style input: `pixel_values` (B, channels, image, image) cut into patch×patch tiles."""

    image: int
    patch: int
    channels: int = 3
    cls: bool = True  # prepend a learned class token

    @property
    def count(self) -> int:
        return (self.image // self.patch) ** 2


@dataclass(frozen=True)
class TokenType:
    """A named range of token ids with its own embedding matrix (ranges are consecutive from 0)."""

    name: str
    size: int


@dataclass(frozen=True)
class Film:
    """A small network (D_in → hidden → D, GELU) giving a per-position scale γ and shift β of the
    embeddings: e ← e ⊙ (1 + γ) + β. Its output layers start at zero, so it starts as the identity."""

    hidden: int


@dataclass(frozen=True)
class Experts:
    """Mixture-of-experts embeddings: `count` token tables mixed by softmax gate weights read from the
    token (`gate = token`) or the side input (`gate = condition`); `top` keeps the k largest."""

    count: int
    gate: str = "token"  # token | condition
    top: int | None = None


@dataclass(frozen=True)
class Embed:
    input: str | Patches = "tokens"
    positions: Positions = Positions()
    dropout: float = 0.0
    norm: Norm | None = None
    segments: int = 0  # token-type (segment) embeddings read from `token_type_ids` (BERT: 2); 0 = none
    types: tuple[TokenType, ...] = ()  # the vocabulary split into named types, one embedding matrix each
    experts: Experts | None = None  # mixture-of-experts token embeddings
    condition: Film | None = None  # modulation computed from the side input `conditions` (per example)
    adaptive: Film | None = None  # modulation computed from each token's own embedding (FiLM)


@dataclass(frozen=True)
class Attention:
    heads: int
    kv_heads: int
    head_dim: int  # K: query/key dim per head
    value_dim: int  # Dv: value dim per head
    mask: str = "causal"  # causal | bidirectional
    bias: bool = True  # on the q, k, v projections
    out_bias: bool = True  # on the output projection
    dropout: float = 0.0  # on attention probabilities
    rotary_dim: int | None = None  # rope: dims rotated per head (default all of head_dim), the rest pass
    #                                through; None without rope
    window: int | None = None  # sliding window: a query sees the `window` most recent keys (itself included)
    nested: tuple[float, ...] | None = None  # MatFormer: nested prefixes, as fractions of the kv head groups
    qk_norm: Norm | None = None  # per head on q and k, over K, after the projections and before rope

    @property
    def rotary(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim


@dataclass(frozen=True)
class MLP:
    hidden: int  # F
    activation: str = "gelu"
    bias: bool = True
    nested: tuple[float, ...] | None = None  # MatFormer: nested prefixes of the hidden units, e.g. (1/8, …, 1)

    @property
    def gated(self) -> bool:
        return self.activation in GATED


HYPER_TARGETS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "up": "mlp.up", "gate": "mlp.gate",
                 "down": "mlp.down"}


@dataclass(frozen=True)
class Hyper:
    """A per-example low-rank delta W + A(c)·B(c) on one projection, made by a small hypernetwork
    from the side input c: h = gelu(W_h c), A = W_A h as (out, rank), B = W_B h as (rank, in).
    W_A starts at zero, so the delta starts at zero."""

    target: str  # q | k | v | o | up | gate | down
    rank: int = 4
    hidden: int = 32


@dataclass(frozen=True)
class Task:
    """A named sub-network (MatFormer nesting): MLP granularities, head granularity, skipped layers."""

    name: str
    mix: str | None = None
    heads: str | None = None
    skip: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layer:
    attention: Attention
    mlp: MLP
    norm: Norm = Norm("layernorm")
    placement: str = "pre"  # pre | post
    dropout: float = 0.0  # on each residual branch
    skippable: bool = False  # MatFormer / Mix'n'Match: a sub-network may skip this layer
    modulate: bool = False  # a learned scale and shift per token type of both sublayers' inputs
    hyper: Hyper | None = None  # a hypernetwork-made low-rank delta on one projection


@dataclass(frozen=True)
class Transform:
    """A dense D → D layer, an activation and an optional norm before the output (BERT's MLM head)."""

    activation: str = "gelu"
    norm: Norm | None = None


@dataclass(frozen=True)
class Head:
    kind: str  # lm | classify | none
    norm: Norm | None = None  # final norm before the head
    tied: bool = False  # lm: output matrix is the token embedding
    bias: bool = False
    classes: int | None = None  # classify
    pool: str = "first"  # classify: first token or mean over valid tokens
    pooler: bool = False  # classify: dense + tanh on the pooled vector (BERT)
    transform: Transform | None = None  # lm: dense + activation (+ norm) before the output matrix


@dataclass(frozen=True)
class Init:
    std: float = 0.02


@dataclass(frozen=True)
class Spec:
    name: str
    width: int  # D
    layers: tuple[Layer, ...]
    head: Head
    vocab: int | None = None  # V
    context: int | None = None
    embed: Embed = Embed()
    init: Init = Init()
    conditions: int | None = None  # size of the side input vector `conditions` (B, conditions)
    tasks: tuple[Task, ...] = ()  # task-conditioned width and depth: named sub-networks
    spans: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def type_starts(self) -> tuple[int, ...]:
        """First token id of each token type."""
        out, start = [], 0
        for t in self.embed.types:
            out.append(start)
            start += t.size
        return tuple(out)

    @property
    def nested(self) -> bool:
        """Whether sub-networks can be cut out of this model (nested MLP or heads, or skippable layers)."""
        return any(ly.mlp.nested or ly.attention.nested or ly.skippable for ly in self.layers)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def patches(self) -> Patches | None:
        """The image input, alone or beside tokens."""
        i = self.embed.input
        if isinstance(i, tuple):
            return next(p for p in i if isinstance(p, Patches))
        return i if isinstance(i, Patches) else None

    @property
    def reads_tokens(self) -> bool:
        i = self.embed.input
        return i == "tokens" or (isinstance(i, tuple) and "tokens" in i)

    @property
    def multimodal(self) -> bool:
        """Image patches and tokens in one sequence (in the order of `input`)."""
        return isinstance(self.embed.input, tuple)

    @property
    def image_first(self) -> bool:
        return self.multimodal and isinstance(self.embed.input[0], Patches)

    @property
    def image_len(self) -> int:
        """Positions taken by the image: patches (+ class token); 0 without image input."""
        p = self.patches
        return p.count + int(p.cls) if p is not None else 0

    @property
    def seq_len(self) -> int | None:
        """The number of positions the model sees at most: image positions plus the text context."""
        if not self.reads_tokens:
            return self.image_len
        return None if self.context is None else self.context + self.image_len

    @property
    def inputs(self) -> tuple[str, ...]:
        """Names of the forward inputs, as in Hugging Face and the ONNX file."""
        if not self.reads_tokens:
            return ("pixel_values",)
        extra = ("token_type_ids",) if self.embed.segments else ()
        image = ("pixel_values",) if self.multimodal else ()
        return ("input_ids", "attention_mask") + extra + image + (("conditions",) if self.conditions else ())

    @property
    def output(self) -> str:
        return "last_hidden_state" if self.head.kind == "none" else "logits"

    def replace(self, **changes) -> Spec:
        return replace(self, **changes)

    def __str__(self) -> str:
        return format_spec(self)


# --- the canonical text: every field written out, per-layer values collapsed when all layers agree;
# `parse(format_spec(s)) == s` -------------------------------------------------------------------

INDENT = "  "
MAX_INLINE = 88  # a block fits on one line up to this many characters



def _lit(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, Norm):
        args = f"eps = {_lit(x.eps)}" + (", bias = false" if x.kind == "layernorm" and not x.bias else "")
        return f"{x.kind}({args})"
    if x is None:
        return "none"
    if isinstance(x, tuple):
        return "[" + ", ".join(_lit(i) for i in x) + "]"
    if isinstance(x, Hyper):
        return f"lowrank(target = {x.target}, rank = {x.rank}, hidden = {x.hidden})"
    return str(x)


def _positions(p: Positions) -> str:
    return f"rope(theta = {_lit(p.theta)})" if p.kind == "rope" else p.kind


def _input(i: str | Patches | tuple) -> str:
    if isinstance(i, tuple):
        return "[" + ", ".join(_input(x) for x in i) + "]"
    if isinstance(i, Patches):
        return (f"patches(image = {i.image}, patch = {i.patch}, channels = {i.channels}, "
                f"cls = {_lit(i.cls)})")
    return i


def _str(x: str) -> str:
    """A string literal: quoted, with backslash, quote, line feed and tab escaped as the parser reads them."""
    return '"' + x.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def _task(t: Task) -> str:
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


def format_spec(spec: Spec) -> str:
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
