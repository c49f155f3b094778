"""`mptc deploy` and `mptc generate` (registered into the main parser by mptc/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import MptcError


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `mptc` parser."""
    c = sub.add_parser("deploy", help="write a deploy dir that ONNX Runtime GenAI and Optimum load",
                       description="Write DIR for SRC (a spec, a model dir or an `mptc import-hf` dir). A decoder "
                       "gets model.onnx + model.onnx.data with its KV cache, genai_config.json (for "
                       "onnxruntime_genai.Model(DIR)) and, where a Hugging Face family holds the model, config.json "
                       "+ generation_config.json (for Optimum's ORTModelForCausalLM). An encoder or classifier gets "
                       "model.onnx as `mptc compile` writes it (no cache). docs/deploy.md.")
    c.add_argument("src", metavar="SRC")
    c.add_argument("-o", "--output", required=True, metavar="DIR")
    c.add_argument("--runtime", choices=("genai", "portable"), default="genai",
                   help="genai: GenAI's fused ops, the cache updated in place (default); portable: standard ops, "
                   "the cache returned each step (Optimum and plain ONNX Runtime run it too)")
    c.add_argument("--weights", choices=("float32", "float16", "int8", "int4"), default="float32",
                   help="int8/int4: weight-only MatMulNBits (symmetric, block 32) by ONNX Runtime's quantizer")
    c.add_argument("--max-length", type=int, metavar="N",
                   help="the longest sequence (prompt + new tokens) the dir serves (default: the model's context)")
    c.add_argument("--seed", type=int, default=0, help="weight seed for a spec file SRC (default 0)")
    c.add_argument("--force", action="store_true", help="replace DIR even where it is not an earlier deploy dir "
                   "(never an input, the current directory or a parent of it, or the home directory)")

    c = sub.add_parser("generate", help="generate tokens with a model dir or a deploy dir",
                       description="Continue the prompt --ids (or the rows of --ids-file) by --max-new-tokens tokens. "
                       "A spec or model dir runs in PyTorch with a KV cache (mptc.generate); a deploy dir runs in "
                       "ONNX Runtime GenAI. Prints the new ids as they come, then tokens/s; --json prints one object "
                       "instead. Greedy unless --temperature > 0.")
    c.add_argument("src", metavar="SRC|DIR")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--ids", help='the prompt\'s token ids, e.g. "464 2068 7586" (one row)')
    g.add_argument("--ids-file", metavar="X.npy", help="prompts as a (B, T) or (T,) integer array")
    c.add_argument("--max-new-tokens", type=int, required=True, metavar="N")
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    c.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens")
    c.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set with probability ≥ P")
    c.add_argument("--seed", type=int, default=0, help="sampling seed, and weight seed for a spec SRC (default 0)")
    c.add_argument("--json", action="store_true",
                   help='print {"new_ids": [[…] per row], "tokens_per_s": …, "prefill_ms": …} only')


def cmd_deploy(args) -> int:
    from .deploy import deploy

    src = args.src
    if src.endswith(".mpt") and args.seed:
        from .model import load_model

        src = load_model(src, seed=args.seed)
    done = deploy(src, args.output, runtime=args.runtime, weights=args.weights, max_length=args.max_length,
                  log=print)
    print(f"wrote {done.path}")
    return 0


def _check_sampling(args) -> None:
    if args.temperature < 0:
        raise MptcError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise MptcError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise MptcError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise MptcError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def _prompt(args, vocab: int, context: int | None) -> np.ndarray:
    """The prompt ids (B, T), each in 0..vocab-1, within the context."""
    from .cli import _ids

    return _ids(args, SimpleNamespace(vocab=vocab, context=context))


class _Stream:
    """Prints new ids as they come, each row's on its own line."""

    def __init__(self):
        self.row: int | None = None

    def __call__(self, row: int, token: int) -> None:
        if self.row is not None and row != self.row:
            print(flush=True)
        self.row = row
        print(token, end=" ", flush=True)

    def end(self) -> None:
        if self.row is not None:
            print(flush=True)


def cmd_generate(args) -> int:
    from . import genai

    _check_sampling(args)
    stream = None if args.json else _Stream()
    if genai.is_genai_dir(args.src):
        _, vocab = genai._sizes(args.src)
        ids = _prompt(args, vocab, None)  # the max length: genai.generate refuses prompt + new tokens past it
        out = genai.generate(args.src, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, on_token=stream)
    else:
        if (Path(args.src) / "model.onnx").is_file():
            raise MptcError(f"{args.src} is an encoder deploy dir: it has no genai_config.json, nothing to generate "
                            "with", hint="generate with a decoder")
        out = _torch_generate(args, stream)
    if stream is not None:
        stream.end()
    if args.json:
        print(json.dumps(out.to_json()))
    else:
        n = sum(len(r) for r in out.new_ids)
        print(f"{n} new tokens, {out.tokens_per_s:.1f} tokens/s, prefill {out.prefill_ms:.1f} ms", file=sys.stderr)
    return 0


def _torch_generate(args, stream: _Stream | None):
    """A spec or model dir: mptc.generate (PyTorch, KV cache), timed like the GenAI path. One row streams as
    it comes; several rows decode together and print when done."""
    import torch

    from .genai import Generation
    from .generate import generate_timed
    from .graph import spec_of
    from .model import load_model

    model = load_model(args.src, seed=args.seed).eval()
    spec = spec_of(model)
    if spec.head.kind != "lm":
        raise MptcError(f"'{spec.name}' has a {spec.head.kind} head: nothing to generate with",
                        hint="generate with a causal language model (head lm)")
    ids = torch.from_numpy(_prompt(args, spec.vocab, spec.context))
    live = stream is not None and ids.shape[0] == 1
    run = generate_timed(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed,
                         stream=(lambda step, tok: stream(0, int(tok[0]))) if live else None)
    rows = run.new_ids.tolist()
    if stream is not None and not live:
        for r, row in enumerate(rows):
            for t in row:
                stream(r, t)
    return Generation(rows, round(run.tokens_per_s, 2), round(run.prefill_ms, 3))


COMMANDS = {"deploy": cmd_deploy, "generate": cmd_generate}
