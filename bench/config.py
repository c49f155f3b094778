"""Run modes (sizes, repetitions, time budgets) and the context the suites share."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .harness import Worker

if TYPE_CHECKING:
    from .models import Prepared


@dataclass(frozen=True)
class Mode:
    name: str
    toy: bool = False  # toy-size models (the smoke test)
    inproc: bool = False  # run candidates in this process (toy only: memory figures are then process-wide)
    threads: int | None = None  # torch threads in the workers (None: torch's default, one per core)
    quiet_s: float = 3.0  # before each timed op, wait up to this long for other processes to leave the CPUs
    layers: int | None = None  # depth of the benchmarked models (None: as shipped, 12)
    families: tuple[str, ...] = ("gpt2", "llama")  # the models of the inference suite
    export_families: tuple[str, ...] = ("gpt2", "llama")  # and of the export suite (others export untimed)
    shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 256))  # batch × sequence
    inf_warmup: int = 1  # warm-up rounds at the first shape (later shapes run in warm workers)
    inf_reps: int = 15  # at most, per model and shape (the cheap shapes get them all within the budget)
    inf_min_reps: int = 5
    inf_budget_s: float = 40.0  # per model and shape: no new round after this, once inf_min_reps are done
    matmul_n: int = 4096  # the float32 peak: torch.matmul of two n × n matrices, once per round
    depths: tuple[int, ...] = (6, 12, 24, 48)
    lower_reps: int = 9
    warm_export: bool = True  # export a toy model first in each export worker (one-time costs untimed)
    export_reps: int = 1
    pass_limit: int | None = None  # at most this many passes per model (toy)
    pass_warmup: int = 0
    pass_reps: int = 4
    pass_budget_s: float = 100.0
    extract_shape: tuple[int, int] = (4, 128)
    extract_reps: int = 5
    extract_budget_s: float = 60.0
    extract_inplace: bool = True  # also time the sub-networks inside the full module
    time_limit_s: float = 840.0  # the whole run; suites shrink their repetitions when behind the plan
    plan_s: tuple[tuple[str, float], ...] = (("prepare", 30), ("lowering", 30), ("export", 150), ("inference", 330),
                                             ("growth", 150), ("extraction", 70))  # nominal seconds


FULL = Mode("full")
QUICK = Mode(
    "quick", layers=2, quiet_s=0.2, matmul_n=2048, shapes=((1, 32), (2, 64)), inf_reps=3, inf_min_reps=2,
    inf_budget_s=8, lower_reps=2, warm_export=False, export_families=("gpt2",), pass_reps=1, pass_budget_s=15,
    extract_shape=(1, 64), extract_reps=2, extract_budget_s=8, extract_inplace=False, time_limit_s=165,
    plan_s=(("prepare", 10), ("lowering", 10), ("export", 35), ("inference", 50), ("growth", 30), ("extraction", 15)),
)
TOY = Mode(
    "toy", toy=True, inproc=True, threads=1, quiet_s=0.0, families=("gpt2",), export_families=("gpt2",),
    shapes=((1, 8), (2, 16)), inf_warmup=0, inf_reps=1, inf_min_reps=1, inf_budget_s=5, matmul_n=128,
    depths=(1, 2, 4), lower_reps=1, warm_export=False, pass_limit=1, pass_reps=1, pass_budget_s=5,
    extract_shape=(1, 8), extract_reps=1, extract_budget_s=5,
)
MODES = {m.name: m for m in (FULL, QUICK, TOY)}


@dataclass
class Ctx:
    mode: Mode
    root: Path  # scratch space: checkpoints, ONNX files, worker logs
    say: Callable[[str], None] = print
    models: dict[str, Prepared] = field(default_factory=dict)
    onnx: dict[str, str] = field(default_factory=dict)  # family → the ONNX file mptc exported
    deadline: float = math.inf  # time.perf_counter() by which the run should be over
    suite_end: float = math.inf  # when the running suite should end, by the plan (scaled)
    scale: float = 1.0  # < 1 when the run is behind its plan: budgets and repetitions shrink

    def plan(self, suite: str, left: list[str]) -> None:
        """Set the running suite's share of the time left: its nominal time, scaled down if the run
        is behind (other jobs on the machine slow everything)."""
        plan = dict(self.mode.plan_s)
        now = time.perf_counter()
        nominal = sum(plan.get(s, 0) for s in left)
        self.scale = max(0.15, min(1.0, (self.deadline - now) / nominal)) if nominal else 1.0
        self.suite_end = now + plan.get(suite, 0) * self.scale if suite in plan else math.inf

    def reps(self, n: int) -> int:
        return max(1, min(n, round(n * self.scale)))

    def limits(self, budget_s: float, min_reps: int) -> dict:
        """Keyword arguments for `interleave`: this comparison's budget and the run's clocks."""
        return {"budget_s": budget_s * self.scale, "min_reps": self.reps(min_reps), "stop_at": self.suite_end,
                "hard_stop": self.deadline, "quiet_s": self.mode.quiet_s, "say": self.say}

    def worker(self, name: str, setup: str, **kwargs) -> Worker:
        return Worker(name, setup, inproc=self.mode.inproc, log=str(self.root / "workers.log"),
                      threads=self.mode.threads, **kwargs)
