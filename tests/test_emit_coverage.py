"""What the direct ONNX emitter covers beyond plain decoders and encoders (docs/onnx.md): mixture-of-experts
MLPs, per-token classifiers and span heads, length-dependent rope scalings (dynamic, longrope), nested models;
and the special tokens deploy dirs carry (docs/deploy.md). Every emitted graph runs in ONNX Runtime against
the PyTorch graph: without a cache, with one (both profiles), and a cached decode of several steps against
the full recomputation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import mptc
from mptc.deploy import deploy
from mptc.emit import emit, unsupported
from mptc.emit.nested import active
from mptc.genai import generate
from mptc.hf import import_hf
from mptc.schema import parse

from .conftest import perturbed
from .decoders import _perturb, prompt
from .test_emit_direct import _decode, _past, session, traced

TOL = 1e-4


# --- special tokens in deploy dirs ---
def test_token_reader_is_torch_free(llama_decoder):
    code = ("import sys, json; from mptc.tokens import special_tokens; "
            f"print(json.dumps(special_tokens({str(llama_decoder.model_dir)!r}))); assert 'torch' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout) == {"bos_token_id": 0, "pad_token_id": 0} == mptc.hf.special_tokens(
        llama_decoder.model_dir)


def _genai_search(d, ids: np.ndarray, n: int) -> list[int]:
    """ONNX Runtime GenAI's own greedy search (it ends at genai_config's eos_token_id)."""
    import onnxruntime_genai as og

    model = og.Model(str(d))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def test_deploy_dirs_carry_the_special_tokens(llama_decoder, tmp_path):
    """An imported checkpoint whose eos greedy decoding reaches early: GenAI (mptc's loop and GenAI's own
    search) stops at it where transformers' generate does; Optimum's configs carry it too."""
    dec, n = llama_decoder, 16
    ids = prompt(dec.spec.vocab)[0][1:2]  # (1, 6)
    with torch.no_grad():
        free = dec.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    free = free[0, ids.shape[1]:].tolist()
    k = next(i for i in range(2, n) if free[i] not in free[:i])  # the first new id at step ≥ 2
    eos = free[k]
    hf_dir = shutil.copytree(dec.hf_dir, tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(cfg | {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 3}))
    gen_cfg = hf_dir / "generation_config.json"  # its ids win over config.json's
    old = json.loads(gen_cfg.read_text()) if gen_cfg.exists() else {}
    gen_cfg.write_text(json.dumps(old | {"bos_token_id": 1, "eos_token_id": [eos, dec.spec.vocab - 1],
                                         "pad_token_id": 3}))
    import_hf(hf_dir, tmp_path / "m")
    with torch.no_grad():
        want = dec.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               eos_token_id=[eos, dec.spec.vocab - 1], pad_token_id=3)[0, ids.shape[1]:].tolist()
    assert want == free[:k + 1]
    for runtime in ("genai", "portable"):
        d = deploy(tmp_path / "m", tmp_path / runtime, runtime=runtime).path
        model = json.loads((d / "genai_config.json").read_text())["model"]
        assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (
            1, [eos, dec.spec.vocab - 1], 3)
        for name in ("config.json", "generation_config.json"):
            got = json.loads((d / name).read_text())
            assert (got["bos_token_id"], got["eos_token_id"], got["pad_token_id"]) == (1, [eos, dec.spec.vocab - 1], 3)
        assert generate(d, ids.numpy(), n).new_ids == [want]
        assert _genai_search(d, ids.numpy(), n) == want


# --- the emitted graphs against PyTorch ---
MOE = """model moe {
  vocab = 96
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0) }
  layers 3 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 2, head_dim = 16, bias = false, out_bias = false }
    mlp {
      hidden = 24, activation = [swiglu, gelu_tanh, geglu], bias = [false, true, false], experts = [4, 4, 3],
      top_k = [2, 2, 1], normalize = [true, false, true], shared = [16, none, 8], shared_gate = [true, false, false]
    }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}"""
ENCODER = """model enc {
  vocab = 96
  context = 32
  width = 32
  embed { positions = learned, norm = layernorm(eps = 1e-12) }
  layers 2 {
    norm = layernorm(eps = 1e-12)
    placement = post
    attention { heads = 4, mask = bidirectional }
    mlp { hidden = 48, activation = gelu }
  }
  HEAD
}"""
HEADS = {"tokens": "head classify { classes = 5, pool = none }", "span": "head span { bias = true }"}


def _model(text: str, name: str, seed: int = 0):
    return perturbed(parse(text, name), seed=seed)


def _pytorch(m, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(input_ids=torch.from_numpy(ids)).numpy()


def _check_decoder(m, *, max_length: int | None = None, length: int = 9, prefill: int = 6, seed: int = 0,
                   profiles=("portable", "genai")) -> dict[str, list[str]]:
    """Without a cache, then with one in each profile (a prefill and one-token steps): each against PyTorch's
    full recomputation. Returns each profile's contrib ops."""
    spec = mptc.spec_of(m)
    ids = np.random.default_rng(seed).integers(0, spec.vocab, (2, length))
    ref = _pytorch(m, ids)  # (2, T, V)
    assert unsupported(spec, cache=False) == []
    sess = session(emit(m, max_length=max_length).to_proto())
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0], ref,
                               rtol=TOL, atol=TOL)
    ops = {}
    for profile in profiles:
        assert unsupported(spec, cache=True, profile=profile) == []
        proto = emit(m, cache=True, profile=profile, max_length=max_length).to_proto()
        ops[profile] = sorted({n.op_type for n in proto.graph.node if n.domain})
        cached = active(m, spec, {})[0]  # a nested model: the cache of the sub-network it runs
        logits, _ = _decode(session(proto), cached, ids, np.ones_like(ids), np.tile(np.arange(length), (2, 1)),
                            prefill)
        np.testing.assert_allclose(logits[0], ref[:, :prefill], rtol=TOL, atol=TOL, err_msg=profile)
        for step, out in enumerate(logits[1:]):
            np.testing.assert_allclose(out[:, 0], ref[:, prefill + step], rtol=TOL, atol=TOL, err_msg=profile)
    return ops


