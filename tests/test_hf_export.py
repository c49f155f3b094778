"""Hugging Face export of every family whose config can hold the model: import → export → `from_pretrained` gives
the same outputs; grown models (real passes) export; what a config cannot hold is refused naming its field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import mptc
from mptc import cli as cli_module
from mptc import passes as P
from mptc.cli import main as cli
from mptc.hf import EXPORTS, from_hf, import_hf, special_tokens, to_hf

from .test_hf import BERT, CAUSAL, VIT, _hf
from .test_hf_families import _DEC, FAMILIES, ROPE, _batch, _compare, _output

ROUND_TRIP = {  # name → (auto class, config): one or more per exportable family
    **{n: (T.AutoModelForCausalLM, CAUSAL[n][0]) for n in ("mistral-window", "qwen2-bias-window")},
    **{n: FAMILIES[n][:2] for n in ("qwen3", "qwen3-window-tied", "phi3", "mixtral", "qwen2-moe", "gemma", "gemma2",
                                    "gemma3", "roberta-mlm", "roberta-classify", "xlm-roberta-untied", "distilbert-mlm",
                                    "distilbert-base", "llama-classify", "llama-qa", "qwen3-token", "qwen2-qa",
                                    "mixtral-qa", "gemma3-classify", "bert-token", "bert-qa", "xlm-roberta-token",
                                    "distilbert-qa")},
    **{f"{fam}-{kind}": (T.AutoModelForCausalLM, config(**(_DEC | {"num_hidden_layers": 1}), max_position_embeddings=16,
                                                        rope_parameters=ROPE[kind] | {"rope_theta": 100.0}))
       for fam, kind, config in (("llama", "llama3", T.LlamaConfig), ("qwen2", "yarn-mscale", T.Qwen2Config),
                                 ("mistral", "dynamic", T.MistralConfig), ("qwen3", "linear", T.Qwen3Config))},
    "bert-mlm": (T.AutoModelForMaskedLM, T.BertConfig(**BERT)),
    "bert-mlm-untied": (T.AutoModelForMaskedLM, T.BertConfig(**BERT, tie_word_embeddings=False)),
    "bert-classify": (T.AutoModelForSequenceClassification, T.BertConfig(**BERT, num_labels=3)),
    "vit-classify": (T.AutoModelForImageClassification, T.ViTConfig(**VIT)),
}
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _inputs(config) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    if isinstance(config, T.ViTConfig):
        return {"pixel_values": PIXELS}, None
    rope = getattr(config, "rope_parameters", None) or {}
    return _batch(config, t=40 if rope.get("rope_type", "default") != "default" else 12)  # past the scaled context


def _reloaded(cls, d):
    """What transformers loads from an exported dir, with its load report: nothing missing, nothing unexpected."""
    model, info = cls.from_pretrained(d, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip(name, tmp_path):
    cls, config = ROUND_TRIP[name]
    hf = _hf(cls, config)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "m")
    to_hf(mptc.load_model(tmp_path / "m"), tmp_path / "out", tokens=special_tokens(tmp_path / "m"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == (config.model_type, [type(hf).__name__])
    inputs, valid = _inputs(config)
    with torch.no_grad():
        _compare(_output(_reloaded(cls, tmp_path / "out")(**inputs)), _output(hf(**inputs)), valid)


def test_cli_export_keeps_special_tokens(tmp_path):
    """export-hf of an import-hf dir writes the checkpoint's bos / eos / pad: a decoder's sequence classifier needs
    the pad id to find the last real token of a padded batch in transformers."""
    cls, config, _ = FAMILIES["llama-classify"]
    hf = _hf(cls, config)
    hf.save_pretrained(tmp_path / "hf")
    assert cli(["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "m")]) == 0
    assert cli(["export-hf", str(tmp_path / "m"), "-o", str(tmp_path / "out")]) == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["architectures"]) == \
        (0, 0, 0, ["LlamaForSequenceClassification"])
    inputs, valid = _batch(config)
    with torch.no_grad():
        _compare(_reloaded(cls, tmp_path / "out")(**inputs).logits, hf(**inputs).logits, valid)


def test_cli_round_trip_with_family(tmp_path, capsys):
    cls, config = ROUND_TRIP["qwen3"]
    hf = _hf(cls, config)
    hf.save_pretrained(tmp_path / "hf")
    assert cli(["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "m")]) == 0
    assert cli(["export-hf", str(tmp_path / "m"), "-o", str(tmp_path / "out"), "--family", "qwen3"]) == 0
    inputs, valid = _batch(config)
    with torch.no_grad():
        _compare(_reloaded(cls, tmp_path / "out")(**inputs).logits, hf(**inputs).logits, valid)
    capsys.readouterr()
    assert cli(["export-hf", str(tmp_path / "m"), "-o", str(tmp_path / "out2"), "--family", "mistral"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export as Mistral: ") and "Traceback" not in err


def _grown_exports(hf, grown, tmp_path, inputs, valid, cls=T.AutoModelForCausalLM) -> dict:
    to_hf(grown, tmp_path / "out")
    with torch.no_grad():
        ref = hf(**inputs).logits
        _compare(grown.eval()(**inputs), ref, valid)  # growth keeps the function …
        _compare(_reloaded(cls, tmp_path / "out")(**inputs).logits, ref, valid)  # … and the export holds it
    return json.loads((tmp_path / "out" / "config.json").read_text())


def test_grown_qwen3_exports(tmp_path):
    cls, config = ROUND_TRIP["qwen3"]
    hf = _hf(cls, config)
    grown, _ = P.Pipeline([P.grow_mlp(factor=2.0), P.add_kv_heads(n=2), P.add_layers(n=1)], check=False)(from_hf(hf))
    spec = mptc.spec_of(grown)
    assert (spec.n_layers, spec.layers[0].attention.kv_heads) == (3, 4)
    cfg = _grown_exports(hf, grown, tmp_path, *_batch(config))
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == \
        ("qwen3", 3, 4, 80)


def test_grown_mixtral_exports(tmp_path):
    cls, config = ROUND_TRIP["mixtral"]
    hf = _hf(cls, config)
    grown, _ = P.Pipeline([P.grow_mlp(factor=2.0), P.add_layers(n=1)], check=False)(from_hf(hf))
    cfg = _grown_exports(hf, grown, tmp_path, *_batch(config))
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_local_experts"]) == \
        ("mixtral", 3, 48, 3)


def test_upcycled_mistral_exports_as_mixtral(tmp_path):
    """A dense Mistral with every MLP upcycled to experts (same function) fits Mixtral's config."""
    hf = _hf(T.AutoModelForCausalLM, CAUSAL["mistral-window"][0])
    grown, _ = P.Pipeline([P.upcycle_moe(experts=4, top_k=2)], check=False)(from_hf(hf))
    cfg = _grown_exports(hf, grown, tmp_path, *_batch(CAUSAL["mistral-window"][0]),
                         cls=T.MixtralForCausalLM)
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["sliding_window"]) == \
        ("mixtral", 4, 2, 4)


