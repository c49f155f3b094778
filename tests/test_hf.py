"""Hugging Face interop: import parity for every family and checkpoint format, export round trips through
`AutoModelForCausalLM.from_pretrained`, ONNX of imported models, export of grown models, and refusals.

Every transformers model is built from a config here with random weights (nothing is downloaded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import mptc
from mptc import passes as P
from mptc.cli import main as cli
from mptc.hf import export_hf, from_hf, import_hf, to_hf

V = 96  # vocab
TOL = 1e-4
NO_TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

CAUSAL = {  # name → (config, expected spec facts)
    "gpt2": (T.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=3, n_head=4, n_inner=48, **NO_TOKENS),
             {"layers": 3, "positions": "learned", "activation": "gelu_tanh", "hidden": 48, "tied": True}),
    "gpt2-untied-gelu": (T.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                      activation_function="gelu", tie_word_embeddings=False, **NO_TOKENS),
                         {"activation": "gelu", "tied": False}),
    "llama-gqa": (T.LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_theta=5000.0,
                                attention_bias=True, mlp_bias=True, **NO_TOKENS),
                  {"layers": 3, "heads": 8, "kv_heads": 2, "head_dim": 16, "bias": True, "out_bias": True,
                   "theta": 5000.0, "tied": False, "activation": "swiglu"}),
    "llama-tied-geglu": (T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, hidden_act="gelu", tie_word_embeddings=True, **NO_TOKENS),
                         {"activation": "geglu", "tied": True, "bias": False}),
    "mistral-window": (T.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, sliding_window=4, **NO_TOKENS),
                       {"window": [4, 4], "kv_heads": 1}),
    "qwen2-bias-window": (T.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                        sliding_window=3, max_window_layers=1, tie_word_embeddings=True, **NO_TOKENS),
                          {"window": [None, 3, 3], "bias": True, "out_bias": False, "tied": True}),
}
BERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
            max_position_embeddings=32, **NO_TOKENS)  # dropout left at BERT's 0.1: eval mode must switch it off
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16,
           patch_size=4, num_labels=5, qkv_bias=True)


def _hf(cls, config, seed: int = 0):
    """A transformers model in eval mode, every tensor perturbed: its init zeroes biases and sets norm gains to 1,
    which would hide a bias or norm that the import drops or misplaces."""
    model = cls.from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)


def _facts(spec: mptc.Spec) -> dict:
    a, m = spec.layers[0].attention, spec.layers[0].mlp
    return {"layers": spec.n_layers, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
            "bias": a.bias, "out_bias": a.out_bias, "window": [ly.attention.window for ly in spec.layers],
            "positions": spec.embed.positions.kind, "theta": spec.embed.positions.theta, "activation": m.activation,
            "hidden": m.hidden, "tied": spec.head.tied}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bert_inputs(ids) -> dict[str, torch.Tensor]:
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in row 1
    types = (torch.arange(12) >= 5).long().expand(2, 12).contiguous()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# --- import parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CAUSAL))
def test_import_causal_lm(name, ids, tmp_path):
    config, facts = CAUSAL[name]
    hf = _hf(T.AutoModelForCausalLM, config)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "m")
    model = mptc.load_model(tmp_path / "m").eval()
    spec = mptc.spec_of(model)
    assert {k: _facts(spec)[k] for k in facts} == facts
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding: real tokens must not see it
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        _close(model(input_ids=ids), ref)
        _close(from_hf(hf)(input_ids=ids), ref)  # from the object: its config and state_dict
        _close(from_hf(tmp_path / "hf")(input_ids=ids), ref)
        valid = mask.bool()
        _close(model(input_ids=ids, attention_mask=mask)[valid], hf(input_ids=ids, attention_mask=mask).logits[valid])


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_checkpoint_formats(fmt, ids, tmp_path):
    """Sharded safetensors (an index and several files) and a pickled pytorch_model.bin."""
    name = "llama-gqa" if fmt == "sharded" else "gpt2"
    hf = _hf(T.AutoModelForCausalLM, CAUSAL[name][0])
    d = tmp_path / "hf"
    if fmt == "sharded":
        hf.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    else:  # transformers 5 writes safetensors only; a .bin is the state dict pickled, tied lm_head included
        hf.config.save_pretrained(d)
        torch.save(hf.state_dict(), d / "pytorch_model.bin")
    import_hf(d, tmp_path / "m")
    with torch.no_grad():
        _close(mptc.load_model(tmp_path / "m").eval()(input_ids=ids), hf(input_ids=ids).logits)


def test_import_needs_no_transformers(tmp_path, monkeypatch):
    _hf(T.AutoModelForCausalLM, CAUSAL["llama-tied-geglu"][0]).save_pretrained(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    import_hf(tmp_path / "hf", tmp_path / "m")
    assert (tmp_path / "m" / "model.mpt").is_file() and (tmp_path / "m" / "weights.safetensors").is_file()


@pytest.mark.parametrize("cls, head", [(T.AutoModelForMaskedLM, "lm"), (T.AutoModelForSequenceClassification,
                                                                      "classify"), (T.AutoModel, "none")])
def test_import_bert(cls, head, bert_inputs, tmp_path):
    hf = _hf(cls, T.BertConfig(**BERT, num_labels=3))
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "m")
    model = mptc.load_model(tmp_path / "m").eval()
    spec = mptc.spec_of(model)
    assert (spec.head.kind, spec.embed.segments, spec.layers[0].placement) == (head, 2, "post")
    with torch.no_grad():
        out, hf_out = model(**bert_inputs), hf(**bert_inputs)
    if head == "classify":
        assert spec.head.pooler and spec.head.classes == 3
        _close(out, hf_out.logits)
    else:  # per token: compare real tokens only (outputs at padding are meaningless)
        valid = bert_inputs["attention_mask"].bool()
        ref = hf_out.logits if head == "lm" else hf_out.last_hidden_state
        _close(out[valid], ref[valid])


@pytest.mark.parametrize("cls", [T.AutoModelForImageClassification, T.AutoModel])
def test_import_vit(cls, tmp_path):
    hf = _hf(cls, T.ViTConfig(**VIT))
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "m")
    model = mptc.load_model(tmp_path / "m").eval()
    assert mptc.spec_of(model).seq_len == 17  # 16 patches + the class token
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = hf(pixel_values=px)
        ref = r.logits if cls is T.AutoModelForImageClassification else r.last_hidden_state
        _close(model(pixel_values=px), ref)
        _close(from_hf(hf)(pixel_values=px), ref)  # in memory, transformers 5 spells ViT's modules differently


# --- ONNX ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_imported_model_to_onnx(family, ids, bert_inputs, tmp_path):
    if family == "llama":
        hf = _hf(T.AutoModelForCausalLM, CAUSAL["llama-gqa"][0])
        inputs, valid = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None
    else:
        hf = _hf(T.AutoModelForMaskedLM, T.BertConfig(**BERT))
        inputs, valid = bert_inputs, bert_inputs["attention_mask"].bool()
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "m")
    mptc.export_onnx(mptc.load_model(tmp_path / "m"), tmp_path / "m.onnx")
    out = torch.from_numpy(mptc.run_onnx(tmp_path / "m.onnx", inputs))
    with torch.no_grad():
        ref = hf(**inputs).logits
    _close(out if valid is None else out[valid], ref if valid is None else ref[valid])


# --- export -----------------------------------------------------------------------------------------------


def _reload(d: Path, ids: torch.Tensor) -> torch.Tensor:
    back = T.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        return back(input_ids=ids).logits


@pytest.mark.parametrize("name", ["gpt2", "gpt2-untied-gelu", "llama-gqa", "llama-tied-geglu"])
def test_export_round_trip(name, ids, tmp_path):
    hf = _hf(T.AutoModelForCausalLM, CAUSAL[name][0])
    hf.save_pretrained(tmp_path / "hf")
    assert cli(["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "m")]) == 0
    assert cli(["export-hf", str(tmp_path / "m"), "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == name.split("-")[0]
    with torch.no_grad():
        _close(_reload(tmp_path / "out", ids), hf(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_grown_model_exports(name, ids, tmp_path):
    hf = _hf(T.AutoModelForCausalLM, CAUSAL[name][0])
    model = from_hf(hf)
    # check=False skips the pipeline's own probe verification (seconds); this test checks the logits itself
    grown, _ = P.Pipeline([P.grow_mlp(factor=2.0), P.add_layers(n=1)], check=False)(model)
    spec = mptc.spec_of(grown)
    assert spec.n_layers == CAUSAL[name][0].num_hidden_layers + 1
    export_hf(grown, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("n_inner", cfg.get("intermediate_size")) == spec.layers[0].mlp.hidden
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        _close(grown.eval()(input_ids=ids), ref)  # growth preserves the function …
        _close(_reload(tmp_path / "out", ids), ref)  # … and the export holds it


# --- refusals ---------------------------------------------------------------------------------------------


def _write_hf(d: Path, config: dict) -> Path:
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


LLAMA_JSON = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": 32,
              "intermediate_size": 40, "num_hidden_layers": 1, "num_attention_heads": 4}


@pytest.mark.parametrize("config, words", [
    ({"model_type": "t5", "d_model": 32}, ["unsupported model_type 't5'", "llama"]),
    (LLAMA_JSON | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope_scaling", "'linear'"]),
    (LLAMA_JSON | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, ["rope_scaling", "'llama3'"]),
    (LLAMA_JSON | {"hidden_act": "gelu_pytorch_tanh"}, ["hidden_act", "gelu_pytorch_tanh"]),
    (LLAMA_JSON | {"architectures": ["LlamaForSequenceClassification"]}, ["LlamaForSequenceClassification"]),
    (LLAMA_JSON, ["no weights file", "model.safetensors"]),
    ({"model_type": "bert", "position_embedding_type": "relative_key"}, ["position_embedding_type"]),
])
def test_import_refusals(config, words, tmp_path):
    d = _write_hf(tmp_path / "hf", config)
    with pytest.raises(mptc.MptcError) as e:
        import_hf(d, tmp_path / "m")
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "m").exists()


def _llama(attn: str = "", hidden: int | str = 64, head_norm: str = "rmsnorm(eps = 1e-6)", heads: int = 4) -> str:
    """A Llama-shaped spec (width 32, 4 layers) with one thing changed."""
    return f"""
