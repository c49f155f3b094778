"""Hugging Face families: config.json → Spec readers and the weight tables between mptc and checkpoint names.

Each family is a row of `FAMILIES`: a reader from config.json to a Spec, and a table from mptc parameter
names to checkpoint tensors (`Map`), used in both directions (import in `mptc.hf`, export in `mptc.hf_export`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from . import spec as S
from .errors import MptcError
from .schema import parse
from .spec import format_spec

Config = dict[str, Any]

# --- checkpoint tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Map:
    """Where one mptc tensor lives in a checkpoint (`{i}` = layer), and how its layout differs."""

    hf: tuple[str, ...]  # key, then alternative spellings (transformers 5 renames some modules in memory)
    conv1d: bool = False  # GPT-2's Conv1D stores (in, out): transpose to nn.Linear's (out, in)
    part: int | None = None  # the row block of a fused tensor (GPT-2 c_attn = [q; k; v], Phi-3 gate_up = [gate; up]),
    #                          blocks sized by the mptc tensors that share it (unequal under GQA)
    flat: bool = False  # reshape to the mptc shape (ViT: cls (1, 1, D), positions (1, P, D), kernel (D, C, p, p))
    offset: bool = False  # RoBERTa positions: the mptc table is the checkpoint's last rows (pad + 1 rows dropped)
    experts: bool = False  # one checkpoint tensor per expert (`{e}` = expert), stacked on a new first axis
    dim: int = 0  # the axis `part` splits (1 for the experts' fused (E, 2F, D) gate_up_proj)
    alt: Map | None = None  # another layout, read when the checkpoint has none of `hf` (transformers 5 in memory)
    plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w): the mptc gain is w + 1
    interleave: bool = False  # the fused blocks alternate per head (GPT-NeoX: rows (H, [q, k, v], K))


def _names(hf: str | tuple[str, ...], leaf: str) -> tuple[str, ...]:
    return tuple(f"{h}.{leaf}" for h in ((hf,) if isinstance(hf, str) else hf))


def _wb(mptc: str, hf: str | tuple[str, ...], conv1d: bool = False, part: int | None = None) -> dict[str, Map]:
    """A linear layer or a norm: `.weight` and `.bias` (biases are never transposed)."""
    return {f"{mptc}.weight": Map(_names(hf, "weight"), conv1d, part),
            f"{mptc}.bias": Map(_names(hf, "bias"), part=part)}


def _one(hf: str | tuple[str, ...], **kw) -> Map:
    return Map((hf,) if isinstance(hf, str) else hf, **kw)


def _each(projs, mptc: str, hf: str) -> dict[str, Map]:
    """`_wb` for several projections named alike (`{p}` = the projection)."""
    return {k: m for p in projs for k, m in _wb(mptc.format(p=p), hf.format(p=p)).items()}


GPT2_WEIGHTS: dict[str, Map] = {
    "embed.tokens.weight": _one("transformer.wte.weight"),
    "embed.positions.weight": _one("transformer.wpe.weight"),
    **_wb("layers.{i}.attn_norm", "transformer.h.{i}.ln_1"),
    **_wb("layers.{i}.attn.q", "transformer.h.{i}.attn.c_attn", conv1d=True, part=0),
    **_wb("layers.{i}.attn.k", "transformer.h.{i}.attn.c_attn", conv1d=True, part=1),
    **_wb("layers.{i}.attn.v", "transformer.h.{i}.attn.c_attn", conv1d=True, part=2),
    **_wb("layers.{i}.attn.o", "transformer.h.{i}.attn.c_proj", conv1d=True),
    **_wb("layers.{i}.mlp_norm", "transformer.h.{i}.ln_2"),
    **_wb("layers.{i}.mlp.up", "transformer.h.{i}.mlp.c_fc", conv1d=True),
    **_wb("layers.{i}.mlp.down", "transformer.h.{i}.mlp.c_proj", conv1d=True),
    **_wb("head.norm", "transformer.ln_f"),
    "head.out.weight": _one("lm_head.weight"),
}

LLAMA_WEIGHTS: dict[str, Map] = {  # also Mistral and Qwen2
    "embed.tokens.weight": _one("model.embed_tokens.weight"),
    **_wb("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    **_each("qkvo", "layers.{{i}}.attn.{p}", "model.layers.{{i}}.self_attn.{p}_proj"),
    **_wb("layers.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm"),
    **_each(("up", "gate", "down"), "layers.{{i}}.mlp.{p}", "model.layers.{{i}}.mlp.{p}_proj"),
    **_wb("head.norm", "model.norm"),
    **_wb("head.out", ("lm_head", "score", "qa_outputs")),  # the LM, a classifier (`score`), or extractive QA
}

QWEN3_WEIGHTS: dict[str, Map] = LLAMA_WEIGHTS | {  # per-head RMSNorms on q and k, before rope
    "layers.{i}.attn.q_norm.weight": _one("model.layers.{i}.self_attn.q_norm.weight"),
    "layers.{i}.attn.k_norm.weight": _one("model.layers.{i}.self_attn.k_norm.weight"),
}

_ML = "model.layers.{i}.mlp"


def _experts(stored: str, fused: str, names: tuple[str, str, str]) -> dict[str, Map]:
    """Expert tensors (E, …): one checkpoint tensor per expert on disk (`{stored}.{e}.<name>.weight`), or
    transformers 5's fused `gate_up_proj` (E, 2F, D) = [gate; up] and `down_proj` (E, D, F) in memory."""
    gate, up, down = names
    return {
        "layers.{i}.mlp.experts.gate.weight": Map((f"{stored}.{{e}}.{gate}.weight",), experts=True,
                                                  alt=_one(f"{fused}.gate_up_proj", part=0, dim=1)),
        "layers.{i}.mlp.experts.up.weight": Map((f"{stored}.{{e}}.{up}.weight",), experts=True,
                                                alt=_one(f"{fused}.gate_up_proj", part=1, dim=1)),
        "layers.{i}.mlp.experts.down.weight": Map((f"{stored}.{{e}}.{down}.weight",), experts=True,
                                                  alt=_one(f"{fused}.down_proj")),
    }


_ATTENTION = {k: m for k, m in LLAMA_WEIGHTS.items() if ".mlp." not in k}
MIXTRAL_WEIGHTS: dict[str, Map] = _ATTENTION | {  # the MLP of every layer is a mixture of experts
    "layers.{i}.mlp.router.weight": _one(("model.layers.{i}.block_sparse_moe.gate.weight", f"{_ML}.gate.weight")),
    **_experts("model.layers.{i}.block_sparse_moe.experts", f"{_ML}.experts", ("w1", "w3", "w2")),
}
QWEN2_MOE_WEIGHTS: dict[str, Map] = LLAMA_WEIGHTS | {  # dense layers (`mlp_only_layers`) keep Llama's names
    "layers.{i}.mlp.router.weight": _one(f"{_ML}.gate.weight"),
    **_experts(f"{_ML}.experts", f"{_ML}.experts", ("gate_proj", "up_proj", "down_proj")),
    **{f"layers.{{i}}.mlp.shared.{p}.weight": _one(f"{_ML}.shared_expert.{p}_proj.weight") for p in ("up", "gate",
                                                                                                       "down")},
    "layers.{i}.mlp.shared_gate.weight": _one(f"{_ML}.shared_expert_gate.weight"),
}



