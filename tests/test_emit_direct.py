"""The direct ONNX emitter (mptc.emit): against the traced export and PyTorch, KV caches in both
profiles, per-layer cache sizes, the GenAI kernel's limits, and what it refuses by name."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mptc
import mptc.export
from mptc.cli import main
from mptc.emit import COVERED, emit, genai, unsupported
from mptc.errors import MptcError
from mptc.schema import parse

from .conftest import EXAMPLES, perturbed

SPECS = {
    "gpt2": open("tests/specs/tiny-gpt2.mpt").read(),
    "llama": open("tests/specs/tiny-llama.mpt").read(),
    "qknorm": open("tests/specs/qknorm-lm.mpt").read(),
    "mistral": """model mistral {
  vocab = 300
  context = 64
  width = 64
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 2, head_dim = 16, bias = false, out_bias = false, window = 4 }
    mlp { hidden = 96, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}""",
    "bert": """model bert {
  vocab = 300
  context = 32
  width = 32
  embed { positions = learned, dropout = 0.1, norm = layernorm(eps = 1e-12), segments = 2 }
  layers 2 {
    norm = layernorm(eps = 1e-12)
    placement = post
    dropout = 0.1
    attention { heads = 4, mask = bidirectional, dropout = 0.1 }
    mlp { hidden = 64, activation = gelu }
  }
  head classify { classes = 3, pool = first, pooler = true }
}""",
    "mlm": """model mlm {
  vocab = 300
  context = 32
  width = 32
  embed { positions = sinusoidal }
  layers 2 {
    norm = layernorm(eps = 1e-5, bias = false)
    attention { heads = 2, mask = bidirectional, window = 3 }
    mlp { hidden = 64, activation = relu }
  }
  head classify { classes = 2, pool = mean }
}""",
    "hetero": """model hetero {
  vocab = 300
  context = 64
  width = 64
  embed { positions = rope(theta = 10000.0) }
  layers 3 {
    norm = [rmsnorm(eps = 1e-6), layernorm(eps = 1e-5), rmsnorm(eps = 1e-6)]
    placement = [pre, pre, post]
    attention {
      heads = [4, 4, 2], kv_heads = [4, 2, 1], head_dim = [32, 32, 16], value_dim = [32, 16, 16],
      rotary_dim = [16, 32, 8], window = [none, 4, none], bias = [true, false, false]
    }
    mlp { hidden = [64, 96, 48], activation = [swiglu, gelu_tanh, geglu], bias = [false, true, false] }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true, transform = dense(activation = silu, norm = none) }
}""",
    # the 2026 features the emitter writes: embedding scale, attention scale, logit soft cap, geglu_tanh, scaled rope
    "gemma": """model gemma {
  vocab = 300
  context = 48
  width = 64
  embed { positions = rope(theta = 500000.0, scaling = llama3(factor = 8.0, low = 1.0, high = 4.0, original = 16)),
          scale = sqrt_width }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 2, head_dim = 16, bias = false, scale = 0.2, window = [none, 5] }
    mlp { hidden = 96, activation = geglu_tanh, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true, softcap = 3.0 }
}""",
    "gemma2": """model gemma2 {
  vocab = 300
  context = 48
  width = 64
  embed { positions = rope(theta = 10000.0), scale = sqrt_width }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    placement = [sandwich, output]
    attention {
      heads = 4, kv_heads = 2, head_dim = 16, bias = false, softcap = 2.0, window = [4, none],
      rope = [rope(theta = 500.0), none], qk_norm = rmsnorm(eps = 1e-6), qk_norm_over = [head, all]
    }
    mlp { hidden = 96, activation = geglu_tanh, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true, softcap = 3.0 }
}""",
    "neox": """model neox {
  vocab = 300
  context = 48
  width = 64
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = layernorm(eps = 1e-5)
    parallel = true
    shared_norm = [false, true]
    attention { heads = 4, head_dim = 16, rotary_dim = 8 }
    mlp { hidden = 128, activation = gelu }
  }
  head lm { norm = layernorm(eps = 1e-5), tied = false }
}""",
    "vit": """model vit {
  width = 32
  embed { input = patches(image = 16, patch = 4, channels = 3, cls = false), positions = sinusoidal }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 2, mask = bidirectional, window = [5, none] }
    mlp { hidden = 64, activation = gelu }
  }
  head classify { classes = 4, pool = mean, norm = layernorm(eps = 1e-6) }
}""",
    "yarn": """model yarn {
  vocab = 300
  context = 48
  width = 64
  embed { positions = rope(theta = 10000.0, scaling = yarn(factor = 4.0, original = 16, beta_fast = 16.0)) }
  layers 1 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 4, head_dim = 16, bias = false }
    mlp { hidden = 64, activation = silu, bias = false }
  }
  head classify { classes = 3, pool = last }
}""",
    # GroupQueryAttention on layers 0 and 2; layer 1's head size 24 falls back to the portable form
    "gqa": """model gqa {
  vocab = 300
  context = 48
  width = 64
  embed { positions = rope(theta = 10000.0) }
  layers 3 {
    norm = rmsnorm(eps = 1e-6)
    attention {
      heads = [4, 4, 2], kv_heads = [2, 1, 2], head_dim = [16, 24, 32], rotary_dim = [16, 24, 16],
      window = [none, 4, 4], bias = [true, false, false]
    }
    mlp { hidden = [64, 96, 48], activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}""",
}
COVERED_NO_CACHE = ["gpt2", "llama", "mistral", "qknorm", "bert", "mlm", "hetero", "gemma", "gemma2", "neox", "yarn",
                    "vit"]
TRACED = {"gpt2", "llama", "mistral", "qknorm", "bert", "hetero"}  # also against the traced export (seconds each)
DECODERS = ["gpt2", "llama", "mistral", "qknorm", "hetero", "gemma", "gemma2", "neox"]


def model(name: str, seed: int = 0):
    """A tiny model whose biases, norm gains and shifts are all non-trivial."""
    return perturbed(parse(SPECS[name], name), seed=seed)


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def traced(m, path, monkeypatch) -> onnx.ModelProto:
    """The traced export of a model (the independent cross-check of the emitter)."""
    with monkeypatch.context() as mp:
        mp.setattr(mptc.export, "_direct", lambda spec, dtype: False)
        mptc.export_onnx(m, path)
    return onnx.load(path)


# --- without a cache: the traced export's inputs and outputs ---
@pytest.mark.parametrize("name", COVERED_NO_CACHE)
def test_direct_matches_traced_export_and_pytorch(name, tmp_path, monkeypatch):
    m = model(name)
    spec = mptc.spec_of(m)
    assert unsupported(spec, cache=False) == []
    proto = emit(m).to_proto()
    onnx.checker.check_model(proto, full_check=True)
    assert [v.name for v in proto.graph.input] == list(spec.inputs)
    assert [v.name for v in proto.graph.output] == [spec.output]
    ref_file = traced(m, tmp_path / "traced.onnx", monkeypatch) if name in TRACED else None
    if ref_file is not None:
        for got, want in ((proto.graph.input, ref_file.graph.input), (proto.graph.output, ref_file.graph.output)):
            assert [v.name for v in got] == [v.name for v in want]
            assert [[bool(d.dim_param) for d in v.type.tensor_type.shape.dim] for v in got] == \
                [[bool(d.dim_param) for d in v.type.tensor_type.shape.dim] for v in want]
    x = mptc.example_inputs(spec, batch=3, seq=9, seed=1, padded=True)
    feed = {k: v.numpy() for k, v in x.items()}
    with torch.no_grad():
        ref = m(**x).numpy()
    got = session(proto).run(None, feed)[0]
    assert got.shape == ref.shape
    real = x["attention_mask"].numpy().astype(bool) if "attention_mask" in x else None
    if got.ndim == 3:  # the real positions
        got, ref = got[real], ref[real]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    if ref_file is not None:
        want = session(ref_file).run(None, feed)[0]
        np.testing.assert_allclose(got, want[real] if want.ndim == 3 else want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [18, 23])
def test_float16_graph_runs_in_float16(opset):
    m = model("llama")
    proto = emit(m, dtype="float16", opset=opset).to_proto()
    onnx.checker.check_model(proto, full_check=True)
    assert {i.data_type for i in proto.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.FLOAT16}
    x = mptc.example_inputs(mptc.spec_of(m), batch=2, seq=9, seed=3)
    got = session(proto).run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        ref = m(**x).numpy()
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=0, atol=5e-3 * np.abs(ref).max())


@pytest.mark.parametrize("name,profile", [("gqa", "genai"), ("hetero", "portable")])
def test_float16_cache_in_both_profiles(name, profile):
    m = model(name)
    spec = mptc.spec_of(m)
    sess = session(emit(m, cache=True, profile=profile, dtype="float16").to_proto())
    ids = np.random.default_rng(0).integers(0, spec.vocab, (2, 7))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)} | _past(spec, 2, np.float16)
    if "position_ids" in {i.name for i in sess.get_inputs()}:
        feed["position_ids"] = np.tile(np.arange(7), (2, 1))
    logits, key = sess.run(None, feed)[:2]
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids)).numpy()
    assert logits.dtype == key.dtype == np.float16
    np.testing.assert_allclose(logits.astype(np.float32), ref, rtol=0, atol=5e-3 * np.abs(ref).max())


# --- KV cache ---
def _past(spec, batch: int, dtype=np.float32) -> dict[str, np.ndarray]:
    out = {}
    for i, ly in enumerate(spec.layers):
        a = ly.attention
        out[f"past_key_values.{i}.key"] = np.zeros((batch, a.kv_heads, 0, a.head_dim), dtype)
        out[f"past_key_values.{i}.value"] = np.zeros((batch, a.kv_heads, 0, a.value_dim), dtype)
    return out


def _decode(sess, spec, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, prefill: int) -> tuple[list, list]:
    """Logits of a prefill of `prefill` tokens, then one step per remaining token; and each run's outputs."""
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids[:, :prefill], "attention_mask": mask[:, :prefill]} | _past(spec, ids.shape[0])
    if "position_ids" in names:
        feed["position_ids"] = pos[:, :prefill]
    runs = [sess.run(None, feed)]
    for t in range(prefill, ids.shape[1]):
        feed = {"input_ids": ids[:, t:t + 1], "attention_mask": mask[:, :t + 1]}
        if "position_ids" in names:
            feed["position_ids"] = pos[:, t:t + 1]
        for i in range(spec.n_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = runs[-1][1 + 2 * i:3 + 2 * i]
        runs.append(sess.run(None, feed))
    return [r[0] for r in runs], runs


@pytest.mark.parametrize("name", DECODERS)
def test_portable_cache_matches_full_recomputation(name):
    m = model(name)
    spec = mptc.spec_of(m)
    em = emit(m, cache=True)
    proto = em.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in proto.graph.output] == ["logits"] + [f"present.{i}.{k}" for i in range(spec.n_layers)
                                                                 for k in ("key", "value")]
    ids = np.random.default_rng(0).integers(0, spec.vocab, (2, 9))
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids)).numpy()  # (2, 9, V)
    logits, runs = _decode(session(proto), spec, ids, np.ones_like(ids), np.tile(np.arange(9), (2, 1)), prefill=6)
    np.testing.assert_allclose(logits[0], ref[:, :6], rtol=1e-4, atol=1e-4)
    for step, out in enumerate(logits[1:]):
        np.testing.assert_allclose(out[:, 0], ref[:, 6 + step], rtol=1e-4, atol=1e-4)
    for i, (ly, lc) in enumerate(zip(spec.layers, em.layers, strict=True)):  # each layer's own cache sizes
        a = ly.attention
        assert (lc.kv_heads, lc.head_dim, lc.value_dim, lc.form, lc.window) == \
            (a.kv_heads, a.head_dim, a.value_dim, "portable", a.window)
        assert runs[-1][1 + 2 * i].shape == (2, a.kv_heads, 9, a.head_dim)
        assert runs[-1][2 + 2 * i].shape == (2, a.kv_heads, 9, a.value_dim)


