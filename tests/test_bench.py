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


def test_toy_deploy_run(tmp_path):
    """The deployment suite at toy size: the builder's and mptc's GenAI dirs, transformers and the cache-less
    loop decode the same checkpoint to the same greedy tokens; the report has its section and targets."""
    from bench import run
    from bench.config import TOY
    from bench.deploy import SIZES

    res = run(TOY, out=tmp_path, only=["deploy"], say=lambda s: None)
    dep = json.loads((tmp_path / "benchmarks.json").read_text())["deploy"]
    md = (tmp_path / "benchmarks.md").read_text()
    size, weights = SIZES["toy"], dep["model"]["weight_bytes"]
    assert dep["model"]["params"] == weights // 4 > 0
    em = dep["emission"]["rows"]
    assert set(em) == {"builder_fp32", "compile_direct", "mptc_genai_fp32"}
    for name, r in em.items():
        assert r["error"] is None, (name, r["error"])
        assert 5 < r["peak_rss_mib"] < 4096, (name, r["peak_rss_mib"])  # the command's own process, not ours
        assert r["bytes"] >= 0.9 * weights, (name, r["bytes"])  # float32 weights written
    rows = dep["decode"][0]["rows"]
    assert set(rows) == {"builder_fp32", "mptc_genai_fp32", "transformers", "mptc_naive"}
    ref = rows["builder_fp32"]["tokens"]
    assert len(ref) == size.new and rows["builder_fp32"]["prefill_s"] > 0
    for name in ("mptc_genai_fp32", "transformers"):
        assert rows[name]["error"] is None, rows[name]["error"]
        assert rows[name]["tokens"] == ref, name
        assert rows[name]["agrees_with_builder"] == {"leading": size.new, "same": size.new, "of": size.new}
        assert rows[name]["decode_vs_builder"] > 0 and rows[name]["prefill_vs_builder"] > 0
    assert rows["mptc_naive"]["tokens"] == ref[: size.naive_new]
    assert rows["mptc_genai_fp32"]["onnx"]["nodes"] > 0
    assert len(res["targets"]) == 5 and all(t["met"] in (True, False) for t in res["targets"]), res["targets"]
    for heading in ("## Deployment", "### Emission", "### Decoding, 1 thread", "### ONNX operators"):
        assert heading in md


def test_quantization_evaluation(tmp_path):
    """The quantization benchmark's ONNX evaluation: a deploy dir's graph (empty KV cache) gives the PyTorch
    model's held-out loss and greedy tokens in float32; int4 moves the loss, a little."""
    import numpy as np
    import torch

    import mptc
    from bench.quantization import TOY_SPEC, greedy, markdown, nll, onnx_file, onnx_loss
    from mptc.deploy import deploy

    model = mptc.build(mptc.parse(TOY_SPEC), seed=0).eval()
    ids = np.random.default_rng(0).integers(0, 256, (3, 24))
    with torch.inference_mode():
        t = torch.from_numpy(ids)
        lg = model(input_ids=t, attention_mask=torch.ones_like(t)).numpy()
    s, n = nll(lg, ids)
    assert n == 3 * 23
    ref = float(-np.log(np.take_along_axis(torch.softmax(torch.from_numpy(lg[:, :-1]).double(), -1).numpy(),
                                           ids[:, 1:, None], -1)).mean())
    assert s / n == pytest.approx(ref, abs=1e-6)
    for w in ("float32", "int4"):
        deploy(model, tmp_path / w, weights=w, max_length=64)
    f32, i4 = onnx_loss(onnx_file(tmp_path / "float32"), ids), onnx_loss(onnx_file(tmp_path / "int4"), ids)
    assert f32 == pytest.approx(s / n, abs=1e-4)
    assert 1e-6 < abs(i4 - f32) < 0.2, (i4, f32)
    seq = ids[:2, :8]
    for _ in range(5):  # greedy by full recomputation in PyTorch
        with torch.inference_mode():
            t = torch.from_numpy(seq)
            nxt = model(input_ids=t, attention_mask=torch.ones_like(t))[:, -1].argmax(-1).numpy()
        seq = np.concatenate([seq, nxt[:, None]], 1)
    assert greedy(onnx_file(tmp_path / "float32"), ids[:2, :8], 5).tolist() == seq[:, 8:].tolist()
    res = {"train": {"argv": ["mptc", "train"], "seconds": 1.0, "final_eval": {"losses": {"full": 2.0}}},
           "windows": [3, 24], "prompts": [2, 8, 5], "torch_float32_loss": s / n,
           "rows": {"mptc deploy float32": {"loss": f32, "delta_loss": 0.0, "greedy_same": [10, 10], "bytes": 1 << 20},
                    "mptc deploy int8": {"error": "refused"}}}
    md = "\n".join(markdown(res, "python -m bench.quantization"))
    assert f"| byte_llama | float32 | 1.00 MiB | {f32:.4f} (+0.0000) | 10/10 | — |" in md
    assert "| byte_llama | int8 | failed: refused |" in md
