"""The machine description, the targets, and docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --- the machine ---------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    out = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                out.setdefault(k, v)
    except OSError:
        pass
    return out


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except ImportError:
        return None


def machine() -> dict:
    import torch

    cpu = _cpuinfo()
    flags = cpu.get("flags", "").split()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    model = cpu.get("model name") or platform.processor() or "?"
    if "family" not in model and cpu.get("cpu family"):
        model += f" (family {cpu.get('cpu family')}, model {cpu.get('model')})"
    return {
        "cpu": model, "isa": isa, "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem, "os": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "onnxruntime": _version("onnxruntime"), "transformers": _version("transformers"), "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"), "numpy": _version("numpy"), "mptc": _version("mptc"), "commit": commit,
        "gpu": "none (CPU only)",
    }


# --- targets -------------------------------------------------------------------------------------------


def _target(name: str, case: str, value: float | None, limit: float, upper: bool, unit: str = "×",
            spread: list[float] | None = None) -> dict:
    """One target's verdict; `spread`: the quartiles of the per-round ratios, when a miss may be noise."""
    if value is None or value != value:
        return {"target": name, "case": case, "value": None, "limit": limit, "upper": upper, "met": None,
                "note": "not measured"}
    met = value <= limit if upper else value >= limit
    if met:
        note = "met"
    elif upper:
        note = f"missed: {value / limit - 1:.0%} over"
    else:
        note = f"missed: {1 - value / limit:.0%} short"
    if not met and spread and spread[0] <= limit <= spread[1]:
        note += f" (within this run's noise: the middle half of the per-round ratios spans " \
                f"{spread[0]:.2f}–{spread[1]:.2f})"
    return {"target": name, "case": case, "value": round(value, 4), "limit": limit, "upper": upper, "unit": unit,
            "met": met, "note": note, "spread": spread}


def targets(res: dict) -> list[dict]:
    out = []
    inf = res.get("inference", {}).get("rows", [])
    for r in inf:
        shape = f"{r['title']} {r['batch']}×{r['seq']}"
        if r["candidate"] == "mptc":
            out.append(_target("mptc latency ≤ 1.0 × transformers eager", shape, r["vs_hf_eager"], 1.0, True,
                               spread=r.get("vs_hf_eager_spread")))
        if r["candidate"] == "ort":
            out.append(_target("ONNX Runtime ≤ 0.8 × PyTorch eager (mptc)", shape, r["vs_mptc"], 0.8, True,
                               spread=r.get("vs_mptc_spread")))
    low = res.get("lowering")
    if low:
        fit = low.get("fit") or {}
        deep = [r for r in low["rows"] if r["layers"] == low["deepest"]]
        if deep:
            out.append(_target(f"{low['deepest']}-layer spec parses + lowers < 1 s (meta device)", "GPT-2 small",
                               deep[0]["mptc"]["median_s"], 1.0, True, "s"))
        out.append(_target("compile time linear in depth: R² of a straight-line fit (fastest runs) ≥ 0.99",
                           "GPT-2 small",
                           fit.get("r2"), 0.99, False, ""))
    for r in res.get("growth", {}).get("rows", []):
        if r["call"] != "load+save":
            out.append(_target("pass + verification ≤ 3 × safetensors load + save", f"{r['title']}: {r['call']}",
                               r.get("vs_load_save"), 3.0, True, spread=r.get("vs_load_save_spread")))
    for r in res.get("extraction", {}).get("rows", []):
        if r["model"] in ("s", "m", "l"):
            out.append(_target("extracted speed-up ≥ 0.8 × FLOPs ratio", f"MLP {r['fraction']} ({r['model']})",
                               r.get("speedup_over_flops_ratio"), 0.8, False))
    from .deploy import targets as deploy_targets

    return out + deploy_targets(res.get("deploy"), _target)


# --- markdown ------------------------------------------------------------------------------------------


