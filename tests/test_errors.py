"""Bad specs: each error's message, its line and column, and its hint.

Most cases edit one line of a valid base spec (GPT below, or VIT for image input), so the
position of each error can be read off the base: GPT's line 6 is `    attention { heads = 4 }`.
"""

from __future__ import annotations

import pytest

from mptc.cli import main
from mptc.errors import SpecError
from mptc.schema import parse

GPT = """\
model m {
  vocab = 100
  context = 16
  width = 64
  layers 2 {
    attention { heads = 4 }
    mlp { hidden = 128 }
  }
  head lm { }
}
"""

VIT = """\
model v {
  width = 64
  embed { input = patches(image = 32, patch = 8) }
  layers 2 {
    attention { heads = 4, mask = bidirectional }
    mlp { hidden = 128 }
  }
  head classify { classes = 10 }
}
"""


def gpt(old: str, new: str) -> str:
    """GPT with the first `old` replaced by `new`."""
    assert old in GPT, old
    return GPT.replace(old, new, 1)


def vit(old: str, new: str) -> str:
    assert old in VIT, old
    return VIT.replace(old, new, 1)


def case(name: str, text: str, message: str, line: int, col: int, hint: str | None = None):
    return pytest.param(text, message, line, col, hint, id=name)


SYNTAX = [
    case("missing-brace", gpt("attention { heads = 4 }", "attention { heads = 4"),
         "unexpected end of file", 10, 2, "the '{' on line 6 looks unclosed: the '}' on line 8 is indented less"),
    case("unclosed-brace-at-eof", GPT.removesuffix("}\n"),
         "unexpected end of file; expected", 9, 14, "the '{' on line 1 is never closed"),
    case("stray-character", gpt("width = 64", "width = 64 $"), "unexpected character '$'", 4, 14),
    case("single-quoted-string", gpt("head lm { }", "head lm { norm = 'rmsnorm' }"),
         "unexpected character \"'\"", 9, 20, "strings use double quotes"),
    case("unterminated-string", gpt("head lm { }", 'head lm { norm = "rmsnorm }'),
         "unexpected character '\"'", 9, 20, "a string must end on the line where it starts"),
    case("unknown-escape", gpt("head lm { }", 'head lm { norm = "a\\qb" }'),
         "unknown escape '\\q' in a string", 9, 22, "known escapes"),
    case("keyword-as-first-field-name", gpt("vocab = 100", "let = 100"),
         "'let' is a keyword and cannot be used as a name", 2, 3),
    case("keyword-as-later-field-name", gpt("context = 16", "let = 16"), "'let' is a keyword", 3, 3),
    case("keyword-as-block-name", gpt("mlp {", "model {"), "'model' is a keyword", 7, 5),
    case("keyword-as-argument-name", gpt("head lm { }", "head lm { norm = layernorm(true = 1) }"),
         "'true' is a keyword", 9, 30),
    case("keyword-as-let-name", "let model = 3\n" + GPT, "'model' is a keyword and cannot be used as a name", 1, 5),
    case("true-as-let-name", "let true = 3\n" + GPT, "'true' is a keyword", 1, 5),
    case("missing-equals", gpt("width = 64", "width 64"),
         "expected '{' after `width 64`", 4, 11, "for a field, write `width = 64`"),
    case("missing-value", gpt("width = 64", "width ="), "expected a value after `width =`", 4, 10),
    case("bare-name", gpt("width = 64", "width"), "expected '=' or '{' after `width`", 4, 8),
    case("model-without-brace", "model m\n  width = 64\n}\n", "expected '{' after `model m`", 1, 8),
    case("number-with-letters", gpt("width = 64", "width = 64x"), "malformed number '64x'", 4, 11, "numbers look like"),
    case("number-with-two-dots", gpt("hidden = 128", "hidden = 1.2.8"), "malformed number '1.2.8'", 7, 20),
    case("exponent-without-digits", gpt("width = 64", "width = 1e"), "malformed number '1e'", 4, 11),
    case("number-too-large", gpt("hidden = 128", "hidden = 1e999"), "number '1e999' is too large", 7, 20),
    case("positional-after-keyword", gpt("head lm { }", "head lm { norm = layernorm(eps = 1e-5, true) }"),
         "positional argument after a keyword argument", 9, 42, "put positional arguments first"),
    case("unclosed-paren", gpt("hidden = 128", "hidden = (128"), "unexpected '}'; expected ')'", 7, 25),
    case("kwarg-outside-call", gpt("width = 64", "width = (a = 3)"), "unexpected '='", 4, 14),
    case("two-models", GPT + GPT, "unexpected 'model'", 11, 1, "a file defines a single model"),
    case("empty-file", "", "unexpected end of file; expected 'let', 'model'", 1, 1),
]

