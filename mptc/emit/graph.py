"""Building an ONNX graph with onnx-ir: inputs, ops, constants and weights that wrap torch tensors.

Weights are never copied while the graph is built: a weight used as it is wraps the parameter's
memory (`TorchTensor`), and one that needs a transpose or a cast is a `LazyTensor`, made one at a
time when the model is serialised (so peak memory stays near the size of the weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes.common import NameFixPass
from onnx_ir.tensor_adapters import TorchTensor

MS = "com.microsoft"  # ONNX Runtime's contrib ops
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
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

    def weight(self, name: str, t: torch.Tensor, transpose: bool = False, keep_dtype: bool = False) -> ir.Value:
        """A parameter as an initializer: wrapped as it is, or transposed / cast lazily at save time."""
        t = t.detach()
        want = t.dtype if keep_dtype else TORCH_DTYPES[self.dtype]
        if not transpose and t.dtype == want and t.is_contiguous() and t.device.type == "cpu":
            tensor = TorchTensor(t, name=self._name(name))
        else:
            shape = tuple(reversed(t.shape)) if transpose else tuple(t.shape)

            def make(t=t, want=want, transpose=transpose):
                x = t.t() if transpose else t
                return TorchTensor(x.to(device="cpu", dtype=want).contiguous())

            tensor = ir.LazyTensor(make, ir.tensor_adapters.from_torch_dtype(want), ir.Shape(list(shape)),
                                   name=self._name(name))
        return self.tape.initializer(tensor, name=tensor.name)

    def packed(self, name: str, parts: Sequence[torch.Tensor]) -> ir.Value:
        """Parameters concatenated along their first axis and transposed (a packed QKV MatMul weight),
        made lazily at save time: (Σ out, in) → (in, Σ out); 1-D parts (biases) are only concatenated."""
        parts = [p.detach() for p in parts]
        want = TORCH_DTYPES[self.dtype]
        shape = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]][::-1]

        def make(parts=parts, want=want):
            x = torch.cat([p.to(device="cpu", dtype=want) for p in parts])
            return TorchTensor(x.t().contiguous() if x.dim() == 2 else x)

        tensor = ir.LazyTensor(make, IR_DTYPES[self.dtype], ir.Shape(shape), name=self._name(name))
        return self.tape.initializer(tensor, name=tensor.name)

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
    array itself (little-endian, as ONNX stores raw data)."""
    arr = np.asarray(v.const_value.numpy())  # a view of a wrapped tensor; a lazy one is made here
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-D)
    head = onnx.TensorProto(name=v.name, dims=arr.shape, data_type=int(v.const_value.dtype)).SerializeToString()
    raw = _key(RAW_DATA_FIELD, arr.nbytes)
    size = len(head) + len(raw) + arr.nbytes
    f.write(_key(GRAPH_FIELD, len(_key(INITIALIZER_FIELD, size)) + size))
    f.write(_key(INITIALIZER_FIELD, size))
    f.write(head)
    f.write(raw)
    f.write(memoryview(arr.reshape(-1)).cast("B"))
