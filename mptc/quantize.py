"""Weight-only quantization of deploy graphs, one weight at a time, with ONNX Runtime's own kernel.

`quantize_graph` turns every MatMul of an emitted graph whose right operand is a weight into a
`com.microsoft.MatMulNBits` (`Scheme`): 4 bits for `int4`, 8 for `int8`, symmetric, one float32 scale per
block of 32 input rows, `accuracy_level` 4 (ONNX Runtime quantizes the activations to int8 per block and runs
its integer CPU kernel, as GenAI's model builder sets it). Each weight is quantized at save time by
`quantize_weight` — the kernel `MatMulNBitsQuantizer` itself calls, so the packed bytes and scales are the
quantizer's — and dropped once written (`Pair`), so only one float weight is in memory at a time.
The pass edits the graph's protobuf (`mptc.emit.model.LazyModel`): each MatMul node becomes a MatMulNBits.
Embeddings (Gather) and norms stay float; the lm head is a MatMul and is quantized, tied or not.

Mixtures of experts: a `com.microsoft.MoE` node (the genai profile) becomes a `com.microsoft.QMoE` with the same
encoding per expert — raw storage (E, N, K·bits/8) uint8, scales (E, N, K/block) float32, `weights_prepacked`
0, and for a layer without `normalize` the full softmax as `router_weights` (the kernel renormalises otherwise)
— each expert quantized in turn when the model is written (`ExpertPairs`); the dense form's stacked expert
weights ((D, E·F), (E·F, D) initializers) are MatMuls like the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import onnx

from .emit.model import LazyModel
from .emit.tensors import Made, Tensor
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

    def describe(self, matmuls: int, head: bool, qmoe: int = 0, dense_moe: int = 0, float_moe: int = 0) -> str:
        """The deploy's summary line (with the mixture-of-experts layers, where the graph has some)."""
        acts = " (int8 activations)" if self.accuracy == 4 else ""
        moe = ([f"{_layers(qmoe)} as QMoE (int{self.bits} experts, block {self.block})"] if qmoe else []) + (
            [f"{_layers(dense_moe)} dense, the experts among the MatMulNBits"] if dense_moe else []) + (
            [f"{_layers(float_moe)} float (width or hidden not a multiple of {self.block})"] if float_moe else [])
        moe_part = f"mixture of experts: {', '.join(moe)}, routers float; " if moe else ""
        return (f"int{self.bits} weights: {matmuls} MatMuls as MatMulNBits (symmetric, block {self.block}), "
                f"accuracy level {self.accuracy}{acts}; {moe_part}embeddings and norms float, "
                f"lm head {'quantized' if head else 'float'}")


