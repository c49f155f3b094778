"""The ONNX Runtime GenAI form of attention: `com.microsoft.GroupQueryAttention`, as its model builder writes it.

One packed QKV MatMul (B, S, (H + 2G)·K) feeds the kernel (separate q, k, v when a q/k norm sits between),
which applies rotary embeddings from cos/sin cache initializers (max_length, R/2), appends the new keys
and values to the past and attends causally (within `local_window_size` for windowed layers).
`seqlens_k` (B,) and `total_sequence_length` () are computed once from `attention_mask` (B, T).
"""

from __future__ import annotations

import numpy as np

from .. import spec as S
from .. import tables
from .attention import attention_scale, length_inv_freq, project, total_length
from .blocks import Ctx, linear, rope_table
from .graph import MS, Branch, DataType, Value


def fallback_reason(spec: S.Spec, a: S.Attention) -> str | None:
    """Why the CPU GroupQueryAttention kernel cannot run this layer (None: it can)."""
    if a.head_dim % 16:
        return f"head_dim {a.head_dim} is not a multiple of 16"
    if a.value_dim != a.head_dim:
        return f"value_dim {a.value_dim} differs from head_dim {a.head_dim}"
    if a.heads % a.kv_heads:
        return f"heads {a.heads} are not a multiple of kv_heads {a.kv_heads}"
    if spec.embed.positions.kind == "rope" and a.rotary % 16:
        return f"rotary_dim {a.rotary} is not a multiple of 16"
    if a.qk_norm is not None and a.qk_norm.kind != "rmsnorm":
        return "the q/k norm is a layernorm"
    return None


def lengths(c: Ctx, mask: Value) -> tuple[Value, Value]:
    """seqlens_k = Σ mask − 1 per row (B,) and total_sequence_length = T (), both int32."""
    if "gqa.lengths" not in c.shared:
        g = c.g
        total = g.op("ReduceSum", mask, g.ints(1), keepdims=0)  # (B,)
        seqlens = g.op("Cast", g.op("Sub", total, g.const(np.array(1, dtype=np.int64))), to=DataType.INT32)
        t = g.op("Gather", g.op("Shape", mask), g.const(np.array(1, dtype=np.int64)), axis=0)  # ()
        c.shared["gqa.lengths"] = (seqlens, g.op("Cast", t, to=DataType.INT32))
    return c.shared["gqa.lengths"]


def caches(c: Ctx, rotary: int, rope: S.Positions, ins: dict[str, Value]) -> tuple[Value, Value]:
    """cos_cache and sin_cache (max_length, R/2): the first half of the rotate-half tables; for a rope whose
    frequencies follow the total length, chosen (longrope) or computed (dynamic) in the graph from it."""
    key = ("gqa.rope", rotary, rope)
    if key not in c.shared:
        sc, h = rope.scaling, rotary // 2
        if sc is not None and sc.kind == "longrope":
            c.shared[key] = _longrope_caches(c, rotary, rope, ins)
        elif sc is not None and sc.kind == "dynamic":
            inv, _ = length_inv_freq(c, total_length(c, ins), rotary, rope)  # (R/2,)
            rows = c.g.const(np.arange(c.max_length, dtype=np.float32)[:, None], dtype=np.float32)  # (max_length, 1)
            ang = c.g.op("Mul", rows, inv)  # (max_length, R/2)
            c.shared[key] = tuple(c.g.op("Cast", c.g.op(f, ang), to=c.g.float) for f in ("Cos", "Sin"))
        else:
            cos, sin = rope_table(rope, rotary, c.max_length)
            c.shared[key] = (c.g.table(f"cos_cache.{rotary}", cos[:, :h]), c.g.table(f"sin_cache.{rotary}", sin[:, :h]))
    return c.shared[key]


def _longrope_caches(c: Ctx, rotary: int, rope: S.Positions, ins: dict[str, Value]) -> tuple[Value, Value]:
    """LongRoPE as GenAI's model builder writes it: short and long cos/sin caches (max_length, R/2), times
    `attention`, and an If on T > original that hands the kernel one pair."""
    g, sc, h = c.g, rope.scaling, rotary // 2
    pairs = {}
    for name, factors in (("short", sc.short), ("long", sc.long)):
        cos, sin = tables.rope_table(tables.longrope_inv_freq(rotary, rope.theta, factors), c.max_length, sc.attention)
        pairs[name] = (g.table(f"cos_cache_{name}.{rotary}", cos[:, :h]), g.table(f"sin_cache_{name}.{rotary}",
                                                                              sin[:, :h]))
    beyond = g.op("Greater", total_length(c, ins), g.const(np.array(sc.original, dtype=np.float32), dtype=np.float32))

    def branch(name: str) -> Branch:
        return Branch(f"rope_{name}_{rotary}", pairs[name], tuple(f"{v.name}_{name}_out" for v in pairs[name]),
                      (c.max_length, h))

    cos, sin = g.ops("If", beyond, n=2, then_branch=branch("long"), else_branch=branch("short"))
    return cos, sin


def attention(c: Ctx, i: int, a: S.Attention, h: Value, ins: dict[str, Value],
              past: tuple[Value, Value]) -> tuple[Value, tuple[Value, Value]]:
    """h (B, S, D) → (B, S, D), with present key and value (B, G, T, K)."""
    g, pre = c.g, f"layers.{i}.attn"
    if a.qk_norm is None:  # one MatMul for q, k and v
        w = g.packed(f"{pre}.qkv.weight", [c.weights[f"{pre}.{n}.weight"] for n in "qkv"])
        qkv = g.op("MatMul", h, w)  # (B, S, (H + 2G)·K)
        if c.has(f"{pre}.q.bias"):
            qkv = g.op("Add", qkv, g.packed(f"{pre}.qkv.bias", [c.weights[f"{pre}.{n}.bias"] for n in "qkv"]))
        q, k, v = qkv, None, None
    else:  # the q/k norm per head, between the projections and the kernel's rotary
        q = project(c, i, a, h, "q", a.heads, a.head_dim, split=False)  # (B, S, H·K)
        k = project(c, i, a, h, "k", a.kv_heads, a.head_dim, split=False)  # (B, S, G·K)
        v = linear(c, h, f"{pre}.v")
    seqlens, total = lengths(c, ins["attention_mask"])
    rope = c.spec.embed.positions.kind == "rope"
    cos, sin = caches(c, a.rotary, c.spec.layer_rope(i), ins) if rope else (None, None)
    o, pk, pv = g.ops("GroupQueryAttention", q, k, v, past[0], past[1], seqlens, total, cos, sin, n=3, domain=MS,
                      num_heads=a.heads, kv_num_heads=a.kv_heads, scale=attention_scale(a),
                      local_window_size=a.window if a.window is not None else -1, do_rotary=int(rope),
                      rotary_interleaved=0, softcap=a.softcap)  # (B, S, H·K)
    return linear(c, o, f"{pre}.o"), (pk, pv)
