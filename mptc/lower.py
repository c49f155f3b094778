"""Lower a Spec to a torch.fx GraphModule of primitive ops.

Every node carries `node.meta["mptc"]` (a `NodeInfo`): the layer it belongs to, its role
(`attn.q`, `mlp.down`, `norm.attn`, …) and, for parameters and shape constants, the
dimension symbols of each axis (docs/architecture.md). A parameter axis is a tuple of symbols whose
sizes multiply, outermost first: the query weight is ((H[l], K[l]), (D,)). Roles and io kinds are
`Role` and `IO` members (string enums: their values are the names reports print); a norm's gain and
shift also say which symbol the norm runs over (`norm_over`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from . import ops, tables
from . import spec as S
from .dims import sizes, too_large
from .errors import MptcError, SpecError
from .nested import Nest

Axes = tuple[tuple[str, ...], ...]


class Role(StrEnum):
    """What a graph node computes or a parameter is. Passes declare the parameter roles they know."""

    INPUT = "input"
    OUTPUT = "output"
    SHAPE = "shape"
    TYPES = "types"
    ROPE = "rope"
    MODULATE = "modulate"
    HYPER = "hyper"
    SKIP = "skip"
    MASK_CAUSAL = "mask.causal"
    MASK_BIDIRECTIONAL = "mask.bidirectional"
    RESIDUAL_ATTN = "residual.attn"
    RESIDUAL_MLP = "residual.mlp"
    EMBED_TOKENS = "embed.tokens"
    EMBED_SEGMENTS = "embed.segments"
    EMBED_PATCH = "embed.patch"
    EMBED_CLS = "embed.cls"
    EMBED_MODALITY = "embed.modality"
    EMBED_POSITIONS = "embed.positions"
    EMBED_EXPERTS = "embed.experts"
    EMBED_GATE = "embed.gate"
    EMBED_CONDITION = "embed.condition"
    EMBED_ADAPTIVE = "embed.adaptive"
    EMBED_DROPOUT = "embed.dropout"
    ATTN_Q = "attn.q"
    ATTN_K = "attn.k"
    ATTN_V = "attn.v"
    ATTN_O = "attn.o"
    ATTN_ROPE = "attn.rope"
    ATTN_SDPA = "attn.sdpa"
    ATTN_DROPOUT = "attn.dropout"
    MLP_UP = "mlp.up"
    MLP_GATE = "mlp.gate"
    MLP_DOWN = "mlp.down"
    MLP_ACT = "mlp.act"
    MLP_DROPOUT = "mlp.dropout"
    HEAD_OUT = "head.out"
    HEAD_POOL = "head.pool"
    HEAD_POOLER = "head.pooler"
    HEAD_TRANSFORM = "head.transform"
    NORM_EMBED = "norm.embed"
    NORM_ATTN = "norm.attn"
    NORM_MLP = "norm.mlp"
    NORM_HEAD = "norm.head"
    NORM_TRANSFORM = "norm.transform"
    NORM_Q = "norm.q"  # q/k norm: per head, over the query/key dim K[l]
    NORM_K = "norm.k"
    NORM_ATTN_OUT = "norm.attn_out"  # a norm on a sublayer's output, before the residual add (sandwich, output)
    NORM_MLP_OUT = "norm.mlp_out"
    EMBED_SCALE = "embed.scale"
    HEAD_SOFTCAP = "head.softcap"
    MLP_ROUTER = "mlp.router"  # mixture of experts: the router's logits, one per expert
    MLP_SHARED_GATE = "mlp.shared_gate"  # mixture of experts: sigmoid gate of the shared expert


class IO(StrEnum):
    """What one axis of a parameter is to the values around it."""

    OUT = "out"  # the values it writes
    IN = "in"  # what it reads or is indexed by
    NORM = "norm"  # a norm's gain or shift (over `NodeInfo.norm_over`)
    SCALE = "scale"  # a multiplicative modulation (1 + γ, or a per-type scale)
    EXPERT = "expert"  # which expert of a mixture (the axis E[l])


PARAM_ROLES = frozenset({  # the roles a parameter can have
    Role.MODULATE, Role.HYPER, Role.EMBED_TOKENS, Role.EMBED_SEGMENTS, Role.EMBED_PATCH, Role.EMBED_CLS,
    Role.EMBED_MODALITY, Role.EMBED_POSITIONS, Role.EMBED_EXPERTS, Role.EMBED_GATE, Role.EMBED_CONDITION,
    Role.EMBED_ADAPTIVE, Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.MLP_UP, Role.MLP_GATE,
    Role.MLP_DOWN, Role.HEAD_OUT, Role.HEAD_POOLER, Role.HEAD_TRANSFORM, Role.NORM_EMBED, Role.NORM_ATTN,
    Role.NORM_MLP, Role.NORM_HEAD, Role.NORM_TRANSFORM, Role.NORM_Q, Role.NORM_K, Role.NORM_ATTN_OUT, Role.NORM_MLP_OUT,
    Role.MLP_ROUTER, Role.MLP_SHARED_GATE})


@dataclass(frozen=True)
class NodeInfo:
    role: Role
    layer: int | None = None
    axes: Axes | None = None  # parameters: symbols of each axis
    shape: tuple | None = None  # view/reshape nodes: symbols of each target size (None = dynamic)
    init: str | None = None  # parameters: normal | residual | zeros | ones
    io: tuple[IO, ...] | None = None  # parameters: what each axis is (IO)
    norm_over: str | None = None  # a norm's gain or shift: the symbol the norm runs over ("D", "K[3]")

    def describe(self) -> str:
        """The parameter in words, for messages: "a norm over K[0], role norm.q", "role attn.q"."""
        return f"a norm over {self.norm_over}, role {self.role}" if self.norm_over is not None else f"role {self.role}"


@dataclass
class Lowered:
    graph: fx.Graph
    root: nn.Module
    params: dict[str, NodeInfo] = field(default_factory=dict)


ACT = {"gelu": F.gelu, "gelu_tanh": ops.gelu_tanh, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


class _Builder:
    def __init__(self, spec: S.Spec, device: torch.device | str):
        self.spec, self.device = spec, torch.device(device)
        self.g = fx.Graph()
        self.root = nn.Module()
        self.sizes = sizes(spec)
        self.params: dict[str, NodeInfo] = {}
        self.layer: int | None = None
        self.nested: set[tuple[int, str]] = set()  # (layer, role) of weights sliced by the Nest module
        self.conditions: fx.Node | None = None  # the side input, for hypernetworks
        self.cache: _Cache | None = None  # the cached graph's inputs (lower(spec, cache=True))
        self.presents: list[tuple[fx.Node, fx.Node]] = []  # the cached graph: (key, value) per layer
        if spec.nested:
            self.root.add_module("nest", Nest(spec))
            for i, ly in enumerate(spec.layers):
                if ly.mlp.nested:
                    self.nested |= {(i, "mlp.up"), (i, "mlp.gate"), (i, "mlp.down")}
                if ly.attention.nested:
                    self.nested |= {(i, "attn.q"), (i, "attn.k"), (i, "attn.v"), (i, "attn.o")}

    # --- nodes ---
    def param(self, name: str, axes: Axes, role: str, init: str, io: tuple[str, ...], norm_over: str | None = None
              ) -> fx.Node:
        shape = tuple(math.prod(self.sizes[s] for s in ax) for ax in axes)
        if math.prod(shape) >= S.MAX_ELEMENTS:  # torch cannot size it, not even on the meta device
            raise self._too_large(name, axes, shape)
        owner, leaf = self._owner(name)
        owner.register_parameter(leaf, nn.Parameter(torch.empty(shape, device=self.device)))
        info = NodeInfo(Role(role), self.layer, axes, None, init, tuple(IO(k) for k in io), norm_over)
        self.params[name] = info
        return self._tag(self.g.get_attr(name), info)

    def _too_large(self, name: str, axes: Axes, shape: tuple[int, ...]) -> SpecError:
        """The error for a parameter beyond MAX_ELEMENTS, at the field of its largest dimension."""
        return too_large(self.spec, name, axes, self.sizes)

    def input(self, name: str, **kw) -> fx.Node:
        return self._tag(self.g.placeholder(name, **kw), NodeInfo("input"))

    def module(self, name: str, mod: nn.Module, args: tuple, role: str) -> fx.Node:
        owner, leaf = self._owner(name)
        owner.add_module(leaf, mod)
        return self._tag(self.g.call_module(name, args), NodeInfo(role, self.layer))

    def call(self, fn, *args, role: str, shape: tuple | None = None, **kwargs) -> fx.Node:
        return self._tag(self.g.call_function(fn, args, kwargs), NodeInfo(role, self.layer, shape=shape))

    def method(self, name: str, *args, role: str, shape: tuple | None = None) -> fx.Node:
        return self._tag(self.g.call_method(name, args), NodeInfo(role, self.layer, shape=shape))

    def _tag(self, node: fx.Node, info: NodeInfo) -> fx.Node:
        node.meta["mptc"] = info if isinstance(info.role, Role) else replace(info, role=Role(info.role))
        return node

    def _owner(self, dotted: str) -> tuple[nn.Module, str]:
        *path, leaf = dotted.split(".")
        m = self.root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        return m, leaf

    # --- building blocks ---
    def linear(self, x: fx.Node, name: str, out_ax: tuple, in_ax: tuple, bias: bool, role: str,
               init: str = "normal", out_io: str = "out") -> fx.Node:
        w = self.param(f"{name}.weight", (out_ax, in_ax), role, init, (out_io, "in"))
        b = self.param(f"{name}.bias", (out_ax,), role, "zeros", (out_io,)) if bias else None
        if (self.layer, role) in self.nested:  # MatFormer: the active prefix of a nested layer
            w = self.nest(w, role)
            if b is not None and role not in ("attn.o", "mlp.down"):
                b = self.nest(b, role)
        y = self.call(F.linear, x, w, b, role=role)
        hyper = self.spec.layers[self.layer].hyper if self.layer is not None else None
        if hyper is not None and S.HYPER_TARGETS[hyper.target] == role:
            y = self.hyper_delta(x, y, hyper, role, out_ax, in_ax)
        return y

    def hyper_delta(self, x: fx.Node, y: fx.Node, hyper: S.Hyper, role: str, out_ax: tuple, in_ax: tuple
                    ) -> fx.Node:
        """y + A(c)·(B(c)·x): the per-example low-rank delta of a hypernetwork (see spec.Hyper)."""
        i = self.layer
        name, hid, rank = f"layers.{i}.hyper", (f"F:hyper[{i}]",), f"R[{i}]"
        h = self.call(F.gelu, self.linear(self.conditions, f"{name}.hidden", hid, ("Cn",), True, "hyper"),
                      role="hyper")  # (B, Fh)
        w_a = self.param(f"{name}.a.weight", ((*out_ax, rank), hid), role, "zeros", ("out", "in"))
        w_b = self.param(f"{name}.b.weight", ((rank, *in_ax), hid), "hyper", "normal", ("in", "in"))
        a = self.call(F.linear, h, w_a, role=role)  # (B, out·r)
        bm = self.call(F.linear, h, w_b, role="hyper")  # (B, r·in)
        return self.call(ops.lowrank_delta, x, y, a, bm, hyper.rank, role=role)

    def nest(self, x: fx.Node, site: str) -> fx.Node:
        return self._tag(self.g.call_module("nest", (x, self.layer, site)), NodeInfo(site, self.layer))

    def norm(self, x: fx.Node, norm: S.Norm, name: str, role: str, over: str | tuple[str, ...] = "D") -> fx.Node:
        """A norm over the last axis of x, whose size is the symbol `over` (D, or K[l] for a q/k norm), or the
        product of several symbols (H[l]·K[l]: a q norm over all heads at once)."""
        ax = (over,) if isinstance(over, str) else over
        label, sym = "·".join(ax), ax[0] if len(ax) == 1 else ax
        w = self.param(f"{name}.weight", (ax,), role, "ones", ("norm",), label)
        n = (math.prod(self.sizes[s] for s in ax),)
        if norm.kind == "rmsnorm":
            return self.call(F.rms_norm, x, n, w, norm.eps, role=role, shape=(sym,))
        b = self.param(f"{name}.bias", (ax,), role, "zeros", ("norm",), label) if norm.bias else None
        return self.call(F.layer_norm, x, n, w, b, norm.eps, role=role, shape=(sym,))

    def dropout(self, x: fx.Node, p: float, name: str, role: str) -> fx.Node:
        return self.module(name, nn.Dropout(p), (x,), role) if p > 0 else x


def _required_inputs(spec: S.Spec) -> dict[str, str]:
    """The inputs the forward cannot do without, with their shapes; attention_mask and token_type_ids
    are optional (all tokens real, all segment 0)."""
    out = {}
    if spec.reads_tokens:
        out["input_ids"] = "(B, T)"
    if spec.patches is not None:
        p = spec.patches
        out["pixel_values"] = f"(B, {p.channels}, {p.image}, {p.image})"
    if reads_conditions(spec):
        out["conditions"] = f"(B, {spec.conditions})"
    return out


def reads_conditions(spec: S.Spec) -> bool:
    """Whether a feature reads the side input (FiLM from it, an expert gate, a hypernetwork): a model
    that only declares `conditions = N` runs without it."""
    e = spec.embed
    return bool(spec.conditions) and (e.condition is not None or any(ly.hyper for ly in spec.layers)
                                      or (e.experts is not None and e.experts.gate == "condition"))


def require_input(x: torch.Tensor | None, model: str, name: str, shape: str) -> torch.Tensor:
    """x itself; an MptcError naming the input when it was left out."""
    if x is None:
        raise MptcError(f"model '{model}' needs the input '{name}' {shape}",
                        hint=f"call it with {name}=… (a tensor of shape {shape})")
    return x


@dataclass
class _Cache:
    """The cached graph's extra inputs: P (the past length), position ids (B, S), past (key, value) per layer."""

    past_len: fx.Node
    positions: fx.Node
    past: list[tuple[fx.Node, fx.Node]]


