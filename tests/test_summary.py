"""`summary`: parameter counts equal the built module's; FLOPs follow the documented formula."""

from __future__ import annotations

import pytest

import mptc

from .conftest import EXAMPLES, TINY


@pytest.mark.parametrize("path", TINY, ids=[p.stem for p in TINY])
def test_params_equal_the_built_module(path):
    spec = mptc.load(path)
    s = mptc.summarize(spec)
    model = mptc.build(spec, seed=0)
    assert s.params == sum(p.numel() for p in model.parameters())
    for i, part in enumerate(s.layers):
        assert part.params == sum(p.numel() for n, p in model.named_parameters() if n.startswith(f"layers.{i}."))
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000  # tests use tiny models


# Known sizes: GPT-2 small (Hugging Face `gpt2`, tied head) and ViT-B/16 (`ViTForImageClassification`).
@pytest.mark.parametrize("name,params", [("gpt2-small", 124_439_808), ("vit-b16", 86_567_656)])
def test_full_size_examples_have_their_published_size(name, params):
    assert mptc.summarize(mptc.load(f"examples/{name}.mpt")).params == params


def test_flops_formula_on_gpt2_small():
    s = mptc.summarize(mptc.load("examples/gpt2-small.mpt"))
    d, ff, t, v = 768, 3072, 1024, 50257
    per_layer = 2 * (4 * d * d + 2 * d * ff) + 2 * 12 * (64 + 64) * t
    assert all(p.flops_per_token == per_layer for p in s.layers)
    assert s.head.flops_per_token == 2 * v * d  # the tied head reads the embedding matrix
    assert s.flops_per_token == 12 * per_layer + 2 * v * d


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_summarise(path):
    s = mptc.summarize(mptc.load(path)).to_json()
    assert {"params", "flops_per_token", "vocab", "layers"} <= s.keys()
    assert len(s["layers"]) == mptc.load(path).n_layers
