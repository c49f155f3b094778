"""MatFormer on byte-level text: one nested LM trained jointly vs its granularities trained alone.

    .venv/bin/python bench/matformer.py                       # the run in docs/matformer.md (writes docs/matformer/)
    .venv/bin/python bench/matformer.py --steps 30 --out /tmp/mf --work /tmp/mf-work   # a smoke run

1. Data: the standard library's .py files as one byte stream; the last 5% is held out.
2. Joint: examples/matlm.mpt trained with the MatFormer loss (s + m + l + xl summed each step).
3. Independent: the spec of each granularity (the extracted spec, nesting removed) trained from
   scratch with the same steps, batches (same sampler seed), schedule and initialisation seed.
4. Held-out loss of the 4 sub-models of the joint model (extracted with the verified `extract`
   pass) and of the 4 independent models, on the same fixed held-out windows.
5. Mix'n'Match: every per-layer MLP configuration of the joint model evaluated on held-out
   windows; the Pareto front of loss vs parameters; heuristic and measured picks at a few budgets.

The joint run and the four independent runs go in two processes, one torch thread each (they cost
about the same); the search is split over the same two processes. Results: docs/matformer/results.json,
front.png and curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run as a script, bench/ leads sys.path, and its modules (bench/profile.py) would shadow the standard library's
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


class Lines:
    """A console stand-in for the trainer: prefixed, flushed lines (readable in a nohup log)."""

    def __init__(self, tag: str, t0: float):
        self.tag, self.t0 = tag, t0

    def print(self, text: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s {self.tag}] {text}", flush=True)


def plain_spec(spec, choice, name: str):
    """The spec of one granularity as an ordinary model: extracted sizes, no nesting, no skippable layers."""
    from mptc.nested import sub_spec

    sub = sub_spec(spec, choice)
    layers = tuple(replace(ly, skippable=False, mlp=replace(ly.mlp, nested=None),
                           attention=replace(ly.attention, nested=None)) for ly in sub.layers)
    return sub.replace(layers=layers, name=name)


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from mptc.data import read_bytes, stdlib_files

    return read_bytes(stdlib_files())


def window_losses(model, batches, choice=None) -> list[float]:
    """Held-out loss of each window (mean over its positions); their mean is `evaluate(model, batches, choice)`."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from mptc.train import as_choice

    out: list[float] = []
    with torch.no_grad(), as_choice(model.eval(), choice):
        for x in batches:  # (B, T + 1)
            logits = model(input_ids=x[:, :-1])  # (B, T, V)
            ce = F.cross_entropy(logits.transpose(1, 2).float(), x[:, 1:], reduction="none")  # (B, T)
            out += ce.mean(1).tolist()
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over the same windows and its standard error (windows taken as independent)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return {"mean": mean, "se": (var / len(d)) ** 0.5, "windows": len(d)}


def train_job(job: str, args: dict, t0: float) -> dict:
    """Worker: train the joint model ("joint") or the four independent ones ("independent"); final evals."""
    import mptc
    from mptc.train import TrainConfig, Trainer, eval_batches, evaluate, granularities

    tokens = _setup(args["threads"])
    spec = mptc.load(args["spec"])
    config = TrainConfig(**args["config"])
    grans = granularities(spec)
    out: dict = {"job": job, "runs": {}}
    todo = [("joint", spec)] if job == "joint" else [(g, plain_spec(spec, ch, f"{spec.name}_{g}"))
                                                       for g, ch in grans.items()]
    for name, sp in todo:
        log_to = Lines(f"{job}:{name}" if job != "joint" else "joint", t0)
        model = mptc.build(sp, seed=args["seed"])
        trainer = Trainer(model, tokens, config)
        log_to.print(f"{sp.name}: {sum(p.numel() for p in trainer.params):,} params, granularities "
                     f"{', '.join(trainer.grans)}, {config.steps} steps")
        start = time.time()
        log = trainer.run(out=Path(args["work"]) / name, console=log_to)
        seconds = time.time() - start
        final = eval_batches(trainer.val_tokens, args["final_batches"], config.batch, trainer.seq)
        probe = eval_batches(trainer.val_tokens, args["search_batches"], config.batch, trainer.seq)
        run = {"spec": str(sp), "params": mptc.summarize(sp).params, "train_seconds": round(seconds, 1),
               "curve": [{"step": e["step"], **e["losses"]} for e in log["eval"]],
               "train_loss_last100": {g: sum(e["losses"][g] for e in log["train"][-100:] if g in e["losses"]) /
                                      max(1, sum(g in e["losses"] for e in log["train"][-100:]))
                                      for g in trainer.grans}}
        grans = trainer.grans.items() if name == "joint" else [("full", None)]
        run["final_windows"] = {g: window_losses(model, final, ch) for g, ch in grans}
        run["final"] = {g: sum(w) / len(w) for g, w in run["final_windows"].items()}
        run["search_set"] = {g: evaluate(model, probe, ch) for g, ch in grans}
        log_to.print(f"final held-out loss {run['final']} ({seconds:.0f} s training)")
        out["runs"][name] = run
    return out


