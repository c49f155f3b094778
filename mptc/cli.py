"""The `mptc` command line. Every user error prints a located message and exits 1."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

from .errors import MptcError
from .files import ONNX_OPSET

EPILOG = """\
SRC is a spec file (.mpt; weights initialised from --seed) or a model dir
(model.mpt + weights.safetensors, as written by `mptc compile SPEC -o DIR`).

examples:
  mptc check examples/gpt2-small.mpt
  mptc summary examples/llama-style.mpt
  mptc compile examples/gpt2-small.mpt -o out/gpt2            # model dir
  mptc compile out/gpt2 -o out/gpt2.onnx                       # ONNX from its weights
  mptc run out/gpt2 --ids "464 2068 7586" --onnx out/gpt2.onnx --compare
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors are user errors: exit 1, like every other
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mptc",
        description="Compile transformer architecture specs to PyTorch (torch.fx), ONNX and .pt2.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("check", help="parse and validate a spec", description="Parse and validate a spec without "
                       "building it (no torch: fast enough for an editor or pre-commit hook); print a one-line "
                       "summary, or the first error with its position. Sizes: `mptc summary`.")
    c.add_argument("spec", metavar="SRC")

    c = sub.add_parser("fmt", help="format a spec file", description="Print a spec in the house style "
                       "(constants, arithmetic and comments kept).")
    c.add_argument("spec", metavar="SPEC")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if the file is not formatted; change nothing")
    g.add_argument("--write", action="store_true", help="rewrite the file in place")
    g.add_argument("--canonical", action="store_true",
                   help="print the canonical spec instead: every field explicit, constants evaluated")

    c = sub.add_parser("summary", help="parameters and FLOPs per layer",
                       description="Parameters and FLOPs per token, per layer and in total, computed on the "
                       "meta device (nothing is allocated). FLOPs: see docs/language.md.")
    c.add_argument("spec", metavar="SRC")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table (every layer, every tensor)")
    c.add_argument("-v", "--verbose", action="store_true", help="list every tensor's shape under its row")

    c = sub.add_parser("compile", help="compile to a model dir, .onnx or .pt2",
                       description="Compile SRC. OUT ending in .onnx gives an ONNX file (checked with "
                       "onnx.checker), .pt2 a torch.export program, anything else a model dir.")
    c.add_argument("spec", metavar="SRC")
    c.add_argument("-o", "--output", required=True, metavar="OUT")
    c.add_argument("--seed", type=int, default=0, help="weight initialisation seed for a spec file (default 0)")
    c.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    c.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET}: fused Attention "
                   "and RMSNormalization; 18 for runtimes without them)")
    c.add_argument("--task", metavar="NAME|all", help="compile the sub-network of a task named in the spec's "
                   "`tasks` (cut out physically); `all`: one .onnx/.pt2 file per task, named OUT.TASK.onnx")
    c.add_argument("--external-data", action="store_true", help="ONNX: weights in OUT.data beside the graph "
                   "(the default only past the 2 GB limit of one ONNX file)")

    c = sub.add_parser("grow", help="apply verified growth passes",
                       description="Apply a pipeline of passes to SRC and write OUT_DIR (model.mpt, "
                       "weights.safetensors, report.json). After every pass the result is checked (well-formedness, "
                       "its certificate, and behaviour on probe batches); a failed check writes nothing. "
                       "Passes: grow_mlp, add_heads, grow_head_dim, grow_qk, grow_width, add_layers, add_kv_heads, "
                       "grow_vocab, grow_context (docs/passes.md), and those of --plugin files.")
    c.add_argument("spec", metavar="SRC")
    c.add_argument("-p", "--pass", dest="passes", action="append", default=[], metavar="CALL",
                   help='a pass, e.g. -p "grow_mlp(hidden = 4096)" (repeatable; applied in order)')
    c.add_argument("--passes", dest="passes_file", metavar="FILE", help="a pipeline file: one pass call per line")
    c.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py",
                   help="a Python file whose @register-ed passes -p can use (repeatable; docs/write-a-pass.md)")
    c.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    c.add_argument("--seed", type=int, default=0, help="weight seed for a spec file SRC (default 0)")

    c = sub.add_parser("verify", help="compare two models on probe batches",
                       description="Run A and B (model dirs, spec files or ONNX files) on the same probe batches and "
                       "print the max abs and rel error; exit 1 when they differ by more than --tol. Where B has a "
                       "larger vocabulary (grow_vocab), the old tokens' logits are compared.")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--tol", type=float, default=1e-5, help="max abs error allowed (default 1e-5)")
    c.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("extract", help="cut a sub-network out as a smaller model",
                       description="Extract a sub-network: MLP units and kv head groups to an index prefix, "
                       "dropped layers removed, spec rewritten. A MatFormer-nested layer cuts at its levels, any "
                       "other layer at any fraction (the prefix: `mptc reorder` first). Verified: the submodel "
                       "equals the parent run as that sub-network (float64 1e-9, float32 1e-5), else nothing "
                       "is written. --correct lsq then refits the shrunk projections on calibration data and checks "
                       "the held-out loss. OUT ending in .onnx gives an ONNX file.")
    c.add_argument("spec", metavar="SRC")
    _choice_args(c)
    c.add_argument("--kv-groups", type=int, metavar="N", help="kv groups every attention keeps (with their heads)")
    c.add_argument("--merge-kv", action="store_true", help="with --kv-groups: keep every query head and average the "
                   "k/v projections of the groups merged (checked on the held-out part of --data)")
    c.add_argument("--drop-least", type=int, metavar="N", help="leave out the N layers whose removal alone raises "
                   "the calibration loss least (measured on --data)")
    c.add_argument("--correct", choices=("lsq",), help="lsq: refit each shrunk MLP down / attention output "
                   "projection by ridge least squares on --data; checked on its held-out part")
    c.add_argument("--data", nargs="+", metavar="FILE", help="calibration text (files, directories or stdlib; "
                   "byte-level tokens) for --correct and --drop-least")
    c.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    c.add_argument("-o", "--output", required=True, metavar="OUT")
    c.add_argument("--seed", type=int, default=0, help="weight seed for a spec SRC and calibration window seed")

    c = sub.add_parser("reorder", help="rank MLP units and heads by importance (exact permutation)",
                       description="Permute MLP units and attention heads so the most important come first, so that "
                       "a later `extract` keeps the best prefix. Function-preserving and verified.")
    c.add_argument("spec", metavar="SRC")
    c.add_argument("--by", choices=("weight", "activation", "taylor"), default="weight",
                   help="weight: group L2 norm; activation: mean |activation| on --data; taylor: |w · grad| of the "
                   "next-token loss on --data (default weight)")
    c.add_argument("--what", choices=("mlp", "heads", "both"), default="both")
    c.add_argument("--data", nargs="+", metavar="FILE", help="calibration text (files, directories or stdlib; "
                   "byte-level tokens)")
    c.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    c.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    c.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("import-hf", help="import a Hugging Face checkpoint as a model dir",
                       description="Read a Hugging Face model directory (config.json and *.safetensors, sharded or "
                       "not, or pytorch_model.bin) and write a model dir. Families: GPT-2, Llama, Mistral, Qwen2, "
                       "Qwen3, Phi-3/Phi-4, Mixtral, Qwen2-MoE, BERT, RoBERTa, XLM-R, DistilBERT, ViT (docs/hf.md). "
                       "Every tensor of the checkpoint must be used and every tensor of the model found. "
                       "Needs `pip install \"mptc[hf]\"` only for --check and export-hf.")
    c.add_argument("src", metavar="HF_DIR")
    c.add_argument("-o", "--output", required=True, metavar="MODEL_DIR")
    c.add_argument("--check", action="store_true",
                   help="before writing, compare the import with transformers on a padded probe batch; fail (writing "
                   "nothing) when the max error exceeds 1e-4 relative to max(1, |output|)")

    c = sub.add_parser("export-hf", help="export a model dir as a Hugging Face checkpoint",
                       description="Write config.json and model.safetensors that `transformers` loads with "
                       "the class its `architectures` names (causal LMs, masked LMs, classifiers). Models the "
                       "family's config cannot hold are refused, naming the field.")
    c.add_argument("spec", metavar="SRC")
    c.add_argument("-o", "--output", required=True, metavar="HF_DIR")
    c.add_argument("--family", choices=HF_EXPORT_FAMILIES, help="default: the family the model fits")
    c.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("run", help="run a model on inputs",
                       description="Run SRC in PyTorch, or an ONNX file in ONNX Runtime, and print the output's "
                       "shape and top predictions.")
    c.add_argument("spec", metavar="SRC")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--ids", help='token ids, e.g. "464 2068 7586" (one sequence)')
    g.add_argument("--ids-file", metavar="X.npy", help="token ids as a (B, T) or (T,) integer array")
    g.add_argument("--random", type=int, metavar="B", help="a random batch of B inputs (from --seed)")
    c.add_argument("--pixels-file", metavar="X.npy", help="images as a (B, C, H, W) float array")
    c.add_argument("--mask-file", metavar="M.npy", help="attention_mask (B, T) of 1 (token) and 0 (padding)")
    c.add_argument("--token-types-file", metavar="X.npy",
                   help="token_type_ids (B, T), integers in 0..segments-1 (models with `segments`; default all 0)")
    c.add_argument("--conditions-file", metavar="X.npy",
                   help="the side input `conditions` as a (B, C) float array (models with `conditions = C`)")
    _choice_args(c, required=False)
    c.add_argument("--onnx", metavar="FILE", help="run this ONNX file in ONNX Runtime instead of PyTorch")
    c.add_argument("--compare", action="store_true",
                   help="with --onnx: run both and exit 1 unless they agree within --tol")
    c.add_argument("--tol", type=float, default=1e-4, help="max abs difference for --compare (default 1e-4)")
    c.add_argument("-o", "--output", metavar="OUT.npy", help="save the output array")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--top", type=int, default=5, help="how many top predictions to print (default 5)")

    from . import cli_deploy, cli_train

    cli_train.add_commands(sub)
    COMMANDS.update(cli_train.COMMANDS)
    cli_deploy.add_commands(sub)
    COMMANDS.update(cli_deploy.COMMANDS)
    for name in (n for n in WRITERS if n in sub.choices):
        sub.choices[name].add_argument(
            "--force", action="store_true", help="replace the output even where it is not an earlier output of "
            "the same kind (never an input, the current directory or a parent of it, or the home directory)")
    return p


