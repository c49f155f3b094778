"""Deployment: greedy decoding of a Llama-style decoder under ONNX Runtime GenAI, mptc's `mptc deploy` against
the ONNX Runtime GenAI model builder on the same Hugging Face checkpoint.

    .venv/bin/python -m bench --only deploy --threads 1          # 124M model (docs/benchmarks.md, Deployment)
    .venv/bin/python -m bench --only deploy --quick --out /tmp/b  # 2 layers, width 256: a few minutes

1. Model: a `transformers.LlamaConfig` (width 768, 12 layers, 12 heads, 4 KV heads, SwiGLU 2048, vocab 32000,
   untied: 124M parameters) with random weights drawn wider than the default (`INIT_STD`): at the default 0.02
   greedy decoding collapses onto one repeated token, which any two implementations agree on; at 0.05 the
   tokens vary and depend on the whole context. `save_pretrained` with a word-level tokenizer (the builder
   copies one).
2. Emission, each command in its own process started after a sync (peak resident set from `os.wait4`, wall
   time), in interleaved rounds: the builder
   (`python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32|int4 -e cpu`) against
   `mptc deploy` (genai fp32, portable fp32, genai int4) from the `mptc import-hf` model dir; and
   `mptc compile DIR -o X.onnx` against the traced export (`TRACED_EXPORT`).
3. Decoding, one worker process per candidate, interleaved rounds: a `PROMPT`-token prompt (prefill: the time
   until the first new token's logits), then `NEW` greedy tokens (decode tokens/s over the steps after the
   first). GenAI models run `og.Generator`; transformers runs `generate(do_sample=False)` with its cache
   (times from a streamer); mptc's plain ONNX file (`mptc compile`) runs a loop without a cache that
   recomputes the whole sequence every step (a reference row: fewer new tokens).
4. Greedy tokens of every candidate are compared with the builder's (fp32 with fp32, int4 with int4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import Ctx
from .harness import MIN_CLEAN, Stats, Worker, close_all, interleave, start_all

INIT_STD = 0.05  # transformers' initializer_range (default 0.02)
EOS = 2


@dataclass(frozen=True)
class Size:
    width: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    vocab: int
    prompt: int  # prompt tokens (prefill)
    new: int  # greedy tokens generated
    naive_new: int  # tokens the cache-less reference loop generates
    reps: int  # timed decode rounds
    emit_reps: int  # timed emission rounds
    only: tuple[str, ...] | None = None  # emit only these (the smoke test's toy run), else everything


SIZES = {
    "full": Size(768, 12, 12, 4, 2048, 32000, 128, 128, 16, 5, 3),
    "quick": Size(256, 2, 4, 2, 704, 8000, 32, 32, 8, 3, 1),
    "toy": Size(64, 2, 4, 2, 128, 512, 16, 16, 4, 1, 1, only=("builder_fp32", "compile_direct", "mptc_genai_fp32")),
}

# the traced export (torch.export + the dynamo ONNX exporter), forced past the direct emitter
TRACED_EXPORT = ("import sys, mptc, mptc.export as E\n"
                 "assert hasattr(E, '_direct'), 'mptc.export has no _direct switch to force the traced export'\n"
                 "E._direct = lambda *a, **k: False\n"
                 "E.export_onnx(mptc.load_model(sys.argv[1]), sys.argv[2])")
# a process that only imports what `mptc deploy` and the builder import: the floor under their peak memory
IMPORTS = "import torch, onnx, onnxruntime, transformers, mptc.cli, mptc.emit"
# what mptc's own commands import from a model dir (no torch): their floor
IMPORTS_MPTC = "import mptc.cli, mptc.emit.fast, mptc.deploy"


# --- the checkpoint ---------------------------------------------------------------------------------------


def prepare_hf(path: Path, size: Size, seed: int = 0) -> dict:
    """A random-weight Llama checkpoint with a word-level tokenizer (`tN` is token N) in `path`."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = T.LlamaConfig(vocab_size=size.vocab, hidden_size=size.width, intermediate_size=size.hidden,
                        num_hidden_layers=size.layers, num_attention_heads=size.heads,
                        num_key_value_heads=size.kv_heads, head_dim=size.width // size.heads,
                        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=EOS, pad_token_id=0, initializer_range=INIT_STD,
                        architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size.vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token=f"t{EOS}",
                              pad_token="t0").save_pretrained(str(path))
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "weight_bytes": 4 * params, "config": cfg.to_diff_dict()}


