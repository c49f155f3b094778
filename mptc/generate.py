"""Text generation through the KV cache: prefill the prompt once, then one token per step.

    new = mptc.generate(model, ids, 32)                          # greedy, (B, 32) new ids
    new = mptc.generate(model, ids, 32, temperature=0.8, top_p=0.9, seed=0)

    from mptc.generate import generate_timed
    run = generate_timed(model, ids, 32)                         # a Generation: .new_ids, .tokens_per_s, …

`model` is any mptc causal `head lm` decoder (built, loaded or grown; or its cached form, `mptc.model.cached`).
docs/generate.md describes the cache layout, the sampling options and how the timings are measured.
"""

from __future__ import annotations

import math
import os
import sys
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from .errors import MptcError
from .graph import spec_of
from .model import cached, load_model

Stream = Callable[[int, Tensor], None]  # stream(step, ids (B,)), called as each token comes


@dataclass(frozen=True)
class Generation:
    """What one `generate_timed` call produced and how fast.

    new_ids: (B, N) the generated ids only (N ≤ max_new_tokens: fewer when every row met `eos`).
    prefill_ms: the prompt's forward pass, which gives the first token. decode_ms: the N − 1 one-token steps.
    """

    new_ids: Tensor
    prefill_ms: float
    decode_ms: float

    @property
    def steps(self) -> int:
        """N, the tokens generated per row."""
        return self.new_ids.shape[1]

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: B × (N − 1) tokens over decode_ms (the prompt's forward not counted); 0 if N ≤ 1."""
        n = self.new_ids.shape[0] * (self.steps - 1)
        return n / (self.decode_ms / 1e3) if n > 0 and self.decode_ms > 0 else 0.0


def generate(model: fx.GraphModule | str | os.PathLike, ids: Tensor, max_new_tokens: int, *,
             attention_mask: Tensor | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos: int | Iterable[int] | None = None,
             stream: Stream | None = None) -> Tensor:
    """The new token ids (B, N) after the prompt ids (B, T); see `generate_timed` for the arguments."""
    return generate_timed(model, ids, max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, eos=eos, stream=stream).new_ids


def generate_timed(model: fx.GraphModule | str | os.PathLike, ids: Tensor, max_new_tokens: int, *,
                   attention_mask: Tensor | None = None, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None, eos: int | Iterable[int] | None = None,
                   stream: Stream | None = None) -> Generation:
    """Generate up to `max_new_tokens` after the prompt, through the KV cache.

    ids (B, T) int: the prompt; attention_mask (B, T): 1 = token, 0 = padding, padding on the left only.
    temperature 0: greedy (argmax); above 0: sampling from softmax(logits / temperature), restricted to the
    `top_k` most likely tokens and to the smallest set whose probability reaches `top_p` (nucleus), drawn
    from a `torch.Generator` seeded with `seed` (None: torch's global generator).
    eos: an id (or ids) that ends a row; the row then repeats its eos, and generation stops once every row ended.
    stream(step, ids (B,)) is called with each step's tokens as they come.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    spec = spec_of(model)
    ids, mask = _prompt(spec, ids, attention_mask)
    _check_options(spec, ids, max_new_tokens, temperature, top_k, top_p)
    stops = _eos(eos, spec.vocab)
    step_fn = cached(model)
    was_training = step_fn.training
    step_fn.eval()
    try:
        with torch.no_grad():
            return _run(step_fn, ids, mask, max_new_tokens, (temperature, top_k, top_p, seed), stops, stream)
    finally:
        step_fn.train(was_training)


def _run(step_fn: fx.GraphModule, ids: Tensor, mask: Tensor, n: int, sampling: tuple, stops: Tensor | None,
         stream: Stream | None) -> Generation:
    """Prefill ids (B, T) once, then one token per step through the cache; timed."""
    temperature, top_k, top_p, seed = sampling
    device = _device(step_fn)
    ids, mask = ids.to(device), mask.to(device)
    stops = stops.to(device) if stops is not None else None
    gen = torch.Generator(device).manual_seed(seed) if seed is not None and temperature > 0 else None
    bsz = ids.shape[0]
    out = torch.empty(bsz, 0, dtype=torch.long, device=device)  # (B, N so far)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)  # rows that emitted an eos
    t0 = _now(device)
    logits, presents = step_fn(input_ids=ids, attention_mask=mask) if n else (None, ())  # (B, T, V)
    t1 = _now(device)
    for step in range(n):
        if step:
            mask = torch.cat([mask, mask.new_ones(bsz, 1)], 1)  # (B, P + 1)
            logits, presents = step_fn(input_ids=out[:, -1:], attention_mask=mask, **_past(presents))  # (B, 1, V)
        tok = next_tokens(logits[:, -1], temperature, top_k, top_p, gen)  # (B,)
        if stops is not None:
            tok = torch.where(done, stops[0], tok)
            done = done | torch.isin(tok, stops)
        out = torch.cat([out, tok[:, None]], 1)
        if stream is not None:
            stream(step, tok)
        if stops is not None and bool(done.all()):
            break
    t2 = _now(device)
    return Generation(out, (t1 - t0) * 1e3, (t2 - t1) * 1e3)


def _prompt(spec, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The prompt ids (B, T) long and its mask (B, T), checked."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        what = f"a {ids.dim()}-d {str(ids.dtype).removeprefix('torch.')} tensor" if isinstance(ids, Tensor) \
            else type(ids).__name__
        raise MptcError(f"generate needs the prompt ids as an integer tensor (B, T), got {what}",
                        hint="pass torch.tensor([[id, id, …]]) (one row per sequence)")
    if ids.shape[1] == 0:
        raise MptcError("generate needs a prompt of at least one token, got (B, 0) ids")
    ids = ids.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= spec.vocab):
        bad = ids[(ids < 0) | (ids >= spec.vocab)][0].item()
        raise MptcError(f"prompt id {bad} is out of range: model '{spec.name}' has vocab = {spec.vocab}",
                        hint=f"ids must lie in 0..{spec.vocab - 1}")
    if mask is None:
        return ids, torch.ones_like(ids)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise MptcError(f"attention_mask must have the prompt's shape {tuple(ids.shape)}, got {got}")
    mask = mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise MptcError("attention_mask holds values other than 0 and 1", hint="1 = token, 0 = padding")
    if (mask.sum(1) == 0).any():
        raise MptcError(f"attention_mask row {int((mask.sum(1) == 0).nonzero()[0])} has no tokens")
    if (mask[:, 1:] < mask[:, :-1]).any():
        row = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0])
        raise MptcError(f"attention_mask row {row} has padding after a token: generate needs left padding",
                        hint="put the padding before the prompt (the new tokens follow the last position)")
    return ids, mask


def _check_options(spec, ids: Tensor, n: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MptcError(f"max_new_tokens must be a whole number ≥ 0, got {n!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise MptcError(f"temperature must be a finite number ≥ 0, got {temperature!r}", hint="0 = greedy")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise MptcError(f"top_k must be a whole number ≥ 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise MptcError(f"top_p must be a number in (0, 1], got {top_p!r}")
    t = ids.shape[1]
    if spec.embed.positions.kind == "learned" and spec.context is not None and t + n > spec.context:
        raise MptcError(f"a prompt of {t} positions and {n} new tokens need {t + n} positions, but model "
                        f"'{spec.name}' has context = {spec.context} (learned positions)",
                        hint=f"shorten the prompt or generate at most {max(spec.context - t, 0)} tokens")


def _eos(eos: int | Iterable[int] | None, vocab: int) -> Tensor | None:
    if eos is None:
        return None
    stops = [eos] if isinstance(eos, int) else list(eos)
    if not stops or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < vocab for s in stops):
        raise MptcError(f"eos must be token ids in 0..{vocab - 1}, got {eos!r}")
    return torch.tensor(stops, dtype=torch.long)


def _device(model: fx.GraphModule) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _past(presents: tuple[tuple[Tensor, Tensor], ...]) -> dict[str, Tensor]:
    """The cached graph's past inputs from the last step's presents."""
    kw = {}
    for i, (k, v) in enumerate(presents):
        kw[f"past_key_{i}"], kw[f"past_value_{i}"] = k, v
    return kw


def next_tokens(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """The next token per row (B,) from the last logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k most likely tokens and the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        z = _nucleus(z, top_p)
    return torch.multinomial(z.softmax(-1), 1, generator=generator)[:, 0]


def _nucleus(z: Tensor, top_p: float) -> Tensor:
    """z (B, V) with every token outside the smallest most-likely set of probability ≥ top_p at −inf."""
    sorted_z, order = z.sort(dim=-1, descending=True)
    p = sorted_z.softmax(-1)
    drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
    drop[:, 0] = False  # the most likely token always stays
    return z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))


class _CallableModule(types.ModuleType):
    """`mptc.generate` is this module once the module is imported by name (before that the package's lazy
    attribute is the function): calling the module calls `generate`, so `mptc.generate(…)` works either way."""

    def __call__(self, *args, **kwargs) -> Tensor:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
