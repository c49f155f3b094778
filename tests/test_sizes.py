"""Sizes too big to allocate are refused up front, saying how big the result would be."""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path

import pytest
import torch
from torch import fx

import mptc
import mptc.memory as M
from mptc import passes as P
from mptc.cli import main
from mptc.errors import MptcError, SpecError
from mptc.lower import lower
from mptc.model import init_weights
from mptc.passes.parse import parse_passes

GPT2 = "tests/specs/tiny-gpt2.mpt"
LLAMA = "tests/specs/tiny-llama.mpt"
BERT = "tests/specs/tiny-bert.mpt"
VIT = "tests/specs/tiny-vit.mpt"

# tiny-gpt2: D 64, V 1000, P 64 (learned), 2 layers of 4 heads × 16, F 256, biases, LayerNorm, tied head
G_LAYER = 4 * 64 * 65 + (2 * 64 * 256 + 256 + 64) + 2 * 2 * 64  # attention, MLP, two norms: 49984
G_TOTAL = 1000 * 64 + 64 * 64 + 2 * G_LAYER + 2 * 64  # 168192
# tiny-llama: D 64, V 1000, 3 layers of 8 heads / 2 kv heads × 12, F 96 SwiGLU, no biases, RMSNorm, untied head
L_PER_D = 3 * (96 + 24 + 24 + 96 + 3 * 96 + 2) + 1000 + 1 + 1000  # every tensor is D wide: 3591
L_TOTAL = L_PER_D * 64  # 229824


