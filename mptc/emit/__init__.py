"""ONNX written straight from the Spec and the weights, without tracing (docs/onnx.md).

Two profiles: `portable` (standard ONNX ops; without a cache the same inputs and outputs as the
traced export, with one a KV cache per layer) and `genai` (ONNX Runtime GenAI's fused ops:
GroupQueryAttention with rotary inside, Skip/SimplifiedLayerNormalization). `unsupported` says what a
spec uses that the emitter does not cover; `emit` builds the graph.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields

import onnx

from .. import spec as S
from ..errors import MptcError
from ..files import ONNX_OPSET
from ..graph import spec_of
from . import attention as portable
from . import genai
from .blocks import Ctx, add_norm, embed, head, mlp, norm
from .graph import DTYPES, DataType, Graph, Value
from .model import LazyModel
from .nested import active
from .weights import Weights, from_module

__all__ = ["Emitted", "LayerCache", "PROFILES", "emit", "unsupported"]

PROFILES = ("portable", "genai")

# The fields the emitter covers, per spec dataclass; any other field off its default is refused by name.
COVERED: dict[type, set[str]] = {
    S.Spec: {"name", "width", "layers", "head", "vocab", "context", "embed", "init", "spans", "tasks"},
    S.Embed: {"input", "positions", "dropout", "norm", "segments", "scale"},
    S.Patches: {"image", "patch", "channels", "cls"},
    S.Positions: {"kind", "theta", "scaling", "skip_padding"},
    S.RopeScaling: {"kind", "factor", "original", "low", "high", "beta_fast", "beta_slow", "attention", "truncate",
                    "short", "long"},
    S.Norm: {"kind", "eps", "bias"},
    S.Layer: {"attention", "mlp", "norm", "placement", "dropout", "parallel", "shared_norm", "skippable"},
    S.Attention: {"heads", "kv_heads", "head_dim", "value_dim", "mask", "bias", "out_bias", "dropout", "rotary_dim",
                  "window", "qk_norm", "scale", "softcap", "qk_norm_over", "rope", "nested"},
    S.MLP: {"hidden", "activation", "bias", "experts", "top_k", "normalize", "shared", "shared_gate", "nested"},
    S.Head: {"kind", "norm", "tied", "bias", "classes", "pool", "pooler", "transform", "softcap"},
    S.Transform: {"activation", "norm"},
    S.Init: {"std"},
}
# The language features (`mptc.spec.features`) the emitter writes; any other one is refused by name.
FEATURES = frozenset({
    S.Feature.ROPE, S.Feature.PARTIAL_ROTARY, S.Feature.SINUSOIDAL, S.Feature.QK_NORM, S.Feature.SLIDING_WINDOW,
    S.Feature.SEGMENTS, S.Feature.POST_NORM, S.Feature.LM_TRANSFORM, S.Feature.POOLER, S.Feature.MEAN_POOLING,
    S.Feature.EMBEDDING_SCALE, S.Feature.ATTENTION_SCALE, S.Feature.LOGIT_SOFTCAP, S.Feature.GEGLU_TANH,
    S.Feature.ROPE_SCALING, S.Feature.LAST_TOKEN_POOLING, S.Feature.SANDWICH_NORMS, S.Feature.OUTPUT_NORMS,
    S.Feature.PARALLEL_RESIDUAL, S.Feature.ATTENTION_SOFTCAP, S.Feature.QK_NORM_ALL, S.Feature.LAYER_ROPE,
    S.Feature.PATCHES, S.Feature.MOE_MLP, S.Feature.TOKEN_CLASSIFICATION, S.Feature.SPAN_HEAD, S.Feature.NESTED,
    S.Feature.TASKS,
})
FIXED_SCALING = ("linear", "llama3", "yarn")  # rope scalings with fixed frequencies (tables made once)
SCALINGS = FIXED_SCALING + ("dynamic", "longrope")  # and those whose frequencies follow the length (in the graph)
LABELS = {  # what a refused field is, in words
    "types": "token types", "experts": "mixture-of-experts embeddings", "condition": "FiLM from the side input",
    "adaptive": "FiLM modulation", "hyper": "hypernetwork deltas", "modulate": "per-type modulation",
    "conditions": "the side input", "segments": "token-type ids",
}


@dataclass(frozen=True)
class LayerCache:
    """One layer's KV cache: key (B, kv_heads, T, head_dim), value (B, kv_heads, T, value_dim)."""

    kv_heads: int
    head_dim: int
    value_dim: int
    form: str  # genai | portable: the attention form this layer was emitted in
    window: int | None = None


