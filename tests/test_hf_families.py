"""Hugging Face import of the newer families (Qwen3, Phi-3/4, Mixtral, Qwen2-MoE, Gemma 1-3, OLMo 2, GPT-NeoX,
RoBERTa, XLM-R, DistilBERT, DeiT), rope scaling, and the task heads.

Each imports with outputs equal to transformers' on a right-padded batch (real positions compared) against a
random-weight model whose every tensor is perturbed, from the saved checkpoint and from the model object; each
runs in ONNX Runtime; checkpoints with a tensor too many or too few are refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import mptc
from mptc.cli import main as cli
from mptc.hf import from_hf, import_hf, special_tokens

from .test_hf import CAUSAL, NO_TOKENS, VIT, _close, _hf, _refused

V = 96
ROBERTA_TOKENS = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
_ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **NO_TOKENS)
DEIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=16,
            patch_size=4, num_labels=5)
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

FAMILIES = {  # name → (auto class, config, spec facts)
    "qwen3": (T.AutoModelForCausalLM,  # head_dim 16 ≠ 48 / 4, GQA, untied, biases on q, k, v, o
              T.Qwen3Config(vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                            **NO_TOKENS),
              {"name": "qwen3", "head_dim": 16, "kv_heads": 2, "qk_norm": True, "tied": False, "bias": True}),
    "qwen3-window-tied": (T.AutoModelForCausalLM,
                          T.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                        use_sliding_window=True, sliding_window=3,
                                        layer_types=["full_attention", "sliding_attention"],
                                        tie_word_embeddings=True, **NO_TOKENS),
                          {"window": [None, 3], "tied": True, "bias": False}),
    "phi3": (T.AutoModelForCausalLM,  # fused qkv_proj / gate_up_proj, half the head rotated, window, tied, GQA
             T.Phi3Config(vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=5,
                          tie_word_embeddings=True, **NO_TOKENS),
             {"name": "phi3", "rotary": 6, "head_dim": 12, "window": [5, 5], "tied": True, "bias": False}),
    "phi4-mini": (T.AutoModelForCausalLM,  # Phi-4-mini's shape: 3/4 of the head rotated, MHA, no window
                  T.Phi3Config(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                               num_attention_heads=2, partial_rotary_factor=0.75, **NO_TOKENS),
                  {"rotary": 12, "head_dim": 16, "window": [None]}),
    "mixtral": (T.AutoModelForCausalLM,
                T.MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                num_experts_per_tok=2, sliding_window=5, **NO_TOKENS),
                {"name": "mixtral", "experts": [3, 3], "top_k": 2, "normalize": True, "window": [5, 5]}),
    "qwen2-moe": (T.AutoModelForCausalLM,  # a dense layer (mlp_only_layers), a shared expert, raw top-k gates
                  T.Qwen2MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=24, moe_intermediate_size=16,
                                   shared_expert_intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, mlp_only_layers=[1],
                                   **NO_TOKENS),
                  {"name": "qwen2_moe", "experts": [3, None], "normalize": False, "shared": 20, "bias": True}),
    "qwen2-moe-norm": (T.AutoModelForCausalLM,  # every other layer sparse, renormalised gates
                       T.Qwen2MoeConfig(vocab_size=V, hidden_size=32, intermediate_size=24, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=20, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2,
                                        **NO_TOKENS),
                       {"experts": [None, 4], "normalize": True}),
    "gemma": (T.AutoModelForCausalLM,  # head_dim 16 ≠ 32 / 4, MQA, (1 + w) norms, embeddings × √width, tied
              T.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=16, **NO_TOKENS),
              {"name": "gemma", "head_dim": 16, "kv_heads": 1, "tied": True, "activation": "geglu_tanh",
               "placement": "pre", "embed_scale": 32 ** 0.5}),
    "gemma2": (T.AutoModelForCausalLM,  # sandwich norms, soft-capping, query_pre_attn_scalar, alternating windows
               T.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                              query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                              **NO_TOKENS),
               {"name": "gemma2", "window": [4, None], "placement": "sandwich", "softcap": 5.0, "head_softcap": 3.0,
                "scale": 24 ** -0.5}),
    "gemma3": (T.AutoModelForCausalLM,  # q/k norms, a local rope on the sliding layers, linear scaling on the others
               T.Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                  query_pre_attn_scalar=24,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                      "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 100.0}},
                                  tie_word_embeddings=False, **NO_TOKENS),
               {"name": "gemma3", "window": [4, None, 4], "qk_norm": True, "local_theta": [100.0, None, 100.0],
                "tied": False, "scaling": "linear"}),
    "olmo2": (T.AutoModelForCausalLM,  # norms on the sublayer outputs, q/k norms over all heads, biases
              T.Olmo2Config(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attention_bias=True, **NO_TOKENS),
              {"name": "olmo2", "placement": "output", "qk_norm": True, "qk_over": "all", "bias": True}),
    "gpt-neox": (T.AutoModelForCausalLM,  # parallel residual, a quarter of the head rotated, fused interleaved qkv
                 T.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=2, partial_rotary_factor=0.25, **NO_TOKENS),
                 {"name": "gpt_neox", "parallel": True, "rotary": 4, "tied": False}),
    "gpt-neox-sequential": (T.AutoModelForCausalLM,
                            T.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                            num_attention_heads=4, use_parallel_residual=False,
                                            tie_word_embeddings=True, **NO_TOKENS),
                            {"parallel": False, "rotary": 2, "tied": True}),
    "llama-classify": (T.AutoModelForSequenceClassification,  # score on the last real token
                       T.LlamaConfig(**_DEC, num_labels=3), {"head": "classify", "pool": "last", "bias": False}),
    "qwen3-token": (T.AutoModelForTokenClassification, T.Qwen3Config(**_DEC, head_dim=8, num_labels=3),
                    {"head": "classify", "pool": "none"}),
    "qwen2-qa": (T.AutoModelForQuestionAnswering, T.Qwen2Config(**_DEC),  # stored under `transformer.`
                 {"head": "span"}),
    "llama-qa": (T.AutoModelForQuestionAnswering, T.LlamaConfig(**_DEC), {"head": "span"}),  # `transformer.` too
    "gemma3-classify": (T.AutoModelForSequenceClassification, T.Gemma3TextConfig(**_DEC, head_dim=8, num_labels=3),
                        {"head": "classify", "pool": "last"}),
    "gpt-neox-token": (T.AutoModelForTokenClassification, T.GPTNeoXConfig(**_DEC, num_labels=3),
                       {"head": "classify", "pool": "none"}),
    "mixtral-qa": (T.AutoModelForQuestionAnswering, T.MixtralConfig(**_DEC, num_local_experts=3), {"head": "span"}),
    "roberta-mlm": (T.AutoModelForMaskedLM,
                    T.RobertaConfig(**_ENC, max_position_embeddings=40, type_vocab_size=1, **ROBERTA_TOKENS),
                    {"name": "roberta", "context": 38, "segments": 1, "tied": True}),
    "roberta-classify": (T.AutoModelForSequenceClassification,
                         T.RobertaConfig(**_ENC, max_position_embeddings=40, num_labels=3, **ROBERTA_TOKENS),
                         {"head": "classify", "pooler": True, "segments": 2}),
    "roberta-base": (T.AutoModel, T.RobertaConfig(**_ENC, max_position_embeddings=40, **ROBERTA_TOKENS),
                     {"head": "none"}),
    "xlm-roberta-untied": (T.AutoModelForMaskedLM,
                           T.XLMRobertaConfig(**_ENC, max_position_embeddings=40, tie_word_embeddings=False,
                                              **ROBERTA_TOKENS),
                           {"name": "xlm_roberta", "tied": False}),
    "distilbert-mlm": (T.AutoModelForMaskedLM,
                       T.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=40,
                                          max_position_embeddings=40, activation="relu"),
                       {"name": "distilbert", "segments": 0, "tied": True, "activation": "relu"}),
    "bert-token": (T.AutoModelForTokenClassification, T.BertConfig(**_ENC, num_labels=3, **NO_TOKENS),
                   {"head": "classify", "pool": "none"}),
    "bert-qa": (T.AutoModelForQuestionAnswering, T.BertConfig(**_ENC, **NO_TOKENS), {"head": "span"}),
    "xlm-roberta-token": (T.AutoModelForTokenClassification,
                          T.XLMRobertaConfig(**_ENC, max_position_embeddings=40, num_labels=3, **ROBERTA_TOKENS),
                          {"head": "classify", "pool": "none", "context": 38}),
    "distilbert-qa": (T.AutoModelForQuestionAnswering,
                      T.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=40), {"head": "span"}),
    "deit-classify": (T.AutoModelForImageClassification,
                      T.DeiTConfig(**DEIT, architectures=["DeiTForImageClassification"]),
                      {"name": "deit", "head": "classify"}),
    "deit-base": (T.AutoModel, T.DeiTConfig(**DEIT), {"head": "none"}),
    "distilbert-base": (T.AutoModel, T.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=40,
                                                       max_position_embeddings=40), {"head": "none"}),
}


def _facts(spec: mptc.Spec) -> dict:
    ly0 = spec.layers[0]
    a, m = ly0.attention, ly0.mlp
    moe = next((ly.mlp for ly in spec.layers if ly.mlp.moe), m)
    return {"name": spec.name, "head_dim": a.head_dim, "kv_heads": a.kv_heads, "qk_norm": a.qk_norm is not None,
            "tied": spec.head.tied, "bias": a.bias, "window": [ly.attention.window for ly in spec.layers],
            "rotary": a.rotary, "experts": [ly.mlp.experts for ly in spec.layers], "top_k": moe.top_k,
            "normalize": moe.normalize, "shared": moe.shared, "context": spec.context, "segments": spec.embed.segments,
            "head": spec.head.kind, "pooler": spec.head.pooler, "activation": m.activation, "placement": ly0.placement,
            "embed_scale": spec.embed_scale, "softcap": a.softcap, "head_softcap": spec.head.softcap, "scale": a.scale,
            "local_theta": [ly.attention.rope.theta if ly.attention.rope else None for ly in spec.layers],
            "scaling": spec.embed.positions.scaling.kind if spec.embed.positions.scaling else None,
            "qk_over": a.qk_norm_over, "parallel": ly0.parallel, "pool": spec.head.pool}


def _batch(config, t: int = 12) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """2 × t ids, row 1 right-padded after 7 tokens with the pad id (no real token is the pad id), and its mask;
    or 2 images."""
    if isinstance(config, (T.ViTConfig, T.DeiTConfig)):
        return {"pixel_values": PIXELS[:, :, :config.image_size, :config.image_size]}, None
    pad = config.pad_token_id or 0
    ids = torch.randint(0, V, (2, t), generator=torch.Generator().manual_seed(0))
    ids[ids == pad] = pad + 1
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = pad
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def _output(r) -> torch.Tensor:
    """logits, (start, end) logits as (B, T, 2), or the hidden states: what mptc's model returns."""
    if getattr(r, "start_logits", None) is not None:
        return torch.stack([r.start_logits, r.end_logits], dim=-1)
    return r.logits if getattr(r, "logits", None) is not None else r.last_hidden_state


