"""Weight-only quantization of deploy graphs, one weight at a time, with ONNX Runtime's own kernel.

`quantize_graph` turns every MatMul of an emitted graph whose right operand is a weight into a
`com.microsoft.MatMulNBits` (`Scheme`): 4 bits for `int4`, 8 for `int8`, symmetric, one float32 scale per
block of 32 input rows, `accuracy_level` 4 (ONNX Runtime quantizes the activations to int8 per block and runs
its integer CPU kernel, as GenAI's model builder sets it). Each weight is quantized at save time by
`quantize_weight` — the kernel `MatMulNBitsQuantizer` itself calls, so the packed bytes and scales are the
quantizer's — and dropped once written (`Pair`), so only one float weight is in memory at a time.
Embeddings (Gather) and norms stay float; the lm head is a MatMul and is quantized, tied or not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .errors import MptcError

BITS = {"int4": 4, "int8": 8}
BLOCK = 32
MS = "com.microsoft"
ACCURACY = 4  # MatMulNBits accuracy_level: int8 activations (the fast CPU kernel), as GenAI's builder sets it


@dataclass(frozen=True)
class Scheme:
    """How weight MatMuls are quantized: bits, rows per block, MatMulNBits' accuracy level."""

    bits: int
    block: int = BLOCK
    accuracy: int = ACCURACY

    def blocks(self, k: int) -> int:
        """Blocks along the input axis: ⌈K / block⌉ (the last one zero-padded)."""
        return -(-k // self.block)

    def shapes(self, k: int, n: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
        """(packed, scales) shapes for a (K, N) weight: (N, blocks, block·bits/8) uint8, (N, blocks) float32."""
        nb = self.blocks(k)
        return (n, nb, self.block * self.bits // 8), (n, nb)

    def attrs(self, k: int, n: int) -> dict[str, int]:
        """The MatMulNBits attributes."""
        return {"K": k, "N": n, "bits": self.bits, "block_size": self.block, "accuracy_level": self.accuracy}

    def describe(self, matmuls: int, head: bool) -> str:
        """The deploy's summary line."""
        acts = " (int8 activations)" if self.accuracy == 4 else ""
        return (f"int{self.bits} weights: {matmuls} MatMuls as MatMulNBits (symmetric, block {self.block}), "
                f"accuracy level {self.accuracy}{acts}; embeddings and norms float, "
                f"lm head {'quantized' if head else 'float'}")


def scheme(weights: str) -> Scheme:
    """The scheme of `--weights int4|int8`."""
    if weights not in BITS:
        raise MptcError(f"unknown weight format '{weights}' to quantize", hint="choose int4 or int8")
    return Scheme(BITS[weights])


def quantize_weight(w: np.ndarray, bits: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """A (K, N) weight, as MatMul reads it → (packed (N, ⌈K/block⌉, block·bits/8) uint8, scales (N, ⌈K/block⌉)
    float32): symmetric round to nearest per block of `block` input rows, by ONNX Runtime's kernel (the layout
    and bytes of `MatMulNBitsQuantizer(bits=bits, block_size=block, is_symmetric=True)`)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if w.ndim != 2:
        raise MptcError(f"cannot quantize a weight of shape {tuple(w.shape)}: MatMulNBits takes a (K, N) matrix")
    if bits not in (4, 8):
        raise MptcError(f"cannot quantize to {bits} bits", hint="choose int4 or int8")
    k, n = w.shape
    s = Scheme(bits, block)
    nb = s.blocks(k)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if nb * block != k:
        w = np.pad(w, ((0, nb * block - k), (0, 0)))
    packed_shape, scales_shape = s.shapes(k, n)
    packed = np.zeros(packed_shape, dtype=np.uint8)
    scales = np.zeros(scales_shape, dtype=np.float32)
    zero_points = np.zeros((n, -(-nb // (8 // bits))), dtype=np.uint8)  # unused when symmetric
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, w, scales, zero_points, block, n, k, True)
    return packed, scales


class Pair:
    """The packed weight and the scales of one MatMulNBits, made together from `make` (a (K, N) float weight)
    the first time either is asked for; each is handed out once, then both are dropped (asked again, they are
    made again)."""

    def __init__(self, make: Callable[[], np.ndarray], bits: int, block: int = BLOCK):
        self.make, self.bits, self.block = make, bits, block
        self._made: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _take(self, which: str) -> np.ndarray:
        with self._lock:
            if which not in self._made:
                packed, scales = quantize_weight(self.make(), self.bits, self.block)
                self._made = {"packed": packed, "scales": scales}
            return self._made.pop(which)

    def packed(self) -> np.ndarray:
        return self._take("packed")

    def scales(self) -> np.ndarray:
        return self._take("scales")



# --- the pass over an emitted graph -------------------------------------------------------------------------


@dataclass
class Quantized:
    """What `quantize_graph` did."""

    scheme: Scheme
    matmuls: int  # MatMuls now MatMulNBits
    head: bool  # whether the MatMul that makes the logits is one of them

    def describe(self) -> str:
        return self.scheme.describe(self.matmuls, self.head)


def _weight(v: ir.Value | None) -> bool:
    """A float32 (K, N) initializer: a weight MatMulNBits takes."""
    return (v is not None and v.is_initializer() and v.const_value is not None and v.dtype == ir.DataType.FLOAT
            and v.shape is not None and len(v.shape) == 2 and all(isinstance(d, int) for d in v.shape))


def _head_matmul(graph: ir.Graph, output: str) -> ir.Node | None:
    """The matrix product behind the graph output `output` (through adds, casts, a soft cap)."""
    v = next((o for o in graph.outputs if o.name == output), None)
    for _ in range(16):
        node = v.producer() if v is not None else None
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            return node
        v = node.inputs[0]
    return None


def _lazy(name: str, make: Callable[[], np.ndarray], dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
    """An initializer value whose tensor is made by `make` when the model is saved."""
    t = ir.LazyTensor(make, dtype, ir.Shape(list(shape)), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=t.shape, const_value=t)


def _replace(g: ir.Graph, node: ir.Node, s: Scheme) -> None:
    """MatMul(x, W) → MatMulNBits(x, W_Q{bits}, W_scales), W read lazily; W leaves unless something else reads it."""
    w = node.inputs[1]
    k, n = w.shape
    pair = Pair(lambda t=w.const_value: t.numpy(), s.bits, s.block)  # (K, N) float32, made at save time
    packed_shape, scales_shape = s.shapes(k, n)
    q = _lazy(f"{w.name}_Q{s.bits}", pair.packed, ir.DataType.UINT8, packed_shape)
    sc = _lazy(f"{w.name}_scales", pair.scales, ir.DataType.FLOAT, scales_shape)
    for v in (q, sc):
        g.register_initializer(v)
    new = ir.Node(MS, "MatMulNBits", [node.inputs[0], q, sc], [ir.AttrInt64(a, v) for a, v in s.attrs(k, n).items()],
                  name=node.name)
    out, old = new.outputs[0], node.outputs[0]
    out.type, out.shape = old.type, old.shape
    g.insert_before(node, new)
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    g.remove(node, safe=True)
    out.name = old.name
    if not w.uses() and not w.is_graph_output():
        del g.initializers[w.name]


def quantize_graph(model: ir.Model, weights: str, output: str = "logits") -> Quantized:
    """Every MatMul of `model` whose right operand is a float32 (K, N) initializer → a MatMulNBits, in place.

    The packed weight and scales are `LazyTensor`s over a `Pair` that reads the old initializer (itself wrapped
    or lazy) when the model is saved, so each float weight is made, quantized and dropped in turn."""
    s, g = scheme(weights), model.graph
    head = _head_matmul(g, output)
    todo = [n for n in g if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and _weight(n.inputs[1])]
    if not todo:
        raise MptcError(f"the graph has no weight MatMul to quantize ({weights})",
                        hint="deploy with --weights float32 or float16")
    for node in todo:
        _replace(g, node, s)
    model.opset_imports.setdefault(MS, 1)
    return Quantized(s, len(todo), head is not None and head in todo)
