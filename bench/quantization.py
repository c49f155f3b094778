"""Quantization quality on a trained model: held-out loss and greedy agreement of `mptc deploy --weights
float32 | float16 | int8 | int4` against float32.

    .venv/bin/python -m bench.quantization                      # the table in docs/deploy.md (≈ 5 min on one core)
    .venv/bin/python -m bench.quantization --steps 40 -o /tmp/q  # a smoke run

1. Train a byte-level Llama-style model (`SPEC`: width 192, 4 layers, 6 heads, 2 KV heads, SwiGLU 512, untied;
   1.7M parameters) with `mptc train SPEC --data stdlib` (`TRAIN`, one torch thread). A checkpoint trained with
   the same command is reused.
2. Deploy it at every weight type. Until `mptc deploy` exists, and beside it as a reference: `mptc compile
   X.onnx` (float32) quantized by ONNX Runtime's own tools (`quantize_dynamic` int8; `MatMulNBitsQuantizer`
   int8 and int4, block 32, symmetric, accuracy level 0: the weights of mptc's int8/int4 bit for bit, with
   float activations, where mptc's accuracy level 4 rounds them to int8).
3. Held-out loss (nats per byte): each ONNX file in plain ONNX Runtime, teacher-forced on `WINDOWS` windows of
   the trainer's held-out bytes (the last 5 % of the stream), an empty KV cache where the graph takes one;
   cross-entropy of every next byte. The PyTorch model on the same windows checks the float32 file.
4. Greedy agreement: `PROMPTS` held-out prompts of 64 bytes, 64 greedy bytes each (the whole sequence
   recomputed every step), compared position by position with the float32 file's.
5. Speed: decode tokens/s of each deploy dir under ONNX Runtime GenAI (one thread; bench.deploy.setup_genai),
   64 new bytes after a 64-byte prompt. The model is small, so this is mostly per-step overhead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

SPEC = """\
# A byte-level Llama-style decoder (bench/quantization.py)
model byte_llama {
  vocab = 256
  context = 256
  width = 192
  embed { positions = rope(theta = 10000.0) }
  layers 4 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 6, kv_heads = 2, head_dim = 32, mask = causal, bias = false }
    mlp { hidden = 512, activation = swiglu, bias = false }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}
"""
TOY_SPEC = SPEC.replace("width = 192", "width = 64").replace("heads = 6, kv_heads = 2", "heads = 2, kv_heads = 1") \
    .replace("hidden = 512", "hidden = 128").replace("layers 4", "layers 2")
STEPS = 600
TRAIN = ["--data", "stdlib", "--batch", "16", "--seq", "128", "--warmup", "50", "--eval-every", "100",
         "--threads", "1", "--seed", "0", "--no-progress"]
WEIGHTS = ("float32", "float16", "int8", "int4")
WINDOWS, LENGTH = 64, 128
PROMPTS, PROMPT_LEN, GREEDY = 4, 64, 64
SPEED_REPS = 3  # GenAI decode runs per deploy dir (the median is reported)
WORK = ROOT / "out" / "bench-quantization"


def mptc_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mptc", *args]


def _run(argv: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(argv[2:5])} …` exited with {rc}: {' | '.join(tail)[-400:]}")
    return time.perf_counter() - t0


def train(work: Path, steps: int, toy: bool = False, say=print) -> dict:
    """Train (or reuse) the byte-level model in work/trained; the command and its log."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / ("byte-llama-toy.mpt" if toy else "byte-llama.mpt")
    spec.write_text(TOY_SPEC if toy else SPEC)
    out = work / ("trained-toy" if toy else "trained")
    argv = ["mptc", "train", str(spec.relative_to(ROOT) if spec.is_relative_to(ROOT) else spec),
            "--steps", str(steps), *TRAIN, "-o", str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)]
    stamp = work / (out.name + ".json")
    if (out / "log.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("argv") == argv:
        say(f"  reusing {out} (trained by `{' '.join(argv)}`)")
        return {**json.loads(stamp.read_text()), "reused": True}
    say(f"  training: {' '.join(argv)}")
    seconds = _run(mptc_cli(*argv[1:]), work / "log.txt")
    log = json.loads((out / "log.json").read_text())
    info = {"argv": argv, "seconds": round(seconds, 1), "dir": str(out), "final_eval": log["eval"][-1]}
    stamp.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False}


