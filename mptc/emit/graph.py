"""Building an ONNX graph with onnx-ir: inputs, ops, constants and weights (no torch).

Weights are never read while the graph is built: each one is a `LazyTensor` over a `Weight`
(`mptc.emit.weights`) that reads it (and transposes or casts it) when the model is written, one at a
time, so peak memory stays near the largest tensor or two.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

from .weights import Weight

MS = "com.microsoft"  # ONNX Runtime's contrib ops
IR_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class Graph:
    """A graph under construction: `op` adds a node and returns its (first) output."""

    def __init__(self, opset: int, dtype: str):
        self.opset, self.dtype = opset, dtype
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self._consts: dict[tuple, ir.Value] = {}
        self._names: set[str] = set()
        self.domains: set[str] = set()

    # --- graph inputs and outputs ---
    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
        v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
        self.inputs.append(v)
        return v

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> None:
        if value.producer() is None or value in self.outputs:  # an input or a value already output: copy it
            value = self.op("Identity", value)
        value.name = name
        value.type, value.shape = ir.TensorType(dtype), ir.Shape(list(shape))
        self.outputs.append(value)

    @property
    def float(self) -> ir.DataType:
        return IR_DTYPES[self.dtype]

    # --- nodes ---
    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attrs) -> ir.Value:
        return self.ops(op_type, *inputs, n=1, domain=domain, **attrs)[0]

    def ops(self, op_type: str, *inputs: ir.Value | None, n: int, domain: str = "", **attrs) -> Sequence[ir.Value]:
        """A node with n outputs."""
        if domain:
            self.domains.add(domain)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # trailing optional inputs left out, not named "" (ORT needs this)
            inputs.pop()
        return self.tape.op_multi_out(op_type, list(inputs), attrs, num_outputs=n, domain=domain)

    # --- constants and weights ---
    def const(self, value, dtype=None) -> ir.Value:
        """A small constant (an initializer, shared between equal uses); floats in the graph's dtype."""
        arr = np.asarray(value, dtype=dtype)
        if dtype is None and arr.dtype.kind == "f":
            arr = arr.astype(NP_DTYPES[self.dtype])
        elif dtype is None and arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        v = self.tape.initializer(ir.Tensor(arr), name=self._name(f"const_{len(self._consts)}"))
        if key is not None:
            self._consts[key] = v
        return v

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def table(self, name: str, arr: np.ndarray) -> ir.Value:
        """A computed table (rotary cos/sin, sinusoidal positions) in the graph's dtype."""
        return self.tape.initializer(ir.Tensor(np.ascontiguousarray(arr.astype(NP_DTYPES[self.dtype]))),
                                     name=self._name(name))

    def weight(self, name: str, w: Weight, transpose: bool = False, keep_dtype: bool = False) -> ir.Value:
        """A parameter as an initializer, read (and transposed / cast) when the model is written."""
        want = w.dtype if keep_dtype else np.dtype(NP_DTYPES[self.dtype])
        return self._streamed(name, [w], want, transpose)

    def packed(self, name: str, parts: Sequence[Weight]) -> ir.Value:
        """Parameters concatenated along their first axis and transposed (a packed QKV MatMul weight),
        made at save time: (Σ out, in) → (in, Σ out); 1-D parts (biases) are only concatenated."""
        return self._streamed(name, list(parts), np.dtype(NP_DTYPES[self.dtype]), len(parts[0].shape) == 2)

    def _streamed(self, name: str, parts: list[Weight], want: np.dtype, transpose: bool) -> ir.Value:
        rows = sum(p.shape[0] for p in parts)
        shape = (parts[0].shape[1], rows) if transpose else (rows, *parts[0].shape[1:])
        t = Streamed(parts, want, transpose, shape, name=self._name(name))
        return self.tape.initializer(t, name=t.name)

    def lazy(self, name: str, make: Callable[[], np.ndarray], dtype: ir.DataType, shape: Sequence[int]) -> ir.Value:
        """An initializer made by `make` when the model is written (one tensor at a time), not before."""
        def tensor(make=make) -> ir.Tensor:
            return ir.Tensor(np.ascontiguousarray(make()))

        t = ir.LazyTensor(tensor, dtype, ir.Shape(list(shape)), name=self._name(name))
        return self.tape.initializer(t, name=t.name)

    def _name(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    # --- the model ---
    def model(self, name: str) -> ir.Model:
        opsets = {"": self.opset} | {d: 1 for d in self.domains}
        g = ir.Graph(self.inputs, self.outputs, nodes=self.tape.nodes, initializers=self.tape.initializers,
                     opset_imports=opsets, name=name)
        m = ir.Model(g, ir_version=10, producer_name="mptc")
        NameFixPass()(m)
        return m


# --- weights made at save time ---
TILE = 256  # rows and columns of a transposed block: source and destination blocks stay in cache
CHUNK = 1 << 22  # bytes of one cast strip
_SCRATCH = threading.local()  # per writing thread: the buffer strips are made in


def _scratch(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A reused buffer of `shape` (valid until the next call on this thread): no fresh pages per tensor."""
    n = math.prod(shape) * dtype.itemsize
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.nbytes < n:
        buf = _SCRATCH.buf = np.empty(n, dtype=np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def strips(parts: Sequence[Weight], want: np.dtype, transpose: bool) -> Iterator[np.ndarray]:
    """The values of parts concatenated along axis 0 (transposed: (C, Σ R) from parts (R_k, C)), cast to `want`,
    as consecutive C-contiguous row blocks; a block made here lives in a reused buffer until the next one."""
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


class Streamed(ir.LazyTensor):
    """An initializer made from weights when the model is written: `tofile` writes it strip by strip (never
    whole: a reused buffer of ≤ TILE rows); `numpy()` / `tobytes()` make the whole array."""

    def __init__(self, parts: Sequence[Weight], want: np.dtype, transpose: bool, shape: tuple[int, ...], name: str):
        self.parts, self.want, self.transpose = list(parts), want, transpose
        super().__init__(self._make, ir.DataType.from_numpy(want), ir.Shape(list(shape)), name=name)

    def _make(self) -> ir.Tensor:
        if len(self.parts) == 1 and not self.transpose and self.parts[0].dtype == self.want:
            return ir.Tensor(np.ascontiguousarray(self.parts[0].load()))  # as stored: no copy
        out, at = np.empty(tuple(self.shape), dtype=self.want), 0
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
        return ir.Tensor(out)

    def tofile(self, file) -> None:
        written = 0
        for s in strips(self.parts, self.want, self.transpose):
            file.write(memoryview(s.reshape(-1)).cast("B"))
            written += s.nbytes
        if written != self.nbytes:
            raise AssertionError(f"{self.name}: wrote {written} bytes, its shape and dtype make {self.nbytes}")


# --- writing a model with its weights inside, one tensor at a time ---
def _key(field: int, size: int) -> bytes:
    """The protobuf key and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(size)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, .raw_data


def save_inline(model: ir.Model, path) -> None:
    """Write `model` as one `.onnx` file without holding its serialised weights in memory at once.

    Protobuf merges repeated occurrences of a message field, so the file is the model without
    initializers followed by one `graph { initializer }` record per weight, each made, written and
    dropped in turn (a transposed or cast weight exists only while it is written)."""
    g = model.graph
    inits = list(g.initializers.values())
    g.initializers.clear()
    try:
        proto = ir.to_proto(model)
    finally:
        for v in inits:
            g.register_initializer(v)
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        f.write(_key(GRAPH_FIELD, len(graph)))
        f.write(graph)
        for v in inits:
            _write_initializer(f, v)


def _write_initializer(f, v: ir.Value) -> None:
    """One `graph { initializer { name, dims, data_type, raw_data } }` record, the data written from the
    array itself (little-endian, as ONNX stores raw data); a streamed weight strip by strip."""
    t = v.const_value
    if isinstance(t, Streamed):
        dims, nbytes, arr = tuple(t.shape), t.nbytes, None
    else:
        arr = np.asarray(t.numpy())
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        dims, nbytes = arr.shape, arr.nbytes
    head = onnx.TensorProto(name=v.name, dims=dims, data_type=int(t.dtype)).SerializeToString()
    raw = _key(RAW_DATA_FIELD, nbytes)
    size = len(head) + len(raw) + nbytes
    f.write(_key(GRAPH_FIELD, len(_key(INITIALIZER_FIELD, size)) + size))
    f.write(_key(INITIALIZER_FIELD, size))
    f.write(head)
    f.write(raw)
    if arr is None:
        t.tofile(f)
    else:
        f.write(memoryview(arr.reshape(-1)).cast("B"))
