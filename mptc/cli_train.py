"""`mptc train` and `mptc search` (registered into the main parser by mptc/cli.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import MptcError

TRAIN_OPTIONS = {  # flag → (TrainConfig field, type, help)
    "--steps": ("steps", int, "optimizer steps; the warmup + cosine schedule spans them (default 1000)"),
    "--batch": ("batch", int, "sequences per step (default 16)"),
    "--seq": ("seq", int, "tokens per sequence (default: the model's context)"),
    "--lr": ("lr", float, "peak learning rate (default 3e-3)"),
    "--min-lr": ("min_lr", float, "final learning rate as a fraction of --lr (default 0.1)"),
    "--warmup": ("warmup", int, "linear warmup steps (default 100)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay on matrices (default 0.1)"),
    "--clip": ("clip", float, "max gradient norm, 0 = off (default 1.0)"),
    "--eval-every": ("eval_every", int, "held-out evaluation every N steps (default 100)"),
    "--eval-batches": ("eval_batches", int, "held-out batches per evaluation (default 8)"),
    "--held-out": ("held_out", float, "the last fraction of the token stream kept for evaluation (default 0.05)"),
    "--seed": ("seed", int, "weight init (spec SRC), batch sampling and dropout seed (default 0)"),
    "--save-every": ("save_every", int, "checkpoint every N steps (default: at every evaluation)"),
    "--stop-at": ("stop_at", int, "stop after this step and checkpoint; the schedule still spans --steps"),
    "--regrow-warmup": ("regrow_warmup", int, "after each --grow, ramp the learning rate linearly from ~0 back to "
                        "the schedule over N steps (default 0: no re-warmup)"),
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the `mptc` parser."""
    c = sub.add_parser("train", help="train a language model on byte-level text (MatFormer-aware)",
                       description="Train SRC (a spec or a model dir) on the bytes of --data files: AdamW, warmup + "
                       "cosine decay, gradient clipping, held-out evaluation, checkpoints in OUT_DIR (model dir + "
                       "trainer.pt + log.json). Nested models train every granularity (s, m, l, xl): their losses "
                       "are summed each step (--nested sum, as in MatFormer) or one is sampled per step (--nested "
                       "sample). --resume DIR goes on from a checkpoint with the same losses as an uninterrupted run.")
    c.add_argument("spec", metavar="SRC", nargs="?", help="spec file or model dir (optional with --resume)")
    c.add_argument("--data", nargs="+", metavar="FILE", help="text files or directories, or `stdlib` (the Python "
                   "standard library's source); optional with --resume (the checkpoint's data)")
    for flag, (_, typ, text) in TRAIN_OPTIONS.items():
        c.add_argument(flag, type=typ, metavar="N" if typ is int else "X", help=text)
    c.add_argument("--nested", choices=("sum", "sample"), help="MatFormer loss: sum over granularities each step "
                   "(default) or one sampled granularity per step")
    c.add_argument("--resume", metavar="DIR", help="go on from this checkpoint (an earlier OUT_DIR)")
    c.add_argument("--grow", action="append", metavar='"STEP: PASS(…); …"', help="after STEP steps, grow the model "
                   "with verified growth passes (as `mptc grow -p` takes them, `;` between passes) and train on; "
                   'repeatable, e.g. --grow "200: grow_width(width = 128); grow_mlp(factor = 2)"')
    c.add_argument("--tokenizer", metavar="tokenizer.json", help="a Hugging Face tokenizer.json: train on its tokens "
                   "instead of bytes (kept in OUT_DIR; the model's vocab must hold its tokens)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar (evaluation lines only)")
    c.add_argument("--nproc", type=int, metavar="N", help="train on N local processes: runs this command under "
                   "torch.distributed.run (as `torchrun --nproc_per_node N -m mptc train …` does); --batch is the "
                   "global batch and must divide by N")
    c.add_argument("--shard", choices=("ddp", "fsdp"), default="ddp", help="with several processes: replicate the "
                   "weights (ddp, DistributedDataParallel, the default) or shard them and the optimizer state (fsdp, "
                   "FSDP2 fully_shard)")
    _threads_arg(c)
    c.add_argument("-o", "--output", required=True, metavar="OUT_DIR")

    c = sub.add_parser("search", help="Mix'n'Match: per-layer MLP granularities under a size budget",
                       description="Pick per-layer MLP granularities of a nested model under a parameter or FLOP "
                       "budget: MatFormer's heuristic (the largest configuration whose granularity never decreases "
                       "with depth and steps up at most one level between layers) and, with --data, a measured "
                       "search on held-out loss that keeps the Pareto front of size vs loss.")
    c.add_argument("spec", metavar="SRC", help="a trained nested model dir (or a spec: random weights)")
    c.add_argument("--budget", required=True, metavar="params=N|flops=N",
                   help="e.g. params=600K or flops=1.2M (forward FLOPs per token)")
    c.add_argument("--data", nargs="+", metavar="FILE", help="text for the held-out evaluation, or `stdlib` "
                   "(default: the data SRC was trained on, when it is an `mptc train` checkpoint)")
    c.add_argument("--family", choices=("monotone", "all"), default="monotone",
                   help="candidates: non-decreasing granularities with depth (default) or every configuration")
    c.add_argument("--what", default="mlp", metavar="mlp,heads,layers", help="a model without nesting: what the "
                   "greedy per-layer search may cut: MLP units, kv groups, whole layers (default mlp; reorder first)")
    c.add_argument("--step", type=float, default=1 / 8, metavar="X", help="a model without nesting: the fraction "
                   "of a layer's MLP one cut removes (default 1/8)")
    c.add_argument("--correct", choices=("none", "lsq"), default="none", help="a model without nesting: lsq "
                   "measures each candidate cut with its projection refit by ridge least squares, as `mptc extract "
                   "--correct lsq` refits it, so the widths are chosen for the corrected model (default none)")
    c.add_argument("--eval-batches", type=int, default=4, help="held-out batches per candidate (default 4)")
    c.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    c.add_argument("--seq", type=int, help="tokens per sequence (default: the model's context)")
    c.add_argument("--held-out", type=float, help="held-out fraction at the end of the data (default: the "
                   "checkpoint's, else 0.05)")
    c.add_argument("--plot", metavar="OUT.png", help="write the loss-vs-size plot")
    c.add_argument("--json", metavar="OUT.json", help="write the candidates, front and picks as JSON")
    c.add_argument("--seed", type=int, default=0, help="weight seed for a spec SRC (default 0)")
    _threads_arg(c)


