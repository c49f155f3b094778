"""Small tensor functions the lowered graph calls (each one node in the fx graph).

They are plain functions of tensors, so torch.export and the ONNX exporter trace through
them; nothing here holds state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


def positions(x: Tensor) -> Tensor:
    """Position ids 0..T-1 for x of shape (B, T, …)."""
    return torch.arange(x.shape[1], device=x.device)  # (T,)


def real_positions(mask: Tensor | None, x: Tensor) -> Tensor:
    """Position ids that count only the real tokens: cumsum(mask) − 1 (B, T), clamped at 0 on padding; 0..T−1
    (T,) without a mask. For x (B, T, …) and mask (B, T), as RoBERTa numbers its positions."""
    if mask is None:
        return positions(x)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def sinusoidal(x: Tensor) -> Tensor:
    """The fixed sin/cos table of Vaswani et al. for x (B, T, D): (T, D), sin in even dims."""
    t, d = x.shape[1], x.shape[2]
    pos = torch.arange(t, device=x.device, dtype=torch.float32)[:, None]  # (T, 1)
    i = torch.arange(0, d, 2, device=x.device, dtype=torch.float32)  # (ceil(D/2),)
    angle = pos * torch.exp(i * (-math.log(10000.0) / d))  # (T, ceil(D/2))
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[:, :d]  # (T, D)
    return table.to(x.dtype)


def rope_tables(x: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (T, dim), for rotary embeddings in the "rotate half" layout."""
    t = x.shape[1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))  # (dim/2,)
    freqs = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (T, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, dim)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, K) by position. cos/sin are (T, R): the first R dims rotate, dim i
    paired with i + R/2 (Hugging Face Llama's "rotate half"); dims R..K pass through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = r // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(mask: Tensor | None, x: Tensor, causal: bool, window: int | None = None) -> Tensor | None:
    """Boolean attention mask (B or 1, 1, T, T), True where a query may attend a key.

    `mask` is the (B, T) padding mask (1 = token, 0 = padding) or None. With `window`, query
    i sees only keys j with |i - j| < window. Every query may always attend to itself, so a
    padded query never sees an empty row (no NaN); real tokens never attend to padding.
    """
    t = x.shape[1]
    keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() if causal else None  # (T, T)
    if window is not None:
        i = torch.arange(t, device=x.device)
        near = (i[:, None] - i[None, :]).abs() < window  # (T, T)
        keep = near if keep is None else keep & near
    if mask is None:
        return None if keep is None else keep[None, None]
    pad = mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T)
    keep = pad if keep is None else pad & keep
    return keep | torch.eye(t, dtype=torch.bool, device=x.device)  # (B, 1, T, T)


def segment_embed(token_type_ids: Tensor | None, x: Tensor, table: Tensor) -> Tensor:
    """Token-type embeddings (B, T, D) for x (B, T, D); all type 0 when no ids are given."""
    if token_type_ids is None:
        return table[0].expand_as(x)
    return F.embedding(token_type_ids, table)


def token_types(ids: Tensor, starts: tuple[int, ...]) -> Tensor:
    """The token type of each id (B, T): the last type whose range starts at or below it."""
    t = torch.zeros_like(ids)
    for s in starts[1:]:
        t = t + (ids >= s).to(ids.dtype)
    return t


def modulate(h: Tensor, types: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """h (B, T, D) ⊙ scale[type] + shift[type]; scale and shift are (types, D)."""
    return h * F.embedding(types, scale) + F.embedding(types, shift)


def film(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """x (B, T, D) ⊙ (1 + γ) + β, with γ, β per position (B, T, D) or per example (B, D)."""
    if gamma.dim() == 2:
        gamma, beta = gamma[:, None], beta[:, None]
    return x * (1 + gamma) + beta


def mix_experts(ids: Tensor, tables: Tensor, logits: Tensor, top: int | None) -> Tensor:
    """Σ_m w_m · tables[m][ids], w = softmax(logits) over the experts (only the `top` largest kept).

    ids (B, T); tables (M, V, D); logits (B, T, M) from the token or (B, M) from the side input.
    """
    if logits.dim() == 2:
        logits = logits[:, None]  # (B, 1, M)
    if top is not None and top < tables.shape[0]:
        kth = logits.topk(top, dim=-1).values[..., -1:]  # (…, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    w = logits.softmax(-1)  # (B, T or 1, M)
    emb = torch.stack([F.embedding(ids, tables[m]) for m in range(tables.shape[0])], dim=-2)  # (B, T, M, D)
    return (w[..., None] * emb).sum(-2)


def lowrank_delta(x: Tensor, y: Tensor, a: Tensor, b: Tensor, rank: int) -> Tensor:
    """y + A·(B·x) per example: x (B, T, in), y (B, T, out), a (B, out·r) and b (B, r·in) flattened."""
    bsz = x.shape[0]
    a = a.view(bsz, -1, rank)  # (B, out, r)
    b = b.view(bsz, rank, -1)  # (B, r, in)
    return y + torch.bmm(torch.bmm(x, b.transpose(1, 2)), a.transpose(1, 2))  # (B, T, out)


def add_row(x: Tensor, table: Tensor, row: int) -> Tensor:
    """x (B, N, D) + table[row] (D,): a modality's type vector."""
    return x + table[row]


def extend_mask(mask: Tensor | None, image: Tensor, image_first: bool) -> Tensor | None:
    """The (B, T) text padding mask extended over the image positions, which are always real."""
    if mask is None:
        return None
    ones = torch.ones(image.shape[:2], dtype=mask.dtype, device=mask.device)  # (B, N')
    return torch.cat([ones, mask] if image_first else [mask, ones], dim=1)


def prepend(token: Tensor, x: Tensor) -> Tensor:
    """Put a learned token (D,) in front of x (B, N, D): (B, N + 1, D)."""
    return torch.cat([token.expand(x.shape[0], 1, -1), x], dim=1)


def patchify(pixels: Tensor, weight: Tensor, bias: Tensor | None, patch: int) -> Tensor:
    """(B, C, S, S) images → (B, N, D) patch embeddings; weight (D, C, p, p) as in ViT."""
    return F.conv2d(pixels, weight, bias, stride=patch).flatten(2).transpose(1, 2)


def pool_first(x: Tensor) -> Tensor:
    return x[:, 0]  # (B, D)


def pool_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over valid tokens of x (B, T, D): (B, D)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype)[:, :, None]  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class DropoutAttention(nn.Module):
    """Scaled dot-product attention with dropout on the probabilities while training."""

    def __init__(self, p: float, scale: float):
        super().__init__()
        self.p, self.scale = p, scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        p = self.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)