NAMES = [
    case("unknown-field", gpt("heads = 4", "haeds = 4"),
         "unknown field 'haeds' in attention", 6, 17, "did you mean 'heads'?"),
    case("unknown-model-field", gpt("vocab = 100", "vocab_size = 100"),
         "unknown field 'vocab_size' in model 'm'", 2, 3, "did you mean 'vocab'?"),
    case("block-with-argument", gpt("attention {", "attention 4 {"), "`attention` takes no argument", 6, 15,
         "write `attention { … }`"),
    case("rotary-dim-without-rope", gpt("heads = 4", "heads = 4, rotary_dim = 8"), "rotary_dim needs rotary positions",
         6, 41, "set `embed { positions = rope(theta = …) }`, or remove rotary_dim"),
    case("unknown-block", gpt("mlp {", "mpl {"), "unknown block 'mpl' in layers", 7, 5, "did you mean 'mlp'?"),
    case("unknown-field-no-match", gpt("heads = 4", "heads = 4, sparsity = true"),
         "unknown field 'sparsity' in attention", 6, 28, "expected one of: heads, kv_heads"),
    case("field-used-as-block", gpt("heads = 4", "heads { }"), "'heads' is a field here", 6, 17, "write `heads = …`"),
    case("block-used-as-field", gpt("mlp { hidden = 128 }", "mlp = 128"),
         "'mlp' is a block here", 7, 5, "write `mlp { … }`"),
    case("duplicate-field", gpt("width = 64", "width = 64\n  width = 32"),
         "'width' is set twice in model 'm'", 5, 3, "it is first set on line 4"),
    case("duplicate-block", gpt("head lm { }", "head lm { }\n  head lm { }"),
         "'head' is set twice in model 'm'", 10, 3, "it is first set on line 9"),
    case("duplicate-let", "let d = 64\nlet d = 32\n" + GPT,
         "constant 'd' is defined twice", 2, 5, "it is first defined on line 1"),
    case("duplicate-argument", gpt("head lm { }", "head lm { norm = rmsnorm(eps = 1e-6, eps = 1e-5) }"),
         "argument 'eps' given twice", 9, 46),
]

ARITHMETIC = [
    case("unknown-constant", "let d = 64\n" + gpt("width = 64", "width = 2 * dd"),
         "unknown constant 'dd'", 5, 15, "did you mean 'd'?"),
    case("unknown-constant-no-lets", gpt("width = 64", "width = 2 * d"),
         "unknown constant 'd'", 4, 15, "define it first with `let`"),
    case("bare-unknown-constant", "let d = 64\n" + gpt("width = 64", "width = dd"),
         "width must be a whole number, got the name 'dd'", 5, 11, "did you mean 'd'?"),
    case("division-by-zero", gpt("width = 64", "width = 64 // 0"), "division by zero", 4, 17),
    case("modulo-by-zero-constant", "let z = 0\n" + gpt("width = 64", "width = 64 % z"), "division by zero", 5, 16),
    case("negated-boolean", gpt("width = 64", "width = -true"), "'-' needs numbers, got a boolean", 4, 12),
    case("list-minus-list", gpt("heads = 4", "heads = [4] - [4]"),
         "'-' is not defined for lists", 6, 25, "lists support `+` (concatenate) and `* n` (repeat)"),
    case("list-plus-number", gpt("heads = 4", "heads = [4] + 4"),
         "'+' joins two lists, got a list and an integer", 6, 31),
    case("list-times-fraction", gpt("heads = 4", "heads = [4] * 2.5"),
         "a list can be repeated only a whole number of times, got 2.5", 6, 31),
    case("list-times-boolean", gpt("heads = 4", "heads = [4] * true"),
         "a list can be repeated only a whole number of times, got a boolean", 6, 31),
    case("list-times-negative", gpt("heads = 4", "heads = [4] * -2"),
         "a list cannot be repeated a negative number of times (-2)", 6, 31),
]

