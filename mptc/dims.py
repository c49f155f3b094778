"""Dimension symbols and the size of every matrix a spec implies (torch-free, so `mptc check` refuses a
tensor too large to exist without importing torch).

Symbols (docs/architecture.md): D = width, V = vocab, L = layers, P = context, C = classes, S = segments,
Cn = conditions, M = experts, I = patch features, MOD = modalities, T = token types (V:NAME their sizes),
per layer H[i], G[i], K[i], Dv[i], F[i] (MLP hidden), E[i] and Fs[i] (MLP experts, shared expert hidden),
F:hyper[i] and R[i] (hypernetwork), F:embed.NAME (FiLM).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from . import spec as S
from .errors import Span, SpecError

Axes = tuple[tuple[str, ...], ...]  # per axis, the symbols whose sizes multiply (as in lower.NodeInfo)

# Attributes of a torch.nn.Module (`dir(nn.Module())`): a token type's name becomes a module attribute, so it
# cannot be one of these (tests/test_layering.py keeps this in step with the installed torch).
MODULE_ATTRIBUTES = frozenset((
    "T_destination", "__annotations__", "__call__", "__class__", "__delattr__", "__dict__", "__dir__", "__doc__",
    "__eq__", "__format__", "__ge__", "__getattr__", "__getattribute__", "__getstate__", "__gt__", "__hash__",
    "__init__", "__init_subclass__", "__le__", "__lt__", "__module__", "__ne__", "__new__", "__reduce__",
    "__reduce_ex__", "__repr__", "__setattr__", "__setstate__", "__sizeof__", "__str__", "__subclasshook__",
    "__weakref__", "_apply", "_backward_hooks", "_backward_pre_hooks", "_buffers", "_call_impl",
    "_compiled_call_impl", "_forward_hooks", "_forward_hooks_always_called", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_get_backward_hooks", "_get_backward_pre_hooks",
    "_get_name", "_is_full_backward_hook", "_load_from_state_dict", "_load_state_dict_post_hooks",
    "_load_state_dict_pre_hooks", "_maybe_warn_non_full_backward_hook", "_modules", "_named_members",
    "_non_persistent_buffers_set", "_parameters", "_register_load_state_dict_pre_hook",
    "_register_state_dict_hook", "_replicate_for_data_parallel", "_save_to_state_dict", "_slow_forward",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_version", "_wrapped_call_impl", "add_module", "apply",
    "bfloat16", "buffers", "call_super_init", "children", "compile", "cpu", "cuda", "double", "dump_patches", "eval",
    "extra_repr", "float", "forward", "get_buffer", "get_extra_state", "get_parameter", "get_submodule", "half",
    "ipu", "load_state_dict", "modules", "mtia", "named_buffers", "named_children", "named_modules",
    "named_parameters", "parameters", "register_backward_hook", "register_buffer", "register_forward_hook",
    "register_forward_pre_hook", "register_full_backward_hook", "register_full_backward_pre_hook",
    "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook", "register_module",
    "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook", "requires_grad_",
    "set_extra_state", "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train", "training", "type",
    "xpu", "zero_grad",
))


def sizes(spec: S.Spec) -> dict[str, int]:
    """The value of every dimension symbol of a spec."""
    out = {"D": spec.width, "L": spec.n_layers}
    if spec.vocab is not None:
        out["V"] = spec.vocab
    if spec.seq_len is not None:
        out["P"] = spec.seq_len
    if spec.head.classes is not None:
        out["C"] = spec.head.classes
    if spec.embed.segments:
        out["S"] = spec.embed.segments
    e = spec.embed
    if spec.conditions:
        out["Cn"] = spec.conditions
    if e.types:
        out["T"] = len(e.types)
        out |= {f"V:{t.name}": t.size for t in e.types}
    if e.experts is not None:
        out["M"] = e.experts.count
    for k in ("condition", "adaptive"):
        if getattr(e, k) is not None:
            out[f"F:embed.{k}"] = getattr(e, k).hidden
    for i, ly in enumerate(spec.layers):
        if ly.hyper is not None:
            out[f"F:hyper[{i}]"], out[f"R[{i}]"] = ly.hyper.hidden, ly.hyper.rank
    if spec.patches is not None:
        out["I"] = spec.patches.channels * spec.patches.patch**2  # patch input features
    if spec.multimodal:
        out["MOD"] = 2
    for i, layer in enumerate(spec.layers):
        a = layer.attention
        out |= {f"H[{i}]": a.heads, f"G[{i}]": a.kv_heads, f"K[{i}]": a.head_dim, f"Dv[{i}]": a.value_dim,
                f"F[{i}]": layer.mlp.hidden}
        if layer.mlp.moe:
            out[f"E[{i}]"] = layer.mlp.experts
            if layer.mlp.shared is not None:
                out[f"Fs[{i}]"] = layer.mlp.shared
    return out


SYMBOL_FIELDS = {  # the spec fields that set a dimension symbol, most specific first
    "D": ("width",), "V": ("vocab", "embed.types"), "P": ("context", "embed.input"), "C": ("head.classes",),
    "S": ("embed.segments",), "Cn": ("conditions",), "M": ("embed.experts",), "I": ("embed.input",),
    "MOD": ("embed.input",), "T": ("embed.types",), "H": ("layers.attention.heads",),
    "G": ("layers.attention.kv_heads", "layers.attention.heads"),
    "K": ("layers.attention.head_dim", "layers.attention.heads", "width"),
    "Dv": ("layers.attention.value_dim", "layers.attention.head_dim", "layers.attention.heads", "width"),
    "F": ("layers.mlp.hidden", "width"), "R": ("layers.hyper",), "E": ("layers.mlp.experts",),
    "Fs": ("layers.mlp.shared",),
}


def symbol_span(spec: S.Spec, sym: str) -> Span | None:
    """Where a dimension symbol (`D`, `H[3]`, `V:text`, `F:hyper[0]`) is set in the spec's source, if known."""
    base, _, rest = sym.partition("[")
    layer = int(rest.rstrip("]")) if rest else None
    if base.startswith("V:"):
        keys: tuple[str, ...] = ("embed.types",)
    elif base.startswith("F:"):
        keys = ("layers.hyper",) if base == "F:hyper" else (base[2:],)
    else:
        keys = SYMBOL_FIELDS.get(base, ())
    for k in (*keys, "model"):
        v = spec.spans.get(k)
        if v is None:
            continue
        items = getattr(v, "value", None)
        if layer is not None and isinstance(items, list) and layer < len(items):
            return items[layer].span
        return v.span
    return None