@dataclass
class Emitted:
    model: LazyModel  # weights wrap the model's tensors (transposed or cast ones are made at save time)
    layers: list[LayerCache] = field(default_factory=list)  # per layer, with a cache; else empty
    notes: list[str] = field(default_factory=list)  # what was chosen and why

    @property
    def share_buffer(self) -> bool:
        """Whether ONNX Runtime GenAI may share past and present buffers (every layer in the GenAI form)."""
        return bool(self.layers) and all(ly.form == "genai" for ly in self.layers)

    def to_proto(self) -> onnx.ModelProto:
        """The model with its weights inside (each one made now)."""
        return self.model.to_proto()

    def save(self, path: str | os.PathLike, external_data: bool) -> None:
        """Write `path` (and `path.data` with the weights, if external), one tensor at a time."""
        self.model.save(path, external_data)


# --- coverage ---
def _walk(obj, path: str, out: dict[str, list[str]]) -> None:
    """Every field of a spec dataclass that is outside COVERED and off its default, by label."""
    covered = COVERED.get(type(obj))
    for f in fields(obj):
        v, where = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if covered is not None and f.name in covered:
            for k, x in enumerate(v) if isinstance(v, tuple) and f.name == "layers" else [(None, v)]:
                if type(x) in COVERED:
                    _walk(x, where if k is None else f"{where}.{k}", out)
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is MISSING or v != default:
            out.setdefault(_label(f.name, where), []).append(where)


def _plain(path: str) -> str:
    """`layers.2.attention.scale` → `layers.attention.scale` (as mptc.spec.FEATURE_FIELDS writes places)."""
    return re.sub(r"\.\d+(?=\.|$)", "", path)


def _label(name: str, where: str) -> str:
    if name in LABELS:
        return LABELS[name]
    for f, place in S.FEATURE_FIELDS.items():
        if _plain(where) in (part.split("=")[0].strip() for part in place.split(",")):
            return f.value
    return name.replace("_", " ")


def unsupported(spec: S.Spec, *, cache: bool, profile: str = "portable") -> list[str]:
    """[] when the emitter covers the spec; else one reason per feature, naming where it is."""
    found: dict[str, list[str]] = {}
    _walk(spec, "", found)
    if spec.multimodal:
        found.setdefault("image patches and tokens in one sequence", []).append("embed.input")
    ropes = {"embed.positions": spec.embed.positions} | {f"layers.{i}.attention.rope": ly.attention.rope
                                                          for i, ly in enumerate(spec.layers) if ly.attention.rope}
    for where, pos in ropes.items():
        if pos.kind == "rope" and pos.scaling is not None and pos.scaling.kind not in SCALINGS:
            found.setdefault(f"rope scaling {pos.scaling.kind}", []).append(f"{where}.scaling")
    if spec.embed.positions.kind == "sinusoidal" and spec.seq_len is None:
        found.setdefault("sinusoidal positions without a context", []).append("context")
    if profile not in PROFILES:
        found.setdefault(f"the profile '{profile}' (one of {', '.join(PROFILES)})", []).append("profile")
    if profile == "genai" and not cache:
        found.setdefault("the genai profile without a KV cache (it is a decoder with cache=True)", []).append("cache")
    if cache:
        if spec.head.kind != "lm":
            found.setdefault(f"a {spec.head.kind} head with a KV cache (decoders with `head lm`)", []).append("head")
        for i, ly in enumerate(spec.layers):
            if ly.attention.mask != "causal":
                found.setdefault("bidirectional attention with a KV cache", []).append(f"layers.{i}.attention.mask")
        if spec.embed.segments:
            found.setdefault("token-type ids with a KV cache", []).append("embed.segments")
        if not spec.reads_tokens:
            found.setdefault("image input with a KV cache", []).append("embed.input")
    _features(spec, found)
    out = []
    for label, where in found.items():
        shown = ", ".join(where[:3]) + (", …" if len(where) > 3 else "")
        out.append(f"{label} ({shown})")
    return out


def _features(spec: S.Spec, found: dict[str, list[str]]) -> None:
    """Language features outside FEATURES that no refused field already names (new values of known
    fields, such as `placement = sandwich` or `head span`)."""
    flagged = {_plain(p) for where in found.values() for p in where}
    for f in sorted(S.features(spec) - FEATURES):
        where = S.FEATURE_FIELDS.get(f, f.value)
        keys = [part.split("=")[0].strip() for part in where.split(",")]
        if not any(k in flagged or any(p.endswith("." + k.rsplit(".", 1)[-1]) for p in flagged) for k in keys):
            found.setdefault(f.value, []).append(where)


