"""The language features of the 2026 Hugging Face families: rope scaling, sandwich and output norms,
soft-capping, attention scale, embedding scale, parallel residual, geglu_tanh, last-token pooling,
token classification and the span head. Each is parsed, printed, refused where wrong, lowered and
checked against transformers or a written-out reference, exported to ONNX, and gated in the passes."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import mptc
from mptc import ops, tables
from mptc import spec as S
from mptc.errors import SpecError
from mptc.passes import AddHeads, GrowWidth
from mptc.passes.base import PassRefused
from mptc.schema import parse

BASE = """\
model m {{
  vocab = 64
  width = 32
  embed {{ positions = {positions}{embed} }}
  layers {n} {{
    norm = rmsnorm(eps = 1e-6)
{layer}    attention {{ heads = 4, kv_heads = 2, bias = false{attn} }}
    mlp {{ hidden = 48, activation = {act}, bias = false }}
  }}
  head {head}
}}
"""


def text(positions: str = "rope(theta = 10000.0)", embed: str = "", n: int = 2, layer: str = "", attn: str = "",
         act: str = "swiglu", head: str = "lm { norm = rmsnorm(eps = 1e-6) }") -> str:
    """A small decoder spec with one part replaced; line 4 is `embed`, 7 the layer fields (if any)."""
    return BASE.format(positions=positions, embed=embed, n=n, layer=f"    {layer}\n" if layer else "", attn=attn,
                       act=act, head=head)


DEIT_TEXT = text(positions="none", embed=", input = patches(image = 8, patch = 4, distill = true)",
                 head="classify { classes = 3 }").replace("  vocab = 64\n", "")
FEATURES = {  # a spec using each new feature, and the base features that differ from rope alone (toggled)
    "rope scaling": (text(positions="rope(theta = 500000.0, scaling = llama3(factor = 8, original = 16))"), ()),
    "logit softcap": (text(head="lm { norm = rmsnorm(eps = 1e-6), softcap = 30.0 }"), ()),
    "attention softcap": (text(attn=", softcap = 50.0"), ()),
    "attention scale": (text(attn=", scale = 0.25"), ()),
    "embedding scale": (text(embed=", scale = sqrt_width"), ()),
    "sandwich norms": (text(layer="placement = sandwich"), ()),
    "output norms": (text(layer="placement = output"), ()),
    "parallel residual": (text(layer="parallel = true"), ()),
    "geglu tanh": (text(act="geglu_tanh"), ()),
    "qk norm over all heads": (text(attn=", qk_norm = rmsnorm(eps = 1e-6), qk_norm_over = all"), ("qk norm",)),
    "layer rope": (text(attn=", rope = [rope(theta = 1000.0), none]"), ()),
    "distillation token": (DEIT_TEXT, ("patches", "rope")),
    "last-token pooling": (text(head="classify { classes = 3, pool = last }"), ()),
    "token classification": (text(head="classify { classes = 5, pool = none }"), ()),
    "span head": (text(head="span { }"), ()),
}


# --- the feature set ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FEATURES)
def test_features_names_what_a_spec_uses(name):
    spec = parse(FEATURES[name][0])
    want = {S.Feature(name), S.Feature.ROPE} ^ set(map(S.Feature, FEATURES[name][1]))  # listed: added, or rope out
    assert S.features(spec) == want
    assert S.Feature(name) not in S.BASE_FEATURES


def test_shipped_tiny_specs_use_only_base_features(tiny_path):
    assert S.features(mptc.load(tiny_path)) <= S.BASE_FEATURES


def test_every_feature_says_where_it_is_written():
    assert set(S.FEATURE_FIELDS) == set(S.Feature)


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("cls", [GrowWidth, AddHeads], ids=["grow_width", "add_heads"])
def test_growth_refuses_new_features_by_name(name, cls):
    spec = parse(FEATURES[name][0])
    model = mptc.build(spec, seed=0)
    p = cls(width=64) if cls is GrowWidth else cls(n=2)
    with pytest.raises(PassRefused) as e:
        p.requires(model)
    assert e.value.message.startswith(f"{p.name} does not handle {name} ({S.FEATURE_FIELDS[S.Feature(name)]})")


def test_a_pass_declaring_a_feature_gets_past_the_gate():
    spec = parse(FEATURES["embedding scale"][0])
    model = mptc.build(spec, seed=0)

    class Scaled(GrowWidth):
        features = S.BASE_FEATURES | {S.Feature.EMBEDDING_SCALE}

    Scaled(width=64).requires(model)  # the role check and the width rule run, and pass
    with pytest.raises(PassRefused, match="grow_width does not handle embedding scale"):
        GrowWidth(width=64).apply(model)  # refused before anything is computed


# --- printing: parse(str(spec)) == spec ---------------------------------------------------------------

ROUND_TRIP = [
    text(positions="rope(theta = 10000.0, scaling = linear(factor = 4.0))"),
    text(positions="rope(theta = 10000.0, scaling = dynamic(factor = 2, original = 16))"),
    text(positions="rope(theta = 500000.0, scaling = llama3(factor = 8.0, low = 1.0, high = 4.0, original = 16))"),
    text(positions="rope(theta = 10000.0, scaling = yarn(factor = 4.0, original = 16, beta_fast = 16.0))"),
    text(positions="rope(theta = 10000.0, scaling = longrope(factor = 8, original = 16, short = [1, 1, 1, 1], "
                   "long = [1, 2, 3, 4.5]))"),
    text(positions="rope(theta = 10000.0, scaling = yarn(factor = 4.0, original = 16, attention = 1.5, "
                   "truncate = false))"),
    text(embed=", scale = sqrt_width"),
    text(embed=", scale = 2.5"),
    text(layer="placement = [sandwich, output]"),
    text(layer="parallel = [true, false]"),
    text(layer="parallel = true, shared_norm = true"),
    text(attn=", softcap = [50.0, none], scale = 0.125"),
    text(act="geglu_tanh"),
    text(attn=", qk_norm = rmsnorm(eps = 1e-6), qk_norm_over = [all, head]"),
    text(attn=", rope = [rope(theta = 10000.0), rope(theta = 1e6, scaling = linear(factor = 8))]"),
    text(head="lm { tied = true, softcap = 30.0 }"),
    text(head="classify { classes = 3, pool = last }"),
    text(head="classify { classes = 3, pool = none, bias = false }"),
    text(head="span { norm = rmsnorm(eps = 1e-6), bias = false }"),
    DEIT_TEXT,
]


@pytest.mark.parametrize("src", ROUND_TRIP + [f[0] for f in FEATURES.values()])
def test_round_trip(src):
    spec = parse(src)
    printed = str(spec)
    assert parse(printed) == spec
    assert str(parse(printed)) == printed


def test_printed_forms():
    spec = parse(text(positions="rope(theta = 10000.0, scaling = yarn(factor = 4, original = 16))",
                      embed=", scale = sqrt_width", layer="placement = sandwich", attn=", softcap = 50"))
    out = str(spec)
    att = 0.1 * math.log(4.0) + 1.0  # transformers' default yarn attention factor
    assert (f"rope(theta = 10000.0, scaling = yarn(factor = 4.0, original = 16, beta_fast = 32.0, beta_slow = 1.0, "
            f"attention = {att!r}, truncate = true))") in out
    assert "scale = sqrt_width" in out and "placement = sandwich" in out and "softcap = 50.0" in out
    assert spec.embed_scale == pytest.approx(math.sqrt(32))
    assert parse(text(head="span { }")).head == S.Head("span", None, bias=True, classes=2)


# --- located errors ---------------------------------------------------------------------------------

ERRORS = [  # (spec, message, line, the text the error points at: its first occurrence on that line)
    (text(positions="rope(theta = 1e4, scaling = llama4(factor = 8))"), "unknown rope scaling 'llama4'", 4,
     "llama4"),
    (text(positions="rope(theta = 1e4, scaling = linear(factor = 0.5))"), "factor must be at least 1, got 0.5", 4,
     "0.5"),
    (text(positions="rope(theta = 1e4, scaling = yarn(factor = 4))"), "yarn() needs `original = …`", 4, "yarn"),
    (text(positions="rope(theta = 1e4, scaling = dynamic(factor = 2, low = 1, original = 8))"),
     "unknown argument 'low' for dynamic()", 4, "1, original"),
    (text(positions="rope(theta = 1e4, scaling = linear)"), "linear scaling needs its factor", 4, "linear"),
    (text(positions="rope(theta = 1.0, scaling = yarn(factor = 4, original = 8))"),
     "yarn scaling needs theta > 1, got 1.0", 4, "rope("),
    (text(positions="rope(theta = 1e4, scaling = dynamic(factor = 4, original = 1))"),
     "original must be at least 2, got 1", 4, "1))"),
    (text(positions="rope(theta = 1e4, scaling = dynamic(factor = 4, original = 8))", attn=", rotary_dim = 2"),
     "dynamic scaling needs at least 4 rotated dims, layer 0 rotates 2", 4, "rope("),
    (text(positions="rope(theta = 1e4, scaling = longrope(factor = 4, original = 8, short = [1, 1], long = [1, 2]))"),
     "longrope lists 2 short factors, but layer 0 rotates 4 pairs of dims", 4, "rope("),
    (text(positions="rope(theta = 1e4, scaling = longrope(factor = 4, original = 8, short = [1, 0, 1, 1], "
                    "long = [1, 2, 2, 2]))"), "a short factor must be positive, got 0", 4, "0, 1, 1]"),
    (text(positions="rope(theta = 1e4, scaling = llama3(factor = 8, low = 4, high = 1, original = 8))"),
     "llama3 scaling needs high > low", 4, "llama3"),
    (text(embed=", scale = sqrt_widht"), "unknown embedding scale 'sqrt_widht'", 4, "sqrt_widht"),
    (text(embed=", scale = -2"), "scale must be positive, got -2", 4, "-2"),
    (text(layer="placement = sandwhich"), "unknown placement 'sandwhich'", 7, "sandwhich"),
    (text(layer="parallel = true, placement = post"), "layer 0 is parallel, so its norms sit before the sublayers",
     7, "post"),
    (text(layer="shared_norm = true"), "shared_norm needs parallel = true (layer 0 is sequential)", 7, "true"),
    (text(attn=", softcap = 0"), "softcap must be positive, got 0", 7, "0 }"),
    (text(attn=", scale = [0.5]"), "'scale' lists 1 value but there are 2 layers", 7, "[0.5]"),
    (text(head="lm { softcap = true }"), "softcap must be a number, got a boolean", 10, "true"),
    (text(head="classify { classes = 3, pool = final }"), "unknown pool 'final'", 10, "final"),
    (text(head="classify { classes = 3, pool = none, pooler = true }"), "pool = none classifies every position",
     10, "true"),
    (text(head="span { classes = 2 }"), "unknown field 'classes' in head span", 10, "classes"),
    (text(act="geglu_tahn"), "unknown activation 'geglu_tahn'", 8, "geglu_tahn"),
    (text(positions="none", embed=", input = patches(image = 8, patch = 4, cls = false, distill = true)"),
     "a distillation token sits after the class token", 4, "patches("),
    (text(attn=", qk_norm_over = all"), "layer 0: qk_norm_over = all needs a qk_norm", 7, "all"),
    (text(positions="learned", attn=", rope = rope(theta = 10.0)"), "a layer's rope needs rotary positions", 7,
     "rope(theta = 10"),
    (text(attn=", rope = [learned, none]"), "a layer's rope must be rope(theta = …, scaling = …), got learned", 7,
     "learned"),
    (text(attn=", qk_norm = rmsnorm, qk_norm_over = every"), "unknown qk_norm_over 'every'", 7, "every"),
]


@pytest.mark.parametrize(("src", "message", "line", "at"), ERRORS)
def test_located_errors(src, message, line, at):
    with pytest.raises(SpecError) as e:
        parse(src)
    assert e.value.message.startswith(message), e.value.message
    col = src.splitlines()[line - 1].index(at) + 1
    assert (e.value.line, e.value.col) == (line, col), e.value.render()


# --- rope scaling against transformers --------------------------------------------------------------

ROPE = {  # transformers' rope_parameters, and the same in mptc
    "linear": ({"factor": 4.0}, "linear(factor = 4.0)"),
    "llama3": ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
               "llama3(factor = 8.0, low = 1.0, high = 4.0, original = 16)"),
    "yarn": ({"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0, "beta_slow": 2.0},
             "yarn(factor = 4.0, original = 16, beta_fast = 16.0, beta_slow = 2.0)"),
    "dynamic": ({"factor": 2.0}, "dynamic(factor = 2.0, original = 16)"),
    "longrope": ({"factor": 4.0, "original_max_position_embeddings": 16, "short_factor": [1.0, 1.1, 1.5, 2.0],
                  "long_factor": [1.0, 2.0, 5.0, 9.0]},
                 "longrope(factor = 4.0, original = 16, short = [1.0, 1.1, 1.5, 2.0], long = [1.0, 2.0, 5.0, 9.0])"),
}
THETA, ORIGINAL, LONG = 10000.0, 16, 40  # sequences of LONG > ORIGINAL positions


def _llama_config(kind: str, layers: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ORIGINAL,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": kind, "rope_theta": THETA, **ROPE[kind][0]},
                       attn_implementation="eager")


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn"])
def test_rope_inverse_frequencies_match_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    want, attention = ROPE_INIT_FUNCTIONS[kind](_llama_config(kind), "cpu")
    sc = parse(text(positions=f"rope(theta = {THETA}, scaling = {ROPE[kind][1]})")).embed.positions.scaling
    got = torch.from_numpy(tables.rope_inv_freq(8, THETA, sc))  # head_dim 32/4
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (sc.attention if kind == "yarn" else 1.0) == pytest.approx(attention)
    assert not torch.allclose(got, torch.from_numpy(tables.rope_inv_freq(8, THETA, None)))  # the scaling changed


def test_dynamic_rope_grows_the_base_past_the_original_context():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _llama_config("dynamic")
    x = torch.zeros(1, LONG, 32)
    for t in (ORIGINAL - 4, LONG):
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=t)
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * inv
        cos, sin = ops.dynamic_rope_tables(x[:, :t], 8, THETA, 2.0, ORIGINAL)
        torch.testing.assert_close(cos, torch.cat([freqs, freqs], -1).cos(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin, torch.cat([freqs, freqs], -1).sin(), rtol=1e-5, atol=1e-5)
    plain = ops.rope_tables(x[:, :ORIGINAL - 4], 8, THETA)  # up to the original context: plain rope
    torch.testing.assert_close(ops.dynamic_rope_tables(x[:, :ORIGINAL - 4], 8, THETA, 2.0, ORIGINAL), plain)


LLAMA_KEYS = {"embed.tokens.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight",
              "head.out.weight": "lm_head.weight"}
LLAMA_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.q": "self_attn.q_proj",
               "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
               "mlp.up": "mlp.up_proj", "mlp.gate": "mlp.gate_proj", "mlp.down": "mlp.down_proj"}


def _load(model, hf_state: dict, keys: dict, layer_keys: dict, plus_one: tuple[str, ...] = ()) -> None:
    """Copy transformers weights into an mptc model; norms named in plus_one have (1 + w) gains."""
    state = {}
    for name in model.state_dict():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            part, leaf = rest.rsplit(".", 1)
            src = f"model.layers.{i}.{layer_keys[part]}.{leaf}"
        else:
            src = keys[name]
        w = hf_state[src]
        state[name] = w + 1 if any(name.endswith(f"{p}.weight") for p in plus_one) else w
    model.load_state_dict(state)


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn", "dynamic", "longrope"])
def test_scaled_rope_llama_matches_transformers_past_the_original_context(kind):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(_llama_config(kind, layers=2)).eval()
    with torch.no_grad():  # weights large enough that the positions matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    spec = parse(text(positions=f"rope(theta = {THETA}, scaling = {ROPE[kind][1]})", act="swiglu"))
    model = mptc.build(spec).eval()
    _load(model, hf.state_dict(), LLAMA_KEYS, LLAMA_LAYER)
    ids = torch.randint(0, 64, (2, LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = model(input_ids=ids)
        plain = mptc.build(spec.replace(embed=S.Embed(positions=S.Positions("rope", THETA))))
        plain.load_state_dict(model.state_dict())
        unscaled = plain(input_ids=ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (unscaled - want)[:, ORIGINAL:].abs().max() > 1e-3  # the scaling matters past the original context
    if kind in ("dynamic", "longrope"):  # they depend on the length: within the original context too
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids[:, :12]), hf(input_ids=ids[:, :12]).logits, rtol=1e-4,
                                       atol=1e-5)


# --- Gemma 2 against transformers: embedding scale, sandwich norms, both softcaps, attention scale,
# geglu_tanh, (1 + w) gains folded ----------------------------------------------------------------------

GEMMA2 = """\
model gemma2 {
  vocab = 64
  width = 32
  embed { positions = rope(theta = 10000.0), scale = sqrt_width }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    placement = sandwich
    attention { heads = 4, kv_heads = 2, head_dim = 16, bias = false, softcap = 5.0, scale = 0.125,
                window = [6, none] }
    mlp { hidden = 48, activation = geglu_tanh, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true, softcap = 3.0 }
}
"""
GEMMA2_LAYER = {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm",
                **{k: v for k, v in LLAMA_LAYER.items() if "." in k}}


def test_gemma2_matches_transformers():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=64,
                       sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       attn_implementation="eager")
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # gains away from zero and large scores, so the caps and (1 + w) matter
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "norm" in n else 0.2))
    model = mptc.build(parse(GEMMA2)).eval()
    _load(model, hf.state_dict(), {"embed.tokens.weight": "model.embed_tokens.weight",
                                   "head.norm.weight": "model.norm.weight"}, GEMMA2_LAYER, plus_one=("norm",))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 9:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, :9], want[1, :9], rtol=1e-4, atol=1e-5)
    assert 2.0 < got.abs().max() <= 3.0  # capped, and the cap shapes the logits


GEMMA3 = """\
model gemma3 {
  vocab = 64
  width = 32
  embed { positions = rope(theta = 1000000.0, scaling = linear(factor = 8.0)), scale = sqrt_width }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    placement = sandwich
    attention { heads = 4, kv_heads = 2, head_dim = 16, bias = false, scale = 0.125, qk_norm = rmsnorm(eps = 1e-6),
                window = [6, none], rope = [rope(theta = 10000.0), none] }
    mlp { hidden = 48, activation = geglu_tanh, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = true }
}
"""


def test_gemma3_matches_transformers():
    """Local layers with their own rope, global layers with the model's scaled rope; q/k norms per head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=64,
                           sliding_window=6, layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6,
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1000000.0}},
                           attn_implementation="eager")
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "norm" in n else 0.2))
    model = mptc.build(parse(GEMMA3)).eval()
    layer = {**GEMMA2_LAYER, "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
    _load(model, hf.state_dict(), {"embed.tokens.weight": "model.embed_tokens.weight",
                                   "head.norm.weight": "model.norm.weight"}, layer, plus_one=("norm",))
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


DEIT = """\
model deit {
  width = 32
  embed { input = patches(image = 16, patch = 4, cls = true, distill = true), positions = learned }
  layers 2 {
    norm = layernorm(eps = 1e-12)
    attention { heads = 4, mask = bidirectional }
    mlp { hidden = 48 }
  }
  head classify { classes = 3, norm = layernorm(eps = 1e-12) }
}
"""


def test_deit_matches_transformers():
    """The distillation token after the class token: N + 2 positions; the head reads the class token."""
    from transformers import DeiTConfig, DeiTForImageClassification

    cfg = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
                     patch_size=4, num_labels=3, attn_implementation="eager")
    torch.manual_seed(0)
    hf = DeiTForImageClassification(cfg).eval()
    sd = hf.state_dict()
    model = mptc.build(parse(DEIT)).eval()
    e = "deit.embeddings."
    keys = {"embed.cls": f"{e}cls_token", "embed.distill": f"{e}distillation_token",
            "embed.positions.weight": f"{e}position_embeddings",
            "embed.patch.weight": f"{e}patch_embeddings.projection.weight",
            "embed.patch.bias": f"{e}patch_embeddings.projection.bias", "head.norm.weight": "deit.layernorm.weight",
            "head.norm.bias": "deit.layernorm.bias", "head.out.weight": "classifier.weight",
            "head.out.bias": "classifier.bias"}
    layer = {"attn_norm": "layernorm_before", "mlp_norm": "layernorm_after", "attn.q": "attention.q_proj",
             "attn.k": "attention.k_proj", "attn.v": "attention.v_proj", "attn.o": "attention.o_proj",
             "mlp.up": "mlp.fc1", "mlp.down": "mlp.fc2"}
    state = {}
    for name, w in model.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            part, leaf = rest.rsplit(".", 1)
            src = sd[f"deit.layers.{i}.{layer[part]}.{leaf}"]
        else:
            src = sd[keys[name]]
        state[name] = src.reshape(w.shape)
    model.load_state_dict(state)
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=px), hf(pixel_values=px).logits, rtol=1e-4, atol=1e-5)
    assert mptc.spec_of(model).image_len == 18


