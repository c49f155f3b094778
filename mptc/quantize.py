"""Weight-only quantization of a deploy graph with ONNX Runtime's own quantizer.

Every MatMul whose right operand is a weight becomes a `com.microsoft.MatMulNBits` (symmetric, blocks of 32
along the input axis, one float scale per block; the activations stay float): 4 bits for `int4`, 8 for
`int8`. Embeddings (Gather) and norms are no MatMuls and stay float; the lm head is a MatMul and is quantized
too, unless it reads the token embedding through a transpose (a tied head), which is no weight operand.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

from .errors import MptcError

BITS = {"int4": 4, "int8": 8}
BLOCK = 32


@dataclass
class Quantized:
    """The quantized graph and what was done to it."""

    model: object  # onnx.ModelProto
    bits: int
    matmuls: int  # MatMuls now MatMulNBits
    kept: int  # weight MatMuls left float (shapes the quantizer does not take)
    head: bool  # whether the MatMul that makes the logits was quantized

    def describe(self) -> str:
        head = "quantized" if self.head else "float"
        kept = f", {self.kept} left float" if self.kept else ""
        return (f"int{self.bits} weights: {self.matmuls} MatMuls as MatMulNBits (symmetric, block {BLOCK}{kept}); "
                f"embeddings and norms float, lm head {head}")


def _weight_matmuls(model) -> list[str]:
    """Output names of the MatMuls whose second operand is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    return [n.output[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _head_output(model, output: str = "logits") -> str | None:
    """The tensor name of the matrix product behind the graph output `output` (through casts, adds, reshapes)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name, seen = output, 0
    while name in producer and seen < 16:
        n = producer[name]
        if n.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            return n.output[0]
        name, seen = n.input[0], seen + 1
    return None


def quantize(model, weights: str):
    """`model` (an onnx.ModelProto, weights loaded) with weight-only `int4` or `int8` MatMuls."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if weights not in BITS:
        raise MptcError(f"unknown weight format '{weights}'", hint="choose int4 or int8")
    bits = BITS[weights]
    before = _weight_matmuls(model)
    head = _head_output(model)
    head_is_weight = head in before
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs every node at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            q.process()
    except Exception as e:
        raise MptcError(f"ONNX Runtime's quantizer failed on this graph: {str(e).strip().splitlines()[0]}",
                        hint="deploy with --weights float32 or float16") from None
    finally:
        logging.getLogger().setLevel(level)
    out = q.model.model
    left = set(_weight_matmuls(out))
    nbits = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    if nbits == 0:
        raise MptcError(f"ONNX Runtime's quantizer left every MatMul of this graph float ({weights})",
                        hint="deploy with --weights float32 or float16")
    return Quantized(out, bits, nbits, len(left & set(before)), head_is_weight and head not in left)