def _compare(out: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None) -> None:
    if out.dim() == 3 and valid is not None:  # per token: real positions only
        out, ref = out[valid], ref[valid]
    _close(out, ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_parity(name, tmp_path):
    cls, config, facts = FAMILIES[name]
    hf = _hf(cls, config)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "m")
    model = mptc.load_model(tmp_path / "m").eval()
    assert {k: _facts(mptc.spec_of(model))[k] for k in facts} == facts
    inputs, valid = _batch(config)
    with torch.no_grad():
        ref = _output(hf(**inputs))
        _compare(model(**inputs), ref, valid)
        _compare(from_hf(hf)(**inputs), ref, valid)  # from the object: transformers 5's in-memory names (fused)


ONNX_LAYERS = {"mixtral": 1, "qwen2-moe": 1, "gemma": 1, "gemma3": 2, "olmo2": 1, "gpt-neox": 1}  # fewer layers:
# these export through torch.onnx (features the direct emitter does not cover), which takes seconds per layer


@pytest.mark.parametrize("name", ["qwen3", "phi3", "mixtral", "qwen2-moe", "gemma", "gemma2", "gemma3", "olmo2",
                                  "gpt-neox", "roberta-mlm", "xlm-roberta-untied", "distilbert-qa", "deit-classify",
                                  "llama-classify"])
