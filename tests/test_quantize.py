"""Per-tensor weight quantization: the bytes of ONNX Runtime's own `MatMulNBitsQuantizer`, one weight at a time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mptc.errors import MptcError
from mptc.quantize import BLOCK, Pair, Scheme, quantize_weight, scheme

from .decoders import prompt


def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    """x (B, K) @ w (K, N) as an ONNX model with w an initializer."""
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _reference(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """What MatMulNBitsQuantizer (block 32, symmetric, accuracy level 4) writes for w: packed, scales, attrs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(_one_matmul(w), bits=bits, block_size=BLOCK, is_symmetric=True, accuracy_level=4)
    q.process()
    m = q.model.model
    (node,) = m.graph.node
    assert node.op_type == "MatMulNBits" and len(node.input) == 3  # symmetric: no zero points
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return inits[node.input[1]], inits[node.input[2]], {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(64, 48), (80, 24), (7, 5)], ids=["blocks", "padded", "one-block"])
def test_weights_equal_ort_quantizer(bits, shape):
    """Packed bytes and scales bit-identical to the quantizer's, K a multiple of 32 or not."""
    w = np.random.default_rng(0).normal(0, 0.05, shape).astype(np.float32)
    w[3, 1] = 0.9  # an outlier: its block's scale follows it
    packed, scales = quantize_weight(w, bits)
    ref_packed, ref_scales, attrs = _reference(w, bits)
    assert packed.dtype == np.uint8 and scales.dtype == np.float32
    assert packed.shape == ref_packed.shape and scales.shape == ref_scales.shape
    np.testing.assert_array_equal(packed, ref_packed)
    np.testing.assert_array_equal(scales, ref_scales)
    assert Scheme(bits).shapes(*shape) == (packed.shape, scales.shape)
    assert Scheme(bits).attrs(*shape) == attrs


@pytest.mark.parametrize("bits, tol", [(4, 0.12), (8, 0.008)])
def test_matmulnbits_computes_near_float(bits, tol):
    """A MatMulNBits node on quantize_weight's output, run in ONNX Runtime, is near the float product (relative
    RMS; round to nearest leaves ~step/√12 per weight, step = max|w|/8 or /128 per block)."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    k, n = 96, 40
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    packed, scales = quantize_weight(w, bits)
    s = Scheme(bits)
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", **s.attrs(k, n))
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                          [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = x @ w
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < tol, err
    assert err > tol / 20, err  # it did quantize


def test_pair_makes_each_weight_once():
    """The packed weight and its scales come from one call of the maker; both are dropped once handed out."""
    w = np.random.default_rng(2).normal(0, 1, (64, 8)).astype(np.float32)
    calls = []
    pair = Pair(lambda: calls.append(1) or w, 4)
    scales, packed = pair.scales(), pair.packed()
    assert len(calls) == 1 and not pair._made
    ref_packed, ref_scales = quantize_weight(w, 4)
    np.testing.assert_array_equal(packed, ref_packed)
    np.testing.assert_array_equal(scales, ref_scales)
    pair.packed()
    assert len(calls) == 2


def test_refusals():
    with pytest.raises(MptcError, match="unknown weight format 'int3' to quantize"):
        scheme("int3")
    with pytest.raises(MptcError, match=r"cannot quantize a weight of shape \(2, 3, 4\)"):
        quantize_weight(np.zeros((2, 3, 4), np.float32), 4)
    with pytest.raises(MptcError, match="cannot quantize to 2 bits"):
        quantize_weight(np.zeros((32, 4), np.float32), 2)
    assert scheme("int4").describe(9, True) == (
        "int4 weights: 9 MatMuls as MatMulNBits (symmetric, block 32), accuracy level 4 (int8 activations); "
        "embeddings and norms float, lm head quantized")


def _nbits_weights(path) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """Per MatMulNBits of an ONNX file, in graph order: its attributes, packed weight and scales."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    return [({a.name: helper.get_attribute_value(a) for a in n.attribute},
             numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]]))
            for n in m.graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_deploy_equals_ort_quantizer_on_the_float_graph(weights, grown_decoder, tmp_path):
    """A heterogeneous model (per-layer kv heads and MLP widths) deployed with quantized weights: every
    MatMulNBits equals, bit for bit, what MatMulNBitsQuantizer makes of the float32 deploy's graph (packed QKV,
    transposed weights and the lm head included), and GenAI's first logits stay near float's."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from mptc.deploy import deploy
    from mptc.genai import generate

    bits = int(weights[3:])
    f = deploy(grown_decoder.model_dir, tmp_path / "f", weights="float32").path
    q = deploy(grown_decoder.model_dir, tmp_path / "q", weights=weights)
    ref = MatMulNBitsQuantizer(onnx.load(str(f / "model.onnx")), bits=bits, block_size=BLOCK, is_symmetric=True,
                               accuracy_level=4)
    ref.process()
    ref.model.save_model_to_file(str(tmp_path / "ref.onnx"), use_external_data_format=False)
    got, want = _nbits_weights(q.path / "model.onnx"), _nbits_weights(tmp_path / "ref.onnx")
    assert len(got) == len(want) >= 4 * grown_decoder.spec.n_layers + 1
    for (ga, gp, gs), (wa, wp, ws) in zip(got, want, strict=True):
        assert ga == wa
        np.testing.assert_array_equal(gp, wp)
        np.testing.assert_array_equal(gs, ws)
    assert f"{len(got)} MatMuls as MatMulNBits" in q.quantized and "lm head quantized" in q.quantized
    ids = prompt(grown_decoder.spec.vocab)[0][1:2].numpy()  # (1, 6)
    a, b = generate(f, ids, 4), generate(q.path, ids, 4)
    err = np.linalg.norm(b.first_logits - a.first_logits) / np.linalg.norm(a.first_logits)
    assert err < (0.33 if bits == 4 else 0.033), err  # the bounds of tests/test_deploy.py (measured: 0.19, 0.026)
