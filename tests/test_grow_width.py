"""Width growth: channel duplication (exact for LayerNorm and RMSNorm, pre- and post-norm, tied heads),
zero padding (RMSNorm), wider `head none` outputs, and the cases refused before anything is built."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import mptc
from mptc import passes as P
from mptc.export import run_onnx

from .conftest import perturbed, tiny
from .test_mpt import FEATURES, variant

GPT2_LIKE = """
model m {{
  vocab = 300
  context = 32
  width = 32
  embed {{ positions = {positions}, norm = {embed_norm} }}
  layers 2 {{
    norm = {norm}
    attention {{ heads = 4, mask = causal }}
    mlp {{ hidden = 48, activation = gelu }}
  }}
  head {head}
}}
"""


def spec(positions="learned", embed_norm="none", norm="layernorm(eps = 1e-5)",
         head="lm { norm = layernorm(eps = 1e-5), tied = true }") -> mptc.Spec:
    return mptc.parse(GPT2_LIKE.format(positions=positions, embed_norm=embed_norm, norm=norm, head=head))


def f64_error(old, new, seed: int = 5, comparable=None) -> float:
    """Max abs difference of the two models' float64 outputs on a padded batch (independent of the pipeline)."""
    x = mptc.example_inputs(mptc.spec_of(old), batch=3, seq=9, seed=seed, padded=True)
    x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    with torch.no_grad():
        a, b = copy.deepcopy(old).double()(**x), copy.deepcopy(new).double()(**x)
    if comparable is not None:
        a, b = comparable(a, b)
    return float((a - b).abs().max())


def no_probes(monkeypatch):
    """Make any behaviour check fail loudly: a refusal must come before it."""
    def boom(*a, **k):
        raise AssertionError("a probe check ran")
    monkeypatch.setattr(P.pipeline, "probes", boom)


@pytest.mark.parametrize("name, k", [("gpt2", 2), ("gpt2", 3), ("bert", 2), ("bert", 3), ("vit", 2), ("vit", 3),
                                     ("llama", 2)])
def test_copying_channels_keeps_the_function(name, k):
    model = tiny(name).double()  # float64 weights: 1/3 is not rounded to float32 before the independent check
    new, report = P.Pipeline([P.grow_width(factor=k)])(model)
    r = report.passes[0]
    assert mptc.spec_of(new).width == k * mptc.spec_of(model).width
    assert r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5
    assert f64_error(model, new) <= 1e-9
    claims = {t["tensor"]: t["claims"] for t in r.tensors}
    q = claims["layers.0.attn.q.weight"]  # a reader: copied columns, each divided by k
    assert f"axis 1: {(k - 1) * 64} copies" in q and f"old entries scaled ×{1 / k:.9g}" in q
    assert claims["layers.0.mlp.down.weight"] == [f"axis 0: {(k - 1) * 64} copies"]  # a writer: copies only


def test_tied_head_scales_the_final_norm():
    model = tiny("gpt2")
    new, report = P.Pipeline([P.grow_width(factor=2)])(model)
    claims = {t["tensor"]: t["claims"] for t in report.passes[0].tensors}
    assert all("old entries scaled ×0.5" in claims[f"head.norm.{k}"] for k in ("weight", "bias"))
    assert claims["embed.tokens.weight"] == ["axis 1: 64 copies"]  # the table is not scaled: it is also the input
    assert torch.equal(new.get_parameter("embed.tokens.weight")[:, 64:], model.get_parameter("embed.tokens.weight"))


def test_bert_mlm_transform_norm_under_a_tied_head():
    """An lm transform with a LayerNorm (BERT's MLM head), tied, post-norm: the transform norm takes the 1/k."""
    s = spec(embed_norm="layernorm(eps = 1e-12)", norm="layernorm(eps = 1e-12)",
             head="lm { tied = true, bias = true, transform = dense(activation = gelu, "
                  "norm = layernorm(eps = 1e-12)) }")
    s = s.replace(layers=tuple(replace(ly, placement="post") for ly in s.layers))
    model = perturbed(s).double()
    new, report = P.Pipeline([P.grow_width(factor=3)])(model)
    assert report.passes[0].max_abs_error_float64 <= 1e-9
    assert f64_error(model, new) <= 1e-9
    claims = {t["tensor"]: t["claims"] for t in report.passes[0].tensors}
    assert f"old entries scaled ×{1 / 3:.9g}" in claims["head.transform_norm.weight"]


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_copied_models_match_in_onnx_runtime(name, tmp_path):
    model = tiny(name)
    new, _ = P.Pipeline([P.grow_width(factor=3)])(model)
    mptc.export_onnx(new, tmp_path / "m.onnx")
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=7, seed=3, padded=True)
    got = torch.as_tensor(run_onnx(tmp_path / "m.onnx", x))
    with torch.no_grad():
        ref = model(**x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


def test_grown_gpt2_reloads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny("gpt2")
    # GPT-2's config has head size n_embd / n_head, so the wider model also gets twice the heads
    new, _ = P.Pipeline([P.grow_width(factor=2), P.add_heads(n=4)])(model)
    mptc.to_hf(new, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.n_embd == 128 and hf.config.n_head == 8
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids), rtol=1e-4, atol=1e-4)