def _plus_one(table: dict[str, Map]) -> dict[str, Map]:
    """The table with every RMSNorm gain read as (1 + w) (Gemma)."""
    return {k: replace(m, plus_one=True) if "norm.weight" in k else m for k, m in table.items()}


_GL = "model.layers.{i}"
GEMMA_WEIGHTS = _plus_one(LLAMA_WEIGHTS)
GEMMA2_WEIGHTS = _plus_one({  # sandwich norms around both sublayers
    **{k: m for k, m in LLAMA_WEIGHTS.items() if "_norm" not in k},
    "layers.{i}.attn_norm.weight": _one(f"{_GL}.input_layernorm.weight"),
    "layers.{i}.attn_out_norm.weight": _one(f"{_GL}.post_attention_layernorm.weight"),
    "layers.{i}.mlp_norm.weight": _one(f"{_GL}.pre_feedforward_layernorm.weight"),
    "layers.{i}.mlp_out_norm.weight": _one(f"{_GL}.post_feedforward_layernorm.weight"),
})
GEMMA3_WEIGHTS = GEMMA2_WEIGHTS | _plus_one({k: m for k, m in QWEN3_WEIGHTS.items() if "attn.q_norm" in k or
                                             "attn.k_norm" in k})
OLMO2_WEIGHTS: dict[str, Map] = {  # norms on the sublayers' outputs only; q/k norms over the whole projection
    **{k: m for k, m in QWEN3_WEIGHTS.items() if not k.startswith(("layers.{i}.attn_norm", "layers.{i}.mlp_norm"))},
    "layers.{i}.attn_out_norm.weight": _one(f"{_GL}.post_attention_layernorm.weight"),
    "layers.{i}.mlp_out_norm.weight": _one(f"{_GL}.post_feedforward_layernorm.weight"),
}
_NL = "gpt_neox.layers.{i}"
NEOX_WEIGHTS: dict[str, Map] = {  # q, k, v fused and interleaved per head
    "embed.tokens.weight": _one("gpt_neox.embed_in.weight"),
    **_wb("layers.{i}.attn_norm", f"{_NL}.input_layernorm"),
    **{f"layers.{{i}}.attn.{p}.{w}": Map((f"{_NL}.attention.query_key_value.{w}",), part=j, interleave=True)
       for j, p in enumerate("qkv") for w in ("weight", "bias")},
    **_wb("layers.{i}.attn.o", f"{_NL}.attention.dense"),
    **_wb("layers.{i}.mlp_norm", f"{_NL}.post_attention_layernorm"),
    **_wb("layers.{i}.mlp.up", f"{_NL}.mlp.dense_h_to_4h"),
    **_wb("layers.{i}.mlp.down", f"{_NL}.mlp.dense_4h_to_h"),
    **_wb("head.norm", "gpt_neox.final_layer_norm"),
    **_wb("head.out", ("embed_out", "lm_head", "score", "classifier", "qa_outputs")),  # LM: on disk, in memory
}
_PL = "model.layers.{i}"
PHI3_WEIGHTS: dict[str, Map] = {  # fused qkv_proj = [q; k; v] and gate_up_proj = [gate; up], no biases
    "embed.tokens.weight": _one("model.embed_tokens.weight"),
    **_wb("layers.{i}.attn_norm", f"{_PL}.input_layernorm"),
    **{f"layers.{{i}}.attn.{p}.weight": _one(f"{_PL}.self_attn.qkv_proj.weight", part=j) for j, p in enumerate("qkv")},
    **_wb("layers.{i}.attn.o", f"{_PL}.self_attn.o_proj"),
    **_wb("layers.{i}.mlp_norm", f"{_PL}.post_attention_layernorm"),
    "layers.{i}.mlp.gate.weight": _one(f"{_PL}.mlp.gate_up_proj.weight", part=0),
    "layers.{i}.mlp.up.weight": _one(f"{_PL}.mlp.gate_up_proj.weight", part=1),
    **_wb("layers.{i}.mlp.down", f"{_PL}.mlp.down_proj"),
    **_wb("head.norm", "model.norm"),
    **_wb("head.out", ("lm_head", "score", "qa_outputs")),
}


def _encoder_weights(p: str) -> dict[str, Map]:
    """BERT's embeddings and post-norm layers under the base model's prefix `p` (`bert`, `roberta`)."""
    lay = f"{p}.encoder.layer.{{i}}"
    return {
        "embed.tokens.weight": _one(f"{p}.embeddings.word_embeddings.weight"),
        "embed.segments.weight": _one(f"{p}.embeddings.token_type_embeddings.weight"),
        **_wb("embed.norm", f"{p}.embeddings.LayerNorm"),
        **_wb("layers.{i}.attn.q", f"{lay}.attention.self.query"),
        **_wb("layers.{i}.attn.k", f"{lay}.attention.self.key"),
        **_wb("layers.{i}.attn.v", f"{lay}.attention.self.value"),
        **_wb("layers.{i}.attn.o", f"{lay}.attention.output.dense"),
        **_wb("layers.{i}.attn_norm", f"{lay}.attention.output.LayerNorm"),  # post-norm: after the attention residual
        **_wb("layers.{i}.mlp.up", f"{lay}.intermediate.dense"),
        **_wb("layers.{i}.mlp.down", f"{lay}.output.dense"),
        **_wb("layers.{i}.mlp_norm", f"{lay}.output.LayerNorm"),
    }


BERT_WEIGHTS: dict[str, Map] = {
    **_encoder_weights("bert"),
    "embed.positions.weight": _one("bert.embeddings.position_embeddings.weight"),
    **_wb("head.transform", "cls.predictions.transform.dense"),  # BertForMaskedLM
    **_wb("head.transform_norm", "cls.predictions.transform.LayerNorm"),
    "head.bias": _one(("cls.predictions.bias", "cls.predictions.decoder.bias")),  # tied: the decoder reuses `bias`
    "head.out.weight": _one(("classifier.weight", "cls.predictions.decoder.weight", "qa_outputs.weight")),
    # untied: transformers 5 uses `decoder.bias` (and stores an unused `bias` too); older checkpoints hold one `bias`
    "head.out.bias": _one(("classifier.bias", "cls.predictions.decoder.bias", "cls.predictions.bias",
                           "qa_outputs.bias")),
    **_wb("head.pooler", "bert.pooler.dense"),  # BertForSequenceClassification
}

ROBERTA_WEIGHTS: dict[str, Map] = {  # also XLM-R
    **_encoder_weights("roberta"),
    "embed.positions.weight": _one("roberta.embeddings.position_embeddings.weight", offset=True),
    **_wb("head.transform", "lm_head.dense"),  # RobertaForMaskedLM
    **_wb("head.transform_norm", "lm_head.layer_norm"),
    "head.bias": _one(("lm_head.bias", "lm_head.decoder.bias")),
    "head.out.weight": _one(("classifier.out_proj.weight", "lm_head.decoder.weight", "classifier.weight",
                             "qa_outputs.weight")),
    "head.out.bias": _one(("classifier.out_proj.bias", "lm_head.decoder.bias", "lm_head.bias", "classifier.bias",
                           "qa_outputs.bias")),
    **_wb("head.pooler", "classifier.dense"),  # RobertaForSequenceClassification: dense + tanh on <s>, out_proj
}

