"""`summary`: parameter counts equal the built module's; FLOPs follow the documented formula."""

from __future__ import annotations

from dataclasses import replace

import pytest

import mptc
from mptc.summary import human

from .conftest import EXAMPLES, ROOT, TINY


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


# --- rows split on every field; the features; what each row says -------------------------------

def test_the_table_exactly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = """model rows {
  vocab = 100
  context = 16
  width = 32
  layers 3 {
    attention { heads = 4, window = [none, 8, 8] }
    mlp { hidden = 64 }
  }
  head lm { tied = true }
}
"""
    # embed 100·32 + 16·32; per layer 4·(32·32 + 32) + (64·32 + 64) + (32·64 + 32) + 2 norms · 64 = 8,544 params
    # and 2·(4·32·32 + 2·64·32) + 2·4·(8 + 8)·16 = 18,432 FLOPs, or · 8 keys with the window 8: 17,408; the tied
    # head 2·100·32 FLOPs, no parameters
    expected = """\
rows: 29.34K parameters, 59.65K FLOPs/token (context 16)
┏━━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┓
┃ part          ┃ params ┃ FLOPs/token ┃ layout                                             ┃
┡━━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┩
│ embed         │  3,712 │           0 │ tokens 100 · learned                               │
│ layer 0       │  8,544 │      18,432 │ attn 4×8 causal · mlp 64 gelu · attn.window = none │
│ layers 1–2 ×2 │  8,544 │      17,408 │ attn 4×8 causal · mlp 64 gelu · attn.window = 8    │
│ head          │      0 │       6,400 │ lm, tied: its matrix is counted in embed           │
│ total         │ 29,344 │      59,648 │                                                    │
└───────────────┴────────┴─────────────┴────────────────────────────────────────────────────┘
features: sliding window
consecutive layers equal in every field share a row (params and FLOPs per layer)"""
    lines = _summary(tmp_path, capsys, text)
    assert "\n".join(ln.rstrip() for ln in lines) == expected


def _descs(text: str) -> list[tuple[str, str]]:
    from mptc.summary import layer_groups

    return [(g.name, g.part.desc) for g in layer_groups(mptc.summarize(mptc.parse(text)).layers)]


BASE = "attn 4×8 causal · mlp 64 gelu"


@pytest.mark.parametrize("old,new,shown", [
    # equal parameters and FLOPs: these layers used to share a row, or to get rows that read the same
    ("mask = causal", "mask = causal, window = [8, none] * 6", ["attn.window = 8", "attn.window = none"]),
    ("mask = causal", "mask = causal, softcap = [50.0, none] * 6", ["attn.softcap = 50.0", "attn.softcap = none"]),
    ("mask = causal", "mask = causal, scale = [0.25, 0.5] * 6", ["attn.scale = 0.25", "attn.scale = 0.5"]),
    ("norm = layernorm", "norm = layernorm, placement = [pre, post] * 6", ["placement = pre", "placement = post"]),
    ("norm = layernorm", "norm = [layernorm(eps = 1e-5), layernorm(eps = 1e-6)] * 6",
     ["norm = layernorm(eps = 1e-05)", "norm = layernorm(eps = 1e-06)"]),
    ("norm = layernorm", "norm = layernorm, dropout = [0.0, 0.1] * 6", ["dropout = 0.0", "dropout = 0.1"]),
    ("norm = layernorm", "norm = layernorm, parallel = [false, true] * 6", ["parallel = false", "parallel = true"]),
])
def test_layers_that_differ_in_any_field_get_their_own_rows_saying_how(old, new, shown):
    layer_line = old.startswith("norm")  # the layers' norm, not the head's
    text = UNIFORM.replace(f"    {old}\n", f"    {new}\n") if layer_line else UNIFORM.replace(old, new)
    assert text != UNIFORM
    rows = _descs(text)
    assert [name for name, _ in rows] == [f"layer {i}" for i in range(12)]
    assert [d for _, d in rows] == [f"{BASE} · {x}" for x in shown] * 6  # two different layers never read the same


