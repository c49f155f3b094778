"""Deploy dirs: a model as ONNX Runtime GenAI and Hugging Face Optimum load it, with nothing to convert.

A decoder (causal LM) deploys as

    DIR/model.onnx             the decoder with its KV cache (mptc.emit), weights in
    DIR/model.onnx.data        (external data)
    DIR/genai_config.json      what `onnxruntime_genai.Model(DIR)` reads (mptc.genai)
    DIR/config.json            a Hugging Face config, where the family can hold the model, with
    DIR/generation_config.json   so `optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(DIR)` loads it
    DIR/deploy.json            what was chosen: runtime, weights, per-layer cache shapes, notes

Two profiles: `genai` updates the cache in place (GroupQueryAttention; `past_present_share_buffer` true) and
`portable` returns the whole cache each step (standard ops, `past_present_share_buffer` false), which Optimum
and plain ONNX Runtime run as well. An encoder or classifier deploys as `mptc compile` writes it: model.onnx
(+ data), no cache, no genai_config.json.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

import mptc

from . import emit
from . import spec as S
from .atomic import atomic_dir
from .emit import fast
from .emit.model import LazyModel
from .errors import MptcError
from .files import WEIGHTS_FILE, load
from .genai import CacheLayer, genai_config
from .graph import spec_of
from .outputs import check_output
from .quantize import BLOCK, quantize_graph
from .tokens import TOKEN_KEYS, special_tokens

RUNTIMES = ("genai", "portable")
WEIGHTS = ("float32", "float16", "int8", "int4")
GRAPH, DATA = "model.onnx", "model.onnx.data"
# genai_config `type`s that run the graph as it is; GenAI's `gpt2` type reads another cache layout, so GPT-2
# and every other decoder say `llama` (the generic decoder-only path)
GENAI_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class DecoderInfo:
    """What genai_config.json and config.json say about a decoder graph."""

    name: str
    width: int
    heads: int
    vocab: int
    context: int  # the max length the graph is deployed for
    layers: list[CacheLayer]
    model_type: str = "llama"  # genai_config's `type`, one of GENAI_TYPES
    hf_config: dict | None = None  # config.json for Optimum, where the family can hold the model
    hf_missing: str | None = None  # else why not
    tokens: dict = field(default_factory=dict)  # bos / eos / pad ids (mptc.tokens); {}: generation runs to the length


@dataclass
class Deployed:
    """What `deploy` wrote."""

    path: Path
    runtime: str | None  # None for an encoder
    weights: str
    decoder: bool
    max_length: int | None = None
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # file → bytes
    quantized: str | None = None
    hf_family: str | None = None
    hf_missing: str | None = None  # why there is no config.json
    share_buffer: bool = False  # past and present share one buffer (every layer in the GenAI form)
    layers: list[CacheLayer] = field(default_factory=list)  # per layer: the cache's kv heads and head sizes

    def lines(self) -> list[str]:
        """What was chosen, for the command line."""
        if not self.decoder:
            out = [f"encoder: ONNX only, no cache (as `mptc compile` writes it); weights {self.weights}"]
        else:
            share = ("updated in place (past_present_share_buffer true)" if self.share_buffer
                     else "returned whole each step (past_present_share_buffer false)")
            out = [f"profile {self.runtime}: KV cache {share}; max length {self.max_length}; weights {self.weights}"]
            shapes = [f"{ly.kv_heads}×{ly.head_dim}" + (f"/{ly.value_dim}" if ly.value_dim != ly.head_dim else "")
                      for ly in self.layers]
            if len(set(shapes)) > 1:
                out.append(f"cache per layer (kv heads × head size): {', '.join(shapes)}")
            out += [f"note: {n}" for n in self.notes]
            if self.quantized:
                out.append(self.quantized)
            out.append(f"config.json for Optimum: {self.hf_family}" if self.hf_family else
                       "no config.json: " + (self.hf_missing or "the model has no Hugging Face family"))
        out += [f"{name}: {_human(n)}" for name, n in sorted(self.sizes.items())]
        return out


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- which models are decoders, and what their families can say ------------------------------


def is_decoder(spec: S.Spec) -> bool:
    """A causal language model: what deploys with a KV cache (the emitter refuses what it cannot cover)."""
    return spec.head.kind == "lm" and all(ly.attention.mask == "causal" for ly in spec.layers)


def _uniform(values: list) -> bool:
    return len(set(values)) == 1


def hf_config(spec: S.Spec, context: int, tokens: dict | None = None) -> tuple[dict | None, str | None]:
    """A Hugging Face config.json that Optimum's ORTModelForCausalLM reads for this decoder (GPT-2, Llama,
    Qwen2 or Mistral shape), or None and why not. Optimum sizes the empty first cache as (B, kv_heads, 0,
    hidden / heads), so every layer must have the same heads, kv heads and head size, with heads · head_dim =
    width."""
    att = [ly.attention for ly in spec.layers]
    why = next((w for w, bad in (
        ("per-layer heads", not _uniform([a.heads for a in att])),
        ("per-layer kv heads", not _uniform([a.kv_heads for a in att])),
        ("per-layer head sizes", not _uniform([(a.head_dim, a.value_dim) for a in att])),
        ("per-layer MLP widths", not _uniform([ly.mlp.hidden for ly in spec.layers])),
        ("value_dim ≠ head_dim", att[0].value_dim != att[0].head_dim),
        ("heads · head_dim ≠ width", att[0].heads * att[0].head_dim != spec.width),
    ) if bad), None)
    if why:
        return None, f"Optimum's config cannot hold {why} (GenAI reads each layer's shape from the graph)"
    a, pos = att[0], spec.embed.positions.kind
    common = {"vocab_size": spec.vocab, "use_cache": True, **_token_ids(tokens), "tie_word_embeddings": spec.head.tied}
    if pos == "learned":
        return common | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": spec.width,
                         "n_head": a.heads, "n_layer": spec.n_layers, "n_positions": context,
                         "n_inner": spec.layers[0].mlp.hidden}, None
    if pos != "rope":
        return None, f"Optimum's decoder families have learned or rotary positions; this model has {pos} positions"
    windows = {ly.attention.window for ly in spec.layers}
    if windows != {None}:
        if len(windows) > 1:
            return None, "Optimum's Mistral config holds one sliding window for all layers"
        family, arch = "mistral", "MistralForCausalLM"
    elif a.bias and not a.out_bias:
        family, arch = "qwen2", "Qwen2ForCausalLM"
    else:
        family, arch = "llama", "LlamaForCausalLM"
    cfg = common | {"model_type": family, "architectures": [arch], "hidden_size": spec.width,
                    "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim,
                    "num_hidden_layers": spec.n_layers, "intermediate_size": spec.layers[0].mlp.hidden,
                    "max_position_embeddings": context, "rope_theta": spec.embed.positions.theta}
    if family == "mistral":
        cfg["sliding_window"] = windows.pop()
    return cfg, None


def _token_ids(tokens: dict | None) -> dict:
    """bos / eos / pad for a Hugging Face config: the stored ones, None for the others."""
    return {k: (tokens or {}).get(k) for k in TOKEN_KEYS}


def decoder_info(spec: S.Spec, layers: list[CacheLayer], context: int, tokens: dict | None = None) -> DecoderInfo:
    cfg, why = hf_config(spec, context, tokens)
    heads = spec.layers[0].attention.heads
    model_type = cfg["model_type"] if cfg and cfg["model_type"] in GENAI_TYPES else "llama"
    return DecoderInfo(spec.name, spec.width, heads, spec.vocab, context, layers, model_type, cfg, why,
                       dict(tokens or {}))


def max_length_for(spec: S.Spec, asked: int | None) -> int:
    """The deploy's max length: asked, else the model's context (2048 for a model without one); refused past
    the context of learned positions, which has no position for it."""
    pos = spec.embed.positions.kind
    if asked is None:
        return spec.context or 2048
    if asked < 2:
        raise MptcError(f"--max-length must be at least 2, got {asked}")
    if pos == "learned" and spec.context is not None and asked > spec.context:
        raise MptcError(f"--max-length {asked} is beyond the context {spec.context} of '{spec.name}', whose learned "
                        "positions have no embedding past it",
                        hint=f"use --max-length {spec.context} or less, or grow the context first "
                        f"(mptc grow SRC -p \"grow_context(context = {asked})\" -o DIR)")
    return asked


# --- emitting ----------------------------------------------------------------------------------


def _emitter():
    return emit


def _refuse_unsupported(spec: S.Spec, runtime: str) -> None:
    """MptcError naming what the emitter cannot write for this decoder, and the way out."""
    emit = _emitter()
    why = emit.unsupported(spec, cache=True, profile=runtime)
    if not why:
        return
    if runtime == "genai" and not emit.unsupported(spec, cache=True, profile="portable"):
        raise MptcError(f"the genai profile cannot express '{spec.name}': {'; '.join(why)}",
                        hint="deploy with --runtime portable (standard ops; GenAI and Optimum run it too)")
    raise MptcError(f"cannot deploy '{spec.name}' with a KV cache: {'; '.join(why)}",
                    hint="extract or rewrite the model without these, or compile it without a cache "
                    "(mptc compile SRC -o OUT.onnx)")


def _cache_layers(emitted) -> list[CacheLayer]:
    out = []
    for ly in emitted.layers:
        get = ly.get if isinstance(ly, dict) else lambda k, ly=ly: getattr(ly, k)
        out.append(CacheLayer(int(get("kv_heads")), int(get("head_dim")), int(get("value_dim"))))
    return out


def emit_decoder(model, runtime: str, weights: str, max_length: int, source=None):
    """The decoder graph (onnx.ModelProto), its cache layers and the emitter's notes. model: a GraphModule, or
    a Spec with `source` (its weights, read as the file is written: mptc.emit.weights)."""
    spec = _spec(model)
    _refuse_unsupported(spec, runtime)
    dtype = "float16" if weights == "float16" else "float32"
    block = BLOCK if weights in ("int8", "int4") else None  # MoE layers QMoE cannot take: the dense form
    emitted = _emitter().emit(model, weights=source, cache=True, profile=runtime, dtype=dtype, max_length=max_length,
                              quant_block=block)
    return emitted, _cache_layers(emitted), [str(n) for n in getattr(emitted, "notes", [])]


def _spec(model) -> S.Spec:

    return model if isinstance(model, S.Spec) else spec_of(model)


# --- writing -----------------------------------------------------------------------------------


def _save_onnx(proto, tmp: Path) -> None:
    import onnx

    onnx.save_model(proto, str(tmp / GRAPH), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA)  # tensors under 1 KiB (shapes, axes) stay inside, as ORT reads them


def _sizes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()}


def _graph_io(model: onnx.ModelProto) -> tuple[dict[str, list[int | None]], list[str]]:
    """The input shapes (None for a symbolic axis) and output names of a model."""
    g = model.graph
    ins = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
           for i in g.input}
    return ins, [o.name for o in g.output]


def check_cache_shapes(inputs: dict[str, list[int | None]], layers: list[CacheLayer]) -> None:
    """Each layer's past key/value input must declare its kv heads and head size (GenAI allocates from them)."""
    for i, ly in enumerate(layers):
        for name, d in ((f"past_key_values.{i}.key", ly.head_dim), (f"past_key_values.{i}.value", ly.value_dim)):
            got = inputs.get(name)
            if got is None:
                raise MptcError(f"the decoder graph has no input {name}")
            if len(got) != 4 or got[1] != ly.kv_heads or got[3] != d:
                raise MptcError(f"{name} is declared {got}, not (batch, {ly.kv_heads}, past, {d})")


