"""Extraction without retraining, mptc against Torch-Pruning, on a trained byte-level Llama.

    .venv/bin/python -m bench.extraction_peers                         # the run in docs/extraction.md
    .venv/bin/python -m bench.extraction_peers --model out/peer        # reuse a trained model dir
    .venv/bin/python -m bench.extraction_peers --steps 30 --quick      # a smoke run

1. Model: a Llama-style decoder (width 256, 5 layers, 8 query heads in 4 kv groups, SwiGLU 768, RMSNorm,
   RoPE, untied byte head; 4.07M parameters), trained with `mptc train --data stdlib --threads 1`.
2. Data: the standard library's .py files as one byte stream, the trainer's split. Calibration: 64 windows
   of 128 bytes from the training part (seed 0). Held-out loss: 8 × 16 windows of 129 bytes spread evenly
   over the held-out part (what `mptc train` evaluates), nats per byte.
3. Methods, every one without retraining, MLP kept at 50 % and 25 %:
   - mptc `reorder(by = weight | activation | taylor)` + `extract(mlp = F)`, each with and without
     `correct = lsq` (uniform widths);
   - mptc per-layer widths: `search_plain` (greedy on the calibration loss) on the taylor-reordered
     model, then `extract(mix = …, correct = lsq)`;
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
FASTNAS = {0.5: 1.487, 0.25: 1.625}  # ModelOpt FastNAS, per-layer widths, measured before on a 1.481 model


def train(out: Path, steps: int) -> Path:
    """Train the model with the command line, as a user would."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "peer.mpt"
    spec.write_text(SPEC)
    cmd = [sys.executable, "-m", "mptc", "train", str(spec), "--data", "stdlib", "--steps", str(steps), "--batch",
           "16", "--warmup", "30", "--lr", "3e-3", "--eval-every", str(max(1, steps // 4)), "--threads", "1",
           "--no-progress", "-o", str(out / "model"), "--force"]
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


def run(model_dir: Path, quick: bool) -> dict:
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

    reordered = {}
    for by in ("weight", "activation", "taylor"):
        reordered[by] = pipe(P.reorder(by=by, calibration=cal if by != "weight" else None))
    fracs = (0.5,) if quick else (0.5, 0.25)
    for f in fracs:
        for by in ("weight", "activation", "taylor"):
            for corr in (None, "lsq"):
                name = f"mptc {by}" + (" + lsq" if corr else "")
                add(name, f"mlp {f:g}", lambda by=by, corr=corr, f=f: pipe(
                    P.reorder(by=by, calibration=cal if by != "weight" else None),
                    P.extract(mlp=str(f), correct=corr, calibration=cal, held_out=check)))
        layer_params = mptc.summarize(sub_spec(spec, parse_choice(spec, mlp=str(f), implied=True))).params
        for by in ("activation", "taylor"):
            def per_layer(by=by, f=f, layer_params=layer_params):
                m = pipe(P.reorder(by=by, calibration=cal))
                r = plain_search(m, Budget("params", int(layer_params)), cal[:1], step=1 / 8)
                new, _ = P.Pipeline([P.extract(mix=r.mix, correct="lsq", calibration=cal, held_out=check)])(m)
                return new
            add(f"mptc {by} per-layer widths + lsq", f"mlp {f:g}", per_layer)
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
    for by in ("weight", "activation", "taylor"):
        for corr in (None, "lsq"):
            add(f"mptc {by}" + (" + lsq" if corr else ""), "kv 4→2", lambda by=by, corr=corr: pipe(
                P.reorder(by=by, what="heads", calibration=cal if by != "weight" else None),
                P.extract(kv_groups=2, correct=corr, calibration=cal, held_out=check)))
    add("mptc merge (mean of paired kv groups)", "kv 4→2", lambda: pipe(
        P.extract(kv_groups=2, merge_kv=True, held_out=check)))
    add("mptc drop_least (measured loss)", "1 layer", lambda: pipe(P.extract(drop_least=1, calibration=cal)))
    return {"model": str(model_dir), "params": sum(p.numel() for p in model.parameters()), "unpruned": round(base, 4),
            "held_out_windows": sum(len(x) for x in held), "calibration_windows": samples,
            "fastnas_measured_before": FASTNAS, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a trained model dir (default: train one)")
    p.add_argument("--steps", type=int, default=400, help="training steps when training (default 400)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "extraction_peers", help="where the model is trained")
    p.add_argument("--quick", action="store_true", help="fewer windows and fractions (a smoke run)")
    p.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "extraction" / "results.json")
    args = p.parse_args(argv)
    model = args.model or train(args.work, args.steps)
    res = run(model, args.quick)
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
