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
from mptc.dims import sizes
from mptc.errors import MptcError
from mptc.graph import param_info, spec_of
from mptc.lower import IO, NodeInfo, Role
from mptc.model import build

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
    srcs: list[Tensor | None]  # per axis: the source map (None: unchanged axis)
    scale: float | Tensor = 1.0  # old entries are multiplied by this: one factor, or one per entry (see `along`)
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
            kept = s[s >= 0]
            n_new, n_unique = int((s < 0).sum()), len(kept.unique())
            if n_new:
                out.append(f"axis {ax}: {n_new} new entries, {'zero' if self.zero[ax] else 'free'}")
            if self.old_shape and n_unique < self.old_shape[ax]:
                out.append(f"axis {ax}: slice keeping {n_unique} of {self.old_shape[ax]}")
            if n_unique < len(kept):
                out.append(f"axis {ax}: {len(kept) - n_unique} copies")
            firsts = kept if n_unique == len(kept) else torch.tensor(list(dict.fromkeys(kept.tolist())))
            if not torch.equal(firsts, firsts.sort().values):  # copies alone (appended or repeated) keep the order
                out.append(f"axis {ax}: permutation")
        if isinstance(self.scale, Tensor):
            ax, groups = scale_groups(self.scale)
            parts = [f"×{f:.9g} on {'rest' if i == len(groups) - 1 and len(groups) > 1 else _entries(at)}"
                     for i, (f, at) in enumerate(groups)]
            out.append(f"old entries scaled per entry along axis {ax}: " + ", ".join(parts))
        elif self.scale != 1.0:
            out.append(f"old entries scaled ×{self.scale:.9g}")
        return out

    def to_json(self) -> dict:
        out = {"tensor": self.name, "from": self.source, "old_shape": self.old_shape, "new_shape": self.new_shape,
               "claims": self.kinds()}
        if isinstance(self.scale, Tensor):  # per entry: each factor and the new-axis entries it applies to
            ax, groups = scale_groups(self.scale)
            out["scale"] = {"axis": ax, "factors": [  # the entries of each factor but the most common (the rest)
                {"factor": f, "count": len(at)} | ({"entries": at} if i < len(groups) - 1 else {})
                for i, (f, at) in enumerate(groups)]}
        return out


MAX_LISTED = 16  # entries listed by index in a per-entry scale's description


def _entries(at: list[int]) -> str:
    n = len(at)
    shown = ", ".join(map(str, at[:MAX_LISTED])) + (", …" if n > MAX_LISTED else "")
    return f"{n} {'entry' if n == 1 else 'entries'} ({shown})"


def scale_groups(scale: Tensor) -> tuple[int, list[tuple[float, list[int]]]]:
    """A per-entry scale as (its axis, [(factor, the new-axis entries it scales)]): the most common factor last."""
    ax = next((a for a, n in enumerate(scale.shape) if n > 1), scale.dim() - 1)
    v = scale.flatten()
    values, counts = v.unique(return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-int(counts[i]), float(values[i])))[::-1]
    return ax, [(float(values[i]), (v == values[i]).nonzero().flatten().tolist()) for i in order]


@dataclass
class Certificate:
    """Every tensor a pass changed and what it claims about each; `kept` names the tensors taken
    over unchanged (new name → old name), which must equal their source."""

    claims: list[TensorClaim] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self.claims]


# --- selections: where an axis's kept entries sit, as slices wherever they form runs ----------

Sel = slice | Tensor  # one axis: a slice (a view, free) or a LongTensor of positions (a gather)


def kept_entries(srcs: list[Tensor | None]) -> tuple[list[Sel], list[Sel]]:
    """Per axis, the positions of the new tensor that come from old entries, and those entries.

    A grow map's kept prefix or an extraction's prefix is a slice on both sides; permutations,
    copies and per-group growth are index tensors.
    """
    new_sel, old_sel = [], []
    for s in srcs:
        if s is None:
            new_sel.append(slice(None))
            old_sel.append(slice(None))
            continue
        at = (s >= 0).nonzero().flatten()
        src = s[at]
        if _is_run(at) and _is_run(src):
            a, b = (int(at[0]), int(src[0])) if len(at) else (0, 0)
            new_sel.append(slice(a, a + len(at)))
            old_sel.append(slice(b, b + len(at)))
        else:
            new_sel.append(at)
            old_sel.append(src)
    return new_sel, old_sel