# --- refusals ----------------------------------------------------------------------------------------------


def _decoder(layers: str = "", attn: str = "", mlp: str = "", n: int = 2, bias: str = "false") -> str:
    """A rope decoder spec (width 32, GQA) with fields added to its layers, attention and mlp blocks."""
    return f"""
model m {{
  vocab = 96
  context = 64
  width = 32
  embed {{ positions = rope }}
  layers {n} {{
    norm = rmsnorm(eps = 1e-6)
    {layers}
    attention {{ heads = 4, kv_heads = 2, head_dim = 8, bias = {bias}{attn} }}
    mlp {{ hidden = 24, activation = swiglu, bias = false{mlp} }}
  }}
  head lm {{ norm = rmsnorm(eps = 1e-6) }}
}}
"""


@pytest.mark.parametrize("text, family, words", [
    (_decoder(attn=", window = [4, 8]"), "mistral", ["Mistral's config has one `sliding_window`; layer 1 has window = "
                                                     "8, layer 0 has window = 4"]),
    (_decoder(attn=", window = [none, 8]"), "mistral", ["`sliding_window`", "layer 1 has window = 8, layer 0 has "
                                                        "window = none"]),
    (_decoder(attn=", qk_norm = rmsnorm(eps = 1e-5)"), "qwen3", ["Qwen3's q/k norms are RMSNorms with the layers' "
                                                                 "`rms_norm_eps`", "eps 1e-05"]),
    (_decoder(), "qwen3", ["Qwen3 has RMSNorms on q and k (`q_norm`, `k_norm`) in every layer; layer 0 has none"]),
    (_decoder(attn=", rotary_dim = [4, 6]"), "phi3", ["Phi-3's config has one `partial_rotary_factor`"]),
    (_decoder(bias="true"), "qwen2", ["Qwen2 has biases on q, k, v only", "out_bias = true"]),
    (_decoder(mlp=", experts = 4, top_k = 2, normalize = false"), "mixtral",
     ["Mixtral renormalises the top-k gates; layer 0 has normalize = false"]),
    (_decoder(mlp=", experts = [4, 2], top_k = 2"), "mixtral", ["`num_local_experts`; layer 1 has experts = 2"]),
    (_decoder(mlp=", experts = 4, top_k = 2"), "qwen2_moe", ["Qwen2-MoE has a shared expert with a sigmoid gate",
                                                            "shared = none"]),
    (_decoder(mlp=", experts = 4, top_k = 2"), "llama", ["Llama has no place for moe mlp (`layers.mlp.experts`)"]),
    (_decoder(attn=", qk_norm = rmsnorm(eps = 1e-6)"), "mistral", ["cannot export as Mistral: it has no weight for "
                                                                   "layers.0.attn.q_norm.weight"]),
    (_decoder(mlp=", experts = 4, top_k = 2", attn=", qk_norm = rmsnorm(eps = 1e-6)"), None,
     ["cannot export as Mixtral: it has no weight for layers.0.attn.q_norm.weight", "remove `qk_norm`"]),
])
def test_decoder_refusals(text, family, words, tmp_path):
    with pytest.raises(mptc.MptcError) as e:
        to_hf(mptc.build(mptc.parse(text), seed=0), tmp_path / "out", family=family)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists()