def test_per_layer_rope_and_qk_norm_split_rows_and_a_layer_rope_equal_to_the_models_does_not():
    text = """model m {
  vocab = 100
  context = 16
  width = 32
  embed { positions = rope(theta = 1000000.0) }
  layers 4 {
    attention { heads = 4, rope = [rope(theta = 10000.0), rope(theta = 10000.0), none, rope(theta = 1000000.0)],
                qk_norm = [rmsnorm(eps = 1e-6), rmsnorm(eps = 1e-6), rmsnorm(eps = 1e-6), rmsnorm(eps = 1e-6)] }
    mlp { hidden = 64 }
  }
  head lm { }
}
"""
    # layer 2 uses the model's rope, layer 3 names the same rope: the same layer, one row
    assert _descs(text) == [("layers 0–1 ×2", f"{BASE} · attn.rope = rope(theta = 10000.0)"),
                            ("layers 2–3 ×2", f"{BASE} · attn.rope = rope(theta = 1000000.0)")]
    assert _descs(text.replace("rmsnorm(eps = 1e-6)]", "none]"))[-1] == \
        ("layer 3", f"{BASE} · attn.qk_norm = none · attn.rope = rope(theta = 1000000.0)")


def test_skippable_layers_are_shown(tmp_path, capsys):
    out = "\n".join(_summary(tmp_path, capsys, (ROOT / "tests/specs/nested-lm.mpt").read_text()))
    for row in ("│ layer 0 ", "│ layers 1–2 ×2 ", "│ layer 3 "):
        assert row in out, out
    assert out.count("skippable = true") == 1 and out.count("skippable = false") == 2
    assert "features: rope, nested" in out


GEMMA = """model gemmaish {
  vocab = 100
  context = 16
  width = 32
  embed { positions = rope(theta = 1000000.0, scaling = linear(factor = 8.0)), scale = sqrt_width }
  layers 4 {
    norm = rmsnorm(eps = 1e-6)
    placement = sandwich
    attention { heads = 4, kv_heads = 2, head_dim = 8, bias = false, window = [4, 4, none, 4], softcap = 50.0 }
    mlp { hidden = 64, activation = geglu_tanh, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true, softcap = 30.0 }
}
"""


def test_the_features_are_listed(tmp_path, capsys):
    s = mptc.summarize(mptc.parse(GEMMA))
    assert s.features == ["rope", "sliding window", "rope scaling", "logit softcap", "attention softcap",
                          "embedding scale", "sandwich norms", "geglu tanh"]
    assert s.features == [f.value for f in mptc.spec.Feature if f in mptc.spec.features(mptc.parse(GEMMA))]
    out = " ".join(ln.strip() for ln in _summary(tmp_path, capsys, GEMMA))  # the caption may wrap
    assert "features: rope, sliding window, rope scaling, logit softcap, attention softcap, embedding scale, " \
        "sandwich norms, geglu tanh" in out
    assert "features: none" in "\n".join(_summary(tmp_path, capsys, UNIFORM))
    data = __import__("json").loads("\n".join(_summary(tmp_path, capsys, GEMMA, "--json")))
    assert data["features"] == s.features and "layer" not in data["layers"][0]


MOE = """model moe {
  vocab = 200
  context = 32
  width = 32
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 4, kv_heads = 2, bias = false }
    mlp { hidden = 24, activation = swiglu, bias = false, experts = 4, top_k = 1, shared = 16, shared_gate = true }
  }
  head lm { norm = rmsnorm(eps = 1e-6) }
}
"""


def test_moe_shows_its_active_parameters_beside_the_total(tmp_path, capsys):
    spec = mptc.parse(MOE)
    s = mptc.summarize(spec)
    model = mptc.build(spec, seed=0)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert s.params == total == 40_928 and experts == 2 * 3 * 4 * 24 * 32
    assert s.active_params == total - experts * 3 // 4 == 27_104  # a token goes through 1 of the 4 experts
    assert s.layers[0].active_params == 14_048 - 3 * 3 * 24 * 32 == 7_136
    out = " ".join(ln.strip() for ln in _summary(tmp_path, capsys, MOE))
    assert "moe: 40.93K parameters (27.10K active per token)" in out
    assert s.layers[0].desc == "attn 4/2kv×8 causal · mlp 24 swiglu · 4 experts top 1 · 7,136 params active per token"
    assert "FLOPs count every expert" in out
    dense = mptc.summarize(mptc.parse(UNIFORM))
    assert dense.active_params == dense.params and "active" not in dense.layers[0].desc


