"""Building an ONNX graph on onnx's protobuf: inputs, ops, constants and weights (no torch, no onnx-ir).

`Graph.op` adds a node and returns its output `Value`; values are named when the graph is complete
(`Graph.model`): graph inputs and outputs by their given names, the rest `val_N`, nodes `node_<Op>_N`.
Weights are never read while the graph is built: each one is a `Streamed` tensor over its `Weight`s
(`mptc.emit.weights`), made (transposed, cast) when the model is written, one at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto as DataType
from onnx import helper

from .model import LazyModel
from .tensors import Array, Streamed, Tensor
from .weights import Weight

__all__ = ["DTYPES", "MS", "Branch", "DataType", "Graph", "Value"]

MS = "com.microsoft"  # ONNX Runtime's contrib ops
DTYPES = {"float32": DataType.FLOAT, "float16": DataType.FLOAT16}  # the graph's float type
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
IR_VERSION = 10


class Value:
    """A tensor of the graph: a graph input, an initializer, or the output of the node `producer`."""

    __slots__ = ("name", "producer")

    def __init__(self, name: str | None = None, producer: Node | None = None):
        self.name, self.producer = name, producer

    def __repr__(self) -> str:
        return f"Value({self.name or '?'})"


@dataclass(eq=False)
class Node:
    op_type: str
    domain: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict


@dataclass(frozen=True)
class Branch:
    """A subgraph attribute (If's then/else) that hands on outer values: output k is Identity(values[k]),
    named names[k], of the graph's float type and `shape`."""

    name: str
    values: tuple[Value, ...]
    names: tuple[str, ...]
    shape: tuple[int | str, ...]


class Graph:
    """A graph under construction: `op` adds a node and returns its (first) output."""

    def __init__(self, opset: int, dtype: str):
        self.opset, self.dtype = opset, dtype
        self.nodes: list[Node] = []
        self.inputs: list[tuple[Value, int, list]] = []
        self.outputs: list[tuple[Value, int, list]] = []
        self.initializers: dict[str, Tensor] = {}
        self._consts: dict[tuple, Value] = {}
        self.domains: set[str] = set()

    # --- graph inputs and outputs ---
    def input(self, name: str, dtype: int, shape: Sequence[int | str]) -> Value:
        v = Value(name)
        self.inputs.append((v, dtype, list(shape)))
        return v

    def output(self, value: Value, name: str, dtype: int, shape: Sequence[int | str]) -> None:
        if value.producer is None or any(o is value for o, _, _ in self.outputs):  # an input, or already out
            value = self.op("Identity", value)
        value.name = name
        self.outputs.append((value, dtype, list(shape)))

    @property
    def float(self) -> int:
        return DTYPES[self.dtype]

    # --- nodes ---
    def op(self, op_type: str, *inputs: Value | None, domain: str = "", **attrs) -> Value:
        return self.ops(op_type, *inputs, n=1, domain=domain, **attrs)[0]

    def ops(self, op_type: str, *inputs: Value | None, n: int, domain: str = "", **attrs) -> Sequence[Value]:
        """A node with n outputs."""
        if domain:
            self.domains.add(domain)
        ins = list(inputs)
        while ins and ins[-1] is None:  # trailing optional inputs left out, not named "" (ORT needs this)
            ins.pop()
        node = Node(op_type, domain, ins, [], {k: v for k, v in attrs.items() if v is not None})
        node.outputs = [Value(producer=node) for _ in range(n)]
        self.nodes.append(node)
        return node.outputs

    # --- constants and weights ---
    def const(self, value, dtype=None) -> Value:
        """A small constant (an initializer, shared between equal uses); floats in the graph's dtype."""
        arr = np.asarray(value, dtype=dtype)
        if dtype is None and arr.dtype.kind == "f":
            arr = arr.astype(NP_DTYPES[self.dtype])
        elif dtype is None and arr.dtype.kind in "iu":
            arr = arr.astype(np.int64)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        v = self.tensor(f"const_{len(self._consts)}", Array(arr))
        if key is not None:
            self._consts[key] = v
        return v

    def ints(self, *values: int) -> Value:
        return self.const(np.array(values, dtype=np.int64))

    def table(self, name: str, arr: np.ndarray) -> Value:
        """A computed table (rotary cos/sin, sinusoidal positions) in the graph's dtype."""
        return self.tensor(name, Array(np.ascontiguousarray(arr.astype(NP_DTYPES[self.dtype]))))

    def weight(self, name: str, w: Weight, transpose: bool = False, keep_dtype: bool = False) -> Value:
        """A parameter as an initializer, read (and transposed / cast) when the model is written."""
        want = w.dtype if keep_dtype else np.dtype(NP_DTYPES[self.dtype])
        return self.tensor(name, Streamed([w], want, transpose))

    def packed(self, name: str, parts: Sequence[Weight]) -> Value:
        """Parameters concatenated along their first axis and transposed (a packed QKV MatMul weight),
        made at save time: (Σ out, in) → (in, Σ out); 1-D parts (biases) are only concatenated."""
        return self.tensor(name, Streamed(parts, np.dtype(NP_DTYPES[self.dtype]), len(parts[0].shape) == 2))

    def tensor(self, base: str, t: Tensor) -> Value:
        """An initializer named `base` (or `base_1`, … if taken) made from `t` when the model is written."""
        name, k = base, 1
        while name in self.initializers:
            name, k = f"{base}_{k}", k + 1
        self.initializers[name] = t
        return Value(name)

    # --- the model ---
    def model(self, name: str) -> LazyModel:
        """The finished graph: values named, nodes as protobuf, initializers as references to their tensors."""
        taken = {v.name for v, _, _ in self.inputs + self.outputs} | set(self.initializers)
        counter = itertools.count()

        def named(v: Value | None) -> str:
            if v is None:
                return ""
            while v.name is None:
                candidate = f"val_{next(counter)}"
                if candidate not in taken:
                    v.name = candidate
            return v.name

        nodes = []
        for k, node in enumerate(self.nodes):
            attrs = {a: self._subgraph(x) if isinstance(x, Branch) else x for a, x in node.attrs.items()}
            ins = [named(v) for v in node.inputs]
            outs = [named(v) for v in node.outputs]
            proto = helper.make_node(node.op_type, ins, outs, name=f"node_{node.op_type}_{k}", domain=node.domain)
            proto.attribute.extend(helper.make_attribute(a, x) for a, x in attrs.items())  # in the order given
            nodes.append(proto)
        g = helper.make_graph(
            nodes, name,
            [helper.make_tensor_value_info(v.name, dt, shape) for v, dt, shape in self.inputs],
            [helper.make_tensor_value_info(v.name, dt, shape) for v, dt, shape in self.outputs],
            [onnx.TensorProto(name=n, dims=t.shape, data_type=t.dtype) for n, t in self.initializers.items()])
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        proto = helper.make_model(g, opset_imports=opsets, ir_version=IR_VERSION, producer_name="mptc")
        return LazyModel(proto, dict(self.initializers))

    def _subgraph(self, b: Branch) -> onnx.GraphProto:
        nodes = [helper.make_node("Identity", [v.name], [out], name=f"{b.name}_{k}")
                 for k, (v, out) in enumerate(zip(b.values, b.names, strict=True))]
        outs = [helper.make_tensor_value_info(out, self.float, list(b.shape)) for out in b.names]
        return helper.make_graph(nodes, b.name, [], outs)