def too_large(spec: S.Spec, name: str, axes: Axes, dims: dict[str, int] | None = None) -> SpecError | None:
    """The error for a parameter of MAX_ELEMENTS or more elements (torch cannot size it, not even on the meta
    device), at the field of its largest dimension; None when it fits."""
    dims = sizes(spec) if dims is None else dims
    shape = tuple(math.prod(dims[s] for s in ax) for ax in axes)
    if math.prod(shape) < S.MAX_ELEMENTS:
        return None
    big = max((s for ax in axes for s in ax), key=lambda s: dims[s])
    text = " × ".join(f"{n:,}" for n in shape)
    return SpecError(f"parameter '{name}' would have {math.prod(shape):.3g} elements ({text}), more than a tensor "
                     f"can hold (2^60)", symbol_span(spec, big), "make that dimension smaller")


def check_tensor_sizes(spec: S.Spec) -> None:
    """Refuse a spec with a parameter tensor torch cannot hold (see `too_large`), without building anything."""
    dims = sizes(spec)
    for name, axes in matrices(spec):
        err = too_large(spec, name, axes, dims)
        if err is not None:
            raise err


def matrices(spec: S.Spec) -> Iterator[tuple[str, Axes]]:
    """Every parameter of two or more axes the lowering makes, with its axis symbols (as in `NodeInfo.axes`);
    vectors (biases, gains) are no larger than the matrix beside them. tests/test_layering.py checks this list
    against the lowered parameters."""
    e, hd = spec.embed, spec.head
    if spec.reads_tokens:
        if e.experts is not None:
            yield "embed.experts.weight", (("M",), ("V",), ("D",))
            yield "embed.gate.weight", (("V",), ("M",)) if e.experts.gate == "token" else (("M",), ("Cn",))
        elif e.types:
            yield from ((f"embed.types.{t.name}.weight", ((f"V:{t.name}",), ("D",))) for t in e.types)
        else:
            yield "embed.tokens.weight", (("V",), ("D",))
        if e.segments:
            yield "embed.segments.weight", (("S",), ("D",))
    if spec.patches is not None:
        yield "embed.patch.weight", (("D",), ("I",))
    if spec.multimodal:
        yield "embed.modality.weight", (("MOD",), ("D",))
    if e.positions.kind == "learned":
        yield "embed.positions.weight", (("P",), ("D",))
    for kind, src in (("adaptive", "D"), ("condition", "Cn")):
        if getattr(e, kind) is not None:
            hid = (f"F:embed.{kind}",)
            yield f"embed.{kind}.hidden.weight", (hid, (src,))
            yield f"embed.{kind}.scale.weight", (("D",), hid)
            yield f"embed.{kind}.shift.weight", (("D",), hid)
    for i, ly in enumerate(spec.layers):
        yield from _layer_matrices(i, ly)
    if hd.kind == "lm" and hd.transform is not None:
        yield "head.transform.weight", (("D",), ("D",))
    if hd.kind == "classify" and hd.pooler:
        yield "head.pooler.weight", (("D",), ("D",))
    if hd.kind in ("classify", "span"):
        yield "head.out.weight", (("C",), ("D",))
    elif hd.kind == "lm" and not hd.tied:
        yield "head.out.weight", (("V",), ("D",))


