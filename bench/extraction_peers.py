"""Extraction without retraining, mptc against Torch-Pruning and ModelOpt FastNAS, on a trained byte-level Llama.

    .venv/bin/python -m bench.extraction_peers                         # the run in docs/extraction.md
    .venv/bin/python -m bench.extraction_peers --model out/peer        # reuse a trained model dir
    .venv/bin/python -m bench.extraction_peers --steps 30 --quick      # a smoke run
    .venv/bin/python -m bench.extraction_peers --model DIR --core      # only the MLP rows compared with the peers

1. Model: a Llama-style decoder (width 256, 5 layers, 8 query heads in 4 kv groups, SwiGLU 768, RMSNorm,
   RoPE, untied byte head; 4.07M parameters), trained with `mptc train --data stdlib --threads 1`: the
   2000-step schedule stopped at step 1100 (`--stop-at`), where the held-out loss is ≈1.48.
2. Data: the standard library's .py files as one byte stream, the trainer's split. Calibration: 64 windows
   of 128 bytes from the training part (seed 0). Held-out loss: 8 × 16 windows of 129 bytes spread evenly
   over the held-out part (what `mptc train` evaluates), nats per byte.
3. Methods, every one without retraining, MLP kept at 50 % and 25 %:
   - mptc `reorder(by = weight | activation | taylor)` + `extract(mlp = F)`, each with and without
     `correct = lsq` (uniform widths);
   - mptc per-layer widths: `plain_search` (greedy on the calibration loss) on the activation- or
     taylor-reordered model, then `extract(mix = …, correct = lsq)`; and with the refit inside the search
     (`refit_ridge = 1e-3`: each candidate measured with its cut projection refit, the kept cuts refit);
   - ModelOpt FastNAS (`mtp.prune(mode = "fastnas")`, per-layer MLP widths, in .venv-modelopt, made by
     scripts/modelopt-env.sh; skipped with a note without it): the uniform cut's parameter count as its
     constraint, the loss on 16 held-out windows (the correction's check windows) as its score;
   - Torch-Pruning's Taylor (`GroupTaylorImportance`, uniform widths) on the same weights loaded into
     transformers' LlamaForCausalLM, MLP groups pruned through its DependencyGraph.
   kv groups halved (4 → 2, with their query heads): reorder by each score + `extract(kv_groups = 2)`,
   with and without the attention-output refit, and `extract(kv_groups = 2, merge_kv = true)` (every query
   head kept, the k/v projections of paired groups averaged). One layer left out: `extract(drop_least = 1)`.
4. Each method's wall time (one torch thread) and peak resident memory above the loaded model (sampled).

Results: docs/extraction/results.json (and the table printed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPEC = """# A byte-level Llama-style decoder of about 4M parameters (GQA 2:1, SwiGLU, RMSNorm, RoPE).
model peer_llama {
  vocab = 256
  context = 128
  width = 256
  embed { positions = rope(theta = 10000.0) }
  layers 5 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 8, kv_heads = 4, mask = causal, bias = false }
    mlp { hidden = 768, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}
