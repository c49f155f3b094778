"""Importance scores for extraction: calibration data, and per unit, per head and per layer scores.

Calibration comes as `data` (what `mptc train --data` takes: files, directories or `stdlib`) read
through `mptc.data`, windows drawn from the training part of the stream with `seed`; or as batches
given from Python. The report records what it was (source, tokens, seed), never the tensors.

Scores, per coupled group (every parameter a unit or head owns):
  - weight: the L2 norm of the group's weights (Torch-Pruning's group norm);
  - activation: mean |input to the down / output projection| over the sequence, L2 over the
    examples (Minitron);
  - taylor: |w · ∂L/∂w| summed over the group's weights, the gradient of the next-token loss
    accumulated over the calibration batches (Torch-Pruning's Taylor, LLM-Pruner's first order).
Layers rank by the held-out loss increase when each alone is left out (`layer_losses`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from mptc import ops
from mptc import spec as S
from mptc.data import even_windows, read_tokens, resolve_sources, split_tokens, windows
from mptc.errors import MptcError
from mptc.graph import spec_of
from mptc.lower import Role

SCORES = ("weight", "activation", "taylor")
WINDOW = 128  # calibration tokens per window (or the model's context, if shorter)


# --- calibration data ------------------------------------------------------------------------


@dataclass
class Calibration:
    """Calibration batches (model inputs) and what they were made from."""

    batches: list[dict[str, Tensor]]
    source: str  # "stdlib", the files, or "given" (batches from Python)
    seed: int | None

    @property
    def tokens(self) -> int:
        return sum(int(b["input_ids"].numel()) for b in self.batches)

    def record(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "seed": self.seed, "windows":
                sum(int(b["input_ids"].shape[0]) for b in self.batches)}


def read_calibration(model: fx.GraphModule, data: Sequence[str], samples: int, seed: int, part: str = "train",
                     batch: int = 16) -> Calibration:
    """`samples` windows of byte tokens from `data` (as `mptc train --data` reads it): from the
    training part of the stream (`part="train"`) or evenly over its held-out part (`"held_out"`)."""
    spec = spec_of(model)
    if spec.vocab is None or spec.vocab < 256:
        raise MptcError(f"calibration text is read as bytes (ids 0..255); model '{spec.name}' has "
                        f"vocab {spec.vocab}", hint="give calibration batches from Python instead")
    if samples < 1:
        raise MptcError(f"samples must be at least 1, got {samples}")
    length = min(spec.context or WINDOW, WINDOW)
    train, held = split_tokens(read_tokens(resolve_sources(list(data))))
    if part == "train":
        x = windows(train, samples, length, torch.Generator().manual_seed(seed))
    else:
        x = even_windows(held, samples, length)
    return Calibration([{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in x.split(batch)],
                       " ".join(map(str, data)), seed if part == "train" else None)  # held-out windows: evenly spaced


def calibration_of(model: fx.GraphModule, given: list[dict] | None, data: Sequence[str] | None, samples: int,
                   seed: int, what: str, part: str = "train") -> Calibration:
    """The calibration a pass uses: batches given from Python, else windows of `data`."""
    if given:
        return Calibration(list(given), "given", None)
    if not data:
        raise MptcError(f"{what} needs calibration data",
                        hint="give data = stdlib (or files) in the pass, --data FILES on the command line, "
                        "or calibration batches from Python")
    return read_calibration(model, data, samples, seed, part)


def run_inputs(model: fx.GraphModule, batch: dict) -> list:
    return [batch.get(name) for name in spec_of(model).inputs]


def lm_loss(model: fx.GraphModule, batch: dict) -> Tensor:
    """Mean next-token cross-entropy of a language model on one batch of ids (B, T)."""
    spec = spec_of(model)
    if spec.head.kind != "lm":
        raise MptcError(f"this score needs a next-token loss, and model '{spec.name}' has a {spec.head.kind} head",
                        hint="use by = weight or by = activation")
    ids = batch["input_ids"]
    logits = model(*run_inputs(model, batch))  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def mean_loss(model: fx.GraphModule, batches: list[dict]) -> float:
    """Mean next-token loss over batches (eval mode)."""
    was = model.training
    model.eval()
    try:
        return sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    finally:
        model.train(was)


# --- per unit and per head scores ------------------------------------------------------------


def _get(model: fx.GraphModule, name: str) -> Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def mlp_groups(i: int, part: str = "") -> list[tuple[str, int]]:
    """The parameters coupled to layer i's MLP units, with the axis that indexes the unit: the dense MLP
    (part ""), the shared expert of a mixture ("shared") or its experts ("experts": stacked (E, …) tensors,
    the unit axis after the expert axis)."""
    p = f"layers.{i}.mlp" + (f".{part}" if part else "")
    e = int(part == "experts")  # the unit axis moves one right
    return [(f"{p}.up.weight", e), (f"{p}.gate.weight", e), (f"{p}.down.weight", 1 + e), (f"{p}.up.bias", e),
            (f"{p}.gate.bias", e)]


def unit_sum(model: fx.GraphModule, values: dict[str, Tensor], i: int, m: S.MLP) -> Tensor:
    """Per MLP unit of layer i: the sum of `values` (per-element tensors, by parameter name) over its group;
    (F,) for a dense MLP, (E, F) for a mixture of experts (each expert's units)."""
    if m.moe:
        total = torch.zeros(m.experts, m.hidden, dtype=torch.float64)
        for name, axis in mlp_groups(i, "experts"):
            v = values.get(name)
            if v is not None:
                total += v.movedim(axis, 1).reshape(m.experts, m.hidden, -1).sum(2)
        return total
    return _dense_sum(values, i, "", m.hidden)


def shared_sum(values: dict[str, Tensor], i: int, m: S.MLP) -> Tensor | None:
    """Per unit of layer i's shared expert (Fs,): the sum of `values` over its group; None without one."""
    return None if not m.moe or m.shared is None else _dense_sum(values, i, "shared", m.shared)


def _dense_sum(values: dict[str, Tensor], i: int, part: str, n: int) -> Tensor:
    total = torch.zeros(n, dtype=torch.float64)
    for name, axis in mlp_groups(i, part):
        v = values.get(name)
        if v is not None:
            total += v.movedim(axis, 0).reshape(n, -1).sum(1)
    return total


def shared_kept(m: S.MLP, f: int) -> int | None:
    """The shared-expert units a mixture keeps when its experts keep f of their units: the same fraction."""
    return None if not m.moe or m.shared is None else max(1, round(m.shared * f / m.hidden))


def head_sum(values: dict[str, Tensor], i: int, a: S.Attention) -> tuple[Tensor, Tensor]:
    """Per query head (q rows, o columns) and per kv group (k, v rows) of layer i: sums of `values`."""
    p = f"layers.{i}.attn"
    heads = torch.zeros(a.heads, dtype=torch.float64)
    groups = torch.zeros(a.kv_heads, dtype=torch.float64)
    for name, n, out in (("q", a.heads, True), ("o", a.heads, False), ("k", a.kv_heads, True),
                         ("v", a.kv_heads, True)):
        for kind in ("weight", "bias"):
            v = values.get(f"{p}.{name}.{kind}")
            if v is None or (kind == "bias" and not out):
                continue
            per = v.reshape(n, -1).sum(1) if out else v.reshape(v.shape[0], n, -1).sum((0, 2))
            if name in ("q", "o"):
                heads += per
            else:
                groups += per
    return heads, groups


Scores = tuple[Tensor, Tensor, Tensor, Tensor | None]  # per MLP unit ((E, F) for experts), head, kv group, shared unit


def weight_scores(model: fx.GraphModule, i: int) -> Scores:
    """Group L2 norms: (per MLP unit, per query head, per kv group, per shared-expert unit)."""
    spec = spec_of(model)
    sq = {n: p.detach().double() ** 2 for n, p in model.named_parameters() if n.startswith(f"layers.{i}.")}
    ly = spec.layers[i]
    heads, groups = head_sum(sq, i, ly.attention)
    sh = shared_sum(sq, i, ly.mlp)
    return unit_sum(model, sq, i, ly.mlp).sqrt(), heads.sqrt(), groups.sqrt(), None if sh is None else sh.sqrt()


def taylor_values(model: fx.GraphModule, batches: list[dict]) -> dict[str, Tensor]:
    """|w · ∂L/∂w| per element of every layer parameter, the gradient of the next-token loss summed
    over the batches (eval mode: no dropout)."""
    params = {n: p for n, p in model.named_parameters() if n.startswith("layers.")}
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    was = model.training
    model.eval()
    try:
        for batch in batches:
            loss = lm_loss(model, batch)
            gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), gs, strict=True):
                if g is not None:
                    grads[n] += g.double()
    finally:
        model.train(was)
    return {n: (params[n].detach().double() * g).abs() for n, g in grads.items()}


