"""Worker processes, interleaved timing and peak memory.

Every candidate lives in its own worker process (spawned, so each starts clean): the worker runs a
*setup* once (load a model, open a session) and then runs named *ops* on request. The coordinator
runs the candidates of one comparison in rounds, one op at a time, in a new order each round,
so that a load spike from another process hits candidates and baselines alike; ratios are taken per
round (same round = same conditions) and summarised by their median.

Peak memory is measured around each op inside its worker: the kernel's resident high-water mark
(VmHWM) is reset through /proc/self/clear_refs before the op, freed heap is returned to the system
first (malloc_trim), and the op's peak is VmHWM after it minus VmRSS before it. torch's and ONNX
Runtime's allocations are ordinary process memory, so they are all seen (tracemalloc sees none of
them). Without clear_refs (not Linux), ru_maxrss deltas are used instead: a lower bound.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
Op = Callable[[], "dict | None"]


# --- memory -----------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes (empty where /proc is missing)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ru_maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def measure(op: Op, collect: bool = True) -> dict:
    """Run `op` once: seconds, peak memory above the resident set before it, and the process peak."""
    if collect:  # free garbage first, so that the resident set before the op is what the op starts from
        gc.collect()
    _trim()
    exact = _reset_peak()
    before, ru0 = _status(), _ru_maxrss()
    t0 = time.perf_counter()
    info = op() or {}
    dt = time.perf_counter() - t0
    after = _status()
    if exact and "VmHWM" in after:
        peak, hwm = after["VmHWM"] - before["VmRSS"], after["VmHWM"]
    else:
        hwm = _ru_maxrss()
        peak = max(0, hwm - ru0)
    return {"seconds": dt, "peak": max(0, peak), "hwm": hwm, "info": info}


def setup_probe(mib: int = 64):
    """A worker with one op that allocates and fills `mib` MiB: checks the harness and its memory
    measurement without loading torch (the smoke test uses it)."""
    if mib < 0:
        raise ValueError(f"cannot allocate {mib} MiB")

    def op():
        buf = bytearray(mib * MiB)  # zero-filled: every page is touched
        return {"bytes": len(buf)}

    return {"alloc": op}, {"pid": os.getpid()}


# --- the worker side ----------------------------------------------------------------------------


def _resolve(path: str) -> Callable:
    mod, name = path.split(":")
    return getattr(importlib.import_module(mod), name)


def _serve(conn, setup: str, kwargs: dict, log: str | None, threads: int | None = None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    if log:  # exporters and libraries print to the terminal; keep their chatter in a log file
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        t0 = time.perf_counter()
        ops, info = _resolve(setup)(**kwargs)
        info = {**info, "setup_seconds": time.perf_counter() - t0, "rss": _status().get("VmRSS", 0)}
        conn.send(("ready", info))
    except BaseException:  # noqa: BLE001 - the coordinator reports it
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            return
        try:
            conn.send(("done", measure(ops[msg])))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


# --- the coordinator side -----------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    """A setup function (`"module:function"`, returning `(ops, info)`) running in its own process,
    or in this one with `inproc=True` (toy runs and tests)."""

    def __init__(self, name: str, setup: str, inproc: bool = False, log: str | None = None, threads: int | None = None,
                 **kwargs):
        self.name, self.setup, self.kwargs, self.inproc, self.log = name, setup, kwargs, inproc, log
        self.threads = threads
        self.info: dict = {}
        self.error: str | None = None
        self._ops: dict[str, Op] | None = None
        self._proc = self._conn = None

    def start(self) -> Worker:
        if self.inproc:
            try:
                t0 = time.perf_counter()
                self._ops, info = _resolve(self.setup)(**self.kwargs)
                self.info = {**info, "setup_seconds": time.perf_counter() - t0}
            except Exception:  # noqa: BLE001
                self.error = traceback.format_exc()
            return self
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        args = (child, self.setup, self.kwargs, self.log, self.threads)
        self._proc = ctx.Process(target=_serve, args=args, daemon=True)
        self._proc.start()
        child.close()
        return self

    def wait(self, timeout: float = 900) -> Worker:
        if self.inproc or self._conn is None or self.info or self.error:
            return self
        if not self._conn.poll(timeout):
            self.error = f"setup did not finish in {timeout:.0f} s"
            self.close()
            return self
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            kind, payload = "error", f"worker exited during setup (exit code {self._proc.exitcode})"
        if kind == "ready":
            self.info = payload
        else:
            self.error = payload
            self.close()
        return self

    @property
    def ok(self) -> bool:
        return self.error is None

    def run(self, op: str) -> dict:
        if self.error:
            raise WorkerError(self.error)
        if self.inproc:
            return measure(self._ops[op], collect=False)
        self._conn.send(op)
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise WorkerError(f"{self.name} died running {op} (exit code {self._proc.exitcode})") from None
        if kind != "done":
            raise WorkerError(payload)
        return payload

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=10)
            self._proc = None
        self._ops = None


def start_all(workers: list[Worker], timeout: float = 900) -> list[Worker]:
    """Start workers together (their setups overlap; nothing is timed while they run) and wait."""
    for w in workers:
        w.start()
    for w in workers:
        w.wait(timeout)
    return workers


def close_all(workers: list[Worker]) -> None:
    for w in workers:
        w.close()


# --- other processes -------------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def busy(window: float = 0.1) -> float | None:
    """Fraction of all cores busy over `window` seconds (our workers are idle while this runs, so it is
    other processes' load); None where /proc/stat is missing."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_quiet(max_wait: float | None, threshold: float = 0.25) -> float | None:
    """Wait (at most `max_wait` s) until other processes use less than `threshold` of the machine;
    return the busy fraction when the op may start. `None`: do not look (no pause either)."""
    if max_wait is None:
        return None
    t0 = time.perf_counter()
    while True:
        b = busy()
        if b is None or b < threshold or time.perf_counter() - t0 >= max_wait:
            return b
        time.sleep(0.2)


# --- statistics -----------------------------------------------------------------------------------


BUSY = 0.25  # other processes held more than this share of the CPUs as a run began: a contended run
MIN_CLEAN = 3  # medians and ratios use only uncontended runs when there are at least this many


@dataclass
class Stats:
    """The timed runs of one candidate: `times[i]` ran in round i."""

    name: str
    times: list[float] = field(default_factory=list)
    warmup: list[float] = field(default_factory=list)
    busy: list[float | None] = field(default_factory=list)  # other processes' CPU share as each timed run began
    peak: int = 0  # bytes above the resident set before the op, max over all runs
    hwm: int = 0  # the process's peak resident set, max over all runs
    info: dict = field(default_factory=dict)  # what the op returned: medians over timed runs of numbers
    infos: list[dict] = field(default_factory=list)
    error: str | None = None

    def clean(self) -> list[bool]:
        """Per timed run: whether the machine was quiet as it began."""
        b = self.busy + [None] * (len(self.times) - len(self.busy))
        return [x is None or x < BUSY for x in b[: len(self.times)]]

    @property
    def used(self) -> list[float]:
        """The runs the median is taken over: the uncontended ones when there are enough."""
        clean = [t for t, ok in zip(self.times, self.clean(), strict=True) if ok]
        return clean if len(clean) >= MIN_CLEAN else self.times

    @property
    def median(self) -> float:
        return statistics.median(self.used) if self.times else float("nan")

    @property
    def best(self) -> float:
        return min(self.times) if self.times else float("nan")

    def to_json(self) -> dict:
        return {"median_s": _num(self.median), "min_s": _num(self.best), "times_s": [round(t, 6) for t in self.times],
                "warmup_s": [round(t, 6) for t in self.warmup], "peak_mib": round(self.peak / MiB, 1),
                "process_peak_mib": round(self.hwm / MiB, 1), "error": self.error,
                "busy_at_start": [None if b is None else round(b, 2) for b in self.busy],
                "runs_used": len(self.used),
                **({"info": self.info} if self.info else {})}


def _num(x: float) -> float | None:
    return None if x != x else round(x, 6)  # NaN → null in JSON


def _pairs(a: Stats, b: Stats) -> list[float]:
    """Per round, a's time / b's time: over the rounds where both began on a quiet machine, when
    there are enough of them."""
    rounds = list(zip(a.times, b.times, a.clean(), b.clean(), strict=False))
    pairs = [x / y for x, y, ca, cb in rounds if y > 0 and ca and cb]
    return pairs if len(pairs) >= MIN_CLEAN else [x / y for x, y, _, _ in rounds if y > 0]


def ratio(a: Stats, b: Stats) -> float:
    """Median over rounds of a's time / b's time in the same round (NaN when either is missing)."""
    pairs = _pairs(a, b)
    return statistics.median(pairs) if pairs else float("nan")


def spread(a: Stats, b: Stats) -> list[float] | None:
    """The middle half (quartiles) of the per-round ratios behind `ratio`: how far one run's ratio
    can be trusted on this machine."""
    pairs = _pairs(a, b)
    if len(pairs) < 4:
        return None
    q = statistics.quantiles(pairs, n=4)
    return [round(q[0], 4), round(q[2], 4)]


def interleave(cands: dict[str, tuple[Worker, str]], warmup: int = 1, reps: int = 3, budget_s: float | None = None,
               min_reps: int = 2, quiet_s: float = 0.0, stop_at: float | None = None, hard_stop: float | None = None,
               say: Callable[[str], None] | None = None) -> dict[str, Stats]:
    """Run every candidate (a worker and one of its ops) in rounds, in a new order each round (seeded
    shuffles, so no candidate always follows the same one).

    `warmup` rounds are discarded (kept in `Stats.warmup`). After `min_reps` timed rounds, no new
    round starts once `budget_s` has passed or the clock (`time.perf_counter`) is past `stop_at`;
    past `hard_stop`, none starts after the first timed round. Before each op, wait up to `quiet_s`
    for other processes to leave the CPUs (at least 0.1 s, which also lets the previous op's spinning
    threads go idle), spending at most a tenth of the elapsed time on waiting.
    A candidate whose op fails keeps its error and is dropped from later rounds.
    """
    stats = {k: Stats(k) for k in cands}
    for k, (w, _) in cands.items():
        if not w.ok:
            stats[k].error = _last_line(w.error)
    names = [k for k in cands if stats[k].error is None]
    t0 = time.perf_counter()
    waited = 0.0
    for r in range(warmup + reps):
        now, timed = time.perf_counter(), r - warmup
        if timed >= 1 and hard_stop is not None and now > hard_stop:
            break
        if timed >= min_reps and ((budget_s is not None and now - t0 > budget_s) or
                                  (stop_at is not None and now > stop_at)):
            break
        order = list(names)
        random.Random(r).shuffle(order)
        for k in order:
            if stats[k].error:
                continue
            w, op = cands[k]
            tw = time.perf_counter()
            b = wait_quiet(None if not quiet_s else quiet_s if waited < 0.1 * (tw - t0) else 0.0)
            waited += time.perf_counter() - tw
            try:
                res = w.run(op)
            except WorkerError as e:
                stats[k].error = _last_line(str(e))
                if say:
                    say(f"    {k}: failed: {stats[k].error}")
                continue
            s = stats[k]
            (s.warmup if r < warmup else s.times).append(res["seconds"])
            if r >= warmup:
                s.busy.append(b)
            s.peak, s.hwm = max(s.peak, res["peak"]), max(s.hwm, res["hwm"])
            if res["info"]:
                if r >= warmup:
                    s.infos.append(res["info"])
                s.info = _median_info(s.infos or [res["info"]])
        if say and names:
            done = [f"{k} {stats[k].times[-1] if stats[k].times else stats[k].warmup[-1]:.3f}s" for k in names
                    if (stats[k].times or stats[k].warmup) and not stats[k].error]
            say(f"    round {r + 1}{' (warmup)' if r < warmup else ''}: " + ", ".join(done))
    return stats


def _median_info(infos: list[dict]) -> dict:
    out = dict(infos[-1])
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(i[k] for i in infos if k in i)
    return out


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "failed"


def tmpdir(root: Path, name: str) -> Path:
    p = root / name
    p.mkdir(parents=True, exist_ok=True)
    return p
