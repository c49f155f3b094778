"""`python -m bench.emit_moe [--reps N]`: the emitted mixture-of-experts MLP, dense (every expert on every token,
standard ops) against ONNX Runtime's `com.microsoft.MoE` (the chosen experts only), one thread.

A 2-layer decoder, width 512, 8 experts of 1024 hidden units (SwiGLU), top-2, in the genai profile (so
attention is the same GroupQueryAttention in both): a 128-token prefill and a one-token step after 128
cached positions, the best of N runs each."""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

import mptc
import mptc.emit.blocks as blocks
from mptc.emit import emit
from mptc.schema import parse

SPEC = """model moe_bench {
  vocab = 1000
  context = 512
  width = 512
  embed { positions = rope(theta = 10000.0) }
  layers 2 {
    norm = rmsnorm(eps = 1e-6)
    attention { heads = 8, kv_heads = 8, head_dim = 64, bias = false, out_bias = false }
    mlp { hidden = 1024, activation = swiglu, bias = false, experts = 8, top_k = 2 }
  }
  head lm { norm = rmsnorm(eps = 1e-6), tied = false }
}"""


def _session(proto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ms(sess: ort.InferenceSession, new: int, past: int, reps: int) -> float:
    """Best wall time (ms) of one run on `new` tokens after `past` cached ones."""
    feed = {"input_ids": np.random.default_rng(0).integers(0, 1000, (1, new)),
            "attention_mask": np.ones((1, past + new), np.int64)}
    for i in range(2):
        for k in ("key", "value"):
            feed[f"past_key_values.{i}.{k}"] = np.zeros((1, 8, past, 64), np.float32)
    sess.run(None, feed)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.emit_moe", description=__doc__)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    model = mptc.build(parse(SPEC, "moe_bench"), seed=0).eval()
    fits = blocks.moe_op_fits
    try:
        for label, use_op in (("dense (every expert)", False), ("com.microsoft.MoE", True)):
            blocks.moe_op_fits = lambda c, m, use_op=use_op: use_op
            sess = _session(emit(model, cache=True, profile="genai").to_proto())
            print(f"{label:22s} prefill 128: {_ms(sess, 128, 0, args.reps):7.1f} ms   "
                  f"decode step: {_ms(sess, 1, 128, args.reps):6.2f} ms")
    finally:
        blocks.moe_op_fits = fits
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