def test_heterogeneous_cache_inputs_have_per_layer_sizes():
    proto = emit(model("hetero"), cache=True).to_proto()
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims["past_key_values.0.key"] == ["batch_size", 4, "past_sequence_length", 32]
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["past_key_values.2.key"] == ["batch_size", 1, "past_sequence_length", 16]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    out = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    assert out["present.2.value"] == ["batch_size", 1, "total_sequence_length", 16]
    assert out["logits"] == ["batch_size", "sequence_length", 300]


def test_left_padded_batch_decodes_each_row_as_if_alone():
    """Left padding with position ids counting real tokens: each row's logits are those of the row alone."""
    m = model("llama")
    spec = mptc.spec_of(m)
    rng = np.random.default_rng(1)
    lengths = [8, 5]
    ids = np.zeros((2, 8), np.int64)
    mask = np.zeros((2, 8), np.int64)
    rows = [rng.integers(0, spec.vocab, n) for n in lengths]
    for b, r in enumerate(rows):
        ids[b, 8 - len(r):], mask[b, 8 - len(r):] = r, 1
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    logits, _ = _decode(session(emit(m, cache=True).to_proto()), spec, ids, mask, pos, prefill=5)
    for b, r in enumerate(rows):
        with torch.no_grad():
            alone = m(input_ids=torch.from_numpy(r)[None]).numpy()[0]  # (n, V)
        n = len(r)
        pad = 8 - n
        prompt_real = alone[: 5 - pad]  # the prompt's real tokens
        np.testing.assert_allclose(logits[0][b, pad:], prompt_real, rtol=1e-4, atol=1e-4)
        for step, out in enumerate(logits[1:]):
            np.testing.assert_allclose(out[b, 0], alone[5 - pad + step], rtol=1e-4, atol=1e-4)