@pytest.fixture
def no_big_alloc():
    """A cap on the address space 2 GiB above what the process maps now: any attempt to allocate a
    large model fails loudly (MemoryError or an allocator error) instead of being counted."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc/self/status")
    vm = int(re.search(r"VmSize:\s+(\d+) kB", status.read_text()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + 2 * 2**30
    if hard != resource.RLIM_INFINITY and hard < cap:
        pytest.skip("the address-space limit is already lower")
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _number(text: str) -> float:
    """'6.6e304' → 6.6e304; '2.58T' → 2.58e12; '233 TiB' → bytes."""
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
             "PiB": 2**50, "EiB": 2**60, "bytes": 1}
    m = re.fullmatch(r"([\d.]+(?:e\d+)?) ?([A-Za-z]+)?", text)
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


SIZE = re.compile(r"would (?:make a model of|have) (\S+) parameters \((.+?) in (\w+)\); this machine has (.+?) of "
                  r"memory available")


def _sizes_in(err: str) -> tuple[float, float, str, float]:
    """(parameters, bytes, dtype, available bytes) from a refusal."""
    m = SIZE.search(err)
    assert m, err
    return _number(m.group(1)), _number(m.group(2)), m.group(3), _number(m.group(4))


def test_formatting_of_any_size():
    assert M.sci(3141) == "3.1e3" and M.sci(9960) == "1.0e4" and M.sci(3 * 10**305 + 10**304) == "3.1e305"
    assert M.params_text(168192) == "168.19K" and M.params_text(2 * 10**15) == "2.0e15"
    assert M.bytes_text(24 * 2**30) == "24 GiB" and M.bytes_text(3 * 2**39) == "1.5 TiB"
    assert M.bytes_text(int(37.54 * 2**40)) == "37.5 TiB" and M.bytes_text(1023 * 2**20) == "1023 MiB"
    assert M.bytes_text(12 * 10**305) == "1.2e306 bytes" and M.bytes_text(100) == "100 bytes"


def test_available_memory_reads_meminfo():
    have = M.available()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kb = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo.read_text()).group(1))
        assert abs(have - kb * 1024) < 2**30  # read a moment apart
    assert 0 < have <= M.os.sysconf("SC_PHYS_PAGES") * M.os.sysconf("SC_PAGE_SIZE")


def test_available_memory_of_a_gpu_is_its_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    assert M.available("cuda:0") == 3 * 2**30
    with pytest.raises(MptcError, match=r"x would make 1\.07G parameters \(4 GiB in float32\); cuda:0 has 3 GiB of "
                       r"memory available"):
        M.check_fits("x would make", 2**30, torch.float32, "cuda:0")
    M.check_fits("x would make", 2**30, torch.bfloat16, "cuda:0")  # 2 GiB: fits


# --- absurd pass arguments ---------------------------------------------------------------------

F_1E300 = round(256 * 1e300)  # grow_mlp(factor = 1e300): each layer's hidden size
ABSURD = [
    (GPT2, "grow_mlp(factor = 1e300)", G_TOTAL + 2 * (F_1E300 - 256) * 129),
    (GPT2, "grow_mlp(hidden = 10000000000)", G_TOTAL + 2 * (10**10 - 256) * 129),
    (GPT2, "add_layers(n = 1000000000)", G_TOTAL + 10**9 * G_LAYER),
    (GPT2, "add_heads(n = 100000000)", G_TOTAL + 2 * 10**8 * 16 * (3 * 65 + 64)),  # q, k, v rows and bias, o columns
    (GPT2, "grow_head_dim(value = 10000000000)", G_TOTAL + 2 * 4 * (10**10 - 16) * (65 + 64)),
    (LLAMA, "grow_qk(dim = 10000000000)", L_TOTAL + 3 * (10**10 - 12) * 64 * (8 + 2)),
    (LLAMA, "grow_width(width = 10000000000)", L_PER_D * 10**10),
    (GPT2, "grow_vocab(vocab = 1000000000000)", G_TOTAL + (10**12 - 1000) * 64),
    (GPT2, "grow_context(context = 1000000000000)", G_TOTAL + (10**12 - 64) * 64),
]


@pytest.mark.parametrize(("spec", "call", "params"), ABSURD, ids=[c for _, c, _ in ABSURD])
def test_absurd_pass_argument_is_refused_with_the_size(spec, call, params, tmp_path, capsys, no_big_alloc):
    out = tmp_path / "grown"
    t0 = time.perf_counter()
    assert main(["grow", spec, "-p", call, "-o", str(out)]) == 1
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert err.startswith(f"error: {call.split('(')[0]}(") and "Traceback" not in err
    n, nbytes, dtype, have = _sizes_in(err)
    assert n == pytest.approx(float(params), rel=0.05) and nbytes == pytest.approx(4.0 * params, rel=0.05)
    assert dtype == "float32" and have == pytest.approx(M.available(), rel=0.1)
    assert not out.exists() and elapsed < 2.0


def test_add_kv_heads_beyond_the_heads_is_refused_up_front(tmp_path, capsys, no_big_alloc):
    """add_kv_heads can never pass the query heads: a huge n is refused for that, at once."""
    out = tmp_path / "grown"
    t0 = time.perf_counter()
    assert main(["grow", LLAMA, "-p", "add_kv_heads(n = 100000000)", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "add_kv_heads: layer 0 cannot go from 2 to 100000002 kv heads" in err
    assert "reachable kv head counts: 4, 8" in err
    assert not out.exists() and time.perf_counter() - t0 < 2.0


def test_factor_beyond_float_range_after_multiplying(no_big_alloc):
    """256 × 1e308 overflows a float; the size is still counted exactly and refused."""
    with pytest.raises(P.PassError, match=r"grow_mlp\(factor = 1e308\) would make a model of 6\.6e312 parameters"):
        P.grow_mlp(factor=1e308).apply(mptc.build(mptc.load(GPT2)))


def test_a_growth_that_fits_passes_and_one_byte_less_is_refused(tmp_path, capsys, monkeypatch):
    grown = G_TOTAL + 2 * (512 - 256) * 129  # grow_mlp(hidden = 512): 234240 parameters
    monkeypatch.setattr(M, "available", lambda device="cpu": 4 * grown)
    out = tmp_path / "ok"
    assert main(["grow", GPT2, "-p", "grow_mlp(hidden = 512)", "-o", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["passes"][0]["params_after"] == grown
    capsys.readouterr()
    monkeypatch.setattr(M, "available", lambda device="cpu": 4 * grown - 1)
    out = tmp_path / "refused"
    assert main(["grow", GPT2, "-p", "grow_mlp(hidden = 512)", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "grow_mlp(hidden = 512) would make a model of 234.24K parameters (915 KiB in float32); this machine has " \
           "915 KiB of memory available" in err
    assert not out.exists()


COUNTED = [
    (GPT2, P.grow_mlp(factor=1.5, layers=[0])), (GPT2, P.grow_mlp(hidden=300)), (GPT2, P.add_layers(n=2, at=1)),
    (GPT2, P.add_heads(n=2)), (GPT2, P.grow_head_dim(value=20)), (GPT2, P.grow_vocab(vocab=1030)),
    (GPT2, P.grow_context(context=80)), (LLAMA, P.add_heads(n=2)), (LLAMA, P.add_heads(n=4, mode="kv")),
    (LLAMA, P.add_kv_heads(n=2)), (LLAMA, P.grow_qk(dim=14, layers=[1])), (LLAMA, P.grow_width(width=72)),
    (LLAMA, P.add_layers(n=1)), (BERT, P.grow_mlp(factor=2.0)), (BERT, P.add_heads(n=2)),
    (BERT, P.grow_vocab(vocab=1100)), (VIT, P.add_layers(n=2, at=0)), (VIT, P.grow_head_dim(value=24)),
]


@pytest.mark.parametrize(("spec", "p"), COUNTED, ids=[f"{Path(s).stem}-{p}" for s, p in COUNTED])
def test_counted_size_is_the_size_of_the_result(spec, p):
    """The count the refusal uses (sizes alone, nothing built) is the grown model's parameter count."""
    model = mptc.build(mptc.load(spec))
    new, _ = p.apply(model)
    assert p.new_params(model) == sum(t.numel() for t in new.parameters())


