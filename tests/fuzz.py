"""Mutation fuzzing of the spec front end: `mptc check`, `mptc summary --json` and a meta-device build.

Mutants of the shipped specs (examples/*.mpt, tests/specs/*.mpt) are made by deleting,
duplicating and swapping tokens, inserting random characters, putting in huge, negative or
non-finite numbers, nesting thousands deep and writing very long lines. Each mutant must
either pass (and then print back to a spec equal to itself) or be refused with an `MptcError`
rendered as `file:line:col: error: …`. Nothing else may be raised, no mutant may run past its
time limit, and none may raise the process's peak memory by more than MEMORY_LIMIT.

    python -m tests.fuzz --examples 2000      # the long form: prints the counts, exits 1 on a failure
    python -m tests.fuzz --seed 7             # other mutants than the CI test draws
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import mptc
from mptc import cli

ROOT = Path(__file__).resolve().parent.parent
SEEDS = sorted((ROOT / "examples").glob("*.mpt")) + sorted((Path(__file__).parent / "specs").glob("*.mpt"))
TEXTS = [p.read_text() for p in SEEDS]

TIME_LIMIT = 5.0  # seconds per mutant, plus PER_LAYER for each layer of a spec that passes
PER_LAYER = 0.01
HARD_LIMIT = 60.0  # a mutant still running after this is stopped
MEMORY_LIMIT = 200 * 2**20  # bytes of peak-RSS growth per mutant
ADDRESS_SLACK = 4 * 2**30  # the address space a mutant may add before allocation fails (a guard, not the check)
RENDERED = re.compile(r"^(\S+:\d+:\d+: )?error: ")
# The front end's last-resort conversions of unexpected exceptions: a mutant that reaches one found a cause not fixed.
CONVERTED = re.compile(r"error: (cannot read this|cannot parse this text|cannot build model)")
MAX_TEXT = 1_000_000  # characters of a mutant
FAILURES = ("traceback", "format", "roundtrip", "hang", "memory")

TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|[0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?'
                   r"|//|\s+|.", re.S)
NUMBER = re.compile(r"[0-9.]")
HUGE = ("0", "-1", "-0", "-64", "0.0", "1e308", "1e308 * 10", "-1e308 * 10", "(1e308 * 10 - 1e308 * 10)", "1e-320",
        "9" * 25, "9" * 5000, "9223372036854775807", "9223372036854775808", "-9223372036854775809",
        "1000000000", "1000000000000", "1000000000 * 1000000000 * 1000000000", "[1] * 1000000000",
        "[1] * 1000000000 * 1000000000", "[[1] * 1000] * 1000", "10**10**10", "2.5", "1/3", "true", '"x"', "none",
        "4096", "1025", "100000")
OPENERS = {"(": ")", "[": "]", "{": "}", "f(": ")", "-": "", "+": "", "1 + ": "", "a { ": "}", "[1, ": "]"}
DEPTHS = (2, 10, 63, 64, 65, 99, 100, 101, 200, 1000, 5000)
PUNCT = "{}[]()=,.\"'#\\\n\t -+*/%_0123456789eExa"


# --- mutations ---------------------------------------------------------------------------------------


def _ops() -> st.SearchStrategy:
    i = st.integers(0, 10**6)
    chars = st.text(st.sampled_from(PUNCT), min_size=1, max_size=8) | st.text(
        st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
    return st.one_of(
        st.tuples(st.just("delete"), i, st.integers(1, 4)),
        st.tuples(st.just("duplicate"), i, st.integers(1, 4)),
        st.tuples(st.just("swap"), i, i),
        st.tuples(st.just("chars"), i, chars),
        st.tuples(st.just("number"), i, st.sampled_from(HUGE)),
        st.tuples(st.just("nest"), i, st.sampled_from(sorted(OPENERS)), st.sampled_from(DEPTHS), st.booleans()),
        st.tuples(st.just("long"), i, st.sampled_from((100, 1000, 20000)), st.sampled_from((" ", ", ", "\n", ""))),
    )


def mutants() -> st.SearchStrategy:
    """(seed index, mutation ops): a shipped spec and one to four mutations of it."""
    return st.tuples(st.integers(0, len(TEXTS) - 1), st.lists(_ops(), min_size=1, max_size=4))


def mutate(text: str, ops: list[tuple]) -> str:
    """Apply the ops to the tokens of `text`; an op that would make the text longer than MAX_TEXT is left out."""
    toks = TOKEN.findall(text)
    for op in ops:
        kept = list(toks)
        _apply(toks, op)
        if sum(map(len, toks)) > MAX_TEXT:
            toks = kept
    return "".join(toks)


def _apply(toks: list[str], op: tuple) -> None:
    kind, i = op[0], op[1] % max(1, len(toks))
    tok = toks[i] if toks else "1"
    if kind == "delete":
        del toks[i : i + op[2]]
    elif kind == "duplicate":
        toks[i:i] = toks[i : i + op[2]]
    elif kind == "swap" and toks:
        j = op[2] % len(toks)
        toks[i], toks[j] = toks[j], toks[i]
    elif kind == "chars":
        toks.insert(i, op[2])
    elif kind == "number":
        nums = [k for k, t in enumerate(toks) if NUMBER.match(t)] or [i]
        k = nums[op[1] % len(nums)]
        toks[k : k + 1] = [op[2]]
    elif kind == "nest":
        opener, depth, closed = op[2], op[3], op[4]
        toks[i : i + 1] = [opener * depth + tok + (OPENERS[opener] * depth if closed else "")]
    elif kind == "long":
        toks[i : i + 1] = [op[3].join([tok] * op[2])]


# --- running one mutant ----------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # passed | refused | traceback | format | roundtrip | hang | memory
    seconds: float
    detail: str = ""
    layers: int = 0
    seed: int = 0

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES


class _Hang(BaseException):
    """Raised by the alarm; a BaseException, so no `except Exception` swallows it."""


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def _limits(seconds: float):
    """Stop the block after `seconds` (SIGALRM) and make allocations past ADDRESS_SLACK fail."""

    def alarm(signum, frame):
        raise _Hang

    old = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + ADDRESS_SLACK
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (min(cap, hard) if hard != resource.RLIM_INFINITY else cap, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _stages(path: Path, result: Outcome) -> None:
    """check; for a spec that passes: summary --json, a meta-device build and the printer round trip."""
    rc, _, err = _cli(["check", str(path)])
    if rc != 0:
        first = err.splitlines()[0] if err else ""
        result.kind, result.detail = ("refused", first) if RENDERED.match(first) else ("format", err[:2000])
        if CONVERTED.search(first):
            result.kind = "traceback"
        return
    spec = mptc.load(path)
    result.layers = spec.n_layers
    rc, out, err = _cli(["summary", "--json", str(path)])
    if rc != 0:  # `check` builds nothing (no torch): a lowering error shows here first
        first = err.splitlines()[0] if err else ""
        result.kind, result.detail = "format", f"check passed but summary --json failed: {err[:2000]}"
        if CONVERTED.search(first):
            result.kind = "traceback"
        return
    if json.loads(out)["params"] < 0:
        result.kind, result.detail = "format", "negative parameter count"
        return
    mptc.build(spec, device="meta")
    again = mptc.parse(str(spec))
    if again != spec:
        result.kind, result.detail = "roundtrip", str(spec)[:2000]
        return
    result.kind = "passed"


def run_mutant(text: str, path: Path) -> Outcome:
    """Run one spec text through the front end (written to `path`) and classify what happened."""
    path.write_text(text, encoding="utf-8")
    result = Outcome("traceback", 0.0)
    before = _maxrss()
    start = time.perf_counter()
    try:
        with _limits(HARD_LIMIT):
            _stages(path, result)
    except _Hang:
        result.kind, result.detail = "hang", f"stopped after {HARD_LIMIT:.0f} s"
    except MemoryError:
        result.kind, result.detail = "memory", traceback.format_exc()[-2000:]
    except Exception:  # anything but MptcError (which the CLI renders) is a defect
        result.kind, result.detail = "traceback", traceback.format_exc()[-4000:]
    result.seconds = time.perf_counter() - start
    grown = _maxrss() - before
    if not result.failed and result.seconds > TIME_LIMIT + PER_LAYER * result.layers:
        result.kind, result.detail = "hang", f"{result.seconds:.1f} s"
    if not result.failed and grown > MEMORY_LIMIT:
        result.kind, result.detail = "memory", f"peak RSS grew by {grown / 2**20:.0f} MiB"
    return result


# --- the long form ---------------------------------------------------------------------------------


def _shorten(text: str, seed: str = "", keep: int = 300) -> str:
    """The text from just before where it leaves `seed`, long runs of one token collapsed, quoted."""
    same = next((k for k, (a, b) in enumerate(zip(text, seed, strict=False)) if a != b), min(len(text), len(seed)))
    text = text[max(0, same - 80) :]
    text = re.sub(r"(.{1,8}?)\1{9,}", lambda m: f"{m.group(1)}…×{len(m.group()) // len(m.group(1))}", text, flags=re.S)
    return repr(text[:keep] + ("…" if len(text) > keep else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="number of mutants (default 2000)")
    ap.add_argument("--show", type=int, default=3, help="failures to print in full (default 3)")
    ap.add_argument("--seed", type=int, help="draw other mutants, from this seed (default: the CI test's)")
    args = ap.parse_args(argv)
    outcomes: list[tuple[str, Outcome]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.mpt"

        @settings(max_examples=args.examples, deadline=None, derandomize=args.seed is None, database=None,
                  suppress_health_check=list(HealthCheck))
        @seed(args.seed or 0)
        @given(mutants())
        def one(m):
            text = mutate(TEXTS[m[0]], m[1])
            o = run_mutant(text, path)
            outcomes.append((text if o.failed else "", o))
            o.seed = m[0]

        one()
    counts = Counter(o.kind for _, o in outcomes)
    slowest = max((o.seconds for _, o in outcomes), default=0.0)
    print(f"mutants {len(outcomes)}  passed check {counts['passed']}  refused with MptcError {counts['refused']}  "
          + "  ".join(f"{k} {counts[k]}" for k in FAILURES) + f"  max time {slowest:.2f} s")
    failed = [(t, o) for t, o in outcomes if o.failed]
    for text, o in failed[: args.show]:
        print(f"\n--- {o.kind} ({o.seconds:.2f} s): {_shorten(text, TEXTS[o.seed])}\n{o.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
