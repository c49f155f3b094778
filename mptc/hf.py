"""Hugging Face interop: import GPT-2, Llama, Mistral, Qwen2, BERT and ViT checkpoints; export GPT-2 and Llama.

    mptc.hf.import_hf("hf/llama", "out/llama")        # config.json + weights → model dir (no transformers needed)
    model = mptc.from_hf("hf/llama")                   # or a transformers model object
    mptc.hf.export_hf(model, "hf/llama-grown")        # config.json + model.safetensors for AutoModelForCausalLM

Each family is a row of `FAMILIES`: a reader from config.json to a Spec, and a table from mptc parameter
names to checkpoint tensors (`Map`), used in both directions. Weights are read one tensor at a time
(`safetensors.safe_open`, or a memory-mapped `torch.load`), so importing holds about one copy of the model.
`transformers` is never imported here: config.json is JSON, and the weights are safetensors or torch files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, fx

from . import spec as S
from .atomic import atomic_dir
from .errors import MptcError
from .files import SPEC_FILE, WEIGHTS_FILE
from .graph import param_info, spec_of
from .lower import NodeInfo, Role, lower
from .model import build, load_model
from .schema import parse
from .spec import format_spec

Config = dict[str, Any]

# --- checkpoint tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Map:
    """Where one mptc tensor lives in a checkpoint (`{i}` = layer), and how its layout differs."""

    hf: tuple[str, ...]  # key, then alternative spellings (transformers 5 renames some modules in memory)
    conv1d: bool = False  # GPT-2's Conv1D stores (in, out): transpose to nn.Linear's (out, in)
    part: int | None = None  # one of `parts` equal row blocks of a fused tensor (GPT-2 c_attn = [q; k; v])
    parts: int = 3
    flat: bool = False  # reshape to the mptc shape (ViT: cls (1, 1, D), positions (1, P, D), kernel (D, C, p, p))


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
    "head.out.weight": _one("lm_head.weight"),
}

_BL = "bert.encoder.layer.{i}"
BERT_WEIGHTS: dict[str, Map] = {
    "embed.tokens.weight": _one("bert.embeddings.word_embeddings.weight"),
    "embed.positions.weight": _one("bert.embeddings.position_embeddings.weight"),
    "embed.segments.weight": _one("bert.embeddings.token_type_embeddings.weight"),
    **_wb("embed.norm", "bert.embeddings.LayerNorm"),
    **_wb("layers.{i}.attn.q", f"{_BL}.attention.self.query"),
    **_wb("layers.{i}.attn.k", f"{_BL}.attention.self.key"),
    **_wb("layers.{i}.attn.v", f"{_BL}.attention.self.value"),
    **_wb("layers.{i}.attn.o", f"{_BL}.attention.output.dense"),
    **_wb("layers.{i}.attn_norm", f"{_BL}.attention.output.LayerNorm"),  # post-norm: after the attention residual
    **_wb("layers.{i}.mlp.up", f"{_BL}.intermediate.dense"),
    **_wb("layers.{i}.mlp.down", f"{_BL}.output.dense"),
    **_wb("layers.{i}.mlp_norm", f"{_BL}.output.LayerNorm"),
    **_wb("head.transform", "cls.predictions.transform.dense"),  # BertForMaskedLM
    **_wb("head.transform_norm", "cls.predictions.transform.LayerNorm"),
    "head.bias": _one(("cls.predictions.bias", "cls.predictions.decoder.bias")),  # tied: the decoder reuses `bias`
    "head.out.weight": _one(("classifier.weight", "cls.predictions.decoder.weight")),  # classifier, or untied
    # untied: transformers 5 uses `decoder.bias` (and stores an unused `bias` too); older checkpoints hold one `bias`
    "head.out.bias": _one(("classifier.bias", "cls.predictions.decoder.bias", "cls.predictions.bias")),
    **_wb("head.pooler", "bert.pooler.dense"),  # BertForSequenceClassification
}

_VL, _VL5 = "vit.encoder.layer.{i}", "vit.layers.{i}"  # on disk; in memory in transformers 5
VIT_WEIGHTS: dict[str, Map] = {
    "embed.patch.weight": _one("vit.embeddings.patch_embeddings.projection.weight", flat=True),  # (D, C, p, p)
    "embed.patch.bias": _one("vit.embeddings.patch_embeddings.projection.bias"),
    "embed.cls": _one("vit.embeddings.cls_token", flat=True),  # (1, 1, D)
    "embed.positions.weight": _one("vit.embeddings.position_embeddings", flat=True),  # (1, N + 1, D)
    **_wb("layers.{i}.attn_norm", (f"{_VL}.layernorm_before", f"{_VL5}.layernorm_before")),
    **_wb("layers.{i}.attn.q", (f"{_VL}.attention.attention.query", f"{_VL5}.attention.q_proj")),
    **_wb("layers.{i}.attn.k", (f"{_VL}.attention.attention.key", f"{_VL5}.attention.k_proj")),
    **_wb("layers.{i}.attn.v", (f"{_VL}.attention.attention.value", f"{_VL5}.attention.v_proj")),
    **_wb("layers.{i}.attn.o", (f"{_VL}.attention.output.dense", f"{_VL5}.attention.o_proj")),
    **_wb("layers.{i}.mlp_norm", (f"{_VL}.layernorm_after", f"{_VL5}.layernorm_after")),
    **_wb("layers.{i}.mlp.up", (f"{_VL}.intermediate.dense", f"{_VL5}.mlp.fc1")),
    **_wb("layers.{i}.mlp.down", (f"{_VL}.output.dense", f"{_VL5}.mlp.fc2")),
    **_wb("head.norm", "vit.layernorm"),
    **_wb("head.out", "classifier"),
}

# --- config.json → Spec -------------------------------------------------------------------------------

_MISSING = object()
PLAIN_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
              "silu": "silu", "swish": "silu"}
GATED_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


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


def _rope_theta(cfg: Config) -> float:
    """The rope base; any rope scaling (linear, dynamic, yarn, llama3, …) is refused."""
    for key in ("rope_scaling", "rope_parameters"):  # the older and the transformers 5 spelling
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict):
            raise MptcError(f"config.json: `{key}` must be an object, got {_json(rope)}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise MptcError(f"unsupported rope_scaling type '{kind}' (in `{key}`)",
                            hint="mptc has plain rope only: a theta, no scaling (linear, dynamic, yarn, llama3, …)")
    params = cfg.get("rope_parameters") or {}
    return _num(params, "rope_theta") if "rope_theta" in params else _num(cfg, "rope_theta", 10000.0)


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
    hd = S.Head("lm", norm, tied=bool(_get(cfg, "tie_word_embeddings"))) if head == "lm" else S.Head("none", norm)
    return S.Spec("gpt2", d, (layer,) * _int(cfg, "n_layer"), hd, _int(cfg, "vocab_size"), _int(cfg, "n_positions"),
                  S.Embed(dropout=_num(cfg, "embd_pdrop")), _init(cfg))


def _no_window(cfg: Config, n: int) -> list[int | None]:
    return [None] * n


def _mistral_window(cfg: Config, n: int) -> list[int | None]:
    return [_int(cfg, "sliding_window", null=True)] * n  # null: none


def _qwen2_window(cfg: Config, n: int) -> list[int | None]:
    """Only with use_sliding_window, on the layers `layer_types` marks (else from `max_window_layers` on)."""
    w = _int(cfg, "sliding_window", null=True)
    if not cfg.get("use_sliding_window") or w is None:
        return [None] * n
    types = cfg.get("layer_types") or ["sliding_attention" if i >= _int(cfg, "max_window_layers", 0) else
                                       "full_attention" for i in range(n)]
    return [w if t == "sliding_attention" else None for t in types]


def _llama_spec(cfg: Config, head: str, name: str, window: Callable[[Config, int], list[int | None]],
                bias: tuple[bool, bool] | None = None) -> S.Spec:
    """Llama, Mistral, Qwen2: rope, RMSNorm, grouped-query attention, gated MLP.

    bias: (q/k/v, o) where the family fixes it (Mistral none, Qwen2 q/k/v only), else `attention_bias` for all four.
    """
    d, h = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    k = _int(cfg, "head_dim", null=True) or d // h
    theta = _rope_theta(cfg)
    qkv_bias, o_bias = bias or (bool(cfg.get("attention_bias", False)),) * 2
    norm = S.Norm("rmsnorm", _num(cfg, "rms_norm_eps"))
    mlp = S.MLP(_int(cfg, "intermediate_size"), _act(cfg, "hidden_act", GATED_ACTS), bool(cfg.get("mlp_bias", False)))
    layers = tuple(
        S.Layer(S.Attention(h, _int(cfg, "num_key_value_heads", null=True) or h, k, k, bias=qkv_bias, out_bias=o_bias,
                            dropout=_num(cfg, "attention_dropout"), rotary_dim=k, window=w), mlp, norm)
        for w in window(cfg, _int(cfg, "num_hidden_layers")))
    hd = S.Head("lm", norm, tied=bool(_get(cfg, "tie_word_embeddings"))) if head == "lm" else S.Head("none", norm)
    return S.Spec(name, d, layers, hd, _int(cfg, "vocab_size"), _int(cfg, "max_position_embeddings", null=True),
                  S.Embed(positions=S.Positions("rope", theta)), _init(cfg))


def _bert_spec(cfg: Config, head: str) -> S.Spec:
    _refuse_if(cfg, "position_embedding_type", lambda v: v != "absolute", "mptc has absolute (learned) positions only")
    for key in ("is_decoder", "add_cross_attention"):
        _refuse_if(cfg, key, bool, "mptc imports BERT as a bidirectional encoder")
    d, h = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    norm = S.Norm("layernorm", _num(cfg, "layer_norm_eps"))
    act = _act(cfg, "hidden_act", PLAIN_ACTS)
    drop = _num(cfg, "hidden_dropout_prob")
    att = S.Attention(h, h, d // h, d // h, "bidirectional", dropout=_num(cfg, "attention_probs_dropout_prob"))
    layer = S.Layer(att, S.MLP(_int(cfg, "intermediate_size"), act), norm, "post", drop)
    heads = {"mlm": S.Head("lm", tied=bool(_get(cfg, "tie_word_embeddings")), bias=True,
                           transform=S.Transform(act, norm)),
             "classify": S.Head("classify", bias=True, classes=_num_labels(cfg), pool="first", pooler=True),
             "none": S.Head("none")}
    embed = S.Embed(positions=S.Positions("learned"), dropout=drop, norm=norm, segments=_int(cfg, "type_vocab_size", 0))
    return S.Spec("bert", d, (layer,) * _int(cfg, "num_hidden_layers"), heads[head], _int(cfg, "vocab_size"),
                  _int(cfg, "max_position_embeddings"), embed, _init(cfg))


def _square(cfg: Config, key: str) -> int:
    v = _get(cfg, key)
    if isinstance(v, (list, tuple)) and v:
        if len(set(v)) != 1:
            raise MptcError(f"unsupported {key} = {list(v)}: mptc images and patches are square")
        v = v[0]
    return _int({key: v}, key)


def _vit_spec(cfg: Config, head: str) -> S.Spec:
    d, h = _int(cfg, "hidden_size"), _int(cfg, "num_attention_heads")
    norm = S.Norm("layernorm", _num(cfg, "layer_norm_eps"))
    drop = _num(cfg, "hidden_dropout_prob")
    att = S.Attention(h, h, d // h, d // h, "bidirectional", bias=bool(_get(cfg, "qkv_bias")), out_bias=True,
                      dropout=_num(cfg, "attention_probs_dropout_prob"))
    layer = S.Layer(att, S.MLP(_int(cfg, "intermediate_size"), _act(cfg, "hidden_act", PLAIN_ACTS)), norm, "pre", drop)
    patches = S.Patches(_square(cfg, "image_size"), _square(cfg, "patch_size"), _int(cfg, "num_channels"))
    hd = S.Head("classify", norm, bias=True, classes=_num_labels(cfg)) if head == "classify" else S.Head("none", norm)
    return S.Spec("vit", d, (layer,) * _int(cfg, "num_hidden_layers"), hd,
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

FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT-2", "transformer.", {"GPT2LMHeadModel": "lm", "GPT2Model": "none"}, _gpt2_spec,
                   GPT2_WEIGHTS, dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                      activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                      layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True),
                   "n_layer", GPT2_EXTRAS, ("lm_head.weight",)),
    "llama": Family("Llama", "model.", {"LlamaForCausalLM": "lm", "LlamaModel": "none"},
                    partial(_llama_spec, name="llama", window=_no_window), LLAMA_WEIGHTS,
                    _DECODER | dict(vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048),
                    extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "mistral": Family("Mistral", "model.", {"MistralForCausalLM": "lm", "MistralModel": "none"},
                      partial(_llama_spec, name="mistral", window=_mistral_window, bias=(False, False)), LLAMA_WEIGHTS,
                      _DECODER | dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                                      max_position_embeddings=131072, sliding_window=4096),
                      extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "qwen2": Family("Qwen2", "model.", {"Qwen2ForCausalLM": "lm", "Qwen2Model": "none"},
                    partial(_llama_spec, name="qwen2", window=_qwen2_window, bias=(True, False)), LLAMA_WEIGHTS,
                    _DECODER | dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                                    use_sliding_window=False, sliding_window=4096, max_window_layers=28),
                    extras=LLAMA_EXTRAS, tied=("lm_head.weight",)),
    "bert": Family("BERT", "bert.", {"BertForMaskedLM": "mlm", "BertForSequenceClassification": "classify",
                                     "BertModel": "none"}, _bert_spec, BERT_WEIGHTS,
                   _ENCODER | dict(vocab_size=30522, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                   max_position_embeddings=512, type_vocab_size=2, tie_word_embeddings=True),
                   extras=BERT_EXTRAS, tied=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")),
    "vit": Family("ViT", "vit.", {"ViTForImageClassification": "classify", "ViTModel": "none"}, _vit_spec,
                  VIT_WEIGHTS, _ENCODER | dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                               image_size=224, patch_size=16, num_channels=3, qkv_bias=True),
                  extras=("vit.pooler.dense.weight", "vit.pooler.dense.bias")),  # ViTModel's pooler
}


def _family(cfg: Config) -> Family:
    if "model_type" not in cfg:
        raise MptcError("config.json has no `model_type`", hint=f"mptc imports: {', '.join(FAMILIES)}")
    mt = cfg["model_type"]
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


# --- reading checkpoints --------------------------------------------------------------------------------


class Checkpoint:
    """The tensors of a checkpoint by name, read one at a time; it remembers which were read."""

    def __init__(self, keys: set[str], read: Callable[[str], Tensor], where: str):
        self.keys, self._read, self.where = keys, read, where
        self.used: set[str] = set()

    def find(self, names: tuple[str, ...], prefix: str) -> str | None:
        """The stored spelling of a tensor: as named, without the base-model prefix, or with old gamma/beta."""
        for name in names:
            bare = name.removeprefix(prefix)
            for n in (name, bare):
                for old, new in (("", ""), (".weight", ".gamma"), (".bias", ".beta")):
                    cand = n[: -len(old)] + new if old and n.endswith(old) else n
                    if cand in self.keys:
                        return cand
        return None

    def get(self, key: str) -> Tensor:
        self.used.add(key)
        return self._read(key)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DAMAGED = "the file is damaged or incomplete (an interrupted download?): fetch it again"


def _shard_map(index: Path) -> dict[str, Path]:
    """The shard of each tensor from an index's `weight_map`; every shard must lie inside the checkpoint dir."""
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MptcError(f"{index} is not valid JSON: {e}", hint=DAMAGED) from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict):
        raise MptcError(f"{index} has no `weight_map`", hint="a shard index maps each tensor name to its file")
    root, files, seen = index.parent, {}, set()
    for key, name in wm.items():
        entry = f"{index}: weight_map['{key}'] = {_json(name)}"
        if not isinstance(name, str) or not name:
            raise MptcError(f"{entry} is not a file name")
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
            why = "an absolute path" if os.path.isabs(name) else "a path that leaves the directory"
            raise MptcError(f"{entry} names a file outside the checkpoint dir {root} ({why})",
                            hint="shard paths must be relative and stay inside the checkpoint dir")
        if name not in seen and not (root / name).is_file():
            raise MptcError(f"{entry}: no such file in {root}", hint="the checkpoint is missing a shard")
        seen.add(name)
        files[key] = root / name
    return files