def _is_run(t: Tensor) -> bool:
    return len(t) <= 1 or (int(t[-1]) - int(t[0]) == len(t) - 1 and bool((t.diff() == 1).all()))


def take(t: Tensor, sel: list[Sel]) -> Tensor:
    """The block of `t` at `sel` (axis by axis: slices are views, index tensors gather)."""
    for ax, s in enumerate(sel):
        t = t[(slice(None),) * ax + (s,)] if isinstance(s, slice) else t.index_select(ax, s)
    return t


def put(t: Tensor, sel: list[Sel], block: Tensor) -> None:
    """Write `block` into `t` at `sel` (the inverse of `take`)."""
    view = t[tuple(s if isinstance(s, slice) else slice(None) for s in sel)]
    gathered = [ax for ax, s in enumerate(sel) if not isinstance(s, slice)]
    if not gathered:
        view.copy_(block)
    elif len(gathered) == 1:
        view.index_copy_(gathered[0], sel[gathered[0]], block)
    else:  # an open mesh over the gathered axes, whole ranges on the others
        mesh = []
        for ax, s in enumerate(sel):
            idx = torch.arange(view.shape[ax]) if isinstance(s, slice) else s
            mesh.append(idx.view([-1 if a == ax else 1 for a in range(t.dim())]))
        view[tuple(mesh)] = block


def new_entries(s: Tensor | None) -> Tensor | None:
    """The positions of an axis's new entries (None: the axis has none)."""
    if s is None:
        return None
    at = (s < 0).nonzero().flatten()
    return at if len(at) else None


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal entries, NaN equal to NaN: a copied NaN is a faithful copy (the behaviour check is
    what refuses non-finite models)."""
    if torch.equal(a, b):  # the common case, without temporaries
        return True
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def check_claim(c: TensorClaim, old: Tensor | None, new: Tensor) -> str | None:
    """Check one claim against the weights; the reason it fails, or None."""
    if tuple(new.shape) != c.new_shape:
        return f"{c.name}: shape {tuple(new.shape)}, claimed {c.new_shape}"
    if c.fresh:
        if c.all_zero and new.count_nonzero() > 0:
            return f"{c.name}: claimed zero, has {int(new.count_nonzero())} non-zero entries"
        return None
    assert old is not None
    if c.old_shape is not None:
        old = lifted(old, c.old_shape)
    new_sel, old_sel = kept_entries(c.srcs)
    if not _same(take(new, new_sel), scaled(take(old, old_sel), scale_at(c.scale, new_sel), new.dtype)):
        return f"{c.name}: the entries taken from {c.source} differ from it" + _times_text(c.scale)
    for ax, z in enumerate(c.zero):
        fresh = new_entries(c.srcs[ax]) if z else None
        if fresh is not None:
            n = int(new.index_select(ax, fresh).count_nonzero())
            if n:
                return f"{c.name}: the new entries of axis {ax} should be zero, {n} are not"
    return None


def _times_text(scale: float | Tensor) -> str:
    if isinstance(scale, Tensor):
        ax, groups = scale_groups(scale)
        return f" × its claimed per-entry scale along axis {ax} (" + ", ".join(
            f"×{f:.6g} on {len(at)}" for f, at in groups) + " entries)"
    return f" × {scale:.6g}" if scale != 1.0 else ""


# --- per-entry scales ------------------------------------------------------------------


def along(info: NodeInfo, symbol: str, factors: Tensor) -> Tensor | float:
    """A per-entry scale for a tensor (what `Change.scale` returns): `factors[j]` multiplies the old
    entries at index j of the tensor's axis sized by `symbol` (indices of the new axis); 1.0 where
    the tensor has no such axis.

        scale = lambda name, info: along(info, "F[0]", halves) if info.role == "mlp.down" else 1.0
    """
    axes = [ax for ax, syms in enumerate(info.axes) if syms == (symbol,)]
    if not axes:
        if any(symbol in syms for syms in info.axes):
            raise MptcError(f"a per-entry scale along {symbol}: its axis is a product of symbols, "
                            f"{[list(a) for a in info.axes]}", hint="scale along an axis that is one symbol")
        return 1.0
    shape = [1] * len(info.axes)
    shape[axes[0]] = -1
    return factors.to(torch.float64).reshape(shape)


def scale_of(scale: float | Tensor, shape: tuple[int, ...], name: str) -> float | Tensor:
    """A pass's scale for one tensor, checked: a number, or a float64 tensor broadcastable to `shape`
    that varies along one axis at most (a uniform tensor becomes its number)."""
    if not isinstance(scale, Tensor):
        return float(scale)
    t = scale.detach().to(torch.float64, copy=True)
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)) if t.dim() <= len(shape) else t
    ok = t.dim() == len(shape) and all(n in (1, m) for n, m in zip(t.shape, shape, strict=True))
    if not ok or sum(n > 1 for n in t.shape) > 1:
        raise MptcError(f"{name}: a per-entry scale of shape {tuple(scale.shape)} does not fit the tensor's shape "
                        f"{shape} along one axis", hint="build it with passes.along(info, symbol, factors)")
    if not bool(torch.isfinite(t).all()):
        raise MptcError(f"{name}: a per-entry scale holds NaN or infinite factors")
    first = t.flatten()[0] if t.numel() else torch.tensor(1.0, dtype=torch.float64)
    return float(first) if bool((t == first).all()) else t


def scale_at(scale: float | Tensor, sel: list[Sel]) -> float | Tensor:
    """The factors of a per-entry scale at the new tensor's positions `sel` (a number: itself)."""
    if not isinstance(scale, Tensor):
        return scale
    return take(scale, [s if n > 1 else slice(None) for s, n in zip(sel, scale.shape, strict=True)])