NEOX = """\
model neox {
  vocab = 64
  width = 32
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = layernorm(eps = 1e-5)
    parallel = true
    attention { heads = 4, rotary_dim = 4 }
    mlp { hidden = 48 }
  }
  head lm { norm = layernorm(eps = 1e-5) }
}
"""


def test_gpt_neox_matches_transformers():
    """A parallel residual with two norms, partial rotary (a quarter of the head rotated)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, rotary_pct=0.5, max_position_embeddings=64, use_parallel_residual=True,
                        attn_implementation="eager")
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    sd, state = hf.state_dict(), {}
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.o": "attention.dense",
             "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}
    for name in mptc.build(parse(NEOX)).state_dict():
        if not name.startswith("layers."):
            state[name] = sd[{"embed.tokens.weight": "gpt_neox.embed_in.weight", "head.out.weight": "lm_head.weight",
                              "head.norm.weight": "gpt_neox.final_layer_norm.weight",
                              "head.norm.bias": "gpt_neox.final_layer_norm.bias"}[name]]
            continue
        _, i, rest = name.split(".", 2)
        part, leaf = rest.rsplit(".", 1)
        if part in ("attn.q", "attn.k", "attn.v"):  # fused per head: rows (H, [q, k, v], K)
            w = sd[f"gpt_neox.layers.{i}.attention.query_key_value.{leaf}"]
            state[name] = w.view(4, 3, 8, *w.shape[1:])[:, "qkv".index(part[-1])].reshape(32, *w.shape[1:])
        else:
            state[name] = sd[f"gpt_neox.layers.{i}.{names[part]}.{leaf}"]
    model = mptc.build(parse(NEOX), weights=state).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_embedding_scale_is_rounded_to_the_model_dtype():
    spec = parse(text(embed=", scale = sqrt_width", head="none { }", n=1))
    model = mptc.build(spec)
    node = next(n for n in model.graph.nodes if "mptc" in n.meta and n.meta["mptc"].role == "embed.scale")
    assert node.target is ops.scale and node.args[1] == math.sqrt(32)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = x * torch.tensor(5.65625, dtype=torch.bfloat16)  # √32 = 5.65685… is 5.65625 in bfloat16
    torch.testing.assert_close(ops.scale(x, math.sqrt(32)), want, rtol=0, atol=0)
    assert not torch.equal(ops.scale(x, math.sqrt(32)), (x.float() * math.sqrt(32)).to(torch.bfloat16))


def test_saved_model_dir_reloads_with_its_features(tmp_path):
    model = perturbed(parse(GEMMA3))
    mptc.save(model, tmp_path / "m")
    again = mptc.load_model(tmp_path / "m")
    assert mptc.spec_of(again) == mptc.spec_of(model)
    x = mptc.example_inputs(mptc.spec_of(model), batch=2, seq=10)
    with torch.no_grad():
        torch.testing.assert_close(again(**x), model(**x), rtol=0, atol=0)


OLMO2 = """\
model olmo2 {
  vocab = 64
  width = 32
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    placement = output
    attention { heads = 4, kv_heads = 2, bias = false, qk_norm = rmsnorm(eps = 1e-6), qk_norm_over = all }
    mlp { hidden = 48, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6) }
}
"""


def test_olmo2_matches_transformers():
    """Output norms (after each sublayer, no pre-norm) and q/k norms over the whole projection."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, eos_token_id=None,
                      pad_token_id=None, bos_token_id=None, attn_implementation="eager")
    torch.manual_seed(0)
    hf = Olmo2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model = mptc.build(parse(OLMO2)).eval()
    layer = {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm",
             "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
             **{k: v for k, v in LLAMA_LAYER.items() if "." in k}}
    _load(model, hf.state_dict(), LLAMA_KEYS, layer)
    assert model.state_dict()["layers.0.attn.q_norm.weight"].shape == (32,)  # H·K, not K
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), hf(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


# --- written-out references: output norms, parallel residual, heads ----------------------------------


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _reference(model, spec, ids, mask=None):
    """The decoder of `text()` written out: rope, causal GQA attention, SwiGLU, the layer's norm placement."""
    p = dict(model.named_parameters())
    b, t = ids.shape
    x = F.embedding(ids, p["embed.tokens.weight"])
    inv = 1.0 / (THETA ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    if mask is not None:
        keep = (keep & mask.bool()[:, None, None, :]) | torch.eye(t, dtype=torch.bool)

    def rot(z):
        return z * cos + torch.cat([-z[..., 4:], z[..., :4]], -1) * sin

    def attn(i, h):
        q = (h @ p[f"layers.{i}.attn.q.weight"].T).view(b, t, 4, 8).transpose(1, 2)
        k = (h @ p[f"layers.{i}.attn.k.weight"].T).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
        v = (h @ p[f"layers.{i}.attn.v.weight"].T).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
        s = (rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(8)).masked_fill(~keep, float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32)
        return o @ p[f"layers.{i}.attn.o.weight"].T

    def mlp(i, h):
        g, u = h @ p[f"layers.{i}.mlp.gate.weight"].T, h @ p[f"layers.{i}.mlp.up.weight"].T
        return (F.silu(g) * u) @ p[f"layers.{i}.mlp.down.weight"].T

    for i, ly in enumerate(spec.layers):
        def n(name, z, i=i):
            return _rms(z, p[f"layers.{i}.{name}.weight"])
        if ly.parallel:
            h1 = n("attn_norm", x)
            h2 = h1 if ly.shared_norm else n("mlp_norm", x)
            x = x + attn(i, h1) + mlp(i, h2)
        elif ly.placement == "output":  # OLMo 2
            x = x + n("attn_out_norm", attn(i, x))
            x = x + n("mlp_out_norm", mlp(i, x))
        else:  # pre
            x = x + attn(i, n("attn_norm", x))
            x = x + mlp(i, n("mlp_norm", x))
    return x


@pytest.mark.parametrize("layer", ["placement = output", "parallel = true", "parallel = true, shared_norm = true",
                                   "parallel = [true, false]"])
def test_layer_forms_match_a_written_out_reference(layer):
    spec = parse(text(layer=layer, head="none { }"))
    model = perturbed(spec)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), _reference(model, spec, ids), rtol=1e-4, atol=1e-5)
    names = {n for n, _ in model.named_parameters()}
    if "shared_norm" in layer:
        assert "layers.0.mlp_norm.weight" not in names
    if "output" in layer:
        assert {"layers.0.attn_out_norm.weight", "layers.0.mlp_out_norm.weight"} <= names
        assert "layers.0.attn_norm.weight" not in names