def taylor_scores(model: fx.GraphModule, batches: list[dict]) -> dict[int, Scores]:
    """Per layer: Taylor scores (per MLP unit, per query head, per kv group, per shared-expert unit)."""
    spec = spec_of(model)
    vals = taylor_values(model, batches)
    out = {}
    for i, ly in enumerate(spec.layers):
        heads, groups = head_sum(vals, i, ly.attention)
        out[i] = (unit_sum(model, vals, i, ly.mlp), heads, groups, shared_sum(vals, i, ly.mlp))
    return out


def projection_inputs(model: fx.GraphModule) -> dict[fx.Node, tuple[int, str]]:
    """The graph's MLP-down and attention-output projection nodes: node → (layer, kind), kind "mlp",
    "attn", and in a mixture of experts "experts" (the experts' down projections) and "shared"."""
    spec = spec_of(model)
    seen = {}
    for node in model.graph.nodes:
        info = node.meta.get("mptc")
        if node.op != "call_function" or info is None or info.role not in (Role.MLP_DOWN, Role.ATTN_O):
            continue
        moe = info.layer is not None and spec.layers[info.layer].mlp.moe
        if node.target is F.linear:
            seen[node] = (info.layer, "attn" if info.role == Role.ATTN_O else "shared" if moe else "mlp")
        elif node.target is ops.expert_mix:
            seen[node] = (info.layer, "experts")
    return seen