HF_EXPORT_FAMILIES = ("gpt2", "qwen3", "llama", "mistral", "qwen2", "phi3", "mixtral", "qwen2_moe", "gemma", "gemma2",
                      "gemma3_text", "bert", "roberta", "xlm-roberta", "distilbert", "vit")  # mptc.hf.EXPORTS
WRITERS = ("compile", "grow", "extract", "reorder", "import-hf", "export-hf", "run", "train", "search")
INPUT_ARGS = ("spec", "src", "a", "b", "data", "passes_file", "resume", "onnx", "ids_file", "pixels_file",
              "mask_file", "token_types_file", "conditions_file", "tokenizer")


def _output_policy(args) -> dict:
    """What the command may replace: --force, and its inputs (never replaced; `train --resume DIR -o DIR`
    and `fmt --write` update theirs in place)."""
    inputs = []
    for name in INPUT_ARGS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and v and v != "stdlib":
                inputs.append(v)
    in_place = [args.spec] if args.command == "fmt" else [args.resume] if getattr(args, "resume", None) else []
    return {"force": getattr(args, "force", False), "inputs": inputs, "in_place": in_place}


OUTPUT_KINDS = {"grow": "model", "reorder": "model", "import-hf": "model", "export-hf": "hf"}


def _check_outputs(args) -> None:
    """Refuse an output before any work (each write checks again); `compile` checks its own, and
    `train` after reading its checkpoint, before the first step."""
    from .outputs import check_output

    out = getattr(args, "output", None) if args.command in WRITERS else None
    if out and args.command in OUTPUT_KINDS:
        check_output(out, OUTPUT_KINDS[args.command], is_dir=True)
    elif out and args.command in ("extract", "run"):
        check_output(out, is_dir=args.command == "extract" and not out.endswith(".onnx"))  # kind from the suffix
    if args.command == "search":
        for path, kind in ((args.plot, "png"), (args.json, "search")):
            if path:
                check_output(path, kind)