def _open_file(p: Path, stack: ExitStack) -> Any:
    """A safetensors file, or a torch pickle of tensors (memory-mapped when it is a zip, else read whole)."""
    if p.suffix == ".safetensors":
        try:
            return stack.enter_context(safe_open(str(p), framework="pt"))
        except (SafetensorError, OSError) as e:
            raise MptcError(f"cannot read {p}: {e}", hint=DAMAGED) from None
    try:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the old (tar) format cannot be memory-mapped
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load of a damaged file raises many kinds (OSError, KeyError, …)
        raise MptcError(f"cannot read {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint=DAMAGED + "; pickles of whole models are refused (tensors only)") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise MptcError(f"cannot read {p}: not a state dict (tensor names → tensors)")
    return state


@contextmanager
def open_checkpoint(d: Path) -> Iterator[Checkpoint]:
    """A Hugging Face weights dir: model.safetensors, sharded safetensors, or pytorch_model.bin (sharded or not)."""
    found = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if found is None:
        raise MptcError(f"no weights file in {d}", hint=f"expected one of: {', '.join(WEIGHT_FILES)}")
    files = _shard_map(found) if found.name.endswith(".index.json") else None
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(p: Path):
            if p not in handles:
                handles[p] = _open_file(p, stack)
            return handles[p]

        if files is None:
            files = dict.fromkeys(handle(found).keys(), found)
        else:  # a tensor a shard holds but the index leaves out is part of the checkpoint too
            for p in sorted(set(files.values())):
                for k in handle(p).keys():
                    files.setdefault(k, p)

        def read(k: str) -> Tensor:
            h = handle(files[k])
            if files[k].suffix != ".safetensors":
                return h[k].clone()
            try:
                return h.get_tensor(k)
            except SafetensorError as e:  # an index naming a tensor its shard lacks, or a damaged shard
                raise MptcError(f"cannot read '{k}' from {files[k]}: {e}", hint=DAMAGED) from None

        yield Checkpoint(set(files), read, str(found))


def _checkpoint_of_state(state: dict[str, Tensor], where: str) -> Checkpoint:
    return Checkpoint(set(state), lambda k: state[k].detach().clone(), where)


def _template(name: str) -> tuple[str, int | None]:
    """`layers.3.attn.q.weight` → (`layers.{i}.attn.q.weight`, 3)."""
    m = re.match(r"layers\.(\d+)\.", name)
    return (f"layers.{{i}}.{name[m.end():]}", int(m.group(1))) if m else (name, None)


def _hf_names(fam: Family, name: str) -> tuple[str, ...]:
    """The checkpoint names (the first, then alternatives) of one mptc tensor."""
    tmpl, i = _template(name)
    return tuple(h.format(i=i) for h in fam.weights[tmpl].hf)


def _fetch(ck: Checkpoint, fam: Family, name: str, shape: tuple[int, ...]) -> Tensor | None:
    """One mptc tensor in mptc layout, or None when the checkpoint lacks it."""
    m = fam.weights[_template(name)[0]]
    key = ck.find(_hf_names(fam, name), fam.prefix)
    if key is None:
        return None
    t = ck.get(key)
    if m.conv1d and t.dim() == 2:
        t = t.t()  # (in, out) → (out, in)
    if m.part is not None:  # a copy, so the fused tensor is freed
        t = t.chunk(m.parts, dim=0)[m.part].clone(memory_format=torch.contiguous_format)
    if m.flat and t.numel() == torch.Size(shape).numel():
        t = t.reshape(shape)
    if tuple(t.shape) != shape:
        raise MptcError(f"{ck.where}: '{key}' gives {name} the shape {tuple(t.shape)}; config.json implies {shape}")
    return t.contiguous()


# --- every tensor used, every tensor found ----------------------------------------------------------------

SHOWN = 5  # names listed in a message


def _natural(key: str) -> list:
    """Sort key: `h.10` after `h.9`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _some(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _allowed(spec: S.Spec, fam: Family) -> set[str]:
    """The family's known extras (and tied copies, for a tied head), under the names a checkpoint may use."""
    names = fam.extras + (fam.tied if spec.head.tied else ())
    full = {n.format(i=i) for n in names for i in (range(spec.n_layers) if "{i}" in n else [None])}
    return full | {n.removeprefix(fam.prefix) for n in full}


def _layers_in(fam: Family, keys: set[str]) -> set[int]:
    """The layer indices that checkpoint names carry (`transformer.h.3.…` → 3)."""
    stems = {h.split("{i}")[0] for m in fam.weights.values() for h in m.hf if "{i}" in h}
    stems |= {s.removeprefix(fam.prefix) for s in stems}
    found = set()
    for k in keys:
        for s in stems:
            if k.startswith(s) and k[len(s):].split(".", 1)[0].isdigit():
                found.add(int(k[len(s):].split(".", 1)[0]))
    return found


def _layer_hint(spec: S.Spec, fam: Family, keys: set[str]) -> str | None:
    have = _layers_in(fam, keys)
    if not have or have == set(range(spec.n_layers)):
        return None
    lo, hi = min(have), max(have)
    span = f"{lo}..{hi}" if have == set(range(lo, hi + 1)) else ", ".join(map(str, sorted(have)))
    return f"config.json says {fam.layers_key} = {spec.n_layers}, the checkpoint has layers {span}"


def _account(spec: S.Spec, fam: Family, ck: Checkpoint, missing: dict[str, list[str]]) -> None:
    """Raise unless every model tensor was found and every checkpoint tensor was used (or is a known extra).

    missing: checkpoint name → the mptc tensors it would give (GPT-2's fused c_attn gives three).
    """
    unused = sorted(ck.keys - ck.used - _allowed(spec, fam), key=_natural)
    if not missing and not unused:
        return
    problems = []
    if missing:
        n = len(missing)
        problems.append(f"{n} tensor{'s' * (n > 1)} of the model {'are' if n > 1 else 'is'} not in the checkpoint: "
                        + _some([f"'{k}' (for {', '.join(v)})" for k, v in missing.items()]))
    if unused:
        n = len(unused)
        problems.append(f"{n} tensor{'s' * (n > 1)} of the checkpoint {'are' if n > 1 else 'is'} not used: "
                        f"{_some(unused)}")
    hint = _layer_hint(spec, fam, ck.keys) or (
        f"config.json and the weights disagree: a {fam.name} model with this config has other tensors; "
        "mptc imports a checkpoint whole or not at all")
    raise MptcError(f"{ck.where}: {'; '.join(problems)}", hint=hint)


def _state(spec: S.Spec, fam: Family, ck: Checkpoint) -> dict[str, Tensor]:
    """The mptc state dict of a spec, read from a checkpoint one tensor at a time, every tensor accounted for."""
    low = lower(spec, "meta")  # names and shapes only
    state: dict[str, Tensor] = {}
    missing: dict[str, list[str]] = {}
    for n in low.params:
        t = _fetch(ck, fam, n, tuple(low.root.get_parameter(n).shape))
        if t is None:
            missing.setdefault(_hf_names(fam, n)[0], []).append(n)
        else:
            state[n] = t
    _account(spec, fam, ck, missing)
    return state


def read_config(d: Path) -> Config:
    p = d / "config.json"
    if not d.is_dir():
        raise MptcError(f"no such directory: {d}")
    if not p.is_file():
        raise MptcError(f"{d} has no config.json", hint="a Hugging Face model dir holds config.json and weights")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MptcError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise MptcError(f"{p} is not a JSON object", hint='config.json holds {"model_type": …, …}')
    return cfg


def _read_dir(d: Path) -> tuple[S.Spec, dict[str, Tensor]]:
    cfg = read_config(d)
    spec = spec_from_config(cfg)  # refusals come before any weights are read
    with open_checkpoint(d) as ck:
        return spec, _state(spec, _family(cfg), ck)


# --- checking an import against transformers ------------------------------------------------------------

CHECK_TOL = 1e-4  # on |mptc − transformers| / max(1, |transformers|), real positions


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MptcError('checking an import against transformers needs it: pip install "mptc[hf]"') from None
    return transformers


def _probe(spec: S.Spec) -> tuple[dict[str, Tensor], Tensor | None]:
    """A fixed batch: 2 images, or 2 × 12 token ids with row 1 right-padded; and the mask of real positions."""
    g = torch.Generator().manual_seed(0)
    if spec.patches is not None:
        p = spec.patches
        return {"pixel_values": torch.randn(2, p.channels, p.image, p.image, generator=g)}, None
    t = min(12, spec.context or 12)
    ids = torch.randint(0, spec.vocab, (2, t), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, t // 2 + 1:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if spec.embed.segments:
        inputs["token_type_ids"] = (torch.arange(t) >= t // 3).long().expand(2, t) % spec.embed.segments
    return inputs, mask.bool()


def _reference(hf_dir: Path, arch: str) -> Any:
    """The transformers model of a checkpoint dir, float32, eager attention, local files only."""
    tf = _transformers()
    cls = getattr(tf, arch, None)
    if cls is None:
        raise MptcError(f"transformers {tf.__version__} has no class {arch}")
    dtype = {"dtype": torch.float32} if int(tf.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        return cls.from_pretrained(hf_dir, local_files_only=True, attn_implementation="eager", **dtype).eval()
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the check cannot run
        raise MptcError(f"transformers could not load {hf_dir} as {arch}: {e}") from None
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()


def check_hf(hf_dir: str | os.PathLike, model_dir: str | os.PathLike, hint: str | None = None) -> float:
    """The max error of an imported model dir against transformers on a fixed padded probe batch.

    The error is max |mptc − transformers| / max(1, |transformers|) over real (unpadded) positions; above
    CHECK_TOL it raises MptcError (with `hint`).
    """
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    arch = (cfg.get("architectures") or [next(iter(_family(cfg).heads))])[0]
    model = load_model(model_dir).eval()
    inputs, valid = _probe(spec_of(model))
    ref_model = _reference(hf_dir, arch)
    with torch.no_grad():
        out, r = model(**inputs), ref_model(**inputs)
    ref = r.logits if getattr(r, "logits", None) is not None else r.last_hidden_state
    if valid is not None and out.dim() == 3:  # per token: real positions only, (N, V)
        out, ref = out[valid], ref[valid]
    if out.shape != ref.shape:
        raise MptcError(f"check failed: the import gives outputs of shape {tuple(out.shape)}, transformers' {arch} "
                        f"{tuple(ref.shape)}")
    err = ((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1)).max().item()
    if not err <= CHECK_TOL:  # NaN fails too
        raise MptcError(f"check failed: the import differs from transformers' {arch}: max error {err:.2e} relative "
                        f"to max(1, |output|) > {CHECK_TOL:g}", hint=hint)
    return err


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, check: bool = False,
              log: Callable[[str], None] | None = None) -> Path:
    """Convert a Hugging Face model dir to an mptc model dir (model.mpt + weights.safetensors), atomically.

    check: before the dir is moved into place, compare it with transformers on a probe batch (`check_hf`);
    `log` gets the measured error.
    """
    if check:
        _transformers()  # before any work
    spec, state = _read_dir(Path(hf_dir))
    with atomic_dir(out_dir, kind="model") as tmp:
        (tmp / SPEC_FILE).write_text(str(spec))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mptc.spec": spec.name,
                                                             "mptc.source": "huggingface"})
        del state
        err = check_hf(hf_dir, tmp, hint=f"nothing was written to {out_dir}") if check else None
    if err is not None and log is not None:
        log(f"check: max error {err:.2e} relative to max(1, |output|) (tolerance {CHECK_TOL:g}) against transformers")
    return Path(out_dir)


def from_hf(src: Any, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> fx.GraphModule:
    """A GraphModule (eval mode, like `from_pretrained`) from a Hugging Face model dir or a transformers model.

    For a model object, its config and `state_dict()` are used and its class picks the head.
    """
    if isinstance(src, (str, os.PathLike)):
        spec, state = _read_dir(Path(src))
    elif hasattr(src, "config") and hasattr(src, "state_dict"):
        cfg, arch = src.config.to_dict(), type(src).__name__
        spec = spec_from_config(cfg, arch)
        state = _state(spec, _family(cfg), _checkpoint_of_state(src.state_dict(), arch))
    else:
        raise MptcError(f"from_hf needs a model dir or a transformers model, got {type(src).__name__}")
    return build(spec, weights=state, device=device, dtype=dtype).eval()


# --- export: GPT-2 and Llama ------------------------------------------------------------------------------


def _show(v: Any) -> str:
    if isinstance(v, S.Norm):
        return v.kind if v.kind == "rmsnorm" or v.bias else "layernorm without bias"
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


def _same(fam: str, key: str, values: list, what: str = "", where: list[str] | None = None) -> str | None:
    """A problem when per-layer values differ: the family's config holds one value for all of them."""
    where = where or [f"layer {j}" for j in range(len(values))]
    for j, v in enumerate(values):
        if v != values[0]:
            return (f"{fam}'s config has one `{key}`; {where[j]} has {what}{_show(v)}, "
                    f"{where[0]} has {what}{_show(values[0])}")
    return None


def _same_eps(spec: S.Spec, fam: str, key: str) -> str | None:
    """One norm epsilon for every layer and the final norm."""
    norms = [(f"layer {i}", ly.norm) for i, ly in enumerate(spec.layers)] + [("the head", spec.head.norm)]
    return _same(fam, key, [n.eps for _, n in norms if n], "eps ", [w for w, n in norms if n])


def _every(spec: S.Spec, bad: Callable[[S.Layer], str | None]) -> str | None:
    """The first layer that `bad` objects to, as `… layer i …`."""
    for i, layer in enumerate(spec.layers):
        why = bad(layer)
        if why:
            return why.format(i=i)
    return None


def _common(spec: S.Spec, fam: str) -> list[str | None]:
    e, h = spec.embed, spec.head
    return [
        h.kind != "lm" and f"{fam} export writes a causal LM; this model has a {h.kind} head",
        spec.patches is not None and f"{fam} reads tokens; this model reads image patches",
        e.norm is not None and f"{fam} has no embedding norm; this model has embed.norm",
        e.segments > 0 and f"{fam} has no token types; this model has segments = {e.segments}",
        h.kind == "lm" and h.bias and f"{fam}'s lm_head has no bias; this model's head has bias = true",
        h.transform is not None and f"{fam} has no head transform; this model's head has one",
        _every(spec, lambda ly: ly.placement == "post" and f"{fam} is pre-norm; layer {{i}} is post-norm"),
        _every(spec, lambda ly: ly.attention.mask != "causal" and f"{fam} is causal; layer {{i}} is bidirectional"),
        _every(spec, lambda ly: ly.attention.value_dim != ly.attention.head_dim and
               f"{fam} has one head size for keys and values; layer {{i}} has value_dim {ly.attention.value_dim} "
               f"≠ head_dim {ly.attention.head_dim}"),
    ]


GPT2_ACTS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
LLAMA_ACTS = {"swiglu": "silu", "geglu": "gelu"}


def _gpt2_export(spec: S.Spec) -> tuple[list[str], Config]:
    """GPT2LMHeadModel: learned positions, layernorm with bias, one plain MLP, biases everywhere."""
    L, a0 = spec.layers, spec.layers[0].attention  # noqa: N806
    acts = [ly.mlp.activation for ly in L]
    problems = _common(spec, "GPT-2") + [
        spec.embed.positions.kind != "learned" and
        f"GPT-2 has learned positions (`n_positions`); this model has {spec.embed.positions.kind} positions",
        spec.head.norm is None and "GPT-2 has a final layernorm (`ln_f`); this model's head has no norm",
        _every(spec, lambda ly: not (ly.norm.kind == "layernorm" and ly.norm.bias) and
               f"GPT-2 norms are layernorms with bias (`layer_norm_epsilon`); layer {{i}} has {_show(ly.norm)}"),
        spec.head.norm is not None and not (spec.head.norm.kind == "layernorm" and spec.head.norm.bias) and
        f"GPT-2's final norm `ln_f` is a layernorm with bias; this model's head has {_show(spec.head.norm)}",
        _same_eps(spec, "GPT-2", "layer_norm_epsilon"),
        _same("GPT-2", "n_head", [ly.attention.heads for ly in L]),
        _every(spec, lambda ly: ly.attention.kv_heads != ly.attention.heads and
               f"GPT-2 has no grouped-query attention (`n_head` only); layer {{i}} has kv_heads = "
               f"{ly.attention.kv_heads} for heads = {ly.attention.heads}"),
        _every(spec, lambda ly: ly.attention.heads * ly.attention.head_dim != spec.width and
               f"GPT-2's head size is `n_embd` / `n_head`; layer {{i}} has heads · head_dim = "
               f"{ly.attention.heads} · {ly.attention.head_dim} ≠ width {spec.width}"),
        _every(spec, lambda ly: ly.attention.window is not None and
               f"GPT-2 has no sliding window; layer {{i}} has window = {ly.attention.window}"),
        _every(spec, lambda ly: not (ly.attention.bias and ly.attention.out_bias) and
               "GPT-2's attention always has biases (c_attn, c_proj); layer {i} has "
               f"bias = {_show(ly.attention.bias)}, out_bias = {_show(ly.attention.out_bias)}"),
        _every(spec, lambda ly: ly.mlp.activation not in GPT2_ACTS and
               f"GPT-2's MLP is one of {', '.join(GPT2_ACTS)} (`activation_function`); layer {{i}} has "
               f"{ly.mlp.activation}"),
        _same("GPT-2", "activation_function", acts),
        _same("GPT-2", "n_inner", [ly.mlp.hidden for ly in L]),
        _every(spec, lambda ly: not ly.mlp.bias and
               "GPT-2's MLP always has biases (c_fc, c_proj); layer {i} has bias = false"),
    ]
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": spec.vocab,
        "n_positions": spec.context, "n_embd": spec.width, "n_layer": spec.n_layers, "n_head": a0.heads,
        "n_inner": L[0].mlp.hidden, "activation_function": GPT2_ACTS.get(acts[0]),
        "layer_norm_epsilon": L[0].norm.eps, "resid_pdrop": L[0].dropout, "embd_pdrop": spec.embed.dropout,
        "attn_pdrop": a0.dropout, "initializer_range": spec.init.std, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": spec.head.tied, "bos_token_id": None, "eos_token_id": None,
    }
    return [p for p in problems if p], config


def _llama_export(spec: S.Spec) -> tuple[list[str], Config]:
    """LlamaForCausalLM: rope, RMSNorm, grouped-query attention, one gated MLP, no sliding window."""
    L, a0 = spec.layers, spec.layers[0].attention  # noqa: N806
    norms = [ly.norm for ly in L] + [spec.head.norm]
    att = [ly.attention for ly in L]
    problems = _common(spec, "Llama") + [
        spec.embed.positions.kind != "rope" and
        f"Llama has rotary positions (`rope_theta`); this model has {spec.embed.positions.kind} positions",
        spec.head.norm is None and "Llama has a final RMSNorm (`model.norm`); this model's head has no norm",
        any(n is not None and n.kind != "rmsnorm" for n in norms) and
        f"Llama's norms are RMSNorm (`rms_norm_eps`); this model has "
        f"{next(_show(n) for n in norms if n is not None and n.kind != 'rmsnorm')}",
        _same_eps(spec, "Llama", "rms_norm_eps"),
        _same("Llama", "num_attention_heads", [a.heads for a in att]),
        _same("Llama", "num_key_value_heads", [a.kv_heads for a in att]),
        _same("Llama", "head_dim", [a.head_dim for a in att]),
        spec.width % a0.heads != 0 and  # LlamaConfig checks it (transformers 5), although `head_dim` is explicit
        f"Llama's config needs `hidden_size` divisible by `num_attention_heads`; width {spec.width}, {a0.heads} heads",
        _every(spec, lambda ly: ly.attention.rotary != ly.attention.head_dim and
               f"Llama rotates the whole head (`head_dim`); layer {{i}} has rotary_dim {ly.attention.rotary} of "
               f"head_dim {ly.attention.head_dim}"),
        _every(spec, lambda ly: ly.attention.window is not None and
               f"Llama has no sliding window (`sliding_window` is Mistral's); layer {{i}} has window = "
               f"{ly.attention.window}"),
        _every(spec, lambda ly: ly.attention.bias != ly.attention.out_bias and
               "Llama's `attention_bias` covers q, k, v and o together; layer {i} has "
               f"bias = {_show(ly.attention.bias)}, out_bias = {_show(ly.attention.out_bias)}"),
        _same("Llama", "attention_bias", [a.bias for a in att]),
        _every(spec, lambda ly: ly.mlp.activation not in LLAMA_ACTS and
               f"Llama's MLP is gated, swiglu or geglu (`hidden_act`); layer {{i}} has {ly.mlp.activation}"),
        _same("Llama", "hidden_act", [ly.mlp.activation for ly in L]),
        _same("Llama", "intermediate_size", [ly.mlp.hidden for ly in L]),
        _same("Llama", "mlp_bias", [ly.mlp.bias for ly in L]),
    ]
    theta = spec.embed.positions.theta
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": spec.vocab,
        "hidden_size": spec.width, "intermediate_size": L[0].mlp.hidden, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": a0.heads, "num_key_value_heads": a0.kv_heads, "head_dim": a0.head_dim,
        "hidden_act": LLAMA_ACTS.get(L[0].mlp.activation), "max_position_embeddings": spec.context or 2048,
        "rms_norm_eps": L[0].norm.eps, "rope_theta": theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "attention_bias": a0.bias,
        "attention_dropout": a0.dropout, "mlp_bias": L[0].mlp.bias, "initializer_range": spec.init.std,
        "tie_word_embeddings": spec.head.tied, "bos_token_id": None, "eos_token_id": None,
    }
    return [p for p in problems if p], config