class Recorder(fx.Interpreter):
    """Runs the model and hands the input of every MLP-down and attention-output projection to
    `on(layer, kind, x)`, x: (B, T, F) or (B, T, H·Dv); for a mixture's experts (B, T, E, F), each
    expert's hidden units times its gate (zero where the token is not routed to it)."""

    def __init__(self, model: fx.GraphModule, on):
        super().__init__(model)
        self.seen, self.on = projection_inputs(model), on

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.seen:
            i, kind = self.seen[n]
            x = self.env[n.args[0]].detach()
            if kind == "experts":  # expert_mix(z, w, b, gates)
                x = x * self.env[n.args[3]].detach().unsqueeze(-1)  # (B, T, E, F) × (B, T, E, 1)
            self.on(i, kind, x)
        return out


@torch.no_grad()
def record(model: fx.GraphModule, batches: list[dict], on) -> None:
    """Run every batch through a `Recorder` (eval mode)."""
    was = model.training
    model.eval()
    try:
        for batch in batches:
            Recorder(model, on).run(*run_inputs(model, batch))
    finally:
        model.train(was)


def activation_scores(model: fx.GraphModule, batches: list[dict]) -> dict[int, Scores]:
    """Minitron's scores: per MLP unit and per head, mean |activation| over the sequence, then L2
    over the examples; a kv group scores the sum of its heads. An expert's units score their gated
    activations (B, T, E, F), so tokens not routed to the expert count zero."""
    spec = spec_of(model)
    sums: dict[tuple[int, str], Tensor] = {}

    def on(i: int, kind: str, x: Tensor) -> None:
        x = x.double()
        if kind == "attn":
            a = spec.layers[i].attention
            x = x.view(*x.shape[:2], a.heads, a.value_dim).abs().mean(-1)  # (B, T, H)
        per_example = x.abs().mean(1)  # (B, units) or (B, E, F)
        sums[i, kind] = sums.get((i, kind), 0) + (per_example**2).sum(0)

    record(model, batches, on)
    out = {}
    for i, ly in enumerate(spec.layers):
        heads = sums[i, "attn"].sqrt()
        a = ly.attention
        units = sums[i, "experts" if ly.mlp.moe else "mlp"].sqrt()
        shared = sums[i, "shared"].sqrt() if (i, "shared") in sums else None
        out[i] = (units, heads, heads.view(a.kv_heads, -1).sum(1), shared)
    return out