def _choice_args(c: argparse.ArgumentParser, required: bool = True) -> None:
    g = c.add_argument_group("sub-network (MatFormer)", "granularities are names (s, m, l, xl) or fractions (0.5)")
    g.add_argument("--mlp", metavar="G", help="one granularity for every nested MLP")
    g.add_argument("--mix", metavar='"s,s,m,l,…"', help="Mix'n'Match: one MLP granularity per layer")
    g.add_argument("--heads", metavar="G", help="one granularity for every nested attention")
    g.add_argument("--drop-layers", metavar="3,7", help="skip these (skippable) layers")
    g.add_argument("--task", metavar="NAME", help="a sub-network named in the spec's `tasks`")


def main(argv: list[str] | None = None) -> int:
    from .outputs import CLI_HINT, output_policy

    args = _parser().parse_args(argv)
    try:
        with output_policy(**_output_policy(args), hint=CLI_HINT):
            _check_outputs(args)
            return COMMANDS[args.command](args) or 0
    except MptcError as e:
        print(e.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_check(args) -> int:
    """Parse and validate without torch (fast enough for an editor hook); the sizes are `mptc summary`'s."""
    from .dims import check_tensor_sizes
    from .files import load

    spec = load(args.spec)
    check_tensor_sizes(spec)
    print(f"ok: {spec.name}: {spec.n_layers} layers, width {spec.width} (parameters and FLOPs: mptc summary)")
    return 0


def cmd_fmt(args) -> int:
    from .atomic import atomic_file
    from .files import load
    from .printer import format_source
    from .syntax import parse_file

    if args.canonical:
        sys.stdout.write(str(load(args.spec)))
        return 0
    path = Path(args.spec)
    try:
        text = path.read_text()
    except OSError as e:
        raise MptcError(f"cannot read {path}: {e.strerror}") from None
    load(path)  # a file that does not check is not formatted
    out = format_source(parse_file(text, str(path)))
    if args.check:
        if out != text:
            print(f"{path}: would reformat", file=sys.stderr)
            return 1
        return 0
    if args.write:
        if out != text:
            with atomic_file(path) as tmp:
                tmp.write_text(out)
        return 0
    sys.stdout.write(out)
    return 0


def cmd_summary(args) -> int:
    from .files import load
    from .summary import print_table, summarize

    s = summarize(load(args.spec))
    if args.json:
        print(json.dumps(s.to_json(), indent=2))
        return 0
    print_table(s, verbose=args.verbose)
    return 0


def cmd_compile(args) -> int:
    if _compile_fast(args):
        return 0
    from .atomic import atomic_group
    from .export import export_onnx, export_pt2
    from .model import load_model, save
    from .outputs import check_output

    model = load_model(args.spec, seed=args.seed, dtype=args.dtype)
    if args.task is None:
        targets = [(args.output, model)]
    else:
        from .graph import spec_of

        spec = spec_of(model)
        names = [t.name for t in spec.tasks] if args.task == "all" else [args.task]
        if args.task == "all":
            if not spec.tasks:
                raise MptcError(f"model '{spec.name}' declares no tasks")
            if not args.output.endswith((".onnx", ".pt2")):
                raise MptcError("--task all writes one file per task: OUT must end in .onnx or .pt2")
        stem, dot, suffix = args.output.rpartition(".")
        targets = [(f"{stem}.{n}.{suffix}" if args.task == "all" else args.output, _task_model(model, n))
                   for n in names]
    if args.external_data and not all(out.endswith(".onnx") for out, _ in targets):
        raise MptcError("--external-data applies to ONNX outputs: OUT must end in .onnx")
    for out, _ in targets:  # refused before any export
        check_output(out, is_dir=not out.endswith((".onnx", ".pt2")))
    with atomic_group():  # --task all: every file lands, or none
        for out, m in targets:
            if out.endswith(".onnx"):
                export_onnx(m, out, opset=args.opset, external_data=True if args.external_data else None)
            elif out.endswith(".pt2"):
                export_pt2(m, out)
            else:
                save(m, out)
    for out, _ in targets:
        print(f"wrote {out}")
    return 0


def _compile_fast(args) -> bool:
    """`mptc compile DIR -o OUT.onnx` for a model dir the emitter covers, without torch (mptc.emit.fast)."""
    if args.task is not None or not args.output.endswith(".onnx"):
        return False
    from .emit.fast import compile_onnx
    from .outputs import check_output

    check_output(args.output)
    done = compile_onnx(args.spec, args.output, dtype=args.dtype, opset=args.opset,
                        external_data=True if args.external_data else None)
    if done is not None:
        print(f"wrote {done}")
    return done is not None


def _task_model(model, name: str):
    """The task's sub-network as its own (verified) model; the model itself for a whole-model task."""
    from .choice import task_choice
    from .graph import spec_of
    from .passes import Extract, Pipeline

    if task_choice(spec_of(model), name).is_full:
        return model
    return Pipeline([Extract(task=name)])(model)[0]


MAX_VALUES = 1 << 30  # the largest tensor `mptc run` makes (4 GiB of float32): a typo in --random is refused


def _inputs(args, spec) -> dict[str, np.ndarray]:
    """The forward inputs from the command line, checked against the spec (in the order of spec.inputs)."""
    if args.random is None and args.ids is None and args.ids_file is None and args.pixels_file is None:
        raise MptcError("no input given", hint="pass --ids, --ids-file, --pixels-file or --random B")
    if args.random is not None:
        return _random_inputs(args, spec)
    feed: dict[str, np.ndarray] = {}
    if spec.patches is not None:
        feed["pixel_values"] = _pixels(args.pixels_file, spec)  # (B, C, S, S)
    elif args.pixels_file:
        raise MptcError(f"model '{spec.name}' reads token ids, not images", hint="pass --ids or --ids-file")
    if spec.reads_tokens:
        if args.ids is None and args.ids_file is None:
            raise MptcError(f"model '{spec.name}' reads token ids and images", hint="pass --ids or --ids-file too")
        ids = _ids(args, spec)  # (B, T)
        feed |= {"input_ids": ids, "attention_mask": _mask(args.mask_file, ids)}
        types = _token_types(args.token_types_file, spec, ids)
        if types is not None:
            feed["token_type_ids"] = types
    else:
        for flag, value in (("--mask-file", args.mask_file), ("--token-types-file", args.token_types_file)):
            if value:
                raise MptcError(f"model '{spec.name}' reads images only; {flag} does not apply")
    rows = len(next(iter(feed.values())))
    cond = _conditions(args.conditions_file, spec, rows)
    if cond is not None:
        feed["conditions"] = cond
    if "pixel_values" in feed and "input_ids" in feed and len(feed["pixel_values"]) != rows:
        raise MptcError(f"{len(feed['input_ids'])} token rows but {len(feed['pixel_values'])} images")
    tokens = feed["input_ids"].shape[1] if "input_ids" in feed else 0
    _check_size(spec, rows, tokens, args.ids_file or args.pixels_file or "--ids")
    return {k: feed[k] for k in spec.inputs if k in feed}


def _random_inputs(args, spec) -> dict[str, np.ndarray]:
    from .inputs import example_inputs

    if args.random < 1:
        raise MptcError("--random needs a batch size of at least 1")
    given = [flag for flag, v in (("--pixels-file", args.pixels_file), ("--mask-file", args.mask_file),
                                  ("--token-types-file", args.token_types_file),
                                  ("--conditions-file", args.conditions_file)) if v]
    if given:
        raise MptcError(f"--random makes every input; it does not combine with {', '.join(given)}")
    seq = min(16, spec.context or 16) if spec.reads_tokens else 0
    _check_size(spec, args.random, seq, f"--random {args.random}")
    return {k: v.numpy() for k, v in example_inputs(spec, args.random, 16, seed=args.seed).items()}


def _check_size(spec, rows: int, tokens: int, what: str) -> None:
    """Refuse, before allocating, inputs whose forward pass makes a tensor of more than MAX_VALUES values:
    the largest is rows × positions × the widest per-position size (vocab, MLP hidden, heads × positions)."""
    t = tokens + spec.image_len  # positions, images included
    widest = max([spec.width, *(ly.mlp.hidden for ly in spec.layers), *(ly.attention.heads * t for ly in spec.layers),
                  spec.vocab if spec.head.kind == "lm" else 0,
                  spec.patches.channels * spec.patches.patch**2 if spec.patches else 0])
    n = rows * t * widest
    if n <= MAX_VALUES:
        return
    fit = MAX_VALUES // (t * widest)
    raise MptcError(f"{what} would make tensors of {rows} × {t} × {widest} = {_sci(n)} values ({_bytes(4 * n)}) in one "
                    "forward pass", hint=f"at most {fit} rows of {t} positions stay under {_sci(MAX_VALUES)} values"
                    if fit else "give fewer tokens")


def _sci(n: int) -> str:
    """A whole number of any size in two significant digits: 1.6e+12."""
    return f"{n:.2g}" if n < 10**300 else f"1e+{len(str(n)) - 1}"


def _bytes(n: int) -> str:
    for unit, k in (("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if k <= n < 10**18:
            return f"{n / k:.3g} {unit}"
    return f"{_sci(n)} bytes" if n >= 10**18 else f"{n} bytes"


def _ids(args, spec) -> np.ndarray:
    """Token ids (B, T) int64 from --ids or --ids-file, each in 0..V-1."""
    if args.ids is not None:
        try:
            values = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError:
            raise MptcError(f"--ids must be whole numbers separated by spaces, got {args.ids!r}") from None
        for t, v in enumerate(values):  # Python ints: an id too large for int64 is still just out of range
            if not 0 <= v < spec.vocab:
                raise MptcError(f"token id {v} at position {t} (row 0) is outside the vocabulary 0..{spec.vocab - 1}")
        ids = np.array([values], dtype=np.int64)  # (1, T)
    else:
        ids = _npy(args.ids_file)
        if not np.issubdtype(ids.dtype, np.integer):
            raise MptcError(f"{args.ids_file}: token ids must be integers, got {ids.dtype}")
        ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or 0 in ids.shape:
        raise MptcError(f"token ids must be a (B, T) array with B ≥ 1 and T ≥ 1, got shape {ids.shape}")
    bad = np.argwhere((ids < 0) | (ids >= spec.vocab))
    if len(bad):
        b, t = bad[0]
        raise MptcError(f"token id {ids[b, t]} at position {t} (row {b}) is outside the vocabulary 0..{spec.vocab - 1}")
    if spec.context is not None and ids.shape[1] > spec.context:
        raise MptcError(f"{ids.shape[1]} tokens exceed the model's context of {spec.context}")
    return ids.astype(np.int64)


def _mask(path: str | None, ids: np.ndarray) -> np.ndarray:
    """attention_mask (B, T) int64 of 0 and 1; all ones without a file."""
    if path is None:
        return np.ones_like(ids)
    mask = _npy(path)
    if not (_numeric(mask) or mask.dtype == np.bool_):
        raise MptcError(f"{path}: attention_mask must hold integers 0 and 1, got {mask.dtype}")
    mask = mask[None] if mask.ndim == 1 else mask
    if mask.shape != ids.shape:
        raise MptcError(f"{path}: attention_mask has shape {mask.shape}, the ids {ids.shape}")
    bad = np.argwhere((mask != 0) & (mask != 1))
    if len(bad):
        b, t = bad[0]
        raise MptcError(f"{path}: attention_mask value {mask[b, t].item()} at position {t} (row {b}) is not 0 or 1",
                        hint="1 marks a token, 0 padding")
    return mask.astype(np.int64)


def _token_types(path: str | None, spec, ids: np.ndarray) -> np.ndarray | None:
    """token_type_ids (B, T) int64 in 0..S-1, or None (the model takes all zeros)."""
    if path is None:
        return None
    s = spec.embed.segments
    if not s:
        raise MptcError(f"model '{spec.name}' reads no token_type_ids", hint="--token-types-file is for models with "
                        "`segments` (BERT's sentence pairs); types declared in `types { … }` follow from the ids")
    types = _npy(path)
    if not np.issubdtype(types.dtype, np.integer):
        raise MptcError(f"{path}: token types must be integers, got {types.dtype}")
    types = types[None] if types.ndim == 1 else types
    if types.shape != ids.shape:
        raise MptcError(f"{path}: token_type_ids have shape {types.shape}, the ids {ids.shape}")
    bad = np.argwhere((types < 0) | (types >= s))
    if len(bad):
        b, t = bad[0]
        raise MptcError(f"{path}: token type {types[b, t]} at position {t} (row {b}) is outside 0..{s - 1}",
                        hint=f"the model has {s} segments")
    return types.astype(np.int64)


def _pixels(path: str | None, spec) -> np.ndarray:
    """pixel_values (B, C, S, S) float32."""
    p = spec.patches
    if not path:
        raise MptcError(f"model '{spec.name}' reads images", hint="pass --pixels-file X.npy or --random B")
    px = _npy(path)
    if not _numeric(px):
        raise MptcError(f"{path}: pixel_values must be numbers, got {px.dtype}")
    if px.ndim != 4 or px.shape[1:] != (p.channels, p.image, p.image) or len(px) == 0:
        raise MptcError(f"{path}: pixel_values must have shape (B, {p.channels}, {p.image}, {p.image}) with B ≥ 1, "
                        f"got {px.shape}")
    _finite(px, path, "pixel_values")
    return px.astype(np.float32)


def _conditions(path: str | None, spec, rows: int) -> np.ndarray | None:
    """The side input `conditions` (B, Cn) float32, or None for a model without one (or not reading it)."""
    from .lower import reads_conditions

    c = spec.conditions
    if not c:
        if path:
            raise MptcError(f"model '{spec.name}' reads no side input 'conditions'", hint="drop --conditions-file")
        return None
    if not path and reads_conditions(spec):
        raise MptcError(f"model '{spec.name}' reads the side input 'conditions' (B, {c})",
                        hint=f"pass --conditions-file X.npy (a (B, {c}) float array) or --random B")
    if not path:
        return None
    cond = _npy(path)
    if not _numeric(cond):
        raise MptcError(f"{path}: conditions must be numbers, got {cond.dtype}")
    cond = cond[None] if cond.ndim == 1 else cond
    if cond.ndim != 2 or cond.shape[1] != c or len(cond) == 0:
        raise MptcError(f"{path}: conditions must have shape (B, {c}), got {cond.shape}")
    if len(cond) != rows:
        raise MptcError(f"{path}: {len(cond)} conditions rows but {rows} token rows", hint="give one row per example")
    _finite(cond, path, "conditions")
    return cond.astype(np.float32)


def _numeric(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)


def _finite(x: np.ndarray, path: str, name: str) -> None:
    bad = np.argwhere(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if len(bad):
        raise MptcError(f"{path}: {name} hold NaN or infinite values (row {bad[0][0]})")


def _npy(path: str) -> np.ndarray:
    """One array from a .npy file (no pickles)."""
    if not Path(path).is_file():
        raise MptcError(f"no such file: {path}" if not Path(path).exists() else f"{path} is not a file")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # empty, not .npy, an object array
        raise MptcError(f"cannot read {path} as a .npy array: {e}", hint="write it with numpy.save") from None
    if not isinstance(x, np.ndarray):  # an .npz archive
        x.close()
        raise MptcError(f"{path} is an .npz archive, not one array", hint="write one array with numpy.save")
    return x


def cmd_run(args) -> int:
    import torch

    from .atomic import atomic_file
    from .export import run_onnx
    from .model import load, load_model

    if args.compare and not args.onnx:
        raise MptcError("--compare needs --onnx FILE (it compares PyTorch with ONNX Runtime)")
    if args.output and Path(args.output).is_dir():
        raise MptcError(f"-o {args.output} is a directory", hint="name the file to write, e.g. -o OUT.npy")
    if args.onnx and not Path(args.onnx).is_file():
        raise MptcError(f"no such ONNX file: {args.onnx}")
    if args.onnx and _choice_given(args):
        raise MptcError("--mlp, --mix, --heads, --drop-layers and --task pick a sub-network of the PyTorch module; "
                        "an ONNX file runs as it was compiled", hint="cut the sub-network out first: `mptc extract SRC "
                        "--mlp s -o SUB`, `mptc compile SUB -o SUB.onnx`, then `mptc run SUB --onnx SUB.onnx`")
    spec = load(args.spec)
    feed = _inputs(args, spec)
    torch_out = None
    if args.onnx is None or args.compare:
        model = load_model(args.spec, seed=args.seed).eval()
        ctx = contextlib.nullcontext()
        if _choice_given(args):
            from .nested import granularity

            ctx = granularity(model, args.mix, mlp=args.mlp, heads=args.heads, skip=args.drop_layers or (),
                              task=args.task)
        with torch.no_grad(), ctx:
            torch_out = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    out = torch_out
    if args.onnx:
        out = run_onnx(args.onnx, feed)
    engine = "ONNX Runtime" if args.onnx else "PyTorch"
    print(f"{spec.name} ({engine}): {spec.output} {tuple(out.shape)}")
    _print_top(spec, out, args.top, feed.get("attention_mask"))
    if args.output:
        try:
            with atomic_file(args.output, kind="array") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, out)
        except OSError as e:  # a parent that is a file, no permission, a full disk
            raise MptcError(f"cannot write {args.output}: {e.strerror or e}") from None
        print(f"wrote {args.output}")
    if args.compare:
        if out.shape != torch_out.shape:
            raise MptcError(f"{args.onnx} gives {spec.output} of shape {tuple(out.shape)}, PyTorch "
                            f"{tuple(torch_out.shape)}", hint=f"was {args.onnx} compiled from {args.spec}?")
        diff = float(np.abs(out.astype(np.float64) - torch_out.astype(np.float64)).max())
        ok = diff <= args.tol
        print(f"PyTorch vs ONNX Runtime: max abs diff {diff:.3g} ({'agree' if ok else 'DIFFER'}, tol {args.tol:g})")
        return 0 if ok else 1
    return 0


def _print_top(spec, out: np.ndarray, k: int, mask: np.ndarray | None = None) -> None:
    """What the output means, per head: an lm's top next tokens (after each row's last real position), a
    classifier's top classes or its class per token (`pool = none`), a span head's best answer span, or the
    sizes of `head none`'s hidden states. At most 8 rows; `k` ≤ 0 prints no predictions."""
    h = spec.head
    if h.kind == "none":
        b, t, d = out.shape
        print(f"  hidden states: {b} rows × {t} positions × {d} (width); head none makes no predictions")
        return
    if k <= 0:
        return
    valid = _real_positions(spec, out, mask)  # (B, T) bool; None: the output has no position axis
    for b in range(min(len(out), 8)):
        if h.kind == "classify" and out.ndim == 2:  # (B, C)
            top = np.argsort(-out[b])[:k]
            print(f"  row {b}: top classes " + ", ".join(f"{i} ({out[b, i]:.3f})" for i in top))
        elif h.kind == "classify":  # (B, T, C): a class per position
            cls = [str(int(c)) if v else "-" for c, v in zip(out[b].argmax(-1), valid[b], strict=True)]
            more = f" … ({len(cls)} positions)" if len(cls) > 32 else ""
            print(f"  row {b}: class per token (argmax; - padding) {' '.join(cls[:32])}{more}")
        elif h.kind == "span":  # (B, T, 2): start and end logits per position
            print(f"  row {b}: {_best_span(out[b], valid[b])}")
        else:  # lm, (B, T, V)
            p = int(np.flatnonzero(valid[b])[-1]) if valid[b].any() else out.shape[1] - 1
            top = np.argsort(-out[b, p])[:k]
            print(f"  row {b}: top next tokens after position {p}: "
                  + ", ".join(f"{i} ({out[b, p, i]:.3f})" for i in top))


def _real_positions(spec, out: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """(B, T) bool: the output positions that hold a token (attention_mask 1) or an image position."""
    if out.ndim != 3:
        return None
    rows, t = out.shape[:2]
    if mask is None or not spec.reads_tokens:
        return np.ones((rows, t), dtype=bool)
    image = np.ones((rows, spec.image_len), dtype=bool)
    parts = [image, mask != 0] if spec.image_first else [mask != 0, image]
    valid = np.concatenate(parts, axis=1)
    return valid if valid.shape == (rows, t) else np.ones((rows, t), dtype=bool)


def _best_span(logits: np.ndarray, valid: np.ndarray) -> str:
    """The span start ≤ end over real positions with the largest start + end logit. logits: (T, 2)."""
    pos = np.flatnonzero(valid)
    if len(pos) == 0:
        return "no real positions (all padding)"
    s, e = logits[pos, 0], logits[pos, 1]
    j = int(np.argmax(np.maximum.accumulate(s) + e))  # the end, with the best start up to it
    i = int(np.argmax(s[: j + 1]))
    return (f"best span positions {pos[i]}–{pos[j]} (start logit {s[i]:.3f} + end logit {e[j]:.3f}; "
            f"top start {pos[int(np.argmax(s))]}, top end {pos[int(np.argmax(e))]})")


def cmd_grow(args) -> int:
    from .model import load_model, save
    from .passes import CheckFailed, PassRefused, Pipeline, load_plugin
    from .passes.parse import load_pipeline
    from .summary import human

    for plugin in args.plugins:
        load_plugin(plugin)
    passes = load_pipeline(args.passes, args.passes_file)
    model = load_model(args.spec, seed=args.seed)
    try:
        new, report = Pipeline(passes)(model)
    except PassRefused as e:  # the message first (it names the pass), then which kind of error it is
        raise MptcError(f"{e.message} (refused: the pass does not apply; nothing was written)", e.span,
                        e.hint) from None
    except CheckFailed as e:
        raise MptcError(f"{e.message} (check failed: the pass ran but its result is wrong; nothing was written)",
                        e.span, e.hint) from None
    for r in report.passes:
        print(f"{r.call}: {human(r.params_before)} → {human(r.params_after)} params, max error "
              f"{r.max_abs_error_float64:.2g} (float64) / {r.max_abs_error_float32:.2g} (float32), "
              f"{len(r.tensors)} tensors, {r.seconds + r.verify_seconds:.2f} s")
        for note in r.notes:  # what the check compared, and changes made after it (upcycle_moe's noise)
            print(f"  {note}")
    save(new, args.output, extra={"report.json": json.dumps(report.to_json(), indent=2) + "\n"})
    print(f"wrote {args.output}")
    return 0


def cmd_verify(args) -> int:
    from .verify import compare

    res = compare(args.a, args.b, seed=args.seed)
    ok = res.agree(args.tol)
    note = f" (first {res.compared} outputs of {res.width_b})" if res.compared != res.width_b else ""
    print(f"{args.a} vs {args.b}: max abs error {res.max_abs:.3g}, max rel error {res.max_rel:.3g} over "
          f"{res.batches} probe batches{note}: {'agree' if ok else 'DIFFER'} (tol {args.tol:g})")
    for name, bad in ((args.a, res.nonfinite_a), (args.b, res.nonfinite_b)):
        if bad:
            print(f"{name}: {bad} outputs are NaN or infinite", file=sys.stderr)
    return 0 if ok else 1


def _choice_given(args) -> bool:
    return any(getattr(args, k, None) for k in ("mlp", "mix", "heads", "drop_layers", "task"))


def cmd_extract(args) -> int:
    from .export import export_onnx
    from .model import load_model, save
    from .passes import Extract, Pipeline
    from .summary import human

    if not _choice_given(args) and not args.kv_groups and not args.drop_least:
        raise MptcError("say what to extract", hint="--mlp 0.5, --mix \"s,s,m,l\", --heads m, --kv-groups 2, "
                        "--drop-layers 3,7 or --drop-least 1")
    model = load_model(args.spec, seed=args.seed)
    p = Extract(mlp=args.mlp, mix=args.mix, heads=args.heads, drop_layers=_ints(args.drop_layers), task=args.task,
                kv_groups=args.kv_groups, drop_least=args.drop_least, correct=args.correct, merge_kv=args.merge_kv,
                data=args.data,
                samples=args.samples, seed=args.seed)
    sub, report = Pipeline([p])(model)
    r = report.passes[0]
    if not p.exact:
        print(f"{r.call}: {human(r.params_before)} → {human(r.params_after)} params; " + "; ".join(r.notes))
    else:
        print(f"{r.call}: {human(r.params_before)} → {human(r.params_after)} params, equals the parent at that "
              f"granularity within {r.max_abs_error_float32:.2g} (float32)")
    if args.output.endswith(".onnx"):
        export_onnx(sub, args.output)
    else:
        save(sub, args.output, extra={"report.json": json.dumps(report.to_json(), indent=2) + "\n"})
    print(f"wrote {args.output}")
    return 0


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(t) for t in text.replace(" ", ",").split(",") if t]
    except ValueError:
        raise MptcError(f"layers must be indices like 3,7; got {text!r}") from None


def cmd_reorder(args) -> int:
    from .model import load_model, save
    from .passes import Pipeline, Reorder

    if args.by != "weight" and not args.data:
        raise MptcError(f"--by {args.by} needs --data FILES (calibration text, or stdlib)")
    model = load_model(args.spec, seed=args.seed)
    p = Reorder(by=args.by, what=args.what, data=args.data, samples=args.samples, seed=args.seed)
    new, report = Pipeline([p])(model)
    r = report.passes[0]
    print(f"{r.call}: {len(r.tensors)} tensors permuted, max error {r.max_abs_error_float64:.2g} (float64)")
    for note in r.notes:
        print(f"  {note}")
    save(new, args.output, extra={"report.json": json.dumps(report.to_json(), indent=2) + "\n"})
    print(f"wrote {args.output}")
    return 0


def cmd_import_hf(args) -> int:
    from .hf import import_hf

    import_hf(args.src, args.output, check=args.check, log=print)
    print(f"wrote {args.output}")
    return 0


def cmd_export_hf(args) -> int:
    from .files import WEIGHTS_FILE
    from .hf import export_hf, special_tokens
    from .model import load_model

    src = Path(args.spec)
    tokens = special_tokens(src) if (src / WEIGHTS_FILE).is_file() else None  # an import-hf dir keeps them
    export_hf(load_model(args.spec, seed=args.seed), args.output, family=args.family, tokens=tokens)
    print(f"wrote {args.output}")
    return 0


COMMANDS = {"check": cmd_check, "fmt": cmd_fmt, "summary": cmd_summary, "compile": cmd_compile, "run": cmd_run,
            "grow": cmd_grow, "verify": cmd_verify, "extract": cmd_extract, "reorder": cmd_reorder,
            "import-hf": cmd_import_hf, "export-hf": cmd_export_hf}

if __name__ == "__main__":
    sys.exit(main())
