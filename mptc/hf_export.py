"""Hugging Face export: a model whose spec a family's config can hold → config.json + model.safetensors.

Each exporter lists what its family's config cannot hold (naming the config field) beside the config it writes;
the tensors are renamed by the family's weight table (`mptc.hf_families`), fused projections joined.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, fx

from . import spec as S
from .atomic import atomic_dir
from .errors import MptcError
from .graph import param_info, spec_of
from .hf_families import FAMILIES, Config, Family, _at, _template
from .lower import NodeInfo, Role

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
    odd = [j for j, v in enumerate(values) if v != values[0]]
    if not odd:
        return None
    more = f" (also {', '.join(f'{where[k]}: {_show(values[k])}' for k in odd[1:])})" if len(odd) > 1 else ""
    return (f"{fam}'s config has one `{key}`; {where[odd[0]]} has {what}{_show(values[odd[0]])}, "
            f"{where[0]} has {what}{_show(values[0])}{more}")


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


def _common(spec: S.Spec, fam: str, tasks: tuple[str, ...] = ()) -> list[str | None]:
    """What every causal-LM family refuses; `tasks`: the task heads the family has classes for (TASK_HEADS)."""
    e, h = spec.embed, spec.head
    return [
        h.kind != "lm" and _task(spec) not in tasks and
        f"{fam} export writes a causal LM{''.join(f', {TASK_HEADS[t][1]}' for t in tasks)}; this model has "
        f"{_head_words(spec)}",
        spec.patches is not None and f"{fam} reads tokens; this model reads image patches",
        e.norm is not None and f"{fam} has no embedding norm; this model has embed.norm",
        e.segments > 0 and f"{fam} has no token types; this model has segments = {e.segments}",
        h.kind == "lm" and h.bias and f"{fam}'s lm_head has no bias; this model's head has bias = true",
        h.transform is not None and f"{fam} has no head transform; this model's head has one",
        _every(spec, lambda ly: ly.placement != "pre" and f"{fam} is pre-norm; layer {{i}} is {ly.placement}-norm"),
        _every(spec, lambda ly: ly.attention.mask != "causal" and f"{fam} is causal; layer {{i}} is bidirectional"),
        *_shared(spec, fam),
    ]


TASK_HEADS = {  # decoder task head → (class suffix, in words, checkpoint name of head.out)
    "classify": ("ForSequenceClassification", "a last-token classifier (`score`, no bias)", "score"),
    "token": ("ForTokenClassification", "a token classifier (`score`)", "score"),
    "span": ("ForQuestionAnswering", "extractive QA (`qa_outputs`)", "qa_outputs"),
}
QA_TRANSFORMER = ("llama", "qwen2", "qwen3")  # their ForQuestionAnswering stores the base model as `transformer.`


def _task(spec: S.Spec) -> str | None:
    """Which decoder task head the spec's head is: a key of TASK_HEADS, or None."""
    h = spec.head
    if h.kind == "classify" and h.pool == "last" and not h.bias and not h.pooler:
        return "classify"
    if h.kind == "classify" and h.pool == "none" and not h.pooler:
        return "token"
    return "span" if h.kind == "span" and h.bias else None


def _head_words(spec: S.Spec) -> str:
    h = spec.head
    if h.kind == "classify":
        return f"a classify head (pool = {h.pool}, bias = {_show(h.bias)}, pooler = {_show(h.pooler)})"
    return f"a {h.kind} head" + (f" (bias = {_show(h.bias)})" if h.kind == "span" else "")


def _shared(spec: S.Spec, fam: str) -> list[str | None]:
    """What every family refuses: value_dim ≠ head_dim."""
    return [_every(spec, lambda ly: ly.attention.value_dim != ly.attention.head_dim and
                   f"{fam} has one head size for keys and values; layer {{i}} has value_dim {ly.attention.value_dim} "
                   f"≠ head_dim {ly.attention.head_dim}")]


GPT2_ACTS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
LLAMA_ACTS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_pytorch_tanh"}


