"""The typed architecture spec: what a `.mpt` file means, with every per-layer value expanded.

A Spec compares by value (spans are kept aside for errors), so `parse(print(spec)) == spec`.
Dimension symbols (docs/architecture.md): D = width, V = vocab, L = len(layers), and per layer
H = heads, G = kv_heads, K = head_dim (query/key), Dv = value_dim, F = mlp hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh")
PLAIN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "tanh")
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rope", "none")
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3", "longrope")
MASKS = ("causal", "bidirectional")
PLACEMENTS = ("pre", "post", "sandwich", "output")
HEADS = ("lm", "classify", "span", "none")
POOLS = ("first", "mean", "last", "none")

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
class RopeScaling:
    """Longer contexts for rope (transformers' `rope_parameters`): how the inverse frequencies
    θ_i = theta^(−2i/R) are rescaled. R = the rotated dims of a head (rotary_dim)."""

    kind: str  # linear | dynamic | yarn | llama3 | longrope
    factor: float
    original: int | None = None  # the context the model was trained at (original_max_position_embeddings)
    low: float = 1.0  # llama3: low_freq_factor
    high: float = 4.0  # llama3: high_freq_factor
    beta_fast: float = 32.0  # yarn: ramp bound, in rotations, of the dims kept as they are
    beta_slow: float = 1.0  # yarn: ramp bound of the dims fully interpolated
    attention: float = 1.0  # yarn, longrope: cos and sin are multiplied by this
    truncate: bool = True  # yarn: round the ramp bounds to whole dims
    short: tuple[float, ...] = ()  # longrope: per-frequency divisors (R/2) up to the original context
    long: tuple[float, ...] = ()  # longrope: the divisors past it


@dataclass(frozen=True)
class Positions:
    kind: str = "learned"  # learned | sinusoidal | rope | none
    theta: float = 10000.0  # rope base; frequencies θ_i = theta^(−2i/K), "rotate half" layout
    scaling: RopeScaling | None = None  # rope: rescaled frequencies for longer contexts
    skip_padding: bool = False  # learned: a token's position counts only the real tokens before it (RoBERTa)


@dataclass(frozen=True)
class Patches:
    """ViT-style input: `pixel_values` (B, channels, image, image) cut into patch×patch tiles."""

    image: int
    patch: int
    channels: int = 3
    cls: bool = True  # prepend a learned class token
    distill: bool = False  # DeiT: a learned distillation token after the class token

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
    scale: float | str | None = None  # token embeddings × this; "sqrt_width": × √D (Gemma)


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
    qk_norm: Norm | None = None  # on q and k after the projections and before rope (over what: qk_norm_over)
    softcap: float | None = None  # scores s ← c·tanh(s / c) before the mask and softmax (Gemma 2: 50)
    scale: float | None = None  # scores are q·k × this; None: 1/√K (Gemma 2: query_pre_attn_scalar^−½)
    qk_norm_over: str = "head"  # head: qk_norm over each head's K values; all: over the whole projection (OLMo 2)
    rope: Positions | None = None  # this layer's own rope (theta, scaling); None: the model's `embed.positions`

    @property
    def rotary(self) -> int:
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim


@dataclass(frozen=True)
class MLP:
    hidden: int  # F
    activation: str = "gelu"
    bias: bool = True
    nested: tuple[float, ...] | None = None  # MatFormer: nested prefixes of the hidden units, e.g. (1/8, …, 1)
    experts: int | None = None  # E: a mixture of experts, each an MLP of `hidden` units (None: one dense MLP)
    top_k: int | None = None  # experts: how many each token is routed to
    normalize: bool = True  # experts: the chosen top-k gates are renormalised to sum to one
    shared: int | None = None  # experts: hidden size of a shared expert every token passes through
    shared_gate: bool = False  # experts: the shared expert's output × sigmoid(w · x) (Qwen2-MoE)

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def moe(self) -> bool:
        return self.experts is not None


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
    placement: str = "pre"  # pre | post | sandwich | output (where the norms sit around each sublayer)
    dropout: float = 0.0  # on each residual branch
    skippable: bool = False  # MatFormer / Mix'n'Match: a sub-network may skip this layer
    modulate: bool = False  # a learned scale and shift per token type of both sublayers' inputs
    hyper: Hyper | None = None  # a hypernetwork-made low-rank delta on one projection
    parallel: bool = False  # x + attn(n1(x)) + mlp(n2(x)): both sublayers read the layer's input (GPT-NeoX)
    shared_norm: bool = False  # parallel: one norm feeds both sublayers (Falcon, Phi-2)


@dataclass(frozen=True)
class Transform:
    """A dense D → D layer, an activation and an optional norm before the output (BERT's MLM head)."""

    activation: str = "gelu"
    norm: Norm | None = None


@dataclass(frozen=True)
class Head:
    kind: str  # lm | classify | span | none
    norm: Norm | None = None  # final norm before the head
    tied: bool = False  # lm: output matrix is the token embedding
    bias: bool = False
    classes: int | None = None  # classify; span: 2 (start, end)
    pool: str = "first"  # classify: first token, mean over valid tokens, last valid token, or none (per token)
    pooler: bool = False  # classify: dense + tanh on the pooled vector (BERT)
    transform: Transform | None = None  # lm: dense + activation (+ norm) before the output matrix
    softcap: float | None = None  # lm: logits ← c·tanh(logits / c) (Gemma 2: 30)


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
        """Positions taken by the image: patches (+ class and distillation tokens); 0 without image input."""
        p = self.patches
        return p.count + int(p.cls) + int(p.distill) if p is not None else 0

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

    def layer_rope(self, i: int) -> Positions:
        """The rope of layer i: its own (`attention.rope`) or the model's positions."""
        return self.layers[i].attention.rope or self.embed.positions

    @property
    def embed_scale(self) -> float | None:
        """The factor the token embeddings are multiplied by (None: not scaled)."""
        s = self.embed.scale
        return math.sqrt(self.width) if s == "sqrt_width" else s

    @property
    def output(self) -> str:
        return "last_hidden_state" if self.head.kind == "none" else "logits"

    def replace(self, **changes) -> Spec:
        return replace(self, **changes)

    def __str__(self) -> str:
        return format_spec(self)


# --- the optional language features a spec uses, by name: passes and emitters declare the ones they handle ---


class Feature(StrEnum):
    """An optional language feature. A pass or emitter lists the features it handles and refuses the rest by name."""

    ROPE = "rope"
    PARTIAL_ROTARY = "partial rotary"
    SINUSOIDAL = "sinusoidal positions"
    QK_NORM = "qk norm"
    SLIDING_WINDOW = "sliding window"
    SEGMENTS = "segments"
    TOKEN_TYPES = "token types"
    CONDITIONS = "conditions"
    FILM = "film"
    MOE_EMBEDDINGS = "moe embeddings"
    HYPER = "hyper"
    MODULATE = "modulate"
    TASKS = "tasks"
    NESTED = "nested"
    PATCHES = "patches"
    MULTIMODAL = "multimodal"
    POST_NORM = "post norm"
    LM_TRANSFORM = "lm transform"
    POOLER = "pooler"
    MEAN_POOLING = "mean pooling"
    # added for the 2026 Hugging Face families
    ROPE_SCALING = "rope scaling"
    LOGIT_SOFTCAP = "logit softcap"
    ATTENTION_SOFTCAP = "attention softcap"
    ATTENTION_SCALE = "attention scale"
    QK_NORM_ALL = "qk norm over all heads"
    LAYER_ROPE = "layer rope"
    EMBEDDING_SCALE = "embedding scale"
    SANDWICH_NORMS = "sandwich norms"
    OUTPUT_NORMS = "output norms"
    PARALLEL_RESIDUAL = "parallel residual"
    MOE_MLP = "moe mlp"
    GEGLU_TANH = "geglu tanh"
    LAST_TOKEN_POOLING = "last-token pooling"
    TOKEN_CLASSIFICATION = "token classification"
    DISTILLATION_TOKEN = "distillation token"
    SPAN_HEAD = "span head"


# Where each feature is written, for messages ("grow_width does not handle embedding scale (embed.scale)").
FEATURE_FIELDS: dict[Feature, str] = {
    Feature.ROPE: "embed.positions = rope", Feature.PARTIAL_ROTARY: "layers.attention.rotary_dim",
    Feature.SINUSOIDAL: "embed.positions = sinusoidal", Feature.QK_NORM: "layers.attention.qk_norm",
    Feature.SLIDING_WINDOW: "layers.attention.window", Feature.SEGMENTS: "embed.segments",
    Feature.TOKEN_TYPES: "embed.types", Feature.CONDITIONS: "conditions",
    Feature.FILM: "embed.condition, embed.adaptive", Feature.MOE_EMBEDDINGS: "embed.experts",
    Feature.HYPER: "layers.hyper", Feature.MODULATE: "layers.modulate", Feature.TASKS: "tasks",
    Feature.NESTED: "nested, skippable", Feature.PATCHES: "embed.input = patches(…)",
    Feature.MULTIMODAL: "embed.input = [patches(…), tokens]", Feature.POST_NORM: "layers.placement = post",
    Feature.LM_TRANSFORM: "head.transform", Feature.POOLER: "head.pooler", Feature.MEAN_POOLING: "head.pool = mean",
    Feature.ROPE_SCALING: "embed.positions = rope(scaling = …)", Feature.LOGIT_SOFTCAP: "head.softcap",
    Feature.ATTENTION_SOFTCAP: "layers.attention.softcap", Feature.ATTENTION_SCALE: "layers.attention.scale",
    Feature.QK_NORM_ALL: "layers.attention.qk_norm_over = all", Feature.LAYER_ROPE: "layers.attention.rope",
    Feature.EMBEDDING_SCALE: "embed.scale", Feature.SANDWICH_NORMS: "layers.placement = sandwich",
    Feature.OUTPUT_NORMS: "layers.placement = output", Feature.PARALLEL_RESIDUAL: "layers.parallel",
    Feature.MOE_MLP: "layers.mlp.experts", Feature.GEGLU_TANH: "layers.mlp.activation = geglu_tanh",
    Feature.LAST_TOKEN_POOLING: "head.pool = last", Feature.TOKEN_CLASSIFICATION: "head.pool = none",
    Feature.SPAN_HEAD: "head span", Feature.DISTILLATION_TOKEN: "embed.input = patches(…, distill = true)",
}

# The features the language had before the 2026 families: what a pass handles unless it says otherwise.
BASE_FEATURES: frozenset[Feature] = frozenset({
    Feature.ROPE, Feature.PARTIAL_ROTARY, Feature.SINUSOIDAL, Feature.QK_NORM, Feature.SLIDING_WINDOW,
    Feature.SEGMENTS, Feature.TOKEN_TYPES, Feature.CONDITIONS, Feature.FILM, Feature.MOE_EMBEDDINGS, Feature.HYPER,
    Feature.MODULATE, Feature.TASKS, Feature.NESTED, Feature.PATCHES, Feature.MULTIMODAL, Feature.POST_NORM,
    Feature.LM_TRANSFORM, Feature.POOLER, Feature.MEAN_POOLING,
})


def features(spec: Spec) -> frozenset[Feature]:
    """The optional language features `spec` uses (plain attention, MLPs, norms and heads are not features)."""
    e, h, ls = spec.embed, spec.head, spec.layers
    att, mlp = [ly.attention for ly in ls], [ly.mlp for ly in ls]
    pos = e.positions
    on = {
        Feature.ROPE: pos.kind == "rope",
        Feature.ROPE_SCALING: pos.kind == "rope" and any(p.scaling is not None for p in
                                                         {spec.layer_rope(i) for i in range(len(ls))}),
        Feature.LAYER_ROPE: any(a.rope is not None for a in att),
        Feature.PARTIAL_ROTARY: any(a.rotary_dim not in (None, a.head_dim) for a in att),
        Feature.SINUSOIDAL: pos.kind == "sinusoidal",
        Feature.QK_NORM: any(a.qk_norm is not None for a in att),
        Feature.SLIDING_WINDOW: any(a.window is not None for a in att),
        Feature.SEGMENTS: e.segments > 0,
        Feature.TOKEN_TYPES: bool(e.types),
        Feature.CONDITIONS: spec.conditions is not None,
        Feature.FILM: e.condition is not None or e.adaptive is not None,
        Feature.MOE_EMBEDDINGS: e.experts is not None,
        Feature.HYPER: any(ly.hyper is not None for ly in ls),
        Feature.MODULATE: any(ly.modulate for ly in ls),
        Feature.TASKS: bool(spec.tasks),
        Feature.NESTED: spec.nested,
        Feature.PATCHES: spec.patches is not None,
        Feature.MULTIMODAL: spec.multimodal,
        Feature.POST_NORM: any(ly.placement == "post" for ly in ls),
        Feature.LM_TRANSFORM: h.kind == "lm" and h.transform is not None,
        Feature.POOLER: h.kind == "classify" and h.pooler,
        Feature.MEAN_POOLING: h.kind == "classify" and h.pool == "mean",
        Feature.LOGIT_SOFTCAP: h.softcap is not None,
        Feature.ATTENTION_SOFTCAP: any(a.softcap is not None for a in att),
        Feature.ATTENTION_SCALE: any(a.scale is not None for a in att),
        Feature.QK_NORM_ALL: any(a.qk_norm is not None and a.qk_norm_over == "all" for a in att),
        Feature.EMBEDDING_SCALE: e.scale is not None,
        Feature.SANDWICH_NORMS: any(ly.placement == "sandwich" for ly in ls),
        Feature.OUTPUT_NORMS: any(ly.placement == "output" for ly in ls),
        Feature.PARALLEL_RESIDUAL: any(ly.parallel for ly in ls),
        Feature.MOE_MLP: any(getattr(m, "experts", None) is not None for m in mlp),
        Feature.GEGLU_TANH: any(m.activation == "geglu_tanh" for m in mlp),
        Feature.LAST_TOKEN_POOLING: h.kind == "classify" and h.pool == "last",
        Feature.TOKEN_CLASSIFICATION: h.kind == "classify" and h.pool == "none",
        Feature.SPAN_HEAD: h.kind == "span",
        Feature.DISTILLATION_TOKEN: spec.patches is not None and spec.patches.distill,
    }
    return frozenset(f for f, used in on.items() if used)


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
    if isinstance(x, Positions):
        return _positions(x)
    if isinstance(x, Hyper):
        return f"lowrank(target = {x.target}, rank = {x.rank}, hidden = {x.hidden})"
    return str(x)


ROPE_SCALING_ARGS = {  # the arguments of each scaling, in the order they are printed
    "linear": ("factor",), "dynamic": ("factor", "original"), "llama3": ("factor", "low", "high", "original"),
    "yarn": ("factor", "original", "beta_fast", "beta_slow", "attention", "truncate"),
    "longrope": ("factor", "original", "short", "long", "attention"),
}


def _positions(p: Positions) -> str:
    if p.kind == "learned" and p.skip_padding:
        return "learned(skip_padding = true)"
    if p.kind != "rope":
        return p.kind
    if p.scaling is None:
        return f"rope(theta = {_lit(p.theta)})"
    sc = p.scaling
    args = ", ".join(f"{k} = {_lit(getattr(sc, k))}" for k in ROPE_SCALING_ARGS[sc.kind])
    return f"rope(theta = {_lit(p.theta)}, scaling = {sc.kind}({args}))"


def _input(i: str | Patches | tuple) -> str:
    if isinstance(i, tuple):
        return "[" + ", ".join(_input(x) for x in i) + "]"
    if isinstance(i, Patches):
        return (f"patches(image = {i.image}, patch = {i.patch}, channels = {i.channels}, "
                f"cls = {_lit(i.cls)}" + (", distill = true)" if i.distill else ")"))
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
    if e.scale is not None:
        ef.append(("scale", _lit(e.scale)))
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
    for k in ("skippable", "modulate", "parallel", "shared_norm"):
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
    for k in ("qk_norm", "softcap", "scale"):
        if any(getattr(a, k) is not None for a in att):
            keys.append(k)
    if any(a.qk_norm_over != "head" for a in att):
        keys.append("qk_norm_over")
    if any(a.rope is not None for a in att):
        keys.append("rope")
    out += _block("attention", [(k, _per_layer([getattr(a, k) for a in att])) for k in keys], 2)
    mlp = [layer.mlp for layer in ls]
    mkeys = ("hidden", "activation", "bias") + (("nested",) if any(m.nested for m in mlp) else ())
    if any(m.moe for m in mlp):
        mkeys += ("experts", "top_k", "normalize", "shared", "shared_gate")
    out += _block("mlp", [(k, _per_layer([getattr(m, k) for m in mlp])) for k in mkeys], 2)
    out.append(f"{INDENT}}}")
    h = spec.head
    hf = [("norm", _lit(h.norm))]
    if h.kind == "lm":
        hf += [("tied", _lit(h.tied)), ("bias", _lit(h.bias))]
        if h.transform is not None:
            hf.append(("transform", f"dense(activation = {h.transform.activation}, norm = {_lit(h.transform.norm)})"))
        if h.softcap is not None:
            hf.append(("softcap", _lit(h.softcap)))
    elif h.kind == "classify":
        hf += [("classes", str(h.classes)), ("pool", h.pool), ("pooler", _lit(h.pooler)), ("bias", _lit(h.bias))]
    elif h.kind == "span":
        hf.append(("bias", _lit(h.bias)))
    out += _block(f"head {h.kind}", hf, 1)
    if spec.tasks:
        out += _block("tasks", [(t.name, _task(t)) for t in spec.tasks], 1)
    out.append("}")
    return "\n".join(out) + "\n"