EXPORTS: dict[str, Callable[[S.Spec], tuple[list[str], Config]]] = {"gpt2": _gpt2_export, "llama": _llama_export}


def _export_config(spec: S.Spec, family: str | None) -> tuple[str, Config]:
    """The family (given, or the one with the fewest problems) and its config; else MptcError naming the field."""
    if family is not None and family not in EXPORTS:
        raise MptcError(f"cannot export to family '{family}'", hint=f"export-hf writes: {', '.join(EXPORTS)}")
    tried = {name: EXPORTS[name](spec) for name in ([family] if family else EXPORTS)}
    name = min(tried, key=lambda n: len(tried[n][0]))  # the closest family
    problems, config = tried[name]
    if not problems:
        return name, config
    rest = f"; also: {'; '.join(problems[1:4])}" + (" …" if len(problems) > 4 else "") if len(problems) > 1 else ""
    raise MptcError(f"cannot export as {FAMILIES[name].name}: {problems[0]}", hint=(
        "export-hf writes GPT-2 (learned positions, layernorm, plain MLP) or Llama (rope, RMSNorm, gated MLP), "
        "with one value per config field for all layers" + rest))


SPEC_FIELDS = {Role.NORM_Q: "layers.attention.qk_norm", Role.NORM_K: "layers.attention.qk_norm"}  # for messages


