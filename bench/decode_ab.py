"""Interleaved decode timing of ONNX Runtime GenAI dirs: a quick A/B loop for deploy choices.

    .venv/bin/python -m bench.decode_ab DIR_A DIR_B [--rounds 5] [--threads 1] [--logits]

Each dir decodes the deploy benchmark's prompt (`bench.deploy.prompt_ids`, full size) greedily in its own
process (`bench.deploy.setup_genai` in a `bench.harness.Worker`), the dirs taking turns; prints each round's
tokens/s and the median ratio of every dir against the first. `--logits` instead prints how far each dir's
first logits are from the others' (relative RMS) and its top token. Build the 124M checkpoint with
`bench.deploy.prepare_hf`, then `mptc import-hf` and `mptc deploy` it, and the builder
(`python -m onnxruntime_genai.models.builder -i HF -e cpu -o OUT -p int4`) for the other side.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from .deploy import SIZES, prompt_ids
from .harness import Worker, close_all, interleave, start_all


def first_logits(model_dir: str, prompt: list[int]) -> np.ndarray:
    """The prompt's last logits (V,) under ONNX Runtime GenAI."""
    import onnxruntime_genai as og

    model = og.Model(model_dir)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    return np.asarray(gen.get_logits(), dtype=np.float64).ravel()


def compare_logits(dirs: list[str], prompt: list[int]) -> None:
    """Relative RMS difference of every dir's first logits from each earlier dir's, and the top token."""
    logits = [first_logits(d, prompt) for d in dirs]
    for i, (d, x) in enumerate(zip(dirs, logits, strict=True)):
        diffs = ", ".join(f"vs {j}: {np.linalg.norm(x - y) / np.linalg.norm(y):.4f}" for j, y in enumerate(logits[:i]))
        print(f"{i}:{Path(d).name}: top token {int(x.argmax())}" + (f"; relative RMS {diffs}" if diffs else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--logits", action="store_true", help="only compare the prompt's last logits, no timing")
    a = ap.parse_args()
    size = SIZES[a.size]
    if a.logits:
        compare_logits(a.dirs, prompt_ids(size))
        return
    names = [f"{i}:{Path(d).name}" for i, d in enumerate(a.dirs)]
    workers = {n: Worker(n, "bench.deploy:setup_genai", inproc=False, log=None, threads=a.threads,
                         model_dir=d, prompt=prompt_ids(size), new=size.new, ort_threads=a.threads)
               for n, d in zip(names, a.dirs, strict=True)}
    start_all(list(workers.values()))
    try:
        st = interleave({k: (w, "gen") for k, w in workers.items()}, warmup=1, reps=a.rounds, min_reps=a.rounds,
                        quiet_s=0.0, say=print)
    finally:
        close_all(list(workers.values()))
    base = st[names[0]].infos
    for n in names:
        infos = st[n].infos
        tps = [i["decode_tok_s"] for i in infos]
        ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(infos, base, strict=False)]
        prefill = statistics.median(i["prefill_s"] for i in infos) * 1e3
        print(f"{n}: decode tok/s {statistics.median(tps):.1f} (rounds {', '.join(f'{t:.1f}' for t in tps)}); "
              f"× {names[0]}: {statistics.median(ratios):.3f}; prefill {prefill:.0f} ms")


if __name__ == "__main__":
    main()
