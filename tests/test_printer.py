"""The canonical printer and the `fmt` source formatter."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mptc
from mptc import spec as S
from mptc.printer import format_source
from mptc.syntax import parse_file

from .conftest import EXAMPLES, ROOT, TINY

ALL = EXAMPLES + TINY
IDS = [p.stem for p in ALL]


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_canonical_print_round_trips_and_is_stable(path):
    spec = mptc.load(path)
    text = str(spec)
    again = mptc.parse(text)
    assert again == spec
    assert str(again) == text


@pytest.mark.parametrize("path", ALL, ids=IDS)
def test_fmt_round_trips_and_is_idempotent(path):
    src = path.read_text()
    once = format_source(parse_file(src))
    assert mptc.parse(once) == mptc.parse(src)
    assert format_source(parse_file(once)) == once


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_shipped_examples_are_formatted(path):
    src = path.read_text()
    assert format_source(parse_file(src)) == src


MESSY = """\
# header comment
let d=64   # width
let h = d//16
model  m{vocab=100,context=32
  width=d
  # the stack
  layers 2 {attention{heads=h,kv_heads=2}   mlp { hidden = (d+d)*2, activation=swiglu }  # gated
  }
  head lm {tied=true}
}
# trailing
"""

TIDY = """\
# header comment
let d = 64  # width
let h = d // 16