def moe_gates(x: Tensor, router: Tensor, top_k: int, normalize: bool) -> Tensor:
    """Mixture-of-experts gates (…, E) for x (…, D) and router (E, D): softmax over the experts, the
    top_k kept (ties: the lower index), renormalised to sum to one if `normalize`, zero elsewhere."""
    probs = torch.softmax(F.linear(x, router), dim=-1)  # (…, E)
    top, idx = probs.topk(top_k, dim=-1)  # (…, k)
    if normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, top)


def expert_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """Every expert's projection of x (…, D) by w (E, F, D) (+ b (E, F)): (…, E, F), as one linear layer."""
    y = F.linear(x, w.flatten(0, 1), None if b is None else b.flatten())  # (…, E·F)
    return y.unflatten(-1, w.shape[:2])


def expert_mix(z: Tensor, w: Tensor, b: Tensor | None, gates: Tensor) -> Tensor:
    """The gated sum of the experts' down projections: z (…, E, F), w (E, D, F), b (E, D), gates (…, E) → (…, D),
    as one linear layer over the gated hidden units of all experts."""
    gz = (gates.unsqueeze(-1) * z).flatten(-2)  # (…, E·F)
    y = F.linear(gz, w.transpose(0, 1).flatten(1))  # w as (D, E·F)
    return y if b is None else y + gates @ b


# --- the KV cache (the cached graph of `lower(spec, cache=True)`) ---


def cache_length(past_key: Tensor | None) -> int:
    """P, the positions already in the cache: past_key is (B, G, P, K), or None before the first call."""
    return 0 if past_key is None else past_key.shape[2]


def cache_positions(position_ids: Tensor | None, mask: Tensor | None, ids: Tensor, past: int) -> Tensor:
    """Position ids (B, S) of the new tokens ids (B, S): as given, else from the padding mask (B, P + S) as
    cumsum(mask) − 1 (clamped at 0, so left padding shifts nothing), else P..P+S−1."""
    if position_ids is not None:
        return position_ids
    s = ids.shape[1]
    if mask is None:
        return torch.arange(past, past + s, device=ids.device).expand(ids.shape[0], s)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]


def sinusoidal_at(pos: Tensor, x: Tensor) -> Tensor:
    """The sinusoidal table of `sinusoidal` at positions pos (B, S), for x (B, S, D): (B, S, D)."""
    d = x.shape[2]
    i = torch.arange(0, d, 2, device=x.device, dtype=torch.float32)  # (ceil(D/2),)
    angle = pos.to(torch.float32)[..., None] * torch.exp(i * (-math.log(10000.0) / d))  # (B, S, ceil(D/2))
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)[..., :d].to(x.dtype)