def _threads_arg(c: argparse.ArgumentParser) -> None:
    c.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice; 1 is often "
                   "faster for small models on a busy machine; resume with the same count for identical losses)")


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise MptcError(f"--threads must be at least 1, got {n}")
        import torch

        torch.set_num_threads(n)


def _tokens(data: list[str], console=None, tokenizer: str | Path | None = None):
    """The token ids of the `--data` sources: bytes, or the ids of the tokenizer.json at `tokenizer`."""
    from .data import load_tokenizer, read_tokens, resolve_sources

    files = resolve_sources(data)
    tokens = read_tokens(files, None if tokenizer is None else load_tokenizer(tokenizer))
    if console is not None:
        console.print(f"data: {len(files)} files, {tokens.numel():,} " + ("bytes" if tokenizer is None else
                                                                          f"tokens ({tokenizer})"))
    return tokens


def _resume_tokenizer(resume: str, given: str | None) -> Path | None:
    """The tokenizer a resumed run uses: the checkpoint's; --tokenizer may only name the same one."""
    from .data import TOKENIZER_FILE

    saved = Path(resume) / TOKENIZER_FILE
    saved = saved if saved.is_file() else None
    if given is not None:
        try:
            same = saved is not None and Path(given).read_bytes() == saved.read_bytes()
        except OSError as e:
            raise MptcError(f"cannot read the tokenizer {given}: {e.strerror}") from None
        if not same:
            raise MptcError(f"--tokenizer {given} is not the tokenizer {resume} was trained with "
                            f"({saved or 'bytes, no tokenizer'})", hint="leave out --tokenizer to resume with the "
                            "checkpoint's own")
    return saved


def cmd_train(args) -> int:
    from . import distributed as D

    if args.nproc is not None and not D.launched():
        from .train import TrainConfig

        batch = args.batch if args.batch is not None else None if args.resume else TrainConfig().batch
        if batch is not None:  # a resumed run's batch is the checkpoint's: its processes check it
            D.check_batch(batch, args.nproc)
        return D.launch(_launch_args(args), args.nproc)
    with D.session():
        return _train(args)


def _launch_args(args) -> list[str]:
    """The `mptc train` arguments of `args` without --nproc, for each launched process."""
    out = ["train", *([args.spec] if args.spec else [])]
    if args.data:
        out += ["--data", *args.data]
    for flag in TRAIN_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            out += [flag, repr(value)]
    for flag in ("--nested", "--resume", "--tokenizer", "--threads", "--shard"):
        value = getattr(args, flag[2:])
        if value is not None:
            out += [flag, str(value)]
    for g in args.grow or []:
        out += ["--grow", g]
    out += ["--no-progress"] * bool(args.no_progress) + ["--force"] * bool(getattr(args, "force", False))
    return [*out, "-o", args.output]