def test_onnx_runtime_matches(name, tmp_path):
    """One ONNX export per family (Llama and BERT: tests/test_hf.py), run in ONNX Runtime on the padded batch."""
    cls, config, _ = FAMILIES[name]
    if name in ONNX_LAYERS:
        config = copy.deepcopy(config)
        config.num_hidden_layers = ONNX_LAYERS[name]
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:ONNX_LAYERS[name]]
    hf = _hf(cls, config)
    inputs, valid = _batch(config)
    mptc.export_onnx(from_hf(hf), tmp_path / "m.onnx")
    out = torch.from_numpy(mptc.run_onnx(tmp_path / "m.onnx", inputs))
    with torch.no_grad():
        _compare(out, _output(hf(**inputs)), valid)


@pytest.mark.parametrize("name", ["gpt2", "mistral-window", "qwen2-bias-window", "vit-classify"])
def test_onnx_runtime_matches_earlier_families(name, tmp_path):
    cls, config = (T.AutoModelForImageClassification, T.ViTConfig(**VIT)) if name == "vit-classify" else \
        (T.AutoModelForCausalLM, CAUSAL[name][0])
    hf = _hf(cls, config)
    inputs, valid = _batch(config)
    mptc.export_onnx(from_hf(hf), tmp_path / "m.onnx")
    out = torch.from_numpy(mptc.run_onnx(tmp_path / "m.onnx", inputs))
    with torch.no_grad():
        _compare(out, _output(hf(**inputs)), valid)