def rope_at(pos: Tensor, x: Tensor, dim: int, theta: float, inv_freq: tuple[float, ...] | None = None,
            attention: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin (B, 1, S, dim) of `rope_tables` at positions pos (B, S): they broadcast over the heads.
    With `inv_freq` (dim/2 fixed frequencies of a scaled rope) and `attention`, those of `scaled_rope_tables`."""
    if inv_freq is None:
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))  # (dim/2,)
    else:
        inv = torch.tensor(inv_freq, dtype=torch.float32, device=x.device)  # (dim/2,)
    freqs = pos.to(torch.float32)[..., None] * inv  # (B, S, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, S, dim)
    if inv_freq is None:
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return (emb.cos() * attention).to(x.dtype), (emb.sin() * attention).to(x.dtype)


def cache_mask(mask: Tensor | None, x: Tensor, past: int, window: int | None = None) -> Tensor:
    """Boolean causal mask (B or 1, 1, S, P + S) of the new queries x (B, S, …) over past and new keys.

    Query i sits at index P + i of the keys; it sees key j ≤ P + i (and, with `window`, P + i − j < window).
    `mask` (B, P + S) marks padding (0) among all keys; every query may attend to itself (no empty row).
    """
    s = x.shape[1]
    q = torch.arange(past, past + s, device=x.device)[:, None]  # (S, 1)
    k = torch.arange(past + s, device=x.device)[None, :]  # (1, P + S)
    keep = k <= q
    if window is not None:
        keep = keep & (q - k < window)
    if mask is None:
        return keep[None, None]
    return (mask.to(torch.bool)[:, None, None, :] & keep) | (k == q)  # (B, 1, S, P + S)


def cache_concat(past: Tensor | None, new: Tensor) -> Tensor:
    """Past keys or values (B, G, P, ·) followed by the new ones (B, G, S, ·) on the position axis."""
    return new if past is None else torch.cat([past, new], dim=2)


# --- rope scaling, soft-capping, last-token pooling (the 2026 Hugging Face families) ---


def scaled_rope_tables(x: Tensor, inv_freq: tuple[float, ...], attention: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin (T, R) from fixed inverse frequencies (R/2 of them), times `attention` (yarn's factor)."""
    t = x.shape[1]
    inv = torch.tensor(inv_freq, dtype=torch.float32, device=x.device)  # (R/2,)
    freqs = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv  # (T, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, R)
    return (emb.cos() * attention).to(x.dtype), (emb.sin() * attention).to(x.dtype)


def dynamic_rope_tables(x: Tensor, dim: int, theta: float, factor: float, original: int) -> tuple[Tensor, Tensor]:
    """Dynamic NTK: past the `original` context the base grows with the length L of x (B, T, …):
    theta · (factor·L/original − (factor − 1))^(R/(R−2)); up to it, plain rope. cos, sin: (T, R)."""
    t = x.shape[1]
    pos = torch.arange(t, device=x.device, dtype=torch.float32)  # (T,)
    length = (pos[-1:] + 1).clamp(min=float(original))  # (1,): max(T, original), traced with T
    base = theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))  # (1,)
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=x.device).to(torch.float32) / dim  # (R/2,)
    inv = 1.0 / base ** exps  # (R/2,)
    freqs = pos[:, None] * inv  # (T, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, R)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def softcap(x: Tensor, cap: float) -> Tensor:
    """cap · tanh(x / cap): x squashed smoothly into (−cap, cap) (Gemma 2 logits and attention scores)."""
    return torch.tanh(x / cap) * cap


def capped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float,
                     p: float = 0.0) -> Tensor:
    """Attention with soft-capped scores, written out (SDPA has no hook between the scores and the softmax):
    q (B, H, T, K), k (B, H, S, K), v (B, H, S, Dv), mask (B or 1, 1, T, S) True = may attend → (B, H, T, Dv).
    It materialises the (B, H, T, S) scores, where SDPA's fused kernels would not."""
    s = softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)  # (B, H, T, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s.float(), dim=-1).to(q.dtype)
    if p > 0:
        w = F.dropout(w, p)
    return torch.matmul(w, v)


class CappedAttention(nn.Module):
    """`capped_attention` with dropout on the probabilities while training."""

    def __init__(self, p: float, scale: float, cap: float):
        super().__init__()
        self.p, self.scale, self.cap = p, scale, cap

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return capped_attention(q, k, v, mask, self.scale, self.cap, self.p if self.training else 0.0)


def pool_last(x: Tensor, mask: Tensor | None) -> Tensor:
    """x (B, T, D) at each row's last real position (the last where mask is 1; T − 1 without a mask): (B, D).
    As transformers' sequence classifiers: the rightmost non-padding token, with left or right padding."""
    if mask is None:
        return x[:, -1]
    idx = (torch.arange(x.shape[1], device=x.device) * (mask != 0).to(torch.int64)).argmax(-1)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), idx]


def longrope_tables(x: Tensor, short: tuple[float, ...], long: tuple[float, ...], original: int,
                    attention: float) -> tuple[Tensor, Tensor]:
    """cos and sin (T, R) for LongRoPE (Phi-3): the short frequencies up to `original` positions, the long
    ones past it (chosen in the graph from T, so ONNX follows the length), both times `attention`."""
    t = x.shape[1]
    pos = torch.arange(t, device=x.device, dtype=torch.float32)  # (T,)
    beyond = (pos[-1:] + 1) > original  # (1,)
    inv = torch.where(beyond, torch.tensor(long, device=x.device), torch.tensor(short, device=x.device))  # (R/2,)
    freqs = pos[:, None] * inv  # (T, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, R)
    return (emb.cos() * attention).to(x.dtype), (emb.sin() * attention).to(x.dtype)


def scale(x: Tensor, s: float) -> Tensor:
    """x × s with s first rounded to x's dtype, as Gemma's embedding normaliser (√D in bfloat16: 45.25, not 45.2548)."""
    return x * torch.tensor(s, dtype=x.dtype, device=x.device)
