"""Portable attention from standard ONNX ops: masks, rotary embeddings, GQA by broadcasting, KV cache.

Symbols: B batch, S new positions, P cached positions, T = P + S, H query heads, G kv heads, K query/key
dim, Dv value dim, R rotary dims. Without a cache P = 0 and T = S.
"""

from __future__ import annotations

import math

import numpy as np

from .. import spec as S
from .. import tables
from .blocks import Ctx, linear, norm, rope_freqs, rope_table, seq_len
from .graph import DataType, Value

LOWEST = {"float32": float(np.finfo(np.float32).min), "float16": float(np.finfo(np.float16).min)}


def _scalar(c: Ctx, v: Value) -> Value:
    return c.g.op("Squeeze", v, c.g.ints(0))


def positions(c: Ctx, ins: dict[str, Value]) -> tuple[Value, Value]:
    """Buffer indices of the queries (S,) and of all keys (T,), from the mask's length T and S."""
    if "positions" not in c.shared:
        g = c.g
        s = _scalar(c, seq_len(c))
        t = _scalar(c, g.op("Shape", ins["attention_mask"], start=1, end=2)) if "attention_mask" in ins else s
        one = g.const(np.array(1, dtype=np.int64))
        c.shared["positions"] = (g.op("Range", g.op("Sub", t, s), t, one),  # (S,)
                                 g.op("Range", g.const(np.array(0, dtype=np.int64)), t, one))  # (T,)
    return c.shared["positions"]


def mask(c: Ctx, ins: dict[str, Value], a: S.Attention) -> Value | None:
    """Boolean (B, 1, S, T), True where a query may attend a key: causal, within the window, not
    padding; a query always sees itself (as `mptc.ops.attention_mask`). Built once per kind; None
    when every query sees every key (images: no padding mask)."""
    key = (a.mask, a.window)
    if key in c.shared:
        return c.shared[key]
    g = c.g
    padding = ins.get("attention_mask")
    if padding is None and a.mask != "causal" and a.window is None:
        c.shared[key] = None
        return None
    qi, kj = positions(c, ins)
    qi, kj = g.op("Unsqueeze", qi, g.ints(1)), g.op("Unsqueeze", kj, g.ints(0))  # (S, 1), (1, T)
    keep = None
    if padding is not None:
        keep = g.op("Unsqueeze", g.op("Cast", padding, to=DataType.BOOL), g.ints(1, 2))  # (B, 1, 1, T)
    if a.mask == "causal":
        causal = g.op("LessOrEqual", kj, qi)
        keep = causal if keep is None else g.op("And", keep, causal)
    if a.window is not None:
        dist = g.op("Sub", qi, kj)  # (S, T)
        if a.mask != "causal":
            dist = g.op("Abs", dist)
        near = g.op("Less", dist, g.const(np.array(a.window, dtype=np.int64)))
        keep = near if keep is None else g.op("And", keep, near)
    c.shared[key] = g.op("Or", keep, g.op("Equal", kj, qi))  # (B, 1, S, T)
    return c.shared[key]


LENGTH_ROPE = ("dynamic", "longrope")  # rope scalings whose frequencies follow the total length T


def total_length(c: Ctx, ins: dict[str, Value]) -> Value:
    """T as a float32 scalar: the attention mask's length (past and new), else S."""
    if "total.f" not in c.shared:
        t = positions(c, ins)[1]  # (T,)
        c.shared["total.f"] = c.g.op("Cast", _scalar(c, c.g.op("Shape", t)), to=DataType.FLOAT)
    return c.shared["total.f"]


def length_inv_freq(c: Ctx, total: Value, rotary: int, rope: S.Positions) -> tuple[Value, float]:
    """The inverse frequencies (R/2,) float32 at total length T (a float32 scalar), and the factor on cos/sin.

    dynamic (NTK): base theta · (factor · L / original − (factor − 1))^(R/(R−2)) with L = max(T, original),
    as `ops.dynamic_rope_tables`; longrope: the long factors once T > original, else the short ones, times
    `attention` (`ops.longrope_tables`). Past the original context a cached key keeps the rotation of the step
    that wrote it, as in transformers' cached decoding."""
    g, sc, f32 = c.g, rope.scaling, np.float32

    def k(v) -> Value:
        return g.const(np.asarray(v, dtype=f32), dtype=f32)

    if sc.kind == "longrope":
        short, long = (k(tables.longrope_inv_freq(rotary, rope.theta, f)) for f in (sc.short, sc.long))
        return g.op("Where", g.op("Greater", total, k(sc.original)), long, short), sc.attention
    length = g.op("Max", total, k(sc.original))
    ratio = g.op("Sub", g.op("Div", g.op("Mul", k(sc.factor), length), k(sc.original)), k(sc.factor - 1))
    base = g.op("Mul", k(rope.theta), g.op("Pow", ratio, k(rotary / (rotary - 2))))  # ()
    exps = np.arange(0, rotary, 2, dtype=np.int64).astype(f32) / f32(rotary)  # (R/2,)
    return g.op("Div", k(1.0), g.op("Pow", base, k(exps))), 1.0