def prompt_ids(size: Size, seed: int = 0) -> list[int]:
    import numpy as np

    return [int(x) for x in np.random.default_rng(seed).integers(3, size.vocab, size.prompt)]


# --- emission: one process per command ------------------------------------------------------------------------


def dir_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


# Forks and execs argv[2:], then writes the child's peak resident set (KiB) to argv[1]. A child's ru_maxrss
# counts the memory image it was forked from (before exec), so the fork happens in this small interpreter
# rather than in the benchmark process, which holds hundreds of MiB.
LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: list[str], out: str, log: str, threads: int | None = None) -> dict:
    """Run `argv` (which writes `out`, removed first) in its own process, after a sync: wall seconds, its peak
    resident set (`ru_maxrss`, through `LAUNCH`) and the bytes written."""
    p = Path(out)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    for side in (Path(out + ".data"),):
        side.unlink(missing_ok=True)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        os.sync()  # the previous command's unwritten pages would slow this one's writes (0.3-0.6 s for 500 MB)
        t0 = time.perf_counter()
        rss = Path(log).with_suffix(".rss")
        rc = subprocess.run([sys.executable, "-S", "-c", LAUNCH, str(rss), *argv], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
        wall = time.perf_counter() - t0
    if rc:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{argv[2] if len(argv) > 2 else argv[0]} exited with {rc}: {' | '.join(tail)[-300:]}")
    return {"wall_s": wall, "peak_rss": int(rss.read_text()) * 1024, "bytes": dir_bytes(out)}


def setup_emit(cmds: dict[str, tuple[list[str], str]], log_path: str, emit_threads: int | None = None):
    """Ops that each run one emission command (`name → (argv, output path)`)."""
    def op(argv, out):
        return lambda: run_measured(argv, out, log_path, emit_threads)

    return {k: op(*v) for k, v in cmds.items()}, {}


def mptc_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mptc", *args]


def has_deploy() -> bool:
    """Whether this mptc has `mptc deploy`."""
    r = subprocess.run(mptc_cli("deploy", "--help"), capture_output=True, text=True)
    return r.returncode == 0


def emission_cmds(root: Path, hf: Path, mdir: Path, size: Size, deploy: bool) -> dict[str, tuple[list[str], str]]:
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-e", "cpu",
               "-c", str(root / "builder-cache")]
    cmds = {
        "builder_fp32": ([*builder, "-o", str(root / "builder_fp32"), "-p", "fp32"], str(root / "builder_fp32")),
        "builder_int4": ([*builder, "-o", str(root / "builder_int4"), "-p", "int4"], str(root / "builder_int4")),
        "compile_direct": (mptc_cli("compile", str(mdir), "-o", str(root / "direct.onnx")), str(root / "direct.onnx")),
        "export_traced": ([sys.executable, "-c", TRACED_EXPORT, str(mdir), str(root / "traced.onnx")],
                          str(root / "traced.onnx")),
        "imports": ([sys.executable, "-c", IMPORTS], str(root / "imports.none")),
        "imports_mptc": ([sys.executable, "-c", IMPORTS_MPTC], str(root / "imports_mptc.none")),
    }
    if deploy:
        length = str(size.prompt + size.new)
        for name, runtime, weights in DEPLOYS:
            out = str(root / name)
            cmds[name] = (mptc_cli("deploy", str(mdir), "-o", out, "--runtime", runtime, "--weights", weights,
                                   "--max-length", length), out)
    return cmds


DEPLOYS = (("mptc_genai_fp32", "genai", "float32"), ("mptc_portable_fp32", "portable", "float32"),
           ("mptc_genai_int4", "genai", "int4"))


# --- decoding: worker setups -------------------------------------------------------------------------------------


def _result(t0: float, t1: float, t2: float, tokens: list[int]) -> dict:
    """Prefill = t0 → t1 (the first new token's logits), decode = t1 → t2 (the steps after the first token)."""
    steps = len(tokens) - 1
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "steps": steps,
            "decode_tok_s": steps / (t2 - t1) if t2 > t1 else None, "tokens": tokens}