# --- argument validation, located in the pass text -----------------------------------------------

BAD_ARGS = [
    ("grow_mlp(factor = 0.5)", 19, "factor must be a finite number greater than 1", "got 0.5"),
    ("grow_mlp(factor = 1)", 19, "factor must be a finite number greater than 1", "got 1"),
    ("grow_mlp(factor = -2)", 19, "factor must be a finite number greater than 1", "got -2"),
    ("grow_mlp(factor = 1e308 * 10)", 19, "`1e308 * 10` is not a finite number", "it is inf"),
    ("grow_mlp(hidden = 100000000000000000000)", 19, "number '100000000000000000000' is too large", ""),
    ("grow_mlp(hidden = 1e30)", 19, "hidden = 1.0e30 is beyond the largest size", "2^63 - 1"),
    ("grow_width(width = -64)", 20, "width must be a positive size", "got -64"),
    ("grow_vocab(vocab = 0)", 20, "vocab must be a positive size", "got 0"),
    ("add_layers(n = -3)", 16, "n must be at least 1", "got -3"),
    ("add_heads(n = 0)", 15, "n must be at least 1", "got 0"),
    ("add_layers(n = 1, at = -1)", 24, "at must be 0 or more", "got -1"),
    ("grow_mlp(hidden = 512, layers = [0, 100000000000000000000])", 37, "number '100000000000000000000' is too large",
     ""),
    ("grow_mlp(hidden = 512, init = normal(std = 1e308 * 10))", 44, "`1e308 * 10` is not a finite number",
     "it is inf"),
]


@pytest.mark.parametrize(("text", "col", "message", "detail"), BAD_ARGS, ids=[t for t, *_ in BAD_ARGS])
def test_bad_argument_is_refused_by_name_at_its_position(text, col, message, detail):
    with pytest.raises(SpecError) as e:
        parse_passes(text, "-p 1")
    assert message in e.value.message and detail in e.value.message
    assert (e.value.line, e.value.col) == (1, col)
    if "too large" in message:
        assert "2^63 - 1" in e.value.hint


def test_bad_argument_through_the_command_line(tmp_path, capsys):
    out = tmp_path / "grown"
    assert main(["grow", GPT2, "-p", "add_layers(n = -3)", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("-p 1:1:16: error: n must be at least 1") and "^~" in err and not out.exists()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: P.grow_mlp(factor=float("inf")), r"grow_mlp: factor must be a finite number greater than 1, got inf"),
    (lambda: P.grow_mlp(factor=float("nan")), r"grow_mlp: factor must be a finite number greater than 1, got nan"),
    (lambda: P.grow_mlp(factor=0.9), r"grow_mlp: factor must be a finite number greater than 1, got 0\.9"),
    (lambda: P.add_layers(n=-1), r"add_layers: n must be at least 1, got -1"),
    (lambda: P.add_heads(n=0), r"add_heads: n must be at least 1, got 0"),
    (lambda: P.grow_vocab(vocab=2**63), r"grow_vocab: vocab = 9\.2e18 is beyond the largest size"),
    (lambda: P.grow_width(width=-8), r"grow_width: width must be a positive size, got -8"),
    (lambda: P.grow_mlp(hidden=512, layers=[2**64]), r"grow_mlp: layer index 1\.8e19 is beyond"),
])
def test_bad_argument_from_python_is_refused_by_name(make, message):
    with pytest.raises(P.PassError, match=message):
        make()


# --- absurd model sizes --------------------------------------------------------------------------

# tiny-gpt2 with width 10^9 (MLP hidden = width, so that each tensor's bytes are still a size torch can
# describe on the meta device) or with a vocabulary of 10^12
HUGE = {
    "width": {"let d = 64": "let d = 1000000000", "hidden = 4 * d": "hidden = d"},
    "vocab": {"vocab = 1000": "vocab = 1000000000000"},
}


