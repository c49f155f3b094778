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
