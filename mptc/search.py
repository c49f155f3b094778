"""Mix'n'Match search (MatFormer, Devvrit et al. 2023): per-layer MLP granularities under a budget.

    from mptc.search import parse_budget, search
    result = search(model, parse_budget("params=600K"), batches)      # batches: held-out (B, T + 1) windows
    result.heuristic.mix, result.best.mix                             # "s,m,m,l", "s,s,l,l"
    [(p.params, p.loss) for p in result.front]                        # the Pareto front, smallest first

Two picks under the budget:
  - the paper's heuristic, granularities that "change slowly and monotonically" with depth: among
    configurations that never step down and step up at most one level between neighbouring layers
    (s,s,m,m or m,l,l,xl, not s,s,xl,xl), the largest that fits (fewest changes on ties); if none of
    those fits, the largest monotone one;
  - the measured pick: the lowest held-out loss among the evaluated candidates.
Candidates are the monotone configurations, or every configuration (`family="all"`). Sizes come
from `summarize(sub_spec(spec, choice))`: parameters and FLOPs per token are sums over parts,
so one summary per granularity gives every configuration's size exactly. Attention stays
whole and no layer is skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor, fx

from . import spec as S
from .atomic import atomic_file
from .choice import Choice, level_names, sub_spec
from .errors import MptcError
from .graph import spec_of
from .passes.correct import grams, refit
from .passes.scores import masked, mean_loss
from .summary import human, summarize
from .train import evaluate

METRICS = ("params", "flops")
MAX_ALL = 4096  # the most configurations `family="all"` enumerates
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


@dataclass(frozen=True)
class Budget:
    """A size limit: parameters, or forward FLOPs per token."""

    metric: str
    limit: int

    def __str__(self) -> str:
        return f"{self.metric} ≤ {human(self.limit)}"


def parse_budget(text: str) -> Budget:
    """`params=1.5M`, `flops=2e6`, `params=600000` → Budget."""
    m = re.fullmatch(r"\s*(\w+)\s*=\s*([0-9_.eE+]+)\s*([kKmMgGbBtT]?)\s*", text or "")
    if not m or m.group(1) not in METRICS:
        raise MptcError(f"a budget is params=N or flops=N (N like 600000, 1.5M, 2e6), got {text!r}")
    try:
        value = float(m.group(2).replace("_", "")) * _SUFFIX[m.group(3).lower()]
    except ValueError:
        raise MptcError(f"a budget is params=N or flops=N (N like 600000, 1.5M, 2e6), got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise MptcError(f"the budget must be a positive number, got {text!r}")
    return Budget(m.group(1), int(value))


@dataclass
class Point:
    """One sub-network: per-layer MLP granularities, its size and (once measured) its held-out loss."""

    mix: str  # "s,s,m,l": one granularity per layer
    mlp: tuple[float, ...]  # the same as fractions
    params: int
    flops: int  # forward FLOPs per token
    monotone: bool  # granularity never decreases with depth
    slow: bool  # monotone, and at most one level up between neighbouring layers
    loss: float | None = None

    def size(self, metric: str) -> int:
        return self.params if metric == "params" else self.flops


@dataclass
class SearchResult:
    budget: Budget
    family: str
    points: list[Point]  # the candidates under the budget (measured when batches were given)
    heuristic: Point  # the paper's pick: the largest slowly increasing configuration under the budget
    best: Point | None  # the lowest measured loss under the budget
    front: list[Point]  # Pareto front of (size, loss) over `points`, smallest first
    uniform: dict[str, Point] = field(default_factory=dict)  # s, m, l, xl everywhere (budget or not)
    whole: Point | None = None  # the whole model

    def to_json(self) -> dict:
        return {"budget": asdict(self.budget), "family": self.family, "heuristic": asdict(self.heuristic),
                "best": asdict(self.best) if self.best else None, "front": [asdict(p) for p in self.front],
                "uniform": {k: asdict(v) for k, v in self.uniform.items()},
                "points": [asdict(p) for p in self.points]}


# --- the space -----------------------------------------------------------------------------


def layer_levels(spec: S.Spec) -> list[tuple[tuple[float, ...], tuple[str, ...]]]:
    """Per layer: the MLP granularities it can run at (fractions and names), smallest first."""
    out = []
    for ly in spec.layers:
        levels = ly.mlp.nested or (1.0,)
        out.append((levels, level_names(levels) if ly.mlp.nested else ("xl",)))
    if all(len(lv) == 1 for lv, _ in out):
        raise MptcError(f"model '{spec.name}' has no nested MLPs to mix",
                        hint="declare `mlp { nested = [1/8, 1/4, 1/2, 1] }` and train it with `mptc train`")
    return out


def _monotone(levels: list[tuple[float, ...]], i: int = 0, low: float = 0.0) -> Iterator[tuple[float, ...]]:
    """Per-layer fractions that never decrease with depth (layers without nesting stay whole)."""
    if i == len(levels):
        yield ()
        return
    for f in levels[i]:
        if f >= low or len(levels[i]) == 1:
            for rest in _monotone(levels, i + 1, f if len(levels[i]) > 1 else low):
                yield (f, *rest)


def candidates(spec: S.Spec, family: str = "monotone") -> list[tuple[float, ...]]:
    """The per-layer MLP fractions to consider: `monotone` (non-decreasing with depth) or `all`."""
    levels = [lv for lv, _ in layer_levels(spec)]
    if family == "monotone":
        return list(_monotone(levels))
    if family == "all":
        n = math.prod(len(lv) for lv in levels)
        if n > MAX_ALL:
            raise MptcError(f"{n:,} configurations are too many to evaluate (the limit is {MAX_ALL:,})",
                            hint="use --family monotone")
        return list(itertools.product(*levels))
    raise MptcError(f"unknown candidate family {family!r}", hint="use monotone or all")


class Sizer:
    """Exact parameters and FLOPs/token of any per-layer MLP configuration, from one summary per
    granularity (both are sums over the embedding, each layer, and the head)."""

    def __init__(self, spec: S.Spec):
        self.spec = spec
        self.levels = layer_levels(spec)
        full = summarize(spec)
        self.base = (full.embed.params + full.head.params, full.embed.flops_per_token + full.head.flops_per_token)
        self.layer: dict[tuple[int, float], tuple[int, int]] = {}
        for f in sorted({f for lv, _ in self.levels for f in lv}):
            mlp = tuple(f if f in lv else 1.0 for lv, _ in self.levels)
            s = summarize(sub_spec(spec, Choice(mlp, (1.0,) * spec.n_layers)))
            for i, (lv, _) in enumerate(self.levels):
                if f in lv:
                    self.layer[i, f] = (s.layers[i].params, s.layers[i].flops_per_token)

    def point(self, mlp: Sequence[float]) -> Point:
        parts = [self.layer[i, f] for i, f in enumerate(mlp)]
        names = [nm[lv.index(f)] for f, (lv, nm) in zip(mlp, self.levels, strict=True)]
        ranks = [lv.index(f) - len(lv) for f, (lv, _) in zip(mlp, self.levels, strict=True) if len(lv) > 1]
        steps = [b - a for a, b in itertools.pairwise(ranks)]
        return Point(",".join(names), tuple(mlp), self.base[0] + sum(p for p, _ in parts),
                     self.base[1] + sum(f for _, f in parts), all(d >= 0 for d in steps),
                     all(0 <= d <= 1 for d in steps))

    def exact(self, mlp: Sequence[float]) -> tuple[int, int]:
        """The same sizes from a summary of the extracted spec (a check of `point`)."""
        s = summarize(sub_spec(self.spec, Choice(tuple(mlp), (1.0,) * self.spec.n_layers)))
        return s.params, s.flops_per_token


def _changes(p: Point) -> int:
    return sum(a != b for a, b in itertools.pairwise(p.mlp))


def heuristic_pick(points: Sequence[Point], budget: Budget) -> Point | None:
    """MatFormer's heuristic: the largest slowly increasing configuration under the budget (fewest changes on
    ties), else the largest monotone one."""
    fits = [p for p in points if p.size(budget.metric) <= budget.limit]
    for ok in ([p for p in fits if p.slow], [p for p in fits if p.monotone]):
        if ok:
            return max(ok, key=lambda p: (p.size(budget.metric), -_changes(p), p.mlp))
    return None


def pareto(points: Sequence[Point], metric: str) -> list[Point]:
    """The measured points no other point beats on both size and loss, smallest first."""
    out: list[Point] = []
    for p in sorted((p for p in points if p.loss is not None), key=lambda p: (p.size(metric), p.loss)):
        if not out or p.loss < out[-1].loss:
            out.append(p)
    return out


# --- the search ----------------------------------------------------------------------------


def search(model: fx.GraphModule, budget: Budget, batches: list[Tensor] | None = None, family: str = "monotone",
           progress=None) -> SearchResult:
    """Mix'n'Match under `budget`; with held-out `batches` (each (B, T + 1)) every candidate under the
    budget is evaluated and the Pareto front kept. `progress(i, n)` is called as candidates finish."""
    spec = spec_of(model)
    sizer = Sizer(spec)
    every = [sizer.point(m) for m in candidates(spec, family)]
    under = [p for p in every if p.size(budget.metric) <= budget.limit]
    if not under:
        small = min(every, key=lambda p: p.size(budget.metric))
        raise MptcError(f"no sub-network fits {budget}: the smallest ({small.mix}) has "
                        f"{human(small.size(budget.metric))} {budget.metric}")
    n_levels = max(len(lv) for lv, _ in sizer.levels)
    uniform = {}
    for j, name in enumerate(level_names(max((lv for lv, _ in sizer.levels), key=len))):
        uniform[name] = sizer.point([lv[max(0, j - (n_levels - len(lv)))] for lv, _ in sizer.levels])
    heur = heuristic_pick(every, budget)
    if heur is None:  # only non-monotone configurations fit
        heur = max(under, key=lambda p: p.size(budget.metric))
    if batches is not None:
        todo = {p.mix: p for p in [*under, *uniform.values(), heur]}
        for i, p in enumerate(todo.values()):
            p.loss = evaluate(model, batches, Choice(p.mlp, (1.0,) * spec.n_layers))
            if progress:
                progress(i + 1, len(todo))
        for p in [*under, *uniform.values(), heur]:
            p.loss = todo[p.mix].loss
    front = pareto(under, budget.metric)
    best = min(under, key=lambda p: p.loss) if batches is not None else None
    for p in [*front, heur]:
        assert sizer.exact(p.mlp) == (p.params, p.flops), p.mix
    return SearchResult(budget, family, under, heur, best, front, uniform, uniform.get("xl"))


# --- per-layer widths of a plain model ----------------------------------------------------


@dataclass
class PlainStep:
    """One cut of the greedy search: what was cut, the sizes and the loss after it."""

    cut: str  # "mlp 3", "kv 1" or "drop 2"
    params: int
    flops: int
    loss: float


@dataclass
class PlainResult:
    """Per-layer widths of a model without nesting, found under a budget."""

    budget: Budget
    mlp: tuple[float, ...]  # kept fraction of each layer's MLP units
    heads: tuple[float, ...]  # kept fraction of each layer's kv groups
    skip: tuple[int, ...]  # layers left out
    params: int
    flops: int
    loss: float  # on the search batches, before any correction
    steps: list[PlainStep] = field(default_factory=list)

    units: tuple[int, ...] = ()  # kept MLP units per layer
    groups: tuple[int, ...] = ()  # kept kv groups per layer
    whole: tuple[tuple[int, int], ...] = ()  # per layer: (MLP units, kv groups) of the model

    @property
    def mix(self) -> str:
        return ",".join("1" if u == n else f"{u}/{n}" for u, (n, _) in zip(self.units, self.whole, strict=True))

    @property
    def heads_text(self) -> str:
        return ",".join("1" if g == n else f"{g}/{n}" for g, (_, n) in zip(self.groups, self.whole, strict=True))

    def extract_args(self) -> list[str]:
        """The `mptc extract` options that cut this sub-network out."""
        out = ["--mix", self.mix]
        if any(f < 1 for f in self.heads):
            out += ["--heads", self.heads_text]
        if self.skip:
            out += ["--drop-layers", ",".join(map(str, self.skip))]
        return out

    def to_json(self) -> dict:
        return {"budget": asdict(self.budget), "mix": self.mix, "heads": self.heads_text, "skip": list(self.skip),
                "params": self.params, "flops": self.flops, "loss": self.loss, "steps": [asdict(x) for x in self.steps]}


class LinearSizer:
    """Exact parameters and FLOPs/token of a plain model with any per-layer MLP units, kv groups and
    dropped layers, from three summaries: each layer's sizes are linear in its units and in its kv
    groups (every matrix and every attention product scales with one of them)."""

    def __init__(self, spec: S.Spec):
        self.spec = spec
        n = spec.n_layers
        full = summarize(spec)
        half_u = tuple(max(1, ly.mlp.hidden // 2) for ly in spec.layers)
        half_g = tuple(max(1, ly.attention.kv_heads // 2) for ly in spec.layers)
        su = summarize(sub_spec(spec, Choice(tuple(u / ly.mlp.hidden for u, ly in zip(half_u, spec.layers,
                                                                                         strict=True)), (1.0,) * n)))
        sg = summarize(sub_spec(spec, Choice((1.0,) * n, tuple(g / ly.attention.kv_heads for g, ly in
                                                              zip(half_g, spec.layers, strict=True)))))
        self.base = (full.params - sum(x.params for x in full.layers),
                     full.flops_per_token - sum(x.flops_per_token for x in full.layers))
        self.rows = []  # per layer: (params, flops) whole, per unit, per group
        for i, ly in enumerate(spec.layers):
            f, g = ly.mlp.hidden, ly.attention.kv_heads
            whole = (full.layers[i].params, full.layers[i].flops_per_token)
            du = f - half_u[i]
            dg = g - half_g[i]
            per_u = tuple((w - h) / du if du else 0.0 for w, h in zip(
                whole, (su.layers[i].params, su.layers[i].flops_per_token), strict=True))
            per_g = tuple((w - h) / dg if dg else 0.0 for w, h in zip(
                whole, (sg.layers[i].params, sg.layers[i].flops_per_token), strict=True))
            self.rows.append((whole, per_u, per_g))

    def sizes(self, units: Sequence[int], groups: Sequence[int], skip: set[int] | frozenset[int]) -> tuple[int, int]:
        out = list(self.base)
        for i, (whole, per_u, per_g) in enumerate(self.rows):
            if i in skip:
                continue
            ly = self.spec.layers[i]
            for k in (0, 1):
                out[k] += whole[k] - per_u[k] * (ly.mlp.hidden - units[i]) - per_g[k] * (
                    ly.attention.kv_heads - groups[i])
        return round(out[0]), round(out[1])

    def exact(self, units: Sequence[int], groups: Sequence[int], skip: set[int] | frozenset[int]) -> tuple[int, int]:
        """The same sizes from a summary of the extracted spec (a check of `sizes`)."""
        mlp = tuple(u / ly.mlp.hidden for u, ly in zip(units, self.spec.layers, strict=True))
        heads = tuple(g / ly.attention.kv_heads for g, ly in zip(groups, self.spec.layers, strict=True))
        s = summarize(sub_spec(self.spec, Choice(mlp, heads, frozenset(skip))))
        return s.params, s.flops_per_token


class _Refitted:
    """The model run as a sub-network whose cut projections (each layer's MLP down and attention output)
    are refit by ridge least squares on the search batches (passes/correct.py), in place: `trying` one
    cut, `keep` it, `refresh` the Gram matrices after a cut (the later layers' inputs changed), `restore`."""

    def __init__(self, model: fx.GraphModule, batches: list[dict], ridge: float):
        spec = spec_of(model)
        self.model, self.batches, self.ridge = model, batches, ridge
        self.names = {(i, k): f"layers.{i}.{'mlp.down' if k == 'mlp' else 'attn.o'}.weight"
                      for i in range(spec.n_layers) for k in ("mlp", "attn")}
        self.whole = {key: model.get_parameter(n).detach().clone() for key, n in self.names.items()}  # (D, F)
        self.grams: dict[tuple[int, str], Tensor] = {}

    def weight(self, key: tuple[int, str], keep: int) -> Tensor:
        """The projection with its first `keep` inputs refit to do what all of them did, the rest zero."""
        w = self.whole[key]
        if keep >= w.shape[1]:
            return w
        out = w.new_zeros(w.shape)
        out[:, :keep] = refit(w, self.grams[key], keep, self.ridge)
        return out

    def put(self, key: tuple[int, str], w: Tensor) -> None:
        self.model.get_parameter(self.names[key]).data.copy_(w)

    @contextlib.contextmanager
    def trying(self, key: tuple[int, str] | None, keep: int) -> Iterator[None]:
        """A context with one candidate cut in place (None: nothing to refit)."""
        if key is None:
            yield
            return
        now = self.model.get_parameter(self.names[key]).detach().clone()
        self.put(key, self.weight(key, keep))
        try:
            yield
        finally:
            self.put(key, now)

    def refresh(self, skip: set[int]) -> None:
        with masked(self.model, {i: (None, None, True) for i in skip}):
            self.grams = grams(self.model, self.batches)

    def restore(self) -> None:
        for key, w in self.whole.items():
            self.put(key, w)


def plain_search(model: fx.GraphModule, budget: Budget, batches: list[dict], what: Sequence[str] = ("mlp",),
                 step: float = 1 / 16, progress=None, refit_ridge: float | None = None) -> PlainResult:
    """Per-layer widths of a model without nesting (reorder it first: the prefixes are cut), greedily:
    from the whole model, cut whichever of one `step` of a layer's MLP units, one kv group of a layer
    (`what` has "heads") or one whole layer (`what` has "layers") raises the loss on `batches` least per
    parameter (or FLOP) saved, until the budget holds. The cut parts are silenced in place, so
    each candidate costs one evaluation and nothing is copied. With `refit_ridge` (e.g. 1e-3, what
    `extract(correct = lsq)` uses), each candidate is measured with its cut projection refit by ridge least
    squares on `batches`, and the cuts kept stay refit: the widths are chosen for the corrected model."""
    spec = spec_of(model)
    if spec.nested:
        raise MptcError(f"model '{spec.name}' is nested: search its trained granularities",
                        hint="leave out --plain")
    moe = [i for i, ly in enumerate(spec.layers) if ly.mlp.moe]
    if moe:
        raise MptcError(f"layer {moe[0]}'s MLP is a mixture of experts: the per-layer search sizes dense MLPs",
                        hint="cut every expert to one fraction with `mptc extract --mlp F`")
    state = _Refitted(model, batches, refit_ridge) if refit_ridge is not None else None
    try:
        return _plain_search(model, spec, budget, batches, what, step, progress, state)
    finally:
        if state is not None:
            state.restore()


def _plain_search(model: fx.GraphModule, spec: S.Spec, budget: Budget, batches: list[dict], what: Sequence[str],
                  step: float, progress, state: _Refitted | None) -> PlainResult:
    units = [ly.mlp.hidden for ly in spec.layers]
    groups = [ly.attention.kv_heads for ly in spec.layers]
    skip: set[int] = set()
    sizer = LinearSizer(spec)
    size = sizer.sizes(units, groups, skip)
    metric = 0 if budget.metric == "params" else 1

    def cuts(u, g, sk):
        return {i: (u[i] if u[i] < ly.mlp.hidden else None,
                    g[i] * (ly.attention.heads // ly.attention.kv_heads) if g[i] < ly.attention.kv_heads else None,
                    i in sk) for i, ly in enumerate(spec.layers) if i in sk or u[i] < ly.mlp.hidden
                or g[i] < ly.attention.kv_heads}

    with masked(model, {}):
        loss = mean_loss(model, batches)
    if state is not None:
        state.refresh(skip)
    steps = []
    while size[metric] > budget.limit:
        options = []
        for i, ly in enumerate(spec.layers):
            if i in skip:
                continue
            chunk = max(1, round(ly.mlp.hidden * step))
            if "mlp" in what and units[i] - chunk >= 1:
                options.append((f"mlp {i}", [*units[:i], units[i] - chunk, *units[i + 1:]], groups, skip))
            if "heads" in what and groups[i] > 1:
                options.append((f"kv {i}", units, [*groups[:i], groups[i] - 1, *groups[i + 1:]], skip))
            if "layers" in what and len(skip) + 1 < spec.n_layers and ly.placement == "pre":
                options.append((f"drop {i}", units, groups, skip | {i}))
        if not options:
            raise MptcError(f"no sub-network of these cuts ({', '.join(what)}) fits {budget}",
                            hint="allow more kinds of cut (--what mlp,heads,layers) or a larger budget")
        best = None
        for cut, u, g, sk in options:
            sz = sizer.sizes(u, g, sk)
            if state is None:
                with masked(model, cuts(u, g, sk)):
                    new_loss = mean_loss(model, batches)
            else:  # the kept cuts are refit in place; this one is refit for its evaluation
                with state.trying(*_refit_of(spec, cut, u, g)), masked(model, {i: (None, None, True) for i in sk}):
                    new_loss = mean_loss(model, batches)
            rate = (new_loss - loss) / max(1, size[metric] - sz[metric])
            if best is None or rate < best[0]:
                best = (rate, cut, u, g, sk, sz, new_loss)
        _, cut, units, groups, skip, size, loss = best
        if state is not None:
            key, keep = _refit_of(spec, cut, units, groups)
            if key is not None:
                state.put(key, state.weight(key, keep))
            state.refresh(skip)
        steps.append(PlainStep(cut, size[0], size[1], loss))
        if progress:
            progress(len(steps), size[metric])
    assert sizer.exact(units, groups, skip) == size, (units, groups, skip)
    mlp = tuple(u / ly.mlp.hidden for u, ly in zip(units, spec.layers, strict=True))
    heads = tuple(g / ly.attention.kv_heads for g, ly in zip(groups, spec.layers, strict=True))
    whole = tuple((ly.mlp.hidden, ly.attention.kv_heads) for ly in spec.layers)
    return PlainResult(budget, mlp, heads, tuple(sorted(skip)), size[0], size[1], loss, steps, tuple(units),
                       tuple(groups), whole)


def _refit_of(spec: S.Spec, cut: str, units: Sequence[int], groups: Sequence[int]) -> tuple[tuple[int, str] | None,
                                                                                             int]:
    """The projection a candidate cut refits and how many of its inputs stay: "mlp i" the down projection
    (units), "kv i" the attention output (the kept groups' query heads × Dv), "drop i" none."""
    kind, i = cut.split()
    i = int(i)
    if kind == "mlp":
        return (i, "mlp"), units[i]
    if kind == "kv":
        a = spec.layers[i].attention
        return (i, "attn"), groups[i] * (a.heads // a.kv_heads) * a.value_dim
    return None, 0


# --- output --------------------------------------------------------------------------------


def table(result: SearchResult):
    """The Pareto front as a rich Table (heuristic and measured picks marked)."""
    from rich.table import Table

    m = result.budget.metric
    what = "Pareto front" if result.front else "heuristic pick (no held-out data: no front)"
    t = Table(title=f"Mix'n'Match {what}, {result.budget} ({len(result.points)} candidates, {result.family})",
              title_justify="left")
    for col, just in (("mix (per layer)", "left"), ("params", "right"), ("FLOPs/token", "right"),
                      ("held-out loss", "right"), ("shape", "left"), ("", "left")):
        t.add_column(col, justify=just)
    rows = list(result.front)
    if result.heuristic not in rows:
        rows = sorted([*rows, result.heuristic], key=lambda p: p.size(m))
    for p in rows:
        marks = [s for s, ok in (("heuristic", p.mix == result.heuristic.mix),
                                 ("best", result.best is not None and p.mix == result.best.mix),
                                 ("off front", bool(result.front) and p not in result.front)) if ok]
        shape = "slow" if p.slow else "monotone" if p.monotone else "-"
        t.add_row(p.mix, f"{p.params:,}", f"{p.flops:,}", "-" if p.loss is None else f"{p.loss:.4f}", shape,
                  ", ".join(marks))
    return t


def plot(result: SearchResult, path: str | Path, extra: dict[str, list[tuple[int, float]]] | None = None,
         title: str | None = None) -> Path:
    """Loss vs size: every candidate, the Pareto front, the uniform granularities, the picks, the budget
    line; `extra` adds labelled series of (size, loss) points (e.g. independently trained models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.budget.metric
    measured = [p for p in result.points if p.loss is not None]
    if not measured:
        raise MptcError("nothing to plot: the candidates were not evaluated", hint="pass --data FILES")
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for mono, colour, label in ((False, "#bbbbbb", "other mixes"), (True, "#7aa6d6", "monotone mixes")):
        pts = [p for p in measured if p.monotone == mono]
        if pts:
            ax.scatter([p.size(m) for p in pts], [p.loss for p in pts], s=14, c=colour, label=label, zorder=2)
    ax.step([p.size(m) for p in result.front], [p.loss for p in result.front], where="post", c="#d62728", lw=1.5,
            label="Pareto front (measured)", zorder=3)
    uni = [(n, p) for n, p in result.uniform.items() if p.loss is not None]
    ax.plot([p.size(m) for _, p in uni], [p.loss for _, p in uni], "ko-", ms=5, lw=1, label="uniform s/m/l/xl",
            zorder=4)
    for n, p in uni:
        ax.annotate(n, (p.size(m), p.loss), textcoords="offset points", xytext=(5, 5), fontsize=9)
    for name, pts in (extra or {}).items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], "s--", ms=5, lw=1, label=name, zorder=4)
    h = result.heuristic
    if h.loss is not None:
        ax.scatter([h.size(m)], [h.loss], marker="*", s=180, c="#2ca02c", label=f"heuristic pick {h.mix}", zorder=5)
    if result.best is not None:
        b = result.best
        ax.scatter([b.size(m)], [b.loss], marker="D", s=60, facecolors="none", edgecolors="#d62728",
                   label=f"best measured {b.mix}", zorder=5)
    ax.axvline(result.budget.limit, ls=":", c="k", lw=1, label=f"budget {result.budget}")
    ax.set_xlabel("parameters" if m == "params" else "forward FLOPs per token")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title(title or "Mix'n'Match: held-out loss vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, kind="png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def write_json(result: SearchResult, path: str | Path) -> Path:
    with atomic_file(path, kind="search") as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return Path(path)