def perturbed(spec):
    model = mptc.build(spec, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _padded():
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[1, 6:] = 0  # right padding: the last real token is at 5
    mask[2, :3] = 0  # left padding: the last real token is at 8
    return ids.masked_fill(mask == 0, 0), mask


def test_last_token_pooling_reads_the_last_real_token_with_either_padding():
    spec = parse(text(head="classify { classes = 3, pool = last, bias = false }"))
    model = perturbed(spec)
    body = perturbed(spec.replace(head=S.Head("none")))
    body.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    ids, mask = _padded()
    with torch.no_grad():
        hidden = body(input_ids=ids, attention_mask=mask)  # (B, T, D)
        got = model(input_ids=ids, attention_mask=mask)  # (B, C)
        unmasked = model(input_ids=ids)
    w = model.state_dict()["head.out.weight"]
    torch.testing.assert_close(got, hidden[[0, 1, 2], [8, 5, 8]] @ w.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmasked[0], got[0])  # no mask: the last position


@pytest.mark.parametrize("head", ["classify(classes = 5) { pool = none }", "span { }"])
def test_token_heads_give_one_row_per_position(head):
    spec = parse(text(head=head))
    model = perturbed(spec)
    body = perturbed(spec.replace(head=S.Head("none")))
    body.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    ids, mask = _padded()
    sd = model.state_dict()
    with torch.no_grad():
        want = body(input_ids=ids, attention_mask=mask) @ sd["head.out.weight"].T + sd["head.out.bias"]
        got = model(input_ids=ids, attention_mask=mask)
    assert got.shape == (3, 9, spec.head.classes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert spec.output == "logits"


def test_token_and_span_heads_match_transformers():
    from transformers import LlamaForQuestionAnswering, LlamaForSequenceClassification, LlamaForTokenClassification

    cfg = _llama_config("linear", layers=2)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": THETA}
    cfg.pad_token_id, cfg.num_labels = 0, 3
    ids, mask = _padded()
    base = parse(text())
    norm = "norm = rmsnorm(eps = 1e-6)"
    for cls, head, out in [(LlamaForSequenceClassification, f"classify {{ {norm}, classes = 3, pool = last, "
                            "bias = false }", "score"),
                           (LlamaForTokenClassification, f"classify {{ {norm}, classes = 3, pool = none }}", "score"),
                           (LlamaForQuestionAnswering, f"span {{ {norm} }}", "qa_outputs")]:
        torch.manual_seed(0)
        hf = cls(cfg).eval()
        prefix = "transformer" if cls is LlamaForQuestionAnswering else "model"
        sd = {k.replace(f"{prefix}.", "model.", 1): v for k, v in hf.state_dict().items()}
        spec = base.replace(head=parse(text(head=head)).head)
        model = mptc.build(spec).eval()
        keys = {"embed.tokens.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight",
                "head.out.weight": f"{out}.weight", "head.out.bias": f"{out}.bias"}
        _load(model, sd, keys, LLAMA_LAYER)
        with torch.no_grad():
            r = hf(input_ids=ids, attention_mask=mask)
            got = model(input_ids=ids, attention_mask=mask)
        want = torch.stack([r.start_logits, r.end_logits], -1) if cls is LlamaForQuestionAnswering else r.logits
        real = mask.bool() if got.dim() == 3 else torch.ones(3, dtype=torch.bool)
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_softcapped_attention_without_cap_effect_is_sdpa():
    """With a cap far above the scores, the written-out attention is SDPA's."""
    spec = parse(text(attn=", softcap = 1e6"))
    model = perturbed(spec)
    plain = mptc.build(spec.replace(layers=tuple(replace(ly, attention=replace(ly.attention, softcap=None))
                                                 for ly in spec.layers))).eval()
    plain.load_state_dict(model.state_dict())
    x = mptc.example_inputs(spec, batch=2, seq=10, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**x), plain(**x), rtol=1e-4, atol=1e-5)


# --- ONNX Runtime parity, many features at once ------------------------------------------------------

MANY = """\
model many {
  vocab = 64
  width = 32
  embed { positions = rope(theta = 10000.0, scaling = dynamic(factor = 2.0, original = 8)), scale = sqrt_width }
  layers 3 {
    norm = rmsnorm(eps = 1e-6)
    placement = [sandwich, output, pre]
    parallel = [false, false, true]
    attention {
      heads = 4, kv_heads = 2, bias = false, softcap = [20.0, none, 20.0], scale = 0.3
      rope = [none, rope(theta = 500.0, scaling = longrope(factor = 4.0, original = 8, short = [1, 1.2, 1.5, 2],
                                                           long = [1, 3, 6, 9])), none]
    }
    mlp { hidden = 48, activation = geglu_tanh, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), softcap = 2.0 }
}
"""


def test_onnx_parity_many_features(tmp_path):
    from mptc.export import run_onnx

    spec = parse(MANY)
    model = perturbed(spec)
    mptc.export_onnx(model, tmp_path / "m.onnx")
    for seq in (6, 20):  # within and past the original context: dynamic's base and longrope's factors follow T
        x = mptc.example_inputs(spec, batch=2, seq=seq, padded=True)
        with torch.no_grad():
            want = model(**x).numpy()
        np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), want, rtol=1e-4, atol=1e-5)


