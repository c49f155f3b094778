"""Embeddings, norms, activations, linear layers, the MLP and the heads, as ONNX nodes.

Symbols as in `mptc.spec`: B batch, S the new positions, T = P + S all positions, D width, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import spec as S
from .. import tables
from .graph import MS, NP_DTYPES, DataType, Graph, Value
from .tensors import interleaved, transposed_experts
from .weights import Weights


@dataclass
class Ctx:
    """What every block reads: the graph, the spec, the weights and the chosen form."""

    g: Graph
    spec: S.Spec
    weights: Weights  # name → Weight, read when the model is written
    profile: str = "portable"  # portable | genai
    cache: bool = False
    max_length: int | None = None
    quant_block: int | None = None  # the block of a weight-only quantization to follow (int4/int8), else None
    shared: dict = field(default_factory=dict)  # per-forward values built once (shapes, masks, tables)

    def w(self, name: str, transpose: bool = False) -> Value:
        return self.g.weight(name, self.weights[name], transpose=transpose)

    def has(self, name: str) -> bool:
        return name in self.weights

    @property
    def fused(self) -> bool:
        """ONNX Runtime's fused norms (the GenAI profile)."""
        return self.profile == "genai"


def linear(c: Ctx, x: Value, name: str) -> Value:
    """x (…, in) @ Wᵀ + b → (…, out); the weight is stored transposed, as MatMul reads it."""
    y = c.g.op("MatMul", x, c.w(f"{name}.weight", transpose=True))
    return c.g.op("Add", y, c.w(f"{name}.bias")) if c.has(f"{name}.bias") else y


# --- norms ---
def norm(c: Ctx, x: Value, n: S.Norm, name: str) -> Value:
    """A norm over the last axis; math in float32 (stash_type 1) for float16 graphs."""
    g, w = c.g, c.w(f"{name}.weight")
    if n.kind == "layernorm":
        b = c.w(f"{name}.bias") if c.has(f"{name}.bias") else None
        return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=n.eps)
    if c.fused:
        return g.op("SimplifiedLayerNormalization", x, w, axis=-1, epsilon=n.eps, stash_type=1)
    if g.opset >= 23:
        return g.op("RMSNormalization", x, w, axis=-1, epsilon=n.eps, stash_type=1)
    xf = g.op("Cast", x, to=DataType.FLOAT) if g.dtype != "float32" else x
    ms = g.op("ReduceMean", g.op("Mul", xf, xf), g.ints(-1), keepdims=1)  # (…, 1)
    eps = g.const(n.eps, dtype=np.float32)
    y = g.op("Div", xf, g.op("Sqrt", g.op("Add", ms, eps)))
    if g.dtype != "float32":
        y = g.op("Cast", y, to=g.float)
    return g.op("Mul", y, w)


def add_norm(c: Ctx, x: Value, y: Value, n: S.Norm | None, name: str | None) -> tuple[Value, Value | None]:
    """The residual sum x + y and its norm (None without one); one fused node in the GenAI profile."""
    if n is None:
        return c.g.op("Add", x, y), None
    if c.fused:
        w = c.w(f"{name}.weight")
        if n.kind == "rmsnorm":
            out = c.g.ops("SkipSimplifiedLayerNormalization", x, y, w, n=4, domain=MS, epsilon=n.eps)
        else:
            b = c.w(f"{name}.bias") if c.has(f"{name}.bias") else None
            out = c.g.ops("SkipLayerNormalization", x, y, w, b, n=4, domain=MS, epsilon=n.eps)
        return out[3], out[0]
    s = c.g.op("Add", x, y)
    return s, norm(c, s, n, name)