def scores(model: fx.GraphModule, by: str, batches: list[dict] | None) -> dict[int, Scores]:
    """Per layer: (per MLP unit ((E, F) in a mixture of experts), per query head, per kv group, per
    shared-expert unit or None) scores by `by`."""
    if by == "weight":
        return {i: weight_scores(model, i) for i in range(spec_of(model).n_layers)}
    if by == "activation":
        return activation_scores(model, batches)
    if by == "taylor":
        return taylor_scores(model, batches)
    raise MptcError(f"unknown score '{by}'", hint="by = weight, activation or taylor")


def head_order(heads: Tensor, groups: Tensor, a: S.Attention) -> tuple[Tensor, Tensor]:
    """Source maps for H and G: kv groups by their score (their heads' summed scores plus their own
    k/v score), heads by score inside each group, so GQA stays intact."""
    r = a.heads // a.kv_heads
    s = heads.view(a.kv_heads, r)  # (G, H/G)
    g_map = torch.argsort(s.sum(1) + groups, descending=True, stable=True)
    inner = torch.argsort(s, dim=1, descending=True, stable=True)  # (G, H/G)
    h_map = torch.cat([g * r + inner[g] for g in g_map.tolist()])
    return h_map, g_map


# --- sub-networks of a plain model, by masking ---------------------------------------------


def _zero_slices(model: fx.GraphModule, i: int, f: int | None, h: int | None, drop: bool) -> list[tuple[Tensor, ...]]:
    """The parameter slices that silence what a sub-network leaves out of layer i: MLP units ≥ f
    (down columns), query heads ≥ h (output-projection columns), or the whole layer (both
    branches' output projections and biases)."""
    spec = spec_of(model)
    a = spec.layers[i].attention
    p = f"layers.{i}"
    out = []
    if drop:
        for name in ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias", "mlp.experts.down.weight",
                     "mlp.experts.down.bias", "mlp.shared.down.weight", "mlp.shared.down.bias"):
            t = _get(model, f"{p}.{name}")
            if t is not None:
                out.append(t.data)
        return out
    m = spec.layers[i].mlp
    if f is not None and m.moe:  # every expert keeps its first f units; the shared expert the same fraction
        out.append(model.get_parameter(f"{p}.mlp.experts.down.weight").data[:, :, f:])  # (E, D, F)
        if m.shared is not None:
            out.append(model.get_parameter(f"{p}.mlp.shared.down.weight").data[:, shared_kept(m, f):])
    elif f is not None:
        out.append(model.get_parameter(f"{p}.mlp.down.weight").data[:, f:])
    if h is not None:
        out.append(model.get_parameter(f"{p}.attn.o.weight").data[:, h * a.value_dim:])
    return out


@contextlib.contextmanager
def masked(model: fx.GraphModule, cuts: dict[int, tuple[int | None, int | None, bool]]) -> Iterator[None]:
    """Run `model` as the sub-network that keeps, per layer i in `cuts`, the first f MLP units and the
    first h query heads (None: all), or leaves the layer out (drop): the cut parts' output
    projections are zeroed in place for the block and restored after. Only for pre-norm layers,
    where a silenced branch is a removed one."""
    saved = []
    try:
        with torch.no_grad():
            for i, (f, h, drop) in cuts.items():
                for t in _zero_slices(model, i, f, h, drop):
                    saved.append((t, t.clone()))
                    t.zero_()
        yield
    finally:
        with torch.no_grad():
            for t, v in reversed(saved):
                t.copy_(v)


def layer_losses(model: fx.GraphModule, batches: list[dict], layers: Sequence[int]) -> dict[int, float]:
    """The mean next-token loss with each of `layers` alone left out (its branches silenced)."""
    out = {}
    for i in layers:
        with masked(model, {i: (None, None, True)}):
            out[i] = mean_loss(model, batches)
    return out