def test_per_layer_widths_refusal_points_at_deploy(tmp_path):
    """An extracted model with per-layer MLP widths: the refusal names the field and every layer that differs,
    and its hint points at `mptc deploy` and `mptc compile`, which hold per-layer shapes."""
    model = mptc.build(mptc.parse(_decoder(n=4)), seed=0)
    mixed, _ = P.Pipeline([P.extract(mix="1/2,1,1/4,1")])(model)
    with pytest.raises(mptc.MptcError) as e:
        to_hf(mixed, tmp_path / "out", family="llama")
    assert "Llama's config has one `intermediate_size`; layer 1 has 24, layer 0 has 12 (also layer 2: 6, " \
           "layer 3: 24)" in str(e.value)
    assert "`mptc deploy DIR -o OUT`" in e.value.hint and "`mptc compile DIR -o X.onnx`" in e.value.hint
    assert not (tmp_path / "out").exists()


def test_families_without_export_refused(tmp_path):
    """OLMo 2, GPT-NeoX and DeiT import only: no export family holds their norms, residual or tokens."""
    for name, words in (("olmo2", "output norms"), ("gpt-neox", "parallel residual"), ("deit-classify", "")):
        model = from_hf(_hf(*FAMILIES[name][:2]))
        with pytest.raises(mptc.MptcError, match="cannot export as") as e:
            to_hf(model, tmp_path / "out")
        assert words in str(e.value) + str(e.value.hint)
    with pytest.raises(mptc.MptcError, match="cannot export to family 'gpt_neox'") as e:
        to_hf(model, tmp_path / "out", family="gpt_neox")
    assert "gemma3_text" in e.value.hint and not (tmp_path / "out").exists()


def test_encoder_refusals(tmp_path):
    """A ViT without a classifier, a BERT with per-layer MLP sizes, a DistilBERT with another eps."""
    vit = from_hf(_hf(T.AutoModel, T.ViTConfig(**VIT)))
    with pytest.raises(mptc.MptcError, match="ViT export writes a sequence classifier; this model has a none head"):
        to_hf(vit, tmp_path / "out")
    bert = from_hf(_hf(T.AutoModelForMaskedLM, T.BertConfig(**BERT)))
    grown, _ = P.Pipeline([P.grow_mlp(hidden=64, layers=[1])], check=False)(bert)
    with pytest.raises(mptc.MptcError, match=r"BERT's config has one `intermediate_size`; layer 1 has 64, layer 0 "
                                             r"has 40"):
        to_hf(grown, tmp_path / "out")
    distil = mptc.parse(str(mptc.spec_of(from_hf(_hf(*FAMILIES["distilbert-mlm"][:2])))).replace("1e-12", "1e-05"))
    with pytest.raises(mptc.MptcError, match=r"DistilBERT's layernorms have eps 1e-12 \(fixed, no config field\)"):
        to_hf(mptc.build(distil, seed=0), tmp_path / "out", family="distilbert")
    assert not (tmp_path / "out").exists()


def test_cli_lists_every_export_family():
    assert cli_module.HF_EXPORT_FAMILIES == tuple(EXPORTS)