def _gpt2_export(spec: S.Spec) -> tuple[list[str], Config]:
    """GPT2LMHeadModel: learned positions, layernorm with bias, one plain MLP, biases everywhere."""
    L, a0 = spec.layers, spec.layers[0].attention  # noqa: N806
    acts = [ly.mlp.activation for ly in L]
    problems = _common(spec, "GPT-2") + [
        spec.embed.positions.kind != "learned" and
        f"GPT-2 has learned positions (`n_positions`); this model has {spec.embed.positions.kind} positions",
        spec.embed.positions.skip_padding and "GPT-2 numbers every position, padding included; this model counts "
        "only the real tokens (`learned(skip_padding = true)`)",
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


F = S.Feature
DECODER_FEATURES = frozenset({F.ROPE, F.GEGLU_TANH, F.ROPE_SCALING})  # what every rope decoder's config holds


def _features(spec: S.Spec, fam: str, allowed: frozenset) -> list[str | None]:
    """One problem per language feature the family has no config field for, naming where the spec writes it."""
    return [f"{fam} has no place for {f} (`{S.FEATURE_FIELDS.get(f, f)}`)"
            for f in sorted(S.features(spec) - allowed)]


@dataclass(frozen=True)
class Decoder:
    """How a rope decoder family's config differs: biases, window, q/k norm, partial rope, fused projections."""

    key: str  # model_type
    arch: str
    bias: str  # "all": `attention_bias` (q, k, v, o); "qkv": q, k, v only (Qwen2); "none"
    window: str  # "none" | "all" (one `sliding_window`, Mistral, Phi-3) | "layers" (`layer_types`, Qwen2, Qwen3)
    qk_norm: bool = False  # Qwen3: RMSNorm per head on q and k, eps `rms_norm_eps`, on every layer
    partial: bool = False  # Phi-3: `partial_rotary_factor`; else rope over the whole head
    mlp_bias: bool = False  # Llama: `mlp_bias`; else no MLP biases
    head_dim: bool = True  # the config has `head_dim` (else heads · head_dim = width)
    moe: str = "none"  # "all": experts on every layer (Mixtral); "shared": experts + a gated shared expert on
    #                    some layers, dense ones in `mlp_only_layers` (Qwen2-MoE)
    tasks: tuple[str, ...] = ("classify", "token", "span")  # the task heads transformers has classes for


DECODERS = {d.key: d for d in (
    Decoder("llama", "LlamaForCausalLM", "all", "none", mlp_bias=True),
    Decoder("mistral", "MistralForCausalLM", "none", "all"),
    Decoder("qwen2", "Qwen2ForCausalLM", "qkv", "layers"),
    Decoder("qwen3", "Qwen3ForCausalLM", "all", "layers", qk_norm=True),
    Decoder("phi3", "Phi3ForCausalLM", "none", "all", partial=True, head_dim=False, tasks=("classify", "token")),
    Decoder("mixtral", "MixtralForCausalLM", "none", "all", moe="all"),
    Decoder("qwen2_moe", "Qwen2MoeForCausalLM", "qkv_bias", "layers", moe="shared"),
)}


def _bias_problems(spec: S.Spec, fam: str, d: Decoder) -> list[str | None]:
    att = [ly.attention for ly in spec.layers]
    if d.bias == "all":
        return [_every(spec, lambda ly: ly.attention.bias != ly.attention.out_bias and
                       f"{fam}'s `attention_bias` covers q, k, v and o together; layer {{i}} has "
                       f"bias = {_show(ly.attention.bias)}, out_bias = {_show(ly.attention.out_bias)}"),
                _same(fam, "attention_bias", [a.bias for a in att])]
    if d.bias == "qkv_bias":  # one `qkv_bias` for q, k, v; o has none
        return [_every(spec, lambda ly: ly.attention.out_bias and
                       f"{fam}'s o_proj has no bias; layer {{i}} has out_bias = true"),
                _same(fam, "qkv_bias", [a.bias for a in att])]
    want = (d.bias == "qkv", False)
    what = "biases on q, k, v only" if d.bias == "qkv" else "no attention biases"
    return [_every(spec, lambda ly: (ly.attention.bias, ly.attention.out_bias) != want and
                   f"{fam} has {what} (no config field); layer {{i}} has bias = {_show(ly.attention.bias)}, "
                   f"out_bias = {_show(ly.attention.out_bias)}")]


def _window_problems(spec: S.Spec, fam: str, d: Decoder) -> list[str | None]:
    ws = [ly.attention.window for ly in spec.layers]
    if d.window == "none":
        return [_every(spec, lambda ly: ly.attention.window is not None and
                       f"{fam} has no sliding window (`sliding_window` is Mistral's); layer {{i}} has window = "
                       f"{ly.attention.window}")]
    if d.window == "all":
        return [_same(fam, "sliding_window", ws, "window = ")]
    return [_same(fam, "sliding_window", [w for w in ws if w is not None], "window = ",
                  [f"layer {i}" for i, w in enumerate(ws) if w is not None])]


def _window_config(spec: S.Spec, d: Decoder) -> Config:
    ws = [ly.attention.window for ly in spec.layers]
    w = next((w for w in ws if w is not None), None)
    if d.window == "none":
        return {}
    if d.window == "all":
        return {"sliding_window": w}
    types = ["full_attention" if x is None else "sliding_attention" for x in ws]
    return {"use_sliding_window": w is not None, "sliding_window": w, "layer_types": types,
            "max_window_layers": spec.n_layers if w is None else next(i for i, x in enumerate(ws) if x is not None)}


def _qk_problems(spec: S.Spec, fam: str, d: Decoder) -> list[str | None]:
    if not d.qk_norm:
        return []
    return [_every(spec, lambda ly: ly.attention.qk_norm is None and
                   f"{fam} has RMSNorms on q and k (`q_norm`, `k_norm`) in every layer; layer {{i}} has none"),
            _every(spec, lambda ly: ly.attention.qk_norm is not None and (
                ly.attention.qk_norm.kind != "rmsnorm" or ly.attention.qk_norm.eps != ly.norm.eps) and
                f"{fam}'s q/k norms are RMSNorms with the layers' `rms_norm_eps`; layer {{i}} has qk_norm = "
                f"{_show(ly.attention.qk_norm)} (eps {ly.attention.qk_norm.eps}) beside eps {ly.norm.eps}")]


def _rope_problems(spec: S.Spec, fam: str, d: Decoder) -> list[str | None]:
    att = [ly.attention for ly in spec.layers]
    if d.partial:
        return [_same(fam, "partial_rotary_factor", [a.rotary / a.head_dim for a in att], "rotary_dim / head_dim = ")]
    return [_every(spec, lambda ly: ly.attention.rotary != ly.attention.head_dim and
                   f"{fam} rotates the whole head (`head_dim`); layer {{i}} has rotary_dim {ly.attention.rotary} of "
                   f"head_dim {ly.attention.head_dim}")]


def _mlp_problems(spec: S.Spec, fam: str, d: Decoder) -> list[str | None]:
    """One gated MLP per layer; or Mixtral's experts on every layer; or Qwen2-MoE's experts with a gated shared
    expert, beside dense layers."""
    L = spec.layers  # noqa: N806
    moe, dense = [ly.mlp for ly in L if ly.mlp.moe], [ly.mlp for ly in L if not ly.mlp.moe]
    where = ([f"layer {i}" for i, ly in enumerate(L) if ly.mlp.moe], [f"layer {i}" for i, ly in enumerate(L)
                                                                      if not ly.mlp.moe])
    common = [_every(spec, lambda ly: ly.mlp.activation not in LLAMA_ACTS and
                     f"{fam}'s MLP is gated, {', '.join(LLAMA_ACTS)} (`hidden_act`); layer {{i}} has "
                     f"{ly.mlp.activation}"),
              _same(fam, "hidden_act", [ly.mlp.activation for ly in L])]
    if d.moe == "none":
        return common + [
            _same(fam, "intermediate_size", [m.hidden for m in dense], "", where[1]),
            _same(fam, "mlp_bias", [m.bias for m in dense], "", where[1]) if d.mlp_bias else
            _every(spec, lambda ly: ly.mlp.bias and f"{fam}'s MLP has no biases; layer {{i}} has bias = true")]
    e_key = "num_local_experts" if d.moe == "all" else "num_experts"
    return common + [
        _every(spec, lambda ly: ly.mlp.bias and f"{fam}'s MLP has no biases; layer {{i}} has bias = true"),
        d.moe == "all" and _every(spec, lambda ly: not ly.mlp.moe and
                                  f"{fam} has experts in every layer; layer {{i}} has a dense MLP"),
        not moe and f"{fam} is a mixture of experts (`{e_key}`); this model has dense MLPs only",
        _same(fam, e_key, [m.experts for m in moe], "experts = ", where[0]),
        _same(fam, "num_experts_per_tok", [m.top_k for m in moe], "top_k = ", where[0]),
        _same(fam, "moe_intermediate_size" if d.moe == "shared" else "intermediate_size", [m.hidden for m in moe],
              "hidden = ", where[0]),
        _same(fam, "intermediate_size (dense layers)", [m.hidden for m in dense], "hidden = ", where[1]),
        d.moe == "all" and _every(spec, lambda ly: ly.mlp.moe and not ly.mlp.normalize and
                                  f"{fam} renormalises the top-k gates; layer {{i}} has normalize = false"),
        d.moe == "all" and _every(spec, lambda ly: ly.mlp.shared is not None and
                                  f"{fam} has no shared expert; layer {{i}} has shared = {ly.mlp.shared}"),
        d.moe == "shared" and _same(fam, "norm_topk_prob", [m.normalize for m in moe], "normalize = ", where[0]),
        d.moe == "shared" and _every(spec, lambda ly: ly.mlp.moe and not (ly.mlp.shared and ly.mlp.shared_gate)
                                     and f"{fam} has a shared expert with a sigmoid gate "
                                     f"(`shared_expert_intermediate_size`) beside the experts; layer {{i}} has "
                                     f"shared = {_show(ly.mlp.shared)}, shared_gate = {_show(ly.mlp.shared_gate)}"),
        d.moe == "shared" and _same(fam, "shared_expert_intermediate_size", [m.shared for m in moe], "shared = ",
                                    where[0]),
    ]


def _mlp_config(spec: S.Spec, d: Decoder) -> Config:
    L = spec.layers  # noqa: N806
    moe = [ly.mlp for ly in L if ly.mlp.moe]
    dense = [ly.mlp for ly in L if not ly.mlp.moe]
    if d.moe == "none":
        return {"intermediate_size": L[0].mlp.hidden}
    m = moe[0] if moe else L[0].mlp
    if d.moe == "all":
        return {"intermediate_size": m.hidden, "num_local_experts": m.experts, "num_experts_per_tok": m.top_k}
    return {"intermediate_size": dense[0].hidden if dense else m.hidden, "moe_intermediate_size": m.hidden,
            "num_experts": m.experts, "num_experts_per_tok": m.top_k, "norm_topk_prob": m.normalize,
            "shared_expert_intermediate_size": m.shared, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, ly in enumerate(L) if not ly.mlp.moe]}