# --- emission ---
def emit(model, *, weights: Weights | None = None, cache: bool = False, profile: str = "portable",
         dtype: str = "float32", opset: int | None = None, max_length: int | None = None,
         quant_block: int | None = None) -> Emitted:
    """The ONNX graph of a model, written from its spec and weights (docs/onnx.md).

    model: a GraphModule (its spec and parameters), or a Spec with `weights` (name → `Weight`, read when
    the model is written: `mptc.emit.weights.from_safetensors`; checked with `weights.check`).
    max_length: rows of the rotary tables (the longest sequence the file serves); the context by default.
    quant_block: the block of a weight-only quantization that will follow (`mptc.quantize`): a mixture-of-experts
    layer its QMoE could not take is written in the dense form, so its experts are quantized as MatMulNBits.
    """
    if isinstance(model, S.Spec):
        if weights is None:
            raise MptcError(f"emit('{model.name}') needs its weights", hint="pass weights=from_safetensors(DIR)")
        spec = model
    else:
        spec, weights = spec_of(model), from_module(model) if weights is None else weights
    opset = ONNX_OPSET if opset is None else opset
    if dtype not in DTYPES:
        raise MptcError(f"cannot emit ONNX in {dtype}", hint=f"use one of {', '.join(DTYPES)}")
    if opset < 18:
        raise MptcError(f"opset {opset} is too old; mptc emits opset 18 or newer")
    reasons = unsupported(spec, cache=cache, profile=profile)
    if reasons:
        raise MptcError(f"the direct ONNX emitter does not cover '{spec.name}': " + "; ".join(reasons),
                        hint=_hint(spec, cache, profile))
    max_length = max_length or spec.context
    if profile == "genai" and spec.embed.positions.kind == "rope" and max_length is None:
        raise MptcError(f"model '{spec.name}' has no context: the genai profile needs max_length for its rotary "
                        "caches", hint="pass max_length=N (the longest sequence it will serve)")
    spec, weights, skip = active(model, spec, weights)  # a nested model: the sub-network it runs now
    c = Ctx(Graph(opset, dtype), spec, weights, profile, cache, max_length, quant_block)
    out = Emitted(model=None)  # the model is set once the graph is complete
    ins = _inputs(c, out)
    x = embed(c, ins)  # (B, S, D)
    x, pasts = _layers(c, x, ins, out, skip)
    _outputs(c, head(c, x, ins.get("attention_mask")), pasts)
    out.model = c.g.model(spec.name)
    out.notes += c.shared.get("notes", [])  # what the blocks chose (a dense mixture of experts)
    return out


def _hint(spec: S.Spec, cache: bool, profile: str) -> str:
    """What to do instead: the portable profile, no cache, or the traced export."""
    if profile != "portable" and not unsupported(spec, cache=cache, profile="portable"):
        return "emit it with profile='portable'"
    if cache and not unsupported(spec, cache=False):
        return "emit it without a KV cache (cache=False), as `mptc compile SRC -o OUT.onnx` does"
    return "compile it with `mptc compile SRC -o OUT.onnx`, which traces what the emitter does not cover"


def _inputs(c: Ctx, out: Emitted) -> dict[str, Value]:
    g, spec = c.g, c.spec
    i64 = DataType.INT64
    if not c.cache:
        p = spec.patches
        return {n: g.input(n, g.float, ["batch", p.channels, p.image, p.image]) if n == "pixel_values"
                else g.input(n, i64, ["batch", "sequence"]) for n in spec.inputs}
    ins = {"input_ids": g.input("input_ids", i64, ["batch_size", "sequence_length"]),
           "attention_mask": g.input("attention_mask", i64, ["batch_size", "total_sequence_length"])}
    forms = [_form(c, i, ly.attention, out) for i, ly in enumerate(spec.layers)]
    needs_positions = spec.embed.positions.kind in ("learned", "sinusoidal") or (
        spec.embed.positions.kind == "rope" and "portable" in forms)
    if needs_positions:
        ins["position_ids"] = g.input("position_ids", i64, ["batch_size", "sequence_length"])
    for i, ly in enumerate(spec.layers):
        a = ly.attention
        out.layers.append(LayerCache(a.kv_heads, a.head_dim, a.value_dim, forms[i], a.window))
        for kind, d in (("key", a.head_dim), ("value", a.value_dim)):
            ins[f"past.{i}.{kind}"] = g.input(f"past_key_values.{i}.{kind}", g.float,
                                              ["batch_size", a.kv_heads, "past_sequence_length", d])
    if c.profile == "genai" and "portable" in forms:
        out.notes.append("layers in the portable form concatenate their cache: run with past_present_share_buffer "
                         "= false")
    return ins


