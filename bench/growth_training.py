"""Growth during training on byte-level text: a model trained from scratch vs the same model reached by growth.

    .venv/bin/python -m bench.growth_training                          # the run in docs/growth.md (writes docs/growth/)
    .venv/bin/python -m bench.growth_training --steps 40 -o /tmp/gr    # a smoke run

1. Data: the standard library's .py files as one byte stream; the last 5% is held out (the trainer's split).
2. Scratch: the final model (width 128, 4 layers of 4 heads, MLP 512, tied byte head) trained for --steps.
3. Grown: a smaller model trained with the same steps, batches (same sampler seed), warmup + cosine schedule
   and initialisation seed, grown once at --grow-at to exactly the final architecture with `mptc train`'s
   growth schedule: "width" starts at width 64, 2 heads, MLP 256 (grow_width + add_heads + grow_mlp);
   "depth" starts at 2 layers (add_layers). Each with several `init`s of the new entries.
4. Training FLOPs: forward FLOPs per token (`mptc.summarize(spec).flops_per_token`) × 3 (forward + backward)
   × tokens per step, summed over the steps with the model size in force at each step.
5. Held-out loss (nats per byte) over training from the trainer's evaluations; the FLOPs a grown run needs
   to reach the scratch run's final loss, interpolated on its eval curve.

Runs go in two processes, one torch thread each. Results: docs/growth/results.json and loss_vs_flops.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from bench.matformer import Lines, machine

ROOT = Path(__file__).resolve().parent.parent

SPEC = """model {name} {{
  vocab = 256
  context = 128
  width = {width}
  embed {{ positions = rope(theta = 10000.0) }}
  layers {layers} {{
    norm = rmsnorm(eps = 1e-6)
    attention {{ heads = {heads}, mask = causal, bias = false }}
    mlp {{ hidden = {hidden}, activation = gelu, bias = false }}
  }}
  head lm {{ norm = rmsnorm(eps = 1e-6), tied = true }}
}}
"""
FINAL = dict(width=128, layers=4, heads=4, hidden=512)
START = {  # schedule → (the starting sizes, the passes that grow it to FINAL)
    "scratch": (FINAL, ""),
    "width": (dict(width=64, layers=4, heads=2, hidden=256),
              "grow_width(width = 128, init = {init}); add_heads(n = 2, init = {init}); "
              "grow_mlp(factor = 2, init = {init})"),
    "depth": (dict(width=128, layers=2, heads=4, hidden=512), "add_layers(n = 2, at = 2, init = {init})"),
}
RUNS = ("scratch", "width/normal", "width/copy", "width/zeros", "depth/normal", "depth/copy", "width/normal/rw")


@dataclass
class Run:
    """One training run: `schedule` in START, `init` of the new entries, LR re-warmup steps after growth."""

    name: str
    schedule: str
    init: str | None
    regrow_warmup: int

    @classmethod
    def parse(cls, name: str) -> Run:
        parts = name.split("/")
        return cls(name, parts[0], parts[1] if len(parts) > 1 else None, 20 if parts[2:] == ["rw"] else 0)


def spec_text(sizes: dict, name: str) -> str:
    return SPEC.format(name=name, **sizes)


def step_flops(growth_steps: list[int], flops_per_token: list[float], tokens_per_step: int, steps: int) -> list[float]:
    """Training FLOPs of each step 1 … steps: 3 × forward FLOPs per token × tokens, with the size in force.

    A growth at step S runs after S steps, so steps 1 … S use size 0 and step S + 1 on the next size;
    `flops_per_token` holds one entry per size (len(growth_steps) + 1), `growth_steps` ascending."""
    if len(flops_per_token) != len(growth_steps) + 1:
        raise ValueError(f"{len(growth_steps)} growths need {len(growth_steps) + 1} sizes, got {len(flops_per_token)}")
    out, size = [], 0
    for k in range(1, steps + 1):
        while size < len(growth_steps) and growth_steps[size] < k:
            size += 1
        out.append(3.0 * flops_per_token[size] * tokens_per_step)
    return out


def cumulative(xs: list[float]) -> list[float]:
    """[0, x1, x1 + x2, …]: the total after 0, 1, 2, … steps."""
    out = [0.0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The FLOPs at which a (FLOPs, loss) eval curve first reaches `target` (linear between evaluations), or None."""
    for i, (f, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return f
            f0, l0 = curve[i - 1]
            return f0 + (f - f0) * (l0 - target) / (l0 - loss)
    return None


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from mptc.data import read_bytes, stdlib_files

    return read_bytes(stdlib_files())


def train_job(name: str, args: dict, t0: float) -> dict:
    """Worker: train one run; its eval curve, per-step FLOPs, growth entries and wall time."""
    import mptc
    from mptc.train import TrainConfig, Trainer

    tokens = _setup(args["threads"])
    run = Run.parse(name)
    sizes, passes = START[run.schedule]
    growth = [f"{args['grow_at']}: {passes.format(init=run.init)}"] if passes else []
    config = TrainConfig(**{**args["config"], "growth": growth, "regrow_warmup": run.regrow_warmup})
    spec = mptc.parse(spec_text(sizes, "byte_lm"))
    model = mptc.build(spec, seed=args["seed"])
    trainer = Trainer(model, tokens, config)
    lines = Lines(f"{name} s{args['seed']}", t0)
    lines.print(f"{sum(p.numel() for p in trainer.params):,} params; grow {growth or 'never'}")
    start = time.time()
    log = trainer.run(console=lines)
    seconds = time.time() - start
    final = mptc.summarize(trainer.spec)
    fpt = [mptc.summarize(spec).flops_per_token, *([final.flops_per_token] if growth else [])]
    per_step = step_flops([g["step"] for g in log["growth"]], fpt, config.batch * trainer.seq, config.steps)
    return {"name": name, "seed": args["seed"], "growth": growth, "regrow_warmup": run.regrow_warmup,
            "final_spec": str(trainer.spec), "final_params": final.params,
            "final_flops_per_token": final.flops_per_token, "flops_per_token": fpt, "step_flops": per_step,
            "eval": [{"step": e["step"], "loss": e["losses"]["full"]} for e in log["eval"]],
            "growth_log": log["growth"], "train_seconds": round(seconds, 1),
            "step_seconds": [e["seconds"] for e in log["train"]]}


def summarise(runs: list[dict]) -> dict:
    """Per run name (mean over seeds): final loss, total FLOPs, wall time, FLOPs to reach scratch's final loss."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        total = cumulative(r["step_flops"])
        r["curve"] = [(total[e["step"]], e["loss"]) for e in r["eval"]]
        by.setdefault(r["name"], []).append(r)
    scratch = {r["seed"]: r for r in by["scratch"]}
    table = {}
    for name, rs in by.items():
        reach, fracs = [], []
        for r in rs:
            ref = scratch[r["seed"]]
            f = flops_to_reach(r["curve"], ref["curve"][-1][1])
            reach.append(f)
            fracs.append(None if f is None else f / ref["curve"][-1][0])
        finals = [r["curve"][-1][1] for r in rs]
        m = sum(finals) / len(finals)
        table[name] = {
            "seeds": [r["seed"] for r in rs], "final_loss": finals, "final_loss_mean": m,
            "final_loss_sd": (sum((x - m) ** 2 for x in finals) / (len(finals) - 1)) ** 0.5 if len(rs) > 1 else None,
            "delta_vs_scratch": [r["curve"][-1][1] - scratch[r["seed"]]["curve"][-1][1] for r in rs],
            "total_flops": rs[0]["curve"][-1][0], "flops_vs_scratch": rs[0]["curve"][-1][0] / by["scratch"][0]
            ["curve"][-1][0], "wall_seconds": [r["train_seconds"] for r in rs],
            "flops_to_reach_scratch_final": reach, "fraction_of_scratch_flops": fracs,
            "scratch_flops_to_reach_this_final": [flops_to_reach(scratch[r["seed"]]["curve"], r["curve"][-1][1])
                                                  for r in rs],
            "final_params": rs[0]["final_params"]}
    return table


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    names = list(dict.fromkeys(r["name"] for r in runs))
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in runs:
        xs, ys = zip(*r["curve"][1:], strict=True)
        ax.plot(xs, ys, c=colours[r["name"]], lw=1.8 if r["name"] == "scratch" else 1.2,
                ls="-" if r["name"] == "scratch" else "--", label=r["name"] if r["seed"] == runs[0]["seed"] else None)
    ax.set_xlabel("training FLOPs (3 × forward FLOPs per token × tokens)")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title("Byte LM on stdlib: from scratch vs grown to the same final size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _g(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=1, help="K seeds (initialisation and batch order)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST … FIRST+K-1")
    p.add_argument("--grow-at", type=int, default=None, help="growth step (default: steps // 3)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-o", "--out", default=str(ROOT / "docs/growth"))
    a = p.parse_args(argv)
    from mptc.train import TrainConfig

    t0 = time.time()
    grow_at = a.steps // 3 if a.grow_at is None else a.grow_at
    config = TrainConfig(steps=a.steps, batch=a.batch, seq=a.seq, lr=a.lr, warmup=a.warmup, eval_every=a.eval_every,
                         eval_batches=a.eval_batches)
    names = [n.strip() for n in a.runs.split(",") if n.strip()]
    if "scratch" not in names:
        names.insert(0, "scratch")
    jobs = [(n, s) for s in range(a.first_seed, a.first_seed + a.seeds) for n in names]
    Lines("main", t0).print(f"{len(jobs)} runs × {a.steps} steps × batch {a.batch} × {a.seq} bytes, growth at "
                            f"step {grow_at}; {a.workers} workers × {a.threads} thread(s)")
    with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(train_job, n, {"config": asdict(config), "seed": s, "threads": a.threads,
                                              "grow_at": grow_at}, t0) for n, s in jobs]
        runs = [f.result() for f in futures]
    for r in runs:  # equal final size: every grown run ends at the scratch architecture
        assert (r["final_params"], r["final_flops_per_token"]) == (runs[0]["final_params"],
                                                                   runs[0]["final_flops_per_token"]), r["name"]
    table = summarise(runs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "loss_vs_flops.png")
    results = {"command": " ".join([".venv/bin/python -m bench.growth_training", *(argv if argv is not None
                                                                                    else sys.argv[1:])]),
               "machine": machine(), "config": asdict(config), "grow_at": grow_at, "final_spec": runs[0]["final_spec"],
               "starts": {k: {"sizes": v[0], "passes": v[1]} for k, v in START.items()}, "table": table,
               "runs": [{k: v for k, v in r.items() if k not in ("final_spec", "step_seconds")} for r in runs],
               "seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = Lines("main", t0)
    lines.print(f"{'run':18} {'final loss':>10} {'FLOPs':>9} {'wall s':>7} {'reach scratch':>14}")
    for name, t in table.items():
        fr = t["fraction_of_scratch_flops"]
        lines.print(f"{name:18} {t['final_loss_mean']:>10.4f} {t['total_flops']:>9.3g} "
                    f"{sum(t['wall_seconds']) / len(t['wall_seconds']):>7.0f} "
                    f"{', '.join('not reached' if f is None else f'{f:.2f}×' for f in fr):>14}")
    lines.print(f"wrote {out}/results.json, loss_vs_flops.png in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