def _rope_config(p: S.Positions) -> Config:
    """transformers' `rope_parameters` for rope positions (the inverse of mptc.hf_families._rope)."""
    out: Config = {"rope_type": "default", "rope_theta": p.theta}
    sc = p.scaling
    if sc is None:
        return out
    out |= {"rope_type": sc.kind, "factor": sc.factor}
    if sc.kind in ("llama3", "yarn", "longrope"):
        out["original_max_position_embeddings"] = sc.original
    if sc.kind == "llama3":
        out |= {"low_freq_factor": sc.low, "high_freq_factor": sc.high}
    elif sc.kind == "yarn":
        out |= {"beta_fast": sc.beta_fast, "beta_slow": sc.beta_slow, "attention_factor": sc.attention,
                "truncate": sc.truncate}
    elif sc.kind == "longrope":
        out |= {"attention_factor": sc.attention, "short_factor": list(sc.short), "long_factor": list(sc.long)}
    return out


def _rope_context(spec: S.Spec) -> Config:
    """Dynamic NTK scaling starts past `max_position_embeddings` in transformers: it must be the original context."""
    sc = spec.embed.positions.scaling
    return {"max_position_embeddings": sc.original} if sc is not None and sc.kind == "dynamic" else {}


def _decoder_export(spec: S.Spec, d: Decoder) -> tuple[list[str], Config]:
    """A rope decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3, Mixtral, Qwen2-MoE): RMSNorm, grouped-query attention,
    gated MLPs or experts, a causal LM or a task head."""
    fam = FAMILIES[d.key].name
    L, a0 = spec.layers, spec.layers[0].attention  # noqa: N806
    norms = [ly.norm for ly in L] + [spec.head.norm]
    att = [ly.attention for ly in L]
    allowed = DECODER_FEATURES | {f for f, on in ((F.SLIDING_WINDOW, d.window != "none"), (F.QK_NORM, d.qk_norm),
                                                  (F.PARTIAL_ROTARY, d.partial), (F.MOE_MLP, d.moe != "none")) if on}
    problems = _common(spec, fam, d.tasks) + [
        spec.embed.positions.kind != "rope" and
        f"{fam} has rotary positions (`rope_theta`); this model has {spec.embed.positions.kind} positions",
        # the first four are named above; a q/k norm the family lacks is refused at its weight, with its span
        *_features(spec, fam, allowed | {F.PATCHES, F.SEGMENTS, F.POST_NORM, F.LM_TRANSFORM, F.QK_NORM,
                                         F.LAST_TOKEN_POOLING, F.TOKEN_CLASSIFICATION, F.SPAN_HEAD}),
        spec.head.norm is None and f"{fam} has a final RMSNorm (`model.norm`); this model's head has no norm",
        any(n is not None and n.kind != "rmsnorm" for n in norms) and
        f"{fam}'s norms are RMSNorm (`rms_norm_eps`); this model has "
        f"{next(_show(n) for n in norms if n is not None and n.kind != 'rmsnorm')}",
        _same_eps(spec, fam, "rms_norm_eps"),
        _same(fam, "num_attention_heads", [a.heads for a in att]),
        _same(fam, "num_key_value_heads", [a.kv_heads for a in att]),
        _same(fam, "head_dim", [a.head_dim for a in att]),
        spec.width % a0.heads != 0 and  # the configs check it (transformers 5), although `head_dim` is explicit
        f"{fam}'s config needs `hidden_size` divisible by `num_attention_heads`; width {spec.width}, {a0.heads} heads",
        not d.head_dim and spec.width != a0.heads * a0.head_dim and
        f"{fam}'s head size is `hidden_size` / `num_attention_heads`; this model has heads · head_dim = "
        f"{a0.heads} · {a0.head_dim} ≠ width {spec.width}",
        *_rope_problems(spec, fam, d), *_window_problems(spec, fam, d), *_bias_problems(spec, fam, d),
        *_qk_problems(spec, fam, d),
        *_mlp_problems(spec, fam, d),
    ]
    theta = spec.embed.positions.theta
    rope = _rope_config(spec.embed.positions)
    if d.partial:
        rope["partial_rotary_factor"] = a0.rotary / a0.head_dim
    task = _task(spec) if spec.head.kind != "lm" else None
    arch = d.arch.replace("ForCausalLM", TASK_HEADS[task][0]) if task else d.arch
    config = {
        "model_type": d.key, "architectures": [arch], "vocab_size": spec.vocab,
        "hidden_size": spec.width, "num_hidden_layers": spec.n_layers, **_mlp_config(spec, d),
        "num_attention_heads": a0.heads, "num_key_value_heads": a0.kv_heads,
        "hidden_act": LLAMA_ACTS.get(L[0].mlp.activation), "max_position_embeddings": spec.context or 2048,
        "rms_norm_eps": L[0].norm.eps, "rope_theta": theta, "rope_scaling": None, "rope_parameters": rope,
        **_rope_context(spec),
        "attention_dropout": a0.dropout, "initializer_range": spec.init.std,
        "tie_word_embeddings": spec.head.tied, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        **_window_config(spec, d),
    }
    if task in ("classify", "token"):
        config |= _labels(spec) | ({"token_classification_bias": spec.head.bias} if task == "token" else {})
    if d.head_dim:
        config["head_dim"] = a0.head_dim
    if d.bias in ("all", "qkv_bias"):
        config["attention_bias" if d.bias == "all" else "qkv_bias"] = a0.bias
    if d.mlp_bias:
        config["mlp_bias"] = L[0].mlp.bias
    if d.partial:
        config |= {"partial_rotary_factor": a0.rotary / a0.head_dim, "resid_pdrop": L[0].dropout,
                   "embd_pdrop": spec.embed.dropout,  # Phi-3 reads the pretraining context from the top level
                   "original_max_position_embeddings": rope.get("original_max_position_embeddings",
                                                                spec.context or 2048)}
    return [p for p in problems if p], config