TYPES = [
    case("bool-for-int", gpt("width = 64", "width = true"), "width must be a whole number, got a boolean", 4, 11),
    case("string-for-int", gpt("width = 64", 'width = "64"'), "width must be a whole number, got a string", 4, 11),
    case("string-for-number", gpt("heads = 4", 'heads = 4, dropout = "0.1"'),
         "dropout must be a number, got a string", 6, 38),
    case("fraction-for-whole-number", gpt("hidden = 128", "hidden = 128.5"),
         "hidden must be a whole number, got 128.5", 7, 20),
    case("list-for-int", gpt("width = 64", "width = [64]"), "width must be a whole number, got a list", 4, 11),
    case("int-for-bool", gpt("head lm { }", "head lm { tied = 1 }"),
         "tied must be true or false, got an integer", 9, 20),
    case("string-for-choice", gpt("hidden = 128", 'hidden = 128, activation = "gelu"'),
         "activation must be one of gelu, gelu_tanh, relu, silu, swiglu, geglu, geglu_tanh; got a string", 7, 38),
    case("name-for-layer-count", gpt("layers 2", "layers n"),
         "the number of layers must be a whole number, got the name 'n'", 5, 10),
    case("bad-item-in-per-layer-list", gpt("heads = 4", "heads = [4, true]"),
         "heads must be a whole number, got a boolean", 6, 29),
]

RANGES = [
    case("dropout-above-one", gpt("heads = 4", "heads = 4, dropout = 1.5"),
         "dropout must be in [0.0, 1.0), got 1.5", 6, 38),
    case("dropout-of-one", gpt("layers 2 {", "layers 2 {\n    dropout = 1"),
         "dropout must be in [0.0, 1.0), got 1", 6, 15),
    case("negative-eps", gpt("head lm { }", "head lm { norm = rmsnorm(eps = -1e-6) }"),
         "eps must be positive, got -1e-06", 9, 34),
    case("zero-layers", gpt("layers 2", "layers 0"), "the number of layers must be at least 1, got 0", 5, 10),
    case("zero-heads", gpt("heads = 4", "heads = 0"), "heads must be at least 1, got 0", 6, 25),
    case("negative-hidden", gpt("hidden = 128", "hidden = -128"), "hidden must be at least 1, got -128", 7, 20),
    case("zero-classes", vit("classes = 10", "classes = 0"), "classes must be at least 1, got 0", 8, 29),
    case("zero-theta", gpt("layers 2 {", "embed { positions = rope(theta = 0) }\n  layers 2 {"),
         "theta must be positive, got 0", 5, 36),
]

SIZES = [
    case("width-not-divisible-by-heads", gpt("heads = 4", "heads = 5"),
         "width 64 is not divisible by heads = 5", 6, 25, "set `head_dim` explicitly"),
    case("kv-heads-not-dividing-heads", gpt("heads = 4", "heads = 4, kv_heads = 3"),
         "kv_heads = 3 does not divide heads = 4", 6, 39, "use one of 1, 2, 4"),
    case("kv-heads-above-heads", gpt("heads = 4", "heads = 4, kv_heads = 8"),
         "kv_heads = 8 does not divide heads = 4", 6, 39, "use one of 1, 2, 4"),
    case("rope-with-odd-head-dim", gpt("layers 2 {", "embed { positions = rope }\n  layers 2 {")
         .replace("heads = 4", "heads = 4, head_dim = 15"),
         "rope needs an even head_dim, layer 0 has 15", 7, 39, "rotary embeddings rotate pairs of dimensions"),
    case("rope-with-odd-derived-head-dim",  # 60 / 4 = 15: the error points at `rope`
         gpt("width = 64", "width = 60").replace("layers 2 {", "embed { positions = rope }\n  layers 2 {"),
         "rope needs an even head_dim, layer 0 has 15", 5, 23),
    case("image-not-multiple-of-patch", vit("image = 32", "image = 30"),
         "image size 30 is not a multiple of patch size 8", 3, 19),
    case("per-layer-list-too-long", gpt("heads = 4", "heads = [4, 4, 4]"),
         "'heads' lists 3 values but there are 2 layers", 6, 25, "give one value per layer"),
    case("per-layer-list-too-short", gpt("layers 2 {", "layers 2 {\n    dropout = [0.1]"),
         "'dropout' lists 1 value but there are 2 layers", 6, 15),
    case("per-layer-list-for-one-layer", gpt("layers 2", "layers 1").replace("hidden = 128", "hidden = [128, 256]"),
         "'hidden' lists 2 values but there is 1 layer", 7, 20),
]