def _huge_spec(tmp_path: Path, which: str) -> Path:
    text = Path(GPT2).read_text()
    for a, b in HUGE[which].items():
        assert a in text
        text = text.replace(a, b)
    path = tmp_path / f"huge-{which}.mpt"
    path.write_text(text)
    return path


def _gpt2_params(d: int, v: int, f: int) -> int:
    layer = 4 * d * (d + 1) + (2 * d * f + f + d) + 4 * d
    return v * d + 64 * d + 2 * layer + 2 * d


WIDE = _gpt2_params(10**9, 1000, 10**9)  # 1.2e19


@pytest.mark.parametrize(("which", "params"), [("width", WIDE), ("vocab", _gpt2_params(64, 10**12, 256))])
def test_compile_refuses_a_model_that_cannot_fit(which, params, tmp_path, capsys, no_big_alloc):
    spec = _huge_spec(tmp_path, which)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert main(["compile", str(spec), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model tiny_gpt2 would have ") and "Traceback" not in err
    n, nbytes, dtype, _ = _sizes_in(err)
    assert n == pytest.approx(float(params), rel=0.05) and nbytes == pytest.approx(4.0 * params, rel=0.05)
    assert dtype == "float32" and "hint: `mptc summary SPEC`" in err
    assert not out.exists() and time.perf_counter() - t0 < 2.0


def test_compile_counts_bytes_in_the_requested_dtype(tmp_path, capsys, no_big_alloc):
    spec = _huge_spec(tmp_path, "vocab")
    assert main(["compile", str(spec), "-o", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 1
    n, nbytes, dtype, _ = _sizes_in(capsys.readouterr().err)
    assert dtype == "bfloat16" and nbytes == pytest.approx(2 * n, rel=0.05)


def test_grow_and_build_refuse_a_huge_spec(tmp_path, capsys, no_big_alloc):
    spec = _huge_spec(tmp_path, "width")
    assert main(["grow", str(spec), "-p", "grow_mlp(factor = 2)", "-o", str(tmp_path / "g")]) == 1
    assert "error: model tiny_gpt2 would have 1.2e19 parameters (41.6 EiB in float32)" in capsys.readouterr().err
    with pytest.raises(MptcError, match=r"would have 1\.2e19 parameters"):
        mptc.build(mptc.load(spec), device="cpu")
    with pytest.raises(MptcError, match=r"would have 1\.2e19 parameters"):  # before any weights are read
        mptc.build(mptc.load(spec), weights=tmp_path / "no-such-dir")
    assert not (tmp_path / "g").exists()


def test_summary_and_check_still_work_on_a_huge_spec(tmp_path, capsys, no_big_alloc):
    spec = _huge_spec(tmp_path, "width")
    assert main(["check", str(spec)]) == 0
    assert "ok: tiny_gpt2: 2 layers, width 1000000000" in capsys.readouterr().out
    assert main(["summary", str(spec), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == WIDE
    assert mptc.build(mptc.load(spec), device="meta").get_parameter("layers.0.mlp.up.weight").shape == (10**9, 10**9)


def test_a_model_that_fits_builds_and_one_byte_less_is_refused(monkeypatch):
    spec = mptc.load(GPT2)
    monkeypatch.setattr(M, "available", lambda device="cpu": 4 * G_TOTAL)
    model = mptc.build(spec)
    assert sum(p.numel() for p in model.parameters()) == G_TOTAL
    assert torch.isfinite(model.get_parameter("layers.0.mlp.up.weight")).all()
    monkeypatch.setattr(M, "available", lambda device="cpu": 4 * G_TOTAL - 1)
    with pytest.raises(MptcError, match=r"model tiny_gpt2 would have 168\.19K parameters \(657 KiB in float32\); "
                       r"this machine has 657 KiB of memory available"):
        mptc.build(spec)
    mptc.build(spec, device="meta")  # the meta device allocates nothing: never refused


def test_build_on_cpu_initialises_as_before():
    """Lowered on the meta device and then given storage: the weights of a model lowered on the
    CPU directly, from the same seed."""
    spec = mptc.load(GPT2)
    a = mptc.build(spec, seed=3)
    low = lower(spec, "cpu")
    b = fx.GraphModule(low.root, low.graph)
    b.meta["mptc.spec"], b.meta["mptc.params"] = spec, low.params
    init_weights(b, seed=3)
    assert all(p.device.type == "cpu" and p.requires_grad for p in a.parameters())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(a.get_parameter("layers.0.attn_norm.weight"), torch.ones(64))
    std = a.get_parameter("embed.tokens.weight").std().item()
    assert std == pytest.approx(spec.init.std, rel=0.05)