def _layer_matrices(i: int, ly: S.Layer) -> Iterator[tuple[str, Axes]]:
    """One layer's matrices: type modulation, attention, MLP, and a hypernetwork on one projection."""
    H, G, K, Dv, F = f"H[{i}]", f"G[{i}]", f"K[{i}]", f"Dv[{i}]", f"F[{i}]"  # noqa: N806
    pre = f"layers.{i}"
    if ly.modulate:
        yield f"{pre}.modulate.scale", (("T",), ("D",))
        yield f"{pre}.modulate.shift", (("T",), ("D",))
    proj = {"attn.q": ((H, K), ("D",)), "attn.k": ((G, K), ("D",)), "attn.v": ((G, Dv), ("D",)),
            "attn.o": (("D",), (H, Dv)), "mlp.up": ((F,), ("D",)), "mlp.gate": ((F,), ("D",)),
            "mlp.down": (("D",), (F,))}
    if not ly.mlp.gated:
        del proj["mlp.gate"]
    if ly.mlp.moe:  # stacked experts (E, …), the router, a shared expert and its gate
        E, mlp = f"E[{i}]", [r for r in proj if r.startswith("mlp.")]  # noqa: N806
        yield f"{pre}.mlp.router.weight", ((E,), ("D",))
        yield from ((f"{pre}.mlp.experts.{r[4:]}.weight", ((E,), *proj[r])) for r in mlp)
        if ly.mlp.shared is not None:
            yield from ((f"{pre}.mlp.shared.{r[4:]}.weight", tuple((f"Fs[{i}]",) if ax == (F,) else ax
                                                                   for ax in proj[r])) for r in mlp)
        if ly.mlp.shared_gate:
            yield f"{pre}.mlp.shared_gate.weight", ((), ("D",))
        proj = {r: ax for r, ax in proj.items() if not r.startswith("mlp.")}
    yield from ((f"{pre}.{role}.weight", axes) for role, axes in proj.items())
    if ly.hyper is not None and S.HYPER_TARGETS[ly.hyper.target] in proj:
        out_ax, in_ax = proj[S.HYPER_TARGETS[ly.hyper.target]]
        hid, rank = (f"F:hyper[{i}]",), f"R[{i}]"
        yield f"{pre}.hyper.hidden.weight", (hid, ("Cn",))
        yield f"{pre}.hyper.a.weight", ((*out_ax, rank), hid)
        yield f"{pre}.hyper.b.weight", ((rank, *in_ax), hid)