def test_onnx_parity_last_token_pooling(tmp_path):
    from mptc.export import run_onnx

    spec = parse(text(positions="rope(theta = 10000.0, scaling = yarn(factor = 4.0, original = 8))", n=1,
                      head="classify { classes = 3, pool = last }"))
    model = perturbed(spec)
    mptc.export_onnx(model, tmp_path / "m.onnx")
    ids, mask = _padded()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).numpy()
    got = run_onnx(tmp_path / "m.onnx", {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FEATURES)
def test_the_torch_free_matrices_are_the_lowered_ones(name):
    from mptc import dims
    from mptc.lower import lower

    spec = parse(FEATURES[name][0])
    lowered = {k: v.axes for k, v in lower(spec, "meta").params.items() if len(v.axes) >= 2}
    assert dict(dims.matrices(spec)) == lowered


# --- learned positions that skip padding (RoBERTa) --------------------------------------------------------------

SKIP = text(positions="learned(skip_padding = true)", attn=", mask = bidirectional").replace(
    "  width = 32\n", "  width = 32\n  context = 12\n")


def test_skip_padding_parses_prints_and_is_located():
    spec = parse(SKIP)
    assert spec.embed.positions == S.Positions("learned", skip_padding=True)
    assert "positions = learned(skip_padding = true)" in S.format_spec(spec)
    assert parse(S.format_spec(spec)) == spec
    bad = SKIP.replace("learned(skip_padding = true)", "learned(skip = true)")
    with pytest.raises(SpecError) as e:
        parse(bad)
    assert e.value.message == "unknown argument 'skip' for learned()"
    assert (e.value.line, e.value.col) == (5, bad.splitlines()[4].index("true") + 1)  # at the argument


def test_skip_padding_numbers_real_tokens_from_the_mask(tmp_path):
    """Left padding leaves the real tokens' outputs as without padding; the plain table would shift them. The traced
    ONNX export counts the same way."""
    from mptc.export import run_onnx

    spec = parse(SKIP)
    model = perturbed(spec)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask)
        alone = model(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:])
        plain = mptc.build(replace(spec, embed=replace(spec.embed, positions=S.Positions("learned"))),
                           weights=dict(model.state_dict()))(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(padded[0, 2:], alone[0], rtol=1e-5, atol=1e-5)
    assert (plain[0, 2:] - alone[0]).abs().max() > 1e-3
    mptc.export_onnx(model, tmp_path / "m.onnx")
    got = run_onnx(tmp_path / "m.onnx", {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(got, padded.numpy(), rtol=1e-4, atol=1e-5)


def test_skip_padding_in_the_direct_emitter():
    """The direct ONNX emitter counts positions over the mask too (left padding, ONNX Runtime against PyTorch)."""
    import onnxruntime as ort

    from mptc import emit

    spec = parse(SKIP)
    assert emit.unsupported(spec, cache=False) == []
    model = perturbed(spec)
    ids = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    sess = ort.InferenceSession(emit.emit(model).to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
