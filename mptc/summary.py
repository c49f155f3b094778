"""Parameter and FLOP counts per layer, read off the module built on the meta device.

FLOPs per token (forward, one multiply-add = 2 FLOPs, as in Kaplan et al. 2020):
  - every matrix a token passes through: 2 × its elements (projections, MLP, output head —
    a tied head counts the embedding matrix here; the patch embedding counts per patch);
  - attention over a full context T: 2 × H × (K + Dv) × T per layer (scores and the
    weighted sum; no causal halving), T = `context` or the number of patches (+ class token);
  - lookups, norms, activations and softmax are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import fx

from . import spec as S
from .graph import param_info, spec_of
from .lower import lower

MATMUL_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down", "head.out", "head.transform",
                "head.pooler", "embed.patch", "mlp.router", "mlp.shared_gate")


@dataclass
class Part:
    name: str
    params: int = 0
    flops_per_token: int = 0
    tensors: dict[str, list[int]] = field(default_factory=dict)
    desc: str = ""


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

    def to_json(self) -> dict:
        return asdict(self)


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
    for i, layer in enumerate(spec.layers):
        a, m = layer.attention, layer.mlp
        layers[i].flops_per_token += 2 * a.heads * (a.head_dim + a.value_dim) * t
        kv = f"{a.heads}" if a.kv_heads == a.heads else f"{a.heads}/{a.kv_heads}kv"
        vd = "" if a.value_dim == a.head_dim else f", v {a.value_dim}"
        moe = f" · {m.experts} experts top {m.top_k}" if m.experts is not None else ""
        layers[i].desc = f"attn {kv}×{a.head_dim}{vd} {a.mask} · mlp {m.hidden} {m.activation}{moe}"
    p = spec.patches
    inputs = ([f"patches {p.image}/{p.patch}×{p.channels}"] if p else []) + \
        ([f"tokens {spec.vocab}"] if spec.reads_tokens else [])
    embed.desc = " + ".join(inputs) + f" · {spec.embed.positions.kind}"
    head.desc = spec.head.kind + (" tied" if spec.head.tied else "") + \
        (f" {spec.head.classes} classes" if spec.head.kind == "classify" else "")
    parts = [embed, *layers, head]
    return Summary(spec.name, sum(x.params for x in parts), sum(x.flops_per_token for x in parts), spec.vocab,
                   spec.width, spec.seq_len, embed, layers, head)


@dataclass
class Group:
    """Consecutive layers with the same parameters, FLOPs and tensor shapes: one row of the table."""

    first: int
    last: int
    part: Part  # the first layer's

    @property
    def name(self) -> str:
        n = self.last - self.first + 1
        return f"layer {self.first}" if n == 1 else f"layers {self.first}–{self.last} ×{n}"


def _layer_key(i: int, part: Part) -> tuple:
    """What makes two layers the same row: sizes, description and tensor shapes (names without the index)."""
    prefix = f"layers.{i}."
    shapes = tuple((k.removeprefix(prefix), tuple(v)) for k, v in part.tensors.items())
    return part.params, part.flops_per_token, part.desc, shapes


def layer_groups(layers: list[Part]) -> list[Group]:
    """Runs of identical consecutive layers (a uniform 80-layer spec is one group)."""
    out: list[Group] = []
    for i, part in enumerate(layers):
        if out and _layer_key(out[-1].first, out[-1].part) == _layer_key(i, part):
            out[-1].last = i
        else:
            out.append(Group(i, i, part))
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def human(n: int) -> str:
    for unit, k in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)
