"""Parameter and FLOP counts per layer, read off the module built on the meta device.

FLOPs per token (forward, one multiply-add = 2 FLOPs, as in Kaplan et al. 2020):
  - every matrix a token passes through: 2 × its elements (projections, MLP, output head —
    a tied head counts the embedding matrix here; the patch embedding counts per patch);
  - attention over a full context T: 2 × H × (K + Dv) × T per layer (scores and the
    weighted sum; no causal halving), T = `context` or the number of patches (+ class token);
    with a sliding window W a query sees min(T, W) keys (causal) or min(T, 2W − 1) (both sides);
  - a hypernetwork's low-rank delta A(c)·(B(c)·x): 2 × r × (in + out) per token, beside its generator matrices;
  - lookups, norms, activations and softmax are not counted.

Matrices that run once per example (the pooler, FiLM and hypernetwork generators reading `conditions`) are
counted per token like the rest.

A mixture of experts runs every expert on every token (the dense form the lowering builds), so its FLOPs
count every expert; `active_params` counts the top-k experts a token's output depends on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import fx

from . import spec as S
from .graph import param_info, spec_of
from .lower import lower

MATMUL_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down", "head.out", "head.transform",
                "head.pooler", "embed.patch", "mlp.router", "mlp.shared_gate", "hyper", "embed.gate",
                "embed.adaptive", "embed.condition")


@dataclass
class Part:
    name: str
    params: int = 0
    flops_per_token: int = 0
    tensors: dict[str, list[int]] = field(default_factory=dict)
    desc: str = ""
    active_params: int = 0  # the parameters a token's output depends on (MoE: the top-k experts' share)
    layer: S.Layer | None = None  # a layer's spec, defaults resolved (not in the JSON): equal layers share a row


@dataclass
class Summary:
    name: str
    params: int
    flops_per_token: int
    vocab: int | None
    width: int
    context: int | None
    embed: Part
    layers: list[Part]
    head: Part
    active_params: int = 0
    features: list[str] = field(default_factory=list)  # the optional language features used (`spec.features`)

    def to_json(self) -> dict:
        return asdict(self, dict_factory=lambda kv: {k: v for k, v in kv if k != "layer"})


def _keys(a: S.Attention, t: int) -> int:
    """The keys one query attends to over a context of t: all of them, or those its window lets through."""
    if a.window is None:
        return t
    return min(t, a.window if a.mask == "causal" else 2 * a.window - 1)


def summarize(src: S.Spec | fx.GraphModule) -> Summary:
    """The summary of a spec (lowered on the meta device: shapes only, nothing allocated) or of a built model."""
    if isinstance(src, S.Spec):  # the parameter tree alone: no GraphModule code is generated
        spec, low = src, lower(src, "meta")
        root, params = low.root, low.params
    else:
        spec, root, params = spec_of(src), src, param_info(src)
    embed, head = Part("embed"), Part("head")
    layers = [Part(f"layer {i}") for i in range(spec.n_layers)]
    seen = set()
    for name, info in params.items():
        shape = list(root.get_parameter(name).shape)
        part = embed if name.startswith("embed.") else head if info.layer is None else layers[info.layer]
        part.tensors[name] = shape
        if name not in seen:
            part.params += _numel(shape)
            seen.add(name)
        if info.role in MATMUL_ROLES and len(shape) in (2, 3):  # (E, out, in): every expert runs (dense form)
            part.flops_per_token += 2 * _numel(shape)
    if spec.head.kind == "lm" and spec.head.tied:
        v, d = spec.vocab, spec.width
        head.flops_per_token += 2 * v * d
        head.tensors["embed.tokens.weight (tied)"] = [v, d]
    t = spec.seq_len or 0
    for i, part in enumerate(layers):
        a = spec.layers[i].attention
        part.flops_per_token += 2 * a.heads * (a.head_dim + a.value_dim) * _keys(a, t)
        if spec.layers[i].hyper is not None:  # x → B(c)·x (r·in) → A(c)·… (r·out)
            part.flops_per_token += 2 * sum(part.tensors[f"layers.{i}.hyper.{m}.weight"][0] for m in ("a", "b"))
        part.layer = _resolved(spec, i)
    for part in [embed, *layers, head]:
        part.active_params = part.params - _idle_experts(part, part.layer)
    _describe(spec, embed, layers, head)
    parts = [embed, *layers, head]
    return Summary(spec.name, sum(x.params for x in parts), sum(x.flops_per_token for x in parts), spec.vocab,
                   spec.width, spec.seq_len, embed, layers, head, sum(x.active_params for x in parts),
                   [f.value for f in S.Feature if f in S.features(spec)])


def _resolved(spec: S.Spec, i: int) -> S.Layer:
    """Layer i with its implicit values written out (its rope: its own or the model's; the rotated dims), so a
    layer that names the model's rope compares equal to one that inherits it."""
    layer = spec.layers[i]
    a, rope = layer.attention, spec.layer_rope(i)
    if rope.kind != "rope":
        return layer
    return replace(layer, attention=replace(a, rope=rope, rotary_dim=a.rotary))


def _idle_experts(part: Part, layer: S.Layer | None) -> int:
    """Parameters of the experts a token is not routed to: (E − top_k)/E of every (E, …) expert tensor."""
    if layer is None or not layer.mlp.moe:
        return 0
    e, k = layer.mlp.experts, layer.mlp.top_k or layer.mlp.experts
    return sum(_numel(shape) // e * (e - k) for name, shape in part.tensors.items() if ".mlp.experts." in name)


# Layer fields the layout column always shows; every other field is shown where it differs between layers.
SHOWN = ("attention.heads", "attention.kv_heads", "attention.head_dim", "attention.value_dim", "attention.mask",
         "mlp.hidden", "mlp.activation", "mlp.experts", "mlp.top_k")


def _fields(layer: S.Layer) -> dict[str, object]:
    """Every field of a layer by its path: `placement`, `attention.window`, `mlp.bias`, …"""
    out: dict[str, object] = {}
    for f in fields(layer):
        v = getattr(layer, f.name)
        if f.name in ("attention", "mlp"):
            out |= {f"{f.name}.{g.name}": getattr(v, g.name) for g in fields(v)}
        else:
            out[f.name] = v
    return out


def _layer_desc(layer: S.Layer, differ: list[str]) -> str:
    """`attn 8/2kv×16 causal · mlp 64 swiglu`, then the fields that differ between layers (`attn.window = 4`)."""
    a, m = layer.attention, layer.mlp
    kv = f"{a.heads}" if a.kv_heads == a.heads else f"{a.heads}/{a.kv_heads}kv"
    vd = "" if a.value_dim == a.head_dim else f", v {a.value_dim}"
    moe = f" · {m.experts} experts top {m.top_k}" if m.moe else ""
    desc = f"attn {kv}×{a.head_dim}{vd} {a.mask} · mlp {m.hidden} {m.activation}{moe}"
    values = _fields(layer)
    extra = [f"{k.replace('attention.', 'attn.')} = {S._lit(values[k])}" for k in differ]  # the spec's own text
    return desc + "".join(f" · {x}" for x in extra)


def _head_desc(h: S.Head) -> str:
    if h.kind == "lm":
        return "lm, tied: its matrix is counted in embed" if h.tied else "lm"
    if h.kind == "classify":
        pool = "per token" if h.pool == "none" else f"pool {h.pool}" + (" + pooler" if h.pooler else "")
        return f"classify {h.classes} classes, {pool}"
    if h.kind == "span":
        return "span: start and end logits per token"
    return "none: hidden states"


def _describe(spec: S.Spec, embed: Part, layers: list[Part], head: Part) -> None:
    """Fill in each part's layout text."""
    all_fields = [_fields(p.layer) for p in layers]
    differ = [k for k in (all_fields[0] if all_fields else {}) if k not in SHOWN
              and any(f[k] != all_fields[0][k] for f in all_fields)]
    for part in layers:
        part.desc = _layer_desc(part.layer, differ)
        if part.active_params != part.params:
            part.desc += f" · {part.active_params:,} params active per token"
    p = spec.patches
    inputs = ([f"patches {p.image}/{p.patch}×{p.channels}"] if p else []) + \
        ([f"tokens {spec.vocab}"] if spec.reads_tokens else [])
    embed.desc = " + ".join(inputs) + f" · {spec.embed.positions.kind}"
    head.desc = _head_desc(spec.head)


@dataclass
class Group:
    """Consecutive identical layers (equal specs, hence equal parameters, FLOPs and shapes): one table row."""

    first: int
    last: int
    part: Part  # the first layer's

    @property
    def name(self) -> str:
        n = self.last - self.first + 1
        return f"layer {self.first}" if n == 1 else f"layers {self.first}–{self.last} ×{n}"


def _layer_key(i: int, part: Part) -> tuple:
    """What makes two layers the same row: the layer's spec (every field), sizes, description and tensor
    shapes (names without the index)."""
    prefix = f"layers.{i}."
    shapes = tuple((k.removeprefix(prefix), tuple(v)) for k, v in part.tensors.items())
    return part.layer, part.params, part.flops_per_token, part.desc, shapes


def layer_groups(layers: list[Part]) -> list[Group]:
    """Runs of identical consecutive layers (a uniform 80-layer spec is one group)."""
    out: list[Group] = []
    for i, part in enumerate(layers):
        if out and _layer_key(out[-1].first, out[-1].part) == _layer_key(i, part):
            out[-1].last = i
        else:
            out.append(Group(i, i, part))
    return out


def print_table(s: Summary, verbose: bool = False, console: Console | None = None) -> None:
    """`mptc summary`: one row for the embedding, per run of identical layers, for the head; the total;
    the features used. `verbose` lists every tensor's shape under its row."""
    active = f" ({human(s.active_params)} active per token)" if s.active_params != s.params else ""
    context = f"context {s.context}" if s.context else "no context: attention not counted"
    notes = [f"features: {', '.join(s.features) or 'none'}",
             "consecutive layers equal in every field share a row (params and FLOPs per layer)"]
    if active:
        notes.append("experts: FLOPs count every expert (all run, dense form); active params only the top k")
    t = Table(title=f"{s.name}: {human(s.params)} parameters{active}, {human(s.flops_per_token)} FLOPs/token "
              f"({context})", title_justify="left", caption="\n".join(notes), caption_justify="left")
    t.add_column("part")
    t.add_column("params", justify="right")
    t.add_column("FLOPs/token", justify="right")
    t.add_column("shapes" if verbose else "layout")
    rows = [(s.embed.name, s.embed), *((g.name, g.part) for g in layer_groups(s.layers)), (s.head.name, s.head)]
    for name, part in rows:
        shapes = part.desc
        if verbose:
            shapes += "".join(f"\n{_short(k)} {tuple(v)}" for k, v in part.tensors.items())  # one per line
        t.add_row(name, f"{part.params:,}", f"{part.flops_per_token:,}", Text(shapes))  # Text: `[…]` is no markup
    t.add_row("total", f"{s.params:,}", f"{s.flops_per_token:,}", "", style="bold")
    (console or Console()).print(t)


def _short(name: str) -> str:
    """`layers.3.attn.q.weight` → `attn.q.weight`; `embed.tokens.weight` → `tokens.weight`."""
    parts = name.split(".")
    return ".".join(parts[2:] if parts[0] == "layers" else parts[1:])


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def human(n: int) -> str:
    """`1.50K`, `124.67M`: the smallest unit whose value shows under 1000 (999,999 is `1.00M`, not `1000.00K`)."""
    if abs(n) < 1000:
        return str(n)
    units = (("K", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12))
    unit, k = next(((u, k) for u, k in units if round(abs(n) / k, 2) < 1000), units[-1])
    return f"{n / k:.2f}{unit}"