def angles_cos_sin(c: Ctx, pos: Value, inv: Value, attention: float) -> tuple[Value, Value]:
    """cos and sin (…, R) in the graph's dtype of positions pos (…) int64 at inverse frequencies inv (R/2,)."""
    g = c.g
    inv = g.op("Concat", inv, inv, axis=0)  # (R,)
    ang = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=DataType.FLOAT), g.ints(-1)), inv)  # (…, R)
    scale = g.const(np.array(attention, dtype=np.float32), dtype=np.float32)
    out = (g.op(f, ang) for f in ("Cos", "Sin"))
    return tuple(g.op("Cast", g.op("Mul", t, scale) if attention != 1.0 else t, to=g.float) for t in out)


def rope_cos_sin(c: Ctx, ins: dict[str, Value], rotary: int, rope: S.Positions) -> tuple[Value, Value]:
    """cos and sin for the new positions: (S, R) without a cache, (B, 1, S, R) from position_ids with one."""
    key = ("rope", rotary, rope)
    if key in c.shared:
        return c.shared[key]
    g = c.g
    rows = c.max_length or c.spec.context
    if rope.scaling is not None and rope.scaling.kind in LENGTH_ROPE:  # frequencies at the total length T
        inv, attention = length_inv_freq(c, total_length(c, ins), rotary, rope)
        pos = ins.get("position_ids")
        cos, sin = angles_cos_sin(c, positions(c, ins)[0] if pos is None else pos, inv, attention)
        out = (cos, sin) if pos is None else tuple(g.op("Unsqueeze", t, g.ints(1)) for t in (cos, sin))
    elif rows is not None:
        cos, sin = (g.table(f"rope.{n}.{rotary}", t) for n, t in zip(("cos", "sin"), rope_table(rope, rotary, rows),
                                                                        strict=True))
        if "position_ids" in ins:  # (B, S) → (B, 1, S, R)
            pos = ins["position_ids"]
            out = tuple(g.op("Unsqueeze", g.op("Gather", t, pos, axis=0), g.ints(1)) for t in (cos, sin))
        else:
            out = tuple(g.op("Slice", t, g.ints(0), seq_len(c), g.ints(0)) for t in (cos, sin))
    else:  # no known length: the angles from the positions themselves
        inv, attention = rope_freqs(rope, rotary)
        inv = g.const(np.concatenate([inv, inv]).astype(np.float32), dtype=np.float32)  # (R,)
        pos = ins.get("position_ids")
        if pos is None:
            pos = positions(c, ins)[0]
        ang = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=DataType.FLOAT), g.ints(-1)), inv)  # (…, S, R)
        scale = g.const(np.array(attention, dtype=np.float32), dtype=np.float32)
        out = tuple(g.op("Cast", g.op("Mul", g.op(f, ang), scale), to=g.float) for f in ("Cos", "Sin"))
        if "position_ids" in ins:
            out = tuple(g.op("Unsqueeze", t, g.ints(1)) for t in out)
    c.shared[key] = out
    return out


def apply_rope(c: Ctx, x: Value, cos: Value, sin: Value, rotary: int, dim: int) -> Value:
    """Rotate the first R dims of x (B, n, S, K), dim i paired with i + R/2; dims R..K pass through."""
    g = c.g

    def part(v, a, b):
        return g.op("Slice", v, g.ints(a), g.ints(b), g.ints(-1))

    xr = part(x, 0, rotary) if rotary < dim else x
    half = rotary // 2
    rot = g.op("Concat", g.op("Neg", part(xr, half, rotary)), part(xr, 0, half), axis=-1)
    y = g.op("Add", g.op("Mul", xr, cos), g.op("Mul", rot, sin))
    return g.op("Concat", y, part(x, rotary, dim), axis=-1) if rotary < dim else y