def test_mixture_of_experts():
    """Router, top-k, renormalised or not, shared expert with its sigmoid gate; the genai profile runs
    com.microsoft.MoE where its CPU kernel computes the activation (swiglu, gelu_tanh) and the dense form
    otherwise (geglu)."""
    m = _model(MOE, "moe")
    ops = _check_decoder(m)
    assert "MoE" in ops["genai"] and "MoE" not in ops["portable"]
    em = emit(m, cache=True, profile="genai")
    assert em.notes == ["layer 2: dense mixture of experts (activation geglu: com.microsoft.MoE's CPU kernel does "
                        "not compute it)"]
    nodes = em.to_proto().graph.node
    assert [onnx.helper.get_attribute_value(a) for n in nodes if n.op_type == "MoE" for a in n.attribute
            if a.name == "activation_type"] == [b"swiglu", b"gelu"]
    assert sum(n.op_type == "TopK" for n in nodes) == 1  # layer 2 (geglu): the dense form
    assert sum(n.op_type == "TopK" for n in emit(m).to_proto().graph.node) == 3


def test_mixture_of_experts_in_float16():
    m = _model(MOE, "moe")
    ids = np.random.default_rng(1).integers(0, 96, (2, 7))
    ref = _pytorch(m, ids)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)} | _past(mptc.spec_of(m), 2, np.float16) | {
        "position_ids": np.tile(np.arange(7), (2, 1))}
    for profile in ("portable", "genai"):
        sess = session(emit(m, cache=True, profile=profile, dtype="float16").to_proto())
        got = sess.run(None, {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}})[0]
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=0, atol=5e-3 * np.abs(ref).max())


