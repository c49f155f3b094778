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

from . import ops
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


class IO(StrEnum):
    """What one axis of a parameter is to the values around it."""

    OUT = "out"  # the values it writes
    IN = "in"  # what it reads or is indexed by
    NORM = "norm"  # a norm's gain or shift (over `NodeInfo.norm_over`)
    SCALE = "scale"  # a multiplicative modulation (1 + γ, or a per-type scale)


PARAM_ROLES = frozenset({  # the roles a parameter can have
    Role.MODULATE, Role.HYPER, Role.EMBED_TOKENS, Role.EMBED_SEGMENTS, Role.EMBED_PATCH, Role.EMBED_CLS,
    Role.EMBED_MODALITY, Role.EMBED_POSITIONS, Role.EMBED_EXPERTS, Role.EMBED_GATE, Role.EMBED_CONDITION,
    Role.EMBED_ADAPTIVE, Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.MLP_UP, Role.MLP_GATE,
    Role.MLP_DOWN, Role.HEAD_OUT, Role.HEAD_POOLER, Role.HEAD_TRANSFORM, Role.NORM_EMBED, Role.NORM_ATTN,
    Role.NORM_MLP, Role.NORM_HEAD, Role.NORM_TRANSFORM, Role.NORM_Q, Role.NORM_K})


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

    def norm(self, x: fx.Node, norm: S.Norm, name: str, role: str, over: str = "D") -> fx.Node:
        """A norm over the last axis of x, whose size is the symbol `over` (D, or K[l] for a q/k norm)."""
        w = self.param(f"{name}.weight", ((over,),), role, "ones", ("norm",), over)
        n = (self.sizes[over],)
        if norm.kind == "rmsnorm":
            return self.call(F.rms_norm, x, n, w, norm.eps, role=role, shape=(over,))
        b = self.param(f"{name}.bias", ((over,),), role, "zeros", ("norm",), over) if norm.bias else None
        return self.call(F.layer_norm, x, n, w, b, norm.eps, role=role, shape=(over,))

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


def lower(spec: S.Spec, device: torch.device | str = "cpu") -> Lowered:
    """Build the graph and an uninitialised parameter tree (float32, on `device`)."""
    b = _Builder(spec, device)
    g = b.g
    e = spec.embed

    # --- inputs and embeddings ---  x: (B, T, D)
    # placeholders in the order of spec.inputs; all but the first may be left out (None)
    ins = {name: b.input(name, **({} if k == 0 else {"default_value": None})) for k, name in enumerate(spec.inputs)}
    for name, shape in _required_inputs(spec).items():  # a clear error, not a TypeError deep in the graph
        ins[name] = b.call(require_input, ins[name], spec.name, name, shape, role="input")
    src, mask_in, cond = ins.get("input_ids"), ins.get("attention_mask"), ins.get("conditions")  # (B, T), (B, Cn)
    b.conditions = cond
    image = None
    if spec.reads_tokens:
        x, table = _token_embedding(b, spec, src, cond)  # (B, T, D); the token table, if there is one
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
        ids = b.call(ops.positions, x, role="embed.positions")  # (T,)
        x = b.call(operator.add, x, b.call(F.embedding, ids, pos, role="embed.positions"), role="embed.positions")
    elif e.positions.kind == "sinusoidal":
        x = b.call(operator.add, x, b.call(ops.sinusoidal, x, role="embed.positions"), role="embed.positions")
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
    masks = {(kind, w): b.call(ops.attention_mask, mask_in, x, kind == "causal", w or None, role=f"mask.{kind}")
             for kind, w in kinds}
    rope: dict[int, tuple[fx.Node, fx.Node]] = {}
    if e.positions.kind == "rope":
        for k in sorted({layer.attention.rotary for layer in spec.layers}):
            cs = b.call(ops.rope_tables, x, k, e.positions.theta, role="rope")
            rope[k] = (b.call(operator.getitem, cs, 0, role="rope"), b.call(operator.getitem, cs, 1, role="rope"))

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
        x = _sublayer(b, x, i, layer, "attn", mod, lambda h, i=i, a=a: _attention(
            b, i, a, h, bsz, seq, masks[a.mask, a.window or 0], rope.get(a.rotary)))
        x = _sublayer(b, x, i, layer, "mlp", mod, lambda h, i=i, m=layer.mlp: _mlp(b, i, m, h))
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
    elif hd.kind == "classify":
        if hd.pool == "first":
            x = b.call(ops.pool_first, x, role="head.pool")  # (B, D)
        else:
            x = b.call(ops.pool_mean, x, mask_in, role="head.pool")  # (B, D)
        if hd.pooler:
            x = b.call(torch.tanh, b.linear(x, "head.pooler", ("D",), ("D",), True, "head.pooler"), role="head.pooler")
        x = b.linear(x, "head.out", ("C",), ("D",), hd.bias, "head.out")  # (B, C)
    b._tag(g.output(x), NodeInfo("output"))
    return Lowered(g, b.root, b.params)


