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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, fx

from . import spec as S
from .atomic import atomic_dir
from .errors import MptcError
from .lower import lower
from .model import SPEC_FILE, WEIGHTS_FILE, build, param_info, spec_of
from .printer import format_spec
from .schema import parse

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
    "head.bias": _one(("cls.predictions.bias", "cls.predictions.decoder.bias")),  # tied decoder
    "head.out.weight": _one(("classifier.weight", "cls.predictions.decoder.weight")),  # classifier, or untied
    "head.out.bias": _one(("classifier.bias", "cls.predictions.bias")),
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
        kind = (cfg.get(key) or {}).get("rope_type", (cfg.get(key) or {}).get("type", "default"))
        if kind != "default":
            raise MptcError(f"unsupported rope_scaling type '{kind}' (in `{key}`)",
                            hint="mptc has plain rope only: a theta, no scaling (linear, dynamic, yarn, llama3, …)")
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _refuse_if(cfg: Config, key: str, bad: Callable[[Any], bool], why: str) -> None:
    if key in cfg and bad(cfg[key]):
        raise MptcError(f"unsupported {key} = {json.dumps(cfg[key])}: {why}")


def _init(cfg: Config) -> S.Init:
    return S.Init(float(cfg.get("initializer_range", 0.02)))


def _gpt2_spec(cfg: Config, head: str) -> S.Spec:
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        _refuse_if(cfg, key, bool, "mptc attention is plain scaled dot-product self-attention")
    _refuse_if(cfg, "scale_attn_weights", lambda v: not v, "mptc always scales scores by 1/√head_dim")
    d, h = _get(cfg, "n_embd"), _get(cfg, "n_head")
    norm = S.Norm("layernorm", float(_get(cfg, "layer_norm_epsilon")))
    att = S.Attention(h, h, d // h, d // h, dropout=float(_get(cfg, "attn_pdrop")))
    mlp = S.MLP(cfg.get("n_inner") or 4 * d, _act(cfg, "activation_function", PLAIN_ACTS))
    layer = S.Layer(att, mlp, norm, dropout=float(_get(cfg, "resid_pdrop")))
    hd = S.Head("lm", norm, tied=bool(_get(cfg, "tie_word_embeddings"))) if head == "lm" else S.Head("none", norm)
    return S.Spec("gpt2", d, (layer,) * _get(cfg, "n_layer"), hd, _get(cfg, "vocab_size"), _get(cfg, "n_positions"),
                  S.Embed(dropout=float(_get(cfg, "embd_pdrop"))), _init(cfg))


def _no_window(cfg: Config, n: int) -> list[int | None]:
    return [None] * n


def _mistral_window(cfg: Config, n: int) -> list[int | None]:
    return [cfg.get("sliding_window")] * n  # null: none


def _qwen2_window(cfg: Config, n: int) -> list[int | None]:
    """Only with use_sliding_window, on the layers `layer_types` marks (else from `max_window_layers` on)."""
    w = cfg.get("sliding_window")
    if not cfg.get("use_sliding_window") or w is None:
        return [None] * n
    types = cfg.get("layer_types") or ["sliding_attention" if i >= _get(cfg, "max_window_layers") else
                                       "full_attention" for i in range(n)]
    return [w if t == "sliding_attention" else None for t in types]


def _llama_spec(cfg: Config, head: str, name: str, window: Callable[[Config, int], list[int | None]],
                bias: tuple[bool, bool] | None = None) -> S.Spec:
    """Llama, Mistral, Qwen2: rope, RMSNorm, grouped-query attention, gated MLP.

    bias: (q/k/v, o) where the family fixes it (Mistral none, Qwen2 q/k/v only), else `attention_bias` for all four.
    """
    d, h = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    k = cfg.get("head_dim") or d // h
    theta = _rope_theta(cfg)
    qkv_bias, o_bias = bias or (bool(cfg.get("attention_bias", False)),) * 2
    norm = S.Norm("rmsnorm", float(_get(cfg, "rms_norm_eps")))
    mlp = S.MLP(_get(cfg, "intermediate_size"), _act(cfg, "hidden_act", GATED_ACTS), bool(cfg.get("mlp_bias", False)))
    layers = tuple(
        S.Layer(S.Attention(h, cfg.get("num_key_value_heads") or h, k, k, bias=qkv_bias, out_bias=o_bias,
                            dropout=float(_get(cfg, "attention_dropout")), rotary_dim=k, window=w), mlp, norm)
        for w in window(cfg, _get(cfg, "num_hidden_layers")))
    hd = S.Head("lm", norm, tied=bool(_get(cfg, "tie_word_embeddings"))) if head == "lm" else S.Head("none", norm)
    return S.Spec(name, d, layers, hd, _get(cfg, "vocab_size"), cfg.get("max_position_embeddings"),
                  S.Embed(positions=S.Positions("rope", theta)), _init(cfg))


def _bert_spec(cfg: Config, head: str) -> S.Spec:
    _refuse_if(cfg, "position_embedding_type", lambda v: v != "absolute", "mptc has absolute (learned) positions only")
    for key in ("is_decoder", "add_cross_attention"):
        _refuse_if(cfg, key, bool, "mptc imports BERT as a bidirectional encoder")
    d, h = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    norm = S.Norm("layernorm", float(_get(cfg, "layer_norm_eps")))
    act = _act(cfg, "hidden_act", PLAIN_ACTS)
    drop = float(_get(cfg, "hidden_dropout_prob"))
    att = S.Attention(h, h, d // h, d // h, "bidirectional", dropout=float(_get(cfg, "attention_probs_dropout_prob")))
    layer = S.Layer(att, S.MLP(_get(cfg, "intermediate_size"), act), norm, "post", drop)
    heads = {"mlm": S.Head("lm", tied=bool(_get(cfg, "tie_word_embeddings")), bias=True,
                           transform=S.Transform(act, norm)),
             "classify": S.Head("classify", bias=True, classes=_num_labels(cfg), pool="first", pooler=True),
             "none": S.Head("none")}
    embed = S.Embed(positions=S.Positions("learned"), dropout=drop, norm=norm, segments=_get(cfg, "type_vocab_size"))
    return S.Spec("bert", d, (layer,) * _get(cfg, "num_hidden_layers"), heads[head], _get(cfg, "vocab_size"),
                  _get(cfg, "max_position_embeddings"), embed, _init(cfg))


def _square(cfg: Config, key: str) -> int:
    v = _get(cfg, key)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise MptcError(f"unsupported {key} = {list(v)}: mptc images and patches are square")
        v = v[0]
    return int(v)


def _vit_spec(cfg: Config, head: str) -> S.Spec:
    d, h = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    norm = S.Norm("layernorm", float(_get(cfg, "layer_norm_eps")))
    drop = float(_get(cfg, "hidden_dropout_prob"))
    att = S.Attention(h, h, d // h, d // h, "bidirectional", bias=bool(_get(cfg, "qkv_bias")), out_bias=True,
                      dropout=float(_get(cfg, "attention_probs_dropout_prob")))
    layer = S.Layer(att, S.MLP(_get(cfg, "intermediate_size"), _act(cfg, "hidden_act", PLAIN_ACTS)), norm, "pre", drop)
    patches = S.Patches(_square(cfg, "image_size"), _square(cfg, "patch_size"), int(_get(cfg, "num_channels")))
    hd = S.Head("classify", norm, bias=True, classes=_num_labels(cfg)) if head == "classify" else S.Head("none", norm)
    return S.Spec("vit", d, (layer,) * _get(cfg, "num_hidden_layers"), hd,
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


_DECODER = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, hidden_act="silu", rms_norm_eps=1e-6,
                tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.02)
_ENCODER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.02)

FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT-2", "transformer.", {"GPT2LMHeadModel": "lm", "GPT2Model": "none"}, _gpt2_spec,
                   GPT2_WEIGHTS, dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                      activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                      layer_norm_epsilon=1e-5, initializer_range=0.02, tie_word_embeddings=True)),
    "llama": Family("Llama", "model.", {"LlamaForCausalLM": "lm", "LlamaModel": "none"},
                    partial(_llama_spec, name="llama", window=_no_window), LLAMA_WEIGHTS,
                    _DECODER | dict(vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048)),
    "mistral": Family("Mistral", "model.", {"MistralForCausalLM": "lm", "MistralModel": "none"},
                      partial(_llama_spec, name="mistral", window=_mistral_window, bias=(False, False)), LLAMA_WEIGHTS,
                      _DECODER | dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                                      max_position_embeddings=131072, sliding_window=4096)),
    "qwen2": Family("Qwen2", "model.", {"Qwen2ForCausalLM": "lm", "Qwen2Model": "none"},
                    partial(_llama_spec, name="qwen2", window=_qwen2_window, bias=(True, False)), LLAMA_WEIGHTS,
                    _DECODER | dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                                    use_sliding_window=False, sliding_window=4096, max_window_layers=28)),
    "bert": Family("BERT", "bert.", {"BertForMaskedLM": "mlm", "BertForSequenceClassification": "classify",
                                     "BertModel": "none"}, _bert_spec, BERT_WEIGHTS,
                   _ENCODER | dict(vocab_size=30522, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                   max_position_embeddings=512, type_vocab_size=2, tie_word_embeddings=True)),
    "vit": Family("ViT", "vit.", {"ViTForImageClassification": "classify", "ViTModel": "none"}, _vit_spec,
                  VIT_WEIGHTS, _ENCODER | dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                               image_size=224, patch_size=16, num_channels=3, qkv_bias=True)),
}