def search_job(mixes: list[tuple[float, ...]], args: dict, t0: float) -> list[float]:
    """Worker: held-out loss of the joint model at each per-layer MLP configuration."""
    import mptc
    from mptc.data import split_tokens
    from mptc.nested import Choice
    from mptc.train import eval_batches, evaluate

    tokens = _setup(args["threads"])
    model = mptc.load_model(Path(args["work"]) / "joint").eval()
    n = model.meta["mptc.spec"].n_layers
    _, val = split_tokens(tokens, args["config"]["held_out"])
    batches = eval_batches(val, args["search_batches"], args["config"]["batch"], args["config"]["seq"])
    out = []
    for i, mlp in enumerate(mixes):
        out.append(evaluate(model, batches, Choice(mlp, (1.0,) * n)))
        if (i + 1) % 32 == 0:
            Lines("search", t0).print(f"{i + 1}/{len(mixes)} configurations")
    return out


def check_extraction(args: dict) -> dict:
    """The verified `extract` pass cuts each granularity out of the joint model; its summary equals the
    size the search uses, and the extracted model's loss equals the in-place sub-network's."""
    import mptc
    from mptc import passes as P
    from mptc.data import split_tokens
    from mptc.search import Sizer
    from mptc.train import eval_batches, evaluate, granularities

    tokens = _setup(args["threads"])
    model = mptc.load_model(Path(args["work"]) / "joint").eval()
    spec = model.meta["mptc.spec"]
    _, val = split_tokens(tokens, args["config"]["held_out"])
    batches = eval_batches(val, 2, args["config"]["batch"], args["config"]["seq"])
    sizer, out = Sizer(spec), {}
    for g, ch in granularities(spec).items():
        if ch.is_full:
            continue
        sub, report = P.Pipeline([P.extract(mlp=g)])(model)
        s = mptc.summarize(sub)
        out[g] = {"params": s.params, "flops_per_token": s.flops_per_token,
                  "sizer_agrees": (s.params, s.flops_per_token) == (sizer.point(ch.mlp).params,
                                                                     sizer.point(ch.mlp).flops),
                  "extract_max_abs_error": report.passes[0].max_abs_error_float32,
                  "loss_extracted": evaluate(sub, batches), "loss_in_place": evaluate(model, batches, ch)}
    return out


