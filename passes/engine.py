"""The one mechanism under every pass: dimension symbols, their coupling graph, and index maps.

Each parameter axis of a compiled model is a product of dimension symbols (`lower.NodeInfo.axes`).
A pass describes its change as a new Spec plus, for each symbol whose size or order changes, a
*source map*: for every index of the new axis, the old index it comes from, or -1 for a new entry.
Growth appends or inserts -1s, extraction keeps a prefix, reordering permutes, duplication repeats.
`remap` then rewrites every tensor the symbols reach, and records what it did as a certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import Tensor, fx

from mptc import spec as S
from mptc.errors import MptcError
from mptc.lower import NodeInfo, sizes
from mptc.model import build, param_info, spec_of

# --- the coupling graph ----------------------------------------------------------------


def coupling_graph(model: fx.GraphModule) -> nx.Graph:
    """Symbols and the sites they size: parameter axes and shape constants of graph nodes.

    Nodes are ("sym", S), ("param", name, axis) and ("const", node, position); an edge ties a
    symbol to every site whose size it is a factor of. Everything that must change together
    when a symbol changes is its neighbourhood.
    """
    g = nx.Graph()
    sz = sizes(spec_of(model))
    for s, n in sz.items():
        g.add_node(("sym", s), size=n)
    for name, info in param_info(model).items():
        for ax, syms in enumerate(info.axes):
            site = ("param", name, ax)
            g.add_node(site, role=info.role, layer=info.layer)
            for s in syms:
                g.add_edge(("sym", s), site)
    for node in model.graph.nodes:
        info: NodeInfo | None = node.meta.get("mptc")
        if info is None or info.shape is None:
            continue
        for pos, syms in enumerate(info.shape):
            if syms is None:
                continue
            for s in (syms,) if isinstance(syms, str) else syms:
                if s in sz:
                    g.add_edge(("sym", s), ("const", node.name, pos))
    return g


def sites(g: nx.Graph, symbol: str) -> list[tuple]:
    """Every parameter axis and shape constant a symbol reaches."""
    return sorted(g.neighbors(("sym", symbol))) if ("sym", symbol) in g else []


# --- source maps ------------------------------------------------------------------------


def grow_map(old: int, new: int) -> Tensor:
    """Keep 0..old-1 in place and append new - old fresh entries."""
    return torch.cat([torch.arange(old), torch.full((new - old,), -1)])


def grouped_grow_map(groups: int, old_per: int, new_per: int) -> Tensor:
    """Grow each of `groups` contiguous groups from old_per to new_per entries (GQA head groups)."""
    return torch.cat([torch.cat([torch.arange(g * old_per, (g + 1) * old_per), torch.full((new_per - old_per,), -1)])
                      for g in range(groups)])


def _axis_src(axis: tuple[str, ...], maps: dict[str, Tensor], old: dict[str, int], new: dict[str, int]
              ) -> Tensor | None:
    """The flat source map of an axis that is a product of symbols (outermost first)."""
    if not any(s in maps for s in axis):
        return None
    flat = torch.zeros((), dtype=torch.long)
    bad = torch.zeros((), dtype=torch.bool)
    for s in axis:
        src = maps.get(s, torch.arange(new[s]))
        flat = flat[..., None] * old.get(s, new[s]) + src.clamp(min=0)  # (…, n_s)
        bad = bad[..., None] | (src < 0)
    return torch.where(bad, -1, flat).reshape(-1)


# --- certificates ----------------------------------------------------------------------


@dataclass
class TensorClaim:
    """What a pass claims about one tensor of the new model, checked against the weights."""

    name: str
    source: str | None  # the old tensor it was made from (None: made from nothing)
    old_shape: tuple[int, ...] | None
    new_shape: tuple[int, ...]
    srcs: list[list[int] | None]  # per axis: the source map (None: unchanged axis)
    scale: float = 1.0  # old entries are multiplied by this
    zero: list[bool] = field(default_factory=list)  # per axis: its new entries are zero
    all_zero: bool = False  # the whole tensor is new and zero
    fresh: bool = False  # a new tensor (copy source, if any, is `source`)

    def kinds(self) -> list[str]:
        """The claims in words: per changed axis, new entries (zero or free), slices, copies, permutations."""
        if self.fresh:
            return ["new tensor, zero" if self.all_zero else "new tensor, free"]
        out = []
        for ax, s in enumerate(self.srcs):
            if s is None:
                continue
            s = torch.tensor(s)
            kept = s[s >= 0]
            if (s < 0).any():
                out.append(f"axis {ax}: {int((s < 0).sum())} new entries, {'zero' if self.zero[ax] else 'free'}")
            if self.old_shape and len(kept.unique()) < self.old_shape[ax]:
                out.append(f"axis {ax}: slice keeping {len(kept.unique())} of {self.old_shape[ax]}")
            if len(kept.unique()) < len(kept):
                out.append(f"axis {ax}: {len(kept) - len(kept.unique())} copies")
            if not torch.equal(kept, kept.sort().values):
                out.append(f"axis {ax}: permutation")
        if self.scale != 1.0:
            out.append(f"old entries scaled ×{self.scale:.9g}")
        return out

    def to_json(self) -> dict:
        return {"tensor": self.name, "from": self.source, "old_shape": self.old_shape, "new_shape": self.new_shape,
                "claims": self.kinds()}


@dataclass
class Certificate:
    """Every tensor a pass changed and what it claims about each."""

    claims: list[TensorClaim] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self.claims]


def index_pairs(srcs: list[Tensor | None], shape: tuple[int, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Open-mesh indices (new positions, old positions) of the entries that come from old ones."""
    new_idx, old_idx = [], []
    for ax, n in enumerate(shape):
        s = srcs[ax] if srcs[ax] is not None else torch.arange(n)
        keep = (s >= 0).nonzero().flatten()
        view = [1] * len(shape)
        view[ax] = -1
        new_idx.append(keep.view(view))
        old_idx.append(s[keep].view(view))
    return tuple(new_idx), tuple(old_idx)


