"""Inference latency: mptc's GraphModule against `transformers` (eager and sdpa attention) on the same
weights, ONNX Runtime on mptc's ONNX file against PyTorch, and achieved GFLOP/s against the float32
matmul peak measured in the same rounds."""

from __future__ import annotations

import time

from .config import Ctx
from .harness import close_all, interleave, ratio, spread, start_all
from .models import flops

CANDIDATES = ("mptc", "hf_eager", "hf_sdpa", "ort")
LABELS = {"mptc": "mptc (PyTorch eager)", "hf_eager": 'transformers, attn "eager"',
          "hf_sdpa": 'transformers, attn "sdpa" (default)', "ort": "ONNX Runtime (mptc's ONNX)"}


def _inputs(vocab: int, shapes, seed: int = 0):
    import torch

    out = {}
    for b, t in shapes:
        g = torch.Generator().manual_seed(seed + 1000 * b + t)
        ids = torch.randint(0, vocab, (b, t), generator=g)
        out[f"{b}x{t}"] = (ids, torch.ones_like(ids))
    return out


# --- worker setups ---------------------------------------------------------------------------------


def setup_mptc(mptc_dir: str, shapes, vocab: int):
    import torch

    from .models import load_mptc

    model = load_mptc(mptc_dir)

    def run(ids, mask):
        def op():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
        return op

    return {k: run(*v) for k, v in _inputs(vocab, shapes).items()}, {"threads": torch.get_num_threads()}


def setup_hf(hf_dir: str, attn: str, shapes, vocab: int):
    import torch

    from .models import load_hf

    model = load_hf(hf_dir, attn)

    def run(ids, mask):
        def op():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        return op

    return {k: run(*v) for k, v in _inputs(vocab, shapes).items()}, {"attn": model.config._attn_implementation}


def setup_ort(onnx_path: str, mptc_dir: str, shapes, vocab: int, ort_threads: int | None = None):
    import os

    import onnxruntime as ort

    import mptc

    if not os.path.exists(onnx_path):  # the export suite did not run: export here (not timed)
        mptc.export_onnx(mptc.load_model(mptc_dir), onnx_path, check=False)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if ort_threads:  # as many as torch gets (ONNX Runtime's default: one per physical core)
        so.intra_op_num_threads = ort_threads
        so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

    def run(ids, mask):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

        def op():
            sess.run(None, feed)
        return op

    return {k: run(*v) for k, v in _inputs(vocab, shapes).items()}, {"threads": ort_threads or os.cpu_count()}


def setup_matmul(n: int, times: int = 1):
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)

    def op():
        for _ in range(times):
            torch.matmul(a, b)

    return {"matmul": op}, {"flops": 2.0 * n**3 * times, "n": n}


# --- the suite ----------------------------------------------------------------------------------------


def run(ctx: Ctx) -> dict:
    import mptc

    mode = ctx.mode
    shapes = list(mode.shapes)
    out = {"rows": [], "matmul": {}}
    peak = ctx.worker("matmul", "bench.inference:setup_matmul", n=mode.matmul_n, times=1 if mode.matmul_n >= 3072 else 3
                      ).start().wait()
    peak_runs = []
    for fam in mode.families:
        prep = ctx.models[fam]
        spec = mptc.parse(prep.spec_text)
        onnx_path = ctx.onnx.get(fam) or str(ctx.root / f"{fam}-mptc.onnx")
        common = {"shapes": shapes, "vocab": spec.vocab}
        workers = {
            "mptc": ctx.worker(f"{fam}/mptc", "bench.inference:setup_mptc", mptc_dir=prep.mptc_dir, **common),
            "hf_eager": ctx.worker(f"{fam}/hf_eager", "bench.inference:setup_hf", hf_dir=prep.hf_dir, attn="eager",
                                   **common),
            "hf_sdpa": ctx.worker(f"{fam}/hf_sdpa", "bench.inference:setup_hf", hf_dir=prep.hf_dir, attn="sdpa",
                                  **common),
            "ort": ctx.worker(f"{fam}/ort", "bench.inference:setup_ort", onnx_path=onnx_path,
                              mptc_dir=prep.mptc_dir, ort_threads=mode.threads, **common),
        }
        ctx.say(f"  {prep.title}: starting {len(workers)} workers")
        start_all(list(workers.values()))
        for name, w in workers.items():
            if not w.ok:
                ctx.say(f"    {name}: setup failed: {w.error.strip().splitlines()[-1]}")
        try:
            for i, (b, t) in enumerate(shapes):
                key = f"{b}x{t}"
                ctx.say(f"  {prep.title} {b}×{t}")
                cands = {name: (w, key) for name, w in workers.items()}
                cands["matmul"] = (peak, "matmul")
                t0 = time.perf_counter()
                st = interleave(cands, warmup=mode.inf_warmup if i == 0 else 0, reps=mode.inf_reps,
                                **ctx.limits(mode.inf_budget_s, mode.inf_min_reps))
                peak_runs.extend(st.pop("matmul").times)
                fl = flops(spec, b, t)
                for name in CANDIDATES:
                    s = st[name]
                    out["rows"].append({
                        "model": fam, "title": prep.title, "batch": b, "seq": t, "candidate": name,
                        "label": LABELS[name], "flops": fl, **s.to_json(),
                        "vs_hf_eager": _r(ratio(s, st["hf_eager"])), "vs_hf_sdpa": _r(ratio(s, st["hf_sdpa"])),
                        "vs_mptc": _r(ratio(s, st["mptc"])),
                        "vs_hf_eager_spread": spread(s, st["hf_eager"]), "vs_mptc_spread": spread(s, st["mptc"]),
                        "gflops": _r(fl / s.median / 1e9) if s.times else None,
                        "setup_s": round(workers[name].info.get("setup_seconds", float("nan")), 2),
                    })
                out.setdefault("seconds", {})[f"{fam} {key}"] = round(time.perf_counter() - t0, 1)
        finally:
            close_all(list(workers.values()))
    close_all([peak])
    if peak_runs:
        fl = peak.info["flops"]
        best = fl / min(peak_runs) / 1e9
        med = fl / sorted(peak_runs)[len(peak_runs) // 2] / 1e9
        out["matmul"] = {"n": mode.matmul_n, "peak_gflops": round(best, 1), "median_gflops": round(med, 1),
                         "runs": len(peak_runs)}
        for row in out["rows"]:
            if row["gflops"] is not None:
                row["frac_of_peak"] = round(row["gflops"] / best, 3)
    return out


def _r(x: float) -> float | None:
    return None if x != x else round(x, 4)