# --- activations ---
def act(c: Ctx, x: Value, kind: str) -> Value:
    g = c.g
    if kind == "relu":
        return g.op("Relu", x)
    if kind == "tanh":
        return g.op("Tanh", x)
    if kind == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    approx = "tanh" if kind == "gelu_tanh" else "none"
    if g.opset >= 20:
        return g.op("Gelu", x, approximate=approx)
    half = g.op("Mul", x, g.const(0.5))
    if kind == "gelu":  # ½x(1 + erf(x/√2))
        inner = g.op("Erf", g.op("Mul", x, g.const(1 / math.sqrt(2))))
    else:  # ½x(1 + tanh(√(2/π)(x + 0.044715x³)))
        cube = g.op("Mul", g.op("Mul", x, x), x)
        inner = g.op("Tanh", g.op("Mul", g.op("Add", x, g.op("Mul", cube, g.const(0.044715))),
                                  g.const(math.sqrt(2 / math.pi))))
    return g.op("Mul", half, g.op("Add", inner, g.const(1.0)))


def mlp(c: Ctx, i: int, m: S.MLP, h: Value) -> Value:
    """(B, S, D) → (B, S, D): a dense MLP, or a mixture of experts (with its shared expert)."""
    pre = f"layers.{i}.mlp"
    if not m.moe:
        return dense_mlp(c, pre, m, h)
    if moe_op_fits(c, m) and not _qmoe_misfit(c, m):
        y = moe_op(c, pre, m, h)  # (B, S, D)
    else:
        if c.profile == "genai":
            c.shared.setdefault("notes", []).append(f"layer {i}: dense mixture of experts ({_dense_why(c, m)})")
        y = moe_dense(c, pre, m, h)  # (B, S, D)
    if m.shared is None:
        return y
    s = dense_mlp(c, f"{pre}.shared", m, h)  # (B, S, D)
    if m.shared_gate:  # × sigmoid(w · h) (B, S, 1)
        s = c.g.op("Mul", s, c.g.op("Sigmoid", c.g.op("MatMul", h, c.w(f"{pre}.shared_gate.weight", transpose=True))))
    return c.g.op("Add", y, s)


def dense_mlp(c: Ctx, pre: str, m: S.MLP, h: Value) -> Value:
    """(B, S, D) → (B, S, D): up (and gate), activation, down."""
    up = linear(c, h, f"{pre}.up")  # (B, S, F)
    if m.gated:
        z = c.g.op("Mul", act(c, linear(c, h, f"{pre}.gate"), S.GATED[m.activation]), up)
    else:
        z = act(c, up, m.activation)
    return linear(c, z, f"{pre}.down")


# --- mixture of experts ---
MOE_ACTIVATIONS = {"relu": "relu", "silu": "silu", "gelu_tanh": "gelu", "swiglu": "swiglu"}  # com.microsoft.MoE's


def _qmoe_misfit(c: Ctx, m: S.MLP) -> bool:
    """Whether a quantization to follow would leave this MoE layer float: QMoE's blocks must divide the width and
    the experts' hidden size (the dense form's MatMulNBits pad a partial block)."""
    return c.quant_block is not None and (c.spec.width % c.quant_block != 0 or m.hidden % c.quant_block != 0)


def _dense_why(c: Ctx, m: S.MLP) -> str:
    if m.activation not in MOE_ACTIVATIONS or c.g.dtype != "float32":
        why = f"activation {m.activation}" if m.activation not in MOE_ACTIVATIONS else f"dtype {c.g.dtype}"
        return f"{why}: com.microsoft.MoE's CPU kernel does not compute it"
    return (f"width {c.spec.width}, hidden {m.hidden}: QMoE needs multiples of {c.quant_block}, so the experts are "
            "quantized as MatMulNBits")


def moe_op_fits(c: Ctx, m: S.MLP) -> bool:
    """Whether the layer runs as ONNX Runtime's `com.microsoft.MoE` (the genai profile, float32, an activation
    its CPU kernel computes as mptc does: its gelu is the tanh form, its SwiGLU silu(gate) · up)."""
    return c.profile == "genai" and c.g.dtype == "float32" and m.activation in MOE_ACTIVATIONS