def _train(args) -> int:
    from rich.console import Console

    from . import distributed as D
    from . import train as T
    from .model import load, load_model
    from .summary import human

    _set_threads(args.threads)
    console = Console(stderr=False, highlight=False, quiet=not D.is_main())  # rank 0 speaks for the group
    given = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in TRAIN_OPTIONS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if args.nested is not None:
        given["nested"] = args.nested
    if args.grow is not None:
        given["growth"] = list(args.grow)
    if args.resume:
        state = _checkpoint_log(args.resume)
        data = args.data or state.get("data")
        if not data:
            raise MptcError("the checkpoint does not record its data", hint="pass --data FILES…")
        if args.spec and load(args.spec) != load(args.resume):
            raise MptcError(f"{args.spec} is not the model saved in {args.resume}",
                            hint="leave SRC out to resume the checkpoint's model")
        tokens = _tokens(data, console, _resume_tokenizer(args.resume, args.tokenizer))
        trainer = T.Trainer.resume(args.resume, tokens, shard=args.shard, **given)
        if trainer.log.get("data_tokens") != tokens.numel():
            console.print(f"[yellow]warning: the checkpoint was trained on {trainer.log.get('data_tokens'):,} bytes, "
                          f"--data has {tokens.numel():,}: the split differs[/]")
        console.print(f"resuming {trainer.spec.name} at step {trainer.step} from {args.resume}")
    else:
        if not args.spec:
            raise MptcError("say what to train", hint="mptc train SRC --data FILES… -o OUT_DIR (or --resume DIR)")
        if not args.data:
            raise MptcError("no training data given", hint="pass --data FILES…, or --data stdlib for the Python "
                            "standard library's source (byte-level text every machine has)")
        data = args.data
        model = load_model(args.spec, seed=given.get("seed", 0))
        config = T.TrainConfig(**given)
        config.check()
        D.check_batch(config.batch)
        spec = model.meta["mptc.spec"]
        if args.tokenizer is None:
            T.check_model(spec)
        else:
            from .data import load_tokenizer, tokenizer_vocab

            T.check_model(spec, tokenizer_vocab(load_tokenizer(args.tokenizer)), args.tokenizer)
        T.check_growth(T.parse_growth(config.growth), spec, config.steps)  # refused before the data is read
        tokens = _tokens(args.data, console, args.tokenizer)
        trainer = T.Trainer(model, tokens, config, args.tokenizer, shard=args.shard)
    trainer.log["data"] = list(data)
    spec, c = trainer.spec, trainer.config
    grans = ", ".join(trainer.grans)
    unit = "bytes" if trainer.tokenizer_json is None else "tokens"
    console.print(f"{spec.name}: {human(sum(p.numel() for p in trainer.params))} parameters; granularities {grans}"
                  f"{f' ({c.nested})' if len(trainer.grans) > 1 else ''}; {trainer.train_tokens.numel():,} train / "
                  f"{trainer.val_tokens.numel():,} held-out {unit}; batch {c.batch} × {trainer.seq}")
    if trainer.shard is not None:
        console.print(f"{D.world_size()} processes ({D.backend()}, {trainer.shard}): each takes "
                      f"{c.batch // D.world_size()} of the {c.batch} sequences of a step")
    trainer.run(args.output, progress=not args.no_progress and D.is_main(), console=console)
    last = trainer.log["eval"][-1]
    console.print(f"step {trainer.step}: held-out loss " + ", ".join(f"{n} {v:.4f}" for n, v in last["losses"].items()))
    console.print(f"wrote {args.output}")
    return 0


def _checkpoint_log(path: str) -> dict:
    p = Path(path) / "log.json"
    if not p.is_file():
        raise MptcError(f"{path} is not a training checkpoint (no log.json)",
                        hint="resume from the -o dir of an earlier `mptc train`")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise MptcError(f"cannot read {p}: {e}") from None