def _layers(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


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


class ExpertPairs:
    """The packed experts and scales of one QMoE input, from `expert(e)` (expert e's (N, K) float weight, as MoE
    reads it): `packed` quantizes and writes one expert at a time, keeping only the (small) scales, which
    `scales` then hands out once (asked first, or again, the experts are quantized again)."""

    def __init__(self, expert: Callable[[int], np.ndarray], count: int, bits: int, block: int = BLOCK):
        self.expert, self.count, self.bits, self.block = expert, count, bits, block
        self._scales: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _each(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(packed (N, K·bits/8) uint8, scales (N, K/block) float32) per expert, made in turn."""
        for e in range(self.count):
            w = self.expert(e)  # (N, K)
            packed, scales = quantize_weight(w.T, self.bits, self.block)  # (N, K/block, block·bits/8)
            yield packed.reshape(w.shape[0], -1), scales

    def packed_rows(self) -> Iterator[np.ndarray]:
        """Each expert's packed weight (N, K·bits/8), quantized in turn; its scales kept for `scales`."""
        kept = []
        for packed, scales in self._each():
            kept.append(scales)
            yield packed
        with self._lock:
            self._scales = kept

    def packed(self) -> np.ndarray:
        return np.stack(list(self.packed_rows()))  # (E, N, K·bits/8)

    def scales(self) -> np.ndarray:
        with self._lock:
            got = self._scales if len(self._scales) == self.count else [s for _, s in self._each()]
            self._scales = []
        return np.stack(got)  # (E, N, K/block)


class PackedExperts(Tensor):
    """The uint8 (E, N, K·bits/8) expert weights of a QMoE, written one quantized expert at a time."""

    def __init__(self, pairs: ExpertPairs, shape: tuple[int, int, int]):
        self.pairs, self.dtype, self.shape = pairs, onnx.TensorProto.UINT8, shape

    def numpy(self) -> np.ndarray:
        return self.pairs.packed()

    def tofile(self, f: BinaryIO) -> None:
        for rows in self.pairs.packed_rows():
            f.write(memoryview(np.ascontiguousarray(rows).reshape(-1)).cast("B"))


# --- the pass over an emitted graph -------------------------------------------------------------------------


@dataclass
class Quantized:
    """What `quantize_graph` did."""

    scheme: Scheme
    matmuls: int  # MatMuls now MatMulNBits
    head: bool  # whether the MatMul that makes the logits is one of them
    qmoe: int = 0  # MoE nodes now QMoE
    dense_moe: int = 0  # dense mixture-of-experts layers whose expert MatMuls are among `matmuls`
    float_moe: int = 0  # MoE nodes left float (a width the blocks do not divide)

    def describe(self) -> str:
        return self.scheme.describe(self.matmuls, self.head, self.qmoe, self.dense_moe, self.float_moe)


FLOAT_SUFFIXES = (".bias", ".router.weight")  # by the emitter's names: weights a MatMul reads that stay float


def _weights(model: LazyModel) -> dict[str, tuple[int, int]]:
    """The float32 (K, N) initializers of `model`, by name: the weights MatMulNBits takes. Not a bias (the dense
    mixture's down bias is a product gates (…, E) @ bias (E, D)) nor a mixture's router (D, E): its logits pick the
    experts, a rounding there moves tokens to other experts, and it is E·D values of a layer's E·3·F·D."""
    return {t.name: tuple(t.dims) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and not t.name.endswith(FLOAT_SUFFIXES)}


def _head_matmul(graph: onnx.GraphProto, output: str) -> onnx.NodeProto | None:
    """The matrix product behind the graph output `output` (through adds, casts, a soft cap)."""
    producer = {o: n for n in graph.node for o in n.output}
    name = output
    for _ in range(16):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            return node
        name = node.input[0]
    return None


def _replace(model: LazyModel, node: onnx.NodeProto, shape: tuple[int, int], s: Scheme) -> None:
    """MatMul(x, W) → MatMulNBits(x, W_Q{bits}, W_scales) in place, W read when the model is written."""
    x, w = node.input
    k, n = shape
    pair = Pair(model.tensors[w].numpy, s.bits, s.block)  # (K, N) float32, made at save time
    packed_shape, scales_shape = s.shapes(k, n)
    q, sc = f"{w}_Q{s.bits}", f"{w}_scales"
    model.add_initializer(q, Made(pair.packed, onnx.TensorProto.UINT8, packed_shape), before=w)
    model.add_initializer(sc, Made(pair.scales, onnx.TensorProto.FLOAT, scales_shape), before=w)
    node.op_type, node.domain = "MatMulNBits", MS
    node.input[:] = [x, q, sc]
    node.attribute.extend(onnx.helper.make_attribute(a, v) for a, v in s.attrs(k, n).items())


def _moe_fits(model: LazyModel, node: onnx.NodeProto, s: Scheme) -> bool:
    """Whether QMoE takes this MoE node: float32 stacked fc1 (E, N1, D) and fc2 (E, D, F) initializers, D and F
    multiples of the block (the kernel's rule), no separate fc3."""
    dims = {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer}
    ins = list(node.input) + [""] * 8
    fc1, fc2 = dims.get(ins[2]), dims.get(ins[4])
    if fc1 is None or fc2 is None or ins[6] or len(fc1[1]) != 3 or len(fc2[1]) != 3:
        return False
    if fc1[0] != onnx.TensorProto.FLOAT or fc2[0] != onnx.TensorProto.FLOAT:
        return False
    (_, _, d), (_, _, f) = fc1[1], fc2[1]
    return d % s.block == 0 and f % s.block == 0


def _replace_moe(model: LazyModel, node: onnx.NodeProto, s: Scheme) -> onnx.NodeProto | None:
    """MoE(x, router, fc1, fc1_bias, fc2, fc2_bias) → QMoE(x, router, fc1_Q, fc1_scales, fc1_bias, fc2_Q,
    fc2_scales, fc2_bias) in place, each stacked weight (E, N, K) quantized per expert when written.

    Without `normalize_routing_weights` the CPU kernel still renormalises the chosen experts' weights over the
    top k (measured on onnxruntime 1.32), unlike MoE; given `router_weights` (input 14), it mixes with their values
    at the chosen experts instead. So such a layer gets router_weights = Softmax(router logits) (…, E): the
    un-renormalised gates MoE mixes with: the Softmax node returned, for the caller to put before it."""
    ins = list(node.input) + [""] * (6 - len(node.input))
    new = list(ins[:2])
    for w, b in ((ins[2], ins[3]), (ins[4], ins[5])):
        t: Tensor = model.tensors[w]
        e, n, k = t.shape
        pairs = ExpertPairs(lambda i, t=t: np.asarray(t.expert(i), dtype=np.float32), e, s.bits, s.block)
        q, sc = f"{w}_Q{s.bits}", f"{w}_scales"
        model.add_initializer(q, PackedExperts(pairs, (e, n, k * s.bits // 8)), before=w)
        model.add_initializer(sc, Made(pairs.scales, onnx.TensorProto.FLOAT, (e, n, s.blocks(k))), before=w)
        new += [q, sc, b]
    normalize = next((a.i for a in node.attribute if a.name == "normalize_routing_weights"), 0)
    softmax = None
    if not normalize:
        probs = f"{node.output[0]}_router_weights"
        softmax = onnx.helper.make_node("Softmax", [ins[1]], [probs], axis=-1, name=f"{node.output[0]}_Softmax")
        new += [""] * (14 - len(new)) + [probs]  # fc3 and zero points absent, router_weights (…, E)
    while new and not new[-1]:
        new.pop()
    node.op_type = "QMoE"
    node.input[:] = new
    attrs = {"expert_weight_bits": s.bits, "block_size": s.block, "accuracy_level": s.accuracy,
             "weights_prepacked": 0}  # raw [E, N, K/pack], as quantize_matmul_{4,8}bits makes it
    node.attribute.extend(onnx.helper.make_attribute(a, v) for a, v in attrs.items())
    return softmax


def _insert(graph: onnx.GraphProto, before: dict[str, onnx.NodeProto]) -> None:
    """Put each new node just before the node whose first output is its key (topological order kept)."""
    nodes = [x for n in graph.node for x in ([before[n.output[0]]] if n.output[0] in before else []) + [n]]
    del graph.node[:]
    graph.node.extend(nodes)


def _dense_moe_layers(names: set[str]) -> int:
    """The dense mixture-of-experts layers among quantized weights, by the emitter's names (…experts.up.weight)."""
    return len({n.split(".experts.")[0] for n in names if ".experts." in n})


def quantize_graph(model: LazyModel, weights: str, output: str = "logits") -> Quantized:
    """Every MatMul of `model` whose right operand is a float32 (K, N) initializer → a MatMulNBits, and every
    `com.microsoft.MoE` whose stacked experts the block divides → a QMoE, in place.

    The packed weight and scales are made from a `Pair` (an `ExpertPairs`, one expert at a time) that reads the
    old initializer when the model is saved, so each float weight is made, quantized and dropped in turn; a
    weight nothing else reads leaves."""
    s, g = scheme(weights), model.graph
    head = _head_matmul(g, output)
    head_out = head.output[0] if head is not None else None
    mats = _weights(model)
    todo = [n for n in g.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in mats]
    moes = [n for n in g.node if n.op_type == "MoE" and n.domain == MS]
    qmoe = [n for n in moes if _moe_fits(model, n, s)]
    if not todo and not qmoe:
        raise MptcError(f"the graph has no weight MatMul to quantize ({weights})",
                        hint="deploy with --weights float32 or float16")
    quantized_head = any(n.output[0] == head_out for n in todo)
    old = {n.input[1] for n in todo} | {n.input[i] for n in qmoe for i in (2, 4)}
    dense = _dense_moe_layers({n.input[1] for n in todo})
    for node in todo:
        _replace(model, node, mats[node.input[1]], s)
    extra = {n.output[0]: _replace_moe(model, n, s) for n in qmoe}
    _insert(g, {k: v for k, v in extra.items() if v is not None})
    read = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    for name in sorted(old - read):
        model.remove_initializer(name)
    if MS not in {o.domain for o in model.proto.opset_import}:
        model.proto.opset_import.append(onnx.helper.make_opsetid(MS, 1))
    return Quantized(s, len(todo), quantized_head, len(qmoe), dense, len(moes) - len(qmoe))