def setup_genai(model_dir: str, prompt: list[int], new: int, ort_threads: int | None = None):
    """ONNX Runtime GenAI: `og.Generator`, greedy, eos masked until `new` tokens are out."""
    import numpy as np
    import onnxruntime_genai as og

    cfg = og.Config(model_dir)
    if ort_threads:
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": ort_threads,
                                                                            "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    ids = np.array(prompt, dtype=np.int32)
    length = len(prompt) + new

    def op():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.get_logits()
        t1 = time.perf_counter()
        for _ in range(new):
            gen.generate_next_token()
        t2 = time.perf_counter()
        return _result(t0, t1, t2, [int(x) for x in gen.get_sequence(0)[len(prompt):]])

    return {"gen": op}, {"runtime": "onnxruntime-genai", "onnx": op_counts(Path(model_dir) / _genai_file(model_dir))}


def _genai_file(model_dir: str) -> str:
    cfg = json.loads((Path(model_dir) / "genai_config.json").read_text())
    return cfg["model"]["decoder"].get("filename", "model.onnx")


def setup_hf(hf_dir: str, prompt: list[int], new: int):
    """transformers `generate(do_sample=False)` with its KV cache; a streamer stamps each token."""
    import torch
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    class Stamps(T.generation.BaseStreamer):
        def __init__(self):
            self.t: list[float] = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            self.t.append(time.perf_counter())

    def op():
        s = Stamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, streamer=s, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        top = torch.stack(out.scores)[:, 0].topk(2, -1).values  # (new, 2): the two largest logits per step
        res = _result(t0, s.t[1], s.t[-1], out.sequences[0, len(prompt):].tolist())  # t[0]: prompt, t[1]: 1st token
        return {**res, "min_margin": float((top[:, 0] - top[:, 1]).min())}

    return {"gen": op}, {"runtime": f"transformers {T.__version__}", "attn": model.config._attn_implementation}


def ort_session(path: str, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def setup_naive(onnx_path: str, prompt: list[int], new: int, ort_threads: int | None = None):
    """Plain ONNX Runtime on a cache-less ONNX file: the whole sequence again for every token (eos masked)."""
    import numpy as np

    sess = ort_session(onnx_path, ort_threads)

    def step(seq):
        ids = np.array([seq], dtype=np.int64)
        logits = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0, -1]
        logits[EOS] = -np.inf
        return int(logits.argmax())

    def op():
        seq = list(prompt)
        t0 = time.perf_counter()
        seq.append(step(seq))
        t1 = time.perf_counter()
        for _ in range(new - 1):
            seq.append(step(seq))
        return _result(t0, t1, time.perf_counter(), seq[len(prompt):])

    return {"gen": op}, {"runtime": "onnxruntime, no cache", "onnx": op_counts(onnx_path)}