# The language features the cached graph handles (S.features); a model with any other is refused by name.
CACHE_FEATURES = frozenset({
    S.Feature.ROPE, S.Feature.PARTIAL_ROTARY, S.Feature.SINUSOIDAL, S.Feature.QK_NORM, S.Feature.SLIDING_WINDOW,
    S.Feature.TOKEN_TYPES, S.Feature.MOE_EMBEDDINGS, S.Feature.FILM, S.Feature.MODULATE, S.Feature.POST_NORM,
    S.Feature.LM_TRANSFORM, S.Feature.NESTED,  # nested: the sub-network the Nest module has chosen
    S.Feature.ROPE_SCALING, S.Feature.LAYER_ROPE, S.Feature.QK_NORM_ALL, S.Feature.LOGIT_SOFTCAP,
    S.Feature.ATTENTION_SOFTCAP, S.Feature.ATTENTION_SCALE, S.Feature.EMBEDDING_SCALE, S.Feature.SANDWICH_NORMS,
    S.Feature.OUTPUT_NORMS, S.Feature.PARALLEL_RESIDUAL, S.Feature.MOE_MLP, S.Feature.GEGLU_TANH})
LENGTH_ROPE = ("dynamic", "longrope")  # rope scalings whose frequencies follow the length: cached keys would go stale