@pytest.mark.parametrize("name", ["qwen3", "phi3", "qwen2-moe", "gemma3", "gpt-neox", "llama-classify", "qwen2-qa",
                                  "roberta-classify", "xlm-roberta-untied", "distilbert-mlm", "deit-classify"])
def test_check_passes(name, tmp_path, capsys):
    """--check loads the class named in config.json from the same dir and compares on the probe batch; for RoBERTa
    the probe holds the pad id at padding and nowhere else, as RoBERTa's positions require."""
    cls, config, _ = FAMILIES[name]
    _hf(cls, config).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert cli(["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "m"), "--check"]) == 0
    assert "check: max error " in capsys.readouterr().out


ROPE = {  # rope_parameters at max_position_embeddings 16 (original context 8), checked at 40 positions
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 16.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 0.707,
                    "mscale_all_dim": 1.0},
}


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("kind", list(ROPE))
def test_rope_scaling(kind, spelling, tmp_path):
    """Llama 3.1+ style configs, in transformers 5's `rope_parameters` or the older `rope_scaling` + `rope_theta`,
    past the context the model was trained at."""
    config = T.LlamaConfig(**(_DEC | {"num_hidden_layers": 1}), max_position_embeddings=16,
                           rope_parameters=ROPE[kind] | {"rope_theta": 100.0})
    hf = _hf(T.AutoModelForCausalLM, config)
    hf.save_pretrained(tmp_path / "hf")
    if spelling == "rope_scaling":
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    model = from_hf(tmp_path / "hf")
    assert mptc.spec_of(model).embed.positions.scaling.kind == kind.split("-")[0]
    inputs, valid = _batch(config, t=40)
    with torch.no_grad():
        _compare(model(**inputs), hf(**inputs).logits, valid)


def test_longrope_short_and_long(tmp_path):
    """Phi-3's longrope: the short factors up to the original context, the long ones past it (in ONNX too)."""
    config = T.Phi3Config(**(_DEC | {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}),
                          max_position_embeddings=64, original_max_position_embeddings=16,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 100.0,
                                           "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0],
                                           "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]})
    hf = _hf(T.AutoModelForCausalLM, config)
    model = from_hf(hf)
    sc = mptc.spec_of(model).embed.positions.scaling
    assert (sc.kind, sc.original, sc.factor) == ("longrope", 16, 4.0)
    assert sc.attention == pytest.approx((1 + math.log(4.0) / math.log(16)) ** 0.5)
    mptc.export_onnx(model, tmp_path / "m.onnx")
    for t in (12, 40):
        inputs, valid = _batch(config, t=t)
        with torch.no_grad():
            ref = hf(**inputs).logits
            _compare(model(**inputs), ref, valid)
        _compare(torch.from_numpy(mptc.run_onnx(tmp_path / "m.onnx", inputs)), ref, valid)


def test_roberta_positions_start_after_the_pad_id(tmp_path):
    """The import keeps the rows real tokens read (pad + 1 onwards): row t of mptc's table is row t + 2 of RoBERTa's."""
    cls, config, _ = FAMILIES["roberta-mlm"]
    hf = _hf(cls, config)
    model = from_hf(hf)
    table = hf.state_dict()["roberta.embeddings.position_embeddings.weight"]
    assert torch.equal(model.state_dict()["embed.positions.weight"], table[2:])


@pytest.mark.parametrize("name", ["roberta-mlm", "xlm-roberta-untied"])
def test_roberta_left_padding_matches(name):
    """transformers numbers RoBERTa positions over the real tokens; the import's `learned(skip_padding = true)` does
    the same, so left padding (rows padded differently in one batch) gives transformers' outputs at real tokens."""
    cls, config, _ = FAMILIES[name]
    hf = _hf(cls, config)
    model = from_hf(hf)
    assert mptc.spec_of(model).embed.positions.skip_padding
    ids = torch.tensor([[1, 1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [1, 1, 1, 1, 15, 16]])  # pad id 1 on the left
    mask = (ids != 1).long()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours - theirs)[real].abs().max() < 1e-4
    spec = mptc.spec_of(model)  # the same weights numbering every position differ: the check is not vacuous
    spec = dataclasses.replace(spec, embed=dataclasses.replace(spec.embed, positions=mptc.spec.Positions("learned")))
    with torch.no_grad():
        plain = mptc.build(spec, weights=dict(model.state_dict()))(input_ids=ids, attention_mask=mask)
    assert (plain - theirs)[0, 2:].abs().max() > 1e-3


# --- refusals ----------------------------------------------------------------------------------------------


def _saved(tmp_path, name: str):
    cls, config, _ = FAMILIES[name]
    d = tmp_path / "hf"
    _hf(cls, config).save_pretrained(d)
    return d


def _edit(d, edit) -> None:
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_phi3_unused_tensor_refused(tmp_path, capsys):
    d = _saved(tmp_path, "phi3")
    _edit(d, lambda t: t.update({"model.layers.1.self_attn.q_norm.weight": torch.ones(12)}))
    _refused(d, capsys, tmp_path, ["1 tensor of the checkpoint is not used", "model.layers.1.self_attn.q_norm.weight"])


def test_phi3_missing_fused_tensor_refused(tmp_path, capsys):
    """One fused checkpoint tensor gives three mptc tensors: the message names it once, with all three."""
    d = _saved(tmp_path, "phi3")
    _edit(d, lambda t: t.pop("model.layers.0.self_attn.qkv_proj.weight"))
    _refused(d, capsys, tmp_path, ["1 tensor of the model is not in the checkpoint",
                                   "'model.layers.0.self_attn.qkv_proj.weight' (for layers.0.attn.q.weight, "
                                   "layers.0.attn.k.weight, layers.0.attn.v.weight)"])


def test_phi3_fused_rows_checked(tmp_path, capsys):
    d = _saved(tmp_path, "phi3")
    _edit(d, lambda t: t.update({"model.layers.0.self_attn.qkv_proj.weight":
                                 t["model.layers.0.self_attn.qkv_proj.weight"][:-12]}))
    _refused(d, capsys, tmp_path, ["'model.layers.0.self_attn.qkv_proj.weight' has the shape (84, 48)",
                                   "48 + 24 + 24 along axis 0"])


def test_mixtral_missing_expert_refused(tmp_path, capsys):
    d = _saved(tmp_path, "mixtral")
    _edit(d, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    _refused(d, capsys, tmp_path, ["1 tensor of the model is not in the checkpoint",
                                   "'model.layers.1.block_sparse_moe.experts.2.w3.weight' "
                                   "(for layers.1.mlp.experts.up.weight)",
                                   "2 tensors of the checkpoint are not used: "  # the other experts' w3, unstacked
                                   "model.layers.1.block_sparse_moe.experts.0.w3.weight"])


def test_mixtral_extra_expert_refused(tmp_path, capsys):
    """A fourth expert in a checkpoint whose config says three is left over, and named."""
    d = _saved(tmp_path, "mixtral")
    _edit(d, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.3.w1.weight": torch.ones(24, 32)}))
    _refused(d, capsys, tmp_path, ["1 tensor of the checkpoint is not used: "
                                   "model.layers.0.block_sparse_moe.experts.3.w1.weight"])


def test_roberta_unused_tensor_refused(tmp_path, capsys):
    d = _saved(tmp_path, "roberta-mlm")
    _edit(d, lambda t: t.update({"roberta.encoder.layer.0.attention.self.extra.weight": torch.ones(3)}))
    _refused(d, capsys, tmp_path, ["roberta.encoder.layer.0.attention.self.extra.weight"])


@pytest.mark.parametrize("config, words", [
    ({"model_type": "gemma3"}, ["unsupported model_type 'gemma3'", "model_type gemma3_text"]),
    ({"model_type": "deit", "architectures": ["DeiTForImageClassificationWithTeacher"]},
     ["unsupported architecture 'DeiTForImageClassificationWithTeacher' for DeiT"]),
    ({"model_type": "bert", "architectures": ["BertForQuestionAnswering"], "num_labels": 3},
     ["start and end logits (num_labels = 2)", "num_labels = 3"]),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
    ({"model_type": "distilbert", "architectures": ["DistilBertForSequenceClassification"]},
     ["unsupported architecture 'DistilBertForSequenceClassification' for DistilBERT"]),
    ({"model_type": "phi3", "partial_rotary_factor": 0.3, "hidden_size": 48, "num_attention_heads": 4},
     ["partial_rotary_factor = 0.3", "even number of rotated dims"]),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     ["longrope lists 1 short factors", "rotary_dim / 2 = 48"]),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "proportional", "factor": 2.0}},
     ["unsupported rope_scaling type 'proportional'", "linear, dynamic, yarn, llama3, longrope"]),
    ({"model_type": "roberta", "pad_token_id": 1, "max_position_embeddings": 2},
     ["`max_position_embeddings` = 2 leaves no position", "`pad_token_id` + 1 = 2"]),
])
def test_refusals(config, words, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(mptc.MptcError) as e:
        import_hf(tmp_path / "hf", tmp_path / "m")
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name, edit, words", [
    ("gemma3", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"),
     ["'model.layers.1.self_attn.k_norm.weight' (for layers.1.attn.k_norm.weight)"]),
    ("olmo2", lambda t: t.update({"model.layers.0.input_layernorm.weight": torch.ones(32)}),
     ["1 tensor of the checkpoint is not used: model.layers.0.input_layernorm.weight"]),
    ("gpt-neox", lambda t: t.pop("gpt_neox.layers.1.attention.query_key_value.bias"),
     ["'gpt_neox.layers.1.attention.query_key_value.bias' (for layers.1.attn.q.bias, layers.1.attn.k.bias, "
      "layers.1.attn.v.bias)"]),
])
def test_new_family_tensors_accounted_for(name, edit, words, tmp_path, capsys):
    d = _saved(tmp_path, name)
    _edit(d, edit)
    _refused(d, capsys, tmp_path, words)


def test_special_tokens_travel_with_the_import(tmp_path, capsys):
    """bos / eos / pad from config.json, generation_config.json winning, kept in the model dir's weights metadata."""
    cls, config, _ = FAMILIES["qwen3"]
    d = tmp_path / "hf"
    _hf(cls, config).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text()) | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    import_hf(d, tmp_path / "m")
    assert special_tokens(tmp_path / "m") == {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0}
    (d / "generation_config.json").write_text("{ no")
    _refused(d, capsys, tmp_path / "x", ["generation_config.json is not valid JSON"])
