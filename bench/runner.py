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

from . import export, extraction, growth, inference, lowering
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
}
FAMILIES = ("gpt2", "llama")


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(mode: Mode, out: str | os.PathLike = "docs", only: list[str] | None = None, keep: bool = False,
        command: str = "python -m bench", say: Callable[[str], None] | None = None) -> dict:
    import torch

    say = say or (lambda s: print(s, flush=True))
    threads = torch.get_num_threads()
    if mode.inproc and mode.threads:
        torch.set_num_threads(mode.threads)
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="mptc-bench-"))
    ctx = Ctx(mode, root, say)
    res: dict = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "mode": asdict(mode), "machine": machine(), "load_start": _load()}
    say(f"mptc benchmarks, {mode.name} mode; scratch {root}; load average {res['load_start']}")
    try:
        names = [n for n in SUITES if not only or n in only]
        if any(n != "lowering" for n in names):
            t0 = time.perf_counter()
            for fam in FAMILIES:
                ctx.models[fam] = prepare(fam, root, toy=mode.toy, layers=mode.layers)
            res["models"] = {f: {"title": p.title, "params": p.params, "parity_max_abs": p.parity,
                                 "spec": p.spec_text} for f, p in ctx.models.items()}
            say(f"prepared checkpoints in {time.perf_counter() - t0:.0f} s (parity "
                + ", ".join(f"{f} {p.parity:.1e}" for f, p in ctx.models.items()) + ")")
        seconds = {}
        for name in names:
            t0 = time.perf_counter()
            say(f"[{name}] load average {_load()}")
            res[name] = SUITES[name](ctx)
            seconds[name] = round(time.perf_counter() - t0, 1)
            say(f"[{name}] {seconds[name]:.0f} s")
        res["suite_seconds"] = seconds
    finally:
        torch.set_num_threads(threads)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    res["load"] = [res.pop("load_start"), _load()]
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    res["targets"] = targets(res)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res["json_name"] = str(out / "benchmarks.json")
    (out / "benchmarks.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = out / "benchmarks.md"
    md.write_text(markdown(res))
    res["md_path"] = str(md)
    return res
