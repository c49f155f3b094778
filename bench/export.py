"""ONNX export time: `mptc.export_onnx` against `torch.onnx.export(dynamo=True)` of the equivalent
`transformers` model (same dynamic batch and sequence axes, same opset, same input names).

Each worker first exports a toy model, so one-time costs (importing and registering the exporter's
op tables) are not in the timed export of either side.
"""

from __future__ import annotations

import math
import os
import time

from .config import Ctx
from .harness import close_all, interleave, ratio, start_all


def setup_mptc_export(mptc_dir: str, family: str, out: str, scratch: str, warm: bool = True):
    import onnx

    import mptc

    from .models import load_mptc, spec_text

    if warm:
        toy = mptc.build(mptc.parse(spec_text(family, toy=True)), seed=0)
        mptc.export_onnx(toy, os.path.join(scratch, "warm.onnx"))
    model = load_mptc(mptc_dir)

    def op():
        t0 = time.perf_counter()
        mptc.export_onnx(model, out, check=False)
        t1 = time.perf_counter()
        onnx.checker.check_model(out, full_check=True)
        return {"export_s": t1 - t0, "check_s": time.perf_counter() - t1, "bytes": os.path.getsize(out)}

    return {"export": op}, {}


def hf_export(model, path: str, context: int) -> None:
    import torch
    from torch.export import Dim

    from mptc.export import ONNX_OPSET, _quiet

    class Logits(torch.nn.Module):  # HF names in and out, no KV cache, logits only
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=context)
    with _quiet():
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        prog = torch.onnx.export(Logits(model).eval(), (), kwargs=kwargs, dynamo=True,
                                 dynamic_shapes={k: {0: batch, 1: seq} for k in kwargs},
                                 input_names=list(kwargs), output_names=["logits"], opset_version=ONNX_OPSET,
                                 verbose=False)
    prog.save(path)


def setup_hf_export(hf_dir: str, family: str, out: str, scratch: str, warm: bool = True):
    import transformers as T

    import mptc

    from .models import hf_config, load_hf, spec_text

    if warm:
        toy = mptc.parse(spec_text(family, toy=True))
        hf_export(T.AutoModelForCausalLM.from_config(hf_config(toy)).eval(), os.path.join(scratch, "warm-hf.onnx"),
                  toy.context)
    model = load_hf(hf_dir, "sdpa")  # the default attention of both families

    def op():
        t0 = time.perf_counter()
        hf_export(model, out, model.config.max_position_embeddings if family == "llama" else model.config.n_positions)
        return {"export_s": time.perf_counter() - t0, "bytes": os.path.getsize(out)}

    return {"export": op}, {"attn": model.config._attn_implementation}


def run(ctx: Ctx) -> dict:
    rows = []
    for fam in ctx.mode.export_families:
        prep = ctx.models[fam]
        scratch = ctx.root / f"export-{fam}"
        scratch.mkdir(exist_ok=True)
        path = str(ctx.root / f"{fam}-mptc.onnx")
        workers = {
            "mptc": ctx.worker(f"{fam}/export-mptc", "bench.export:setup_mptc_export", mptc_dir=prep.mptc_dir,
                               family=fam, out=path, scratch=str(scratch), warm=ctx.mode.warm_export),
            "hf": ctx.worker(f"{fam}/export-hf", "bench.export:setup_hf_export", hf_dir=prep.hf_dir, family=fam,
                             out=str(ctx.root / f"{fam}-hf.onnx"), scratch=str(scratch),
                             warm=ctx.mode.warm_export),
        }
        ctx.say(f"  {prep.title}: ONNX export")
        start_all(list(workers.values()))
        try:
            st = interleave({k: (w, "export") for k, w in workers.items()}, warmup=0, reps=ctx.mode.export_reps,
                            **ctx.limits(math.inf, 1))
        finally:
            close_all(list(workers.values()))
        if st["mptc"].times:
            ctx.onnx[fam] = path
        m, h = st["mptc"], st["hf"]
        exp_only = m.info.get("export_s")
        rows.append({"model": fam, "title": prep.title, "mptc": m.to_json(), "hf": h.to_json(),
                     "ratio_with_check": _r(ratio(m, h)),
                     "ratio_export_only": _r(exp_only / h.median) if exp_only and h.times else None})
    from mptc.export import ONNX_OPSET

    return {"rows": rows, "opset": ONNX_OPSET}


def _r(x: float) -> float | None:
    return None if x != x else round(x, 4)