CHOICES = [
    case("unknown-activation", gpt("hidden = 128", "hidden = 128, activation = gleu"),
         "unknown activation 'gleu'", 7, 38, "did you mean 'gelu'?"),
    case("unknown-norm", gpt("layers 2 {", "layers 2 {\n    norm = batchnorm"),
         "unknown norm 'batchnorm'", 6, 12, "expected one of: layernorm, rmsnorm"),
    case("unknown-norm-call", gpt("head lm { }", "head lm { norm = rmsnrom(eps = 1e-5) }"),
         "unknown norm 'rmsnrom'", 9, 20, "did you mean 'rmsnorm'?"),
    case("no-norm-in-layers", gpt("layers 2 {", "layers 2 {\n    norm = none"), "unknown norm 'none'", 6, 12),
    case("unknown-positions", gpt("layers 2 {", "embed { positions = alibi }\n  layers 2 {"),
         "unknown positions 'alibi'", 5, 23, "expected one of: learned, sinusoidal, rope, none"),
    case("unknown-mask", gpt("heads = 4", "heads = 4, mask = casual"),
         "unknown mask 'casual'", 6, 35, "did you mean 'causal'?"),
    case("unknown-placement", gpt("layers 2 {", "layers 2 {\n    placement = middle"),
         "unknown placement 'middle'", 6, 17, "expected one of: pre, post"),
    case("unknown-head-kind", gpt("head lm", "head classfy"),
         "unknown head 'classfy'", 9, 8, "did you mean 'classify'?"),
    case("unknown-pool", vit("classes = 10", "classes = 10, pool = max"),
         "unknown pool 'max'", 8, 40, "expected one of: first, mean"),
    case("unknown-input", vit("input = patches(image = 32, patch = 8)", "input = pixels"),
         "unknown input 'pixels'", 3, 19, "expected one of: tokens, patches"),
    case("unknown-init", gpt("width = 64", "width = 64, init = uniform(a = 1)"),
         "init must be normal(std = …), got a call to 'uniform'", 4, 22),
]

MISSING = [
    case("no-width", gpt("  width = 64\n", ""), "model 'm' needs `width = …`", 1, 1),
    case("no-vocab-for-tokens", gpt("  vocab = 100\n", ""),
         "model 'm' reads tokens but has no `vocab = …`", 1, 1, "embed { input = patches(…) }"),
    case("no-vocab-for-lm-head-on-images", vit("head classify { classes = 10 }", "head lm { }"),
         "an lm head needs `vocab = …`", 8, 8),
    case("no-classes", vit("classes = 10", ""), "head classify needs `classes = …`", 8, 3),
    case("no-context-for-default-positions", gpt("  context = 16\n", ""),
         "learned positions (the default) need `context = …`", 1, 1, "longest sequence"),
    case("no-context-for-sinusoidal",
         gpt("  context = 16\n", "").replace("layers 2 {", "embed { positions = sinusoidal }\n  layers 2 {"),
         "sinusoidal positions need `context = …`", 4, 23),
    case("no-layer-count", gpt("layers 2", "layers"), "`layers` needs a count", 5, 3, "write `layers 12 { … }`"),
    case("no-layers", gpt("  layers 2 {\n    attention { heads = 4 }\n    mlp { hidden = 128 }\n  }\n", ""),
         "model 'm' has no `layers N { … }` block", 1, 1),
    case("no-attention", gpt("    attention { heads = 4 }\n", ""),
         "`layers` needs an `attention { heads = … }` block", 5, 3),
    case("no-mlp", gpt("    mlp { hidden = 128 }\n", ""), "`layers` needs an `mlp { hidden = … }` block", 5, 3),
    case("no-heads", gpt("heads = 4", ""), "attention needs `heads = …`", 6, 5),
    case("no-head", gpt("  head lm { }\n", ""), "model 'm' has no `head … { … }` block", 1, 1, "write `head lm { … }`"),
    case("no-head-kind", gpt("head lm", "head"), "`head` needs a kind", 9, 3),
    case("patches-without-sizes", vit("patches(image = 32, patch = 8)", "patches"), "patches need their sizes", 3, 19),
    case("patches-without-patch", vit("patches(image = 32, patch = 8)", "patches(image = 32)"),
         "patches() needs `patch = …`", 3, 19),
]