def heldout(n: int, length: int) -> np.ndarray:
    """n evenly spaced windows of the trainer's held-out bytes (the last 5 % of the stdlib stream): (n, length)."""
    from mptc.data import even_windows, read_bytes, split_tokens, stdlib_files

    _, val = split_tokens(read_bytes(stdlib_files()), 0.05)
    return even_windows(val, n, length).numpy()


# --- running an ONNX file ---------------------------------------------------------------------------------------


def session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
           "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def feeds(sess, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for a whole-sequence forward pass of `ids` (B, T): ones for the mask, positions 0..T-1, and an
    empty cache (past length 0) for every `past*` input."""
    b, t = ids.shape
    out = {}
    for i in sess.get_inputs():
        dt = _DTYPES.get(i.type, np.float32)
        if i.name == "input_ids":
            out[i.name] = ids.astype(dt)
        elif i.name == "attention_mask":
            out[i.name] = np.ones((b, t), dt)
        elif i.name == "position_ids":
            out[i.name] = np.broadcast_to(np.arange(t, dtype=dt), (b, t)).copy()
        elif i.name.startswith("past"):
            dims = [d if isinstance(d, int) else None for d in i.shape]
            sym = [k for k, d in enumerate(dims) if d is None]  # batch first, then the past length
            shape = [b if k == sym[0] else 0 if k in sym else d for k, d in enumerate(dims)]
            out[i.name] = np.zeros(shape, dt)
        else:
            raise ValueError(f"{i.name}: an input this benchmark does not know how to fill")
    return out


def logits(sess, ids: np.ndarray) -> np.ndarray:
    """Logits (B, T, V) in float32."""
    names = [o.name for o in sess.get_outputs()]
    out = sess.run([names[names.index("logits")] if "logits" in names else names[0]], feeds(sess, ids))[0]
    return out.astype(np.float32)


def nll(lg: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed cross-entropy of every next token, and how many: lg (B, T, V), ids (B, T)."""
    x = lg[:, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lse = np.log(np.exp(x).sum(-1))
    tgt = np.take_along_axis(x, ids[:, 1:, None], -1)[..., 0]
    return float((lse - tgt).sum()), tgt.size


def onnx_loss(path: str | Path, windows: np.ndarray, batch: int = 8) -> float:
    sess = session(path)
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch):
        s, k = nll(logits(sess, windows[i: i + batch]), windows[i: i + batch])
        tot, n = tot + s, n + k
    return tot / n


def torch_loss(model_dir: str | Path, windows: np.ndarray) -> float:
    import torch

    import mptc

    model = mptc.load_model(model_dir).eval()
    with torch.inference_mode():
        ids = torch.from_numpy(windows)
        lg = model(input_ids=ids, attention_mask=torch.ones_like(ids)).numpy()
    s, n = nll(lg, windows)
    return s / n


def greedy(path: str | Path, prompts: np.ndarray, new: int) -> np.ndarray:
    """`new` greedy tokens after each prompt, recomputing the whole sequence every step: (P, new)."""
    sess = session(path)
    seq = prompts.copy()
    for _ in range(new):
        nxt = logits(sess, seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None].astype(seq.dtype)], 1)
    return seq[:, prompts.shape[1]:]


def genai_speed(model_dir: Path, prompt: list[int], new: int, reps: int = SPEED_REPS) -> float | None:
    """Median decode tokens/s of `new` greedy tokens under ONNX Runtime GenAI, one thread."""
    import statistics

    from .deploy import setup_genai

    ops, _ = setup_genai(str(model_dir), prompt, new, ort_threads=1)
    runs = [ops["gen"]()["decode_tok_s"] for _ in range(reps + 1)][1:]  # the first run warms up
    return round(statistics.median(runs), 1) if all(runs) else None


# --- the candidates ---------------------------------------------------------------------------------------------