def moe_gates(c: Ctx, pre: str, m: S.MLP, h: Value) -> Value:
    """Dense gates (B, S, E): softmax of the router logits, the top k kept (renormalised if `normalize`), zero
    elsewhere (as mptc.ops.moe_gates; TopK breaks ties by the lower index)."""
    g = c.g
    probs = g.op("Softmax", g.op("MatMul", h, c.w(f"{pre}.router.weight", transpose=True)), axis=-1)  # (B, S, E)
    top, idx = g.ops("TopK", probs, g.ints(m.top_k), n=2, axis=-1, largest=1, sorted=1)  # (B, S, k)
    if m.normalize:
        top = g.op("Div", top, g.op("ReduceSum", top, g.ints(-1), keepdims=1))
    return g.op("ScatterElements", g.op("Mul", probs, g.const(0.0)), idx, top, axis=-1)


def _experts_in(c: Ctx, name: str, e: int, f: int) -> Value:
    """Stacked input projections (E, F, D) as one MatMul weight (D, E·F), transposed when written (an
    initializer, so the weight-only quantization sees it)."""
    w = c.weights[name]
    return c.g.weight(name, w.reshape(e * f, w.shape[-1]), transpose=True)


def _experts_out(c: Ctx, name: str) -> Value:
    """Stacked output projections (E, D, F) as one MatMul weight (E·F, D): each expert transposed when written."""
    return c.g.tensor(name, transposed_experts(c.weights[name], np.dtype(NP_DTYPES[c.g.dtype])))


def moe_dense(c: Ctx, pre: str, m: S.MLP, h: Value) -> Value:
    """Every expert on every token, weighted by the dense gates: (B, S, D) → (B, S, D), as mptc's PyTorch
    graph computes it (one MatMul over all experts' hidden units per projection)."""
    g, e, f = c.g, m.experts, m.hidden
    gates = moe_gates(c, pre, m, h)  # (B, S, E)

    def proj(name: str) -> Value:  # (B, S, E·F)
        y = g.op("MatMul", h, _experts_in(c, f"{pre}.experts.{name}.weight", e, f))
        bias = f"{pre}.experts.{name}.bias"
        return g.op("Add", y, c.g.weight(bias, c.weights[bias].reshape(e * f))) if c.has(bias) else y  # (E·F,)

    up = proj("up")
    z = g.op("Mul", act(c, proj("gate"), S.GATED[m.activation]), up) if m.gated else act(c, up, m.activation)
    gz = g.op("Mul", g.op("Reshape", z, g.ints(0, 0, e, f)), g.op("Unsqueeze", gates, g.ints(-1)))  # (B, S, E, F)
    down = _experts_out(c, f"{pre}.experts.down.weight")  # (E·F, D)
    y = g.op("MatMul", g.op("Reshape", gz, g.ints(0, 0, e * f)), down)  # (B, S, D)
    bias = f"{pre}.experts.down.bias"
    return g.op("Add", y, g.op("MatMul", gates, c.w(bias))) if c.has(bias) else y


def _interleaved(c: Ctx, gate: str, up: str, name: str) -> Value:
    """Stacked gate and up (E, F, …) as one initializer (E, 2F, …), their rows alternated per expert when
    written (gate first), as the fused SwiGLU weight of MoE reads them (and QMoE quantizes them)."""
    return c.g.tensor(name, interleaved(c.weights[gate], c.weights[up], np.dtype(NP_DTYPES[c.g.dtype])))


