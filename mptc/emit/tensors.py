"""The initializers of an emitted model: tensors known by dtype and shape, whose bytes are made when written.

A `Tensor` is what `mptc.emit.model.LazyModel` writes: `numpy()` makes the whole array, `tofile` writes its
raw bytes (little-endian, as ONNX stores them). `Streamed` makes a weight from its parts (`Weight`s, read
then) strip by strip, transposed or cast, so writing it never holds a second copy of it. `Experts` makes a
stacked mixture-of-experts weight one expert at a time (gate and up rows interleaved, or each expert transposed).
Stacked tensors (E, …) hand out one expert, `expert(e)`, without making the others (what `mptc.quantize` reads).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper

from .weights import Weight

__all__ = ["Array", "Experts", "Made", "Stored", "Streamed", "Tensor", "interleaved", "onnx_dtype",
           "transposed_experts"]


def onnx_dtype(dtype: np.dtype) -> int:
    """The `onnx.TensorProto` element type of a numpy dtype."""
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class Tensor:
    """A tensor of known dtype (an `onnx.TensorProto` element type) and shape, made by `numpy()`."""

    dtype: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * onnx.helper.tensor_dtype_to_np_dtype(self.dtype).itemsize

    def numpy(self) -> np.ndarray:
        raise NotImplementedError

    def tofile(self, f: BinaryIO) -> None:
        """Write the raw bytes (C order, little-endian)."""
        arr = np.asarray(self.numpy())
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        f.write(memoryview(arr.reshape(-1)).cast("B"))

    def tobytes(self) -> bytes:
        return np.asarray(self.numpy()).tobytes()

    def expert(self, e: int) -> np.ndarray:
        """Slice e along axis 0 of a stacked tensor (E, …): one expert's weight."""
        return np.asarray(self.numpy()[e])


class Array(Tensor):
    """An array held in memory (constants, rotary tables)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.dtype, self.shape = onnx_dtype(arr.dtype), tuple(arr.shape)

    def numpy(self) -> np.ndarray:
        return self.arr


class Made(Tensor):
    """An array made by `make()` when it is written (a quantized weight), then dropped."""

    def __init__(self, make: Callable[[], np.ndarray], dtype: int, shape: Sequence[int]):
        self.make, self.dtype, self.shape = make, dtype, tuple(shape)

    def numpy(self) -> np.ndarray:
        return self.make()


class Stored(Tensor):
    """An initializer of an existing `onnx.ModelProto` (its raw data or typed fields)."""

    def __init__(self, proto: onnx.TensorProto):
        self.proto, self.dtype, self.shape = proto, proto.data_type, tuple(proto.dims)

    def numpy(self) -> np.ndarray:
        return numpy_helper.to_array(self.proto)

    def tofile(self, f: BinaryIO) -> None:
        if self.proto.HasField("raw_data"):
            f.write(self.proto.raw_data)
        else:
            super().tofile(f)


# --- weights made at write time ---
TILE = 256  # rows and columns of a transposed block: source and destination blocks stay in cache
CHUNK = 1 << 22  # bytes of one cast strip
SLOTS = 3  # scratch buffers in rotation: one being filled, one queued, one being written (`model.Background`)
_SCRATCH = threading.local()  # per writing thread: the buffers strips are made in


def _scratch(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A reused buffer of `shape`, the next of `SLOTS` in turn (valid until SLOTS more calls on this thread): no
    fresh pages per tensor, and a strip still being written by a background writer is never overwritten."""
    n = math.prod(shape) * dtype.itemsize
    slots = getattr(_SCRATCH, "slots", None)
    if slots is None:
        slots = _SCRATCH.slots = [np.empty(0, dtype=np.uint8) for _ in range(SLOTS)]
        _SCRATCH.next = 0
    k = _SCRATCH.next = (_SCRATCH.next + 1) % SLOTS
    if slots[k].nbytes < n:
        slots[k] = np.empty(n, dtype=np.uint8)
    return slots[k][:n].view(dtype).reshape(shape)


