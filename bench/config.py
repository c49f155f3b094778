"""Run modes (sizes, repetitions, time budgets) and the context the suites share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .harness import Worker
from .models import Prepared


@dataclass(frozen=True)
class Mode:
    name: str
    toy: bool = False  # toy-size models (the smoke test)
    inproc: bool = False  # run candidates in this process (toy only: memory figures are then process-wide)
    threads: int | None = None  # torch threads in the workers (None: torch's default, one per core)
    layers: int | None = None  # depth of the benchmarked models (None: as shipped, 12)
    families: tuple[str, ...] = ("gpt2", "llama")  # the models of the export and inference suites
    warm_export: bool = True  # export a toy model first in each export worker (one-time costs untimed)
    pass_limit: int | None = None  # at most this many passes per model (toy)
    shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 256))  # batch × sequence
    inf_warmup: int = 1
    inf_reps: int = 3
    inf_budget_s: float = 120.0  # per model and shape; rounds stop after min 2 reps once spent
    matmul_n: int = 2048
    depths: tuple[int, ...] = (6, 12, 24, 48)
    lower_reps: int = 7
    export_reps: int = 1
    pass_warmup: int = 1
    pass_reps: int = 2
    pass_budget_s: float = 150.0
    extract_shape: tuple[int, int] = (4, 128)
    extract_reps: int = 5
    extract_budget_s: float = 60.0


FULL = Mode("full")
QUICK = Mode("quick", layers=4, shapes=((1, 32), (2, 64)), inf_reps=3, inf_budget_s=20, lower_reps=3,
             pass_warmup=0, pass_reps=2, pass_budget_s=30, extract_shape=(1, 64), extract_reps=3, extract_budget_s=10)
TOY = Mode("toy", toy=True, inproc=True, threads=1, families=("gpt2",), warm_export=False, pass_limit=1, shapes=((1, 8), (2, 16)), inf_warmup=0, inf_reps=1, inf_budget_s=5, matmul_n=128,
           depths=(1, 2, 4), lower_reps=1, pass_warmup=0, pass_reps=1, pass_budget_s=5, extract_shape=(1, 8),
           extract_reps=1, extract_budget_s=5)
MODES = {m.name: m for m in (FULL, QUICK, TOY)}


@dataclass
class Ctx:
    mode: Mode
    root: Path  # scratch space: checkpoints, ONNX files, worker logs
    say: Callable[[str], None] = print
    models: dict[str, Prepared] = field(default_factory=dict)
    onnx: dict[str, str] = field(default_factory=dict)  # family → the ONNX file mptc exported

    def worker(self, name: str, setup: str, **kwargs) -> Worker:
        return Worker(name, setup, inproc=self.mode.inproc, log=str(self.root / "workers.log"), threads=self.mode.threads,
                      **kwargs)