def test_width_multiple_on_layernorm_means_factor():
    model = tiny("gpt2")
    a, _ = P.Pipeline([P.grow_width(width=192)], check=False)(model)
    b, _ = P.Pipeline([P.grow_width(factor=3)], check=False)(model)
    assert mptc.spec_of(a) == mptc.spec_of(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_zero_padding_still_grows_rmsnorm_models():
    model = tiny("llama").double()  # float64 weights: the √(D/D') gain scale is not rounded to float32
    new, report = P.Pipeline([P.grow_width(width=80)])(model)
    assert mptc.spec_of(new).width == 80 and report.passes[0].max_abs_error_float64 <= 1e-9
    assert f64_error(model, new) <= 1e-9


@pytest.mark.parametrize("how", [{"factor": 2}, {"width": 48}])
def test_head_none_compares_the_kept_channels(how):
    s = spec(norm="rmsnorm(eps = 1e-6)", head="none { norm = rmsnorm(eps = 1e-6) }")
    model = perturbed(s).double()
    p = P.grow_width(**how)
    new, report = P.Pipeline([p])(model)
    r = report.passes[0]
    assert r.max_abs_error_float64 <= 1e-9 and r.max_abs_error_float32 <= 1e-5
    assert f64_error(model, new, comparable=p.comparable) <= 1e-9
    x = mptc.example_inputs(s, batch=2, seq=5, seed=1)
    with torch.no_grad():
        a, b = model(**x), new(**x)
    assert b.shape[-1] == (64 if "factor" in how else 48)
    torch.testing.assert_close(b[..., :32], a, rtol=1e-5, atol=1e-5)
    if "factor" in how:
        torch.testing.assert_close(b[..., 32:], a, rtol=1e-5, atol=1e-5)  # the copy
        assert r.notes == ["head none: the output widens from 32 to 64 channels; the check compared each of its 2 "
                           "copies with the old output"]
    else:
        assert float(b[..., 32:].abs().max()) == 0.0
        assert "compared the first 32" in r.notes[0]


def test_zero_padding_rescales_an_rmsnorm_transform():
    s = spec(norm="rmsnorm(eps = 1e-6)", head="lm { norm = rmsnorm(eps = 1e-6), tied = false, "
             "transform = dense(activation = gelu, norm = rmsnorm(eps = 0.01)) }")
    model = perturbed(s).double()
    new, report = P.Pipeline([P.grow_width(width=48)])(model)
    assert mptc.spec_of(new).head.transform.norm.eps == pytest.approx(0.01 * 32 / 48)
    assert report.passes[0].max_abs_error_float64 <= 1e-9 and f64_error(model, new) <= 1e-9


@pytest.mark.parametrize("s, p, words", [
    (spec(positions="sinusoidal"), P.grow_width(factor=2), "not exact with sinusoidal positions"),
    (spec(positions="sinusoidal", norm="rmsnorm(eps = 1e-6)", head="lm { norm = rmsnorm(eps = 1e-6) }"),
     P.grow_width(width=48), "not exact with sinusoidal positions"),
    (spec(), P.grow_width(width=48), "not exact for LayerNorm"),
    (spec(norm="rmsnorm(eps = 1e-6)", head="lm { norm = rmsnorm(eps = 1e-6), transform = dense(activation = gelu, "
          "norm = layernorm(eps = 1e-5)) }"), P.grow_width(width=48), "not exact for LayerNorm"),
    (spec(head="lm { norm = none, tied = true }"), P.grow_width(factor=2), "tied head without a norm"),
    (spec(head="lm { norm = layernorm(eps = 1e-5), tied = true, transform = dense(activation = gelu, norm = none) }"),
     P.grow_width(factor=2), "the transform has none"),
    (spec(), P.grow_width(factor=1.5), "must be a whole number"),
    (spec(), P.grow_width(), "exactly one of"),
    (spec(), P.grow_width(width=64, factor=2), "exactly one of"),
])
def test_refused_before_any_check(s, p, words, monkeypatch):
    model = mptc.build(s, seed=0).eval()
    no_probes(monkeypatch)
    with pytest.raises(P.PassRefused, match=words):
        P.Pipeline([p])(model)
    with pytest.raises(P.PassError, match=words):
        p.requires(model)


@pytest.mark.parametrize("feature", FEATURES)
def test_copying_reaches_every_multi_parameter_feature(feature):
    """Token types, modulation, FiLM, expert embeddings, hypernetworks, image + text: each exact under copying."""
    model = perturbed(variant(*FEATURES[feature])).double()
    new, report = P.Pipeline([P.grow_width(factor=2)])(model)
    assert report.passes[0].max_abs_error_float64 <= 1e-9 and report.passes[0].max_abs_error_float32 <= 1e-5
    assert f64_error(model, new) <= 1e-9