def cache_refusal(spec: S.Spec) -> str | None:
    """Why the KV cache cannot serve this model (what it has), or None for a causal `head lm` decoder."""
    if spec.head.kind != "lm":
        return f"`head {spec.head.kind}` (not a language-model head)"
    bidir = [i for i, ly in enumerate(spec.layers) if ly.attention.mask != "causal"]
    if bidir:
        return f"bidirectional attention (`mask = {spec.layers[bidir[0]].attention.mask}` in layer {bidir[0]})"
    if spec.embed.positions.kind == "rope":
        for i in range(spec.n_layers):
            sc = spec.layer_rope(i).scaling
            if sc is not None and sc.kind in LENGTH_ROPE:
                return (f"{sc.kind} rope scaling (layer {i}): its frequencies follow the sequence length, so keys "
                        "cached at one length would not match the next")
    other = sorted(S.features(spec) - CACHE_FEATURES)
    if other:
        f = other[0]
        extract = " (cut one sub-network out first with `mptc extract`)" if f == S.Feature.TASKS else ""
        return f"{f} ({S.FEATURE_FIELDS[f]}){extract}"
    return None


def _cache_inputs(b: _Builder, spec: S.Spec) -> dict[str, fx.Node]:
    """The cached graph's placeholders: input_ids (B, S), attention_mask (B, P + S), position_ids (B, S), then
    past_key_{i} (B, G_i, P, K_i) and past_value_{i} (B, G_i, P, Dv_i) per layer; all but input_ids optional."""
    ins = {"input_ids": b.input("input_ids")}
    for name in ("attention_mask", "position_ids"):
        ins[name] = b.input(name, default_value=None)
    past = [(b.input(f"past_key_{i}", default_value=None), b.input(f"past_value_{i}", default_value=None))
            for i in range(spec.n_layers)]
    past_len = b.call(ops.cache_length, past[0][0], role="shape")
    pos = b.call(ops.cache_positions, ins["position_ids"], ins["attention_mask"], ins["input_ids"], past_len,
                 role="input")  # (B, S)
    b.cache = _Cache(past_len, pos, past)
    return ins


