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


# --- the table: identical consecutive layers share a row ---------------------------------------

UNIFORM = """model grouped {
  vocab = 100
  context = 16
  width = 32
  layers 12 {
    attention { heads = 4, mask = causal }
    mlp { hidden = 64, activation = gelu }
    norm = layernorm
  }
  head lm { norm = layernorm, tied = true }
}
"""


def _summary(tmp_path, capsys, text: str, *flags: str) -> list[str]:
    from mptc.cli import main

    p = tmp_path / "m.mpt"
    p.write_text(text)
    capsys.readouterr()
    assert main(["summary", str(p), *flags]) == 0
    return capsys.readouterr().out.splitlines()


def test_a_uniform_spec_prints_one_row_for_its_layers(tmp_path, capsys):
    lines = _summary(tmp_path, capsys, UNIFORM)
    rows = [ln for ln in lines if ln.startswith("│ layer")]
    assert len(rows) == 1 and "layers 0–11 ×12" in rows[0], "\n".join(lines)
    s = mptc.summarize(mptc.parse(UNIFORM))
    assert f"{s.layers[0].params:,}" in rows[0] and f"{s.layers[0].flops_per_token:,}" in rows[0]
    assert len(lines) < 20 and "attn.q" not in "\n".join(lines)


def test_layers_that_differ_split_the_groups(tmp_path, capsys):
    text = UNIFORM.replace("hidden = 64", "hidden = [64, 64, 64, 128, 128, 64, 64, 64, 64, 64, 64, 32]")
    names = [g.name for g in __import__("mptc.summary").summary.layer_groups(mptc.summarize(mptc.parse(text)).layers)]
    assert names == ["layers 0–2 ×3", "layers 3–4 ×2", "layers 5–10 ×6", "layer 11"]
    out = "\n".join(_summary(tmp_path, capsys, text))
    for name in names:
        assert name in out


def test_verbose_lists_every_tensor_and_json_every_layer(tmp_path, capsys):
    out = "\n".join(_summary(tmp_path, capsys, UNIFORM, "--verbose"))
    assert "attn.q.weight (32, 32)" in out.replace("layers.0.", "") and "mlp.up.weight (64, 32)" in out
    data = __import__("json").loads("\n".join(_summary(tmp_path, capsys, UNIFORM, "--json")))
    assert len(data["layers"]) == 12 and "layers.11.mlp.up.weight" in data["layers"][11]["tensors"]