GEMMA = {1: ("gemma", "GemmaForCausalLM"), 2: ("gemma2", "Gemma2ForCausalLM"), 3: ("gemma3_text", "Gemma3ForCausalLM")}
GEMMA_TASKS = {1: ("classify", "token"), 2: ("classify", "token"), 3: ("classify",)}  # Gemma3TextFor…


def _gemma_layers(spec: S.Spec, fam: str, version: int) -> list[str | None]:
    """Gemma's layers: one attention shape, no biases or all (`attention_bias`), sandwich norms from Gemma 2 on,
    Gemma 3's per-head q/k RMSNorms, windows only on the sliding layers, the sliding layers' own rope (Gemma 3)."""
    L, att = spec.layers, [ly.attention for ly in spec.layers]  # noqa: N806
    ws = [a.window for a in att]
    want = "sandwich" if version > 1 else "pre"
    local = [a.rope for a in att if a.window is not None]
    return [
        _every(spec, lambda ly: ly.placement != want and f"{fam} is {want}-norm; layer {{i}} is {ly.placement}-norm"),
        _every(spec, lambda ly: ly.attention.bias != ly.attention.out_bias and
               f"{fam}'s `attention_bias` covers q, k, v and o together; layer {{i}} has bias = "
               f"{_show(ly.attention.bias)}, out_bias = {_show(ly.attention.out_bias)}"),
        _same(fam, "attention_bias", [a.bias for a in att]),
        version == 1 and _every(spec, lambda ly: ly.attention.window is not None and
                                f"Gemma has no sliding window; layer {{i}} has window = {ly.attention.window}"),
        _same(fam, "sliding_window", [w for w in ws if w is not None], "window = ",
              [f"layer {i}" for i, w in enumerate(ws) if w is not None]),
        version == 3 and _every(spec, lambda ly: (ly.attention.qk_norm is None or ly.attention.qk_norm.kind !=
                                                  "rmsnorm" or ly.attention.qk_norm.eps != ly.norm.eps or
                                                  ly.attention.qk_norm_over != "head") and
                                f"Gemma 3 has per-head RMSNorms on q and k with the layers' `rms_norm_eps`; layer "
                                f"{{i}} has qk_norm = {_show(ly.attention.qk_norm)}"),
        _every(spec, lambda ly: ly.attention.rope is not None and ly.attention.window is None and
               f"{fam}'s full-attention layers use the model's rope (`rope_parameters.full_attention`); layer {{i}} "
               "has its own"),
        _same(fam, "rope_parameters.sliding_attention", [r or spec.embed.positions for r in local], "rope ",
              [f"layer {i}" for i, w in enumerate(ws) if w is not None]),
        _same(fam, "query_pre_attn_scalar", [a.scale or a.head_dim ** -0.5 for a in att], "scale "),
        _same(fam, "attn_logit_softcapping", [a.softcap for a in att], "softcap = "),
        _every(spec, lambda ly: ly.mlp.bias and f"{fam}'s MLP has no biases; layer {{i}} has bias = true"),
        _every(spec, lambda ly: ly.mlp.activation not in LLAMA_ACTS and
               f"{fam}'s MLP is gated, {', '.join(LLAMA_ACTS)} (`hidden_activation`); layer {{i}} has "
               f"{ly.mlp.activation}"),
        _same(fam, "hidden_activation", [ly.mlp.activation for ly in L]),
        _same(fam, "intermediate_size", [ly.mlp.hidden for ly in L]),
    ]


