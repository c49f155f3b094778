"""Run the suites in order and write docs/benchmarks.md and docs/benchmarks.json."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import deploy, export, extraction, growth, inference, lowering
from .config import Ctx, Mode
from .models import prepare
from .report import machine, markdown, targets

# in this order: export writes the ONNX files that inference runs in ONNX Runtime
SUITES: dict[str, Callable[[Ctx], dict]] = {
    "lowering": lowering.run,
    "export": export.run,
    "inference": inference.run,
    "growth": growth.run,
    "extraction": extraction.run,
    "deploy": deploy.run,
}
OPT_IN = ("deploy",)  # run only when named in --only (heavy; builds its own models)
FAMILIES = ("gpt2", "llama")


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def contention(res: dict) -> dict:
    """How busy other processes kept the CPUs as timed ops began (0 = idle, 1 = every core)."""
    vals = []

    def walk(x):
        if isinstance(x, dict):
            vals.extend(v for v in x.get("busy_at_start") or [] if v is not None)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk({k: v for k, v in res.items() if k in SUITES})
    if not vals:
        return {}
    vals.sort()
    return {"ops": len(vals), "median": vals[len(vals) // 2], "busy_share": round(sum(v > 0.25 for v in vals)
                                                                               / len(vals), 3)}


def earlier(path: Path, res: dict, ran: list[str]) -> dict:
    """The suites an earlier run in the same mode wrote to `path` and this run did not measure, with where
    each came from: an `--only` run updates its sections of the report and keeps the others."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("mode", {}).get("name") != res["mode"]["name"]:
        return {}
    kept = {k: old[k] for k in SUITES if k in old and k not in ran}
    if not kept:
        return {}
    came = old.get("earlier", {})
    kept["earlier"] = {k: came.get(k) or {"command": old.get("command"), "date": old.get("date"),
                                          "cpu": old.get("machine", {}).get("cpu")} for k in kept}
    if "models" in old and "models" not in res:
        kept["models"] = old["models"]
    return kept


def run(mode: Mode, out: str | os.PathLike = "docs", only: list[str] | None = None, keep: bool = False,
        command: str = "python -m bench", say: Callable[[str], None] | None = None) -> dict:
    import torch

    say = say or (lambda s: print(s, flush=True))
    threads = torch.get_num_threads()
    if mode.inproc and mode.threads:
        torch.set_num_threads(mode.threads)
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="mptc-bench-"))
    ctx = Ctx(mode, root, say, deadline=t_start + mode.time_limit_s)
    res: dict = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "mode": asdict(mode), "machine": machine(), "load_start": _load()}
    say(f"mptc benchmarks, {mode.name} mode; scratch {root}; load average {res['load_start']}")
    try:
        names = [n for n in SUITES if n in only] if only else [n for n in SUITES if n not in OPT_IN]
        if any(n not in ("lowering", *OPT_IN) for n in names):
            ctx.plan("prepare", ["prepare", *names])
            t0 = time.perf_counter()
            for fam in FAMILIES:
                ctx.models[fam] = prepare(fam, root, toy=mode.toy, layers=mode.layers)
            res["models"] = {f: {"title": p.title, "params": p.params, "parity_max_abs": p.parity,
                                 "spec": p.spec_text} for f, p in ctx.models.items()}
            say(f"prepared checkpoints in {time.perf_counter() - t0:.0f} s (parity "
                + ", ".join(f"{f} {p.parity:.1e}" for f, p in ctx.models.items()) + ")")
        seconds = {}
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            ctx.plan(name, names[i:])
            say(f"[{name}] load average {_load()}" + (f"; behind plan, budgets × {ctx.scale:.2f}" if ctx.scale < 1
                                                      else ""))
            res[name] = SUITES[name](ctx)
            seconds[name] = round(time.perf_counter() - t0, 1)
            say(f"[{name}] {seconds[name]:.0f} s")
        res["suite_seconds"] = seconds
    finally:
        torch.set_num_threads(threads)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    res["load"] = [res.pop("load_start"), _load()]
    res["threads"] = mode.threads or os.cpu_count()
    res["contention"] = contention(res)
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(out)
    res.update(earlier(out / "benchmarks.json", res, names))
    res["targets"] = targets(res)
    out.mkdir(parents=True, exist_ok=True)
    res["json_name"] = str(out / "benchmarks.json")
    (out / "benchmarks.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = out / "benchmarks.md"
    md.write_text(markdown(res))
    res["md_path"] = str(md)
    return res