def op_counts(path: str | Path) -> dict:
    """Node count by op type (domain-qualified outside the default domain) of an ONNX file's main graph."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in m.graph.node)
    return {"nodes": sum(c.values()), "ops": dict(c.most_common())}


# --- the suite ------------------------------------------------------------------------------------------------------


def _pairs(a: Stats, b: Stats, key: str) -> list[float]:
    """Per round, a's `key` / b's: over the rounds both began on a quiet machine when there are enough of them
    (as `harness.ratio` does for times)."""
    rounds = list(zip(a.infos, b.infos, a.clean(), b.clean(), strict=False))
    ok = [(x, y) for x, y, ca, cb in rounds if ca and cb]
    use = ok if len(ok) >= MIN_CLEAN else [(x, y) for x, y, _, _ in rounds]
    return [x[key] / y[key] for x, y in use if x.get(key) and y.get(key)]


def _median(xs: list[float]) -> float | None:
    import statistics

    return round(statistics.median(xs), 4) if xs else None


def _quartiles(xs: list[float]) -> list[float] | None:
    import statistics

    if len(xs) < 4:
        return None
    q = statistics.quantiles(xs, n=4)
    return [round(q[0], 4), round(q[2], 4)]


def agreement(a: list[int] | None, b: list[int] | None) -> dict | None:
    """How many leading tokens two greedy sequences share, and how many positions agree."""
    if not a or not b:
        return None
    n = min(len(a), len(b))
    lead = next((i for i in range(n) if a[i] != b[i]), n)
    return {"leading": lead, "same": sum(x == y for x, y in zip(a, b, strict=False)), "of": n}


def _emission(ctx: Ctx, root: Path, hf: Path, mdir: Path, size: Size, deploy: bool, log: str) -> dict:
    cmds = emission_cmds(root, hf, mdir, size, deploy)
    cmds = {k: v for k, v in cmds.items() if size.only is None or k in size.only}
    w = Worker("emit", "bench.deploy:setup_emit", inproc=True, cmds=cmds, log_path=log, emit_threads=1).start()
    ctx.say(f"  emission: {', '.join(cmds)} ({size.emit_reps} round{'s' * (size.emit_reps > 1)})")
    st = interleave({k: (w, k) for k in cmds}, warmup=0, reps=size.emit_reps, quiet_s=ctx.mode.quiet_s, say=ctx.say)
    out = {}
    for k, s in st.items():
        infos = s.infos
        out[k] = {"error": s.error, "runs": len(infos),
                  "wall_s": _median([i["wall_s"] for i in infos]), "peak_rss_mib": _median(
                      [i["peak_rss"] / (1 << 20) for i in infos]), "bytes": infos[-1]["bytes"] if infos else None,
                  "infos": [{k2: v for k2, v in i.items()} for i in infos], "argv": " ".join(cmds[k][0])}
    ratios = {}
    for mine, theirs in (("mptc_genai_fp32", "builder_fp32"), ("mptc_portable_fp32", "builder_fp32"),
                         ("mptc_genai_int4", "builder_int4"), ("compile_direct", "export_traced")):
        if mine in st and theirs in st:
            ratios[f"{mine}/{theirs}"] = _median(_pairs(st[mine], st[theirs], "wall_s"))
    return {"rows": out, "ratios": ratios}


def _decode(ctx: Ctx, root: Path, hf: Path, size: Size, threads: int, cands: list[str], reps: int) -> dict:
    prompt = prompt_ids(size)
    common = {"prompt": prompt, "new": size.new}
    workers = {}
    for name in cands:
        if name == "transformers":
            workers[name] = Worker(f"{name}/t{threads}", "bench.deploy:setup_hf", inproc=ctx.mode.inproc,
                                   log=str(root / "workers.log"), threads=threads, hf_dir=str(hf), **common)
        elif name == "mptc_naive":
            workers[name] = Worker(f"{name}/t{threads}", "bench.deploy:setup_naive", inproc=ctx.mode.inproc,
                                   log=str(root / "workers.log"), threads=threads, onnx_path=str(root / "direct.onnx"),
                                   prompt=prompt, new=size.naive_new, ort_threads=threads)
        else:
            workers[name] = Worker(f"{name}/t{threads}", "bench.deploy:setup_genai", inproc=ctx.mode.inproc,
                                   log=str(root / "workers.log"), model_dir=str(root / name), threads=threads,
                                   ort_threads=threads, **common)
    ctx.say(f"  decode, {threads} thread{'s' * (threads > 1)}: {', '.join(workers)}")
    start_all(list(workers.values()))
    try:
        st = interleave({k: (w, "gen") for k, w in workers.items()}, warmup=1, reps=reps, min_reps=reps,
                        quiet_s=ctx.mode.quiet_s, say=ctx.say)
    finally:
        close_all(list(workers.values()))
    rows = {}
    for k, s in st.items():
        infos = s.infos
        rows[k] = {"error": s.error, "runs": len(infos),
                   "prefill_s": _median([i["prefill_s"] for i in infos]),
                   "decode_tok_s": _median([i["decode_tok_s"] for i in infos if i.get("decode_tok_s")]),
                   "steps": infos[-1]["steps"] if infos else None,
                   "tokens": infos[-1]["tokens"] if infos else None,
                   "distinct_tokens": len(set(infos[-1]["tokens"])) if infos else None,
                   "min_margin": infos[-1].get("min_margin") if infos else None,
                   "process_peak_mib": round(s.hwm / (1 << 20), 1),
                   "setup": {k2: v for k2, v in workers[k].info.items() if k2 != "onnx"},
                   "onnx": workers[k].info.get("onnx")}
    ref = {"fp32": rows.get("builder_fp32"), "int4": rows.get("builder_int4")}
    for k, r in rows.items():
        base = "int4" if "int4" in k else "fp32"
        b = ref[base]
        if b is None or k == f"builder_{base}":
            continue
        # decode: tokens/s, higher is better → candidate / builder; prefill: time → candidate / builder
        for key, name in (("decode_tok_s", "decode_vs_builder"), ("prefill_s", "prefill_vs_builder")):
            pairs = _pairs(st[k], st[f"builder_{base}"], key)
            r[name], r[name + "_spread"] = _median(pairs), _quartiles(pairs)
        r["agrees_with_builder"] = agreement(r["tokens"], b.get("tokens"))
    if rows.get("builder_int4") and rows.get("builder_fp32"):
        rows["builder_int4"]["agrees_with_fp32"] = agreement(rows["builder_int4"]["tokens"],
                                                              rows["builder_fp32"]["tokens"])
    return {"threads": threads, "reps": reps, "rows": rows}


def run(ctx: Ctx) -> dict:
    size = SIZES.get(ctx.mode.name, SIZES["quick" if ctx.mode.layers else "full"])
    root = ctx.root / "deploy"
    root.mkdir(parents=True, exist_ok=True)
    log = str(root / "emission.log")
    hf, mdir = root / "hf", root / "mptc-model"
    t0 = time.perf_counter()
    model = prepare_hf(hf, size)
    ctx.say(f"  {model['params'] / 1e6:.1f}M-parameter Llama checkpoint in {time.perf_counter() - t0:.0f} s")
    imp = run_measured(mptc_cli("import-hf", str(hf), "-o", str(mdir)), str(mdir), log)
    deploy = has_deploy()
    if not deploy:
        ctx.say("  `mptc deploy` is not available: measuring the baselines only")
    out: dict = {"size": asdict(size), "model": model, "init_std": INIT_STD, "import_hf": imp,
                 "deploy_available": deploy}
    out["emission"] = _emission(ctx, root, hf, mdir, size, deploy, log)
    done = {k for k, r in out["emission"]["rows"].items() if not r["error"]}
    cands = [k for k in ("builder_fp32", "builder_int4", *(d[0] for d in DEPLOYS)) if k in done]
    cands += ["transformers"] + (["mptc_naive"] if "compile_direct" in done else [])
    many = ctx.mode.threads or os.cpu_count() or 1
    threads = [1] if many == 1 else [1, many]
    out["decode"] = []
    for i, n in enumerate(threads):  # more threads: the GenAI models only (torch's threads stall on a busy machine)
        reps = size.reps if i == 0 else max(1, size.reps // 2)
        use = cands if i == 0 else [c for c in cands if c not in ("transformers", "mptc_naive")]
        out["decode"].append(_decode(ctx, root, hf, size, n, use, reps))
    if ctx.mode.toy:  # training is too slow for the smoke test: tests/test_bench.py checks the evaluation apart
        out["quantization"] = {"skipped": "toy mode"}
    else:
        from . import quantization

        ctx.say("  quantization")
        out["quantization"] = quantization.run(ctx)
    return out


# --- the report ------------------------------------------------------------------------------------------------------

LABELS = {"builder_fp32": "ORT GenAI builder, fp32", "builder_int4": "ORT GenAI builder, int4",
          "mptc_genai_fp32": "mptc deploy, genai, float32", "mptc_portable_fp32": "mptc deploy, portable, float32",
          "mptc_genai_int4": "mptc deploy, genai, int4", "transformers": "transformers generate (cache)",
          "mptc_naive": "mptc compile .onnx, no cache (reference)", "compile_direct": "mptc compile X.onnx",
          "export_traced": "traced export (torch.export + dynamo ONNX)",
          "imports": "imports only (torch, onnx, onnxruntime, transformers, mptc)",
          "imports_mptc": "imports only, mptc's commands (onnx, mptc.emit, mptc.deploy)"}
BASE = {"mptc_genai_fp32": "builder_fp32", "mptc_portable_fp32": "builder_fp32", "mptc_genai_int4": "builder_int4",
        "compile_direct": "export_traced"}


def targets(dep: dict | None, target) -> list[dict]:
    """The deployment targets; `target` is report._target."""
    if not dep:
        return []
    out = []
    weights = dep["model"]["weight_bytes"] / (1 << 20)
    em = dep.get("emission", {})
    for name in ("mptc_genai_fp32", "mptc_genai_int4"):
        if name in em.get("rows", {}):
            out.append(target("mptc deploy time ≤ 0.2 × the builder's", LABELS[name],
                              em["ratios"].get(f"{name}/{BASE[name]}"), 0.2, True))
    for name, r in em.get("rows", {}).items():
        if name.startswith("mptc_"):
            rss = r.get("peak_rss_mib")
            out.append(target("mptc deploy peak memory ≤ 1.2 × the weights' bytes", f"{LABELS[name]} "
                              f"({weights:.0f} MiB of float32 weights)", rss / weights if rss else None, 1.2, True))
    if {"compile_direct", "export_traced"} <= set(em.get("rows", {})):
        out.append(target("`mptc compile X.onnx` ≤ 0.1 × the traced export", "float32",
                          em["ratios"].get("compile_direct/export_traced"), 0.1, True))
    for dec in dep.get("decode", []):
        th = f", {dec['threads']} thread{'s' * (dec['threads'] > 1)}"
        for name in ("mptc_genai_fp32", "mptc_genai_int4"):
            r = dec["rows"].get(name)
            if r is None:
                continue
            out.append(target("decode tokens/s ≥ 1.0 × the builder's", LABELS[name] + th, r.get("decode_vs_builder"),
                              1.0, False, spread=r.get("decode_vs_builder_spread")))
            out.append(target("prefill time ≤ 1.0 × the builder's", LABELS[name] + th, r.get("prefill_vs_builder"),
                              1.0, True, spread=r.get("prefill_vs_builder_spread")))
            a = r.get("agrees_with_builder")
            if name != "mptc_genai_fp32":  # int4's error is above this random model's logit margins: the builder's
                continue  # own int4 agrees with its fp32 on no position, so the table shows int4's share, no target
            out.append(target("greedy tokens = the builder's (share of positions)", LABELS[name] + th,
                              a["same"] / a["of"] if a else None, 1.0, False, ""))
    return out


def _agree(a: dict | None) -> str:
    if not a:
        return "—"
    return "all" if a["same"] == a["of"] else f"{a['same']}/{a['of']} (first {a['leading']} in a row)"


def markdown(dep: dict | None, table, f, ms) -> list[str]:
    """The Deployment section; `table`, `f`, `ms` are report's formatters."""
    if not dep:
        return []
    s, m = dep["size"], dep["model"]
    out = ["", "## Deployment", "",
           f"A Llama-style decoder from a `transformers.LlamaConfig` (width {s['width']}, {s['layers']} layers, "
           f"{s['heads']} heads, {s['kv_heads']} KV heads, SwiGLU {s['hidden']}, vocab {s['vocab']}, untied: "
           f"{m['params'] / 1e6:.1f}M parameters, {m['weight_bytes'] / (1 << 20):.0f} MiB in float32) with random "
           f"weights (`initializer_range` {dep.get('init_std', 0.02):g}: varied greedy tokens that depend on the "
           "whole context); `save_pretrained`, then `mptc import-hf` "
           f"({f(dep['import_hf']['wall_s'], 1)} s). Everyone decodes the same {s['prompt']}-token prompt greedily "
           f"({s['new']} new tokens, end-of-sequence masked). Prefill: until the first new token's logits; decode: "
           "tokens/s over the steps after the first. Ratios are medians of per-round ratios (interleaved rounds). "
           "Code: `bench/deploy.py`; re-run: `python -m bench --only deploy --threads 1` (about 10 minutes on an "
           "idle 2-core machine; `--quick` for 2 layers).", ""]
    if not dep.get("deploy_available"):
        out += ["**`mptc deploy` was not available in this run: the baselines only.**", ""]
    em = dep.get("emission", {})
    if em:
        w = m["weight_bytes"] / (1 << 20)
        floors = {k: (em["rows"].get(k) or {}).get("peak_rss_mib") for k in ("imports", "imports_mptc")}
        rows = []
        for k, r in em["rows"].items():
            base, peak = BASE.get(k), r["peak_rss_mib"]
            floor = floors["imports_mptc"] if k.startswith("mptc_") or k == "compile_direct" else floors["imports"]
            above = peak - floor if peak and floor and not k.startswith("imports") else None
            rows.append([LABELS.get(k, k), f(r["wall_s"], 1) if not r["error"] else f"failed: {r['error']}",
                         f(em["ratios"].get(f"{k}/{base}")) if base else "—", f(peak, 0),
                         f(peak / w if peak else None), f(above, 0), f(r["bytes"], 0, 1 / (1 << 20))])
        out += ["### Emission", "",
                "Each command in its own process with one thread (`OMP_NUM_THREADS=1`), started after a `sync` "
                "(so no command pays for the writes the one before left in the page cache), the Python start-up and "
                "imports included; peak memory is that process's peak resident set (`ru_maxrss`); the \"imports "
                "only\" rows are the floors the commands start from (mptc's commands from a model dir import no "
                "torch: theirs is the second). × is against the builder at the same precision (the traced export "
                "for `mptc compile`).", ""]
        out += table(["command", "wall s", "×", "peak MiB", "peak / weights", "peak − imports MiB", "output MiB"],
                     rows)
        out += [""]
    for dec in dep.get("decode", []):
        rows = []
        for k, r in dec["rows"].items():
            if r["error"]:
                rows.append([LABELS.get(k, k), f"failed: {r['error']}", "", "", "", "", ""])
                continue
            nodes = (r.get("onnx") or {}).get("nodes")
            agree = r.get("agrees_with_builder") or r.get("agrees_with_fp32")
            rows.append([LABELS.get(k, k), ms(r["prefill_s"]), f(r.get("prefill_vs_builder")),
                         f(r["decode_tok_s"], 1) + (f" ({r['steps']} steps)" if k == "mptc_naive" else ""),
                         f(r.get("decode_vs_builder")), _agree(agree), str(nodes) if nodes else "—"])
        n = dec["threads"]
        b, hf = dec["rows"].get("builder_fp32") or {}, dec["rows"].get("transformers") or {}
        seq = (f" The builder's fp32 sequence has {b['distinct_tokens']} distinct tokens of {len(b['tokens'])}"
               if b.get("tokens") else "")
        seq += (f"; the smallest lead of the top logit over the runner-up (transformers) is {hf['min_margin']:.3g}."
                if hf.get("min_margin") is not None else "." if seq else "")
        out += [f"### Decoding, {n} thread{'s' * (n > 1)}", "",
                f"{dec['reps']} timed rounds after a warm-up round. × is against the builder at the same precision; "
                f"greedy tokens are compared with the builder's (its int4 with its fp32).{seq}", ""]
        out += table(["candidate", "prefill ms", "× builder", "decode tok/s", "× builder", "greedy tokens",
                      "ONNX nodes"], rows)
        out += [""]
    ops = _op_table(dep)
    if ops:
        out += ["### ONNX operators", "", "Nodes by operator in each decoder graph (one decode step runs them all).",
                ""] + table(*ops)
    q = dep.get("quantization") or {}
    if q.get("rows"):
        from .quantization import STEPS as QUANT_STEPS
        from .quantization import markdown as quant_markdown

        argv = q["train"]["argv"]
        steps = argv[argv.index("--steps") + 1]
        command = ".venv/bin/python -m bench.quantization" + (f" --steps {steps}" if steps != str(QUANT_STEPS) else "")
        out += [""] + quant_markdown(q, command, "### Quantization (trained model)")
    elif q.get("error"):
        out += ["", "### Quantization (trained model)", "", f"failed: {q['error']}"]
    return out


def _op_table(dep: dict) -> tuple[list[str], list[list[str]]] | None:
    dec = (dep.get("decode") or [{}])[0].get("rows", {})
    graphs = {k: r["onnx"]["ops"] for k, r in dec.items() if r.get("onnx")}
    if not graphs:
        return None
    names = sorted({o for g in graphs.values() for o in g}, key=lambda o: -max(g.get(o, 0) for g in graphs.values()))
    head = ["operator", *(LABELS.get(k, k) for k in graphs)]
    return head, [[o, *(str(g.get(o, "")) for g in graphs.values())] for o in names]