def moe_op(c: Ctx, pre: str, m: S.MLP, h: Value) -> Value:
    """ONNX Runtime's `com.microsoft.MoE` (routing, top-k and the chosen experts only): (B, S, D) → (B, S, D).
    SwiGLU takes gate and up interleaved in one weight (E, 2F, D), the only form its CPU kernel reads."""
    g, d = c.g, c.spec.width
    x = g.op("Reshape", h, g.ints(-1, d))  # (B·S, D)
    logits = g.op("MatMul", x, c.w(f"{pre}.router.weight", transpose=True))  # (B·S, E)
    ex = f"{pre}.experts"
    bias = {n: c.has(f"{ex}.{n}.bias") for n in ("up", "down")}
    extra = {}
    if m.gated:  # (E, 2F, D), (E, 2F)
        fc1 = _interleaved(c, f"{ex}.gate.weight", f"{ex}.up.weight", f"{ex}.gate_up.weight")
        fc1_bias = _interleaved(c, f"{ex}.gate.bias", f"{ex}.up.bias", f"{ex}.gate_up.bias") if bias["up"] else None
        extra = {"swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
    else:  # (E, F, D), (E, F)
        fc1, fc1_bias = c.w(f"{ex}.up.weight"), c.w(f"{ex}.up.bias") if bias["up"] else None
    fc2_bias = c.w(f"{ex}.down.bias") if bias["down"] else None  # (E, D)
    y = g.op("MoE", x, logits, fc1, fc1_bias, c.w(f"{ex}.down.weight"), fc2_bias, domain=MS, k=m.top_k,
             activation_type=MOE_ACTIVATIONS[m.activation], normalize_routing_weights=int(m.normalize), **extra)
    return g.op("Reshape", y, g.op("Shape", h))  # (B, S, D)


# --- shapes and embeddings ---
def seq_len(c: Ctx, x: Value | None = None) -> Value:
    """S as a (1,) int64 tensor, from the first value (B, S, …) it is asked with."""
    if "seq" not in c.shared:
        c.shared["seq"] = c.g.op("Shape", x, start=1, end=2)
    return c.shared["seq"]


def patches(c: Ctx, pixels: Value) -> Value:
    """(B, C, S, S) images → (B, N, D) patch embeddings (a Conv with stride = kernel), the class token first."""
    g, p, d = c.g, c.spec.patches, c.spec.width
    w = g.weight("embed.patch.weight", c.weights["embed.patch.weight"].reshape(d, p.channels, p.patch, p.patch))
    x = g.op("Conv", pixels, w, c.w("embed.patch.bias"), kernel_shape=[p.patch, p.patch], strides=[p.patch, p.patch])
    x = g.op("Transpose", g.op("Reshape", x, g.ints(0, 0, -1)), perm=[0, 2, 1])  # (B, N, D)
    if p.cls:
        batch = g.op("Shape", pixels, start=0, end=1)
        cls = g.op("Expand", g.op("Reshape", c.w("embed.cls"), g.ints(1, 1, d)),
                   g.op("Concat", batch, g.ints(1, d), axis=0))  # (B, 1, D)
        x = g.op("Concat", cls, x, axis=1)  # (B, N + 1, D)
    return x


def embed(c: Ctx, ins: dict[str, Value]) -> Value:
    """Token (+ segment) (+ position) embeddings and the embedding norm: (B, S, D)."""
    g, e = c.g, c.spec.embed
    if "pixel_values" in ins:
        x = patches(c, ins["pixel_values"])  # (B, N', D)
        seq_len(c, x)
    else:
        ids = ins["input_ids"]
        seq_len(c, ids)
        x = g.op("Gather", c.w("embed.tokens.weight"), ids, axis=0)  # (B, S, D)
    if c.spec.embed_scale is not None:
        x = g.op("Mul", x, g.const(c.spec.embed_scale))
    if e.segments:
        x = g.op("Add", x, g.op("Gather", c.w("embed.segments.weight"), ins["token_type_ids"], axis=0))
    kind = e.positions.kind
    if kind in ("learned", "sinusoidal"):
        table = c.w("embed.positions.weight") if kind == "learned" else g.table(
            "embed.sinusoidal", tables.sinusoidal(c.spec.seq_len, c.spec.width))  # (P, D)
        if "position_ids" in ins:
            pos = g.op("Gather", table, ins["position_ids"], axis=0)  # (B, S, D)
        elif e.positions.skip_padding and "attention_mask" in ins:  # counted over the real tokens: cumsum − 1
            mask = g.op("Cast", ins["attention_mask"], to=DataType.INT64)
            ids = g.op("CumSum", mask, g.const(1, dtype=np.int64))  # (B, S)
            ids = g.op("Max", g.op("Sub", ids, g.const(1, dtype=np.int64)), g.const(0, dtype=np.int64))
            pos = g.op("Gather", table, ids, axis=0)  # (B, S, D)
        else:
            pos = g.op("Slice", table, g.ints(0), seq_len(c), g.ints(0))  # (S, D)
        x = g.op("Add", x, pos)
    if e.norm is not None:
        x = norm(c, x, e.norm, "embed.norm")
    return x


def rope_freqs(pos: S.Positions, rotary: int) -> tuple[np.ndarray, float]:
    """The inverse frequencies (R/2,) float32, with a fixed scaling, and yarn's factor on cos/sin."""
    sc = pos.scaling
    inv = tables.rope_inv_freq(rotary, pos.theta, sc)
    return inv, (sc.attention if sc is not None and sc.kind == "yarn" else 1.0)


def rope_table(pos: S.Positions, rotary: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (rows, R), computed as the PyTorch model computes them (rotate-half layout)."""
    inv, attention = rope_freqs(pos, rotary)
    return tables.rope_table(inv, rows, attention)


# --- heads ---
def softcap(c: Ctx, x: Value) -> Value:
    """cap · tanh(x / cap) with the head's soft cap (x itself without one)."""
    cap = c.spec.head.softcap
    if cap is None:
        return x
    return c.g.op("Mul", c.g.op("Tanh", c.g.op("Div", x, c.g.const(cap))), c.g.const(cap))


def head(c: Ctx, x: Value, mask: Value | None) -> Value:
    """The head on the final hidden states x (B, S, D), already normed: logits or x itself."""
    g, hd = c.g, c.spec.head
    if hd.kind == "none":
        return x
    if hd.kind == "lm":
        if hd.transform is not None:
            x = act(c, linear(c, x, "head.transform"), hd.transform.activation)
            if hd.transform.norm is not None:
                x = norm(c, x, hd.transform.norm, "head.transform_norm")
        if hd.tied:
            y = g.op("MatMul", x, g.weight("embed.tokens.weight_t", c.weights["embed.tokens.weight"], transpose=True))
            return softcap(c, g.op("Add", y, c.w("head.bias")) if c.has("head.bias") else y)  # (B, S, V)
        return softcap(c, linear(c, x, "head.out"))  # (B, S, V)
    if hd.kind == "span":  # start and end logits per position
        return linear(c, x, "head.out")  # (B, S, 2)
    if hd.pool == "none":  # every position classified: (B, S, D) → (B, S, C)
        pass
    elif hd.pool == "first":
        x = g.op("Gather", x, g.const(np.array(0, dtype=np.int64)), axis=1)  # (B, D)
    elif hd.pool == "last" and mask is None:
        x = g.op("Gather", x, g.const(np.array(-1, dtype=np.int64)), axis=1)  # (B, D)
    elif hd.pool == "last":  # each row's last real position (the first maximum, as torch.argmax)
        t = g.op("Squeeze", seq_len(c), g.ints(0))
        ar = g.op("Range", g.const(np.array(0, dtype=np.int64)), t, g.const(np.array(1, dtype=np.int64)))  # (S,)
        zero = g.const(np.array(0, dtype=np.int64))
        real = g.op("Cast", g.op("Not", g.op("Equal", mask, zero)), to=DataType.INT64)  # (B, S)
        idx = g.op("ArgMax", g.op("Mul", ar, real), axis=-1, keepdims=1)  # (B, 1)
        x = g.op("GatherND", x, idx, batch_dims=1)  # (B, D)
    elif mask is None:
        x = g.op("ReduceMean", x, g.ints(1), keepdims=0)  # (B, D)
    else:
        m = g.op("Unsqueeze", g.op("Cast", mask, to=g.float), g.ints(-1))  # (B, S, 1)
        total = g.op("ReduceSum", g.op("Mul", x, m), g.ints(1), keepdims=0)  # (B, D)
        count = g.op("Max", g.op("ReduceSum", m, g.ints(1), keepdims=0), g.const(1.0))  # (B, 1)
        x = g.op("Div", total, count)
    if hd.pooler:
        x = g.op("Tanh", linear(c, x, "head.pooler"))
    return linear(c, x, "head.out")  # (B, C), or (B, S, C) per position
