"""A small, real trainer for language models (byte-level or a tokenizer.json), MatFormer-aware, with growth.

    import mptc
    from mptc.data import read_bytes, stdlib_files
    from mptc.train import TrainConfig, Trainer, train

    model = mptc.build(mptc.load("examples/matlm.mpt"), seed=0)
    tokens = read_bytes(stdlib_files())                          # (N,) byte ids
    model, log = train(model, tokens, TrainConfig(steps=1000), out="out/matlm")
    log["eval"][-1]["losses"]                                    # {"s": …, "m": …, "l": …, "xl": …}

    trainer = Trainer.resume("out/matlm", tokens, steps=2000)    # continue from the checkpoint
    trainer.run(out="out/matlm")

Next-token cross-entropy on random windows of the training stream; the last `held_out` of the
stream is kept for evaluation (fixed, evenly spaced windows). AdamW (weight decay on matrices
only), linear warmup then cosine decay to `min_lr`·lr, gradient-norm clipping.

Nested (MatFormer) models train their granularities together: `nested="sum"` runs forward and
backward once per granularity on the same batch and takes one optimizer step on the summed
gradients (as the public MatFormer-OLMo code does); `nested="sample"` draws one granularity per
step. The granularities are the uniform ones (every nested layer at its level j, levels aligned
at the top, so `xl` is the whole model); skippable layers are not dropped in training.

Growth during training: `TrainConfig(growth=["200: grow_width(width = 128); grow_mlp(factor = 2)"])`
runs the verified growth passes (`mptc.passes`) on the live model after step 200, grows the AdamW
state with it and trains on; the schedule is checked before the first step.

A checkpoint is a model dir (model.mpt, weights.safetensors; tokenizer.json when trained with one)
plus `trainer.pt` (optimizer state, step, RNG states, config, log) and `log.json`; resuming from it
gives the same losses as an uninterrupted run, across growth too.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx

from . import distributed as D
from . import spec as S
from .atomic import atomic_dir
from .choice import Choice, level_names
from .data import BYTE_VOCAB, TOKENIZER_FILE, even_windows, split_tokens, tokenizer_from_text, tokenizer_vocab, windows
from .errors import MptcError, Source, SpecError
from .graph import spec_of
from .model import build, load_model, save
from .nested import granularity
from .outputs import check_output
from .passes import GROWTH, PassError, Pipeline
from .passes.parse import parse_passes
from .summary import human

TRAINER_FILE = "trainer.pt"
LOG_FILE = "log.json"
WHOLE = "full"  # the one granularity of a model without nesting



@dataclass
class TrainConfig:
    """Hyper-parameters of a run (all of them are saved in the checkpoint)."""

    steps: int = 1000  # optimizer steps; the schedule spans them
    batch: int = 16  # sequences per step
    seq: int | None = None  # tokens per sequence (default: the model's context)
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 0.1  # final learning rate, as a fraction of lr
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms and biases)
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    eval_every: int = 100  # held-out evaluation every N steps (and at the first and last)
    eval_batches: int = 8  # held-out batches per evaluation
    held_out: float = 0.05  # the last fraction of the token stream, never trained on
    seed: int = 0  # batch sampling, granularity sampling, dropout
    nested: str = "sum"  # MatFormer: "sum" over granularities each step, or "sample" one per step
    save_every: int = 0  # checkpoint every N steps (0: at every evaluation); the last step is always saved
    stop_at: int | None = None  # stop after this step (the schedule still spans `steps`), to resume later
    growth: list[str] = field(default_factory=list)  # "STEP: PASS(…); PASS(…)": grow after STEP steps
    regrow_warmup: int = 0  # after each growth, the LR ramps linearly from ~0 back to the schedule over N steps

    def check(self) -> None:
        for name in ("steps", "batch", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise MptcError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq is not None and self.seq < 1:
            raise MptcError(f"--seq must be at least 1, got {self.seq}")
        if self.lr <= 0 or self.warmup < 0 or self.clip < 0 or self.save_every < 0:
            raise MptcError("--lr must be positive; --warmup, --clip and --save-every not negative")
        if self.nested not in ("sum", "sample"):
            raise MptcError(f"--nested must be sum or sample, got {self.nested!r}")
        if self.stop_at is not None and self.stop_at < 1:
            raise MptcError(f"--stop-at must be at least 1, got {self.stop_at}")
        if self.regrow_warmup < 0:
            raise MptcError(f"--regrow-warmup must not be negative, got {self.regrow_warmup}")
        if not isinstance(self.growth, (list, tuple)) or not all(isinstance(g, str) for g in self.growth):
            raise MptcError('growth must be a list of "STEP: PASS(…)" strings, e.g. ["200: grow_mlp(factor = 2)"]')


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning rate of step `step` (0-based) as a fraction of the peak: warmup, then cosine."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    t = min(1.0, (step - config.warmup) / span)
    return config.min_lr + (1.0 - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def granularities(spec: S.Spec) -> dict[str, Choice]:
    """The uniform sub-networks a nested model trains, smallest first: {"s": Choice, …, "xl": whole}.

    With K the most levels any layer declares, granularity j puts each nested layer at its level
    max(0, j - (K - its level count)), so every layer reaches its whole size at the last one. A model
    without nested MLPs or heads has one granularity, "full"."""
    nests = [lv for ly in spec.layers for lv in (ly.mlp.nested, ly.attention.nested) if lv]
    if not nests:
        return {WHOLE: Choice.full(spec)}
    widest = max(nests, key=len)
    k = len(widest)

    def pick(levels: tuple[float, ...] | None, j: int) -> float:
        return 1.0 if not levels else levels[max(0, j - (k - len(levels)))]

    return {name: Choice(tuple(pick(ly.mlp.nested, j) for ly in spec.layers),
                         tuple(pick(ly.attention.nested, j) for ly in spec.layers))
            for j, name in enumerate(level_names(widest))}


def as_choice(model: fx.GraphModule, choice: Choice | None) -> contextlib.AbstractContextManager:
    """Run `model` as `choice` inside the block (a no-op for the whole model)."""
    if choice is None or (choice.is_full and "nest" not in dict(model.named_children())):
        return contextlib.nullcontext()
    return granularity(model, choice)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: fx.GraphModule, batches: list[Tensor], choice: Choice | None = None) -> float:
    """Mean held-out loss of `model` (run as `choice`) over batches of windows (B, T + 1)."""
    was = model.training
    model.eval()
    try:
        with as_choice(model, choice):
            losses = [lm_loss(model(input_ids=x[:, :-1]), x[:, 1:]).item() for x in batches]
    finally:
        model.train(was)
    return sum(losses) / len(losses)


def eval_batches(val: Tensor, n: int, batch: int, seq: int) -> list[Tensor]:
    """n fixed held-out batches of windows (batch, seq + 1), evenly spaced over `val`."""
    return list(even_windows(val, n * batch, seq + 1).split(batch))


# --- growth schedules ------------------------------------------------------------------------


@dataclass
class GrowthEvent:
    """One growth: after `step` optimizer steps the passes run, in order, on the live model."""

    step: int
    passes: list  # mptc.passes.Pass objects
    text: str  # as written: "200: grow_width(width = 128); grow_mlp(factor = 2)"
    label: str  # where it came from, for messages: "--grow 1"


def parse_growth(texts: list[str]) -> list[GrowthEvent]:
    """The schedule of "STEP: PASS(…); PASS(…)" texts, in step order (entries at one step in the order
    given). Pass text errors are located in the text, named `--grow N` (its place in the list)."""
    events = [_parse_event(t, f"--grow {i}") for i, t in enumerate(texts, 1)]
    return sorted(events, key=lambda e: e.step)


def _parse_event(text: str, label: str) -> GrowthEvent:
    head, colon, body = text.partition(":")
    if not colon or not head.strip().isdigit():
        raise MptcError(f'{label}: expected "STEP: PASS(…); PASS(…)", got {text!r}',
                        hint='e.g. --grow "200: grow_width(width = 128); grow_mlp(factor = 2)" (STEP a whole number '
                        '≥ 0: the passes run after that many steps)')
    src = " " * (len(head) + 1) + _semicolons_as_commas(body)  # same columns as `text`, so errors point into it
    try:
        passes = parse_passes(src, label, registry={p.name: p for p in GROWTH})
    except SpecError as e:
        if e.span is not None and e.span.source is not None:
            e.span = replace(e.span, source=Source(label, text))  # quote the text as written
        raise
    except PassError as e:
        raise MptcError(f"{label}: {e.message}", hint=e.hint) from None
    if not passes:
        raise MptcError(f"{label}: no passes after '{head.strip()}:'", hint='e.g. "200: grow_mlp(factor = 2)"')
    return GrowthEvent(int(head), passes, text, label)


def _semicolons_as_commas(text: str) -> str:
    """`;` between calls (outside brackets and strings) as `,`, which the pass parser separates calls by."""
    out, depth, quote = [], 0, False
    for ch in text:
        if ch == '"':
            quote = not quote
        elif not quote and ch in "([":
            depth += 1
        elif not quote and ch in ")]":
            depth -= 1
        out.append("," if ch == ";" and depth == 0 and not quote else ch)
    return "".join(out)


def check_growth(events: list[GrowthEvent], spec: S.Spec, steps: int, at: int = 0) -> None:
    """Refuse, before training, a schedule that cannot run: a step outside 0 … steps - 1 (or before `at`,
    the step a resumed run starts from), or a pass that the model, as grown by the entries before it,
    refuses. Runs every pass's `requires` (and its size check) on a meta-device model: nothing is allocated."""
    for e in events:
        if e.step >= steps:
            raise MptcError(f"{e.label}: step {e.step} is not before the last step (--steps {steps}): nothing would "
                            "train the grown model", hint=f"grow at a step from 0 to {steps - 1}, or raise --steps")
        if e.step < at:
            raise MptcError(f"{e.label}: step {e.step} is already past: the checkpoint is at step {at}",
                            hint="leave the entries that already ran as they were, or grow at a later step")
    model = build(spec, device="meta")
    for e in events:
        for p in e.passes:
            try:
                p.requires(model)
                p.fits(model)
                model = build(p.change(model).spec, device="meta")
            except PassError as err:
                raise MptcError(f"{e.label} (step {e.step}): {err.message}", hint=err.hint) from None
            except (NotImplementedError, RuntimeError):  # a pass that needs real tensors: checked when it runs
                return