def cmd_search(args) -> int:
    from rich.console import Console

    from . import search as M
    from .data import split_tokens
    from .model import load_model
    from .summary import human
    from .train import check_model, eval_batches

    _set_threads(args.threads)
    console = Console(highlight=False)
    budget = M.parse_budget(args.budget)
    if args.eval_batches < 1 or args.batch < 1:
        raise MptcError("--eval-batches and --batch must be at least 1")
    model = load_model(args.spec, seed=args.seed).eval()
    spec = model.meta["mptc.spec"]
    trained = Path(args.spec).is_dir() and (Path(args.spec) / "log.json").is_file()
    log = _checkpoint_log(args.spec) if trained else {}
    data = args.data or log.get("data")
    batches = None
    if data:
        from .data import TOKENIZER_FILE, load_tokenizer, tokenizer_vocab

        tokenizer = Path(args.spec) / TOKENIZER_FILE if trained else None  # a checkpoint's data is its tokens
        if tokenizer is not None and tokenizer.is_file():
            check_model(spec, tokenizer_vocab(load_tokenizer(tokenizer)), str(tokenizer))
        else:
            tokenizer = None
            check_model(spec)
        seq = args.seq or spec.seq_len or 128
        held_out = args.held_out or log.get("config", {}).get("held_out", 0.05)
        _, val = split_tokens(_tokens(data, console, tokenizer), held_out)
        batches = eval_batches(val, args.eval_batches, args.batch, seq)
    elif args.plot:
        raise MptcError("--plot needs held-out losses", hint="pass --data FILES… (or search a trained checkpoint)")
    if batches is not None and not Path(args.spec).is_dir():
        console.print("[yellow]note: SRC is a spec, so its weights are random; search a trained model dir[/]")
    if not spec.nested:
        return _search_plain(args, model, budget, batches, console)
    if args.correct != "none":
        raise MptcError(f"--correct {args.correct} applies to the per-layer search of a model without nesting; "
                        f"'{spec.name}' is nested", hint="pick its granularities without --correct, then refit the "
                        "extracted model with `mptc extract … --correct lsq`")

    from rich.progress import Progress

    with Progress(console=console, transient=True) as p:
        task = p.add_task("evaluating candidates", total=None)
        result = M.search(model, budget, batches, args.family, progress=lambda i, n: p.update(task, completed=i,
                                                                                             total=n))
    console.print(M.table(result))
    h = result.heuristic
    console.print(f"heuristic pick (largest slowly increasing mix under {budget}): {h.mix}  {human(h.params)} params, "
                  f"{human(h.flops)} FLOPs/token" + (f", loss {h.loss:.4f}" if h.loss is not None else ""))
    if result.best is not None:
        b = result.best
        console.print(f"best measured: {b.mix}  {human(b.params)} params, {human(b.flops)} FLOPs/token, "
                      f"loss {b.loss:.4f}")
        console.print(f"extract it: mptc extract {args.spec} --mix \"{b.mix}\" -o OUT")
    else:
        console.print("(no --data: heuristic only; pass --data FILES… for the measured front)")
    if args.json:
        M.write_json(result, args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        M.plot(result, args.plot, title=f"{spec.name}: Mix'n'Match under {budget}")
        console.print(f"wrote {args.plot}")
    return 0


def _search_plain(args, model, budget, batches, console) -> int:
    """Per-layer widths of a model without nesting: the greedy search, then the extract command."""
    from . import search as M
    from .atomic import atomic_file
    from .passes.correct import DEFAULT_RIDGE
    from .summary import human

    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    bad = [w for w in what if w not in ("mlp", "heads", "layers")]
    if bad or not what:
        raise MptcError(f"--what takes mlp, heads and layers (comma-separated), got {args.what!r}")
    if batches is None:
        raise MptcError("a model without nesting is searched on measured losses", hint="pass --data FILES… "
                        "(or stdlib)")
    if not 0 < args.step <= 0.5:
        raise MptcError(f"--step must be a fraction in (0, 1/2], got {args.step}")
    cal = [{"input_ids": x} for x in batches]
    ridge = DEFAULT_RIDGE if args.correct == "lsq" else None
    result = M.plain_search(model, budget, cal, what, args.step, refit_ridge=ridge)
    console.print(f"per-layer widths under {budget} ({len(result.steps)} cuts, greedy on the loss of "
                  f"{sum(len(x) for x in batches)} windows):")
    console.print(f"  MLP kept per layer: {result.mix}")
    if any(f < 1 for f in result.heads):
        console.print(f"  kv groups kept per layer: {result.heads_text}")
    if result.skip:
        console.print(f"  layers left out: {', '.join(map(str, result.skip))}")
    console.print(f"  {human(result.params)} params, {human(result.flops)} FLOPs/token, loss {result.loss:.4f} "
                  + ("(the cuts refit by least squares)" if ridge is not None else "(before any correction)"))
    data = " ".join(args.data) if args.data else "FILES"
    console.print(f"extract it: mptc extract {args.spec} " + " ".join(
        f'{a} "{b}"' if a in ("--mix", "--heads") else f"{a} {b}" for a, b in
        zip(result.extract_args()[::2], result.extract_args()[1::2], strict=True)) +
        f" --correct lsq --data {data} -o OUT")
    if args.json:
        with atomic_file(args.json, kind="search") as tmp:
            tmp.write_text(json.dumps(result.to_json() | {"correct": args.correct}, indent=1) + "\n")
        console.print(f"wrote {args.json}")
    return 0


COMMANDS = {"train": cmd_train, "search": cmd_search}