ARGUMENTS = [
    case("unknown-argument", gpt("layers 2 {", "layers 2 {\n    norm = rmsnorm(epsilon = 1e-6)"),
         "unknown argument 'epsilon' for rmsnorm()", 6, 30, "did you mean 'eps'?"),
    case("layernorm-only-argument", gpt("layers 2 {", "layers 2 {\n    norm = rmsnorm(bias = false)"),
         "unknown argument 'bias' for rmsnorm()", 6, 27, "expected one of: eps"),
    case("too-many-arguments", gpt("layers 2 {", "layers 2 {\n    norm = rmsnorm(1e-6, 2)"),
         "rmsnorm() takes at most 1 argument", 6, 26),
    case("positional-head-argument", vit("head classify { classes = 10 }", "head classify(10) { }"),
         "head arguments are named", 8, 17, "write classify(classes = 10)"),
    case("unknown-head-argument", vit("head classify { classes = 10 }", "head classify(classes = 10, pol = mean) { }"),
         "unknown argument 'pol' for head classify", 8, 37, "did you mean 'pool'?"),
    case("embed-with-argument", gpt("layers 2 {", "embed 1 { }\n  layers 2 {"), "`embed` takes no argument", 5, 9),
]

IMAGES = [
    case("tied-head-on-image-input", vit("width = 64", "vocab = 100\n  width = 64")
         .replace("head classify { classes = 10 }", "head lm { tied = true }"),
         "a tied lm head needs token input", 9, 20, "set tied = false"),
    case("pool-first-without-class-token", vit("patch = 8", "patch = 8, cls = false"),
         "pool = first needs a class token", 8, 8, "set patches(…, cls = true) or pool = mean"),
    case("explicit-pool-first-without-class-token",
         vit("patch = 8", "patch = 8, cls = false").replace("classes = 10", "classes = 10, pool = first"),
         "pool = first needs a class token", 8, 40),
    case("zero-patch", vit("patch = 8", "patch = 0"), "patch must be at least 1, got 0", 3, 47),
]


def deep(opener: str, closer: str, depth: int, inner: str = "4") -> str:
    return opener * depth + inner + closer * depth