def is_one(scale: float | Tensor) -> bool:
    """The scale leaves old entries as they are."""
    return not isinstance(scale, Tensor) and scale == 1.0


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
    zero_side: IO | None = None  # new entries along axes of this io kind (IO.OUT | IO.IN) are zero
    zero_roles: frozenset[Role] = frozenset()  # new entries of tensors with these roles are zero
    # factor for a tensor's old entries: a number, or one per entry along an axis (`along`)
    scale: Callable[[str, NodeInfo], float | Tensor] | None = None
    origin: Callable[[str], tuple[str | None, bool]] | None = None  # new name → (old name, is fresh)
    init: Init = field(default_factory=Init)
    layer_origin: dict[int, int] | None = None  # new layer index → old one, where layers move
    # symbols the old model lacks, each standing for an axis of size 1 there: a dense MLP's tensors are one
    # expert of a mixture (E[l] → 1), so its (F, D) weight is read as (1, F, D) and copied along E[l]
    lift: frozenset[str] = frozenset()

    def old_sizes(self, old: dict[str, int]) -> dict[str, int]:
        """The old sizes of the symbols by their new names (per-layer symbols follow moved layers)."""
        out = dict(old) | dict.fromkeys(self.lift, 1)
        for new_i, old_i in (self.layer_origin or {}).items():
            for s in ("H", "G", "K", "Dv", "F", "E", "Fs"):
                if f"{s}[{old_i}]" in old:
                    out[f"{s}[{new_i}]"] = old[f"{s}[{old_i}]"]
        return out


