"""Extraction: latency of the 1/8, 1/4 and 1/2 MLP sub-models cut out of a MatFormer-nested GPT-2
small (`extract(mlp = s | m | l)`, verified) against the full nested model, next to their FLOPs ratio.
Also shown: the same sub-networks run inside the full module (`mptc.nested.granularity`, no copy)
and the plain, un-nested GPT-2 with the same weights (the cost of the nesting hooks)."""

from __future__ import annotations

from .config import Ctx
from .harness import close_all, interleave, ratio, start_all
from .models import flops

LEVELS = {"s": "1/8", "m": "1/4", "l": "1/2"}


def setup_extract(toy: bool, layers: int | None, batch: int, seq: int):
    import torch

    import mptc
    from mptc import passes as P
    from mptc.nested import granularity

    from .models import spec_text

    full = mptc.build(mptc.parse(spec_text("gpt2", toy, layers, nested=True)), seed=0).eval()
    plain = mptc.build(mptc.parse(spec_text("gpt2", toy, layers)), weights=full.state_dict()).eval()
    info, models = {}, {"full": full, "plain": plain}
    for g in LEVELS:
        sub, rep = P.Pipeline([P.extract(mlp=g)])(full)
        models[g] = sub.eval()
        r = rep.passes[0]
        info[g] = {"spec": str(mptc.spec_of(sub)), "apply_s": r.seconds, "verify_s": r.verify_seconds,
                   "params": r.params_after, "err32": r.max_abs_error_float32}
    info["full"] = {"spec": str(mptc.spec_of(full)), "params": sum(p.numel() for p in full.parameters())}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mptc.spec_of(full).vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)

    def fwd(m, level=None):
        def op():
            with torch.inference_mode():
                if level is None:
                    m(input_ids=ids, attention_mask=mask)
                else:
                    with granularity(m, mlp=level):
                        m(input_ids=ids, attention_mask=mask)
        return op

    ops = {k: fwd(m) for k, m in models.items()}
    ops |= {f"in-place {g}": fwd(full, g) for g in LEVELS}
    return ops, info


def run(ctx: Ctx) -> dict:
    import mptc

    b, t = ctx.mode.extract_shape
    w = ctx.worker("extract", "bench.extraction:setup_extract", toy=ctx.mode.toy, layers=ctx.mode.layers,
                   batch=b, seq=t)
    ctx.say(f"  nested GPT-2: extracting {', '.join(LEVELS)}; forward {b}×{t}")
    start_all([w])
    names = ["full", *LEVELS, *(f"in-place {g}" for g in LEVELS if ctx.mode.extract_inplace), "plain"]
    try:
        st = interleave({k: (w, k) for k in names}, warmup=1, reps=ctx.mode.extract_reps,
                        **ctx.limits(ctx.mode.extract_budget_s, 3))
    finally:
        close_all([w])
    if not w.ok:
        return {"error": st["full"].error, "rows": []}
    full_flops = flops(mptc.parse(w.info["full"]["spec"]), b, t)
    rows = []
    for k in names:
        level = k.split()[-1]
        spec = w.info.get(level, w.info["full"])["spec"] if level in LEVELS else w.info["full"]["spec"]
        fl = flops(mptc.parse(spec), b, t)
        speedup = 1 / ratio(st[k], st["full"]) if st[k].times and st["full"].times else float("nan")
        rows.append({"model": k, "fraction": LEVELS.get(level, "1"), "flops": fl, "flops_ratio": _r(full_flops / fl),
                     "speedup": _r(speedup), "speedup_over_flops_ratio": _r(speedup / (full_flops / fl)),
                     **st[k].to_json(), **{x: w.info[k][x] for x in ("apply_s", "verify_s", "params")
                                            if k in LEVELS and x in w.info[k]}})
    return {"batch": b, "seq": t, "rows": rows}


def _r(x: float) -> float | None:
    return None if x != x else round(x, 4)
