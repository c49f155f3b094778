"""Smoke test of the benchmark (`python -m bench`): every suite at toy size, so its code does not rot.

The numbers are meaningless at this size; what is checked is that every path runs (checkpoint mapping
to transformers, both exporters, ONNX Runtime, passes, extraction, the worker processes) and that the
report and the JSON are written.
"""

from __future__ import annotations

import json

import pytest

from bench import run
from bench.config import TOY
from bench.harness import Worker, interleave

pytestmark = pytest.mark.slow


def test_toy_run_writes_report(tmp_path):
    res = run(TOY, out=tmp_path, say=lambda s: None)
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    md = (tmp_path / "benchmarks.md").read_text()

    for fam in ("gpt2", "llama"):  # the same weights on both sides
        assert data["models"][fam]["parity_max_abs"] < 1e-4
    inf = data["inference"]["rows"]
    assert {r["candidate"] for r in inf} == {"mptc", "hf_eager", "hf_sdpa", "ort"}
    assert all(r["median_s"] is not None and r["error"] is None for r in inf), inf
    assert data["inference"]["matmul"]["peak_gflops"] > 0
    for r in data["export"]["rows"]:
        assert r["mptc"]["error"] is None and r["hf"]["error"] is None, r
    assert data["lowering"]["fit"]["per_layer_s"] is not None
    assert all(r["error"] is None for r in data["growth"]["rows"]), data["growth"]["rows"]
    assert {r["call"].split("(")[0] for r in data["growth"]["rows"]} == {"load+save", "grow_mlp", "grow_width"}
    ext = {r["model"]: r for r in data["extraction"]["rows"]}
    assert set(ext) >= {"full", "s", "m", "l", "plain"} and ext["s"]["flops_ratio"] > ext["l"]["flops_ratio"] > 1
    assert all(t["met"] in (True, False) for t in res["targets"]), res["targets"]
    for heading in ("## Machine", "## Targets", "## Inference", "## ONNX export", "## Compile time",
                    "## Growth passes", "## Extraction"):
        assert heading in md
    assert data["machine"]["torch"] in md


def test_worker_process(tmp_path):
    """Candidates run in spawned worker processes; a failing setup reports its error instead of hanging."""
    good = Worker("matmul", "bench.inference:setup_matmul", log=str(tmp_path / "log"), n=32)
    bad = Worker("bad", "bench.inference:setup_ort", log=str(tmp_path / "log"), onnx_path=str(tmp_path / "x.onnx"),
                 mptc_dir=str(tmp_path / "missing"), shapes=[(1, 4)], vocab=10)
    try:
        for w in (good, bad):
            w.start()
        st = interleave({"good": (good.wait(120), "matmul"), "bad": (bad.wait(120), "1x4")}, warmup=0, reps=2)
    finally:
        good.close()
        bad.close()
    assert len(st["good"].times) == 2 and st["good"].peak >= 0 and st["good"].hwm > 0
    assert st["bad"].error and not st["bad"].times