def _params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "weights.safetensors"), "np") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def onnx_file(out: Path) -> Path:
    """The decoder ONNX file of a deploy dir (genai_config.json's, or model.onnx), or `out` itself."""
    if out.is_file():
        return out
    cfg = out / "genai_config.json"
    if cfg.is_file():
        return out / json.loads(cfg.read_text())["model"]["decoder"].get("filename", "model.onnx")
    return out / "model.onnx"


def has_deploy() -> bool:
    return subprocess.run(mptc_cli("deploy", "--help"), capture_output=True).returncode == 0


def candidates(model_dir: Path, work: Path, log: Path, say=print) -> dict[str, dict]:
    """name → {"path", "command", "seconds"} for each ONNX file measured (a failed one keeps its error)."""
    out: dict[str, dict] = {}

    def make(name: str, argv: list[str], path: Path, fn=None):
        try:
            t0 = time.perf_counter()
            if fn:
                fn()
            else:
                _run(argv, log)
            out[name] = {"path": str(onnx_file(path)), "command": " ".join(["mptc", *argv[3:]]) if not fn else argv,
                         "seconds": round(time.perf_counter() - t0, 1), "bytes": weight_bytes(onnx_file(path))}
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[name] = {"error": str(e).splitlines()[-1][:300], "command": " ".join(argv) if not fn else argv}
            say(f"    {name}: failed: {out[name]['error']}")

    ref = work / "compiled.onnx"
    make("compile float32", mptc_cli("compile", str(model_dir), "-o", str(ref), "--force"), ref)
    if "error" not in out["compile float32"]:
        make("ORT quantize_dynamic int8", "onnxruntime.quantization.quantize_dynamic (MatMul, int8 per channel)",
             work / "ort-int8.onnx", lambda: _ort_int8(ref, work / "ort-int8.onnx"))
        for bits in (8, 4):  # the weights of mptc's int8/int4, bit for bit, with float activations (level 0)
            dst = work / f"ort-int{bits}-nbits.onnx"
            make(f"ORT MatMulNBits int{bits}, level 0", "onnxruntime.quantization MatMulNBitsQuantizer (block 32, "
                 "symmetric, accuracy level 0)", dst, lambda bits=bits, dst=dst: _ort_nbits(ref, dst, bits))
    if has_deploy():
        for w in WEIGHTS:
            d = work / f"deploy-{w}"
            shutil.rmtree(d, ignore_errors=True)
            make(f"mptc deploy {w}", mptc_cli("deploy", str(model_dir), "-o", str(d), "--weights", w), d)
    return out


def weight_bytes(onnx: Path) -> int:
    """The size of an ONNX file's external data (X.onnx.data), or of the file itself when it has none."""
    data = onnx.with_name(onnx.name + ".data")
    return (data if data.exists() else onnx).stat().st_size


def _ort_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=True)


