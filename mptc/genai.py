"""Run a deploy dir with ONNX Runtime GenAI, and write the `genai_config.json` that lets it.

`onnxruntime_genai.Model(DIR)` reads `genai_config.json`: the decoder's file and I/O names, its sizes, the
context length and the search defaults. The cache tensors' shapes come from the graph itself: each layer's
`past_key_values.{i}.key` declares its own kv heads and head size, and the runtime allocates them as declared
(so per-layer shapes work in both cache modes); the config's single `head_size` and `num_key_value_heads` are
layer 0's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import mptc

from .errors import MptcError

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
PLAIN_INPUTS = ("input_ids", "attention_mask", "position_ids")

SEARCH_DEFAULTS = {  # greedy; what `onnxruntime_genai.GeneratorParams` starts from
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0,
}


@dataclass(frozen=True)
class CacheLayer:
    """One layer's cache as the graph declares it: past (B, kv_heads, P, head_dim|value_dim)."""

    kv_heads: int
    head_dim: int
    value_dim: int


def graph_io(inputs: Sequence[str], outputs: Sequence[str], n_layers: int) -> tuple[dict, dict]:
    """genai_config's `inputs`/`outputs` maps for a decoder graph with these I/O names; MptcError if a name
    GenAI needs is missing."""
    names = set(inputs) | set(outputs)
    want = ["input_ids", "attention_mask", "logits"] + [p % i for i in range(n_layers)
                                                        for p in (PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE)]
    missing = [n for n in want if n not in names]
    if missing:
        raise MptcError(f"the decoder graph lacks the input or output {missing[0]} that ONNX Runtime GenAI feeds",
                        hint="deploy a decoder emitted with its KV cache (mptc deploy emits one)")
    ins = {n: n for n in PLAIN_INPUTS if n in inputs}
    ins |= {"past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    outs = {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE}
    return ins, outs


def genai_config(*, inputs: Sequence[str], outputs: Sequence[str], layers: Sequence[CacheLayer], heads: int,
                 width: int, vocab: int, context: int, share_buffer: bool, model_type: str = "llama",
                 filename: str = "model.onnx", bos: int | None = None, eos: int | list[int] | None = None,
                 pad: int | None = None) -> dict:
    """The `genai_config.json` of a decoder graph. eos None: no end-of-sequence token (generation runs to
    max_length); `share_buffer`: the graph updates its cache in place (GroupQueryAttention), so the runtime
    gives past and present one buffer of `context` positions."""
    ins, outs = graph_io(inputs, outputs, len(layers))
    for name, tok in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        for t in tok if isinstance(tok, list) else [tok]:
            if t is not None and not 0 <= t < vocab:
                raise MptcError(f"{name} {t} is outside the vocabulary (0..{vocab - 1})")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename, "head_size": layers[0].head_dim, "hidden_size": width, "inputs": ins, "outputs": outs,
        "num_attention_heads": heads, "num_hidden_layers": len(layers), "num_key_value_heads": layers[0].kv_heads,
    }
    return {
        "model": {
            "bos_token_id": 0 if bos is None else bos, "context_length": context, "decoder": decoder,
            "eos_token_id": [] if eos is None else eos, "pad_token_id": 0 if pad is None else pad,
            "type": model_type, "vocab_size": vocab,
        },
        "search": SEARCH_DEFAULTS | {"max_length": context, "past_present_share_buffer": share_buffer},
    }


# --- running a deploy dir ----------------------------------------------------------------------


@dataclass
class Generation:
    """What one `generate` call produced."""

    new_ids: list[list[int]]  # per row, the tokens after the prompt
    tokens_per_s: float  # B × (N − 1) tokens over the N − 1 one-token steps (the prefill gives the first)
    prefill_ms: float  # the prompt's forward pass
    first_logits: np.ndarray | None = field(default=None, repr=False)  # (B, V): the prompt's last position

    def to_json(self) -> dict:
        return {"new_ids": self.new_ids, "tokens_per_s": self.tokens_per_s, "prefill_ms": self.prefill_ms}


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MptcError("running a deploy dir needs ONNX Runtime GenAI",
                        hint='pip install "mptc[deploy]" (onnxruntime-genai)') from None
    return og


def is_genai_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "genai_config.json").is_file()