# --- the GenAI profile ---
def test_genai_profile_runs_group_query_attention_with_fallback():
    m = model("gqa")
    spec = mptc.spec_of(m)
    em = emit(m, cache=True, profile="genai", max_length=48)
    proto = em.to_proto()
    ops = [n.op_type for n in proto.graph.node]
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.domain == "com.microsoft" for n in gqa)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert [(a["num_heads"], a["kv_num_heads"], a["local_window_size"], a["do_rotary"]) for a in attrs] == \
        [(4, 2, -1, 1), (2, 2, 4, 1)]
    cos = {i.name: tuple(i.dims) for i in proto.graph.initializer if i.name.startswith("cos_cache")}
    assert set(cos.values()) == {(48, 8)}
    assert "SkipSimplifiedLayerNormalization" in ops and "SimplifiedLayerNormalization" in ops
    assert [ly.form for ly in em.layers] == ["genai", "portable", "genai"]
    assert any("layer 1" in n and "head_dim 24" in n for n in em.notes)
    assert not em.share_buffer
    ids = np.random.default_rng(2).integers(0, spec.vocab, (2, 9))
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids)).numpy()
    logits, _ = _decode(session(proto), spec, ids, np.ones_like(ids), np.tile(np.arange(9), (2, 1)), prefill=6)
    np.testing.assert_allclose(logits[0], ref[:, :6], rtol=1e-4, atol=1e-4)
    for step, out in enumerate(logits[1:]):
        np.testing.assert_allclose(out[:, 0], ref[:, 6 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gemma", "gemma2", "neox", "gpt2"])
def test_genai_profile_covers_the_decoder_features(name):
    """Scaled and per-layer rope in the kernel's cos/sin caches, attention scale and soft cap, embedding
    scale, logit soft cap, sandwich and output norms, parallel residuals (rotary 8: portable), learned
    positions with layernorms (GroupQueryAttention without rotary, SkipLayerNormalization)."""
    m = model(name)
    spec = mptc.spec_of(m)
    em = emit(m, cache=True, profile="genai")
    assert [ly.form for ly in em.layers] == ["portable" if name == "neox" else "genai"] * 2
    ops = {n.op_type for n in em.to_proto().graph.node}
    assert ("GroupQueryAttention" in ops) == (name != "neox")
    assert ("SkipLayerNormalization" in ops) == (name in ("neox", "gpt2"))
    ids = np.random.default_rng(3).integers(0, spec.vocab, (2, 9))
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids)).numpy()
    assert np.abs(ref).max() < 3.0 or spec.head.softcap is None  # capped
    logits, _ = _decode(session(em.to_proto()), spec, ids, np.ones_like(ids), np.tile(np.arange(9), (2, 1)), 6)
    np.testing.assert_allclose(logits[0], ref[:, :6], rtol=1e-4, atol=1e-4)
    for step, out in enumerate(logits[1:]):
        np.testing.assert_allclose(out[:, 0], ref[:, 6 + step], rtol=1e-4, atol=1e-4)


