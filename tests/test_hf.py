"""Hugging Face interop: import parity for every family and checkpoint format, export round trips through
`AutoModelForCausalLM.from_pretrained`, ONNX of imported models, export of grown models, and refusals.

Every transformers model is built from a config here with random weights (nothing is downloaded).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import mptc
from mptc import hf as hf_module
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
    (LLAMA_JSON | {"rope_scaling": {"rope_type": "proportional", "factor": 2.0}}, ["rope_scaling", "'proportional'"]),
    (LLAMA_JSON | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
     ["`rope_parameters` of rope_type 'llama3' has no `factor`", "factor, low_freq_factor, high_freq_factor"]),
    (LLAMA_JSON | {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, ["has no `short_factor`"]),
    (LLAMA_JSON | {"hidden_act": "quick_gelu"}, ["hidden_act", "quick_gelu"]),
    ({"model_type": "gpt2", "architectures": ["GPT2DoubleHeadsModel"]}, ["GPT2DoubleHeadsModel"]),
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
    (_llama(", window = 8"), "llama", ["sliding window", "window = 8"]),  # Mistral holds it (test_hf_export)
    (_llama(heads=6), None, ["`hidden_size` divisible by `num_attention_heads`"]),
    (_llama(head_norm="layernorm"), None, ["RMSNorm", "layernorm"]),
    (_llama(head_norm="rmsnorm(eps = 1e-5)"), None, ["`rms_norm_eps`; the head has eps 1e-05, layer 0 has eps 1e-06"]),
    (_llama(), "gpt2", ["cannot export as GPT-2", "learned positions"]),
    (_llama(), "t5", ["family 't5'"]),
    (_llama(), "bert", ["cannot export as BERT", "learned positions", "rope positions"]),
    ((Path(__file__).parent / "specs" / "tiny-bert.mpt").read_text(), None,
     ["cannot export as BERT", "token types (`type_vocab_size` ≥ 1); this model has segments = 0"]),
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


# --- BERT's MLM bias --------------------------------------------------------------------------------------


def test_untied_bert_mlm(bert_inputs, tmp_path):
    """transformers 5 writes both `cls.predictions.bias` (unused when untied) and `cls.predictions.decoder.bias`."""
    hf = _hf(T.AutoModelForMaskedLM, T.BertConfig(**BERT, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert not torch.equal(stored["cls.predictions.bias"], stored["cls.predictions.decoder.bias"])
    import_hf(tmp_path / "hf", tmp_path / "m")
    model = mptc.load_model(tmp_path / "m").eval()
    assert not mptc.spec_of(model).head.tied
    valid = bert_inputs["attention_mask"].bool()
    with torch.no_grad():
        _close(model(**bert_inputs)[valid], hf(**bert_inputs).logits[valid])


def test_untied_bert_mlm_one_bias_name(bert_inputs, tmp_path):
    """Older checkpoints store the decoder's bias once, as `cls.predictions.bias`: the checkpoint decides."""
    hf = _hf(T.AutoModelForMaskedLM, T.BertConfig(**BERT, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    stored = load_file(f)
    stored["cls.predictions.bias"] = stored.pop("cls.predictions.decoder.bias")
    save_file(stored, f, metadata={"format": "pt"})
    valid = bert_inputs["attention_mask"].bool()
    with torch.no_grad():
        _close(from_hf(tmp_path / "hf")(**bert_inputs)[valid], hf(**bert_inputs).logits[valid])


# --- every tensor used, every tensor found ----------------------------------------------------------------


def _gpt2_dir(d: Path, **config) -> Path:
    """A 2-layer GPT-2 checkpoint."""
    _hf(T.AutoModelForCausalLM, T.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                              **NO_TOKENS)).save_pretrained(d)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(cfg | config))
    return d