def lower(spec: S.Spec, device: torch.device | str = "cpu", cache: bool = False) -> Lowered:
    """Build the graph and an uninitialised parameter tree (float32, on `device`).

    cache: the KV-cached form of a causal `head lm` decoder (docs/generate.md): inputs input_ids (B, S),
    attention_mask (B, P + S), position_ids (B, S), past_key_{i} / past_value_{i}; output (logits, presents).
    """
    if cache and (why := cache_refusal(spec)) is not None:
        raise MptcError(f"model '{spec.name}' cannot run with a KV cache: it has {why}",
                        hint="the KV cache and `generate` serve causal `head lm` decoders; docs/generate.md lists "
                        "the features they handle")
    b = _Builder(spec, device)
    g = b.g
    e = spec.embed

    # --- inputs and embeddings ---  x: (B, T, D)
    # placeholders in the order of spec.inputs; all but the first may be left out (None)
    ins = _cache_inputs(b, spec) if cache else {
        name: b.input(name, **({} if k == 0 else {"default_value": None})) for k, name in enumerate(spec.inputs)}
    for name, shape in _required_inputs(spec).items():  # a clear error, not a TypeError deep in the graph
        ins[name] = b.call(require_input, ins[name], spec.name, name, shape, role="input")
    src, mask_in, cond = ins.get("input_ids"), ins.get("attention_mask"), ins.get("conditions")  # (B, T), (B, Cn)
    b.conditions = cond
    image = None
    if spec.reads_tokens:
        x, table = _token_embedding(b, spec, src, cond)  # (B, T, D); the token table, if there is one
        if spec.embed_scale is not None:  # Gemma: × √D, the factor rounded to the model's dtype
            x = b.call(ops.scale, x, spec.embed_scale, role="embed.scale")
        if e.segments:
            types = ins["token_type_ids"]  # (B, T) or None
            seg = b.param("embed.segments.weight", (("S",), ("D",)), "embed.segments", "normal", ("in", "out"))
            x = b.call(operator.add, x, b.call(ops.segment_embed, types, x, seg, role="embed.segments"),
                       role="embed.segments")
    if spec.patches is not None:
        p = spec.patches
        pixels = ins["pixel_values"]  # (B, C, S, S)
        w = b.param("embed.patch.weight", (("D",), ("I",)), "embed.patch", "normal", ("out", "in"))
        w4 = b.method("view", w, spec.width, p.channels, p.patch, p.patch, role="embed.patch",
                      shape=("D", None, None, None))
        bias = b.param("embed.patch.bias", (("D",),), "embed.patch", "zeros", ("out",))
        image = b.call(ops.patchify, pixels, w4, bias, p.patch, role="embed.patch")  # (B, N, D)
        if p.distill:  # DeiT: [cls, distill, patches]; a prepended learned token, like the class token
            distill = b.param("embed.distill", (("D",),), "embed.cls", "normal", ("out",))
            image = b.call(ops.prepend, distill, image, role="embed.cls")  # (B, N + 1, D)
        if p.cls:
            cls = b.param("embed.cls", (("D",),), "embed.cls", "normal", ("out",))
            image = b.call(ops.prepend, cls, image, role="embed.cls")  # (B, N + 1, D)
        if not spec.reads_tokens:
            x = image
    if spec.multimodal:  # one sequence; each modality adds its own learned type vector
        mod = b.param("embed.modality.weight", (("MOD",), ("D",)), "embed.modality", "normal", ("in", "out"))
        parts = [b.call(ops.add_row, image, mod, 0, role="embed.modality"),
                 b.call(ops.add_row, x, mod, 1, role="embed.modality")]
        if not spec.image_first:
            parts.reverse()
        x = b.call(torch.cat, parts, 1, role="embed.modality")  # (B, N' + T, D)
        mask_in = b.call(ops.extend_mask, mask_in, image, spec.image_first, role="embed.modality")
    if e.positions.kind == "learned":
        pos = b.param("embed.positions.weight", (("P",), ("D",)), "embed.positions", "normal", ("in", "out"))
        # (T,), or the cached graph's position ids (B, S)
        if cache:
            ids = b.cache.positions
        elif e.positions.skip_padding:  # (B, T): counted over the real tokens
            ids = b.call(ops.real_positions, mask_in, x, role="embed.positions")
        else:
            ids = b.call(ops.positions, x, role="embed.positions")
        x = b.call(operator.add, x, b.call(F.embedding, ids, pos, role="embed.positions"), role="embed.positions")
    elif e.positions.kind == "sinusoidal":
        table = b.call(ops.sinusoidal_at, b.cache.positions, x, role="embed.positions") if cache else \
            b.call(ops.sinusoidal, x, role="embed.positions")  # (B, S, D) or (T, D)
        x = b.call(operator.add, x, table, role="embed.positions")
    if e.adaptive is not None:  # FiLM from each token's own embedding
        x = _film(b, x, x, e.adaptive, "embed.adaptive", ("D",))
    if e.condition is not None:  # FiLM from the side input, one modulation per example
        x = _film(b, x, cond, e.condition, "embed.condition", ("Cn",))
    if e.norm is not None:
        x = b.norm(x, e.norm, "embed.norm", "norm.embed")
    x = b.dropout(x, e.dropout, "embed.dropout", "embed.dropout")

    # --- shared per-forward tensors: batch/sequence sizes, masks, rotary tables ---
    bsz = b.method("size", x, 0, role="shape")
    seq = b.method("size", x, 1, role="shape")
    kinds = sorted({(layer.attention.mask, layer.attention.window or 0) for layer in spec.layers})
    masks = {(kind, w): b.call(ops.cache_mask, mask_in, x, b.cache.past_len, w or None, role=f"mask.{kind}")
             if cache else b.call(ops.attention_mask, mask_in, x, kind == "causal", w or None, role=f"mask.{kind}")
             for kind, w in kinds}  # (B or 1, 1, T, T); cached: (B or 1, 1, S, P + S)
    rope: dict[tuple[int, S.Positions], tuple[fx.Node, fx.Node]] = {}  # per (rotary dims, the layer's rope)
    if e.positions.kind == "rope":
        for k, p in sorted({(ly.attention.rotary, spec.layer_rope(i)) for i, ly in enumerate(spec.layers)}, key=str):
            cs = _cache_rope(b, x, k, p) if cache else \
                _rope_tables(b, x, k, p)
            rope[k, p] = (b.call(operator.getitem, cs, 0, role="rope"), b.call(operator.getitem, cs, 1, role="rope"))

    type_ids = None
    if any(layer.modulate for layer in spec.layers):
        type_ids = b.call(ops.token_types, src, spec.type_starts, role="types")  # (B, T)

    # --- blocks ---
    for i, layer in enumerate(spec.layers):
        b.layer = i
        a = layer.attention
        mod = None
        if layer.modulate:  # per token type: h ⊙ scale[type] + shift[type], on both sublayers' inputs
            mod = (type_ids,
                   b.param(f"layers.{i}.modulate.scale", (("T",), ("D",)), "modulate", "ones", ("in", "scale")),
                   b.param(f"layers.{i}.modulate.shift", (("T",), ("D",)), "modulate", "zeros", ("in", "out")))
        def attn(h: fx.Node, i: int = i, a: S.Attention = a) -> fx.Node:
            return _attention(b, i, a, h, bsz, seq, masks[a.mask, a.window or 0], rope.get((a.rotary,
                                                                                             spec.layer_rope(i))))

        def mlp(h: fx.Node, i: int = i, m: S.MLP = layer.mlp) -> fx.Node:
            return _mlp(b, i, m, h)

        if layer.parallel:
            x = _parallel(b, x, i, layer, mod, attn, mlp)
        else:
            x = _sublayer(b, x, i, layer, "attn", mod, attn)
            x = _sublayer(b, x, i, layer, "mlp", mod, mlp)
    b.layer = None

    # --- head ---
    hd = spec.head
    if hd.norm is not None:
        x = b.norm(x, hd.norm, "head.norm", "norm.head")
    if hd.kind == "lm":
        if hd.transform is not None:  # (B, T, D) → (B, T, D)
            x = b.call(ACT[hd.transform.activation], b.linear(x, "head.transform", ("D",), ("D",), True,
                                                                "head.transform"), role="head.transform")
            if hd.transform.norm is not None:
                x = b.norm(x, hd.transform.norm, "head.transform_norm", "norm.transform")
        if hd.tied:
            w = table
            bias = b.param("head.bias", (("V",),), "head.out", "zeros", ("out",)) if hd.bias else None
            x = b.call(F.linear, x, w, bias, role="head.out")  # (B, T, V)
        else:
            x = b.linear(x, "head.out", ("V",), ("D",), hd.bias, "head.out")  # (B, T, V)
        if hd.softcap is not None:
            x = b.call(ops.softcap, x, hd.softcap, role="head.softcap")  # (B, T, V)
    elif hd.kind == "span":  # extractive QA: start and end logits per position
        x = b.linear(x, "head.out", ("C",), ("D",), hd.bias, "head.out")  # (B, T, 2)
    elif hd.kind == "classify":
        if hd.pool == "first":
            x = b.call(ops.pool_first, x, role="head.pool")  # (B, D)
        elif hd.pool == "last":
            x = b.call(ops.pool_last, x, mask_in, role="head.pool")  # (B, D)
        elif hd.pool == "mean":
            x = b.call(ops.pool_mean, x, mask_in, role="head.pool")  # (B, D)
        # pool = none: every position is classified, (B, T, D) → (B, T, C)
        if hd.pooler:
            x = b.call(torch.tanh, b.linear(x, "head.pooler", ("D",), ("D",), True, "head.pooler"), role="head.pooler")
        x = b.linear(x, "head.out", ("C",), ("D",), hd.bias, "head.out")  # (B, C)
    out = (x, tuple(b.presents)) if cache else x  # cached: (logits, ((key, value) per layer))
    b._tag(g.output(out), NodeInfo("output"))
    return Lowered(g, b.root, b.params)


