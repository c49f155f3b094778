"""Nested (MatFormer) models: the sub-network a module runs now, as a plain spec and sliced weights.

A nested model computes, at its full granularity, exactly the plain model of its sizes: the nesting only
says which prefixes of its weights form smaller sub-networks. A GraphModule set to a sub-network
(`mptc.nested.granularity`) runs the prefixes of its nested weights (the first F' hidden units, the first
G' kv-head groups) and silences the branches of skipped layers; `active` gives the emitter that network:
the spec with the active sizes, the weights sliced lazily (read at save time), and the skipped layers.
"""

from __future__ import annotations

from dataclasses import replace

from .. import spec as S
from ..choice import active_sizes
from .weights import Weight, Weights

__all__ = ["active"]


def _rows(w: Weight, n: int) -> Weight:
    """The first n rows (a weight's output units, or a bias's entries), sliced when loaded."""
    return Weight(w.name, (n, *w.shape[1:]), w.dtype, lambda: w.load()[:n])


def _cols(w: Weight, n: int) -> Weight:
    """The first n columns (a weight's input units), sliced when loaded."""
    return Weight(w.name, (*w.shape[:-1], n), w.dtype, lambda: w.load()[..., :n])


def active(model, spec: S.Spec, weights: Weights) -> tuple[S.Spec, Weights, frozenset[int]]:
    """The network `model` runs now (its Nest module's choice; the full model for a Spec or a full choice):
    its spec (nesting dropped, active sizes), its weights and the layers whose branches are silenced."""
    choice = getattr(getattr(model, "nest", None), "choice", None)
    if not spec.nested and not spec.tasks:
        return spec, weights, frozenset()
    if choice is None or choice.is_full:
        sizes = [(ly.mlp.hidden, ly.attention.heads, ly.attention.kv_heads) for ly in spec.layers]
        skip: frozenset[int] = frozenset()
    else:
        sizes, skip = active_sizes(spec, choice), frozenset(choice.skip)
    w = dict(weights)

    def cut(name: str, n: int, how) -> None:
        if name in w and (w[name].shape[0] if how is _rows else w[name].shape[-1]) != n:
            w[name] = how(w[name], n)

    layers = []
    for i, (ly, (f, h, g)) in enumerate(zip(spec.layers, sizes, strict=True)):
        a, pre = ly.attention, f"layers.{i}"
        if ly.mlp.nested:
            for n in ("up", "gate"):
                cut(f"{pre}.mlp.{n}.weight", f, _rows)
                cut(f"{pre}.mlp.{n}.bias", f, _rows)
            cut(f"{pre}.mlp.down.weight", f, _cols)
        if a.nested:
            for n, d in (("q", h * a.head_dim), ("k", g * a.head_dim), ("v", g * a.value_dim)):
                cut(f"{pre}.attn.{n}.weight", d, _rows)
                cut(f"{pre}.attn.{n}.bias", d, _rows)
            cut(f"{pre}.attn.o.weight", h * a.value_dim, _cols)
        layers.append(replace(ly, skippable=False, mlp=replace(ly.mlp, hidden=f, nested=None),
                              attention=replace(a, heads=h, kv_heads=g, nested=None)))
    return spec.replace(layers=tuple(layers), tasks=()), w, skip