model m {{
  vocab = 96
  context = 64
  width = 32
  embed {{ positions = rope }}
  layers 4 {{
    norm = rmsnorm(eps = 1e-6)
    attention {{ heads = {heads}, kv_heads = 2, head_dim = 8, bias = false{attn} }}
    mlp {{ hidden = {hidden}, activation = swiglu, bias = false }}
  }}
  head lm {{ norm = {head_norm} }}
}}
"""


@pytest.mark.parametrize("text, family, words", [
    (_llama(hidden="[64, 64, 64, 128]"), None,
     ["Llama's config has one `intermediate_size`; layer 3 has 128, layer 0 has 64"]),
    (_llama(", rotary_dim = 4"), "llama", ["rotary_dim 4", "`head_dim`"]),
    (_llama(", value_dim = 16"), None, ["value_dim 16"]),
    (_llama(", out_bias = true"), None, ["`attention_bias`", "out_bias = true"]),
    (_llama(", window = 8"), None, ["sliding window", "window = 8"]),
    (_llama(heads=6), None, ["`hidden_size` divisible by `num_attention_heads`"]),
    (_llama(head_norm="layernorm"), None, ["RMSNorm", "layernorm"]),
    (_llama(head_norm="rmsnorm(eps = 1e-5)"), None, ["`rms_norm_eps`; the head has eps 1e-05, layer 0 has eps 1e-06"]),
    (_llama(), "gpt2", ["cannot export as GPT-2", "learned positions"]),
    (_llama(), "bert", ["family 'bert'"]),
    ((Path(__file__).parent / "specs" / "tiny-bert.mpt").read_text(), None, ["classify head"]),
])
def test_export_refusals(text, family, words, tmp_path):
    model = mptc.build(mptc.parse(text), seed=0)
    with pytest.raises(mptc.MptcError) as e:
        to_hf(model, tmp_path / "out", family=family)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_refuses_per_layer_growth(tmp_path):
    """Growing one layer's MLP gives per-layer widths, which GPT-2's one `n_inner` cannot hold."""
    model = from_hf(_hf(T.AutoModelForCausalLM, CAUSAL["gpt2"][0]))
    grown, _ = P.Pipeline([P.grow_mlp(hidden=96, layers=[1])], check=False)(model)
    with pytest.raises(mptc.MptcError, match=r"GPT-2's config has one `n_inner`; layer 1 has 96, layer 0 has 48"):
        export_hf(grown, tmp_path / "out")
