"""Smoke test of the benchmark (`python -m bench`): every suite at toy size, so its code does not rot.

The numbers are meaningless at this size; what is checked is that every path runs (checkpoint mapping
to transformers, both exporters, ONNX Runtime, passes, extraction, the worker processes and their
memory measurement) and that the report and the JSON are written.
"""

from __future__ import annotations

import json
import os

import pytest

from bench.harness import MiB, Worker, interleave

pytestmark = pytest.mark.slow


def test_toy_run_writes_report(tmp_path):
    from bench import run
    from bench.config import TOY

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


def test_worker_processes(tmp_path):
    """Candidates run in spawned worker processes, which see their ops' memory; a failing setup
    reports its error instead of hanging."""
    log = str(tmp_path / "log")
    good = Worker("probe", "bench.harness:setup_probe", log=log, mib=64)
    bad = Worker("bad", "bench.harness:setup_probe", log=log, mib=-1)
    try:
        for w in (good, bad):
            w.start()
        st = interleave({"good": (good.wait(60), "alloc"), "bad": (bad.wait(60), "alloc")}, warmup=0, reps=2)
    finally:
        good.close()
        bad.close()
    assert good.info["pid"] != os.getpid()
    assert len(st["good"].times) == 2 and st["good"].info["bytes"] == 64 * MiB
    if os.path.exists("/proc/self/clear_refs"):
        assert 60 * MiB <= st["good"].peak <= 80 * MiB, st["good"].peak / MiB
    assert "cannot allocate -1 MiB" in st["bad"].error and not st["bad"].times