def check_claim(c: TensorClaim, old: Tensor | None, new: Tensor) -> str | None:
    """Check one claim against the weights; the reason it fails, or None."""
    if tuple(new.shape) != c.new_shape:
        return f"{c.name}: shape {tuple(new.shape)}, claimed {c.new_shape}"
    if c.fresh:
        if c.all_zero and new.count_nonzero() > 0:
            return f"{c.name}: claimed zero, has {int(new.count_nonzero())} non-zero entries"
        return None
    assert old is not None
    ni, oi = index_pairs([torch.tensor(s) if s is not None else None for s in c.srcs], c.new_shape)
    if not torch.equal(new[ni], scaled(old[oi], c.scale, new.dtype)):
        return f"{c.name}: the entries taken from {c.source} differ from it" + \
            (f" × {c.scale:.6g}" if c.scale != 1.0 else "")
    for ax, z in enumerate(c.zero):
        if z and c.srcs[ax] is not None:
            fresh = (torch.tensor(c.srcs[ax]) < 0).nonzero().flatten()
            block = new.index_select(ax, fresh)
            if block.count_nonzero() > 0:
                return f"{c.name}: the new entries of axis {ax} should be zero, {int(block.count_nonzero())} are not"
    return None


# --- the rewrite -----------------------------------------------------------------------


@dataclass
class Init:
    """How the entries no proof constrains are filled: zeros, normal(std) or copy (+ noise)."""

    kind: str = "normal"  # zeros | normal | copy
    std: float | None = None  # normal: None = the model's own init scale; copy: the noise
    seed: int = 0

    def describe(self) -> str:
        if self.kind == "zeros":
            return "zeros"
        if self.kind == "copy":
            return "copy" + (f"(noise = {self.std})" if self.std else "")
        return "normal" + (f"(std = {self.std})" if self.std is not None else "")


@dataclass
class Change:
    """A pass's change: the new spec and how each tensor of the new model is made."""

    spec: S.Spec
    maps: dict[str, Tensor] = field(default_factory=dict)  # symbol → source map
    zero_side: str | None = None  # new entries along axes of this io kind ("out" | "in") are zero
    zero_roles: frozenset[str] = frozenset()  # new entries of tensors with these roles are zero
    scale: Callable[[str, NodeInfo], float] | None = None  # factor for a tensor's old entries
    origin: Callable[[str], tuple[str | None, bool]] | None = None  # new name → (old name, is fresh)
    init: Init = field(default_factory=Init)
    layer_origin: dict[int, int] | None = None  # new layer index → old one, where layers move

    def old_sizes(self, old: dict[str, int]) -> dict[str, int]:
        """The old sizes of the symbols by their new names (per-layer symbols follow moved layers)."""
        if not self.layer_origin:
            return old
        out = dict(old)
        for new_i, old_i in self.layer_origin.items():
            for s in ("H", "G", "K", "Dv", "F"):
                out[f"{s}[{new_i}]"] = old[f"{s}[{old_i}]"]
        return out


