"""Compile time as depth grows: parse + lower GPT-2-small specs of 6 … 48 layers on the meta device
(no weights), beside `transformers` building the same architecture on the meta device."""

from __future__ import annotations

import time

from .config import Ctx
from .harness import close_all, interleave, ratio, start_all


def setup_lower(depths, toy: bool):
    import mptc

    from .models import spec_text

    texts = {n: spec_text("gpt2", toy, layers=n) for n in depths}

    def run(text):
        def op():
            t0 = time.perf_counter()
            spec = mptc.parse(text)
            t1 = time.perf_counter()
            mptc.build(spec, device="meta")
            return {"parse_s": t1 - t0, "lower_s": time.perf_counter() - t1}
        return op

    return {f"L{n}": run(t) for n, t in texts.items()}, {}


def setup_hf_meta(depths, toy: bool):
    import torch
    import transformers as T

    import mptc

    from .models import hf_config, spec_text

    cfgs = {n: hf_config(mptc.parse(spec_text("gpt2", toy, layers=n))) for n in depths}

    def run(cfg):
        def op():
            with torch.device("meta"):
                T.GPT2LMHeadModel(cfg)
        return op

    return {f"L{n}": run(c) for n, c in cfgs.items()}, {}


def fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = a + b·x, its R², and the slope of the last interval over the first's
    (1.0 for a straight line; > 1 means each layer costs more as the model grows)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else float("nan")
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True)) / ss if ss else 1.0
    first = (ys[1] - ys[0]) / (xs[1] - xs[0]) if n > 1 else float("nan")
    last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if n > 1 else float("nan")
    return {"intercept_s": a, "per_layer_s": b, "r2": r2, "slope_last_over_first": last / first if first else None}


def run(ctx: Ctx) -> dict:
    depths = list(ctx.mode.depths)
    mw = ctx.worker("lower", "bench.lowering:setup_lower", depths=depths, toy=ctx.mode.toy)
    hw = ctx.worker("hf-meta", "bench.lowering:setup_hf_meta", depths=depths, toy=ctx.mode.toy)
    start_all([mw, hw])
    cands = {}
    for n in depths:
        cands[f"mptc L{n}"] = (mw, f"L{n}")
        cands[f"hf L{n}"] = (hw, f"L{n}")
    try:
        st = interleave(cands, warmup=1, reps=ctx.mode.lower_reps, **ctx.limits(20, 3))
    finally:
        close_all([mw, hw])
    rows = []
    for n in depths:
        m, h = st[f"mptc L{n}"], st[f"hf L{n}"]
        rows.append({"layers": n, "mptc": m.to_json(), "hf_meta": h.to_json(), "ratio_vs_hf": _r(ratio(m, h)),
                     "first_call_s": _r(m.warmup[0]) if m.warmup else None})
    # the fits use each depth's fastest run: these are short, deterministic, single-threaded Python
    # runs, which other processes and the garbage collector can only slow down
    ok = [r for r in rows if r["mptc"]["min_s"] is not None]
    lin = fit([r["layers"] for r in ok], [r["mptc"]["min_s"] for r in ok]) if len(ok) > 1 else {}
    hf_ok = [r for r in rows if r["hf_meta"]["min_s"] is not None]
    hf_lin = fit([r["layers"] for r in hf_ok], [r["hf_meta"]["min_s"] for r in hf_ok]) if len(hf_ok) > 1 else {}
    return {"rows": rows, "fit": lin, "hf_fit": hf_lin, "deepest": depths[-1]}


def _r(x: float) -> float | None:
    return None if x != x else round(x, 6)