def project(c: Ctx, i: int, a: S.Attention, h: Value, name: str, heads: int, dim: int,
            split: bool = True) -> Value:
    """h (B, S, D) → (B, n, S, d) for q, k or v, with its q/k norm; (B, S, n·d) unless `split`."""
    g = c.g
    qk = a.qk_norm is not None and name in ("q", "k")
    y = linear(c, h, f"layers.{i}.attn.{name}")  # (B, S, n·d)
    if qk and a.qk_norm_over == "all":  # over the whole projection (OLMo 2)
        y = norm(c, y, a.qk_norm, f"layers.{i}.attn.{name}_norm")
    if not split and not (qk and a.qk_norm_over == "head"):
        return y
    y = g.op("Reshape", y, g.ints(0, 0, heads, dim))  # (B, S, n, d)
    if qk and a.qk_norm_over == "head":  # per head, over d
        y = norm(c, y, a.qk_norm, f"layers.{i}.attn.{name}_norm")
    if not split:
        return g.op("Reshape", y, g.ints(0, 0, -1))  # (B, S, n·d)
    return g.op("Transpose", y, perm=[0, 2, 1, 3])


def attend(c: Ctx, a: S.Attention, q: Value, k: Value, v: Value, keep: Value | None) -> Value:
    """Scaled dot-product attention: q (B, H, S, K), k (B, G, T, K), v (B, G, T, Dv) → (B, S, H·Dv).

    Opset ≥ 23: the Attention op (kv heads natively). Before: MatMul/Softmax with the query heads
    grouped per kv head (B, G, H/G, S, K), so the kv heads broadcast and are never copied."""
    g, hh, gg = c.g, a.heads, a.kv_heads
    scale = attention_scale(a)
    if g.opset >= 23 and a.softcap is None:
        o = g.op("Attention", q, k, v, keep, scale=scale)  # (B, H, S, Dv)
    else:
        r = hh // gg
        if r > 1:
            q = g.op("Reshape", q, g.ints(0, gg, r, -1, a.head_dim))  # (B, G, H/G, S, K)
            k, v = g.op("Unsqueeze", k, g.ints(2)), g.op("Unsqueeze", v, g.ints(2))  # (B, G, 1, T, ·)
            keep = g.op("Unsqueeze", keep, g.ints(1)) if keep is not None else None  # (B, 1, 1, S, T)
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=_swap_last(5 if r > 1 else 4))),
                      g.const(scale))  # (…, S, T)
        if a.softcap is not None:  # cap · tanh(s / cap), before the mask (as mptc.ops.capped_attention)
            scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, g.const(a.softcap))), g.const(a.softcap))
        if keep is not None:
            scores = g.op("Where", keep, scores, g.const(LOWEST[g.dtype]))
        o = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # (…, S, Dv)
        if r > 1:
            o = g.op("Reshape", o, g.ints(0, hh, -1, a.value_dim))  # (B, H, S, Dv)
    return g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.ints(0, 0, hh * a.value_dim))


def attention_scale(a: S.Attention) -> float:
    return a.scale if a.scale is not None else 1.0 / math.sqrt(a.head_dim)


def _swap_last(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def attention(c: Ctx, i: int, a: S.Attention, h: Value, ins: dict[str, Value],
              past: tuple[Value, Value] | None = None) -> tuple[Value, tuple[Value, Value] | None]:
    """One attention sublayer, h (B, S, D) → (B, S, D); with a cache, also present key (B, G, T, K) and
    value (B, G, T, Dv): the past with the new keys (after rope, kv heads not expanded) appended."""
    g = c.g
    q = project(c, i, a, h, "q", a.heads, a.head_dim)  # (B, H, S, K)
    k = project(c, i, a, h, "k", a.kv_heads, a.head_dim)  # (B, G, S, K)
    v = project(c, i, a, h, "v", a.kv_heads, a.value_dim)  # (B, G, S, Dv)
    if c.spec.embed.positions.kind == "rope":
        cos, sin = rope_cos_sin(c, ins, a.rotary, c.spec.layer_rope(i))
        q, k = (apply_rope(c, t, cos, sin, a.rotary, a.head_dim) for t in (q, k))
    present = None
    if past is not None:
        k, v = g.op("Concat", past[0], k, axis=2), g.op("Concat", past[1], v, axis=2)  # (B, G, T, ·)
        present = (k, v)
    o = attend(c, a, q, k, v, mask(c, ins, a))  # (B, S, H·Dv)
    return linear(c, o, f"layers.{i}.attn.o"), present