_DL = "distilbert.transformer.layer.{i}"
DISTILBERT_WEIGHTS: dict[str, Map] = {
    "embed.tokens.weight": _one("distilbert.embeddings.word_embeddings.weight"),
    "embed.positions.weight": _one("distilbert.embeddings.position_embeddings.weight"),
    **_wb("embed.norm", "distilbert.embeddings.LayerNorm"),
    **{k: m for p in "qkv" for k, m in _wb(f"layers.{{i}}.attn.{p}", f"{_DL}.attention.{p}_lin").items()},
    **_wb("layers.{i}.attn.o", f"{_DL}.attention.out_lin"),
    **_wb("layers.{i}.attn_norm", f"{_DL}.sa_layer_norm"),
    **_wb("layers.{i}.mlp.up", f"{_DL}.ffn.lin1"),
    **_wb("layers.{i}.mlp.down", f"{_DL}.ffn.lin2"),
    **_wb("layers.{i}.mlp_norm", f"{_DL}.output_layer_norm"),
    **_wb("head.transform", "vocab_transform"),  # DistilBertForMaskedLM
    **_wb("head.transform_norm", "vocab_layer_norm"),
    "head.bias": _one("vocab_projector.bias"),  # tied
    **_wb("head.out", ("vocab_projector", "classifier", "qa_outputs")),  # untied MLM, token classifier, QA
}

def _vit_weights(p: str) -> dict[str, Map]:
    """ViT's (and DeiT's) table under the base model's prefix `p`; transformers 5 renames layers in memory."""
    lay, lay5 = f"{p}.encoder.layer.{{i}}", f"{p}.layers.{{i}}"  # on disk; in memory
    return {
        "embed.patch.weight": _one(f"{p}.embeddings.patch_embeddings.projection.weight", flat=True),  # (D, C, p, p)
        "embed.patch.bias": _one(f"{p}.embeddings.patch_embeddings.projection.bias"),
        "embed.cls": _one(f"{p}.embeddings.cls_token", flat=True),  # (1, 1, D)
        "embed.positions.weight": _one(f"{p}.embeddings.position_embeddings", flat=True),  # (1, N + 1, D)
        **_wb("layers.{i}.attn_norm", (f"{lay}.layernorm_before", f"{lay5}.layernorm_before")),
        **_wb("layers.{i}.attn.q", (f"{lay}.attention.attention.query", f"{lay5}.attention.q_proj")),
        **_wb("layers.{i}.attn.k", (f"{lay}.attention.attention.key", f"{lay5}.attention.k_proj")),
        **_wb("layers.{i}.attn.v", (f"{lay}.attention.attention.value", f"{lay5}.attention.v_proj")),
        **_wb("layers.{i}.attn.o", (f"{lay}.attention.output.dense", f"{lay5}.attention.o_proj")),
        **_wb("layers.{i}.mlp_norm", (f"{lay}.layernorm_after", f"{lay5}.layernorm_after")),
        **_wb("layers.{i}.mlp.up", (f"{lay}.intermediate.dense", f"{lay5}.mlp.fc1")),
        **_wb("layers.{i}.mlp.down", (f"{lay}.output.dense", f"{lay5}.mlp.fc2")),
        **_wb("head.norm", f"{p}.layernorm"),
        **_wb("head.out", "classifier"),
    }


VIT_WEIGHTS = _vit_weights("vit")
DEIT_WEIGHTS = _vit_weights("deit") | {  # positions (1, N + 2, D): class, distillation, patches
    "embed.distill": _one("deit.embeddings.distillation_token", flat=True),
}

# --- config.json → Spec -------------------------------------------------------------------------------

_MISSING = object()
PLAIN_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
              "silu": "silu", "swish": "silu"}
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "gelu_pytorch_tanh": "geglu_tanh",
              "gelu_new": "geglu_tanh"}


def _get(cfg: Config, key: str, default: Any = _MISSING) -> Any:
    v = cfg.get(key, default)
    if v is _MISSING:
        raise MptcError(f"config.json has no `{key}`")
    return v


def _json(v: Any) -> str:
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _int(cfg: Config, key: str, least: int = 1, null: bool = False) -> int | None:
    """A whole-number field (`null` allows None)."""
    v = _get(cfg, key, None) if null else _get(cfg, key)
    if v is None and null:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise MptcError(f"config.json: `{key}` must be a whole number ≥ {least}, got {_json(v)}")
    return v


def _num(cfg: Config, key: str, default: Any = _MISSING) -> float:
    v = _get(cfg, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MptcError(f"config.json: `{key}` must be a number, got {_json(v)}")
    return float(v)


def _act(cfg: Config, key: str, table: dict[str, str]) -> str:
    act = _get(cfg, key)
    if act not in table:
        raise MptcError(f"unsupported {key} '{act}'", hint=f"supported: {', '.join(table)}")
    return table[act]


def _num_labels(cfg: Config) -> int:
    labels = cfg.get("id2label")
    return len(labels) if labels else int(cfg.get("num_labels", 2))


ROPE_KINDS = ("linear", "dynamic", "yarn", "llama3", "longrope")  # transformers' rope types the language has
ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),  # yarn: factor, else the context ratio
             "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor")}


def _rope_params(cfg: Config) -> Config:
    """The rope parameters: transformers 5's `rope_parameters`, over the older `rope_scaling`."""
    out: Config = {}
    for key in ("rope_scaling", "rope_parameters"):  # the older and the transformers 5 spelling
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict):
            raise MptcError(f"config.json: `{key}` must be an object, got {_json(rope)}")
        out |= rope
    return out