def check_model(spec: S.Spec, vocab: int = BYTE_VOCAB, tokenizer: str | None = None) -> None:
    """Refuse models the trainer cannot train on data of `vocab` ids (bytes, or `tokenizer`'s tokens)."""
    data = "byte-level text" if tokenizer is None else "tokenized text"
    if spec.patches is not None or spec.head.kind != "lm":
        raise MptcError(f"model '{spec.name}' is not a language model: mptc train trains `head lm` models on "
                        f"{data}", hint="image models (e.g. examples/matvit.mpt) need an image trainer")
    if getattr(spec, "conditions", None):
        raise MptcError(f"model '{spec.name}' needs a side input (`conditions`), which {data} does not give")
    if tokenizer is not None and (spec.vocab is None or spec.vocab < vocab):
        raise MptcError(f"the tokenizer {tokenizer} has {vocab} tokens, more than model '{spec.name}''s vocab of "
                        f"{spec.vocab}", hint=f"set vocab = {vocab} (or more) in the spec")
    if spec.vocab is None or spec.vocab < vocab:
        raise MptcError(f"byte-level data needs vocab ≥ {BYTE_VOCAB}, model '{spec.name}' has {spec.vocab}",
                        hint="or train with a tokenizer of at most that many tokens (--tokenizer tokenizer.json)")