def _graph(emitted, weights: str):
    """What to save and its quantization's description: for int8/int4 the graph with MatMulNBits, each weight
    quantized as it is saved (an onnx.ModelProto becomes an `Emitted` first), else the graph as given (an
    `Emitted` saves one tensor at a time)."""
    if weights not in ("int8", "int4"):
        return emitted, None
    if not hasattr(emitted, "to_proto"):
        emitted = emit.Emitted(model=LazyModel.from_proto(emitted))
    return emitted, quantize_graph(emitted.model, weights).describe()


def _save(graph, tmp: Path) -> None:
    if hasattr(graph, "save"):  # Emitted
        graph.save(tmp / GRAPH, external_data=True)
    else:
        _save_onnx(graph, tmp)


def _hf_files(info: DecoderInfo, weights: str) -> dict[str, dict]:
    """config.json and generation_config.json for Optimum, where a family holds the model."""
    if info.hf_config is None:
        return {}
    dtype = "float16" if weights == "float16" else "float32"
    gen = {"do_sample": False, "max_length": info.context, **_token_ids(info.tokens)}
    return {"config.json": info.hf_config | {"torch_dtype": dtype}, "generation_config.json": gen}


def write_decoder(out: str | os.PathLike, graph, info: DecoderInfo, runtime: str, weights: str,
                  notes: list[str] | None = None, share_buffer: bool | None = None) -> Deployed:
    """Write a decoder deploy dir from its float graph (an `Emitted`, or an onnx.ModelProto): quantized for
    int8/int4, genai_config.json, config.json where a family holds the model, deploy.json; all or nothing.
    share_buffer: whether every layer updates its cache in place (default: the genai profile)."""

    notes = list(notes or [])
    ins, outs = _graph_io(graph.model.proto if hasattr(graph, "to_proto") else graph)
    check_cache_shapes(ins, info.layers)
    graph, quantized = _graph(graph, weights)
    share = runtime == "genai" if share_buffer is None else share_buffer
    cfg = genai_config(inputs=list(ins), outputs=outs, layers=info.layers, heads=info.heads, width=info.width,
                       vocab=info.vocab, context=info.context, share_buffer=share, model_type=info.model_type,
                       filename=GRAPH, bos=info.tokens.get("bos_token_id"), eos=info.tokens.get("eos_token_id"),
                       pad=info.tokens.get("pad_token_id"))
    family = info.hf_config["model_type"] if info.hf_config else None
    manifest = {"name": info.name, "runtime": runtime, "weights": weights, "decoder": True,
                "max_length": info.context, "past_present_share_buffer": share,
                "layers": [asdict(ly) for ly in info.layers], "notes": notes, "quantized": quantized,
                "hf_family": family}
    with atomic_dir(out, kind="deploy") as tmp:
        _save(graph, tmp)
        for name, data in {"genai_config.json": cfg, **_hf_files(info, weights), "deploy.json": manifest}.items():
            _json(tmp / name, data)
        sizes = _sizes(tmp)
    return Deployed(Path(out), runtime, weights, True, max_length=info.context, notes=notes, sizes=sizes,
                    quantized=quantized, hf_family=family, hf_missing=info.hf_missing, share_buffer=share,
                    layers=list(info.layers))


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_encoder(out: str | os.PathLike, src, weights: str, spec: S.Spec | None = None) -> Deployed:
    """An encoder or classifier as `mptc compile` writes it (no cache), in a deploy dir: from a model dir the
    emitter covers without torch (`mptc.emit.fast`), else traced through torch.onnx."""

    name = (spec or _spec(src)).name
    if weights in ("int8", "int4"):
        raise MptcError(f"--weights {weights} applies to decoders; '{name}' is an encoder",
                        hint="deploy it with --weights float32 or float16")
    with atomic_dir(out, kind="deploy") as tmp:
        fast_dir = isinstance(src, (str, os.PathLike)) and fast.compile_onnx(src, tmp / GRAPH, dtype=weights,
                                                                               external_data=True)
        if not fast_dir:
            mptc.export_onnx(_load(src, weights), tmp / GRAPH, external_data=True)
        _json(tmp / "deploy.json", {"name": name, "runtime": None, "weights": weights, "decoder": False})
        sizes = _sizes(tmp)
    return Deployed(Path(out), None, weights, False, sizes=sizes)


