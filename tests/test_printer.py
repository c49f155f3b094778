"""The canonical printer and the `fmt` source formatter."""

from __future__ import annotations

import pytest

import mptc
from mptc.printer import format_source
from mptc.syntax import parse_file

from .conftest import EXAMPLES, TINY

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