def _gemma_export(spec: S.Spec, version: int) -> tuple[list[str], Config]:
    """Gemma, Gemma 2, Gemma 3 (text): token embeddings × √width, RMSNorms written as w − 1, a tied or untied LM."""
    key, arch = GEMMA[version]
    fam, e, h = FAMILIES[key].name, spec.embed, spec.head
    L, a0 = spec.layers, spec.layers[0].attention  # noqa: N806
    norms = [ly.norm for ly in L] + [h.norm]
    allowed = {F.ROPE, F.ROPE_SCALING, F.GEGLU_TANH, F.EMBEDDING_SCALE, F.ATTENTION_SCALE} | (
        {F.SANDWICH_NORMS, F.SLIDING_WINDOW, F.ATTENTION_SOFTCAP, F.LOGIT_SOFTCAP} if version > 1 else set()) | (
        {F.QK_NORM, F.LAYER_ROPE} if version == 3 else set())
    problems = _common(spec, fam, GEMMA_TASKS[version])[:6] + [
        e.positions.kind != "rope" and f"{fam} has rotary positions; this model has {e.positions.kind} positions",
        spec.embed_scale != spec.width ** 0.5 and
        f"{fam} scales its token embeddings by √`hidden_size`; this model has embed.scale = {_show(e.scale)}",
        *_features(spec, fam, frozenset(allowed) | {F.PATCHES, F.SEGMENTS, F.LM_TRANSFORM, F.QK_NORM,
                                                     F.LAST_TOKEN_POOLING, F.TOKEN_CLASSIFICATION}),
        h.norm is None and f"{fam} has a final RMSNorm (`model.norm`); this model's head has no norm",
        any(n is not None and n.kind != "rmsnorm" for n in norms) and f"{fam}'s norms are RMSNorm (`rms_norm_eps`)",
        _same_eps(spec, fam, "rms_norm_eps"),
        _same(fam, "num_attention_heads", [a.heads for a in (ly.attention for ly in L)]),
        _same(fam, "num_key_value_heads", [ly.attention.kv_heads for ly in L]),
        _same(fam, "head_dim", [ly.attention.head_dim for ly in L]),
        _every(spec, lambda ly: ly.attention.rotary != ly.attention.head_dim and
               f"{fam} rotates the whole head; layer {{i}} has rotary_dim {ly.attention.rotary}"),
        _every(spec, lambda ly: ly.attention.mask != "causal" and f"{fam} is causal; layer {{i}} is bidirectional"),
        *_shared(spec, fam), *_gemma_layers(spec, fam, version),
    ]
    local = next((ly.attention.rope for ly in L if ly.attention.window is not None and ly.attention.rope), None)
    window = next((ly.attention.window for ly in L if ly.attention.window is not None), None)
    task = _task(spec) if h.kind != "lm" else None
    if task:
        arch = (arch.replace("Gemma3For", "Gemma3TextFor") if version == 3 else arch).replace(
            "ForCausalLM", TASK_HEADS[task][0])
    config = {
        "model_type": key, "architectures": [arch], "vocab_size": spec.vocab, "hidden_size": spec.width,
        "intermediate_size": L[0].mlp.hidden, "num_hidden_layers": spec.n_layers, "num_attention_heads": a0.heads,
        "num_key_value_heads": a0.kv_heads, "head_dim": a0.head_dim, "rms_norm_eps": L[0].norm.eps,
        "hidden_act": LLAMA_ACTS.get(L[0].mlp.activation), "hidden_activation": LLAMA_ACTS.get(L[0].mlp.activation),
        "max_position_embeddings": spec.context or 8192, "attention_bias": a0.bias, "attention_dropout": a0.dropout,
        "initializer_range": spec.init.std, "tie_word_embeddings": h.tied, "bos_token_id": None,
        "eos_token_id": None, "pad_token_id": None, **_rope_context(spec),
        **(_labels(spec) | ({"token_classification_bias": h.bias} if task == "token" else {}) if task else {}),
    }
    if version == 1:
        return [p for p in problems if p], config | {"rope_parameters": _rope_config(e.positions)}
    qpas = (a0.scale or a0.head_dim ** -0.5) ** -2
    problems.append(abs(qpas - round(qpas)) > 1e-6 * qpas and
                    f"{fam}'s `query_pre_attn_scalar` is a whole number (scores × its −½ power); this model's scale "
                    f"{a0.scale} gives {qpas:g}")
    config |= {"query_pre_attn_scalar": round(qpas), "sliding_window": window,
               "layer_types": ["full_attention" if ly.attention.window is None else "sliding_attention" for ly in L],
               "attn_logit_softcapping": a0.softcap, "final_logit_softcapping": h.softcap}
    if version == 2:
        return [p for p in problems if p], config | {"rope_parameters": _rope_config(e.positions)}
    return [p for p in problems if p], config | {"rope_parameters": {
        "full_attention": _rope_config(e.positions), "sliding_attention": _rope_config(local or e.positions)}}


PLAIN_EXPORT_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
ENCODERS = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}  # model_type → class prefix
ROBERTA_PAD = 1  # RoBERTa's pad_token_id: real tokens use position rows pad + 1 …


def _layernorms(spec: S.Spec, fam: str, key: str, where: list[tuple[str, S.Norm | None]]) -> list[str | None]:
    """Every norm named in `where` is a layernorm with bias, all with one eps (the config field `key`)."""
    bad = next(((w, n) for w, n in where if n is not None and not (n.kind == "layernorm" and n.bias)), None)
    have = [(w, n) for w, n in where if n is not None]
    return [bad and f"{fam}'s norms are layernorms with bias (`{key}`); {bad[0]} has {_show(bad[1])}",
            _same(fam, key, [n.eps for _, n in have], "eps ", [w for w, _ in have])]


def _encoder_layers(spec: S.Spec, fam: str, placement: str) -> list[str | None]:
    """Multi-head bidirectional attention with all biases, a plain MLP with biases, one size per config field."""
    L = spec.layers  # noqa: N806
    att = [ly.attention for ly in L]
    return [
        _every(spec, lambda ly: ly.placement != placement and
               f"{fam} is {placement}-norm; layer {{i}} is {ly.placement}-norm"),
        _every(spec, lambda ly: ly.attention.mask != "bidirectional" and
               f"{fam} is bidirectional; layer {{i}} is causal"),
        _every(spec, lambda ly: ly.attention.kv_heads != ly.attention.heads and
               f"{fam} has no grouped-query attention; layer {{i}} has kv_heads = {ly.attention.kv_heads} "
               f"for heads = {ly.attention.heads}"),
        _every(spec, lambda ly: ly.attention.heads * ly.attention.head_dim != spec.width and
               f"{fam}'s head size is `hidden_size` / `num_attention_heads`; layer {{i}} has heads · head_dim = "
               f"{ly.attention.heads} · {ly.attention.head_dim} ≠ width {spec.width}"),
        _same(fam, "num_attention_heads", [a.heads for a in att]),
        _every(spec, lambda ly: not ly.attention.out_bias and
               f"{fam}'s attention output always has a bias; layer {{i}} has out_bias = false"),
        _every(spec, lambda ly: ly.mlp.activation not in PLAIN_EXPORT_ACTS and
               f"{fam}'s MLP is one of {', '.join(PLAIN_EXPORT_ACTS)} (`hidden_act`); layer {{i}} has "
               f"{ly.mlp.activation}"),
        _same(fam, "hidden_act", [ly.mlp.activation for ly in L]),
        _same(fam, "intermediate_size", [ly.mlp.hidden for ly in L]),
        _every(spec, lambda ly: not ly.mlp.bias and f"{fam}'s MLP always has biases; layer {{i}} has bias = false"),
        *_shared(spec, fam),
    ]