LIMITS = [  # values that cannot be written back, or whose size or nesting has no bound otherwise
    case("float-overflow", gpt("head lm { }", "head lm { norm = rmsnorm(eps = 1e308 * 10) }"),
         "`1e308 * 10` is not a finite number (it is inf)", 9, 34, "numbers go up to about 1.8e308"),
    case("nan-from-overflow", gpt("head lm { }", "head lm { norm = rmsnorm(eps = 1e308 * 10 - 1e308 * 10) }"),
         "`1e308 * 10` is not a finite number", 9, 34),
    case("float-division-overflow", gpt("heads = 4", "heads = 4, dropout = 1e300 / 1e-300"),
         "`1e300 / 1e-300` is not a finite number (it is inf)", 6, 38),
    case("float-overflow-in-let", "let big = 1e200\nlet huge = big * big\n" + GPT,
         "`big * big` is not a finite number", 2, 12),
    case("huge-integer-literal", gpt("width = 64", "width = " + "9" * 5000),
         "number '99999999…9999 (5000 characters)' is too large", 4, 11, "whole numbers go up to 9223372036854775807"),
    case("integer-above-int64", gpt("width = 64", "width = 9223372036854775808"), "is too large", 4, 11),
    case("integer-overflow", gpt("width = 64", "width = 10000000000 * 10000000000"),
         "`10000000000 * 10000000000` is too large for a whole number", 4, 11, "2^63 - 1"),
    case("integer-overflow-by-lets", "let a = 4294967296\nlet b = a * a\n" + gpt("width = 64", "width = b"),
         "`a * a` is too large for a whole number", 2, 9),
    case("whole-float-above-int64", gpt("width = 64", "width = 1e300"),
         "width must be at most 9223372036854775807", 4, 11),
    case("no-power-operator", gpt("width = 64", "width = 10**10**10"), "unexpected '*'", 4, 14),
    case("list-repeat-too-long", gpt("heads = 4", "heads = [4] * 1000000000"),
         "a list holds at most 1024 values, this one would hold 1000000000", 6, 25,
         "a per-layer list has exactly one value per layer"),
    case("list-repeat-of-huge-count", gpt("heads = 4", "heads = [4] * 1e300"),
         "a list holds at most 1024 values", 6, 25),
    case("list-join-too-long", "let a = [4] * 1000\n" + gpt("heads = 4", "heads = a + a"),
         "a list holds at most 1024 values, this one would hold 2000", 7, 25),
    case("too-many-layers", gpt("layers 2", "layers 1000000000"),
         "a model has at most 1024 layers, got 1000000000", 5, 10, "exactly one value per layer"),
    case("layers-just-over-the-limit", gpt("layers 2", "layers 1025"), "at most 1024 layers, got 1025", 5, 10),
    case("deep-lists", gpt("heads = 4", "heads = " + deep("[", "]", 5000)),
         "nesting is deeper than 100 levels", 6, 122, "`let` constants"),  # model, layers, attention, 97 lists
    case("let-just-over-the-limit", "let x = " + deep("[", "]", 101) + "\n" + GPT, "nesting is deeper", 1, 109),
    case("deep-blocks", gpt("  head lm { }", "  head lm { }\n  " + deep("a { ", "} ", 5000, "")),
         "nesting is deeper than 100 levels", 10, 3 + 4 * 99),
    case("deep-calls", gpt("heads = 4", "heads = " + deep("f(", ")", 150)), "nesting is deeper than 100", 6, 219),
    case("deep-negation", gpt("width = 64", "width = " + "-" * 5000 + "64"), "nesting is deeper than 100", 4, 110),
    case("long-sum", gpt("width = 64", "width = " + "1 + " * 300 + "1"), "nesting is deeper than 100", 4, 11),
    case("unclosed-deep-list", gpt("heads = 4", "heads = " + "[" * 5000), "unexpected '}'", 6, 5026),
    case("superscript-digit", gpt("width = 64", "width = \u00b9"), "unexpected character '\u00b9'", 4, 11),
    case("kv-heads-of-a-huge-head-count", gpt("heads = 4", "heads = 1000000000000, head_dim = 16, kv_heads = 7"),
         "kv_heads = 7 does not divide heads = 1000000000000", 6, 66, "use a divisor of 1000000000000"),
    case("keyword-token-type", gpt("vocab = 100", "vocab = 100\n  embed { types { class = 50, text = 50 } }"),
         "'class' cannot name a token type", 3, 19, "choose another name"),
    case("module-attribute-token-type", gpt("vocab = 100", "vocab = 100\n  embed { types { text = 50, float = 50 } }"),
         "'float' cannot name a token type", 3, 30),
]


