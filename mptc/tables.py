"""Tables computed once, in numpy (torch-free): rotary inverse frequencies, cos/sin and sinusoidal positions.

The inverse frequencies are constants of both the lowered PyTorch graph (`mptc.lower`) and the emitted ONNX
(`mptc.emit`), so the two use the same numbers; the cos/sin and sinusoidal tables follow the graph's runtime
ops (`ops.scaled_rope_tables`, `ops.sinusoidal`) step by step in float32.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def sinusoidal(rows: int, d: int) -> np.ndarray:
    """The fixed sin/cos table of Vaswani et al. (rows, d) float32, sin in even dims (`ops.sinusoidal`)."""
    pos = np.arange(rows, dtype=F32)[:, None]  # (T, 1)
    i = np.arange(0, d, 2, dtype=F32)  # (ceil(D/2),)
    angle = pos * np.exp(i * F32(-math.log(10000.0) / d))  # (T, ceil(D/2))
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(rows, -1)[:, :d]  # (T, D)


def rope_inv_freq(dim: int, theta: float, scaling) -> np.ndarray:
    """The inverse frequencies (dim/2,) float32 for `spec.RopeScaling` kinds linear, llama3 and yarn, as
    transformers' `ROPE_INIT_FUNCTIONS` compute them (dynamic depends on the length: `ops.dynamic_rope_tables`)."""
    base = F32(1.0) / (F32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)))  # (dim/2,)
    if scaling is None:
        return base
    if scaling.kind == "linear":
        return base / F32(scaling.factor)
    if scaling.kind == "llama3":
        return _llama3(base, scaling.factor, scaling.low, scaling.high, scaling.original)
    if scaling.kind == "yarn":
        return _yarn(base, dim, theta, scaling)
    raise ValueError(f"rope scaling {scaling.kind} has no fixed frequencies")


def longrope_inv_freq(dim: int, theta: float, factors: tuple[float, ...]) -> np.ndarray:
    """LongRoPE's inverse frequencies (dim/2,) float32: 1 / (factor_j · theta^(2j/dim)), as transformers has them."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)  # (dim/2,)
    return (F32(1.0) / (np.asarray(factors, dtype=F32) * F32(theta) ** exps)).astype(F32)


def _llama3(inv: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = F32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / F32(factor), inv)
    smooth = (F32(original) / wavelen - F32(low)) / F32(high - low)
    smoothed = (F32(1) - smooth) * scaled / F32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(F32)


def _yarn(inv: np.ndarray, dim: int, theta: float, sc) -> np.ndarray:
    """YaRN: dims with fewer than beta_slow rotations over the original context are interpolated
    (÷ factor), dims with more than beta_fast are kept, a linear ramp between (arXiv 2309.00071)."""
    def correction(rotations: float) -> float:
        return dim * math.log(sc.original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction(sc.beta_fast), correction(sc.beta_slow)
    if sc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1)  # (dim/2,)
    keep = F32(1) - ramp
    return ((inv / F32(sc.factor)) * (F32(1) - keep) + inv * keep).astype(F32)


def rope_table(inv: np.ndarray, rows: int, attention: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (rows, R) float32 from R/2 inverse frequencies, times `attention` (`ops.scaled_rope_tables`)."""
    freqs = np.arange(rows, dtype=F32)[:, None] * inv.astype(F32)  # (T, R/2)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (T, R)
    return np.cos(emb) * F32(attention), np.sin(emb) * F32(attention)