def _sublayer(b: _Builder, x: fx.Node, i: int, layer: S.Layer, kind: str, mod: tuple | None, compute) -> fx.Node:
    """One residual sublayer (kind attn or mlp): norm (pre or post), type modulation, the branch,
    dropout, MatFormer skip, residual add. x: (B, T, D)."""
    norm = f"layers.{i}.{kind}_norm"
    pre = layer.placement == "pre"
    h = b.norm(x, layer.norm, norm, f"norm.{kind}") if pre else x
    if mod is not None:
        h = b.call(ops.modulate, h, *mod, role="modulate")
    y = b.dropout(compute(h), layer.dropout, f"layers.{i}.{kind}_dropout", f"{kind}.dropout")
    if layer.skippable:
        y = b.nest(y, "skip")
    x = b.call(operator.add, x, y, role=f"residual.{kind}")
    return x if pre else b.norm(x, layer.norm, norm, f"norm.{kind}")


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
        count, sym = (-1, None) if nested else (n[1], n[0])
        y = b.method("view", y, bsz, seq, count, d[1], role=f"attn.{name}", shape=(None, None, sym, d[0]))
        if a.qk_norm is not None and name in ("q", "k"):  # per head, over K (Qwen3, OLMo 2)
            y = b.norm(y, a.qk_norm, f"{pre}.{name}_norm", f"norm.{name}", over=K)  # (B, T, n, K)
        return b.method("transpose", y, 1, 2, role=f"attn.{name}")  # (B, n, T, d)

    q = heads("q", (H, a.heads), (K, a.head_dim))  # (B, H, T, K)
    k = heads("k", (G, a.kv_heads), (K, a.head_dim))  # (B, G, T, K)
    v = heads("v", (G, a.kv_heads), (Dv, a.value_dim))  # (B, G, T, Dv)
    if rope is not None:
        q = b.call(ops.apply_rope, q, *rope, role="attn.rope")
        k = b.call(ops.apply_rope, k, *rope, role="attn.rope")
    if a.kv_heads != a.heads:  # GQA / MQA: each kv head serves H/G contiguous query heads
        r = a.heads // a.kv_heads
        k = b.call(torch.repeat_interleave, k, r, dim=1, role="attn.k", shape=("H/G",))  # (B, H, T, K)
        v = b.call(torch.repeat_interleave, v, r, dim=1, role="attn.v", shape=("H/G",))  # (B, H, T, Dv)
    scale = 1.0 / math.sqrt(a.head_dim)
    if a.dropout > 0:
        o = b.module(f"{pre}.sdpa", ops.DropoutAttention(a.dropout, scale), (q, k, v, mask), "attn.sdpa")
    else:
        o = b.call(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, scale=scale, role="attn.sdpa")
    o = b.method("transpose", o, 1, 2, role="attn.o")  # (B, T, H, Dv)
    o = b.method("reshape", o, bsz, seq, -1 if nested else a.heads * a.value_dim, role="attn.o",
                 shape=(None, None, None if nested else (H, Dv)))
    return b.linear(o, f"{pre}.o", ("D",), (H, Dv), a.out_bias, "attn.o", init="residual")  # (B, T, D)


def _mlp(b: _Builder, i: int, m: S.MLP, h: fx.Node) -> fx.Node:
    hid = (f"F[{i}]",)
    pre = f"layers.{i}.mlp"
    up = b.linear(h, f"{pre}.up", hid, ("D",), m.bias, "mlp.up")  # (B, T, F)
    act = ACT[S.GATED.get(m.activation, m.activation)]
    if m.gated:
        gate = b.linear(h, f"{pre}.gate", hid, ("D",), m.bias, "mlp.gate")  # (B, T, F)
        z = b.call(operator.mul, b.call(act, gate, role="mlp.act"), up, role="mlp.act")
    else:
        z = b.call(act, up, role="mlp.act")
    return b.linear(z, f"{pre}.down", ("D",), hid, m.bias, "mlp.down", init="residual")  # (B, T, D)