"""
STOP_AT = 1100  # of the 2000-step schedule: the step where the held-out loss reaches ≈1.48
FASTNAS = {0.5: 1.487, 0.25: 1.625}  # ModelOpt FastNAS, per-layer widths, measured before on a 1.481 model


def train(out: Path, steps: int, stop_at: int | None = None) -> Path:
    """Train the model with the command line, as a user would (to `stop_at` of a `steps`-step schedule)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "peer.mpt"
    spec.write_text(SPEC)
    cmd = [sys.executable, "-m", "mptc", "train", str(spec), "--data", "stdlib", "--steps", str(steps), "--batch",
           "16", "--warmup", "30", "--lr", "3e-3", "--eval-every", str(max(1, steps // 4)), "--threads", "1",
           "--no-progress", "-o", str(out / "model"), "--force"]
    if stop_at and stop_at < steps:
        cmd += ["--stop-at", str(stop_at)]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return out / "model"


@contextmanager
def peak_rss(into: dict):
    """The peak resident memory above the level at entry (MiB), sampled every 5 ms."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    base, peak, stop = rss(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stop.set()
        t.join()
        into["seconds"] = round(time.perf_counter() - t0, 2)
        into["peak_mib"] = round(max(0, max(peak[0], rss()) - base) / 2**20, 1)


def hf_llama(model):
    """The same weights in transformers' LlamaForCausalLM (the layouts agree: rotate-half RoPE, silu(gate)·up)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import mptc

    spec = mptc.spec_of(model)
    a, ly = spec.layers[0].attention, spec.layers[0]
    cfg = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.width, intermediate_size=ly.mlp.hidden,
                      num_hidden_layers=spec.n_layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=ly.norm.eps, rope_theta=spec.embed.positions.theta,
                      max_position_embeddings=spec.context, tie_word_embeddings=False, attention_bias=False,
                      mlp_bias=False)
    hf = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": "embed.tokens.weight", "model.norm.weight": "head.norm.weight",
          "lm_head.weight": "head.out.weight"}
    for i in range(spec.n_layers):
        for theirs, ours in (("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"),
                             ("self_attn.v_proj", "attn.v"), ("self_attn.o_proj", "attn.o"),
                             ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"), ("mlp.down_proj", "mlp.down")):
            sd[f"model.layers.{i}.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
        sd[f"model.layers.{i}.input_layernorm.weight"] = f"layers.{i}.attn_norm.weight"
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = f"layers.{i}.mlp_norm.weight"
    ours = dict(model.named_parameters())
    hf.load_state_dict({k: ours[v].detach().clone() for k, v in sd.items()}, strict=True)
    ids = torch.randint(0, spec.vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (hf(input_ids=ids).logits - model(input_ids=ids)).abs().max().item()
    assert err < 1e-4, f"the transformers copy differs from the mptc model by {err}"
    return hf


def hf_loss(hf, batches) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        losses = [F.cross_entropy(hf(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).item()
                  for x in batches]
    return sum(losses) / len(losses)


def torch_pruning_taylor(model, cal, keep: float):
    """Torch-Pruning's Taylor importance on the MLP groups, uniform widths: the transformers copy, with the
    next-token loss's gradients on the calibration batches, each layer's gate/up/down group pruned to `keep`."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    hf = hf_llama(model)
    ex = cal[0]["input_ids"][:1]
    dg = tp.DependencyGraph().build_dependency(hf, example_inputs={"input_ids": ex},
                                               output_transform=lambda out: out.logits)
    imp = tp.importance.GroupTaylorImportance()
    hf.zero_grad()
    for b in cal:
        ids = b["input_ids"]
        F.cross_entropy(hf(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for layer in hf.model.layers:
        n = layer.mlp.gate_proj.out_features
        group = dg.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(range(n)))
        score = imp(group)
        drop = torch.argsort(score)[: n - round(n * keep)].tolist()
        dg.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=drop).prune()
    hf.zero_grad()
    return hf, importlib.metadata.version("torch-pruning")


MODELOPT_PY = ROOT / ".venv-modelopt" / "bin" / "python"  # scripts/modelopt-env.sh makes it


def fastnas(model, cal, check, held, budgets: dict[float, int], work: Path) -> list[dict]:
    """ModelOpt FastNAS on the transformers copy, in .venv-modelopt (a subprocess): per-layer MLP widths
    searched under a parameter budget (the uniform cut's), its score the loss on the first 16 `check` windows
    (held-out, as mptc's search scores 16 calibration windows). One row per budget."""
    import torch

    if not MODELOPT_PY.exists():
        note = "not installed: run scripts/modelopt-env.sh"
        return [{"method": "ModelOpt FastNAS", "cut": f"mlp {f:g}", "error": note} for f in budgets]
    work.mkdir(parents=True, exist_ok=True)
    hf_llama(model).save_pretrained(work / "hf")
    ids = lambda bs: [b["input_ids"] for b in bs]  # noqa: E731
    torch.save({"cal": ids(cal), "check": ids(check), "held": list(held), "budgets": budgets}, work / "data.pt")
    subprocess.run([str(MODELOPT_PY), "-m", "bench.extraction_peers", "--fastnas-worker", str(work)], check=True,
                   cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads((work / "fastnas.json").read_text())


def fastnas_worker(work: Path) -> None:
    """In .venv-modelopt: `mtn`'s FastNAS (`mtp.prune(mode="fastnas")`) at each budget; writes fastnas.json."""
    import warnings

    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    warnings.filterwarnings("ignore")
    import modelopt.torch.prune as mtp

    torch.set_num_threads(1)
    d = torch.load(work / "data.pt")
    version = importlib.metadata.version("nvidia-modelopt")

    def loss(m, batches) -> float:
        with torch.no_grad():
            return sum(F.cross_entropy(m(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).item()
                       for x in batches) / len(batches)

    rows = []
    for f, params in d["budgets"].items():
        hf = LlamaForCausalLM.from_pretrained(work / "hf").eval()
        r = {"method": "ModelOpt FastNAS", "cut": f"mlp {f:g}", "version": version}
        with peak_rss(r):
            sub, _ = mtp.prune(hf, mode="fastnas", constraints={"params": params}, dummy_input=d["cal"][0][:1],
                               config={"data_loader": d["cal"], "score_func": lambda m: -loss(m, d["check"][:1]),
                                       "verbose": False})
        r["loss"] = round(loss(sub, d["held"]), 4)
        r["params"] = sum(p.numel() for p in sub.parameters())
        r["widths"] = [ly.mlp.gate_proj.out_features for ly in sub.model.layers]
        rows.append(r)
        print(f"{'ModelOpt ' + version + ' FastNAS':44s} {r['cut']:10s} loss {r['loss']:.4f}  {r['params']:>9,} "
              f"params  {r['seconds']:6.1f} s  {r['peak_mib']:6.1f} MiB  widths {r['widths']}", flush=True)
    (work / "fastnas.json").write_text(json.dumps(rows))


def run(model_dir: Path, quick: bool, work: Path, core: bool = False) -> dict:
    import torch

    import mptc
    from mptc import passes as P
    from mptc.choice import parse_choice, sub_spec
    from mptc.data import read_tokens, resolve_sources, split_tokens
    from mptc.passes.scores import read_calibration
    from mptc.search import Budget, plain_search
    from mptc.train import eval_batches, evaluate

    torch.set_num_threads(1)
    model = mptc.load_model(model_dir).eval()
    spec = mptc.spec_of(model)
    _, val = split_tokens(read_tokens(resolve_sources(["stdlib"])))
    held = eval_batches(val, 2 if quick else 8, 16, 128)
    samples = 16 if quick else 64
    cal = read_calibration(model, ["stdlib"], samples, 0).batches
    check = read_calibration(model, ["stdlib"], samples, 0, part="held_out").batches
    base = evaluate(model, held)
    rows = []

    def add(method: str, what: str, fn):
        r = {"method": method, "cut": what}
        try:
            with peak_rss(r):
                out = fn()
        except mptc.MptcError as e:  # a check refused the result: say so in the table
            r["error"] = e.message
            rows.append(r)
            print(f"{method:44s} {what:10s} refused: {e.message}", flush=True)
            return None
        sub = out[0] if isinstance(out, tuple) else out
        r["loss"] = round(out[1] if isinstance(out, tuple) else evaluate(sub, held), 4)
        r["params"] = sum(p.numel() for p in sub.parameters())
        rows.append(r)
        print(f"{method:44s} {what:10s} loss {r['loss']:.4f}  {r['params']:>9,} params  {r['seconds']:6.1f} s  "
              f"{r['peak_mib']:6.1f} MiB", flush=True)
        return sub

    def pipe(*passes):
        return P.Pipeline(list(passes))(model)[0]

    scores = ("taylor",) if core else ("weight", "activation", "taylor")
    reordered = {}
    for by in scores:
        reordered[by] = pipe(P.reorder(by=by, calibration=cal if by != "weight" else None))
    fracs = (0.5,) if quick else (0.5, 0.25)
    budgets: dict[float, int] = {}  # MLP fraction → the parameters of the uniform cut (FastNAS's budget)
    widths: dict[str, list[int]] = {}  # the per-layer MLP units the last search chose
    for f in fracs:
        for by in scores:
            for corr in (None, "lsq"):
                name = f"mptc {by}" + (" + lsq" if corr else "")
                add(name, f"mlp {f:g}", lambda by=by, corr=corr, f=f: pipe(
                    P.reorder(by=by, calibration=cal if by != "weight" else None),
                    P.extract(mlp=str(f), correct=corr, calibration=cal, held_out=check)))
        layer_params = mptc.summarize(sub_spec(spec, parse_choice(spec, mlp=str(f), implied=True))).params
        for by, ridge in (("activation", None), ("taylor", None), ("taylor", 1e-3))[core:]:
            def per_layer(by=by, f=f, layer_params=layer_params, ridge=ridge):
                m = pipe(P.reorder(by=by, calibration=cal))
                r = plain_search(m, Budget("params", int(layer_params)), cal[:1], step=1 / 8, refit_ridge=ridge)
                new, _ = P.Pipeline([P.extract(mix=r.mix, correct="lsq", calibration=cal, held_out=check)])(m)
                widths["last"] = list(r.units)
                return new
            if add(f"mptc {by} per-layer widths" + (", refit in search," if ridge else "") + " + lsq", f"mlp {f:g}",
                   per_layer) is not None:
                rows[-1]["widths"] = widths.pop("last")
        try:
            hf_rows = {}
            r = {"method": "Torch-Pruning Taylor", "cut": f"mlp {f:g}"}
            with peak_rss(r):
                hf, version = torch_pruning_taylor(model, cal, f)
            r["loss"] = round(hf_loss(hf, held), 4)
            r["params"] = sum(p.numel() for p in hf.parameters())
            r["version"] = version
            rows.append(r)
            hf_rows[f] = r
            print(f"{'Torch-Pruning ' + version + ' Taylor':44s} {'mlp ' + format(f, 'g'):10s} loss {r['loss']:.4f}  "
                  f"{r['params']:>9,} params  {r['seconds']:6.1f} s  {r['peak_mib']:6.1f} MiB", flush=True)
        except ImportError as e:
            rows.append({"method": "Torch-Pruning Taylor", "cut": f"mlp {f:g}", "error": f"not installed: {e}"})
        budgets[f] = int(layer_params)
    fn = fastnas(model, cal, check, held, budgets, work / "fastnas")
    rows += fn
    budget_of = {f"mlp {f:g}": n for f, n in budgets.items()}
    for r in fn:  # where FastNAS's search lands under its budget: mptc's search at the size FastNAS reached
        if "params" in r and r["params"] < budget_of[r["cut"]]:
            def at_fastnas(n=r["params"]):
                m = reordered["taylor"]
                s = plain_search(m, Budget("params", n), cal[:1], step=1 / 8, refit_ridge=1e-3)
                widths["last"] = list(s.units)
                return P.Pipeline([P.extract(mix=s.mix, correct="lsq", calibration=cal, held_out=check)])(m)[0]
            if add("mptc taylor per-layer widths, refit in search, + lsq (FastNAS's size)", r["cut"],
                   at_fastnas) is not None:
                rows[-1]["widths"] = widths.pop("last")
    for by in () if core else ("weight", "activation", "taylor"):
        for corr in (None, "lsq"):
            add(f"mptc {by}" + (" + lsq" if corr else ""), "kv 4→2", lambda by=by, corr=corr: pipe(
                P.reorder(by=by, what="heads", calibration=cal if by != "weight" else None),
                P.extract(kv_groups=2, correct=corr, calibration=cal, held_out=check)))
    if not core:
        add("mptc merge (mean of paired kv groups)", "kv 4→2", lambda: pipe(
            P.extract(kv_groups=2, merge_kv=True, held_out=check)))
        add("mptc drop_least (measured loss)", "1 layer", lambda: pipe(P.extract(drop_least=1, calibration=cal)))
    log = Path(model_dir) / "log.json"  # the trainer's held-out curve, where the dir has it
    curve = {e["step"]: round(next(iter(e["losses"].values())), 4) for e in json.loads(log.read_text())["eval"]} \
        if log.exists() else {}
    return {"model": str(model_dir), "params": sum(p.numel() for p in model.parameters()), "unpruned": round(base, 4),
            "held_out_curve": curve,
            "held_out_windows": sum(len(x) for x in held), "calibration_windows": samples,
            "fastnas_measured_before": FASTNAS, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a trained model dir (default: train one)")
    p.add_argument("--steps", type=int, default=2000, help="training steps when training (default 2000)")
    p.add_argument("--stop-at", type=int, default=STOP_AT, help="stop the training after this step; the schedule "
                   f"still spans --steps (default {STOP_AT}: held-out ≈1.48, FastNAS's published base); 0: run it all")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "extraction_peers", help="where the model is trained")
    p.add_argument("--quick", action="store_true", help="fewer windows and fractions (a smoke run)")
    p.add_argument("--core", action="store_true", help="only the MLP rows the comparison rests on: taylor (+ lsq), "
                   "per-layer widths, Torch-Pruning, FastNAS")
    p.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "extraction" / "results.json")
    p.add_argument("--fastnas-worker", type=Path, help=argparse.SUPPRESS)  # in .venv-modelopt, see `fastnas`
    args = p.parse_args(argv)
    if args.fastnas_worker:
        fastnas_worker(args.fastnas_worker)
        return 0
    model = args.model or train(args.work, args.steps, args.stop_at)
    res = run(model, args.quick, args.work, args.core)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    print(f"wrote {args.output}")
    return 0


def markdown(res: dict) -> str:
    """The rows as the table in docs/extraction.md: loss, its increase over the unpruned model, size, time, memory."""
    lines = ["| cut | method | held-out loss | Δ vs unpruned | params | time (s) | peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "loss" not in r:
            lines.append(f"| {r['cut']} | {r['method']} | {r.get('error', '-')} | | | | |")
            continue
        lines.append(f"| {r['cut']} | {r['method']} | {r['loss']:.4f} | {r['loss'] - res['unpruned']:+.4f} | "
                     f"{r['params']:,} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