@pytest.mark.parametrize("head", ["tokens", pytest.param("span", marks=pytest.mark.slow)])  # span: also traced
def test_per_position_heads_match_the_traced_export(head, tmp_path, monkeypatch):
    """`pool = none` and `head span`: (B, T, C) logits with the traced export's names and dynamic axes."""
    m = _model(ENCODER.replace("HEAD", HEADS[head]), "enc")
    spec = mptc.spec_of(m)
    assert unsupported(spec, cache=False) == []
    proto = emit(m).to_proto()
    onnx.checker.check_model(proto, full_check=True)

    def axes(vs) -> list[tuple[str, list]]:  # names, and per axis: symbolic (True) or its size
        return [(v.name, [bool(d.dim_param) or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vs]

    assert axes(proto.graph.input) == [("input_ids", [True, True]), ("attention_mask", [True, True])]
    assert axes(proto.graph.output) == [("logits", [True, True, spec.head.classes])]
    ref_file = traced(m, tmp_path / "t.onnx", monkeypatch) if head == "span" else None  # (seconds: one of them)
    if ref_file is not None:
        assert axes(ref_file.graph.input) == axes(proto.graph.input)
        assert axes(ref_file.graph.output) == axes(proto.graph.output)
    x = mptc.example_inputs(spec, batch=3, seq=9, seed=1, padded=True)
    feed = {k: v.numpy() for k, v in x.items()}
    with torch.no_grad():
        ref = m(**x).numpy()
    got = session(proto).run(None, feed)[0]
    assert got.shape == ref.shape == (3, 9, spec.head.classes)
    real = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], ref[real], rtol=TOL, atol=TOL)
    if ref_file is not None:
        np.testing.assert_allclose(got[real], session(ref_file).run(None, feed)[0][real], rtol=TOL, atol=TOL)


# --- rope scalings that follow the length ---
ROPE = """model r {
  vocab = 96
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0, scaling = SCALING) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 2, kv_heads = 1, head_dim = 16, bias = false }
    mlp { hidden = 48, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}"""
SCALINGS = {
    "dynamic": "dynamic(factor = 4.0, original = 8)",
    "longrope": "longrope(factor = 4.0, original = 8, short = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5], "
                "long = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0], attention = 1.2)",
}


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("length,prefill", [(7, 4), (20, 16)])  # below the original context (8), and past it
def test_rope_scalings_that_follow_the_length(kind, length, prefill):
    """Frequencies from the total length in the graph: equal to PyTorch below and above the original context,
    without a cache and, where the decode does not cross it, with one in both profiles (longrope: GenAI's two
    caches under an If)."""
    m = _model(ROPE.replace("SCALING", SCALINGS[kind]), "r")
    profiles = ("portable", "genai") if kind == "longrope" or length <= 8 else ()
    ops = _check_decoder(m, length=length, prefill=prefill, profiles=profiles)
    if "genai" in ops:
        assert "GroupQueryAttention" in ops["genai"]


