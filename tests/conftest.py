"""Shared fixtures: the tiny versions of the shipped examples (≤ 2M parameters each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mptc

from .decoders import gpt2_decoder, grown_decoder, llama_decoder, mistral_decoder, qwen2_decoder  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.mpt"))
TINY = sorted((Path(__file__).parent / "specs").glob("tiny-*.mpt"))
TINY_IDS = [p.stem for p in TINY]


@pytest.fixture
def one_thread():
    """Tiny models train fastest, and steadiest on a busy machine, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=TINY, ids=TINY_IDS)
def tiny_path(request) -> Path:
    return request.param


@pytest.fixture
def tiny_model(tiny_path):
    return mptc.build(mptc.load(tiny_path), seed=0).eval()


def tiny(name: str):
    """A tiny example model by short name (gpt2, llama, bert, vit), in eval mode."""
    return mptc.build(mptc.load(Path(__file__).parent / "specs" / f"tiny-{name}.mpt"), seed=0).eval()


def perturbed(spec: mptc.Spec, seed: int = 0):
    """A model whose zero-initialised parts (FiLM outputs, gates, modulation, hypernetwork
    outputs) are non-trivial: every parameter moved by noise of std 0.1, in eval mode."""
    model = mptc.build(spec, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model
