"""MatFormer nesting, the spec level (Devvrit et al. 2023, arXiv 2310.07707): sub-networks by index prefix.

A nested layer keeps, at granularity f, the first f·F hidden units of its MLP (W1[:k], b1[:k],
W2[:, :k]) and/or the first f·G kv head groups of its attention (whole groups, so the GQA ratio
holds). Skippable layers may be left out. A `Choice` names one sub-network; it is written as
text like the command line takes it:

    mlp="s"                 every nested MLP at granularity s (un-nested layers stay whole)
    mix="s,s,m,l,xl,xl"     Mix'n'Match: one granularity per layer (names or fractions: 0.5, 1/8;
                            xl for a layer without nesting)
    heads="m"               every nested attention at granularity m
    skip=[3, 7]             leave out layers 3 and 7 (they must be `skippable`)

Torch-free (the spec check uses it); running a sub-network inside the compiled module is mptc/nested.py,
cutting it out physically `mptc extract`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from . import spec as S
from .errors import MptcError, suggest

PAPER = {0.125: "s", 0.25: "m", 0.5: "l", 1.0: "xl"}  # the MatFormer paper's four granularities
NAMES = ("xxs", "xs", "s", "m", "l", "xl")


def level_names(levels: Sequence[float]) -> tuple[str, ...]:
    """Names of a layer's granularities: the paper's (1/8 s, 1/4 m, 1/2 l, 1 xl) when the levels are
    among those, else the last k of xxs, xs, s, m, l, xl (or g0, g1, … beyond six)."""
    if all(x in PAPER for x in levels):
        return tuple(PAPER[x] for x in levels)
    k = len(levels)
    return NAMES[-k:] if k <= len(NAMES) else tuple(f"g{i}" for i in range(k))


@dataclass(frozen=True)
class Choice:
    """One sub-network: per layer the active fraction of MLP units and of kv groups, and skipped layers."""

    mlp: tuple[float, ...]
    heads: tuple[float, ...]
    skip: frozenset[int] = frozenset()

    @staticmethod
    def full(spec: S.Spec) -> Choice:
        return Choice((1.0,) * spec.n_layers, (1.0,) * spec.n_layers)

    @property
    def is_full(self) -> bool:
        return all(f == 1.0 for f in self.mlp + self.heads) and not self.skip


def _fraction(token: str) -> float | None:
    """A fraction written as 0.5, 1/8 or a paper name (s, m, l, xl); None if it is none of those."""
    named = {v: k for k, v in PAPER.items()}
    if token in named:
        return named[token]
    try:
        num, _, den = token.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        return None


def _implied(token: str, layer: int, what: str) -> float:
    """A fraction for a layer without declared nesting, cut as a prefix (after `reorder`)."""
    if token in ("full",):
        return 1.0
    f = _fraction(token)
    if f is None or not 0.0 < f <= 1.0:
        raise MptcError(f"layer {layer}: {what} fraction {token!r} must be a number in (0, 1] such as 0.5 or 1/4")
    return f


def _level(token: str, levels: tuple[float, ...] | None, layer: int, what: str, implied: bool = False) -> float:
    """A granularity token (name or fraction) resolved against one layer's declared levels; with
    `implied`, a layer without levels takes any fraction (the prefix kept after `reorder`)."""
    token = token.strip()
    if levels is None:
        if token in ("xl", "1", "1.0", "full"):
            return 1.0
        if implied:
            return _implied(token, layer, what)
        raise MptcError(f"layer {layer} has no nested {what}, so it only runs whole (xl), not {token!r}",
                        hint=f"declare `nested = […]` in the {what} block")
    names = level_names(levels)
    if token in names:
        return levels[names.index(token)]
    try:
        num, _, den = token.partition("/")
        f = float(num) / float(den) if den else float(num)
    except ValueError:
        raise MptcError(f"unknown granularity {token!r} for layer {layer}",
                        hint=suggest(token, names) or f"use one of {', '.join(names)} or a fraction") from None
    for x in levels:
        if abs(x - f) < 1e-9:
            return x
    raise MptcError(f"granularity {token} is not one of layer {layer}'s nested {what} levels "
                    f"({', '.join(f'{n} = {x:g}' for n, x in zip(names, levels, strict=True))})")


def _tokens(text: str | None, n: int) -> list[str] | None:
    """Per-layer granularity tokens from "s,s,m,l" (one per layer); None for one token ("s"), which
    applies to every nested layer (see `_per_layer`)."""
    if text is None:
        return ["xl"] * n
    tokens = [t for t in str(text).replace(" ", ",").split(",") if t]
    if len(tokens) == 1:
        return None
    if len(tokens) != n:
        raise MptcError(f"the mix lists {len(tokens)} granularities but the model has {n} layers",
                        hint="give one per layer, e.g. " + ",".join(["s"] * n))
    return tokens


def _per_layer(text: str | None, levels: list[tuple[float, ...] | None], what: str, implied: bool = False
               ) -> tuple[float, ...]:
    """The active fraction of each layer's MLP or attention: a per-layer list must name a level of
    each layer (xl for an un-nested one); one granularity sets every nested layer and leaves the
    others whole. With `implied` (extraction), an un-nested layer takes any fraction, and one
    granularity on a model without nesting sets every layer."""
    tokens = _tokens(text, len(levels))
    if tokens is not None:
        return tuple(_level(t, lv, i, what, implied) if t.strip() != "xl" or lv else 1.0
                     for i, (t, lv) in enumerate(zip(tokens, levels, strict=True)))
    token = str(text).strip().strip(",")
    nested = [i for i, lv in enumerate(levels) if lv]
    if not nested:
        if token in ("xl", "1", "1.0", "full"):
            return (1.0,) * len(levels)
        if implied:
            return tuple(_implied(token, i, what) for i in range(len(levels)))
        raise MptcError(f"no layer has a nested {what}, so the model only runs whole (xl), not {token!r}",
                        hint=f"declare `nested = […]` in the {what} block")
    return tuple(_level(token, lv, i, what) if lv else 1.0 for i, lv in enumerate(levels))


def parse_choice(spec: S.Spec, mix: str | None = None, *, mlp: str | None = None, heads: str | None = None,
                 skip: Sequence[int] | str = (), implied: bool = False) -> Choice:
    """A Choice from its text parts (see the module docstring); unset parts stay whole. `implied`
    (extraction): layers without declared nesting take any fraction and any layer may be dropped,
    the sub-network being the prefix a `reorder` ranked first."""
    n = spec.n_layers
    if mix is not None and mlp is not None:
        raise MptcError("give either a per-layer mix or one MLP granularity, not both")
    if isinstance(skip, str):
        try:
            skip = [int(t) for t in skip.replace(" ", ",").split(",") if t]
        except ValueError:
            raise MptcError(f"layers to drop must be indices like 3,7; got {skip!r}") from None
    drop = set()
    for i in skip:
        if not -n <= i < n:
            raise MptcError(f"cannot drop layer {i}: the model has {n} layers (0..{n - 1})")
        i %= n
        if not spec.layers[i].skippable and not implied:
            ok = [j for j, ly in enumerate(spec.layers) if ly.skippable]
            raise MptcError(f"layer {i} is not skippable", hint=f"skippable layers: {ok}" if ok else
                            "declare `skippable = …` in the layers block")
        drop.add(i)
    if len(drop) == n:
        raise MptcError("cannot drop every layer")
    mlp_f = _per_layer(mix if mix is not None else mlp, [ly.mlp.nested for ly in spec.layers], "MLP", implied)
    head_f = _per_layer(heads, [ly.attention.nested for ly in spec.layers], "attention", implied)
    choice = Choice(mlp_f, head_f, frozenset(drop))
    _check_sizes(spec, choice)
    return choice


def _check_sizes(spec: S.Spec, choice: Choice) -> None:
    """Every kept MLP keeps a unit and every kept attention a kv group."""
    for i, (f, _, g) in enumerate(active_sizes(spec, choice)):
        ly = spec.layers[i]
        if i in choice.skip:
            continue
        if f < 1:
            raise MptcError(f"layer {i}: MLP fraction {choice.mlp[i]:g} of {ly.mlp.hidden} units keeps none",
                            hint=f"keep at least 1/{ly.mlp.hidden}")
        if g < 1:
            raise MptcError(f"layer {i}: attention fraction {choice.heads[i]:g} of {ly.attention.kv_heads} kv "
                            "groups keeps none", hint=f"keep at least 1/{ly.attention.kv_heads}")


def active_sizes(spec: S.Spec, choice: Choice) -> list[tuple[int, int, int]]:
    """Per layer: (active hidden units, active query heads, active kv heads)."""
    out = []
    for i, ly in enumerate(spec.layers):
        a = ly.attention
        g = round(a.kv_heads * choice.heads[i])
        out.append((round(ly.mlp.hidden * choice.mlp[i]), g * (a.heads // a.kv_heads), g))
    return out


def _rescale(levels: tuple[float, ...] | None, f: float) -> tuple[float, ...] | None:
    if levels is None:
        return None
    kept = tuple(x / f for x in levels if x <= f + 1e-12)
    return kept if len(kept) > 1 else None


def sub_spec(spec: S.Spec, choice: Choice) -> S.Spec:
    """The spec of a sub-network: smaller layers, dropped layers gone; the nesting below the
    chosen level is kept (rescaled), so an extracted model can be cut further."""
    sizes = active_sizes(spec, choice)
    layers = []
    for i, ly in enumerate(spec.layers):
        if i in choice.skip:
            continue
        f, h, g = sizes[i]
        layers.append(replace(
            ly,
            mlp=replace(ly.mlp, hidden=f, nested=_rescale(ly.mlp.nested, choice.mlp[i])),
            attention=replace(ly.attention, heads=h, kv_heads=g,
                              nested=_rescale(ly.attention.nested, choice.heads[i])),
        ))
    return spec.replace(layers=tuple(layers), tasks=())  # a task names layers of the parent


def task_choice(spec: S.Spec, name: str) -> Choice:
    """The sub-network of a named task (`tasks { … }` in the spec)."""
    for t in spec.tasks:
        if t.name == name:
            return parse_choice(spec, t.mix, heads=t.heads, skip=t.skip)
    names = [t.name for t in spec.tasks]
    raise MptcError(f"model '{spec.name}' has no task '{name}'",
                    hint=suggest(name, names) or (f"tasks: {', '.join(names)}" if names else "it declares no tasks"))