def _f(x, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    if x is None or x != x:
        return "—"
    return f"{x * scale:.{digits}f}{suffix}"


def _ms(x) -> str:
    if x is None:
        return "—"
    return f"{x * 1e3:.1f}" if x < 10 else f"{x * 1e3:.0f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def markdown(res: dict) -> str:
    m, mode = res["machine"], res["mode"]
    out = ["# Benchmarks", "",
         f"Generated by `{res['command']}` ({mode['name']} mode) on {res['date']}, in {res['total_s'] / 60:.1f} min. "
         "Every figure is a ratio against a baseline measured in the same run: candidates run in interleaved "
         "rounds (a new order each round), each ratio is the median over rounds of the per-round ratio, "
         "and times are medians. See [Method](#method).", ""]
    if mode.get("layers"):
        out += [f"**{mode['name']} mode:** the models have {mode['layers']} layers instead of 12, and the shapes are "
              "smaller; run `python -m bench` for the full benchmark.", ""]
    if mode.get("toy"):
        out += ["**toy mode** (the smoke test): toy-size models; the numbers mean nothing.", ""]
    if res.get("earlier"):
        out += ["Kept from earlier runs (this run did not measure them): " + "; ".join(
            f"{k} (`{e['command']}`, {e['date']}" + (f", on {e['cpu']}" if e.get("cpu") and e["cpu"] != m["cpu"]
                                                      else "") + ")" for k, e in res["earlier"].items())
                + ". The machine table describes this run's machine.", ""]
    out += ["## Machine", ""]
    out += _table(["", ""], [
        ["CPU", f"{m['cpu']} ({', '.join(m['isa'])})"], ["cores", f"{m['cores']} ({m['usable_cores']} usable)"],
        ["memory", f"{m['memory_gib']} GiB"], ["GPU", m["gpu"]], ["OS", m["os"]],
        ["versions", f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
                     f"transformers {m['transformers']}, onnx {m['onnx']}, onnxscript {m['onnxscript']}, "
                     f"numpy {m['numpy']}, mptc {m['mptc']} ({m['commit']})"],
        ["threads", f"{res.get('threads', m['torch_threads'])} per candidate (torch and ONNX Runtime)"],
        ["load average", f"{res['load'][0]} at the start, {res['load'][1]} at the end (1-minute, "
                         f"{m['cores']} cores; other jobs shared the machine)"],
        *([["other processes", f"used {c['median']:.0%} of the CPUs (median) as timed ops began; "
                                f"{c['busy_share']:.0%} of {c['ops']} ops began with more than a quarter in use"]]
          if (c := res.get("contention")) else []),
    ])
    out += ["", "## Targets", ""]
    out += _table(["target", "case", "measured", "target", "result"], [
        [t["target"], t["case"], "—" if t["value"] is None else f"{t['value']:.3g}{t.get('unit', '')}",
         f"{'≤' if t.get('upper', True) else '≥'} {t['limit']:g}{t.get('unit', '')}",
         ("✅ " if t["met"] else "" if t["met"] is None else "❌ ") + t["note"]] for t in res["targets"]])
    n_met = sum(1 for t in res["targets"] if t["met"])
    out += ["", f"{n_met} of {len(res['targets'])} met."]
    out += _inference(res.get("inference"), res.get("models", {}))
    out += _export(res.get("export"))
    out += _lowering(res.get("lowering"))
    out += _growth(res.get("growth"))
    out += _extraction(res.get("extraction"))
    from .deploy import markdown as deploy_markdown

    out += deploy_markdown(res.get("deploy"), _table, _f, _ms)
    out += _method(res)
    return "\n".join(out) + "\n"


def _inference(inf: dict | None, models: dict) -> list[str]:
    if not inf:
        return []
    mm = inf.get("matmul") or {}
    parity = ", ".join(f"{m['title']} {m['parity_max_abs']:.1e}" for m in models.values())
    out = ["", "## Inference", "",
         "Forward pass of the whole language model (logits for every position), `torch.inference_mode()`, "
         "input ids with an all-ones `attention_mask`; transformers with `use_cache=False`. Same weights on "
         f"every side (largest logit difference, mptc against transformers eager: {parity}). GFLOP/s counts the "
         "matmul FLOPs of `mptc summary` with attention at the actual length (no causal halving), against the "
         f"float32 peak of `torch.matmul` on {mm.get('n', '?')}² matrices measured in the same rounds: "
         f"**{_f(mm.get('peak_gflops'), 1)} GFLOP/s** (best of {mm.get('runs', 0)}; median "
         f"{_f(mm.get('median_gflops'), 1)}).", ""]
    rows = []
    for r in inf["rows"]:
        rows.append([f"{r['title']}", f"{r['batch']}×{r['seq']}", r["label"],
                     _ms(r["median_s"]) if r["median_s"] is not None else f"failed: {r['error']}",
                     _f(r["vs_hf_eager"]), _f(r["vs_hf_sdpa"]), _f(r["vs_mptc"]), _f(r.get("gflops"), 1),
                     _f(r.get("frac_of_peak"), 0, 100, "%"), _f(r["peak_mib"], 0), _f(r["process_peak_mib"], 0)])
    out += _table(["model", "B×T", "candidate", "median ms", "× HF eager", "× HF sdpa", "× mptc", "GFLOP/s", "of peak",
                 "peak Δ MiB", "process MiB"], rows)
    return out


def _export(ex: dict | None) -> list[str]:
    if not ex:
        return []
    out = ["", "## ONNX export", "",
         f"`mptc.export_onnx` (torch.onnx dynamo exporter, opset {ex.get('opset', 18)}, dynamic batch and "
         "sequence) and its "
         "`onnx.checker` full check, against `torch.onnx.export(..., dynamo=True)` of the transformers model "
         "(default sdpa attention, `use_cache=False`, the same dynamic axes and input names). One export per "
         "side after a warm-up export of a toy model in the same process.", ""]
    rows = []
    for r in ex["rows"]:
        m, h = r["mptc"], r["hf"]
        mi = m.get("info", {})
        rows.append([r["title"], _f(mi.get("export_s")), _f(mi.get("check_s")),
                     _f(m["median_s"]) if m["median_s"] else f"failed: {m['error']}",
                     _f(h["median_s"]) if h["median_s"] else f"failed: {h['error']}",
                     _f(r["ratio_export_only"]), _f(r["ratio_with_check"]),
                     f"{_f(m['peak_mib'], 0)} / {_f(h['peak_mib'], 0)}"])
    out += _table(["model", "mptc export s", "check s", "mptc total s", "transformers s", "× (export only)",
                 "× (with check)", "peak Δ MiB mptc / HF"], rows)
    return out


def _lowering(lo: dict | None) -> list[str]:
    if not lo:
        return []
    fit, hf = lo.get("fit") or {}, lo.get("hf_fit") or {}
    out = ["", "## Compile time (no weights)", "",
         "`mptc.parse(text)` then `mptc.build(spec, device=\"meta\")` for GPT-2 small with L layers, beside "
         "`transformers.GPT2LMHeadModel(config)` built under `torch.device(\"meta\")`. The first call in a "
         "fresh process (loading the grammar) is shown apart and not in the medians; the straight-line fit uses "
         "each depth's fastest run.", ""]
    rows = []
    for r in lo["rows"]:
        m, h = r["mptc"], r["hf_meta"]
        mi = m.get("info", {})
        rows.append([str(r["layers"]), _ms(mi.get("parse_s")), _ms(mi.get("lower_s")), _ms(m["median_s"]),
                     _ms(m["min_s"]), _ms(r["first_call_s"]), _ms(h["median_s"]), _f(r["ratio_vs_hf"]),
                     _f(m["median_s"] / r["layers"] * 1e3 if m["median_s"] else None, 2),
                     _f(m["peak_mib"], 1)])
    out += _table(["layers", "parse ms", "lower ms", "total ms", "fastest ms", "first call ms", "transformers meta ms",
                 "× HF", "ms / layer", "peak Δ MiB"], rows)
    if fit:
        out += ["", f"Straight-line fit of the fastest runs: {_f(fit.get('intercept_s'), 1, 1e3)} ms + "
                  f"{_f(fit.get('per_layer_s'), 2, 1e3)} ms per layer, R² = {_f(fit.get('r2'), 4)}; the per-layer "
                  f"cost of the last interval over the first's is {_f(fit.get('slope_last_over_first'), 2)} "
                  "(1.00 = linear). transformers on meta: "
                  f"{_f(hf.get('intercept_s'), 1, 1e3)} ms + {_f(hf.get('per_layer_s'), 2, 1e3)} ms per layer."]
    return out


def _growth(gr: dict | None) -> list[str]:
    if not gr:
        return []
    out = ["", "## Growth passes", "",
         "`Pipeline([pass])(model)` with every check on: the pass (in float32; unchanged tensors shared), then "
         "well-formedness, the certificate and the behaviour check (float64 and float32 forward passes of old "
         "and new model on a probe batch, float64 widened on the fly). Baseline: "
         "`safetensors.torch.load_file` + `save_file` of the same model's checkpoint (page cache warm; the "
         "load maps the file, the save writes a copy over the previous round's, which costs this machine "
         "0.25–1.1 s for 475 MiB depending on how much written data the page cache holds). "
         "GPT-2 uses LayerNorm, so `grow_width` runs on the Llama-style model, as does `add_kv_heads` "
         "(GPT-2 is multi-head).", ""]
    rows = []
    for r in gr["rows"]:
        i = r.get("info", {})
        if r["call"] == "load+save":
            rows.append([r["title"], "safetensors load + save (baseline)", _f(i.get("bytes"), 0, 1 / (1 << 20)),
                         "—", "—", _f(r["median_s"]), "1.00", _f(r["peak_mib"], 0)])
            continue
        params = f"{i['params_before'] / 1e6:.1f}M → {i['params_after'] / 1e6:.1f}M" if "params_after" in i else "—"
        rows.append([r["title"], f"`{r['call']}`", params, _f(i.get("apply_s")), _f(i.get("verify_s")),
                     _f(r["median_s"]) if r["median_s"] is not None else f"failed: {r['error']}",
                     _f(r.get("vs_load_save")), _f(r["peak_mib"], 0)])
    out += _table(["model", "pass", "params (MiB for the baseline)", "apply s", "verify s", "total s",
                 "× load+save", "peak Δ MiB"], rows)
    return out


def _extraction(ex: dict | None) -> list[str]:
    if not ex:
        return []
    if ex.get("error"):
        return ["", "## Extraction", "", f"failed: {ex['error']}"]
    out = ["", "## Extraction (MatFormer)", "",
         f"GPT-2 small with `nested = [1/8, 1/4, 1/2, 1]` in its MLP; `extract(mlp = s | m | l)` (verified) "
         f"cuts each sub-model out. Forward at {ex['batch']}×{ex['seq']}. Speed-up = full model's time / "
         "sub-model's (per round). \"in-place\" runs the sub-network inside the full module "
         "(`mptc.nested.granularity`); \"plain\" is GPT-2 without nesting, same weights.", ""]
    rows = []
    names = {"full": "full (nested)", "plain": "plain GPT-2 (not nested)"}
    for r in ex["rows"]:
        rows.append([names.get(r["model"], r["model"]), r["fraction"], _f(r["flops"], 1, 1e-9),
                     _f(r["flops_ratio"]), _ms(r["median_s"]), _f(r["speedup"]), _f(r["speedup_over_flops_ratio"]),
                     _f(r.get("apply_s")), _f(r.get("verify_s")), _f(r["peak_mib"], 0)])
    out += _table(["model", "MLP", "GFLOP / forward", "FLOPs ratio", "median ms", "speed-up", "speed-up / FLOPs ratio",
                 "extract s", "verify s", "peak Δ MiB"], rows)
    return out


def _method(res: dict) -> list[str]:
    return ["", "## Method", "",
            "- Each candidate runs in its own spawned worker process that loads its model once; the coordinator "
            "asks the workers for one op at a time, in rounds shuffled anew each time, so load from other processes "
            "falls on candidates and baselines alike. Warm-up rounds are discarded. Ratios are medians of "
            "per-round ratios. Before each op the coordinator samples `/proc/stat` (its workers are idle then): "
            "a run that begins with other processes holding more than a quarter of the CPUs counts as contended, "
            "and medians and ratios leave contended runs out when at least three clean ones remain "
            "(`runs_used` in the JSON).",
            "- Noise: on this shared virtual machine one op's time varies by ±30 % between rounds even with the "
            "CPUs otherwise idle; much of it is page-fault time, which for the same number of faults varied "
            "fivefold between runs. The JSON keeps the quartiles of each target's per-round ratios "
            "(`*_spread`); a miss whose middle half of per-round ratios straddles the target is marked as within "
            "the run's noise.",
            "- Peak Δ MiB: the op's peak resident memory above the process's resident memory just before it "
            "(VmHWM reset through `/proc/self/clear_refs` after `malloc_trim`); it sees torch and ONNX Runtime "
            "allocations, which tracemalloc does not. Process MiB: the worker's peak resident set, weights "
            "included.",
            "- The two models are `examples/gpt2-small.mpt` and `examples/llama-style.mpt`; the transformers "
            "side loads the same tensors through `from_pretrained` (bench/models.py maps the names).",
            "- Threads: torch and ONNX Runtime get the same number of threads (default one per core). When other "
            "jobs hold a core, torch's threads stall waiting for each other (a 2-thread forward pass can take "
            "2–3× longer than a 1-thread one), so on a busy machine `--threads 1` gives steadier ratios.",
            f"- Raw data: `{res.get('json_name', 'docs/benchmarks.json')}`. Re-run: `python -m bench` (under 15 "
            "minutes on 2 cores; suites shrink their repetitions when the run falls behind) or "
            "`python -m bench --quick` (under 3 minutes, 2-layer models). Profile a gap: `python -m bench.profile`."]