@pytest.mark.parametrize(
    ("text", "message", "line", "col", "hint"),
    SYNTAX + NAMES + ARITHMETIC + TYPES + RANGES + SIZES + CHOICES + MISSING + ARGUMENTS + IMAGES + LIMITS,
)
def test_bad_spec(text: str, message: str, line: int, col: int, hint: str | None):
    with pytest.raises(SpecError) as info:
        parse(text, "bad.mpt")
    e = info.value
    assert message in e.message
    assert (e.line, e.col) == (line, col), e.render()
    if hint is not None:
        assert e.hint is not None and hint in e.hint, e.render()
    assert e.span is not None and e.span.file == "bad.mpt"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(GPT, id="gpt-base"),
        pytest.param(VIT, id="vit-base"),
        pytest.param(gpt("heads = 4", "heads = [4] * (4 / 2)"), id="list-times-whole-float"),
        pytest.param(gpt("width = 64", "width = 128 / 2"), id="whole-float-width"),
        pytest.param(gpt("hidden = 128", "hidden = 1_28e0"), id="exponent-float"),
        pytest.param(gpt("width = 64", "width =\n    64"), id="value-on-next-line"),
        pytest.param(gpt("width = 64", "width = " + deep("(", ")", 5000, "64")), id="deep-parentheses"),
        pytest.param("let x = " + deep("[", "]", 100) + "\n" + GPT, id="lists-at-the-limit"),
        pytest.param(gpt("layers 2", "layers 1024").replace("heads = 4", "heads = [4] * 1024"), id="most-layers"),
        pytest.param(gpt("width = 64", "width = 9223372036854775807 // 4611686018427387904 * 32"), id="int64-max"),
        pytest.param(gpt("head lm { }", "head lm { norm = rmsnorm(eps = 1e308 * 1e-320) }"), id="finite-product"),
    ],
)
def test_good_spec(text: str):
    """The bases are valid, so each bad spec fails for its one edit; and a few near misses are fine."""
    parse(text, "good.mpt")


def _error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text, "bad.mpt")
    return info.value


def test_render_places_the_caret_under_the_error():
    lines = _error(gpt("heads = 4", "haeds = 4")).render().splitlines()
    assert lines == [
        "bad.mpt:6:17: error: unknown field 'haeds' in attention",
        "      attention { haeds = 4 }",
        "                  ^~~~~",
        "  hint: did you mean 'heads'?",
    ]


def test_render_caret_spans_the_whole_value():
    out = _error(gpt("heads = 4", "heads = [4, 4, 4]")).render().splitlines()
    assert out[1] == "      attention { heads = [4, 4, 4] }"
    assert out[2] == "                          ^~~~~~~~~"  # under `[4, 4, 4]`, 9 wide
    assert out[3] == "  hint: give one value per layer, or a single value for all of them"


def test_render_missing_field_points_at_the_model_header():
    out = _error(gpt("  width = 64\n", "")).render().splitlines()
    assert out == ["bad.mpt:1:1: error: model 'm' needs `width = …`", "  model m {", "  ^~~~~~~"]


def test_render_caret_after_tabs():
    out = _error(gpt("  width = 64", "\twidth = 6$4")).render().splitlines()
    assert out[1] == "  \twidth = 6$4"
    assert out[2] == "  \t         ^"  # the tab is kept, so the caret lines up in a terminal


def test_render_at_end_of_file():
    out = _error(GPT.removesuffix("}\n")).render().splitlines()
    assert out[0].startswith("bad.mpt:9:14: error: unexpected end of file")
    assert out[2] == "  " + " " * 13 + "^"
    assert out[3] == "  hint: the '{' on line 1 is never closed"


def test_render_without_hint_has_no_hint_line():
    out = _error(gpt("width = 64", "width = 64 // 0")).render()
    assert out == "bad.mpt:4:17: error: division by zero\n    width = 64 // 0\n                  ^"


def test_cli_check_reports_located_error(tmp_path, capsys):
    path = tmp_path / "bad.mpt"
    path.write_text(gpt("heads = 4", "heads = 4, kv_heads = 3"))
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}:6:39: error: kv_heads = 3 does not divide heads = 4\n")
    assert "    attention { heads = 4, kv_heads = 3 }\n" in err
    assert "hint: each kv head serves a whole group of query heads; use one of 1, 2, 4" in err
    assert "Traceback" not in err


def test_cli_check_reports_syntax_error(tmp_path, capsys):
    path = tmp_path / "bad.mpt"
    path.write_text(gpt("head lm { }", "head lm { norm = layernorm(eps = 1e-5, true) }"))
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:9:42: error: positional argument after a keyword argument\n")
    assert "Traceback" not in err and "VisitError" not in err


def test_cli_check_ok_after_fix(tmp_path, capsys):
    path = tmp_path / "good.mpt"
    path.write_text(GPT)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: m: 2 layers, width 64") and err == ""