def _rope(cfg: Config, params: Config | None = None) -> S.Positions:
    """Rope positions: the base and any scaling (linear, dynamic, yarn, llama3); other rope types are refused."""
    p = _rope_params(cfg) if params is None else params
    kind = p.get("rope_type", p.get("type", "default"))
    kind = "longrope" if kind == "su" else kind  # Phi-3's older name
    theta = _num(p, "rope_theta") if "rope_theta" in p else _num(cfg, "rope_theta", 10000.0)
    if kind == "default":
        return S.Positions("rope", theta)
    if kind not in ROPE_KINDS:
        raise MptcError(f"unsupported rope_scaling type '{kind}' (in `rope_parameters` / `rope_scaling`)",
                        hint=f"mptc's rope scaling: {', '.join(ROPE_KINDS)} (docs/hf.md)")
    missing = [k for k in ROPE_KEYS[kind] if p.get(k) is None]
    if missing:
        raise MptcError(f"config.json: `rope_parameters` of rope_type '{kind}' has no `{missing[0]}`",
                        hint=f"rope_type '{kind}' needs {', '.join(ROPE_KEYS[kind])}")
    ctx = _int(cfg, "max_position_embeddings")
    if kind == "dynamic":  # transformers' dynamic NTK grows past max_position_embeddings
        return S.Positions("rope", theta, S.RopeScaling("dynamic", _num(p, "factor"), ctx))
    orig = _int(cfg, "original_max_position_embeddings", null=True) or (  # Phi-3 keeps it at the top level
        _int(p, "original_max_position_embeddings") if p.get("original_max_position_embeddings") else ctx)
    if kind == "linear":
        return S.Positions("rope", theta, S.RopeScaling("linear", _num(p, "factor")))
    if kind == "llama3":
        return S.Positions("rope", theta, S.RopeScaling("llama3", _num(p, "factor"), orig, _num(p, "low_freq_factor"),
                                                        _num(p, "high_freq_factor")))
    factor = _num(p, "factor") if p.get("factor") is not None else ctx / orig
    if kind == "longrope":
        att = _num(p, "attention_factor") if p.get("attention_factor") is not None else \
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        short, long = (tuple(float(_num({"v": v}, "v")) for v in _get(p, k)) for k in ("short_factor", "long_factor"))
        return S.Positions("rope", theta, S.RopeScaling("longrope", factor, orig, attention=att, short=short,
                                                        long=long))
    return S.Positions("rope", theta, S.RopeScaling(
        "yarn", factor, orig, beta_fast=_num(p, "beta_fast") if p.get("beta_fast") else 32.0,
        beta_slow=_num(p, "beta_slow") if p.get("beta_slow") else 1.0, attention=_yarn_attention(p, factor),
        truncate=bool(p.get("truncate", True))))


def _yarn_attention(p: Config, factor: float) -> float:
    """transformers' yarn cos/sin factor: `attention_factor`, else from `mscale` / `mscale_all_dim`, else
    0.1 · ln(factor) + 1."""
    if p.get("attention_factor") is not None:
        return _num(p, "attention_factor")

    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    ms, ma = p.get("mscale"), p.get("mscale_all_dim")
    return float(m(factor, ms) / m(factor, ma)) if ms and ma else m(factor)


def _refuse_if(cfg: Config, key: str, bad: Callable[[Any], bool], why: str) -> None:
    if key in cfg and bad(cfg[key]):
        raise MptcError(f"unsupported {key} = {json.dumps(cfg[key])}: {why}")


def _init(cfg: Config) -> S.Init:
    return S.Init(_num(cfg, "initializer_range", 0.02))


def _gpt2_spec(cfg: Config, head: str) -> S.Spec:
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        _refuse_if(cfg, key, bool, "mptc attention is plain scaled dot-product self-attention")
    _refuse_if(cfg, "scale_attn_weights", lambda v: not v, "mptc always scales scores by 1/√head_dim")
    d, h = _int(cfg, "n_embd"), _int(cfg, "n_head")
    norm = S.Norm("layernorm", _num(cfg, "layer_norm_epsilon"))
    att = S.Attention(h, h, d // h, d // h, dropout=_num(cfg, "attn_pdrop"))
    mlp = S.MLP(_int(cfg, "n_inner", null=True) or 4 * d, _act(cfg, "activation_function", PLAIN_ACTS))
    layer = S.Layer(att, mlp, norm, dropout=_num(cfg, "resid_pdrop"))
    hd = _decoder_head(cfg, head, norm)
    return S.Spec("gpt2", d, (layer,) * _int(cfg, "n_layer"), hd, _int(cfg, "vocab_size"), _int(cfg, "n_positions"),
                  S.Embed(dropout=_num(cfg, "embd_pdrop")), _init(cfg))


def _span_labels(cfg: Config, head: str) -> None:
    """An encoder's `qa_outputs` has `num_labels` rows, which must be the two of start and end."""
    if head == "span" and _num_labels(cfg) != 2:
        raise MptcError(f"config.json: a question-answering head has start and end logits (num_labels = 2); this "
                        f"config has num_labels = {_num_labels(cfg)}")


def _decoder_head(cfg: Config, head: str, norm: S.Norm, softcap: float | None = None) -> S.Head:
    """A decoder's head after its final norm: the LM, `score` on the last real token (sequence classification,
    no bias), `score` on every token (token classification), `qa_outputs` (start and end logits), or none."""
    if head == "lm":
        return S.Head("lm", norm, tied=bool(_get(cfg, "tie_word_embeddings")), softcap=softcap)
    if head == "classify":
        return S.Head("classify", norm, classes=_num_labels(cfg), pool="last")
    if head == "token":
        return S.Head("classify", norm, bias=bool(cfg.get("token_classification_bias", True)),
                      classes=_num_labels(cfg), pool="none")
    return S.Head("span", norm, bias=True) if head == "span" else S.Head("none", norm)


def _tasks(prefix: str, qa: bool = True) -> dict[str, str]:
    """The generic task classes of a decoder family (transformers' GenericFor…)."""
    out = {f"{prefix}ForSequenceClassification": "classify", f"{prefix}ForTokenClassification": "token"}
    return out | ({f"{prefix}ForQuestionAnswering": "span"} if qa else {})


def _no_window(cfg: Config, n: int) -> list[int | None]:
    return [None] * n


def _mistral_window(cfg: Config, n: int) -> list[int | None]:
    return [_int(cfg, "sliding_window", null=True)] * n  # null: none


def _qwen2_window(cfg: Config, n: int) -> list[int | None]:
    """Only with use_sliding_window, on the layers `layer_types` marks (else from `max_window_layers` on)."""
    if not cfg.get("use_sliding_window"):
        return [None] * n
    w = _int(cfg, "sliding_window", null=True)
    if w is None:
        return [None] * n
    types = cfg.get("layer_types") or ["sliding_attention" if i >= _int(cfg, "max_window_layers", 0) else
                                       "full_attention" for i in range(n)]
    return [w if t == "sliding_attention" else None for t in types]


def _phi3_window(cfg: Config, n: int) -> list[int | None]:
    return [_int(cfg, "sliding_window", null=True)] * n  # Phi-3: every layer when set (null: none)


def _rotary(cfg: Config, k: int) -> int:
    """Dims rotated per head: `partial_rotary_factor` (in `rope_parameters` in transformers 5, else top level) · K."""
    params = cfg.get("rope_parameters") or {}
    f = _num(params, "partial_rotary_factor") if "partial_rotary_factor" in params else \
        _num(cfg, "partial_rotary_factor", 1.0)
    r = int(k * f)
    if not 0 < f <= 1 or r % 2:
        raise MptcError(f"unsupported partial_rotary_factor = {f}: it must give an even number of rotated dims "
                        f"in (0, head_dim = {k}], got {r}")
    return r


def _llama_spec(cfg: Config, head: str, name: str, window: Callable[[Config, int], list[int | None]],
                bias: tuple[bool, bool] | str | None = None, qk_norm: bool = False,
                dropout: tuple[str, str] | None = None, mlps: Callable[[Config, int], list[S.MLP]] | None = None
                ) -> S.Spec:
    """Llama, Mistral, Qwen2, Qwen3, Phi-3: rope, RMSNorm, grouped-query attention, gated MLP.

    bias: (q/k/v, o) where the family fixes it (Mistral none, Qwen2 q/k/v only), a config key for q/k/v (o none),
    else `attention_bias` for all four.
    qk_norm: Qwen3's RMSNorm per head on q and k (eps `rms_norm_eps`). dropout: (residual, embedding) rate keys.
    mlps: each layer's MLP (mixtures of experts), else one gated MLP of `intermediate_size`.
    """
    d, h = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    k = _int(cfg, "head_dim", null=True) or d // h
    if isinstance(bias, str):  # a config key for q, k, v (Qwen2-MoE's `qkv_bias`); o has none
        bias = (bool(_get(cfg, bias)), False)
    qkv_bias, o_bias = bias or (bool(cfg.get("attention_bias", False)),) * 2
    norm = S.Norm("rmsnorm", _num(cfg, "rms_norm_eps"))
    n = _int(cfg, "num_hidden_layers")
    mlp = mlps(cfg, n) if mlps else [S.MLP(_int(cfg, "intermediate_size"), _act(cfg, "hidden_act", GATED_ACTS),
                                           bool(cfg.get("mlp_bias", False)))] * n
    resid, embd = (_num(cfg, dropout[0]), _num(cfg, dropout[1])) if dropout else (0.0, 0.0)
    rotary = _rotary(cfg, k)
    layers = tuple(
        S.Layer(S.Attention(h, _int(cfg, "num_key_value_heads", null=True) or h, k, k, bias=qkv_bias, out_bias=o_bias,
                            dropout=_num(cfg, "attention_dropout"), rotary_dim=rotary, window=w,
                            qk_norm=norm if qk_norm else None), m, norm, dropout=resid)
        for w, m in zip(window(cfg, n), mlp, strict=True))
    hd = _decoder_head(cfg, head, norm)
    return S.Spec(name, d, layers, hd, _int(cfg, "vocab_size"), _int(cfg, "max_position_embeddings", null=True),
                  S.Embed(positions=_rope(cfg), dropout=embd), _init(cfg))


def _mixtral_mlp(cfg: Config, n: int) -> list[S.MLP]:
    """Mixtral: every layer routes each token to `num_experts_per_tok` of `num_local_experts` (renormalised)."""
    act = _act(cfg, "hidden_act", GATED_ACTS)
    return [S.MLP(_int(cfg, "intermediate_size"), act, False, experts=_int(cfg, "num_local_experts"),
                  top_k=_int(cfg, "num_experts_per_tok"), normalize=True)] * n


def _qwen2_moe_mlp(cfg: Config, n: int) -> list[S.MLP]:
    """Qwen2-MoE: experts on layer i unless i is in `mlp_only_layers` or (i + 1) % `decoder_sparse_step` ≠ 0;
    a shared expert with a sigmoid gate beside them; gates renormalised only with `norm_topk_prob`."""
    act = _act(cfg, "hidden_act", GATED_ACTS)
    dense = S.MLP(_int(cfg, "intermediate_size"), act, False)
    e, step = _int(cfg, "num_experts", least=0), _int(cfg, "decoder_sparse_step")
    only = cfg.get("mlp_only_layers") or []
    shared = _int(cfg, "shared_expert_intermediate_size")
    moe = S.MLP(_int(cfg, "moe_intermediate_size"), act, False, experts=e, top_k=_int(cfg, "num_experts_per_tok"),
                normalize=bool(cfg.get("norm_topk_prob", False)), shared=shared, shared_gate=True)
    return [moe if e > 0 and i not in only and (i + 1) % step == 0 else dense for i in range(n)]


def _layer_types(cfg: Config, n: int, every: int) -> list[str]:
    """`layer_types`, else every `every`-th layer full attention and the others sliding (Gemma 2: 2, Gemma 3: 6)."""
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                       for i in range(n)]
    if len(types) != n or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise MptcError(f"config.json: `layer_types` must list full_attention or sliding_attention for each of the "
                        f"{n} layers, got {_json(types)}")
    return types