def _head_problems(spec: S.Spec, fam: str, kinds: tuple[str, ...], pool_tanh: bool = True) -> list[str | None]:
    """An MLM head (dense + the MLP's activation + layernorm, bias) or a classifier on the first token."""
    h, act = spec.head, spec.layers[0].mlp.activation
    kind = _encoder_head(spec)
    if kind not in kinds:
        return [f"{fam} export writes {' or '.join(ENCODER_HEADS[k] for k in kinds)}; this model has "
                f"{_head_words(spec)}"]
    if kind in ("token", "span"):  # a dense layer on every token's final state
        return [not h.bias and f"{fam}'s {ENCODER_HEADS[kind]} has a bias; this model's has bias = false",
                h.norm is not None and f"{fam} has no final norm; this model's head has one"]
    if h.kind == "lm":
        t = h.transform
        return [not h.bias and f"{fam}'s MLM decoder has a bias; this model's head has bias = false",
                t is None and f"{fam}'s MLM head has a dense transform and a layernorm; this model's head has none",
                t is not None and t.activation != act and
                f"{fam}'s MLM transform uses `hidden_act` ({act}); this model's has {t.activation}",
                t is not None and t.norm is None and f"{fam}'s MLM transform ends in a layernorm; this one has none",
                h.norm is not None and f"{fam} has no final norm before the MLM head; this model's head has one"]
    return [h.pool != "first" and f"{fam}'s classifier reads the first token; this model pools {h.pool}",
            h.pooler != pool_tanh and (f"{fam}'s classifier has a dense + tanh before the output; this model's has "
                                       "none" if pool_tanh else f"{fam}'s classifier has no dense + tanh pooler"),
            not h.bias and f"{fam}'s classifier has a bias; this model's has bias = false",
            pool_tanh and h.norm is not None and f"{fam} has no final norm; this model's head has one"]


ENCODER_HEADS = {"lm": "a masked LM", "classify": "a sequence classifier", "token": "a token classifier",
                 "span": "extractive QA", "none": "a base model"}
ENCODER_CLASSES = {"lm": "ForMaskedLM", "classify": "ForSequenceClassification", "token": "ForTokenClassification",
                   "span": "ForQuestionAnswering", "none": "Model"}


def _encoder_head(spec: S.Spec) -> str:
    """The encoder task of the head: lm, classify (first token), token (every token), span, none."""
    h = spec.head
    return "token" if h.kind == "classify" and h.pool == "none" else h.kind


def _labels(spec: S.Spec) -> Config:
    n = spec.head.classes or 2
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(n)}, "label2id": {f"LABEL_{i}": i for i in range(n)}}


def _bert_export(spec: S.Spec, key: str) -> tuple[list[str], Config]:
    """BERT, RoBERTa, XLM-R: learned positions, token types, embedding layernorm, post-norm, a task head."""
    fam, e, h = FAMILIES[key].name, spec.embed, spec.head
    norms = [("the embedding norm", e.norm)] + [(f"layer {i}", ly.norm) for i, ly in enumerate(spec.layers)] + \
        [("the MLM transform", h.transform.norm if h.kind == "lm" and h.transform else None)]
    offset = ROBERTA_PAD + 1 if key != "bert" else 0
    problems = [
        not spec.reads_tokens and f"{fam} reads tokens; this model reads image patches",
        e.positions.kind != "learned" and
        f"{fam} has learned positions (`max_position_embeddings`); this model has {e.positions.kind} positions",
        spec.context is None and f"{fam} has a position table (`max_position_embeddings`); this model has no context",
        e.positions.kind == "learned" and e.positions.skip_padding != bool(offset) and (
            f"{fam} counts positions over the real tokens only; this model numbers every position (set `positions = "
            "learned(skip_padding = true)`)" if offset else
            f"{fam} numbers every position, padding included; this model counts only the real tokens "
            "(`learned(skip_padding = true)`)"),
        e.norm is None and f"{fam} has an embedding layernorm; this model has no embed.norm",
        e.segments < 1 and f"{fam} has token types (`type_vocab_size` ≥ 1); this model has segments = 0",
        *_features(spec, fam, frozenset({F.SEGMENTS, F.POST_NORM, F.LM_TRANSFORM, F.POOLER, F.PATCHES, F.ROPE,
                                         F.SINUSOIDAL, F.TOKEN_CLASSIFICATION, F.SPAN_HEAD})),
        *_layernorms(spec, fam, "layer_norm_eps", norms),
        *_encoder_layers(spec, fam, "post"),
        _same(fam, "q, k, v biases (always on)", [True] + [ly.attention.bias for ly in spec.layers], "bias = ",
              ["the family"] + [f"layer {i}" for i in range(spec.n_layers)]),
        *_head_problems(spec, fam, ("lm", "classify", "token", "span")),
    ]
    L, a0, cls = spec.layers, spec.layers[0].attention, ENCODERS[key]  # noqa: N806
    config = {
        "model_type": key, "architectures": [cls + ENCODER_CLASSES[_encoder_head(spec)]],
        "vocab_size": spec.vocab, "hidden_size": spec.width, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": a0.heads, "intermediate_size": L[0].mlp.hidden,
        "hidden_act": PLAIN_EXPORT_ACTS.get(L[0].mlp.activation), "hidden_dropout_prob": L[0].dropout,
        "attention_probs_dropout_prob": a0.dropout, "max_position_embeddings": (spec.context or 0) + offset,
        "type_vocab_size": e.segments, "layer_norm_eps": L[0].norm.eps, "initializer_range": spec.init.std,
        "position_embedding_type": "absolute", "tie_word_embeddings": bool(h.tied),
        "pad_token_id": ROBERTA_PAD if offset else 0, "bos_token_id": None, "eos_token_id": None,
        **(_labels(spec) if h.kind in ("classify", "span") else {}),
    }
    return [p for p in problems if p], config


