"""Growth passes with their verification (`Pipeline([pass])`, checks on) against loading and saving
the same safetensors checkpoint: a pass reads every tensor and writes a model, so load + save is
the I/O-bound floor it is measured against. The file is read from the page cache (it was just
written), as it would be right after training or a previous pass."""

from __future__ import annotations

from .config import Ctx
from .harness import close_all, interleave, ratio, spread, start_all


def calls(spec, family: str) -> list[str]:
    """The passes benchmarked on one model, sized from its spec."""
    a, n = spec.layers[0].attention, spec.n_layers
    if family == "gpt2":  # LayerNorm: grow_width refuses it; multi-head: no kv heads to add
        return [f"grow_mlp(hidden = {spec.layers[0].mlp.hidden * 4 // 3})", "add_heads(n = 4)",
                f"grow_head_dim(value = {a.value_dim * 3 // 2})", f"grow_qk(dim = {a.head_dim * 3 // 2})",
                f"add_layers(n = 2, at = {n // 2})"]
    width = -(-spec.width * 4 // 3 // 32) * 32
    return [f"grow_width(width = {width})", f"add_kv_heads(n = {a.kv_heads})"]


def setup_passes(mptc_dir: str, calls: list[str], scratch: str):
    import os

    from safetensors.torch import load_file, save_file

    from mptc import passes as P
    from mptc.passes.parse import parse_passes

    from .models import load_mptc

    model = load_mptc(mptc_dir)
    ckpt = os.path.join(mptc_dir, "weights.safetensors")
    copy = os.path.join(scratch, "copy.safetensors")

    def load_save():
        save_file(load_file(ckpt), copy, metadata={"format": "pt"})
        return {"bytes": os.path.getsize(ckpt)}

    def grow(call):
        def op():
            _, rep = P.Pipeline(parse_passes(call))(model)
            r = rep.passes[0]
            return {"apply_s": r.seconds, "verify_s": r.verify_seconds, "params_before": r.params_before,
                    "params_after": r.params_after, "err64": r.max_abs_error_float64, "err32": r.max_abs_error_float32}
        return op

    return {"load+save": load_save, **{c: grow(c) for c in calls}}, {}


def run(ctx: Ctx) -> dict:
    import mptc

    rows = []
    for fam, prep in ctx.models.items():
        cs = calls(mptc.parse(prep.spec_text), fam)[: ctx.mode.pass_limit]
        scratch = ctx.root / f"passes-{fam}"
        scratch.mkdir(exist_ok=True)
        w = ctx.worker(f"{fam}/passes", "bench.growth:setup_passes", mptc_dir=prep.mptc_dir, calls=cs,
                       scratch=str(scratch))
        ctx.say(f"  {prep.title}: {len(cs)} passes")
        start_all([w])
        try:
            st = interleave({c: (w, c) for c in ["load+save", *cs]}, warmup=ctx.mode.pass_warmup,
                            reps=ctx.mode.pass_reps, **ctx.limits(ctx.mode.pass_budget_s, 1))
        finally:
            close_all([w])
        base = st["load+save"]
        rows.append({"model": fam, "title": prep.title, "call": "load+save", **base.to_json()})
        for c in cs:
            rows.append({"model": fam, "title": prep.title, "call": c, **st[c].to_json(),
                         "vs_load_save": _r(ratio(st[c], base)), "vs_load_save_spread": spread(st[c], base)})
    return {"rows": rows}


def _r(x: float) -> float | None:
    return None if x != x else round(x, 4)
