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
        from .printer import format_spec

        return format_spec(self)