def test_genai_fallback_rule_is_the_kernels(monkeypatch):
    """The layer emitter falls back for, head size 24, is one the CPU kernel itself refuses."""
    m = model("gqa")
    assert genai.fallback_reason(mptc.spec_of(m), mptc.spec_of(m).layers[1].attention) is not None
    monkeypatch.setattr(genai, "fallback_reason", lambda spec, a: None)
    sess = session(emit(m, cache=True, profile="genai").to_proto())
    ids = np.zeros((1, 3), np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)} | _past(mptc.spec_of(m), 1)
    with pytest.raises(Exception, match="head_size shall be a multiple of 16"):
        sess.run(None, feed)


# --- coverage ---
def test_unsupported_names_each_refused_feature():
    def reasons(path, **kw):
        return unsupported(mptc.load(path), **kw)

    by_name = {p.stem: p for p in EXAMPLES}
    assert any(r.startswith("token types (embed.types)") for r in reasons(by_name["mpt-token-types"], cache=False))
    assert any("per-type modulation (layers.0.modulate, layers.1.modulate)" in r
               for r in reasons(by_name["mpt-token-types"], cache=False))
    assert any(r.startswith("hypernetwork deltas (layers.") for r in reasons(by_name["mpt-hyper"], cache=False))
    assert reasons(by_name["vit-b16"], cache=False) == []
    assert "image patches and tokens in one sequence (embed.input)" in reasons(by_name["mpt-multimodal"], cache=False)
    assert reasons("tests/specs/nested-lm.mpt", cache=True, profile="genai") == []  # covered: the full model
    bert = parse(SPECS["bert"], "bert")
    assert unsupported(bert, cache=False) == []
    cached = unsupported(bert, cache=True)
    assert "a classify head with a KV cache (decoders with `head lm`) (head)" in cached
    assert any(r.startswith("bidirectional attention with a KV cache (layers.0.attention.mask") for r in cached)
    assert any("genai profile without a KV cache" in r for r in unsupported(bert, cache=False, profile="genai"))
    assert unsupported(parse(SPECS["gqa"], "gqa"), cache=True, profile="genai") == []
    llama = SPECS["llama"]
    for old, new, reason in [  # covered (tests/test_emit_coverage.py), and one still refused
        ("rope(theta = 10000.0)", "rope(theta = 10000.0, scaling = dynamic(factor = 2, original = 16))", None),
        ("head lm { norm = rmsnorm(eps = 1e-6), tied = false }", "head span { norm = rmsnorm(eps = 1e-6) }", None),
        ("head lm { norm = rmsnorm(eps = 1e-6), tied = false }", "head classify { classes = 3, pool = none }", None),
        ("rope(theta = 10000.0)", "rope(theta = 10000.0), experts = moe(count = 2)",
         "mixture-of-experts embeddings (embed.experts)"),
    ]:
        assert unsupported(parse(llama.replace(old, new, 1), "x"), cache=False) == ([reason] if reason else [])