def _family(cfg: Config) -> Family:
    mt = cfg.get("model_type")
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
    """The tensors of a checkpoint by name, read one at a time."""

    def __init__(self, keys: set[str], read: Callable[[str], Tensor], where: str):
        self.keys, self._read, self.where = keys, read, where

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
        return self._read(key)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@contextmanager
def open_checkpoint(d: Path) -> Iterator[Checkpoint]:
    """A Hugging Face weights dir: model.safetensors, sharded safetensors, or pytorch_model.bin (sharded or not)."""
    found = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if found is None:
        raise MptcError(f"no weights file in {d}", hint=f"expected one of: {', '.join(WEIGHT_FILES)}")
    if found.name.endswith(".index.json"):
        files = {k: d / v for k, v in json.loads(found.read_text())["weight_map"].items()}
    else:
        files = None
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(p: Path):
            if p not in handles:
                if p.suffix == ".safetensors":
                    handles[p] = stack.enter_context(safe_open(str(p), framework="pt"))
                else:  # a torch pickle, tensors only: memory-mapped (zip format), else read whole (old tar format)
                    try:
                        handles[p] = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:
                        handles[p] = torch.load(p, map_location="cpu", weights_only=True)
            return handles[p]

        if files is None:
            keys = set(handle(found).keys())
            files = dict.fromkeys(keys, found)

        def read(k: str) -> Tensor:
            h = handle(files[k])
            return h.get_tensor(k) if files[k].suffix == ".safetensors" else h[k].clone()

        yield Checkpoint(set(files), read, str(found))