def _sublayer(b: _Builder, x: fx.Node, i: int, layer: S.Layer, kind: str, mod: tuple | None, compute) -> fx.Node:
    """One residual sublayer (kind attn or mlp) with its norms where `placement` puts them, type modulation,
    the branch, dropout, MatFormer skip, residual add. x: (B, T, D).

    pre: x + f(n(x)); post: n(x + f(x)); sandwich: x + n'(f(n(x))); output: x + n'(f(x))."""
    norm = f"layers.{i}.{kind}_norm"
    pl = layer.placement
    h = b.norm(x, layer.norm, norm, f"norm.{kind}") if pl in ("pre", "sandwich") else x
    y = _branch(b, h, i, layer, kind, mod, compute)
    x = b.call(operator.add, x, y, role=f"residual.{kind}")
    return b.norm(x, layer.norm, norm, f"norm.{kind}") if pl == "post" else x


def _branch(b: _Builder, h: fx.Node, i: int, layer: S.Layer, kind: str, mod: tuple | None, compute) -> fx.Node:
    """A sublayer's residual branch from its (normalised) input h: modulation, f, the output norm of
    sandwich and output placements, dropout, MatFormer skip. (B, T, D) → (B, T, D)."""
    if mod is not None:
        h = b.call(ops.modulate, h, *mod, role="modulate")
    y = compute(h)
    if layer.placement in ("sandwich", "output"):
        y = b.norm(y, layer.norm, f"layers.{i}.{kind}_out_norm", f"norm.{kind}_out")
    y = b.dropout(y, layer.dropout, f"layers.{i}.{kind}_dropout", f"{kind}.dropout")
    return b.nest(y, "skip") if layer.skippable else y