class Trainer:
    """One training run: model, data split, optimizer, schedule and RNG state; `run()` trains."""

    def __init__(self, model: fx.GraphModule, tokens: Tensor, config: TrainConfig,
                 tokenizer: str | Path | None = None, *, step: int = 0, log: dict | None = None,
                 optimizer: dict | None = None, shard: str = "ddp"):
        """tokenizer: the tokenizer.json `tokens` were made with (None: bytes), kept in checkpoints.
        step, log, optimizer: where a resumed run stands (growth already done is not done again).
        shard: in a torch.distributed process group, "ddp" (replicated weights) or "fsdp" (FSDP2)."""
        config.check()
        D.check_shard(shard)
        if D.active():
            D.check_batch(config.batch)
        self.device = D.device()
        model = model.to(self.device)
        schedule = parse_growth(list(config.growth))
        spec = spec_of(model)
        self.tokenizer_json, vocab = None, BYTE_VOCAB
        if tokenizer is not None:
            try:
                self.tokenizer_json = Path(tokenizer).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise MptcError(f"cannot read the tokenizer {tokenizer}: {getattr(e, 'strerror', None) or e}") from None
            vocab = tokenizer_vocab(tokenizer_from_text(self.tokenizer_json, str(tokenizer)))
        check_model(spec, vocab, None if tokenizer is None else str(tokenizer))
        _check_ids(tokens, spec)
        self.model, self.config, self.spec = model, config, spec
        self.seq = config.seq or spec.seq_len or 128
        if spec.seq_len is not None and self.seq > spec.seq_len:
            raise MptcError(f"--seq {self.seq} exceeds the model's context of {spec.seq_len}")
        self.train_tokens, self.val_tokens = split_tokens(tokens, config.held_out)  # (N_train,), (N_val,)
        if self.train_tokens.numel() <= self.seq + 1:
            raise MptcError(f"the training split has {self.train_tokens.numel()} tokens, too few for one window of "
                            f"{self.seq + 1}", hint="give more data or a smaller --seq")
        self.eval_x = eval_batches(self.val_tokens, config.eval_batches, config.batch, self.seq)
        self.grans = granularities(spec)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = self._optimizer(self.params)
        if optimizer is not None:
            self.opt.load_state_dict(optimizer)
        self.gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # dropout
        self.step = step
        self.log: dict = log if log is not None else {
            "config": asdict(config), "model": spec.name, "granularities": list(self.grans),
            "data_tokens": int(tokens.numel()), "train": [], "eval": []}
        self.log.setdefault("growth", [])
        if tokenizer is not None and "tokenizer" not in self.log:  # a resumed run keeps where it came from
            self.log["tokenizer"] = {"file": TOKENIZER_FILE, "vocab": vocab, "from": str(tokenizer)}
        self.pending = _not_done(schedule, self.log["growth"])  # growth still to come, in step order
        check_growth(self.pending, spec, config.steps, self.step)
        self.shard = shard if D.active() else None  # None: one process, no wrapper
        self.log["world_size"], self.log["shard"] = D.world_size(), self.shard
        self._wrap()

    # --- several processes ---------------------------------------------------------------

    def _wrap(self) -> None:
        """Wrap the model for the process group: DDP shares its parameters; FSDP2 shards them in place,
        and the optimizer is rebuilt over the shards with its state split the same way."""
        self.ddp = None
        if self.shard == "ddp":
            self.ddp = D.wrap_ddp(self.model)
        elif self.shard == "fsdp":
            names = {id(p): n for n, p in self.model.named_parameters()}
            self.param_names = [names[id(p)] for p in self.params]  # FSDP2 swaps the module's own in and out
            whole = self.opt.state_dict()
            D.shard_fsdp(self.model)
            self.params = [dict(self.model.named_parameters())[n] for n in self.param_names]
            self.opt = self._optimizer(self.params)
            order = [p for g in self.opt.param_groups for p in g["params"]]
            for i, s in whole["state"].items():
                self.opt.state[order[i]] = {k: D.shard_like(v, order[i]) for k, v in s.items()}

    def _plain(self) -> tuple[fx.GraphModule, torch.optim.Optimizer]:
        """The model and optimizer as one process holds them: whole tensors (gathered under FSDP, a
        collective every rank calls), the parameters in the optimizer's order."""
        if self.shard != "fsdp":
            return self.model, self.opt
        model = build(self.spec, D.full_model_state(self.model)).to(self.device)
        opt = self._optimizer([dict(model.named_parameters())[n] for n in self.param_names])
        opt.load_state_dict(D.full_optimizer_state(self.opt))
        return model, opt

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients over ranks at the last backward of a step only (MatFormer sums several)."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def _held_out(self, batches: list[Tensor], choice: Choice | None = None) -> float:
        """The held-out loss of the global `batches`: each rank evaluates its slice, the mean is global."""
        if self.shard is None:
            return evaluate(self.model, [x.to(self.device) for x in batches], choice)
        local = [D.local_slice(x).to(self.device) for x in batches]
        return D.mean([evaluate(self.model, local, choice)])[0]

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        """AdamW over `params`: weight decay on matrices, none on norms and biases."""
        c = self.config
        return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": c.weight_decay},
                                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=c.lr, betas=(c.beta1, c.beta2))

    # --- checkpoints ---------------------------------------------------------------------

    @classmethod
    def resume(cls, path: str | Path, tokens: Tensor, shard: str = "ddp", **overrides) -> Trainer:
        """The trainer saved in checkpoint dir `path`, ready to go on; `overrides` change config fields
        (e.g. steps=… to train longer). The interrupted run's `stop_at` is dropped unless given again.
        A checkpoint holds whole tensors: any number of processes (and either `shard`) resumes it."""
        path = Path(path)
        if not (path / TRAINER_FILE).is_file():
            raise MptcError(f"{path} is not a training checkpoint (no {TRAINER_FILE})",
                            hint="resume from the -o dir of an earlier `mptc train`")
        state = torch.load(path / TRAINER_FILE, weights_only=True, map_location="cpu")
        overrides.setdefault("stop_at", None)
        known = {f.name for f in fields(TrainConfig)}
        bad = set(overrides) - known
        if bad:
            raise MptcError(f"unknown training options: {', '.join(sorted(bad))}")
        config = TrainConfig(**{**{k: v for k, v in state["config"].items() if k in known}, **overrides})
        tokenizer = path / TOKENIZER_FILE if (path / TOKENIZER_FILE).is_file() else None
        t = cls(load_model(path), tokens, config, tokenizer, step=state["step"], log=state["log"],
                optimizer=state["optimizer"], shard=shard)
        t.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        t.log["config"] = asdict(config)
        return t

    def save(self, out: str | Path) -> Path:
        """Write the checkpoint dir `out` atomically (model dir + trainer.pt + log.json). In a process
        group only rank 0 writes (whole tensors, whatever the sharding); the others wait for it."""
        model, opt = self._plain()
        if not D.is_main():
            D.barrier()
            return Path(out)
        state = {"step": self.step, "config": asdict(self.config), "optimizer": opt.state_dict(),
                 "schedule": {"kind": "warmup+cosine", "next_lr": self.lr_at(self.step)},
                 "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "log": self.log}
        with atomic_dir(out, kind="model") as tmp:  # a checkpoint replaces only a model dir or checkpoint
            save(model, tmp / "model")
            for f in (tmp / "model").iterdir():
                f.rename(tmp / f.name)
            (tmp / "model").rmdir()
            torch.save(state, tmp / TRAINER_FILE)
            if self.tokenizer_json is not None:
                (tmp / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")
            (tmp / LOG_FILE).write_text(json.dumps(self.log, indent=1) + "\n")
        D.barrier()
        return Path(out)

    # --- training ------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step; returns its log entry."""
        c = self.config
        names = list(self.grans)
        if c.nested == "sample" and len(names) > 1:
            names = [names[int(torch.randint(len(names), (1,), generator=self.gen))]]
        x = windows(self.train_tokens, c.batch, self.seq + 1, self.gen).long()  # (B, T + 1), the same on every rank
        x = D.local_slice(x).to(self.device)  # (B / world, T + 1): this rank's rows
        net = self.ddp or self.model
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        losses = {}
        for i, name in enumerate(names):  # MatFormer: gradients of every granularity accumulate, then one step
            with self._sync(i == len(names) - 1), as_choice(self.model, self.grans[name]):
                loss = lm_loss(net(input_ids=x[:, :-1]), x[:, 1:])
                loss.backward()
            losses[name] = loss.item()
        if self.shard is not None:  # equal slices: the mean of the ranks' means is the global batch's mean
            losses = dict(zip(losses, D.mean(list(losses.values())), strict=True))
        norm = D.full(torch.nn.utils.clip_grad_norm_(self.params, c.clip if c.clip > 0 else math.inf))
        self.opt.step()
        self.step += 1
        return {"step": self.step, "loss": sum(losses.values()), "losses": losses, "lr": lr,
                "grad_norm": float(norm), "tokens": self.step * c.batch * self.seq}

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): warmup + cosine, times the re-warmup ramp
        (k + 1) / regrow_warmup for the k-th step after the latest growth."""
        c = self.config
        lr = c.lr * lr_factor(step, c)
        grown = [g["step"] for g in self.log["growth"] if g["step"] <= step]
        if c.regrow_warmup and grown and step - max(grown) < c.regrow_warmup:
            lr *= (step - max(grown) + 1) / c.regrow_warmup
        return lr

    # --- growth --------------------------------------------------------------------------

    def grow(self, event: GrowthEvent) -> dict:
        """Run `event`'s passes on the live model (verified), grow the optimizer state with it, and
        log params and the loss of one fixed held-out batch (eval mode) just before and after."""
        probe = self.eval_x[:1]  # [(B, T + 1)]
        before, n_before = self._held_out(probe), _count(self.model)
        t0 = time.perf_counter()
        plain, opt = self._plain()  # every rank grows the same whole model: same passes, same seeds
        with torch.random.fork_rng(devices=[]):  # the dropout stream does not see the growth
            model, report = Pipeline(event.passes)(plain, optimizer=opt)
        self._adopt(model, report.optimizer)
        self._wrap()
        entry = {"step": self.step, "text": event.text, "passes": [r.call for r in report.passes],
                 "params_before": n_before, "params_after": _count(self.model), "loss_before": before,
                 "loss_after": self._held_out(probe), "seconds": round(time.perf_counter() - t0, 3)}
        self.log["growth"].append(entry)
        return entry

    def _adopt(self, model: fx.GraphModule, grown: torch.optim.Optimizer) -> None:
        """Train `model` from now on, with `grown`'s state in a fresh AdamW over its parameters in the
        order a model loaded from a checkpoint has (so resuming maps the state back the same way)."""
        spec = spec_of(model)
        order = {n: i for i, (n, _) in enumerate(build(spec, device="meta").named_parameters())}
        named = sorted(model.named_parameters(), key=lambda kv: order.get(kv[0], len(order)))
        self.model, self.spec, self.grans = model, spec, granularities(spec)
        self.params = [p for _, p in named if p.requires_grad]
        self.opt = self._optimizer(self.params)
        for p in self.params:
            if p in grown.state:
                self.opt.state[p] = grown.state[p]
        self.model.train()

    def evaluate(self) -> dict:
        """Held-out loss of every granularity at the current step; appended to the log."""
        losses = {n: self._held_out(self.eval_x, ch) for n, ch in self.grans.items()}
        entry = {"step": self.step, "losses": losses}
        self.log["eval"].append(entry)
        return entry

    def run(self, out: str | Path | None = None, progress: bool = False, console=None) -> dict:
        """Train to `config.steps` (or `stop_at`), evaluating and checkpointing on the way; returns the log."""
        c = self.config
        last = min(c.steps, c.stop_at or c.steps)
        save_every = c.save_every or c.eval_every
        self.model.train()
        saved = None
        if out is not None:  # refused before training, not at the first checkpoint
            check_output(out, "model", is_dir=True)
        if self.step == 0 and not self.log["eval"]:
            self._report(self.evaluate(), console)
        with _progress(progress, console, f"train {self.spec.name}", last, self.step) as bar:
            t0, seen = time.perf_counter(), 0
            while self.step < last:
                while self.pending and self.pending[0].step == self.step:
                    self._report_growth(self.grow(self.pending.pop(0)), console)
                entry = self.train_step()
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                self.log["train"].append(entry)
                seen += c.batch * self.seq
                shown = entry["losses"].get("xl", entry["loss"]) if len(entry["losses"]) > 1 else entry["loss"]
                bar(self.step, loss=f"{shown:.3f}", tps=f"{seen / max(1e-9, time.perf_counter() - t0):,.0f}")
                if self.step % c.eval_every == 0 or self.step == last:
                    self._report(self.evaluate(), console)
                if out is not None and (self.step % save_every == 0 or self.step == last):
                    saved = self.save(out)
        if out is not None and saved is None:  # nothing left to train: still write `out`
            self.save(out)
        return self.log

    def _report_growth(self, g: dict, console) -> None:
        if console is not None:
            console.print(f"step {g['step']:>6}  grew: {'; '.join(g['passes'])}  {human(g['params_before'])} → "
                          f"{human(g['params_after'])} parameters; fixed-batch loss {g['loss_before']:.6f} → "
                          f"{g['loss_after']:.6f}")

    def _report(self, entry: dict, console) -> None:
        if console is not None:
            parts = "  ".join(f"{n} {v:.4f}" for n, v in entry["losses"].items())
            console.print(f"step {entry['step']:>6}  held-out loss  {parts}")


@contextlib.contextmanager
def _progress(show: bool, console, title: str, total: int, done: int) -> Iterator:
    """A rich progress bar showing loss and tokens/s; yields update(step, **fields)."""
    if not show:
        yield lambda step, **kw: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*cols, console=console) as p:
        task = p.add_task(title, total=total, completed=done, loss="-", tps="-")
        yield lambda step, **kw: p.update(task, completed=step, **kw)


def train(model: fx.GraphModule, tokens: Tensor, config: TrainConfig | None = None, out: str | Path | None = None,
          progress: bool = False, tokenizer: str | Path | None = None) -> tuple[fx.GraphModule, dict]:
    """Train `model` on token ids `tokens` (N,) (bytes, or `tokenizer`'s ids); returns (the trained model, log).
    The model is trained in place, unless `config.growth` grows it: then the grown model is returned.
    With `out`, checkpoints there.

    log = {"config", "granularities", "train": [{"step", "loss", "losses": {name: loss}, "lr", …}],
           "eval": [{"step", "losses": {name: held-out loss}}],
           "growth": [{"step", "passes", "params_before", "params_after", "loss_before", "loss_after", …}]}"""
    trainer = Trainer(model, tokens, config or TrainConfig(), tokenizer)
    log = trainer.run(out, progress=progress)
    return trainer.model, log


def _count(model: fx.GraphModule) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_ids(tokens: Tensor, spec: S.Spec) -> None:
    """Refuse token ids the model's vocabulary does not hold (they would fail deep inside the embedding)."""
    if tokens.numel() and (int(tokens.max()) >= (spec.vocab or 0) or int(tokens.min()) < 0):
        raise MptcError(f"the data holds token ids {int(tokens.min())} … {int(tokens.max())}, outside model "
                        f"'{spec.name}''s vocab of {spec.vocab}")


def _not_done(schedule: list[GrowthEvent], done: list[dict]) -> list[GrowthEvent]:
    """The entries of `schedule` that the log's growth entries (a resumed run's) do not account for."""
    left = Counter((g["step"], g["text"]) for g in done)
    out = []
    for e in schedule:
        if left[(e.step, e.text)] > 0:
            left[(e.step, e.text)] -= 1
        else:
            out.append(e)
    return out