def _gemma_ropes(cfg: Config, types: list[str]) -> tuple[S.Positions, list[S.Positions | None]]:
    """Gemma 3's two ropes: the full layers' (the model's), and the sliding layers' own (`rope_local_base_freq`,
    or transformers 5's `rope_parameters.sliding_attention`)."""
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp, dict) and "full_attention" in rp:
        for k in ("full_attention", "sliding_attention"):
            if not isinstance(rp.get(k) or {}, dict):
                raise MptcError(f"config.json: `rope_parameters.{k}` must be an object, got {_json(rp[k])}")
        full, local = _rope(cfg, rp["full_attention"]), _rope(cfg, rp.get("sliding_attention") or {})
    else:
        full, local = _rope(cfg), S.Positions("rope", _num(cfg, "rope_local_base_freq", 10000.0))
    return full, [local if t == "sliding_attention" and local != full else None for t in types]


def _gemma_spec(cfg: Config, head: str, version: int) -> S.Spec:
    """Gemma (1), Gemma 2, Gemma 3 text: scaled embeddings, (1 + w) RMSNorms folded, GeGLU-tanh, tied head;
    from 2 on sandwich norms, alternating sliding windows, query_pre_attn_scalar, soft-capping; 3: q/k norms,
    a local rope on the sliding layers."""
    _refuse_if(cfg, "use_bidirectional_attention", bool, "mptc imports Gemma as a causal LM")
    d, h, n = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads"), _int(cfg, "num_hidden_layers")
    k = _int(cfg, "head_dim", null=True) or d // h
    norm = S.Norm("rmsnorm", _num(cfg, "rms_norm_eps"))
    act = _act(cfg, "hidden_activation" if cfg.get("hidden_activation") else "hidden_act", GATED_ACTS)
    mlp = S.MLP(_int(cfg, "intermediate_size"), act, False)
    bias = bool(cfg.get("attention_bias", False))
    types = _layer_types(cfg, n, 2 if version == 2 else 6) if version > 1 else ["full_attention"] * n
    full, ropes = _gemma_ropes(cfg, types) if version == 3 else (_rope(cfg), [None] * n)
    w = _int(cfg, "sliding_window", null=True) if version > 1 else None
    scale = _num(cfg, "query_pre_attn_scalar") ** -0.5 if version > 1 else None
    soft = _num(cfg, "attn_logit_softcapping") if version > 1 and cfg.get("attn_logit_softcapping") else None
    layers = tuple(S.Layer(S.Attention(
        h, _int(cfg, "num_key_value_heads", null=True) or h, k, k, bias=bias, out_bias=bias,
        dropout=_num(cfg, "attention_dropout"), rotary_dim=k, window=w if t == "sliding_attention" else None,
        qk_norm=norm if version == 3 else None, softcap=soft, scale=None if scale == k ** -0.5 else scale, rope=r),
        mlp, norm, "sandwich" if version > 1 else "pre") for t, r in zip(types, ropes, strict=True))
    cap = _num(cfg, "final_logit_softcapping") if version > 1 and cfg.get("final_logit_softcapping") else None
    hd = _decoder_head(cfg, head, norm, cap)
    return S.Spec(f"gemma{version if version > 1 else ''}", d, layers, hd, _int(cfg, "vocab_size"),
                  _int(cfg, "max_position_embeddings", null=True), S.Embed(positions=full, scale="sqrt_width"),
                  _init(cfg))


