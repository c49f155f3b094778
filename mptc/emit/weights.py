"""Weights for the emitter without torch: a name → `Weight` mapping whose values are read one at a time.

A `Weight` knows its shape and dtype up front and reads its values only when `load()` is called, which
the emitter does inside a `Streamed` tensor (`mptc.emit.tensors`) while the model is written: so one tensor (and a strip
of its transposed or cast copy) is in memory at a time. Two sources:

- `from_safetensors(path)`: a model dir's `weights.safetensors`, header parsed here, each tensor a
  read-only view of the file's pages, mapped only while it is used (bfloat16 widened to float32);
- `from_module(model)`: a GraphModule's parameters, `p.detach().numpy()` (no copy).

`expected(spec)` lists the parameters the lowering makes (name → shape) for the specs the emitter
covers, and `check(spec, weights, where)` holds a weights file to it, with the messages of
`mptc.model.build`'s own checks.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import spec as S
from ..errors import MptcError
from ..files import WEIGHTS_FILE

__all__ = ["Weight", "Weights", "check", "expected", "from_module", "from_safetensors"]

# safetensors dtype codes → numpy; BF16 is read as uint16 and widened
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
FLOATS = ("F64", "F32", "F16", "BF16")
ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
DAMAGED = "the file is damaged or not a safetensors file; write the model dir again (`mptc compile SPEC -o DIR`)"
OTHER_SPEC = "the weights were written for a different spec"


@dataclass(frozen=True)
class Weight:
    """One weight: its shape and dtype now, its values when `load()` is called (at save time)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # of what load() returns
    _load: Callable[[], np.ndarray]

    def load(self) -> np.ndarray:
        return self._load()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def reshape(self, *shape: int) -> Weight:
        """The same values in another shape (a view, made when loaded)."""
        return Weight(self.name, tuple(shape), self.dtype, lambda: self._load().reshape(shape))

    def astype(self, dtype) -> Weight:
        """The values cast to `dtype` when loaded (itself when already of that dtype)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return Weight(self.name, self.shape, dtype, lambda: self._load().astype(dtype))


Weights = Mapping[str, Weight]


# --- sources ---
def _header(path: Path) -> tuple[dict, int]:
    """The safetensors header (name → {dtype, shape, data_offsets}) and where the data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("the file is shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("the header runs past the end of the file")
            head = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise MptcError(f"cannot read weights from {path}: {e}", hint=DAMAGED) from None
    if not isinstance(head, dict):
        raise MptcError(f"cannot read weights from {path}: the header is not a table", hint=DAMAGED)
    head.pop("__metadata__", None)
    start = 8 + n
    for name, t in head.items():
        try:
            b, e = t["data_offsets"]
            want = math.prod(t["shape"]) * np.dtype(ST_DTYPES[t["dtype"]]).itemsize
            ok = 0 <= b <= e and e - b == want and start + e <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise MptcError(f"cannot read weights from {path}: the entry of '{name}' is damaged", hint=DAMAGED)
    return head, start


def _reader(path: Path, offset: int, count: int, code: str) -> Callable[[], np.ndarray]:
    """Reads one tensor (count,): a read-only view of the file's pages, mapped while the array lives (so
    only the tensor being written is resident), or for bfloat16 the float32 values."""
    def read() -> np.ndarray:
        dtype = np.dtype(ST_DTYPES[code])
        if count == 0:
            return np.empty(0, dtype=dtype)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), offset + count * dtype.itemsize - start, offset=start, access=mmap.ACCESS_READ)
        raw = np.frombuffer(mm, dtype=dtype, count=count, offset=offset - start)
        if code == "BF16":  # the high half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw
    return read


def from_safetensors(path: str | os.PathLike) -> dict[str, Weight]:
    """The tensors of a safetensors file (or a model dir's weights.safetensors), each read when loaded."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise MptcError(f"no weights file: {p}")
    head, start = _header(p)
    out = {}
    for name, t in head.items():
        shape, code = tuple(int(d) for d in t["shape"]), t["dtype"]
        dtype = np.dtype(np.float32 if code == "BF16" else ST_DTYPES[code])
        read = _reader(p, start + t["data_offsets"][0], math.prod(shape), code)
        out[name] = Weight(name, shape, dtype, lambda read=read, shape=shape: read().reshape(shape))
    return out


def stored_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """Each tensor's dtype as the file stores it (`bfloat16` included), for the checks."""
    p = Path(path)
    head, _ = _header(p / WEIGHTS_FILE if p.is_dir() else p)
    return {k: ST_NAMES.get(t["dtype"], t["dtype"]) for k, t in head.items()}


def from_module(model) -> dict[str, Weight]:
    """A GraphModule's parameters as weights: `p.detach().numpy()` (no copy; bfloat16 widened to float32)."""
    out = {}
    for name, p in model.named_parameters():
        bf16 = str(p.dtype) == "torch.bfloat16"
        dtype = np.dtype(np.float32) if bf16 else np.dtype(str(p.dtype).removeprefix("torch."))

        def load(p=p, bf16=bf16) -> np.ndarray:
            t = p.detach().cpu()
            return (t.float() if bf16 else t).numpy()

        out[name] = Weight(name, tuple(p.shape), dtype, load)
    return out


# --- what a spec needs ---
def _norm(out: dict, name: str, n: S.Norm, size: int) -> None:
    out[f"{name}.weight"] = (size,)
    if n.kind == "layernorm" and n.bias:
        out[f"{name}.bias"] = (size,)


