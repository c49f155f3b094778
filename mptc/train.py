"""A small, real trainer for byte-level language models, MatFormer-aware.

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

A checkpoint is a model dir (model.mpt, weights.safetensors) plus `trainer.pt` (optimizer
state, step, RNG states, config, log) and `log.json`; resuming from it gives the same losses
as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx

from . import spec as S
from .atomic import atomic_dir
from .data import BYTE_VOCAB, even_windows, split_tokens, windows
from .errors import MptcError
from .model import load_model, save, spec_of
from .nested import Choice, granularity, level_names

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


def check_model(spec: S.Spec) -> None:
    """Refuse models the byte-level trainer cannot train."""
    if spec.patches is not None or spec.head.kind != "lm":
        raise MptcError(f"model '{spec.name}' is not a language model: mptc train trains `head lm` models on "
                        "byte-level text", hint="image models (e.g. examples/matvit.mpt) need an image trainer")
    if getattr(spec, "conditions", None):
        raise MptcError(f"model '{spec.name}' needs a side input (`conditions`), which byte-level text does not give")
    if spec.vocab is None or spec.vocab < BYTE_VOCAB:
        raise MptcError(f"byte-level data needs vocab ≥ {BYTE_VOCAB}, model '{spec.name}' has {spec.vocab}")


class Trainer:
    """One training run: model, data split, optimizer, schedule and RNG state; `run()` trains."""

    def __init__(self, model: fx.GraphModule, tokens: Tensor, config: TrainConfig):
        config.check()
        spec = spec_of(model)
        check_model(spec)
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
        decay = [p for p in self.params if p.ndim >= 2]
        rest = [p for p in self.params if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}],
                                     lr=config.lr, betas=(config.beta1, config.beta2))
        self.gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # dropout
        self.step = 0
        self.log: dict = {"config": asdict(config), "model": spec.name, "granularities": list(self.grans),
                          "data_tokens": int(tokens.numel()), "train": [], "eval": []}

    # --- checkpoints ---------------------------------------------------------------------

    @classmethod
    def resume(cls, path: str | Path, tokens: Tensor, **overrides) -> Trainer:
        """The trainer saved in checkpoint dir `path`, ready to go on; `overrides` change config fields
        (e.g. steps=… to train longer). The interrupted run's `stop_at` is dropped unless given again."""
        path = Path(path)
        if not (path / TRAINER_FILE).is_file():
            raise MptcError(f"{path} is not a training checkpoint (no {TRAINER_FILE})",
                            hint="resume from the -o dir of an earlier `mptc train`")
        state = torch.load(path / TRAINER_FILE, weights_only=True)
        overrides.setdefault("stop_at", None)
        known = {f.name for f in fields(TrainConfig)}
        bad = set(overrides) - known
        if bad:
            raise MptcError(f"unknown training options: {', '.join(sorted(bad))}")
        config = TrainConfig(**{**{k: v for k, v in state["config"].items() if k in known}, **overrides})
        t = cls(load_model(path), tokens, config)
        t.opt.load_state_dict(state["optimizer"])
        t.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        t.step = state["step"]
        t.log = state["log"]
        t.log["config"] = asdict(config)
        return t

    def save(self, out: str | Path) -> Path:
        """Write the checkpoint dir `out` atomically (model dir + trainer.pt + log.json)."""
        state = {"step": self.step, "config": asdict(self.config), "optimizer": self.opt.state_dict(),
                 "schedule": {"kind": "warmup+cosine", "next_lr": self.config.lr * lr_factor(self.step, self.config)},
                 "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "log": self.log}
        with atomic_dir(out) as tmp:
            save(self.model, tmp / "model")
            for f in (tmp / "model").iterdir():
                f.rename(tmp / f.name)
            (tmp / "model").rmdir()
            torch.save(state, tmp / TRAINER_FILE)
            (tmp / LOG_FILE).write_text(json.dumps(self.log, indent=1) + "\n")
        return Path(out)

    # --- training ------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step; returns its log entry."""
        c = self.config
        names = list(self.grans)
        if c.nested == "sample" and len(names) > 1:
            names = [names[int(torch.randint(len(names), (1,), generator=self.gen))]]
        x = windows(self.train_tokens, c.batch, self.seq + 1, self.gen).long()  # (B, T + 1)
        lr = c.lr * lr_factor(self.step, c)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        losses = {}
        for name in names:  # MatFormer: gradients of every granularity accumulate, then one step
            with as_choice(self.model, self.grans[name]):
                loss = lm_loss(self.model(input_ids=x[:, :-1]), x[:, 1:])
                loss.backward()
            losses[name] = loss.item()
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.clip if c.clip > 0 else math.inf)
        self.opt.step()
        self.step += 1
        return {"step": self.step, "loss": sum(losses.values()), "losses": losses, "lr": lr,
                "grad_norm": float(norm), "tokens": self.step * c.batch * self.seq}

    def evaluate(self) -> dict:
        """Held-out loss of every granularity at the current step; appended to the log."""
        losses = {n: evaluate(self.model, self.eval_x, ch) for n, ch in self.grans.items()}
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
        if self.step == 0 and not self.log["eval"]:
            self._report(self.evaluate(), console)
        with _progress(progress, console, f"train {self.spec.name}", last, self.step) as bar:
            t0, seen = time.perf_counter(), 0
            while self.step < last:
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
          progress: bool = False) -> tuple[fx.GraphModule, dict]:
    """Train `model` in place on byte ids `tokens` (N,); returns (model, log). With `out`, checkpoints there.

    log = {"config", "granularities", "train": [{"step", "loss", "losses": {name: loss}, "lr", …}],
           "eval": [{"step", "losses": {name: held-out loss}}]}"""
    trainer = Trainer(model, tokens, config or TrainConfig())
    return model, trainer.run(out, progress=progress)