def _distilbert_export(spec: S.Spec) -> tuple[list[str], Config]:
    """DistilBERT: BERT without token types or pooler, layernorms of eps 1e-12 (fixed), an MLM head or none."""
    fam, e, h = "DistilBERT", spec.embed, spec.head
    norms = [("the embedding norm", e.norm)] + [(f"layer {i}", ly.norm) for i, ly in enumerate(spec.layers)] + \
        [("the MLM transform", h.transform.norm if h.kind == "lm" and h.transform else None)]
    problems = [
        not spec.reads_tokens and f"{fam} reads tokens; this model reads image patches",
        e.positions.kind != "learned" and f"{fam} has learned positions; this model has {e.positions.kind} positions",
        e.positions.skip_padding and f"{fam} numbers every position, padding included; this model counts only the "
        "real tokens (`learned(skip_padding = true)`)",
        spec.context is None and f"{fam} has a position table (`max_position_embeddings`); this model has no context",
        e.norm is None and f"{fam} has an embedding layernorm; this model has no embed.norm",
        *_features(spec, fam, frozenset({F.POST_NORM, F.LM_TRANSFORM, F.PATCHES, F.ROPE, F.SINUSOIDAL,
                                         F.TOKEN_CLASSIFICATION, F.SPAN_HEAD})),
        *_layernorms(spec, fam, "eps", norms),
        next((f"{fam}'s layernorms have eps 1e-12 (fixed, no config field); {w} has eps {n.eps}"
              for w, n in norms if n is not None and n.eps != 1e-12), None),
        *_encoder_layers(spec, fam, "post"),
        _every(spec, lambda ly: not ly.attention.bias and f"{fam}'s q, k, v have biases; layer {{i}} has none"),
        *(_head_problems(spec, fam, ("lm", "token", "span", "none")) if h.kind != "none" else []),
    ]
    L, a0 = spec.layers, spec.layers[0].attention  # noqa: N806
    config = {
        "model_type": "distilbert", "architectures": ["DistilBert" + ENCODER_CLASSES[_encoder_head(spec)]],
        "vocab_size": spec.vocab, "dim": spec.width, "n_layers": spec.n_layers, "n_heads": a0.heads,
        "hidden_dim": L[0].mlp.hidden, "activation": PLAIN_EXPORT_ACTS.get(L[0].mlp.activation),
        "dropout": L[0].dropout, "attention_dropout": a0.dropout, "max_position_embeddings": spec.context,
        "initializer_range": spec.init.std, "sinusoidal_pos_embds": False, "tie_word_embeddings": bool(h.tied),
        "pad_token_id": 0, **(_labels(spec) if h.kind in ("classify", "span") else {}),
    }
    return [p for p in problems if p], config


def _vit_export(spec: S.Spec) -> tuple[list[str], Config]:
    """ViTForImageClassification: square patches with a class token, learned positions, pre-norm layernorm."""
    fam, e, h, p = "ViT", spec.embed, spec.head, spec.patches
    norms = [(f"layer {i}", ly.norm) for i, ly in enumerate(spec.layers)] + [("the head", h.norm)]
    problems = [
        (p is None or spec.reads_tokens) and f"{fam} reads image patches only; this model reads tokens",
        p is not None and not p.cls and f"{fam} has a class token; this model's patches have cls = false",
        e.positions.kind != "learned" and f"{fam} has learned positions; this model has {e.positions.kind} positions",
        *_features(spec, fam, frozenset({F.PATCHES, F.ROPE, F.SINUSOIDAL, F.MULTIMODAL})),  # positions named above
        e.norm is not None and f"{fam} has no embedding norm; this model has embed.norm",
        h.norm is None and f"{fam} has a final layernorm (`vit.layernorm`); this model's head has no norm",
        *_layernorms(spec, fam, "layer_norm_eps", norms),
        *_encoder_layers(spec, fam, "pre"),
        _same(fam, "qkv_bias", [ly.attention.bias for ly in spec.layers]),
        *_head_problems(spec, fam, ("classify",), pool_tanh=False),
    ]
    L, a0 = spec.layers, spec.layers[0].attention  # noqa: N806
    config = {
        "model_type": "vit", "architectures": ["ViTForImageClassification"], "hidden_size": spec.width,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": a0.heads, "intermediate_size": L[0].mlp.hidden,
        "hidden_act": PLAIN_EXPORT_ACTS.get(L[0].mlp.activation), "hidden_dropout_prob": L[0].dropout,
        "attention_probs_dropout_prob": a0.dropout, "layer_norm_eps": L[0].norm.eps,
        "image_size": p.image if p else None, "patch_size": p.patch if p else None,
        "num_channels": p.channels if p else None, "qkv_bias": a0.bias, "initializer_range": spec.init.std,
        **_labels(spec),
    }
    return [p for p in problems if p], config


EXPORTS: dict[str, Callable[[S.Spec], tuple[list[str], Config]]] = {  # in order of preference when several fit
    "gpt2": _gpt2_export,
    **{k: partial(_decoder_export, d=DECODERS[k]) for k in ("qwen3", "llama", "mistral", "qwen2", "phi3", "mixtral",
                                                              "qwen2_moe")},
    **{GEMMA[v][0]: partial(_gemma_export, version=v) for v in GEMMA},
    **{k: partial(_bert_export, key=k) for k in ENCODERS},
    "distilbert": _distilbert_export,
    "vit": _vit_export,
}
HEAD_NAMES = {  # checkpoint names that depend on the head (the tables list a classifier's first)
    ("bert", "lm"): {"head.out.weight": "cls.predictions.decoder.weight",
                     "head.out.bias": "cls.predictions.decoder.bias"},
    ("roberta", "lm"): {"head.out.weight": "lm_head.decoder.weight", "head.out.bias": "lm_head.decoder.bias"},
    ("xlm-roberta", "lm"): {"head.out.weight": "lm_head.decoder.weight", "head.out.bias": "lm_head.decoder.bias"},
}
EXPORTABLE = frozenset({  # every feature some export family holds
    F.ROPE, F.ROPE_SCALING, F.PARTIAL_ROTARY, F.QK_NORM, F.SLIDING_WINDOW, F.SEGMENTS, F.PATCHES, F.POST_NORM,
    F.LM_TRANSFORM, F.POOLER, F.MOE_MLP, F.GEGLU_TANH, F.EMBEDDING_SCALE, F.ATTENTION_SCALE, F.SANDWICH_NORMS,
    F.ATTENTION_SOFTCAP, F.LOGIT_SOFTCAP, F.LAYER_ROPE, F.LAST_TOKEN_POOLING, F.TOKEN_CLASSIFICATION, F.SPAN_HEAD})
UNTIED_BIAS = {"bert": ("cls.predictions.bias", "cls.predictions.decoder.bias"),  # (unused twin, the one read)
               "roberta": ("lm_head.bias", "lm_head.decoder.bias"),
               "xlm-roberta": ("lm_head.bias", "lm_head.decoder.bias")}