def _parallel(b: _Builder, x: fx.Node, i: int, layer: S.Layer, mod: tuple | None, attn, mlp) -> fx.Node:
    """A parallel layer (GPT-NeoX, Falcon, Phi-2): x + attn(n1(x)) + mlp(n2(x)); with shared_norm n2 = n1.
    x: (B, T, D)."""
    h1 = b.norm(x, layer.norm, f"layers.{i}.attn_norm", "norm.attn")
    h2 = h1 if layer.shared_norm else b.norm(x, layer.norm, f"layers.{i}.mlp_norm", "norm.mlp")
    ya = _branch(b, h1, i, layer, "attn", mod, attn)
    ym = _branch(b, h2, i, layer, "mlp", mod, mlp)
    x = b.call(operator.add, x, ya, role="residual.attn")
    return b.call(operator.add, x, ym, role="residual.mlp")


def _cache_rope(b: _Builder, x: fx.Node, dim: int, pos: S.Positions) -> fx.Node:
    """The cached graph's (cos, sin) node, (B, 1, S, dim) at its position ids; fixed frequency scalings only
    (`cache_refusal` refuses those that depend on the length)."""
    sc = pos.scaling
    if sc is None:
        return b.call(ops.rope_at, b.cache.positions, x, dim, pos.theta, role="rope")
    inv = tuple(tables.rope_inv_freq(dim, pos.theta, sc).tolist())
    return b.call(ops.rope_at, b.cache.positions, x, dim, pos.theta, inv, sc.attention if sc.kind == "yarn" else 1.0,
                  role="rope")


def _rope_tables(b: _Builder, x: fx.Node, dim: int, pos: S.Positions) -> fx.Node:
    """The (cos, sin) node of rotary embeddings over `dim` dims, with the spec's frequency scaling."""
    sc = pos.scaling
    if sc is None:
        return b.call(ops.rope_tables, x, dim, pos.theta, role="rope")
    if sc.kind == "dynamic":  # the base depends on the sequence length: computed in the graph
        return b.call(ops.dynamic_rope_tables, x, dim, pos.theta, sc.factor, sc.original, role="rope")
    if sc.kind == "longrope":  # short or long factors, chosen in the graph by the sequence length
        short, long = (tuple(tables.longrope_inv_freq(dim, pos.theta, f).tolist()) for f in (sc.short, sc.long))
        return b.call(ops.longrope_tables, x, short, long, sc.original, sc.attention, role="rope")
    inv = tuple(tables.rope_inv_freq(dim, pos.theta, sc).tolist())  # fixed: constants of the graph
    return b.call(ops.scaled_rope_tables, x, inv, sc.attention if sc.kind == "yarn" else 1.0, role="rope")