def _olmo2_spec(cfg: Config, head: str) -> S.Spec:
    """OLMo 2: RMSNorms on the sublayers' outputs (x + n(f(x))), q/k RMSNorms over the whole projection."""
    spec = _llama_spec(cfg, head, "olmo2", _no_window, qk_norm=True)
    return spec.replace(layers=tuple(replace(ly, placement="output", attention=replace(
        ly.attention, qk_norm_over="all")) for ly in spec.layers))


def _neox_spec(cfg: Config, head: str) -> S.Spec:
    """GPT-NeoX (Pythia): layernorm, partial rotary (`rotary_pct`), parallel residual, biases, plain MLP."""
    d, h = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    k = d // h
    norm = S.Norm("layernorm", _num(cfg, "layer_norm_eps"))
    params = _rope_params(cfg)
    if "partial_rotary_factor" not in params and "rotary_pct" in cfg:  # older configs
        cfg = cfg | {"partial_rotary_factor": cfg["rotary_pct"]}
    if "rope_theta" not in params and "rotary_emb_base" in cfg:
        cfg = cfg | {"rope_theta": cfg["rotary_emb_base"]}
    bias = bool(cfg.get("attention_bias", True))
    att = S.Attention(h, h, k, k, bias=bias, out_bias=bias, dropout=_num(cfg, "attention_dropout"),
                      rotary_dim=_rotary(cfg, k))
    mlp = S.MLP(_int(cfg, "intermediate_size"), _act(cfg, "hidden_act", PLAIN_ACTS))
    layer = S.Layer(att, mlp, norm, dropout=_num(cfg, "hidden_dropout"), parallel=bool(cfg.get("use_parallel_residual",
                                                                                             True)))
    hd = _decoder_head(cfg, head, norm)
    return S.Spec("gpt_neox", d, (layer,) * _int(cfg, "num_hidden_layers"), hd, _int(cfg, "vocab_size"),
                  _int(cfg, "max_position_embeddings", null=True), S.Embed(positions=_rope(cfg)), _init(cfg))


def _bert_spec(cfg: Config, head: str, name: str = "bert", offset: bool = False) -> S.Spec:
    """BERT, RoBERTa, XLM-R: learned positions, token types, embedding LayerNorm, post-norm, bidirectional.

    offset: RoBERTa numbers real tokens from `pad_token_id` + 1, so the table's first pad + 1 rows are never read
    by a real token; the import drops them, `context` is `max_position_embeddings` − pad − 1, and positions count
    only the real tokens (`learned(skip_padding = true)`), so left padding numbers them as transformers does.
    """
    _refuse_if(cfg, "position_embedding_type", lambda v: v != "absolute", "mptc has absolute (learned) positions only")
    for key in ("is_decoder", "add_cross_attention"):
        _refuse_if(cfg, key, bool, f"mptc imports {name} as a bidirectional encoder")
    d, h = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    norm = S.Norm("layernorm", _num(cfg, "layer_norm_eps"))
    act = _act(cfg, "hidden_act", PLAIN_ACTS)
    drop = _num(cfg, "hidden_dropout_prob")
    att = S.Attention(h, h, d // h, d // h, "bidirectional", dropout=_num(cfg, "attention_probs_dropout_prob"))
    layer = S.Layer(att, S.MLP(_int(cfg, "intermediate_size"), act), norm, "post", drop)
    heads = {"mlm": S.Head("lm", tied=bool(_get(cfg, "tie_word_embeddings")), bias=True,
                           transform=S.Transform(act, norm)),
             "classify": S.Head("classify", bias=True, classes=_num_labels(cfg), pool="first", pooler=True),
             "token": S.Head("classify", bias=True, classes=_num_labels(cfg), pool="none"),
             "span": S.Head("span", bias=True), "none": S.Head("none")}
    _span_labels(cfg, head)
    embed = S.Embed(positions=S.Positions("learned", skip_padding=offset), dropout=drop, norm=norm,
                    segments=_int(cfg, "type_vocab_size", 0))
    context = _int(cfg, "max_position_embeddings")
    if offset:
        pad = _int(cfg, "pad_token_id", least=0)
        if context <= pad + 1:
            raise MptcError(f"config.json: `max_position_embeddings` = {context} leaves no position after the "
                            f"padding offset `pad_token_id` + 1 = {pad + 1}")
        context -= pad + 1
    return S.Spec(name, d, (layer,) * _int(cfg, "num_hidden_layers"), heads[head], _int(cfg, "vocab_size"),
                  context, embed, _init(cfg))


def _distilbert_spec(cfg: Config, head: str) -> S.Spec:
    """DistilBERT: BERT without token types or pooler; its LayerNorms have eps 1e-12 (fixed, not in the config)."""
    d, h = _int(cfg, "dim"), _int(cfg, "n_heads")
    norm = S.Norm("layernorm", 1e-12)
    act = _act(cfg, "activation", PLAIN_ACTS)
    drop = _num(cfg, "dropout")
    att = S.Attention(h, h, d // h, d // h, "bidirectional", dropout=_num(cfg, "attention_dropout"))
    layer = S.Layer(att, S.MLP(_int(cfg, "hidden_dim"), act), norm, "post", drop)
    hd = {"mlm": S.Head("lm", tied=bool(_get(cfg, "tie_word_embeddings")), bias=True, transform=S.Transform(act, norm)),
          "token": S.Head("classify", bias=True, classes=_num_labels(cfg), pool="none"),
          "span": S.Head("span", bias=True), "none": S.Head("none")}[head]
    _span_labels(cfg, head)
    return S.Spec("distilbert", d, (layer,) * _int(cfg, "n_layers"), hd, _int(cfg, "vocab_size"),
                  _int(cfg, "max_position_embeddings"), S.Embed(dropout=drop, norm=norm), _init(cfg))


def _square(cfg: Config, key: str) -> int:
    v = _get(cfg, key)
    if isinstance(v, (list, tuple)) and v:
        if len(set(v)) != 1:
            raise MptcError(f"unsupported {key} = {list(v)}: mptc images and patches are square")
        v = v[0]
    return _int({key: v}, key)


def _vit_spec(cfg: Config, head: str, name: str = "vit") -> S.Spec:
    """ViT, and DeiT (a distillation token after the class token; DeiTForImageClassification reads the class
    token only)."""
    d, h = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    norm = S.Norm("layernorm", _num(cfg, "layer_norm_eps"))
    drop = _num(cfg, "hidden_dropout_prob")
    att = S.Attention(h, h, d // h, d // h, "bidirectional", bias=bool(_get(cfg, "qkv_bias")), out_bias=True,
                      dropout=_num(cfg, "attention_probs_dropout_prob"))
    layer = S.Layer(att, S.MLP(_int(cfg, "intermediate_size"), _act(cfg, "hidden_act", PLAIN_ACTS)), norm, "pre", drop)
    patches = S.Patches(_square(cfg, "image_size"), _square(cfg, "patch_size"), _int(cfg, "num_channels"),
                        distill=name == "deit")
    hd = S.Head("classify", norm, bias=True, classes=_num_labels(cfg)) if head == "classify" else S.Head("none", norm)
    return S.Spec(name, d, (layer,) * _int(cfg, "num_hidden_layers"), hd,
                  embed=S.Embed(patches, S.Positions("learned"), drop), init=_init(cfg))


# --- families -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family: config reader, weight table, the architectures (task classes) it knows."""

    name: str
    prefix: str  # the base model's attribute in the task classes; checkpoints of the bare base model lack it
    heads: dict[str, str]  # architecture → head kind; the first is the default
    spec: Callable[[Config, str], S.Spec]
    weights: dict[str, Map]
    defaults: Config  # the config class's defaults, for keys a config.json leaves out
    layers_key: str = "num_hidden_layers"  # the config field that counts layers, for messages
    extras: tuple[str, ...] = ()  # checkpoint tensors the model does not use, and transformers does not either
    tied: tuple[str, ...] = ()  # copies of a tensor the model reads elsewhere: allowed when the head is tied


_DECODER = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, hidden_act="silu", rms_norm_eps=1e-6,
                tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.02)
_ENCODER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02)

