"""Tiny random-weight decoders shared by the tests: Hugging Face Llama (GQA, untied), Qwen2 (q/k/v biases),
GPT-2 (tied) and Mistral (sliding window), built from configs, saved with `save_pretrained` and imported with
`mptc.hf.import_hf`; and a grown heterogeneous model made from the imported Llama by real passes.

Every model is sharpened (its final norm scaled by `SHARPEN`), so greedy decoding has no near-ties: the fixture
asserts that the top-1 logit leads the runner-up by at least `MARGIN` at every step of a 32-token greedy decode
of `prompt(...)`. Session fixtures (registered in conftest.py): `llama_decoder`, `qwen2_decoder`,
`gpt2_decoder`, `mistral_decoder`, `grown_decoder`, each a `Decoder`.

    def test_x(llama_decoder):
        ids, mask = prompt(llama_decoder.spec.vocab)          # (2, 6), row 0 left-padded by 2
        logits = llama_decoder.model(input_ids=ids, attention_mask=mask)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx

import mptc

VOCAB = 256
SHARPEN = 16.0  # final-norm gain factor: logits × SHARPEN
MARGIN = 0.05  # least top-1 − top-2 logit gap along the reference greedy decode
STEPS = 32  # tokens decoded when the margin is checked
NO_TOKENS = {"bos_token_id": 0, "eos_token_id": None, "pad_token_id": 0}


@dataclass
class Decoder:
    """One test decoder: the mptc model (eval mode) and, for imported ones, the transformers original."""

    name: str
    model: fx.GraphModule  # uncached mptc model, eval mode
    model_dir: Path  # mptc model dir (model.mpt + weights.safetensors)
    hf_dir: Path | None = None  # the save_pretrained dir (None for the grown model)
    hf: Any = None  # the transformers model, eval mode, eager attention (None for the grown model)

    @property
    def spec(self) -> mptc.Spec:
        return mptc.spec_of(self.model)


def prompt(vocab: int = VOCAB, batch: int = 2, length: int = 6, pad: int = 2, seed: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and a padding mask (B, T): row 0 is left-padded by `pad` (pad id 0), the others full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


@torch.no_grad()
def greedy_reference(model: fx.GraphModule, ids: torch.Tensor, steps: int, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, float]:
    """Greedy decoding by recomputing the whole sequence each step (no cache): the new ids (B, steps) and the
    smallest top-1 − top-2 logit gap seen."""
    mask = torch.ones_like(ids) if mask is None else mask
    out, margin = [], float("inf")
    for _ in range(steps):
        last = model(input_ids=ids, attention_mask=mask)[:, -1]  # (B, V)
        top = last.topk(2, dim=-1).values  # (B, 2)
        margin = min(margin, (top[:, 0] - top[:, 1]).min().item())
        nxt = last.argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1), margin


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _perturb(params, seed: int, std: float = 0.1) -> None:
    """Move every tensor by noise: random inits leave biases at zero and norm gains at one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _check_margin(name: str, model: fx.GraphModule) -> None:
    """Fail the fixture if greedy decoding of the shared prompt comes near a tie (on the unpadded row 1 and the
    left-padded row 0)."""
    ids, mask = prompt(mptc.spec_of(model).vocab)
    _, margin = greedy_reference(model, ids, STEPS, mask)
    assert margin >= MARGIN, f"{name}: greedy top-1 margin {margin:.3g} < {MARGIN}; sharpen more or change the seed"


def _configs() -> dict[str, tuple[Any, Any]]:
    """name → (transformers config, causal-LM class), vocab ≤ 512, width ≤ 64, ≤ 3 layers."""
    import transformers as T

    return {
        "llama": (T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                                max_position_embeddings=128, tie_word_embeddings=False, **NO_TOKENS),
                  T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                tie_word_embeddings=False, **NO_TOKENS), T.Qwen2ForCausalLM),
        "gpt2": (T.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                              tie_word_embeddings=True, **NO_TOKENS), T.GPT2LMHeadModel),
        "mistral": (T.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, sliding_window=4,
                                    max_position_embeddings=128, tie_word_embeddings=False, **NO_TOKENS),
                    T.MistralForCausalLM),
    }


def _sharpen_hf(model: Any) -> None:
    """Scale the final norm (gain and shift) so logits grow by SHARPEN: the tied GPT-2 head reads it too."""
    base = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(SHARPEN)


def hf_decoder(name: str, root: Path, seed: int = 0) -> Decoder:
    """A transformers decoder from its config (random weights, perturbed, sharpened), saved and imported."""
    from mptc.hf import import_hf

    config, cls = _configs()[name]
    torch.manual_seed(seed)
    hf = cls._from_config(config, attn_implementation="eager").eval()
    _perturb(hf.parameters(), seed)
    _sharpen_hf(hf)
    if hf.config.tie_word_embeddings:  # perturbing may untie nothing, but keep the copy exact
        hf.tie_weights()
    hf_dir, model_dir = root / f"{name}-hf", root / name
    hf.save_pretrained(hf_dir)
    import_hf(hf_dir, model_dir)
    model = mptc.load_model(model_dir).eval()
    _check_margin(name, model)
    return Decoder(name, model, model_dir, hf_dir, hf)


def grown_decoder_from(llama: Decoder, root: Path, seed: int = 1) -> Decoder:
    """The imported Llama grown by real passes into a heterogeneous model (3 layers; kv heads 2/4/2, MLP hidden
    96/160/96), then perturbed so the grown parts matter, and sharpened."""
    from mptc import passes as P

    pipe = P.Pipeline([P.add_kv_heads(n=2, layers=[0]), P.grow_mlp(hidden=160, layers=[1]), P.add_layers(n=1)])
    model, _ = pipe(mptc.load_model(llama.model_dir))  # a copy: the Llama fixture stays as it is
    model.eval()
    _perturb(model.parameters(), seed, std=0.05)
    with torch.no_grad():
        model.get_parameter("head.norm.weight").mul_(2.0)
    model_dir = mptc.save(model, root / "grown")
    _check_margin("grown", model)
    return Decoder("grown", model, model_dir)


def _root(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "decoders"


@pytest.fixture(scope="session")
def llama_decoder(tmp_path_factory) -> Decoder:
    with one_thread():
        return hf_decoder("llama", _root(tmp_path_factory), seed=2)


@pytest.fixture(scope="session")
def qwen2_decoder(tmp_path_factory) -> Decoder:
    with one_thread():
        return hf_decoder("qwen2", _root(tmp_path_factory), seed=2)


@pytest.fixture(scope="session")
def gpt2_decoder(tmp_path_factory) -> Decoder:
    with one_thread():
        return hf_decoder("gpt2", _root(tmp_path_factory), seed=2)


@pytest.fixture(scope="session")
def mistral_decoder(tmp_path_factory) -> Decoder:
    with one_thread():
        return hf_decoder("mistral", _root(tmp_path_factory), seed=0)


@pytest.fixture(scope="session")
def grown_decoder(llama_decoder, tmp_path_factory) -> Decoder:
    with one_thread():
        return grown_decoder_from(llama_decoder, _root(tmp_path_factory))