@torch.no_grad()
def test_dynamic_rope_cache_past_the_original_context_decodes_as_transformers(tmp_path):
    """Past the original context a cached decode keeps each key as rotated when it was written (the full
    recomputation re-rotates them all): the emitted cache, in both profiles, gives transformers' cached logits."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=8,
                        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    _perturb(hf.parameters(), 0, std=0.2)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "m")
    m = mptc.load_model(tmp_path / "m").eval()
    spec = mptc.spec_of(m)
    assert spec.embed.positions.scaling == mptc.spec.RopeScaling("dynamic", 4.0, 8)
    n, prefill = 16, 6
    ids = np.random.default_rng(4).integers(0, 96, (1, n))
    out = hf(input_ids=torch.from_numpy(ids[:, :prefill]), use_cache=True)
    want, past = [out.logits.numpy()], out.past_key_values
    for t in range(prefill, n):  # transformers' cached decode, one token a step
        out = hf(input_ids=torch.from_numpy(ids[:, t:t + 1]), cache=past, use_cache=True)
        want.append(out.logits.numpy())
        past = out.past_key_values
    full = _pytorch(m, ids)  # (1, n, V): every key rotated at length n
    assert np.abs(full[0, -1] - want[-1][0, 0]).max() > 1e-2  # the two rules differ past the context
    for profile in ("portable", "genai"):
        sess = session(emit(m, cache=True, profile=profile, max_length=32).to_proto())
        got, _ = _decode(sess, spec, ids, np.ones_like(ids), np.arange(n)[None], prefill)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL, err_msg=profile)


# --- nested (MatFormer) models ---
NESTED_POST = """model nested_post {
  vocab = 96
  context = 32
  width = 32
  embed { positions = learned, norm = layernorm(eps = 1e-5) }
  layers 3 {
    norm = layernorm(eps = 1e-5)
    placement = post
    skippable = [false, true, false]
    attention { heads = 4, kv_heads = 4, head_dim = 8, nested = [1/2, 1] }
    mlp { hidden = 64, activation = gelu, nested = [1/4, 1/2, 1] }
  }
  head lm { tied = true }
  tasks { fast = subnet(mix = "1/4,1/4,1/2", heads = "1/2", skip = [1]) }
}"""


@pytest.mark.parametrize("choice", [None, {"mlp": "s", "heads": "l"}, {"mix": "s,m,l,xl", "skip": [1, 2]}])
def test_nested_model_emits_the_sub_network_it_runs(choice):
    """The full model (what the traced export writes by default), or the sub-network a `granularity` block
    runs: prefixes of the nested weights, skipped layers silent (their keys still cached, as in PyTorch)."""
    from mptc.nested import granularity

    m = perturbed(mptc.load("tests/specs/nested-lm.mpt"), seed=0)
    spec = mptc.spec_of(m)
    assert unsupported(spec, cache=True, profile="genai") == []
    if choice is None:
        _check_decoder(m)
        return
    with granularity(m, **choice):
        _check_decoder(m)
        em = emit(m, cache=True)
    got = [(ly.kv_heads, ly.head_dim) for ly in em.layers]
    heads = 1 if "heads" in choice else 2
    assert got == [(heads, 8)] * 4  # every layer keeps its cache, skipped or not


@pytest.mark.parametrize("placement", ["post", "output"])
def test_nested_post_norm_model_and_its_task(placement):
    """A skipped post-norm layer still normalises (n(n(x)), as PyTorch), a skipped output-norm layer passes x
    (its keys still cached); a spec's `tasks` leave the full model as it is."""
    from mptc.nested import granularity

    m = perturbed(parse(NESTED_POST.replace("placement = post", f"placement = {placement}"), "nested_post"), seed=1)
    spec = mptc.spec_of(m)
    assert spec.tasks and unsupported(spec, cache=True) == []
    _check_decoder(m)
    with granularity(m, task="fast"):
        _check_decoder(m)


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_imported_moe_families_decode_in_both_profiles(family):
    """Mixtral (renormalised top-2) and Qwen2-MoE (raw gates, a gated shared expert, a dense layer) as
    imported from transformers: the cached graphs of both profiles against the transformers model itself."""
    from mptc.hf import from_hf

    from .test_hf import _hf
    from .test_hf_families import FAMILIES

    cls, config, _ = FAMILIES[family]
    hf = _hf(cls, config)
    _perturb(hf.parameters(), 1, std=0.05)
    m = from_hf(hf).eval()
    ops = _check_decoder(m, max_length=32)
    assert "MoE" in ops["genai"]
    ids = np.random.default_rng(0).integers(0, 96, (2, 9))
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = session(emit(m).to_proto()).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", ["moe", "longrope"])
def test_genai_runtime_generates_with_moe_and_longrope(name, tmp_path):
    """ONNX Runtime GenAI runs the deployed graph (com.microsoft.MoE; GroupQueryAttention with longrope's
    If over two caches) and generates PyTorch's greedy tokens (the prompt is past longrope's original context,
    so each step equals the full recomputation)."""
    text = MOE if name == "moe" else ROPE.replace("SCALING", SCALINGS["longrope"])
    m = _model(text, name)
    done = deploy(m, tmp_path / "d", runtime="genai")
    assert done.share_buffer
    ids = np.random.default_rng(5).integers(1, 96, (1, 9))
    got = generate(done.path, ids, 12).new_ids[0]
    full = ids
    for _ in range(12):
        full = np.concatenate([full, _pytorch(m, full)[:, -1].argmax(-1)[:, None]], 1)
    assert got == full[0, 9:].tolist()