def test_unknown_fields_off_their_default_are_refused(monkeypatch):
    """An allow-list: a field the emitter does not list is refused by name once it leaves its default."""
    spec = parse(SPECS["qknorm"], "q")
    monkeypatch.setitem(COVERED, type(spec.layers[0].attention), COVERED[type(spec.layers[0].attention)] - {"qk_norm"})
    assert unsupported(spec, cache=False) == ["qk norm (layers.0.attention.qk_norm, layers.1.attention.qk_norm)"]
    plain = dataclasses.replace(spec, layers=tuple(dataclasses.replace(ly, attention=dataclasses.replace(
        ly.attention, qk_norm=None)) for ly in spec.layers))
    assert unsupported(plain, cache=False) == []


def test_emit_refuses_by_name_and_suggests_portable():
    m = mptc.build(mptc.load([p for p in EXAMPLES if p.stem == "mpt-token-types"][0]), seed=0)
    with pytest.raises(MptcError, match=r"token types \(embed.types\)") as e:
        emit(m)
    assert "traces" in e.value.hint
    with pytest.raises(MptcError, match="genai profile without a KV cache") as e:
        emit(model("llama"), profile="genai")
    assert "profile='portable'" in e.value.hint
    with pytest.raises(MptcError, match=r"a classify head with a KV cache .*\(head\)") as e:
        emit(model("bert"), cache=True, profile="genai")
    assert "cache=False" in e.value.hint


