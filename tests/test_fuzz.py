"""Fuzzing the spec front end with mutants of the shipped specs (see tests/fuzz.py).

The CI form runs FUZZ_EXAMPLES mutants (about 20 s); `MPTC_FUZZ_EXAMPLES=2000` runs the long form.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings

import mptc
from mptc import summary

from . import fuzz
from .test_errors import GPT

FUZZ_EXAMPLES = int(os.environ.get("MPTC_FUZZ_EXAMPLES", "800"))


@pytest.fixture(scope="module")
def mutant_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "mutant.mpt"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(fuzz.mutants())
def test_mutants_pass_or_are_refused_with_a_located_error(mutant_path, mutant):
    text = fuzz.mutate(fuzz.TEXTS[mutant[0]], mutant[1])
    out = fuzz.run_mutant(text, mutant_path)
    assert not out.failed, f"{out.kind} after {out.seconds:.2f} s: {fuzz._shorten(text, fuzz.TEXTS[mutant[0]])}\n" \
                           f"{out.detail}"


@pytest.mark.parametrize("index", range(len(fuzz.TEXTS)), ids=[p.stem for p in fuzz.SEEDS])
def test_shipped_specs_pass(mutant_path, index):
    out = fuzz.run_mutant(fuzz.TEXTS[index], mutant_path)
    assert out.kind == "passed", out.detail


def test_mutations_change_the_text():
    text = fuzz.TEXTS[0]
    assert fuzz.mutate(text, [("delete", 5, 1)]) != text
    assert fuzz.mutate(text, [("nest", 40, "[", 5000, True)]).count("[" * 5000) == 1
    assert len(fuzz.mutate(text, [("long", 3, 20000, ", ")] * 4)) <= fuzz.MAX_TEXT


def test_a_traceback_is_reported(mutant_path, monkeypatch):
    def broken(spec):
        raise ValueError("not a user error")

    monkeypatch.setattr(summary, "summarize", broken)
    out = fuzz.run_mutant(GPT, mutant_path)
    assert out.kind == "traceback" and "ValueError: not a user error" in out.detail


def test_a_hang_is_reported(mutant_path, monkeypatch):
    monkeypatch.setattr(summary, "summarize", lambda spec: time.sleep(5))
    monkeypatch.setattr(fuzz, "HARD_LIMIT", 0.5)
    out = fuzz.run_mutant(GPT, mutant_path)
    assert out.kind == "hang" and out.seconds < 2


def test_an_unrendered_error_is_reported(mutant_path, monkeypatch):
    def bare(spec):
        raise mptc.MptcError("cannot build model 'm': something unexpected")

    monkeypatch.setattr(summary, "summarize", bare)
    assert fuzz.run_mutant(GPT, mutant_path).kind == "traceback"  # a last-resort conversion is a cause to fix


@pytest.mark.parametrize(("old", "new", "params"), [
    ("width = 64", "width = 1000000000", None),
    ("vocab = 100", "vocab = 1000000000000", 10**12 * 64 + 16 * 64),  # token table and 16 learned positions
    ("context = 16", "context = 1000000000000", 100 * 64 + 10**12 * 64),
])
def test_absurd_sizes_check_fast_without_allocating(mutant_path, old, new, params):
    text = GPT.replace(old, new)
    out = fuzz.run_mutant(text, mutant_path)
    assert out.kind == "passed", out.detail  # and so within the time and memory limits
    assert out.seconds < 5
    s = summary.summarize(mptc.parse(text))
    if params is not None:
        assert s.embed.params == params
    assert s.params > 10**10


def test_a_tensor_too_large_for_torch_is_a_located_error(mutant_path):
    text = GPT.replace("vocab = 100", "vocab = 1000000000000").replace("width = 64", "width = 10000000000")
    with pytest.raises(mptc.SpecError) as info:
        summary.summarize(mptc.parse(text, "big.mpt"))
    e = info.value
    assert (e.line, e.col) == (2, 11) and "would have 1e+22 elements" in e.message, e.render()
    assert "more than a tensor can hold (2^60)" in e.message
    assert fuzz.run_mutant(text, mutant_path).kind == "refused"