def remap(model: fx.GraphModule, change: Change) -> tuple[fx.GraphModule, Certificate]:
    """Build the model of `change.spec` with every tensor made from the old model's.

    Tensors that no symbol change reaches are taken over as they are (shared with `model`, not
    copied); the others are new tensors, and the certificate says what each holds.
    """
    old_spec = spec_of(model)
    old_sd = {k: v.detach() for k, v in model.state_dict().items()}
    old_sizes, new_sizes = change.old_sizes(sizes(old_spec)), sizes(change.spec)
    for s, m in change.maps.items():
        if m.numel() != new_sizes.get(s, -1):
            raise MptcError(f"the source map of {s} has {m.numel()} entries, the new spec needs {new_sizes.get(s)}",
                            hint="a map has one entry per index of the new axis (the old index, or -1 for a new one)")
    out = build(change.spec, device="meta")  # the new graph; its parameters are filled below
    gen = torch.Generator().manual_seed(change.init.seed)
    dtype = next(iter(old_sd.values())).dtype
    std = change.init.std if change.init.std is not None else change.spec.init.std
    new_sd: dict[str, Tensor] = {}
    cert = Certificate()
    for name, info in param_info(out).items():
        shape = tuple(out.get_parameter(name).shape)
        src_name, fresh = change.origin(name) if change.origin else (name, False)
        old = old_sd.get(src_name) if src_name else None
        if old is not None and change.lift and any(s in change.lift for ax in info.axes for s in ax):
            old = lifted(old, tuple(math.prod(old_sizes[s] for s in ax) for ax in info.axes))
        srcs = [_axis_src(ax, change.maps, old_sizes, new_sizes) for ax in info.axes]
        scale = change.scale(name, info) if change.scale and not fresh else 1.0
        if isinstance(scale, Tensor):
            scale = scale_of(scale, shape, name)
        if not fresh and old is not None and all(s is None for s in srcs) and is_one(scale):
            new_sd[name] = old
            cert.kept[name] = src_name
            continue
        zero_axes = [info.role in change.zero_roles or (change.zero_side is not None and io == change.zero_side)
                     for io in info.io]
        all_zero = fresh and (info.role in change.zero_roles)
        if all_zero:
            new = torch.zeros(shape, dtype=dtype)
        else:
            new = _free(info, shape, old if not fresh or old is None or old.shape == shape else None, srcs, fresh,
                        [z and not fresh for z in zero_axes], change.init, std, gen, dtype)
        if not fresh:
            new_sel, old_sel = kept_entries(srcs)
            put(new, new_sel, scaled(take(old, old_sel), scale_at(scale, new_sel), dtype))
        new_sd[name] = new
        cert.claims.append(TensorClaim(name, src_name, tuple(old.shape) if old is not None else None, shape,
                                       srcs, scale, zero_axes, all_zero, fresh))
    out.load_state_dict(new_sd, strict=True, assign=True)  # the tensors themselves: no copy, dtype kept
    out.train(model.training)
    return out, cert


def lifted(old: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An old tensor seen with the axes of size 1 its new form adds (a dense weight as one expert)."""
    if tuple(old.shape) == shape or old.numel() != math.prod(shape):
        return old
    return old.reshape(shape)


def scaled(x: Tensor, scale: float | Tensor, dtype: torch.dtype) -> Tensor:
    """x × scale (a number, or factors broadcastable to x), computed in float64 and rounded once
    to `dtype` (how both pass and check do it)."""
    if isinstance(scale, Tensor):
        return (x.to(torch.float64) * scale).to(dtype)
    return x.to(dtype) if scale == 1.0 else (x.to(torch.float64) * scale).to(dtype)


def _free(info: NodeInfo, shape: tuple[int, ...], old: Tensor | None, srcs: list[Tensor | None], fresh: bool,
          zero: list[bool], init: Init, std: float, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A tensor whose entries no proof constrains hold their init, and whose new entries along the
    `zero` axes are zero (the entries taken from the old tensor are written after).

    Random values are drawn only for new entries (the slab of each axis's new units), so the
    cost follows the growth, not the model.
    """
    if info.init in ("ones", "zeros") or init.kind == "zeros":
        out = torch.full(shape, 1.0 if info.init == "ones" else 0.0, dtype=dtype)
    elif init.kind == "copy" and old is not None:
        # a new tensor copies its source; a new unit copies an existing one, cycling through them
        cyc = [slice(None) if s is None else torch.where(s < 0, torch.arange(s.numel()) % max(1, old.shape[i]), s)
               for i, s in enumerate(srcs)]
        out = old.clone() if fresh else take(old, cyc).to(dtype, copy=True)
        if init.std:
            out += torch.randn(shape, generator=gen, dtype=dtype) * init.std
    elif fresh:
        out = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)
    else:  # the slab of new entries along each axis (they overlap at corners: drawn twice, no matter)
        out = torch.empty(shape, dtype=dtype)
        for ax, s in enumerate(srcs):
            at = new_entries(s)
            if at is None or zero[ax]:
                continue
            view = out.narrow(ax, int(at[0]), len(at)) if _is_run(at) else None
            if view is not None and view.is_contiguous():  # drawn in place
                view.normal_(0.0, std, generator=gen)
                continue
            # drawing into a strided view is slow: draw a contiguous slab, then copy it in
            slab = torch.empty(shape[:ax] + (len(at),) + shape[ax + 1:], dtype=dtype).normal_(0.0, std, generator=gen)
            if view is not None:
                view.copy_(slab)
            else:
                out.index_copy_(ax, at, slab)
    for ax, z in enumerate(zero):
        at = new_entries(srcs[ax]) if z else None
        if at is not None:
            out.index_fill_(ax, at, 0.0)
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