def _form(c: Ctx, i: int, a: S.Attention, out: Emitted) -> str:
    """The attention form of layer i, with a note when the GenAI profile falls back."""
    if c.profile != "genai":
        return "portable"
    why = genai.fallback_reason(c.spec, a)
    if why is None:
        return "genai"
    out.notes.append(f"layer {i}: portable attention ({why}; GroupQueryAttention cannot run it on CPU)")
    return "portable"


def _layers(c: Ctx, x, ins, out: Emitted, skip: frozenset[int] = frozenset()):
    """The blocks: residual sums and norms (fused with the sums where the profile fuses them).

    pre: x + f(n(x)); post: n(x + f(x)); sandwich: x + n'(f(n(x))); output: x + n'(f(x));
    parallel: x + attn(n1(x)) + mlp(n2(x)). `pending` is a branch output not yet added to x. A layer in
    `skip` (a nested model's skipped layer) has silent branches: x passes (post: n(n(x))), and with a cache
    its keys and values are still written, as in PyTorch."""
    pasts, pending = [], None

    def normed(name: str, n: S.Norm):
        nonlocal x, pending
        if pending is None:
            return norm(c, x, n, name)
        x, h = add_norm(c, x, pending, n, name)
        pending = None
        return h

    def settle():
        nonlocal x, pending
        if pending is not None:
            x, _ = add_norm(c, x, pending, None, None)
            pending = None

    for i, ly in enumerate(c.spec.layers):
        if i in skip:
            post = ly.placement == "post" and not ly.parallel
            if post:
                settle()
            if c.cache:
                if ly.parallel or ly.placement in ("pre", "sandwich"):
                    h = normed(f"layers.{i}.attn_norm", ly.norm)
                else:
                    settle()
                    h = x
                pasts.append(_attention(c, i, ly.attention, h, ins, out)[1])
            if post:
                x = norm(c, norm(c, x, ly.norm, f"layers.{i}.attn_norm"), ly.norm, f"layers.{i}.mlp_norm")
            continue

        def branch(kind: str, h, i=i, ly=ly):
            if kind == "attn":
                y, present = _attention(c, i, ly.attention, h, ins, out)
                pasts.append(present)
            else:
                y = mlp(c, i, ly.mlp, h)
            if ly.placement in ("sandwich", "output"):
                y = norm(c, y, ly.norm, f"layers.{i}.{kind}_out_norm")
            return y

        if ly.parallel:
            h1 = normed(f"layers.{i}.attn_norm", ly.norm)
            h2 = h1 if ly.shared_norm else norm(c, x, ly.norm, f"layers.{i}.mlp_norm")
            pending = c.g.op("Add", branch("attn", h1), branch("mlp", h2))
            continue
        for kind in ("attn", "mlp"):
            name = f"layers.{i}.{kind}_norm"
            if ly.placement in ("pre", "sandwich"):
                h = normed(name, ly.norm)
            else:
                settle()
                h = x
            y = branch(kind, h)
            if ly.placement == "post":
                _, x = add_norm(c, x, y, ly.norm, name)
            else:
                pending = y
    if c.spec.head.norm is not None:
        return normed("head.norm", c.spec.head.norm), pasts
    settle()
    return x, pasts


def _attention(c: Ctx, i: int, a: S.Attention, h, ins, out: Emitted):
    past = (ins[f"past.{i}.key"], ins[f"past.{i}.value"]) if c.cache else None
    if c.cache and out.layers[i].form == "genai":
        return genai.attention(c, i, a, h, ins, past)
    return portable.attention(c, i, a, h, ins, past)


def _outputs(c: Ctx, result, pasts) -> None:
    g, spec = c.g, c.spec
    b, s = ("batch_size", "sequence_length") if c.cache else ("batch", "sequence")
    seq = s if spec.reads_tokens else spec.seq_len
    if spec.head.kind == "span" or spec.head.kind == "classify" and spec.head.pool == "none":  # per position
        shape = [b, seq, spec.head.classes]
    elif spec.head.kind == "classify":
        shape = [b, spec.head.classes]
    else:
        shape = [b, seq, spec.vocab if spec.head.kind == "lm" else spec.width]
    g.output(result, spec.output, g.float, shape)
    if c.cache:
        for i, (k, v) in enumerate(pasts):
            a = spec.layers[i].attention
            g.output(k, f"present.{i}.key", g.float, ["batch_size", a.kv_heads, "total_sequence_length", a.head_dim])
            g.output(v, f"present.{i}.value", g.float,
                     ["batch_size", a.kv_heads, "total_sequence_length", a.value_dim])