model m {
  vocab = 100
  context = 32
  width = d
  # the stack
  layers 2 {
    attention { heads = h, kv_heads = 2 }
    mlp { hidden = (d + d) * 2, activation = swiglu }  # gated
  }
  head lm { tied = true }
}
# trailing
"""


def test_fmt_keeps_comments_and_constants():
    assert format_source(parse_file(MESSY)) == TIDY
    assert mptc.parse(TIDY) == mptc.parse(MESSY)


def test_fmt_parenthesises_only_where_needed():
    src = "let a = 1 - (2 - 3)\nlet b = (1 - 2) - 3\nlet c = -(4 * 2)\nmodel m {\n  vocab = a + b + c + 20\n" \
          "  context = 8\n  width = 8\n  layers 1 { attention { heads = 2 }, mlp { hidden = 8 } }\n  head lm { }\n}\n"
    out = format_source(parse_file(src))
    assert "let a = 1 - (2 - 3)\n" in out and "let b = 1 - 2 - 3\n" in out and "let c = -(4 * 2)\n" in out
    assert mptc.parse(out).vocab == mptc.parse(src).vocab == 2 - 4 - 8 + 20


def test_per_layer_values_collapse_only_when_equal():
    spec = mptc.parse("model m {\n vocab = 10\n context = 8\n width = 16\n layers 3 { attention { heads = [2, 2, 4] }, "
                      "mlp { hidden = [8, 8, 8] } }\n head lm { } }")
    text = str(spec)
    assert "heads = [2, 2, 4]" in text and "hidden = 8," in text
    assert mptc.parse(text) == spec


def test_list_arithmetic():
    spec = mptc.parse("let w = [32] * 2 + [64]\nmodel m {\n vocab = 10\n context = 8\n width = 16\n layers 3 { "
                      "attention { heads = 2 }, mlp { hidden = w } }\n head lm { } }")
    assert [layer.mlp.hidden for layer in spec.layers] == [32, 32, 64]


# --- property: the canonical printer round-trips every spec the schema accepts -------------------------

NORMS = st.sampled_from(["layernorm", "rmsnorm"]) | st.builds(
    lambda k, eps, bias: f"layernorm(eps = {eps!r}, bias = {bias})" if k else f"rmsnorm(eps = {eps!r})",
    st.booleans(), st.floats(1e-12, 0.1), st.sampled_from(["true", "false"]))
PROBS = st.floats(0.0, 0.9)
BOOLS = st.sampled_from(["true", "false"])
FILMS = st.integers(1, 16).map(lambda h: f"film(hidden = {h})")


def _values(draw, strategy: st.SearchStrategy, n: int) -> tuple[list, str]:
    """One value for all n layers or a list of n; returns the values and their source text."""
    if draw(st.booleans()):
        v = draw(strategy)
        return [v] * n, _text(v)
    vs = [draw(strategy) for _ in range(n)]
    return vs, "[" + ", ".join(_text(v) for v in vs) + "]"


def _text(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _maybe(draw, fields: list[str], name: str, strategy: st.SearchStrategy) -> None:
    if draw(st.booleans()):
        fields.append(f"{name} = {_text(draw(strategy))}")


@st.composite
def spec_texts(draw) -> str:
    """Source text of a valid spec: every field kind (per-layer lists, calls, strings, tasks, types) may appear."""
    n = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["tokens", "patches", "image+text", "text+image"]))
    tokens = kind != "patches"
    cls = draw(st.booleans())
    patches = f"patches(image = 8, patch = 4, channels = {draw(st.integers(1, 3))}, cls = {str(cls).lower()})"
    inp = {"tokens": "tokens", "patches": patches, "image+text": f"[{patches}, tokens]",
           "text+image": f"[tokens, {patches}]"}[kind]
    positions = draw(st.sampled_from(["learned", "sinusoidal", "rope", "none", "rope(theta = {})"]))
    if "{}" in positions:
        positions = positions.format(repr(draw(st.floats(1.0, 1e6))))
    rope = positions.startswith("rope")
    types = tokens and kind == "tokens" and draw(st.booleans())
    experts = tokens and not types and draw(st.booleans())
    gate = draw(st.sampled_from(["token", "condition"]))
    conditions = draw(st.booleans()) or (experts and gate == "condition")
    model = ["width = 16"]
    embed = [f"input = {inp}", f"positions = {positions}"]
    sizes = [draw(st.integers(1, 50)) for _ in range(draw(st.integers(1, 3)))]
    vocab = sum(sizes) if types else draw(st.integers(2, 1000))
    if tokens or draw(st.booleans()):
        model.append(f"vocab = {vocab}")
    if (tokens and positions in ("learned", "sinusoidal")) or draw(st.booleans()):
        model.append(f"context = {draw(st.integers(1, 64))}")
    if conditions:
        model.append(f"conditions = {draw(st.integers(1, 8))}")
    _maybe(draw, model, "init", st.floats(1e-4, 1.0).map(lambda s: f"normal(std = {s!r})"))
    _maybe(draw, embed, "dropout", PROBS)
    _maybe(draw, embed, "norm", NORMS | st.just("none"))
    if kind == "tokens":
        _maybe(draw, embed, "segments", st.integers(0, 3))
    if experts:
        top = draw(st.sampled_from(["", ", top = 1", ", top = 2"]))
        embed.append(f"experts = moe(count = {draw(st.integers(2, 3))}, gate = {gate}{top})")
    if conditions:
        _maybe(draw, embed, "condition", FILMS | st.just("none"))
    _maybe(draw, embed, "adaptive", FILMS | st.just("none"))
    if types:
        names = ["text", "image", "audio"][: len(sizes)]
        embed.append("types { " + ", ".join(f"{k} = {v}" for k, v in zip(names, sizes, strict=False)) + " }")

    heads, heads_text = _values(draw, st.sampled_from([1, 2, 4]), n)
    kv = [draw(st.sampled_from([d for d in (1, 2, 4) if h % d == 0])) for h in heads]
    attn = [f"heads = {heads_text}", "kv_heads = [" + ", ".join(map(str, kv)) + "]"]
    head_dim = [16 // h for h in heads]
    if draw(st.booleans()):
        head_dim, text = _values(draw, st.sampled_from([4, 8]), n)
        attn.append(f"head_dim = {text}")
    for name, strategy in [("value_dim", st.integers(1, 8)), ("mask", st.sampled_from(["causal", "bidirectional"])),
                           ("bias", BOOLS), ("out_bias", BOOLS), ("dropout", PROBS),
                           ("window", st.sampled_from(["none", "1", "4"]))]:
        if draw(st.booleans()):
            attn.append(f"{name} = {_values(draw, strategy, n)[1]}")
    if rope and draw(st.booleans()):
        attn.append(f"rotary_dim = {_values(draw, st.sampled_from([2, 4]), n)[1]}")
    levels = {1: [None], 2: [None, "[1/2, 1]"], 4: [None, "[1/2, 1]", "[1/4, 1/2, 1]"]}  # whole kv groups
    anest = [draw(st.sampled_from(levels[k])) for k in kv]
    if any(anest):
        attn.append("nested = [" + ", ".join(a or "none" for a in anest) + "]")
    act = draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]))
    mlp = [f"hidden = {_values(draw, st.sampled_from([8, 16, 32]), n)[1]}", f"activation = {act}"]
    _maybe(draw, mlp, "bias", BOOLS)
    mnest = draw(st.booleans())
    if mnest:
        mlp.append("nested = [1/8, 1/4, 1/2, 1]")
    layers = []
    for name, strategy in [("norm", NORMS), ("placement", st.sampled_from(["pre", "post"])), ("dropout", PROBS)]:
        if draw(st.booleans()):
            layers.append(f"{name} = {_values(draw, strategy, n)[1]}")
    skippable, text = _values(draw, st.booleans(), n)
    layers.append(f"skippable = {text.replace('True', 'true').replace('False', 'false')}")
    if types and draw(st.booleans()):
        layers.append("modulate = true")
    if conditions and draw(st.booleans()):
        hyper = []
        for a in anest:
            targets = (["up", "gate", "down"] if not mnest else []) + (["q", "k", "v", "o"] if a is None else [])
            rank, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 8))
            choice = draw(st.sampled_from(targets + ["none"]))
            call = f"lowrank(target = {choice}, rank = {rank}, hidden = {hidden})"
            hyper.append(call if choice != "none" else choice)
        layers.append("hyper = [" + ", ".join(hyper) + "]")

    head_kind = draw(st.sampled_from(["lm", "classify", "none"]))
    head = []
    _maybe(draw, head, "norm", NORMS | st.just("none"))
    if head_kind == "lm":
        if not any(f.startswith("vocab") for f in model):
            model.append(f"vocab = {vocab}")
        if tokens and not experts:
            _maybe(draw, head, "tied", BOOLS)
        _maybe(draw, head, "bias", BOOLS)
        if draw(st.booleans()):
            t_act = draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "silu", "tanh"]))
            head.append(f"transform = dense(activation = {t_act}, norm = {draw(NORMS | st.just('none'))})")
    elif head_kind == "classify":
        head.append(f"classes = {draw(st.integers(1, 10))}")
        pools = ["first", "mean"] if tokens or cls else ["mean"]
        head.append(f"pool = {draw(st.sampled_from(pools))}")
        _maybe(draw, head, "pooler", BOOLS)
        _maybe(draw, head, "bias", BOOLS)

    tasks = ['full = subnet()', 'whole = "xl"']
    if mnest:
        mix = ",".join(draw(st.sampled_from(["s", "m", "l", "xl", "1/2"])) for _ in range(n))
        tasks.append(f'mixed = subnet(mix = "{mix}")')
    if all(anest):
        tasks.append('halves = subnet(heads = "' + ",".join(draw(st.sampled_from(["1/2", "xl"])) for _ in range(n))
                     + '")')
    drop = [i for i, s in enumerate(skippable) if s]
    if drop and len(drop) < n:
        tasks.append(f"short = subnet(skip = {drop})")
    inner = [*layers, "attention { " + ", ".join(attn) + " }", "mlp { " + ", ".join(mlp) + " }"]
    body = "\n  ".join([*model, "embed { " + ", ".join(embed) + " }",
                        f"layers {n} {{\n    " + "\n    ".join(inner) + "\n  }",
                        f"head {head_kind} {{ " + ", ".join(head) + " }",
                        "tasks {\n    " + "\n    ".join(tasks) + "\n  }"])
    return f"model gen {{\n  {body}\n}}\n"


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec_texts())
def test_canonical_print_round_trips_every_accepted_spec(text):
    spec = mptc.parse(text)  # the generator writes valid specs only
    printed = str(spec)
    again = mptc.parse(printed)
    assert again == spec, printed
    assert str(again) == printed
    assert mptc.parse(format_source(parse_file(text))) == spec


def test_task_with_per_layer_heads_reloads(tmp_path):
    """A compiled model dir whose task gives per-layer heads reads back (the string stays quoted)."""
    src = (ROOT / "examples" / "mpt-hyper.mpt").read_text()
    src = src.replace("attention { heads = 4, bias = false }",
                      "attention { heads = 4, bias = false, nested = [1/2, 1] }")
    src = src.replace('chat = subnet(mix = "m,l,l,xl")', 'chat = subnet(mix = "m,l,l,xl", heads = "1/2,xl,1/2,xl")')
    src = src.replace("hyper = [lowrank(target = q, rank = 4, hidden = 32), none, none, "
                      "lowrank(target = o, rank = 4, hidden = 32)]", "hyper = none")
    spec = mptc.parse(src)
    assert spec.tasks[1].heads == "1/2,xl,1/2,xl"
    assert 'heads = "1/2,xl,1/2,xl"' in str(spec)
    assert mptc.parse(str(spec)) == spec
    mptc.save(mptc.build(spec, seed=0), tmp_path / "m")
    assert mptc.load(tmp_path / "m") == spec


def test_task_strings_are_escaped():
    spec = mptc.parse("model m { vocab = 10, context = 4, width = 8, layers 1 { attention { heads = 2 }, "
                      "mlp { hidden = 8 } }, head lm { }, tasks { t = \"xl\" } }")
    odd = spec.replace(tasks=(S.Task("t", mix='x"l\\', heads="a\tb"),))
    printed = str(odd)
    assert 'subnet(mix = "x\\"l\\\\", heads = "a\\tb")' in printed
    tasks = next(b for b in parse_file(printed).model.body if b.name == "tasks")
    call = tasks.body[0].value
    assert [v.value for _, v in call.kwargs] == ['x"l\\', "a\tb"]  # read back as written