def _no_place(spec: S.Spec, family: str, name: str, info: NodeInfo) -> MptcError:
    """The error for a parameter the family's checkpoint has no name for, at the spec field that made it."""
    field = SPEC_FIELDS.get(info.role)
    v = spec.spans.get(field) if field else None
    span = None
    if v is not None:
        items = getattr(v, "value", None)
        span = items[info.layer].span if isinstance(items, list) and info.layer is not None else v.span
    what = f"`{field.rsplit('.', 1)[-1]}`" if field else "that part"
    return MptcError(f"cannot export as {family}: it has no weight for {name} ({info.describe()})", span,
                     f"{family} checkpoints cannot hold it; remove {what} from the spec, or keep the model in "
                     "mptc's own format")


def _hf_state(model: fx.GraphModule, fam: Family) -> dict[str, Tensor]:
    """The model's tensors under their Hugging Face names: Conv1D transposed, fused q/k/v joined.
    A tensor the family's table has no name for raises MptcError naming it."""
    sd, table = model.state_dict(), fam.weights
    groups: dict[str, list[tuple[int, Tensor, bool]]] = {}
    for name, info in param_info(model).items():
        tmpl, i = _template(name)
        if tmpl not in table:
            raise _no_place(spec_of(model), fam.name, name, info)
        m = table[tmpl]
        groups.setdefault(m.hf[0].format(i=i), []).append((m.part or 0, sd[name].detach(), m.conv1d))
    out = {}
    for key, parts in groups.items():
        t = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p, _ in sorted(parts, key=lambda x: x[0])])
        out[key] = (t.t() if parts[0][2] and t.dim() == 2 else t).contiguous().cpu()  # Conv1D: (in, out)
    return out


def to_hf(model: fx.GraphModule, path: str | os.PathLike, family: str | None = None) -> Path:
    """Write config.json + model.safetensors that `AutoModelForCausalLM.from_pretrained` loads (GPT-2 or Llama).

    Models the family's config cannot hold (per-layer sizes, post-norm, partial rope, …) raise MptcError.
    """
    spec = spec_of(model)
    name, config = _export_config(spec, family)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config |= {"dtype": dtype, "torch_dtype": dtype}
    tensors = _hf_state(model, FAMILIES[name])
    with atomic_dir(path, kind="hf") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(path)


export_hf = to_hf
