"""Extraction and importance reordering: the same engine, with prefix and permutation maps.

`extract` cuts a MatFormer sub-network out physically (Devvrit et al. 2023): each nested
symbol shrinks to an index prefix, skipped layers go. It is checked against the parent run
at that granularity (`mptc.nested.granularity`), which must agree to float rounding.

`reorder` ranks MLP units and attention heads of a model that was not trained nested and
permutes them (function-preserving), so that the prefix a later `extract` keeps is the most
important part. Scores: weight norm over all coupled parameters of a unit (Torch-Pruning's
group norm), or activation magnitude on calibration data (Minitron: mean |input to the
down-projection| over the sequence, L2 over the batch). Heads rank inside their kv group and
whole groups rank by their summed score, so GQA stays intact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

from mptc import choice as C
from mptc import spec as S
from mptc.graph import spec_of
from mptc.lower import Role
from mptc.nested import granularity

from .base import Pass, PassError, layer_list
from .engine import Change
from .grow import KNOWN_ROLES


@dataclass
class Extract(Pass):
    """A sub-network as a smaller model: MLP units and kv groups to a prefix, dropped layers removed."""

    name = "extract"
    handles = KNOWN_ROLES
    f32_tol = 1e-6
    mlp: str | None = None  # one granularity for every nested MLP: s, m, l, xl or a fraction
    mix: str | None = None  # Mix'n'Match: one MLP granularity per layer, "s,s,m,l"
    heads: str | None = None  # one granularity for every nested attention
    drop_layers: list[int] | None = None
    task: str | None = None  # a sub-network named in the spec's `tasks`

    def choice(self, model: fx.GraphModule) -> C.Choice:
        spec = spec_of(model)
        if self.task is not None:
            if any(x is not None for x in (self.mlp, self.mix, self.heads, self.drop_layers)):
                raise PassError("extract: a task names its own sub-network; give the task or the granularities")
            c = C.task_choice(spec, self.task)
        else:
            c = C.parse_choice(spec, self.mix, mlp=self.mlp, heads=self.heads, skip=self.drop_layers or ())
        if c.is_full:
            raise PassError("extract: this choice is the whole model", hint="pick a smaller granularity, e.g. "
                            "mlp = s, or layers to drop")
        return c

    def requires(self, model):
        super().requires(model)
        self.choice(model)

    def change(self, model):
        spec = spec_of(model)
        choice = self.choice(model)
        new = C.sub_spec(spec, choice)
        kept = [i for i in range(spec.n_layers) if i not in choice.skip]
        sizes = C.active_sizes(spec, choice)
        maps = {}
        for new_i, old_i in enumerate(kept):
            f, h, g = sizes[old_i]
            ly = spec.layers[old_i]
            if f < ly.mlp.hidden:
                maps[f"F[{new_i}]"] = torch.arange(f)
            if g < ly.attention.kv_heads:
                maps[f"H[{new_i}]"] = torch.arange(h)  # query heads of the first g groups
                maps[f"G[{new_i}]"] = torch.arange(g)
        origin = dict(enumerate(kept))
        return Change(new, maps, origin=lambda name: (_renamed(name, origin), False), layer_origin=origin)

    def reference(self, old):
        return granularity(old, self.choice(old))


def _renamed(name: str, origin: dict[int, int]) -> str:
    if not name.startswith("layers."):
        return name
    _, j, rest = name.split(".", 2)
    return f"layers.{origin[int(j)]}.{rest}"


@dataclass
class Reorder(Pass):
    """Permute MLP units and heads so the most important come first (exact)."""

    name = "reorder"
    handles = KNOWN_ROLES
    by: str = "weight"  # weight | activation
    what: str = "both"  # mlp | heads | both
    layers: list[int] | None = None
    calibration: list[dict] | None = None  # for by = activation: input batches (model kwargs)

    def requires(self, model):
        super().requires(model)
        if self.by not in ("weight", "activation"):
            raise PassError(f"reorder: unknown score '{self.by}'", hint="by = weight or by = activation")
        if self.what not in ("mlp", "heads", "both"):
            raise PassError(f"reorder: what = {self.what}?", hint="what = mlp, heads or both")
        if self.by == "activation" and not self.calibration:
            raise PassError("reorder by activation needs calibration data",
                            hint="pass calibration batches (Python) or --data FILES (command line)")
        layer_list(model, self.layers, self.name)

    def change(self, model):
        spec = spec_of(model)
        ls = layer_list(model, self.layers, self.name)
        acts = _activations(model, self.calibration) if self.by == "activation" else {}
        maps = {}
        for i in ls:
            if self.what in ("mlp", "both"):
                score = acts[i, "mlp"] if acts else _mlp_norms(model, i, spec.layers[i].mlp)
                maps[f"F[{i}]"] = torch.argsort(score, descending=True, stable=True)
            if self.what in ("heads", "both"):
                a = spec.layers[i].attention
                score = acts[i, "heads"] if acts else _head_norms(model, i, a)
                h_map, g_map = _head_order(score, a)
                if not torch.equal(h_map, torch.arange(a.heads)):
                    maps[f"H[{i}]"] = h_map
                if not torch.equal(g_map, torch.arange(a.kv_heads)):
                    maps[f"G[{i}]"] = g_map
        return Change(spec, maps)


def _sq(model: fx.GraphModule, name: str) -> Tensor | None:
    try:
        return model.get_parameter(name).detach().double() ** 2
    except AttributeError:
        return None


def _mlp_norms(model: fx.GraphModule, i: int, m: S.MLP) -> Tensor:
    """Per hidden unit: the L2 norm over every parameter coupled to it (up/gate rows, biases, down column)."""
    p = f"layers.{i}.mlp"
    total = torch.zeros(m.hidden, dtype=torch.float64)
    for name, axis in ((f"{p}.up.weight", 1), (f"{p}.gate.weight", 1), (f"{p}.down.weight", 0)):
        sq = _sq(model, name)
        if sq is not None:
            total += sq.sum(axis)
    for name in (f"{p}.up.bias", f"{p}.gate.bias"):
        sq = _sq(model, name)
        if sq is not None:
            total += sq
    return total.sqrt()


def _head_norms(model: fx.GraphModule, i: int, a: S.Attention) -> Tensor:
    """Per query head: the L2 norm of its query rows and output-projection columns."""
    p = f"layers.{i}.attn"
    q = _sq(model, f"{p}.q.weight").view(a.heads, -1).sum(1)
    o = _sq(model, f"{p}.o.weight").view(-1, a.heads, a.value_dim).sum((0, 2))
    return (q + o).sqrt()


def _head_order(score: Tensor, a: S.Attention) -> tuple[Tensor, Tensor]:
    """Source maps for H and G: groups by summed score, heads by score inside each group."""
    r = a.heads // a.kv_heads
    s = score.view(a.kv_heads, r)  # (G, H/G)
    g_map = torch.argsort(s.sum(1), descending=True, stable=True)
    inner = torch.argsort(s, dim=1, descending=True, stable=True)  # (G, H/G)
    h_map = torch.cat([g * r + inner[g] for g in g_map.tolist()])
    return h_map, g_map


@torch.no_grad()
def _activations(model: fx.GraphModule, batches: list[dict]) -> dict[tuple[int, str], Tensor]:
    """Minitron's scores on calibration batches: per MLP unit and per head, mean |activation| over
    the sequence, then L2 over the examples."""
    spec = spec_of(model)
    sums: dict[tuple[int, str], Tensor] = {}
    seen: dict[fx.Node, tuple[int, str]] = {}
    for node in model.graph.nodes:
        info = node.meta.get("mptc")
        if node.op == "call_function" and node.target is torch.nn.functional.linear and info is not None \
                and info.role in (Role.MLP_DOWN, Role.ATTN_O):
            seen[node] = (info.layer, "mlp" if info.role == Role.MLP_DOWN else "heads")

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in seen:
                i, kind = seen[n]
                x = self.env[n.args[0]].detach().double()  # (B, T, F) or (B, T, H·Dv)
                if kind == "heads":
                    a = spec.layers[i].attention
                    x = x.view(*x.shape[:2], a.heads, a.value_dim).abs().mean(-1)  # (B, T, H)
                per_example = x.abs().mean(1)  # (B, units)
                sums[i, kind] = sums.get((i, kind), 0) + (per_example**2).sum(0)
            return out

    was = model.training
    model.eval()
    try:
        for batch in batches:
            Recorder(model).run(*[batch.get(name) for name in spec.inputs])
    finally:
        model.train(was)
    return {k: v.sqrt() for k, v in sums.items()}