def _token_embedding(b: _Builder, spec: S.Spec, ids: fx.Node, cond: fx.Node | None
                     ) -> tuple[fx.Node, fx.Node | None]:
    """Token embeddings (B, T, D): one table, one table per token type, or mixed expert tables."""
    e = spec.embed
    if e.experts is not None:
        x = e.experts
        tables = b.param("embed.experts.weight", (("M",), ("V",), ("D",)), "embed.experts", "normal",
                         ("in", "in", "out"))  # (M, V, D)
        if x.gate == "token":
            gate = b.param("embed.gate.weight", (("V",), ("M",)), "embed.gate", "zeros", ("in", "out"))
            logits = b.call(F.embedding, ids, gate, role="embed.gate")  # (B, T, M)
        else:
            logits = b.linear(cond, "embed.gate", ("M",), ("Cn",), True, "embed.gate", init="zeros")  # (B, M)
        return b.call(ops.mix_experts, ids, tables, logits, x.top, role="embed.experts"), None
    if e.types:
        parts = [b.param(f"embed.types.{t.name}.weight", ((f"V:{t.name}",), ("D",)), "embed.tokens", "normal",
                         ("in", "out")) for t in e.types]
        table = b.call(torch.cat, parts, role="embed.tokens")  # (V, D): the types' ranges in order
    else:
        table = b.param("embed.tokens.weight", (("V",), ("D",)), "embed.tokens", "normal", ("in", "out"))
    return b.call(F.embedding, ids, table, role="embed.tokens"), table


def _film(b: _Builder, x: fx.Node, src: fx.Node, film: S.Film, name: str, src_ax: tuple) -> fx.Node:
    """x ⊙ (1 + γ) + β with γ, β = W_γ,β · gelu(W_h · src); W_γ, W_β start at zero (the identity)."""
    hid = (f"F:{name}",)
    h = b.call(F.gelu, b.linear(src, f"{name}.hidden", hid, src_ax, True, name), role=name)
    gamma = b.linear(h, f"{name}.scale", ("D",), hid, True, name, init="zeros", out_io="scale")
    beta = b.linear(h, f"{name}.shift", ("D",), hid, True, name, init="zeros")
    return b.call(ops.film, x, gamma, beta, role=name)


def _attention(b: _Builder, i: int, a: S.Attention, h: fx.Node, bsz: fx.Node, seq: fx.Node,
               mask: fx.Node, rope: tuple[fx.Node, fx.Node] | None) -> fx.Node:
    H, G, K, Dv = f"H[{i}]", f"G[{i}]", f"K[{i}]", f"Dv[{i}]"  # noqa: N806
    pre = f"layers.{i}.attn"
    nested = a.nested is not None  # the head count is set at run time by the active granularity

    def heads(name: str, n: tuple[str, int], d: tuple[str, int]) -> fx.Node:
        y = b.linear(h, f"{pre}.{name}", (n[0], d[0]), ("D",), a.bias, f"attn.{name}")  # (B, T, n·d)
        qk = a.qk_norm is not None and name in ("q", "k")
        if qk and a.qk_norm_over == "all":  # over the whole projection (OLMo 2)
            y = b.norm(y, a.qk_norm, f"{pre}.{name}_norm", f"norm.{name}", over=(n[0], K))  # (B, T, n·K)
        count, sym = (-1, None) if nested else (n[1], n[0])
        y = b.method("view", y, bsz, seq, count, d[1], role=f"attn.{name}", shape=(None, None, sym, d[0]))
        if qk and a.qk_norm_over == "head":  # per head, over K (Qwen3, Gemma 3)
            y = b.norm(y, a.qk_norm, f"{pre}.{name}_norm", f"norm.{name}", over=K)  # (B, T, n, K)
        return b.method("transpose", y, 1, 2, role=f"attn.{name}")  # (B, n, T, d)

    q = heads("q", (H, a.heads), (K, a.head_dim))  # (B, H, T, K)
    k = heads("k", (G, a.kv_heads), (K, a.head_dim))  # (B, G, T, K)
    v = heads("v", (G, a.kv_heads), (Dv, a.value_dim))  # (B, G, T, Dv)
    if rope is not None:
        q = b.call(ops.apply_rope, q, *rope, role="attn.rope")
        k = b.call(ops.apply_rope, k, *rope, role="attn.rope")
    if b.cache is not None:  # the KV cache: keys after rope, kv heads un-expanded, past then new on the T axis
        k = b.call(ops.cache_concat, b.cache.past[i][0], k, role="attn.k")  # (B, G, P + S, K)
        v = b.call(ops.cache_concat, b.cache.past[i][1], v, role="attn.v")  # (B, G, P + S, Dv)
        b.presents.append((k, v))
    if a.kv_heads != a.heads:  # GQA / MQA: each kv head serves H/G contiguous query heads
        r = a.heads // a.kv_heads
        k = b.call(torch.repeat_interleave, k, r, dim=1, role="attn.k", shape=("H/G",))  # (B, H, T, K)
        v = b.call(torch.repeat_interleave, v, r, dim=1, role="attn.v", shape=("H/G",))  # (B, H, T, Dv)
    scale = a.scale if a.scale is not None else 1.0 / math.sqrt(a.head_dim)
    if a.softcap is not None:  # written out: SDPA cannot cap the scores before its softmax
        o = _capped(b, pre, a, q, k, v, mask, scale)
    elif a.dropout > 0:
        o = b.module(f"{pre}.sdpa", ops.DropoutAttention(a.dropout, scale), (q, k, v, mask), "attn.sdpa")
    else:
        o = b.call(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, scale=scale, role="attn.sdpa")
    o = b.method("transpose", o, 1, 2, role="attn.o")  # (B, T, H, Dv)
    o = b.method("reshape", o, bsz, seq, -1 if nested else a.heads * a.value_dim, role="attn.o",
                 shape=(None, None, None if nested else (H, Dv)))
    return b.linear(o, f"{pre}.o", ("D",), (H, Dv), a.out_bias, "attn.o", init="residual")  # (B, T, D)