def deploy(src, out: str | os.PathLike, runtime: str = "genai", weights: str = "float32",
           max_length: int | None = None, log: Callable[[str], None] | None = None) -> Deployed:
    """Write the deploy dir `out` for `src` (a spec, a model dir, or a model built by mptc)."""

    if runtime not in RUNTIMES:
        raise MptcError(f"unknown runtime '{runtime}'", hint=f"choose one of: {', '.join(RUNTIMES)}")
    if weights not in WEIGHTS:
        raise MptcError(f"unknown weight format '{weights}'", hint=f"choose one of: {', '.join(WEIGHTS)}")
    check_output(out, "deploy", is_dir=True)  # before any work
    spec = _spec(src) if _is_module(src) else _read_spec(src)
    if not is_decoder(spec):
        done = write_encoder(out, src, weights, spec)
    else:
        context = max_length_for(spec, max_length)
        model, source = _decoder(src, runtime)
        emitted, layers, notes = emit_decoder(model, runtime, weights, context, source=source)
        info = decoder_info(spec, layers, context, _stored_tokens(src))
        done = write_decoder(out, emitted, info, runtime, weights, notes,
                             share_buffer=emitted.share_buffer)
    for line in done.lines() if log else ():
        log(line)
    return done


def _stored_tokens(src) -> dict:
    """The bos / eos / pad ids of a model dir imported from Hugging Face ({} for a spec or a module)."""
    if not isinstance(src, str | os.PathLike) or not (Path(src) / WEIGHTS_FILE).is_file():
        return {}
    return special_tokens(src)


def _is_module(src) -> bool:
    if "torch" not in sys.modules:  # no module exists before torch is imported (the torch-free path)
        return False
    from torch import fx

    return isinstance(src, fx.GraphModule)


def _read_spec(src) -> S.Spec:

    return load(src)


def _load(src, weights: str = "float32"):
    """The model of `src`; a decoder loads in float32 (the emitter casts), an encoder in its deploy dtype."""
    if _is_module(src):
        return src

    return mptc.load_model(src, dtype="float16" if weights == "float16" else "float32")


def _decoder(src, runtime: str):
    """What the emitter reads for a decoder: a model dir it covers as its spec and its weights, read one at a time
    while the file is written (no torch: mptc.emit.fast); else the loaded model (and no separate weights)."""
    if not _is_module(src) and fast.is_model_dir(src):
        spec = load(src)
        if fast.covers(spec, cache=True, profile=runtime):
            spec, ws = fast.read_model_dir(src, spec)
            return spec, {k: w.astype(np.float32) for k, w in ws.items()}  # as load_model(dtype=float32)
    return _load(src), None