def remap(model: fx.GraphModule, change: Change) -> tuple[fx.GraphModule, Certificate]:
    """Build the model of `change.spec` with every tensor made from the old model's."""
    old_spec = spec_of(model)
    old_sd = {k: v.detach() for k, v in model.state_dict().items()}
    old_sizes, new_sizes = change.old_sizes(sizes(old_spec)), sizes(change.spec)
    for s, m in change.maps.items():
        if m.numel() != new_sizes.get(s, -1):
            raise AssertionError(f"map of {s} has {m.numel()} entries, the new spec needs {new_sizes.get(s)}")
    shell = build(change.spec, device="meta")
    gen = torch.Generator().manual_seed(change.init.seed)
    dtype = next(iter(old_sd.values())).dtype
    std = change.init.std if change.init.std is not None else change.spec.init.std
    new_sd: dict[str, Tensor] = {}
    cert = Certificate()
    for name, info in param_info(shell).items():
        shape = tuple(shell.get_parameter(name).shape)
        src_name, fresh = change.origin(name) if change.origin else (name, False)
        old = old_sd.get(src_name) if src_name else None
        srcs = [_axis_src(ax, change.maps, old_sizes, new_sizes) for ax in info.axes]
        scale = change.scale(name, info) if change.scale and not fresh else 1.0
        if not fresh and old is not None and all(s is None for s in srcs) and scale == 1.0:
            new_sd[name] = old
            continue
        new = _free(info, shape, old if not fresh or old is None or old.shape == shape else None, srcs, fresh,
                    change.init, std, gen, dtype)
        zero_axes = [info.role in change.zero_roles or (change.zero_side is not None and io == change.zero_side)
                     for io in info.io]
        all_zero = fresh and (info.role in change.zero_roles)
        if all_zero:
            new.zero_()
        elif not fresh:
            ni, oi = index_pairs(srcs, shape)
            new[ni] = scaled(old[oi], scale, dtype)
            for ax, z in enumerate(zero_axes):
                if z and srcs[ax] is not None:
                    new.index_fill_(ax, (srcs[ax] < 0).nonzero().flatten(), 0.0)
        new_sd[name] = new
        cert.claims.append(TensorClaim(
            name, src_name, tuple(old.shape) if old is not None else None, shape,
            [s.tolist() if s is not None else None for s in srcs], scale, zero_axes, all_zero, fresh))
    out = build(change.spec, weights=new_sd, dtype=dtype)
    out.train(model.training)
    return out, cert


def scaled(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """x × scale, computed in float64 and rounded once to `dtype` (how both pass and check do it)."""
    return x.to(dtype) if scale == 1.0 else (x.to(torch.float64) * scale).to(dtype)


def _free(info: NodeInfo, shape: tuple[int, ...], old: Tensor | None, srcs: list[Tensor | None], fresh: bool,
          init: Init, std: float, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A tensor whose entries no proof constrains hold their init (the proven ones are written after).

    Random values are drawn only for the new entries, so the cost follows the growth, not the model.
    """
    if info.init in ("ones", "zeros") or init.kind == "zeros":
        fill = 1.0 if info.init == "ones" else 0.0
        return torch.full(shape, fill, dtype=dtype)
    if init.kind == "copy" and old is not None:
        if fresh:
            base = old.clone()
        else:  # a new unit copies an existing one, cycling through them
            cyc = [None if s is None else torch.where(s < 0, torch.arange(s.numel()) % max(1, old.shape[i]), s)
                   for i, s in enumerate(srcs)]
            _, oi = index_pairs(cyc, shape)
            base = old[oi].clone()
        if init.std:
            base += torch.randn(shape, generator=gen, dtype=dtype) * init.std
        return base
    if fresh:
        return torch.randn(shape, generator=gen, dtype=dtype) * std
    new_mask = torch.zeros((), dtype=torch.bool)  # entries new along any axis
    for ax, s in enumerate(srcs):
        m = (s < 0) if s is not None else torch.zeros(shape[ax], dtype=torch.bool)
        new_mask = new_mask[..., None] | m
    out = torch.empty(shape, dtype=dtype)
    out[new_mask] = torch.randn(int(new_mask.sum()), generator=gen, dtype=dtype) * std
    return out


def check_shapes(model: fx.GraphModule) -> list[str]:
    """Spec ↔ graph agreement: every parameter axis and shape constant has its symbols' size."""
    sz = sizes(spec_of(model))
    problems = []
    for name, info in param_info(model).items():
        want = tuple(math.prod(sz[s] for s in ax) for ax in info.axes)
        got = tuple(model.get_parameter(name).shape)
        if got != want:
            problems.append(f"{name} has shape {got}, its symbols {info.axes} give {want}")
    for node in model.graph.nodes:
        info = node.meta.get("mptc")
        if info is None or info.shape is None or node.op != "call_method":
            continue
        for pos, syms in enumerate(info.shape):
            if syms is None:
                continue
            want = math.prod(sz[s] for s in ((syms,) if isinstance(syms, str) else syms))
            got = node.args[1 + pos]
            if got != want:
                problems.append(f"node {node.name} has size {got} at {pos}, its symbols give {want}")
    return problems


def require(cond: bool, message: str, hint: str | None = None) -> None:
    if not cond:
        raise MptcError(message, hint=hint)