def _ort_nbits(src: Path, dst: Path, bits: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=32, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


# --- the measurement ------------------------------------------------------------------------------------------


def measure(work: Path, steps: int = STEPS, toy: bool = False, say=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    trained = train(work, steps, toy, say)
    model_dir = Path(trained["dir"])
    if not model_dir.is_absolute():
        model_dir = ROOT / model_dir
    n_win, n_prompt = (8, 2) if toy else (WINDOWS, PROMPTS)
    windows = heldout(n_win, LENGTH)
    prompts = heldout(n_prompt + 1, PROMPT_LEN)[1:]  # other starts than the loss windows' first
    res = {"train": trained, "windows": [n_win, LENGTH], "prompts": [n_prompt, PROMPT_LEN, GREEDY],
           "torch_float32_loss": round(torch_loss(model_dir, windows), 5), "rows": {}, "params": _params(model_dir)}
    cands = candidates(model_dir, work, log, say)
    for name, c in cands.items():
        row = dict(c)
        if "error" not in c:
            t0 = time.perf_counter()
            row["loss"] = round(onnx_loss(c["path"], windows), 5)
            row["tokens"] = greedy(c["path"], prompts, GREEDY).tolist()
            if Path(c["path"]).with_name("genai_config.json").is_file():
                row["decode_tok_s"] = genai_speed(Path(c["path"]).parent, prompts[0].tolist(), GREEDY)
            row["eval_s"] = round(time.perf_counter() - t0, 1)
            say(f"    {name}: {row['loss']:.4f} nats/byte")
        res["rows"][name] = row
    ref = next((r for k, r in res["rows"].items() if k == "mptc deploy float32" and "loss" in r),
               res["rows"].get("compile float32"))
    for r in res["rows"].values():
        if "loss" in r and ref and "loss" in ref:
            r["delta_loss"] = round(r["loss"] - ref["loss"], 5)
            a, b = np.array(r["tokens"]), np.array(ref["tokens"])
            r["greedy_same"] = [int((a == b).sum()), int(a.size)]
    return res


def markdown(res: dict, command: str, heading: str = "## Quantization") -> list[str]:
    """The Quantization section (a table and how to reproduce it)."""
    tr = res["train"]
    ev = tr.get("final_eval", {})
    n_win, length = res["windows"]
    n_p, p_len, new = res["prompts"]
    name = f"byte_llama {res.get('params', 0) / 1e6:.1f}M" if res.get("params") else "byte_llama"
    out = [heading, "",
           f"`{name}`: a byte-level Llama-style model (bench/quantization.py) trained with `{' '.join(tr['argv'])}` "
           f"({tr['seconds']:.0f} s on one core of a busy machine; the trainer's held-out loss "
           f"{_num(ev.get('losses', {}).get('full'))} nats/byte), deployed at each weight type. Held-out loss: "
           f"teacher-forced cross-entropy of every next byte over {n_win} windows of {length} held-out bytes (the "
           "trainer's split), running each ONNX file in ONNX Runtime (the PyTorch model in float32: "
           f"{res['torch_float32_loss']:.4f}). Greedy agreement: {n_p} held-out prompts of {p_len} bytes, {new} "
           "greedy bytes each, positions equal to float32's. tokens/s: GenAI decoding, one thread, the median of "
           f"{SPEED_REPS} runs (a model this small mostly measures per-step overhead, and the machine was shared). "
           "The rows after the deploy dirs quantize `mptc compile`'s float32 file with ONNX Runtime's own tools, "
           "for reference (their size: the whole .onnx file).", ""]
    rows = []
    for label, r in sorted(res["rows"].items(), key=lambda kv: not kv[0].startswith("mptc deploy")):
        weights = label.removeprefix("mptc deploy ")
        if "error" in r:
            rows.append([name, weights, f"failed: {r['error']}", "", "", ""])
            continue
        same = r.get("greedy_same")
        delta = f" ({r['delta_loss']:+.4f})" if "delta_loss" in r else ""
        rows.append([name, weights, f"{r['bytes'] / (1 << 20):.2f} MiB", f"{r['loss']:.4f}{delta}",
                     f"{same[0]}/{same[1]}" if same else "—",
                     f"{r['decode_tok_s']:.0f}" if r.get("decode_tok_s") else "—"])
    out += ["| model | weights | size of model.onnx.data | held-out loss (Δ vs float32) | greedy agreement, "
            f"{new} tokens × {n_p} prompts | tokens/s (GenAI, CPU) |", "| --- | --- | --- | --- | --- | --- |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", "Reproduce (trains once, then reuses the checkpoint):", "", "```sh", command, "```"]
    return out


def _num(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def run(ctx) -> dict:
    """The deploy suite's part: the shipped run in full mode (its checkpoint cached in out/), a short one else."""
    toy, quick = ctx.mode.toy, ctx.mode.layers is not None
    work = ctx.root / "quantization" if toy or quick else WORK
    steps = 10 if toy else 100 if quick else STEPS
    try:
        return measure(work, steps, toy=toy, say=ctx.say)
    except Exception as e:  # noqa: BLE001 - the report says what failed
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[-1][:300] if str(e) else ''}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    ap.add_argument("--work", default=str(WORK), help="checkpoint and ONNX files (default out/bench-quantization)")
    ap.add_argument("-o", "--out", default=None, help="write quantization.json and quantization.md here")
    args = ap.parse_args(argv)
    command = ".venv/bin/python -m bench.quantization" + (f" --steps {args.steps}" if args.steps != STEPS else "")
    res = measure(Path(args.work).resolve(), args.steps)
    md = "\n".join(markdown(res, command)) + "\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quantization.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "quantization.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