GPT2_EXTRAS = ("transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias")  # causal-mask buffers
LLAMA_EXTRAS = ("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq",  # rope frequency buffers
                "model.layers.{i}.self_attn.rotary_emb.inv_freq")
BERT_EXTRAS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids",  # index buffers
               "bert.pooler.dense.weight", "bert.pooler.dense.bias",  # the pooler, for heads that do not pool
               "cls.seq_relationship.weight", "cls.seq_relationship.bias",  # the next-sentence head of pretraining
               "cls.predictions.bias")  # untied, transformers 5 keeps it beside `decoder.bias` and does not use it

ROBERTA_EXTRAS = ("roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids",  # index buffers
                  "roberta.pooler.dense.weight", "roberta.pooler.dense.bias",  # RobertaModel's pooler
                  "lm_head.bias")  # untied, kept beside `decoder.bias` and not used
_ROBERTA = _ENCODER | dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                           type_vocab_size=2, pad_token_id=1, tie_word_embeddings=True)

_GEMMA = _DECODER | dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_act="gelu_pytorch_tanh",
                         max_position_embeddings=8192, tie_word_embeddings=True, attention_bias=False)

FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT-2", "transformer.", {"GPT2LMHeadModel": "lm", "GPT2Model": "none"}, _gpt2_spec,
                   GPT2_WEIGHTS, dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                      activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                      layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True),
                   "n_layer", GPT2_EXTRAS, ("lm_head.weight",)),
    "llama": Family("Llama", "model.", {"LlamaForCausalLM": "lm", "LlamaModel": "none", **_tasks("Llama")},
                    partial(_llama_spec, name="llama", window=_no_window), LLAMA_WEIGHTS,
                    _DECODER | dict(vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048),
                    extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "mistral": Family("Mistral", "model.", {"MistralForCausalLM": "lm", "MistralModel": "none", **_tasks("Mistral")},
                      partial(_llama_spec, name="mistral", window=_mistral_window, bias=(False, False)), LLAMA_WEIGHTS,
                      _DECODER | dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                                      max_position_embeddings=131072, sliding_window=4096),
                      extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "qwen2": Family("Qwen2", "model.", {"Qwen2ForCausalLM": "lm", "Qwen2Model": "none", **_tasks("Qwen2")},
                    partial(_llama_spec, name="qwen2", window=_qwen2_window, bias=(True, False)), LLAMA_WEIGHTS,
                    _DECODER | dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                                    use_sliding_window=False, sliding_window=4096, max_window_layers=28),
                    extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "qwen3": Family("Qwen3", "model.", {"Qwen3ForCausalLM": "lm", "Qwen3Model": "none", **_tasks("Qwen3")},
                    partial(_llama_spec, name="qwen3", window=_qwen2_window, qk_norm=True), QWEN3_WEIGHTS,
                    _DECODER | dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                                    num_key_value_heads=32, head_dim=128, use_sliding_window=False,
                                    sliding_window=4096, max_window_layers=28, attention_bias=False),
                    extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "phi3": Family("Phi-3", "model.", {"Phi3ForCausalLM": "lm", "Phi3Model": "none", **_tasks("Phi3", qa=False)},
                   partial(_llama_spec, name="phi3", window=_phi3_window, bias=(False, False),
                           dropout=("resid_pdrop", "embd_pdrop")), PHI3_WEIGHTS,
                   _DECODER | dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, rms_norm_eps=1e-5,
                                   max_position_embeddings=4096, original_max_position_embeddings=4096,
                                   sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0),
                   extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "mixtral": Family("Mixtral", "model.", {"MixtralForCausalLM": "lm", "MixtralModel": "none", **_tasks("Mixtral")},
                      partial(_llama_spec, name="mixtral", window=_mistral_window, bias=(False, False),
                              mlps=_mixtral_mlp), MIXTRAL_WEIGHTS,
                      _DECODER | dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                                      max_position_embeddings=131072, sliding_window=None, num_local_experts=8,
                                      num_experts_per_tok=2, rms_norm_eps=1e-5),
                      extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "qwen2_moe": Family("Qwen2-MoE", "model.", {"Qwen2MoeForCausalLM": "lm", "Qwen2MoeModel": "none",
                                                  **_tasks("Qwen2Moe")},
                        partial(_llama_spec, name="qwen2_moe", window=_qwen2_window, bias="qkv_bias",
                                mlps=_qwen2_moe_mlp),
                        QWEN2_MOE_WEIGHTS,
                        _DECODER | dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                        max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                                        max_window_layers=28, decoder_sparse_step=1, moe_intermediate_size=1408,
                                        shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
                                        norm_topk_prob=False, mlp_only_layers=[], qkv_bias=True),
                        extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "gemma": Family("Gemma", "model.", {"GemmaForCausalLM": "lm", "GemmaModel": "none", **_tasks("Gemma", qa=False)},
                    partial(_gemma_spec, version=1), GEMMA_WEIGHTS, _GEMMA | dict(hidden_size=3072,
                                                                                  intermediate_size=24576,
                                                                                  num_hidden_layers=28,
                                                                                  num_attention_heads=16,
                                                                                  num_key_value_heads=16),
                    extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "gemma2": Family("Gemma 2", "model.", {"Gemma2ForCausalLM": "lm", "Gemma2Model": "none",
                                           **_tasks("Gemma2", qa=False)},
                     partial(_gemma_spec, version=2), GEMMA2_WEIGHTS,
                     _GEMMA | dict(query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                                   attn_logit_softcapping=50.0),
                     extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "gemma3_text": Family("Gemma 3", "model.", {"Gemma3ForCausalLM": "lm", "Gemma3TextModel": "none",
                                                "Gemma3TextForSequenceClassification": "classify"},
                          partial(_gemma_spec, version=3), GEMMA3_WEIGHTS,
                          _GEMMA | dict(vocab_size=262208, max_position_embeddings=131072, query_pre_attn_scalar=256,
                                        sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                                        final_logit_softcapping=None, attn_logit_softcapping=None),
                          extras=LLAMA_EXTRAS + ("model.rotary_emb_local.inv_freq",), tied=("lm_head.weight",)),
    "olmo2": Family("OLMo 2", "model.", {"Olmo2ForCausalLM": "lm", "Olmo2Model": "none",
                                              "Olmo2ForSequenceClassification": "classify"}, _olmo2_spec,
                    OLMO2_WEIGHTS, _DECODER | dict(vocab_size=50304, intermediate_size=11008,
                                                   max_position_embeddings=2048, rms_norm_eps=1e-5,
                                                   attention_bias=False),
                    extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "gpt_neox": Family("GPT-NeoX", "gpt_neox.", {"GPTNeoXForCausalLM": "lm", "GPTNeoXModel": "none",
                                                        **_tasks("GPTNeoX")}, _neox_spec,
                       NEOX_WEIGHTS, dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44,
                                          num_attention_heads=64, intermediate_size=24576, hidden_act="gelu",
                                          attention_dropout=0.0, hidden_dropout=0.0, max_position_embeddings=2048,
                                          initializer_range=0.02, layer_norm_eps=1e-5, tie_word_embeddings=False,
                                          use_parallel_residual=True, partial_rotary_factor=0.25,
                                          attention_bias=True),
                       extras=("gpt_neox.rotary_emb.inv_freq", "gpt_neox.layers.{i}.attention.rotary_emb.inv_freq",
                               "gpt_neox.layers.{i}.attention.bias", "gpt_neox.layers.{i}.attention.masked_bias"),
                       tied=("embed_out.weight", "lm_head.weight")),
    "bert": Family("BERT", "bert.", {"BertForMaskedLM": "mlm", "BertForSequenceClassification": "classify",
                                     "BertForTokenClassification": "token", "BertForQuestionAnswering": "span",
                                     "BertModel": "none"}, _bert_spec, BERT_WEIGHTS,
                   _ENCODER | dict(vocab_size=30522, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                   max_position_embeddings=512, type_vocab_size=2, tie_word_embeddings=True),
                   extras=BERT_EXTRAS, tied=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")),
    "roberta": Family("RoBERTa", "roberta.", {"RobertaForMaskedLM": "mlm",
                                              "RobertaForSequenceClassification": "classify", "RobertaModel": "none",
                                              "RobertaForTokenClassification": "token",
                                              "RobertaForQuestionAnswering": "span"},
                      partial(_bert_spec, name="roberta", offset=True), ROBERTA_WEIGHTS,
                      _ROBERTA | dict(vocab_size=50265),
                      extras=ROBERTA_EXTRAS, tied=("lm_head.decoder.weight", "lm_head.decoder.bias")),
    "xlm-roberta": Family("XLM-R", "roberta.", {"XLMRobertaForMaskedLM": "mlm",
                                                "XLMRobertaForSequenceClassification": "classify",
                                                "XLMRobertaModel": "none", "XLMRobertaForTokenClassification": "token",
                                                "XLMRobertaForQuestionAnswering": "span"},
                          partial(_bert_spec, name="xlm_roberta", offset=True), ROBERTA_WEIGHTS,
                          _ROBERTA | dict(vocab_size=30522), extras=ROBERTA_EXTRAS,
                          tied=("lm_head.decoder.weight", "lm_head.decoder.bias")),
    "distilbert": Family("DistilBERT", "distilbert.", {"DistilBertForMaskedLM": "mlm", "DistilBertModel": "none",
                                                            "DistilBertForTokenClassification": "token",
                                                            "DistilBertForQuestionAnswering": "span"},
                         _distilbert_spec, DISTILBERT_WEIGHTS,
                         dict(vocab_size=30522, max_position_embeddings=512, n_layers=6, n_heads=12, dim=768,
                              hidden_dim=3072, dropout=0.1, attention_dropout=0.1, activation="gelu",
                              initializer_range=0.02, tie_word_embeddings=True),
                         "n_layers", extras=("distilbert.embeddings.position_ids",), tied=("vocab_projector.weight",)),
    "vit": Family("ViT", "vit.", {"ViTForImageClassification": "classify", "ViTModel": "none"}, _vit_spec,
                  VIT_WEIGHTS, _ENCODER | dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                               image_size=224, patch_size=16, num_channels=3, qkv_bias=True),
                  extras=("vit.pooler.dense.weight", "vit.pooler.dense.bias")),  # ViTModel's pooler
    "deit": Family("DeiT", "deit.", {"DeiTForImageClassification": "classify", "DeiTModel": "none"},
                   partial(_vit_spec, name="deit"), DEIT_WEIGHTS,
                   _ENCODER | dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, image_size=224,
                                   patch_size=16, num_channels=3, qkv_bias=True),
                   extras=("deit.pooler.dense.weight", "deit.pooler.dense.bias")),
}


REFUSED: dict[str, str] = {  # model types mptc knows and does not import, and why
    "gemma3": "this is Gemma 3's multimodal model (a vision tower beside the text model); mptc imports the text "
              "model, model_type gemma3_text (Gemma3ForCausalLM)",
}


def _family(cfg: Config) -> Family:
    if "model_type" not in cfg:
        raise MptcError("config.json has no `model_type`", hint=f"mptc imports: {', '.join(FAMILIES)}")
    mt = cfg["model_type"]
    if mt in REFUSED:
        raise MptcError(f"unsupported model_type '{mt}': {REFUSED[mt]}", hint=f"mptc imports: {', '.join(FAMILIES)}")
    if mt not in FAMILIES:
        raise MptcError(f"unsupported model_type '{mt}'", hint=f"mptc imports: {', '.join(FAMILIES)}")
    return FAMILIES[mt]


def _head_kind(fam: Family, arch: str | None) -> str:
    if arch is None:
        return next(iter(fam.heads.values()))
    if arch not in fam.heads:
        raise MptcError(f"unsupported architecture '{arch}' for {fam.name}", hint=f"supported: {', '.join(fam.heads)}")
    return fam.heads[arch]


def spec_from_config(cfg: Config, arch: str | None = None) -> S.Spec:
    """The Spec of a Hugging Face config (a config.json dict). `arch` picks the head, else `architectures`."""
    fam = _family(cfg)
    if arch is None:
        arch = (cfg.get("architectures") or [None])[0]
    spec = fam.spec(fam.defaults | cfg, _head_kind(fam, arch))
    return parse(format_spec(spec), f"<{cfg.get('model_type')} config>")  # the schema's checks, canonical form


def _template(name: str) -> tuple[str, int | None]:
    """`layers.3.attn.q.weight` → (`layers.{i}.attn.q.weight`, 3)."""
    m = re.match(r"layers\.(\d+)\.", name)
    return (f"layers.{{i}}.{name[m.end():]}", int(m.group(1))) if m else (name, None)


def _at(hf: str, i: int | None) -> str:
    """A checkpoint name at layer i (`{e}`, the expert, stays)."""
    return hf if i is None else hf.replace("{i}", str(i))


def _hf_names(fam: Family, name: str, m: Map | None = None) -> tuple[str, ...]:
    """The checkpoint names (the first, then alternatives) of one mptc tensor (in layout `m`, else the table's)."""
    tmpl, i = _template(name)
    return tuple(_at(h, i) for h in (m or fam.weights[tmpl]).hf)