def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colours = {"s": "#1f77b4", "m": "#ff7f0e", "l": "#2ca02c", "xl": "#d62728"}
    joint = results["runs"]["joint"]["curve"]
    for g, c in colours.items():
        ax.plot([e["step"] for e in joint[1:]], [e[g] for e in joint[1:]], c=c, lw=1.5, label=f"{g} (joint)")
        ind = results["runs"][g]["curve"]
        ax.plot([e["step"] for e in ind[1:]], [e["full"] for e in ind[1:]], c=c, lw=1.2, ls="--",
                label=f"{g} (independent)")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title("MatLM on stdlib bytes: joint (MatFormer) vs independent training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(results: dict, out: Path) -> None:
    """front.png and curves.png from results.json: every configuration, the front, the uniform sub-models, the
    independent models, and the two picks under the middle budget (between m and l)."""
    from mptc import search as M

    mm = results["mix_n_match"]
    points = [M.Point(**{**q, "mlp": tuple(q["mlp"])}) for q in mm["points"]]
    n = len(points[0].mlp)
    by_mix = {q.mix: q for q in points}
    uniform = {g: by_mix[",".join([g] * n)] for g in results["granularities"]}
    mid = mm["picks"][len(mm["picks"]) // 2]
    result = M.SearchResult(M.Budget("params", mid["params_limit"]), "all", points, by_mix[mid["heuristic"]["mix"]],
                            by_mix[mid["best"]["mix"]], M.pareto(points, "params"), uniform, uniform.get("xl"))
    table = results["granularities"]
    extra = {"independent (trained alone)": [(r["params"], r["independent_search_set"]) for r in table.values()]}
    M.plot(result, out / "front.png", extra=extra,
           title=f"Mix'n'Match front ({len(points)} configurations) vs independent models")
    plot_curves(results, out / "curves.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default=str(ROOT / "examples/matlm.mpt"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation during training")
    p.add_argument("--final-batches", type=int, default=48, help="held-out batches for the final comparison")
    p.add_argument("--search-batches", type=int, default=12, help="held-out batches per Mix'n'Match configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--out", default=str(ROOT / "docs/matformer"))
    p.add_argument("--work", default=str(ROOT / "out/matformer-bench"), help="checkpoints")
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from OUT/results.json")
    a = p.parse_args(argv)
    if a.plot_only:
        render(json.loads((Path(a.out) / "results.json").read_text()), Path(a.out))
        return 0

    import mptc
    from mptc import search as M
    from mptc.train import TrainConfig, granularities

    t0 = time.time()
    spec = mptc.load(a.spec)
    config = TrainConfig(steps=a.steps, batch=a.batch, seq=a.seq, lr=a.lr, warmup=a.warmup, eval_every=a.eval_every,
                         eval_batches=a.eval_batches, seed=a.seed)
    args = {"spec": a.spec, "config": asdict(config), "seed": a.seed, "threads": a.threads, "work": a.work,
            "final_batches": a.final_batches, "search_batches": a.search_batches}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    Lines("main", t0).print(f"{spec.name}: {mptc.summarize(spec).params:,} params; {a.steps} steps × batch {a.batch} × "
                            f"{a.seq} bytes; 2 workers × {a.threads} thread(s)")
    ctx = get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        jobs = [pool.submit(train_job, job, args, t0) for job in ("joint", "independent")]
        runs = {k: v for j in jobs for k, v in j.result()["runs"].items()}
    t_train = time.time() - t0
    Lines("main", t0).print("training done; Mix'n'Match search")

    sizer = M.Sizer(spec)
    mixes = M.candidates(spec, "all")
    half = len(mixes) // 2
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        parts = [pool.submit(search_job, mixes[:half], args, t0), pool.submit(search_job, mixes[half:], args, t0)]
        extraction = pool.submit(check_extraction, args)
        losses = parts[0].result() + parts[1].result()
        extraction = extraction.result()
    points = [sizer.point(m) for m in mixes]
    for pt, loss in zip(points, losses, strict=True):
        pt.loss = loss
    whole = max(points, key=lambda q: q.params)
    uniform = {g: next(q for q in points if q.mlp == ch.mlp) for g, ch in granularities(spec).items()}
    everything = M.Budget("params", whole.params)
    result = M.SearchResult(everything, "all", points, M.heuristic_pick(points, everything),
                            min(points, key=lambda q: q.loss), M.pareto(points, "params"), uniform, whole)

    import torch

    from mptc.data import split_tokens
    from mptc.nested import Choice
    from mptc.train import eval_batches

    torch.set_num_threads(2)
    joint = mptc.load_model(Path(a.work) / "joint").eval()
    val = split_tokens(_setup(2), config.held_out)[1]
    probe = eval_batches(val, a.search_batches, a.batch, a.seq)  # the windows the search chose on
    final = eval_batches(val, a.final_batches, a.batch, a.seq)  # other windows: no selection bias
    per_window: dict = {}

    def windows_of(q, batches=probe) -> list[float]:
        key = (q.mix, len(batches))
        if key not in per_window:
            per_window[key] = window_losses(joint, batches, Choice(q.mlp, (1.0,) * spec.n_layers))
        return per_window[key]

    picks = []
    u = {g: q.params for g, q in uniform.items()}
    for label, limit in (("between s and m", (u["s"] + u["m"]) // 2), ("between m and l", (u["m"] + u["l"]) // 2),
                         ("between l and xl", (u["l"] + u["xl"]) // 2)):
        b = M.Budget("params", limit)
        under = [q for q in points if q.params <= limit]
        h, best = M.heuristic_pick(points, b), min(under, key=lambda q: q.loss)
        below = max((q for q in uniform.values() if q.params <= limit), key=lambda q: q.params)
        picks.append({"budget": label, "params_limit": limit, "heuristic": asdict(h), "best": asdict(best),
                      "uniform_below": asdict(below), "candidates": len(under),
                      "heuristic_minus_best": paired(windows_of(h), windows_of(best)),
                      "uniform_below_minus_heuristic": paired(windows_of(below), windows_of(h)),
                      "on_final_windows": {  # re-measured where the search did not choose
                          "heuristic": mean(windows_of(h, final)),
                          "best": mean(windows_of(best, final)),
                          "uniform_below": mean(windows_of(below, final)),
                          "heuristic_minus_best": paired(windows_of(h, final), windows_of(best, final)),
                          "uniform_below_minus_heuristic": paired(windows_of(below, final), windows_of(h, final))}})

    table = {}
    for g, q in uniform.items():
        j, i = runs["joint"]["final"][g], runs[g]["final"]["full"]
        table[g] = {"params": q.params, "flops_per_token": q.flops, "joint_extracted": j, "independent": i,
                    "delta": j - i, "delta_paired": paired(runs["joint"]["final_windows"][g],
                                                           runs[g]["final_windows"]["full"]),
                    "independent_params": runs[g]["params"],
                    "joint_search_set": runs["joint"]["search_set"][g], "independent_search_set":
                    runs[g]["search_set"]["full"]}
    results = {
        "command": " ".join([".venv/bin/python", "bench/matformer.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "config": asdict(config), "spec": str(spec),
        "held_out": {"fraction": config.held_out, "final_windows": a.final_batches * a.batch,
                     "search_windows": a.search_batches * a.batch, "window": a.seq + 1},
        "granularities": table, "extraction": extraction,
        "mix_n_match": {"configurations": len(points), "front": [asdict(q) for q in result.front], "picks": picks,
                        "points": [asdict(q) for q in points]},
        "runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("spec", "final_windows")} for k, v in runs.items()},
        "seconds": {"training": round(t_train, 1), "total": None},
    }
    for g, q in uniform.items():  # the search re-measures the uniform sub-models on its own windows
        assert abs(q.loss - runs["joint"]["search_set"][g]) < 1e-5, (g, q.loss, runs["joint"]["search_set"][g])
    render(results, out)
    results["seconds"]["total"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = Lines("main", t0)
    lines.print(f"{'':4} {'params':>9} {'joint':>8} {'indep':>8} {'delta':>8} {'± se':>7}")
    for g, r in table.items():
        lines.print(f"{g:4} {r['params']:>9,} {r['joint_extracted']:>8.4f} {r['independent']:>8.4f} "
                    f"{r['delta']:>+8.4f} {r['delta_paired']['se']:>7.4f}")
    for pk in picks:
        d, f = pk["heuristic_minus_best"], pk["on_final_windows"]["heuristic_minus_best"]
        lines.print(f"budget {pk['budget']}: heuristic {pk['heuristic']['mix']} {pk['heuristic']['loss']:.4f}, best "
                    f"{pk['best']['mix']} {pk['best']['loss']:.4f} (difference {d['mean']:+.4f} ± {d['se']:.4f}; on "
                    f"the final windows {f['mean']:+.4f} ± {f['se']:.4f})")
    lines.print(f"front: {len(result.front)} of {len(points)} configurations; wrote {out}/results.json, front.png, "
                f"curves.png in {results['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