def _checkpoint_of_state(state: dict[str, Tensor], where: str) -> Checkpoint:
    return Checkpoint(set(state), lambda k: state[k].detach().clone(), where)


def _template(name: str) -> tuple[str, int | None]:
    """`layers.3.attn.q.weight` → (`layers.{i}.attn.q.weight`, 3)."""
    m = re.match(r"layers\.(\d+)\.", name)
    return (f"layers.{{i}}.{name[m.end():]}", int(m.group(1))) if m else (name, None)


def _fetch(ck: Checkpoint, fam: Family, name: str, shape: tuple[int, ...]) -> Tensor:
    tmpl, i = _template(name)
    m = fam.weights[tmpl]
    names = tuple(h.format(i=i) for h in m.hf)
    key = ck.find(names, fam.prefix)
    if key is None:
        raise MptcError(f"{ck.where}: no tensor '{names[0]}' (for {name})")
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


def _state(spec: S.Spec, fam: Family, ck: Checkpoint) -> dict[str, Tensor]:
    """The mptc state dict of a spec, read from a checkpoint one tensor at a time."""
    low = lower(spec, "meta")  # names and shapes only
    return {n: _fetch(ck, fam, n, tuple(low.root.get_parameter(n).shape)) for n in low.params}


def read_config(d: Path) -> Config:
    p = d / "config.json"
    if not d.is_dir():
        raise MptcError(f"no such directory: {d}")
    if not p.is_file():
        raise MptcError(f"{d} has no config.json", hint="a Hugging Face model dir holds config.json and weights")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MptcError(f"{p} is not valid JSON: {e}") from None


def _read_dir(d: Path) -> tuple[S.Spec, dict[str, Tensor]]:
    cfg = read_config(d)
    spec = spec_from_config(cfg)  # refusals come before any weights are read
    with open_checkpoint(d) as ck:
        return spec, _state(spec, _family(cfg), ck)


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a Hugging Face model dir to an mptc model dir (model.mpt + weights.safetensors), atomically."""
    spec, state = _read_dir(Path(hf_dir))
    with atomic_dir(out_dir) as tmp:
        (tmp / SPEC_FILE).write_text(str(spec))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mptc.spec": spec.name,
                                                             "mptc.source": "huggingface"})
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


def _hf_state(model: fx.GraphModule, table: dict[str, Map]) -> dict[str, Tensor]:
    """The model's tensors under their Hugging Face names: Conv1D transposed, fused q/k/v joined."""
    sd = model.state_dict()
    groups: dict[str, list[tuple[int, Tensor, bool]]] = {}
    for name in param_info(model):
        tmpl, i = _template(name)
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
    tensors = _hf_state(model, FAMILIES[name].weights)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(path)


export_hf = to_hf