def _capped(b: _Builder, pre: str, a: S.Attention, q: fx.Node, k: fx.Node, v: fx.Node, mask: fx.Node | None,
            scale: float) -> fx.Node:
    """Soft-capped attention (B, H, T, Dv): explicit matmul, cap, mask and softmax (ops.capped_attention)."""
    if a.dropout > 0:
        return b.module(f"{pre}.sdpa", ops.CappedAttention(a.dropout, scale, a.softcap), (q, k, v, mask), "attn.sdpa")
    return b.call(ops.capped_attention, q, k, v, mask, scale, a.softcap, role="attn.sdpa")


def _mlp(b: _Builder, i: int, m: S.MLP, h: fx.Node) -> fx.Node:
    if m.moe:
        return _moe(b, i, m, h)
    return _dense_mlp(b, f"layers.{i}.mlp", (f"F[{i}]",), m, h)


def _dense_mlp(b: _Builder, pre: str, hid: tuple, m: S.MLP, h: fx.Node) -> fx.Node:
    """up (and gate), activation, down: (B, T, D) → (B, T, D) through `hid` hidden units."""
    up = b.linear(h, f"{pre}.up", hid, ("D",), m.bias, "mlp.up")  # (B, T, F)
    act = ACT[S.GATED.get(m.activation, m.activation)]
    if m.gated:
        gate = b.linear(h, f"{pre}.gate", hid, ("D",), m.bias, "mlp.gate")  # (B, T, F)
        z = b.call(operator.mul, b.call(act, gate, role="mlp.act"), up, role="mlp.act")
    else:
        z = b.call(act, up, role="mlp.act")
    return b.linear(z, f"{pre}.down", ("D",), hid, m.bias, "mlp.down", init="residual")  # (B, T, D)


def _moe(b: _Builder, i: int, m: S.MLP, h: fx.Node) -> fx.Node:
    """A mixture of experts in dense form: every expert runs on every token, and the top-k gates
    (zero for the experts not chosen) weight their outputs; plus an optional shared expert."""
    E, Fh = f"E[{i}]", f"F[{i}]"  # noqa: N806
    pre = f"layers.{i}.mlp"
    router = b.param(f"{pre}.router.weight", ((E,), ("D",)), "mlp.router", "normal", ("expert", "in"))
    gates = b.call(ops.moe_gates, h, router, m.top_k, m.normalize, role="mlp.router")  # (B, T, E)

    def stacked(name: str, role: str, out_ax: str, in_ax: str, init: str = "normal") -> tuple[fx.Node, fx.Node | None]:
        w = b.param(f"{pre}.experts.{name}.weight", ((E,), (out_ax,), (in_ax,)), role, init, ("expert", "out", "in"))
        bias = b.param(f"{pre}.experts.{name}.bias", ((E,), (out_ax,)), role, "zeros", ("expert", "out")) \
            if m.bias else None
        return w, bias

    up = b.call(ops.expert_linear, h, *stacked("up", "mlp.up", Fh, "D"), role="mlp.up")  # (B, T, E, F)
    act = ACT[S.GATED.get(m.activation, m.activation)]
    if m.gated:
        gate = b.call(ops.expert_linear, h, *stacked("gate", "mlp.gate", Fh, "D"), role="mlp.gate")  # (B, T, E, F)
        z = b.call(operator.mul, b.call(act, gate, role="mlp.act"), up, role="mlp.act")
    else:
        z = b.call(act, up, role="mlp.act")
    down = stacked("down", "mlp.down", "D", Fh, "residual")
    y = b.call(ops.expert_mix, z, *down, gates, role="mlp.down")  # (B, T, D)
    if m.shared is None:
        return y
    s = _dense_mlp(b, f"{pre}.shared", (f"Fs[{i}]",), m, h)  # (B, T, D)
    if m.shared_gate:
        w = b.param(f"{pre}.shared_gate.weight", ((), ("D",)), "mlp.shared_gate", "normal", ("out", "in"))
        s = b.call(operator.mul, s, b.call(torch.sigmoid, b.call(F.linear, h, w, role="mlp.shared_gate"),
                                           role="mlp.shared_gate"), role="mlp.shared_gate")  # (B, T, D) × (B, T, 1)
    return b.call(operator.add, y, s, role="mlp.down")