def test_inline_file_holds_the_same_model(tmp_path):
    """Weights written into the file one record at a time read back as the same graph and tensors."""
    em = emit(model("bert"))  # scalar and matrix initializers
    em.save(tmp_path / "m.onnx", external_data=False)
    got, want = onnx.load(tmp_path / "m.onnx"), em.to_proto()
    onnx.checker.check_model(got, full_check=True)
    assert list(got.graph.node) == list(want.graph.node)
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in want.graph.initializer}
    assert sorted(t.name for t in got.graph.initializer) == sorted(tensors)
    for t in got.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), tensors[t.name])


# --- mptc compile X.onnx ---
class TracedError(Exception):
    """Raised in place of torch.onnx.export: the exporter was called."""


def test_compile_uses_the_direct_path_when_covered(tmp_path, monkeypatch):
    calls = []

    def export(*args, **kwargs):
        calls.append(1)
        raise TracedError

    monkeypatch.setattr(torch.onnx, "export", export)
    (tmp_path / "m.mpt").write_text(SPECS["llama"])
    assert main(["compile", str(tmp_path / "m.mpt"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert calls == []  # written without tracing
    m = mptc.build(parse(SPECS["llama"], "m"), seed=0).eval()
    x = mptc.example_inputs(mptc.spec_of(m), batch=2, seq=7, padded=True)
    with torch.no_grad():
        np.testing.assert_allclose(mptc.export.run_onnx(tmp_path / "m.onnx", x), m(**x).numpy(), rtol=1e-4, atol=1e-4)
    assert main(["compile", str(tmp_path / "m.mpt"), "-o", str(tmp_path / "e.onnx"), "--external-data"]) == 0
    assert (tmp_path / "e.onnx.data").is_file() and calls == []
    np.testing.assert_allclose(mptc.export.run_onnx(tmp_path / "e.onnx", x), mptc.export.run_onnx(tmp_path / "m.onnx",
                                                                                                   x), rtol=0, atol=0)
    src = [p for p in EXAMPLES if p.stem == "mpt-token-types"][0]
    with pytest.raises(TracedError):
        main(["compile", str(src), "-o", str(tmp_path / "t.onnx")])
    assert calls == [1]  # not covered: traced