@pytest.mark.parametrize("head,desc", [
    ("lm { tied = true }", "lm, tied: its matrix is counted in embed"), ("lm { }", "lm"),
    ("classify { classes = 3 }", "classify 3 classes, pool first"),
    ("classify { classes = 3, pool = mean, pooler = true }", "classify 3 classes, pool mean + pooler"),
    ("classify { classes = 5, pool = none }", "classify 5 classes, per token"),
    ("span { }", "span: start and end logits per token"), ("none { }", "none: hidden states")])
def test_the_head_row_says_what_the_head_gives(head, desc):
    text = UNIFORM.replace("head lm { norm = layernorm, tied = true }", f"head {head}")
    s = mptc.summarize(mptc.parse(text))
    assert s.head.desc == desc
    if "tied = true" in head:  # the matrix is counted once, in the embedding
        assert s.head.params == 0 and s.embed.params == 100 * 32 + 16 * 32


def test_a_model_without_context_says_attention_is_not_counted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    text = UNIFORM.replace("  context = 16\n", "  embed { positions = rope }\n")
    s = mptc.summarize(mptc.parse(text))
    assert s.context is None and s.layers[0].flops_per_token == 2 * (4 * 32 * 32 + 2 * 64 * 32)  # no attention term
    lines = _summary(tmp_path, capsys, text)
    assert lines[0].rstrip() == "grouped: 105.79K parameters, 203.01K FLOPs/token (no context: attention not counted)"


def test_hypernetwork_flops_count_its_generators_and_its_delta():
    s = mptc.summarize(mptc.load("examples/mpt-hyper.mpt"))  # layer 0: lowrank(target = q, rank = 4, hidden = 32)
    d, r, h, c = 64, 4, 32, 8
    generators = 2 * (h * c + r * d * h + r * d * h)  # hidden (h, c), a (r·out, h), b (r·in, h)
    delta = 2 * r * (d + d)  # x → B·x (r) → A·(B·x) (out)
    assert s.layers[0].flops_per_token == s.layers[1].flops_per_token + generators + delta == 198_144
    assert s.layers[3].flops_per_token == s.layers[0].flops_per_token  # target o: the same sizes


def test_film_and_expert_gate_matrices_are_counted():
    s = mptc.summarize(mptc.load("examples/mpt-moe-embed.mpt"))  # D = 64, conditions 8, film hidden 32, 4 tables
    d, c, h, m = 64, 8, 32, 4
    film = lambda n_in: 2 * (h * n_in + 2 * d * h)  # hidden (h, in), then scale and shift (D, h) each
    assert s.embed.flops_per_token == 2 * m * c + film(c) + film(d) == 21_056


@pytest.mark.parametrize("n, want", [(999, "999"), (1000, "1.00K"), (1500, "1.50K"), (999_994, "999.99K"),
                                     (999_999, "1.00M"), (124_668_672, "124.67M"), (-2_500_000, "-2.50M"),
                                     (999_999_999_999, "1.00T")])
def test_human_counts_never_show_1000_of_a_unit(n, want):
    assert human(n) == want


def test_a_sliding_window_bounds_the_attention_flops():
    spec = mptc.load("examples/gpt2-small.mpt")
    d, ff, t, w = 768, 3072, 1024, 256
    matrices = 2 * (4 * d * d + 2 * d * ff)
    for mask, keys in (("causal", w), ("bidirectional", 2 * w - 1)):
        layers = tuple(replace(ly, attention=replace(ly.attention, window=w, mask=mask)) for ly in spec.layers)
        s = mptc.summarize(replace(spec, layers=layers))
        assert all(p.flops_per_token == matrices + 2 * 12 * (64 + 64) * keys for p in s.layers), mask
    wide = tuple(replace(ly, attention=replace(ly.attention, window=4 * t)) for ly in spec.layers)
    assert mptc.summarize(replace(spec, layers=wide)).layers[0].flops_per_token == matrices + 2 * 12 * 128 * t