def _message(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load(path: str | os.PathLike):
    """`onnxruntime_genai.Model` of a deploy dir (MptcError where the runtime refuses it)."""
    og = _og()
    if not is_genai_dir(path):
        raise MptcError(f"{path} is not a decoder deploy dir (no genai_config.json)",
                        hint="write one with `mptc deploy SRC -o DIR` (encoders have no genai_config.json)")
    try:
        return og.Model(str(path))
    except Exception as e:  # the runtime's own: RuntimeError with its message
        raise MptcError(f"ONNX Runtime GenAI cannot load {path}: {_message(e)}",
                        hint="was it written by this version of `mptc deploy`?") from None


def _last_logits(gen) -> np.ndarray:
    """The logits of each row's last position (B, V), as float32."""
    x = np.asarray(gen.get_logits())
    return x.reshape(x.shape[0], -1, x.shape[-1])[:, -1].astype(np.float32)


def generate(path: str | os.PathLike, ids: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None, model=None) -> Generation:
    """Generate `max_new_tokens` after `ids` (B, T) with the deploy dir at `path`. temperature 0: greedy;
    otherwise sampling with top_k / top_p from a torch generator seeded with `seed`, by the same rule as
    `mptc.generate`. on_token(row, id): called with each new id as it comes. A row ends early at an
    `eos_token_id` of genai_config.json (kept as its last id), as transformers' `generate` ends it; a model
    without one runs to `max_new_tokens`.

    ONNX Runtime GenAI runs the graph and keeps the cache (`append_tokens`, `get_logits`); mptc picks the
    tokens. GenAI's own `generate_next_token` ends a row at the end token, and with no end token configured
    it takes `pad_token_id` for one, while a model without an end token may emit every id. GenAI
    appends tokens step by step only for one row at a time, so the rows run one after the other."""
    import torch

    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    ids = ids[None] if ids.ndim == 1 else ids
    if max_new_tokens < 1:
        raise MptcError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    context, vocab = _sizes(path)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise MptcError(f"token id {bad} is outside the vocabulary of {path} (0..{vocab - 1})")
    if ids.shape[1] + max_new_tokens > context:
        raise MptcError(f"the prompt ({ids.shape[1]} tokens) and {max_new_tokens} new tokens exceed the max length "
                        f"{context} of {path}",
                        hint="ask for fewer tokens, or deploy again with a larger --max-length")
    model = model if model is not None else load(path)
    rng = torch.Generator().manual_seed(seed) if seed is not None and temperature > 0 else None
    pick = _Picker(temperature, top_k, top_p, rng)
    try:
        stops = _eos(path)
        runs = [_row(model, r, row, max_new_tokens, pick, on_token, stops) for r, row in enumerate(ids)]
    except MptcError:
        raise
    except Exception as e:  # the runtime's errors: shapes, a damaged graph, …
        raise MptcError(f"ONNX Runtime GenAI failed on {path}: {_message(e)}") from None
    n = sum(len(r.ids) - 1 for r in runs)  # tokens made by decode steps (the first came from the prefill)
    decode = sum(r.decode_s for r in runs)
    return Generation([r.ids for r in runs], round(n / decode, 2) if n > 0 and decode > 0 else 0.0,
                      round(sum(r.prefill_s for r in runs) * 1e3, 3), np.stack([r.first for r in runs]))


@dataclass
class _Picker:
    """The next token from the last logits (V,): mptc.generate's rule (argmax, or top-k / top-p sampling)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    rng: object

    def __call__(self, logits: np.ndarray) -> int:
        import torch

        pick = mptc.next_tokens  # mptc.generate's rule, imported on first use (this module stays torch-free)
        return int(pick(torch.from_numpy(logits[None]), self.temperature, self.top_k, self.top_p, self.rng)[0])


@dataclass
class _Run:
    ids: list[int]
    first: np.ndarray  # (V,)
    prefill_s: float
    decode_s: float


def _row(model, r: int, row: np.ndarray, n: int, pick: _Picker, on_token, stops: frozenset[int] = frozenset()
         ) -> _Run:
    """Prompt row r (T,) continued by n tokens: a prefill, then n − 1 one-token steps through the cache; the
    row ends early at an id in `stops`."""
    og = _og()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=row.shape[0] + n, batch_size=1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(row[None])  # the prefill: its logits give the first token
    logits = first = _last_logits(gen)[0]  # (V,)
    t1 = time.perf_counter()
    out: list[int] = []
    for step in range(n):
        out.append(pick(logits))
        if on_token is not None:
            on_token(r, out[-1])
        if out[-1] in stops:
            break
        if step + 1 < n:
            gen.append_tokens(np.array([[out[-1]]], dtype=np.int64))  # (1, 1)
            logits = _last_logits(gen)[0]
    return _Run(out, first, t1 - t0, time.perf_counter() - t1)


def _eos(path: str | os.PathLike) -> frozenset[int]:
    """The end-of-sequence ids of a deploy dir's genai_config.json (none: generation runs to the length)."""
    import json

    eos = json.loads((Path(path) / "genai_config.json").read_text())["model"].get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _sizes(path: str | os.PathLike) -> tuple[int, int]:
    """The deploy dir's context length and vocabulary size, from its genai_config.json."""
    import json

    m = json.loads((Path(path) / "genai_config.json").read_text())["model"]
    return int(m["context_length"]), int(m["vocab_size"])