def _export_config(spec: S.Spec, family: str | None) -> tuple[str, Config]:
    """The family (given, or the one with the fewest problems) and its config; else MptcError naming the field.

    Among families that fit, the one the spec is named after wins (`model roberta` → RoBERTa), else the first.
    """
    if family is not None and family not in EXPORTS:
        raise MptcError(f"cannot export to family '{family}'", hint=f"export-hf writes: {', '.join(EXPORTS)}")
    unheld = sorted(S.features(spec) - EXPORTABLE)
    if family is None and unheld:
        raise MptcError(f"cannot export as a Hugging Face checkpoint: no family export-hf writes holds "
                        f"{', '.join(f'{f} (`{S.FEATURE_FIELDS.get(f, f)}`)' for f in unheld)}",
                        hint="keep the model in mptc's own format, or compile it to ONNX")
    tried = {name: EXPORTS[name](spec) for name in ([family] if family else EXPORTS)}
    name = min(tried, key=lambda n: (len(tried[n][0]), n.replace("-", "_") != spec.name))  # the closest family
    problems, config = tried[name]
    if not problems:
        return name, config
    rest = f"; also: {'; '.join(problems[1:4])}" + (" …" if len(problems) > 4 else "") if len(problems) > 1 else ""
    if "config has one `" in problems[0]:  # per-layer values (an extracted model's widths): deploy holds them
        raise MptcError(f"cannot export as {FAMILIES[name].name}: {problems[0]}", hint=(
            "a Hugging Face config holds one value for all layers; to deploy per-layer shapes, `mptc deploy DIR -o "
            "OUT` writes an ONNX Runtime GenAI dir (each layer's shape read from the graph; docs/deploy.md), or "
            "`mptc compile DIR -o X.onnx` one ONNX file" + rest))
    raise MptcError(f"cannot export as {FAMILIES[name].name}: {problems[0]}", hint=(
        f"export-hf writes {', '.join(FAMILIES[k].name for k in EXPORTS)}, with one value per config field for all "
        "layers" + rest))


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


def _unflat(spec: S.Spec, name: str, t: Tensor) -> Tensor:
    """ViT's layouts: cls (1, 1, D), positions (1, N + 1, D), patch kernel (D, C, p, p)."""
    if name == "embed.patch.weight":
        p = spec.patches
        return t.reshape(spec.width, p.channels, p.patch, p.patch)
    return t.reshape(1, *t.shape) if t.dim() == 2 else t.reshape(1, 1, -1)


def _hf_state(model: fx.GraphModule, fam: Family, names: dict[str, str] | None = None, pad_rows: int = 0
              ) -> dict[str, Tensor]:
    """The model's tensors under their Hugging Face names: Conv1D transposed, fused blocks joined, ViT's shapes,
    RoBERTa's position table after `pad_rows` zero rows. A tensor the family's table has no name for raises
    MptcError naming it. names: checkpoint names that replace the table's first spelling."""
    sd, table, spec = model.state_dict(), fam.weights, spec_of(model)
    groups: dict[str, list[tuple[int, Tensor, bool]]] = {}
    for name, info in param_info(model).items():
        tmpl, i = _template(name)
        if tmpl not in table:
            raise _no_place(spec, fam.name, name, info)
        m, t = table[tmpl], sd[name].detach()
        if m.flat:
            t = _unflat(spec, name, t)
        if m.plus_one:  # Gemma stores w − 1 for a gain of w
            t = t - 1
        if m.offset and pad_rows:
            t = torch.cat([t.new_zeros(pad_rows, t.shape[1]), t])
        key = _at((names or {}).get(tmpl, m.hf[0]), i)
        if m.experts:  # (E, …) → one tensor per expert
            for e in range(t.shape[0]):
                groups.setdefault(key.replace("{e}", str(e)), []).append((0, t[e], False))
            continue
        groups.setdefault(key, []).append((m.part or 0, t, m.conv1d))
    out = {}
    for key, parts in groups.items():
        t = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p, _ in sorted(parts, key=lambda x: x[0])])
        out[key] = (t.t() if parts[0][2] and t.dim() == 2 else t).contiguous().cpu()  # Conv1D: (in, out)
    return out


def _head_names(name: str, spec: S.Spec) -> dict[str, str] | None:
    """Checkpoint names of the head where they depend on it (MLM decoders, token classifiers, QA)."""
    if name in ENCODERS or name == "distilbert":
        out = {"token": "classifier", "span": "qa_outputs"}.get(_encoder_head(spec))
    elif name != "vit" and spec.head.kind != "lm":
        out = TASK_HEADS[_task(spec)][2] if _task(spec) else None
    else:
        out = None
    if out is None:
        return HEAD_NAMES.get((name, spec.head.kind))
    return {"head.out.weight": f"{out}.weight", "head.out.bias": f"{out}.bias"}


def to_hf(model: fx.GraphModule, path: str | os.PathLike, family: str | None = None,
          tokens: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors that the class in `architectures` loads with `from_pretrained`.

    family: a key of EXPORTS (default: the family the model fits). Models the family's config cannot hold
    (per-layer sizes, a norm placement, a feature it lacks, …) raise MptcError naming the config field.
    tokens: bos / eos / pad ids for the config (`mptc.hf.special_tokens` of an imported model dir); a decoder's
    sequence classifier needs `pad_token_id` in transformers to find the last real token of a padded batch.
    """
    spec = spec_of(model)
    name, config = _export_config(spec, family)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config |= {"dtype": dtype, "torch_dtype": dtype}
    config |= {k: v for k, v in (tokens or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    pad = config["max_position_embeddings"] - spec.context if name in ("roberta", "xlm-roberta") else 0
    tensors = _hf_state(model, FAMILIES[name], _head_names(name, spec), pad)
    if spec.head.kind == "span" and name in QA_TRANSFORMER:  # transformers' base model prefix for these classes
        tensors = {("transformer." + k.removeprefix("model.")) if k.startswith("model.") else k: t
                   for k, t in tensors.items()}
    if spec.head.kind == "lm" and not spec.head.tied and name in UNTIED_BIAS:  # the class keeps an unused twin
        twin, used = UNTIED_BIAS[name]
        tensors[twin] = tensors[used].clone()
    with atomic_dir(path, kind="hf") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(path)


export_hf = to_hf