def _linear(out: dict, name: str, n_out: int, n_in: int, bias: bool) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _layer(out: dict, i: int, ly: S.Layer, d: int) -> None:
    a, m, pre = ly.attention, ly.mlp, f"layers.{i}"
    norms = [] if ly.placement == "output" and not ly.parallel else ["attn_norm", "mlp_norm"]
    if ly.parallel and ly.shared_norm:
        norms = ["attn_norm"]
    if ly.placement in ("sandwich", "output"):
        norms += ["attn_out_norm", "mlp_out_norm"]
    for n in norms:
        _norm(out, f"{pre}.{n}", ly.norm, d)
    for name, heads, dim in (("q", a.heads, a.head_dim), ("k", a.kv_heads, a.head_dim), ("v", a.kv_heads, a.value_dim)):
        _linear(out, f"{pre}.attn.{name}", heads * dim, d, a.bias)
        if a.qk_norm is not None and name != "v":
            _norm(out, f"{pre}.attn.{name}_norm", a.qk_norm, heads * dim if a.qk_norm_over == "all" else dim)
    _linear(out, f"{pre}.attn.o", d, a.heads * a.value_dim, a.out_bias)
    if m.moe:  # stacked experts (E, …), the router, a shared expert and its gate
        e = m.experts
        out[f"{pre}.mlp.router.weight"] = (e, d)
        for name, shape in _mlp_shapes(m, m.hidden, d):
            out[f"{pre}.mlp.experts.{name}.weight"] = (e, *shape)
            if m.bias:
                out[f"{pre}.mlp.experts.{name}.bias"] = (e, shape[0])
        if m.shared is not None:
            for name, shape in _mlp_shapes(m, m.shared, d):
                _linear(out, f"{pre}.mlp.shared.{name}", *shape, m.bias)
        if m.shared_gate:
            out[f"{pre}.mlp.shared_gate.weight"] = (1, d)
        return
    for name, shape in _mlp_shapes(m, m.hidden, d):
        _linear(out, f"{pre}.mlp.{name}", *shape, m.bias)


def _mlp_shapes(m: S.MLP, hidden: int, d: int) -> list[tuple[str, tuple[int, int]]]:
    """up (and gate), down: (out, in) each."""
    return [(n, (hidden, d)) for n in (("up", "gate") if m.gated else ("up",))] + [("down", (d, hidden))]


def _unknown(spec: S.Spec) -> bool:
    """Parts `expected` does not list (the emitter refuses them too): the torch path checks those."""
    e = spec.embed
    return bool(e.types or e.experts is not None or e.adaptive is not None or e.condition is not None
                or spec.multimodal or spec.conditions or spec.head.kind not in ("lm", "classify", "none")
                or (spec.patches is not None and spec.patches.distill)
                or any(ly.modulate or ly.hyper is not None for ly in spec.layers))


def expected(spec: S.Spec) -> dict[str, tuple[int, ...]] | None:
    """Every parameter the lowering makes for `spec`, name → shape, in its order (None for a spec with parts
    this list does not cover: embedding experts, token types, FiLM, hypernetworks, multi-modal input)."""
    if _unknown(spec):
        return None
    d, e, hd, out = spec.width, spec.embed, spec.head, {}
    if spec.reads_tokens:
        out["embed.tokens.weight"] = (spec.vocab, d)
        if e.segments:
            out["embed.segments.weight"] = (e.segments, d)
    if spec.patches is not None:
        p = spec.patches
        out["embed.patch.weight"] = (d, p.channels * p.patch**2)
        out["embed.patch.bias"] = (d,)
        if p.cls:
            out["embed.cls"] = (d,)
    if e.positions.kind == "learned":
        out["embed.positions.weight"] = (spec.seq_len, d)
    if e.norm is not None:
        _norm(out, "embed.norm", e.norm, d)
    for i, ly in enumerate(spec.layers):
        _layer(out, i, ly, d)
    if hd.norm is not None:
        _norm(out, "head.norm", hd.norm, d)
    if hd.kind == "lm":
        if hd.transform is not None:
            _linear(out, "head.transform", d, d, True)
            if hd.transform.norm is not None:
                _norm(out, "head.transform_norm", hd.transform.norm, d)
        if hd.tied:
            if hd.bias:
                out["head.bias"] = (spec.vocab,)
        else:
            _linear(out, "head.out", spec.vocab, d, hd.bias)
    elif hd.kind == "classify":
        if hd.pooler:
            _linear(out, "head.pooler", d, d, True)
        _linear(out, "head.out", hd.classes, d, hd.bias)
    return out


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (" …" if len(names) > 4 else "")


def check(spec: S.Spec, weights: Weights, where: str, stored: Mapping[str, str] | None = None) -> None:
    """Refuse weights that do not fit `spec`: missing or unexpected tensors, wrong shapes, non-float values
    (as `mptc.model.build` refuses them). stored: each tensor's dtype as the file names it."""
    want = expected(spec)
    if want is None:
        raise MptcError(f"cannot check the weights of '{spec.name}' without building the model",
                        hint="load it with mptc.load_model")
    missing = [k for k in want if k not in weights]
    extra = [k for k in weights if k not in want]
    if missing or extra:
        parts = ([f"missing {_some(missing)}"] if missing else []) + ([f"unexpected {_some(extra)}"] if extra else [])
        raise MptcError(f"{where} does not fit the spec: " + "; ".join(parts), hint=OTHER_SPEC)
    for k, shape in want.items():
        w = weights[k]
        if w.shape != shape:
            raise MptcError(f"{where}: '{k}' has shape {w.shape}, the spec needs {shape}", hint=OTHER_SPEC)
        if w.dtype.kind != "f":
            dt = (stored or {}).get(k, str(w.dtype))
            raise MptcError(f"{where}: '{k}' holds {dt} values; weights must be floating point",
                            hint="save the weights as float32, float16, bfloat16 or float64")