def strips(parts: Sequence[Weight], want: np.dtype, transpose: bool) -> Iterator[np.ndarray]:
    """The values of parts concatenated along axis 0 (transposed: (C, Σ R) from parts (R_k, C)), cast to `want`,
    as consecutive C-contiguous row blocks; a block made here lives in a reused buffer (`_scratch`)."""
    if not transpose:
        for p in parts:
            x = p.load()
            if x.dtype == want and x.flags.c_contiguous:
                yield x
                continue
            rows = x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1)
            step = max(1, CHUNK // max(1, rows.shape[1] * want.itemsize))
            for i in range(0, rows.shape[0], step):
                block = rows[i:i + step]
                buf = _scratch(want, block.shape)
                np.copyto(buf, block, casting="unsafe")
                yield buf
        return
    xs = [p.load() for p in parts]  # (R_k, C) each
    c, total = xs[0].shape[1], sum(x.shape[0] for x in xs)
    for j in range(0, c, TILE):
        n = min(TILE, c - j)
        buf = _scratch(want, (n, total))
        _transposed_rows(xs, j, n, buf)
        yield buf


def _transposed_rows(xs: Sequence[np.ndarray], j: int, n: int, dst: np.ndarray) -> None:
    """Rows j … j + n of the transposed concatenation of xs (R_k, C) into dst (n, Σ R_k), block by block
    (several times faster than one strided copy of a large matrix)."""
    at = 0
    for x in xs:
        for i in range(0, x.shape[0], TILE):
            m = min(TILE, x.shape[0] - i)
            np.copyto(dst[:, at + i:at + i + m], x[i:i + m, j:j + n].T, casting="unsafe")
        at += x.shape[0]


class Streamed(Tensor):
    """A weight made from its parts when the model is written: `tofile` writes it strip by strip (never whole:
    a reused buffer of ≤ TILE rows); `numpy()` makes the whole array. Parts (R_k, …) are concatenated along
    axis 0; transposed, parts (R_k, C) make (C, Σ R_k)."""

    def __init__(self, parts: Sequence[Weight], want: np.dtype, transpose: bool):
        self.parts, self.want, self.transpose = list(parts), np.dtype(want), transpose
        rows = sum(p.shape[0] for p in self.parts)
        self.shape = (self.parts[0].shape[1], rows) if transpose else (rows, *self.parts[0].shape[1:])
        self.dtype = onnx_dtype(self.want)

    def numpy(self) -> np.ndarray:
        if len(self.parts) == 1 and not self.transpose and self.parts[0].dtype == self.want:
            return np.ascontiguousarray(self.parts[0].load())  # as stored: no copy
        out, at = np.empty(self.shape, dtype=self.want), 0
        if self.transpose:
            xs = [p.load() for p in self.parts]
            for j in range(0, out.shape[0], TILE):
                _transposed_rows(xs, j, min(TILE, out.shape[0] - j), out[j:j + TILE])
        elif len(self.parts) == 1:
            np.copyto(out, self.parts[0].load(), casting="unsafe")
        else:
            for p in self.parts:
                np.copyto(out[at:at + p.shape[0]], p.load(), casting="unsafe")
                at += p.shape[0]
        return out

    def tofile(self, f: BinaryIO) -> None:
        for s in strips(self.parts, self.want, self.transpose):
            f.write(memoryview(s.reshape(-1)).cast("B"))

    def expert(self, e: int) -> np.ndarray:
        if len(self.parts) == 1 and not self.transpose:  # a view of the stored experts: only e's pages read
            return np.asarray(self.parts[0].load()[e]).astype(self.want, copy=False)
        return super().expert(e)


class Experts(Tensor):
    """A stacked weight made one expert at a time when written: `make(e)` is expert e's block (R, …) of
    `want`; the tensor is (E, R, …), or with `flat` the blocks' rows concatenated (E·R, …)."""

    def __init__(self, make: Callable[[int], np.ndarray], count: int, block: Sequence[int], want: np.dtype,
                 flat: bool = False):
        self.make, self.count, self.block, self.want = make, count, tuple(block), np.dtype(want)
        self.shape = (count * self.block[0], *self.block[1:]) if flat else (count, *self.block)
        self.dtype = onnx_dtype(self.want)

    def expert(self, e: int) -> np.ndarray:
        x = self.make(e)
        if x.shape != self.block or x.dtype != self.want:
            raise AssertionError(f"expert {e} made {x.dtype}{x.shape}, not {self.want}{self.block}")
        return x

    def numpy(self) -> np.ndarray:
        out = np.empty((self.count, *self.block), dtype=self.want)
        for e in range(self.count):
            out[e] = self.expert(e)
        return out.reshape(self.shape)

    def tofile(self, f: BinaryIO) -> None:
        for e in range(self.count):
            f.write(memoryview(np.ascontiguousarray(self.expert(e)).reshape(-1)).cast("B"))


def interleaved(gate: Weight, up: Weight, want: np.dtype) -> Experts:
    """Stacked gate and up (E, F, …) → (E, 2F, …) with their rows alternated per expert, gate first
    (g0, u0, g1, u1, …: the fused SwiGLU weight of com.microsoft.MoE / QMoE)."""
    e, f, rest = gate.shape[0], gate.shape[1], gate.shape[2:]
    want = np.dtype(want)

    def make(i: int) -> np.ndarray:  # (2F, …)
        out = np.empty((f, 2, *rest), dtype=want)
        np.copyto(out[:, 0], gate.load()[i], casting="unsafe")
        np.copyto(out[:, 1], up.load()[i], casting="unsafe")
        return out.reshape(2 * f, *rest)

    return Experts(make, e, (2 * f, *rest), want)


def transposed_experts(w: Weight, want: np.dtype) -> Experts:
    """Stacked experts (E, R, C) → (E·C, R): each expert transposed, their rows concatenated (the dense
    mixture's down projection as one MatMul weight)."""
    e, r, c = w.shape
    want = np.dtype(want)

    def make(i: int) -> np.ndarray:  # (C, R)
        out = np.empty((c, r), dtype=want)
        _transposed_rows([w.load()[i]], 0, c, out)
        return out

    return Experts(make, e, (c, r), want, flat=True)