def _edit_weights(d: Path, edit) -> None:
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _refused(argv_or_dir, capsys, tmp_path, words: list[str]) -> None:
    """The import fails through the Python API and the CLI, naming `words`, and writes nothing."""
    d = Path(argv_or_dir)
    with pytest.raises(mptc.MptcError) as e:
        import_hf(d, tmp_path / "m")
    for w in words:
        assert w in str(e.value)
    capsys.readouterr()
    assert cli(["import-hf", str(d), "-o", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err
    assert not (tmp_path / "m").exists()


def test_unused_tensor_refused(tmp_path, capsys):
    d = _gpt2_dir(tmp_path / "hf")
    _edit_weights(d, lambda t: t.update({"transformer.h.0.attn.extra.weight": torch.ones(3)}))
    _refused(d, capsys, tmp_path, ["1 tensor of the checkpoint is not used", "transformer.h.0.attn.extra.weight"])


def test_missing_tensor_refused(tmp_path, capsys):
    d = _gpt2_dir(tmp_path / "hf")
    _edit_weights(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    _refused(d, capsys, tmp_path, ["1 tensor of the model is not in the checkpoint",
                                   "'transformer.h.1.mlp.c_fc.bias' (for layers.1.mlp.up.bias)"])


def test_config_with_fewer_layers_refused(tmp_path, capsys):
    """`n_layer: 1` for a 2-layer checkpoint used to import layer 0 alone, with exit 0."""
    d = _gpt2_dir(tmp_path / "hf", n_layer=1)
    _refused(d, capsys, tmp_path, ["12 tensors of the checkpoint are not used", "transformer.h.1.", "(+7 more)",
                                   "config.json says n_layer = 1, the checkpoint has layers 0..1"])


def test_config_with_more_layers_refused(tmp_path, capsys):
    d = _gpt2_dir(tmp_path / "hf", n_layer=3)
    _refused(d, capsys, tmp_path, ["12 tensors of the model are not in the checkpoint", "transformer.h.2.ln_1.weight",
                                   "config.json says n_layer = 3, the checkpoint has layers 0..1"])


def test_in_memory_model_checked_too():
    hf = _hf(T.AutoModelForCausalLM, CAUSAL["llama-gqa"][0])
    state = hf.state_dict() | {"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    hf.state_dict = lambda: state
    with pytest.raises(mptc.MptcError, match=r"not used: model\.layers\.0\.self_attn\.q_norm\.weight"):
        from_hf(hf)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_benign_extras_allowed(name, ids, tmp_path):
    """Buffers older transformers wrote into pytorch_model.bin (causal masks, rotary frequencies) are known extras."""
    config = CAUSAL[name][0]
    hf = _hf(T.AutoModelForCausalLM, config)
    hf.config.save_pretrained(tmp_path / "hf")
    n = config.num_hidden_layers
    if name == "gpt2":
        extra = {f"transformer.h.{i}.attn.{b}": torch.ones(1, 1, 32, 32) for i in range(n)
                 for b in ("bias", "masked_bias")}
    else:
        extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(n)}
    torch.save(hf.state_dict() | extra, tmp_path / "hf" / "pytorch_model.bin")
    with torch.no_grad():
        _close(from_hf(tmp_path / "hf")(input_ids=ids), hf(input_ids=ids).logits)


# --- shard paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_outside_checkpoint_refused(where, tmp_path, capsys):
    hf = _hf(T.AutoModelForCausalLM, CAUSAL["llama-gqa"][0])
    d = tmp_path / "hf"
    hf.save_pretrained(d, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    outside = tmp_path / "x.safetensors"
    (d / shard).rename(outside)  # a real shard, so only the path rule stops it
    index["weight_map"][key] = "../x.safetensors" if where == "parent" else str(outside)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(d, capsys, tmp_path, [f"weight_map['{key}']", "outside", index["weight_map"][key]])


def test_tensor_the_index_leaves_out_refused(tmp_path, capsys):
    hf = _hf(T.AutoModelForCausalLM, CAUSAL["llama-gqa"][0])
    d = tmp_path / "hf"
    hf.save_pretrained(d, max_shard_size="40KB")
    shard = sorted(d.glob("*.safetensors"))[0]
    tensors = load_file(shard) | {"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    save_file(tensors, shard, metadata={"format": "pt"})
    _refused(d, capsys, tmp_path, ["1 tensor of the checkpoint is not used: model.layers.0.self_attn.q_norm.weight"])


# --- --check ---------------------------------------------------------------------------------------------


CHECKED = {  # name → (class, config)
    **{n: (T.AutoModelForCausalLM, CAUSAL[n][0]) for n in ("gpt2", "llama-gqa", "mistral-window",
                                                           "qwen2-bias-window")},
    "bert-mlm": (T.AutoModelForMaskedLM, T.BertConfig(**BERT)),
    "bert-mlm-untied": (T.AutoModelForMaskedLM, T.BertConfig(**BERT, tie_word_embeddings=False)),
    "bert-classify": (T.AutoModelForSequenceClassification, T.BertConfig(**BERT, num_labels=3)),
    "bert-base": (T.AutoModel, T.BertConfig(**BERT)),
    "vit-classify": (T.AutoModelForImageClassification, T.ViTConfig(**VIT)),
    "vit-base": (T.AutoModel, T.ViTConfig(**VIT)),
}


@pytest.mark.parametrize("name", list(CHECKED))
def test_check_passes(name, tmp_path, capsys):
    cls, config = CHECKED[name]
    _hf(cls, config).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert cli(["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "m"), "--check"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"check: max error ([0-9.e+-]+) relative to max\(1, \|output\|\) \(tolerance 0\.0001\)", out)
    assert m and float(m.group(1)) <= TOL, out
    assert (tmp_path / "m" / "weights.safetensors").is_file()


def test_check_fails_on_a_wrong_tensor(tmp_path, capsys, monkeypatch):
    _hf(T.AutoModelForCausalLM, CAUSAL["llama-gqa"][0]).save_pretrained(tmp_path / "hf")
    fetch = hf_module._fetch

    def wrong(ck, fam, name, shape, *rows):  # one converted tensor off by 0.01
        t = fetch(ck, fam, name, shape, *rows)
        return t + 0.01 if name == "layers.1.mlp.up.weight" else t

    monkeypatch.setattr(hf_module, "_fetch", wrong)
    assert cli(["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "m"), "--check"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: check failed: the import differs from transformers' LlamaForCausalLM: max error "
                     r"[0-9.e+-]+ relative to max\(1, \|output\|\) > 0\.0001", err), err
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.*"))  # no temporary dir left either


def test_check_needs_transformers(tmp_path, capsys, monkeypatch):
    _hf(T.AutoModelForCausalLM, CAUSAL["gpt2"][0]).save_pretrained(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli(["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "m"), "--check"]) == 1
    assert 'pip install "mptc[hf]"' in capsys.readouterr().err
    with pytest.raises(mptc.MptcError, match=r'pip install "mptc\[hf\]"'):
        import_hf(tmp_path / "hf", tmp_path / "m", check=True)
    assert not (tmp_path / "m").exists()


def test_check_from_python(tmp_path):
    _hf(T.AutoModelForCausalLM, CAUSAL["qwen2-bias-window"][0]).save_pretrained(tmp_path / "hf")
    lines: list[str] = []
    import_hf(tmp_path / "hf", tmp_path / "m", check=True, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("check: max error ")
    assert hf_module.check_hf(tmp_path / "hf", tmp_path / "m") <= TOL


# --- bad files -------------------------------------------------------------------------------------------


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(f: Path) -> None:
    f.write_bytes(b"not a checkpoint " * 64)


def _as_bin(d: Path) -> Path:
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d / "pytorch_model.bin"


@pytest.mark.parametrize("fmt, damage", [("safetensors", _truncate), ("safetensors", _garbage), ("bin", _truncate),
                                          ("bin", _garbage)])
def test_bad_weights_file(fmt, damage, tmp_path, capsys):
    d = _gpt2_dir(tmp_path / "hf")
    f = d / "model.safetensors" if fmt == "safetensors" else _as_bin(d)
    damage(f)
    _refused(d, capsys, tmp_path, [f"cannot read {f}"])


@pytest.mark.parametrize("index, words", [
    ("{ not json", ["model.safetensors.index.json is not valid JSON"]),
    ('{"metadata": {}}', ["model.safetensors.index.json has no `weight_map`"]),
    ('{"weight_map": {"transformer.wte.weight": "model-00009.safetensors"}}',
     ["weight_map['transformer.wte.weight']", "model-00009.safetensors", "no such file"]),
])
def test_bad_shard_index(index, words, tmp_path, capsys):
    d = _gpt2_dir(tmp_path / "hf")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(index)
    _refused(d, capsys, tmp_path, words)


@pytest.mark.parametrize("text, words", [
    ("{ 'n_layer': 2", ["config.json is not valid JSON"]),
    ("[1, 2]", ["config.json is not a JSON object"]),
    (json.dumps({"n_layer": 2}), ["config.json has no `model_type`"]),
    (json.dumps({"model_type": "gpt2", "n_layer": None}), ["`n_layer` must be a whole number ≥ 1, got null"]),
    (json.dumps({"model_type": "gpt2", "n_head": "4"}), ['`n_head` must be a whole number ≥ 1, got "4"']),
    (json.dumps({"model_type": "llama", "rms_norm_eps": "tiny"}), ['`rms_norm_eps` must be a number, got "tiny"']),
])
def test_bad_config(text, words, tmp_path, capsys):
    d = _gpt2_dir(tmp_path / "hf")
    (d / "config.json").write_text(text)
    _refused(d, capsys, tmp_path, words)
