"""Function-preserving growth (Gesmundo & Maile 2023, arXiv 2308.06103), one rule per pass.

Each pass names the symbols it grows and which new entries must be zero; everything else
(the tensors reached, the index maps, the certificate) is the engine's. Notation as in
docs/architecture.md: D width, V vocab, P positions, and per layer H heads, G kv heads, K query/key dim,
Dv value dim, F MLP hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

import torch
from torch import fx

from mptc import spec as S
from mptc.dims import sizes
from mptc.graph import param_info, spec_of
from mptc.lower import IO, Role

from .base import Pass, PassError, PassRefused, layer_list, resized_params
from .engine import Change, Init, grouped_grow_map, grow_map

# The parameter roles these rules were written and checked for. A role the language gains later is
# unknown to every pass (refused in `requires`) until it is listed here and tested.
KNOWN_ROLES: frozenset[Role] = frozenset({
    Role.MODULATE, Role.HYPER, Role.EMBED_TOKENS, Role.EMBED_SEGMENTS, Role.EMBED_PATCH, Role.EMBED_CLS,
    Role.EMBED_MODALITY, Role.EMBED_POSITIONS, Role.EMBED_EXPERTS, Role.EMBED_GATE, Role.EMBED_CONDITION,
    Role.EMBED_ADAPTIVE, Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.MLP_UP, Role.MLP_GATE,
    Role.MLP_DOWN, Role.HEAD_OUT, Role.HEAD_POOLER, Role.HEAD_TRANSFORM, Role.NORM_EMBED, Role.NORM_ATTN,
    Role.NORM_MLP, Role.NORM_HEAD, Role.NORM_TRANSFORM,
    Role.NORM_Q, Role.NORM_K,  # q/k norms run over K: kept by every pass but grow_qk, which refuses them
    Role.MLP_ROUTER, Role.MLP_SHARED_GATE,  # mixture-of-experts MLPs (the feature "moe mlp")
    # sublayer output norms exist only with the features "sandwich norms" / "output norms", which no growth
    # pass declares (`GROWTH_FEATURES`): the feature gate refuses those models first
    Role.NORM_ATTN_OUT, Role.NORM_MLP_OUT,
})
# The language features every growth rule here was checked for: the base language and mixture-of-experts
# MLPs (the expert axis E[l] is never grown by them; F[l] is each expert's hidden size).
GROWTH_FEATURES: frozenset[S.Feature] = S.BASE_FEATURES | {S.Feature.MOE_MLP}


def _not_nested(what: str, spec: S.Spec, i: int, block: str) -> None:
    """Growing a nested (MatFormer) block would change the size of every granularity below the top."""
    if getattr(spec.layers[i], block).nested:
        raise PassError(f"{what}: layer {i}'s {block} is nested (MatFormer); growing it would change what every "
                        "smaller granularity keeps", hint="extract the sub-network you want first, or grow "
                        "layers that are not nested (layers = …)")


def _with_layers(spec: S.Spec, edit) -> S.Spec:
    return spec.replace(layers=tuple(edit(i, layer) for i, layer in enumerate(spec.layers)))


def _times(old: int, factor: float) -> int:
    """round(old × factor), exact where the float product would overflow (the size check refuses it)."""
    x = old * factor
    return round(x) if math.isfinite(x) else round(Fraction(factor) * old)


def _not_smaller(what: str, size: str, old: int, new: int, i: int | None = None) -> None:
    where = f" of layer {i}" if i is not None else ""
    if new < old:
        raise PassError(f"{what} cannot shrink the {size}{where} from {old} to {new}",
                        hint="growth passes only grow; extraction makes models smaller")


@dataclass
class GrowMLP(Pass):
    """F[l] ↑: new hidden units; their input rows (up, gate) free, their output columns zero."""

    name = "grow_mlp"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    hidden: int | None = None
    factor: float | None = None
    layers: list[int] | None = None
    init: Init = field(default_factory=Init)

    def _targets(self, model: fx.GraphModule) -> dict[int, int]:
        if (self.hidden is None) == (self.factor is None):
            raise PassError("grow_mlp needs exactly one of `hidden = N` or `factor = x`")
        spec = spec_of(model)
        out = {}
        for i in layer_list(model, self.layers, self.name):
            _not_nested(self.name, spec, i, "mlp")
            old = spec.layers[i].mlp.hidden
            new = self.hidden if self.hidden is not None else _times(old, self.factor)
            _not_smaller(self.name, "MLP hidden size", old, new, i)
            out[i] = new
        return out

    def requires(self, model):
        super().requires(model)
        self._targets(model)

    def new_spec(self, model):
        t = self._targets(model)
        return _with_layers(spec_of(model), lambda i, ly: replace(ly, mlp=replace(ly.mlp, hidden=t[i])) if i in t
                            else ly)

    def change(self, model):
        spec, t = spec_of(model), self._targets(model)
        maps = {f"F[{i}]": grow_map(spec.layers[i].mlp.hidden, n) for i, n in t.items()}
        return Change(self.new_spec(model), maps, zero_side=IO.IN, init=self.init)


@dataclass
class AddHeads(Pass):
    """H[l] ↑ by whole heads: new Q, K, V free; the new heads' columns of the output projection zero.

    mode `join` (default with GQA): the new query heads join the existing kv groups evenly
    (n must be a multiple of kv_heads; groups stay contiguous). mode `kv`: the new heads
    bring their own kv heads, keeping the group size (n must be a multiple of heads/kv_heads).
    Multi-head attention (kv_heads = heads) stays multi-head: kv heads grow with the heads.
    """

    name = "add_heads"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    n: int = 1
    layers: list[int] | None = None
    mode: str | None = None  # join | kv
    init: Init = field(default_factory=Init)

    def _plan(self, model) -> dict[int, tuple[int, int]]:
        spec = spec_of(model)
        if self.n < 1:
            raise PassError(f"add_heads needs n ≥ 1, got {self.n}", hint="growth passes only grow")
        if self.mode not in (None, "join", "kv"):
            raise PassError(f"add_heads: unknown mode '{self.mode}'", hint="use mode = join or mode = kv")
        plan = {}
        for i in layer_list(model, self.layers, self.name):
            _not_nested(self.name, spec, i, "attention")
            a = spec.layers[i].attention
            r = a.heads // a.kv_heads
            mode = self.mode or ("kv" if r == 1 else "join")
            if mode == "join":
                if self.n % a.kv_heads:
                    raise PassError(f"add_heads: layer {i} has {a.kv_heads} kv groups, so new heads join them "
                                    f"evenly only if n is a multiple of {a.kv_heads} (got {self.n})",
                                    hint="choose such an n, or mode = kv to add whole groups")
                plan[i] = (a.heads + self.n, a.kv_heads)
            else:
                if self.n % r:
                    raise PassError(f"add_heads(mode = kv): layer {i} has {r} query heads per kv head, so n must "
                                    f"be a multiple of {r} (got {self.n})")
                plan[i] = (a.heads + self.n, a.kv_heads + self.n // r)
        return plan

    def requires(self, model):
        super().requires(model)
        self._plan(model)

    def new_spec(self, model):
        plan = self._plan(model)
        return _with_layers(spec_of(model), lambda i, ly: replace(ly, attention=replace(
            ly.attention, heads=plan[i][0], kv_heads=plan[i][1])) if i in plan else ly)

    def change(self, model):
        spec, plan, new = spec_of(model), self._plan(model), self.new_spec(model)
        maps = {}
        for i, (h, g) in plan.items():
            a = spec.layers[i].attention
            if g == a.kv_heads:  # join: each group grows in place
                maps[f"H[{i}]"] = grouped_grow_map(g, a.heads // g, h // g)
            else:
                maps[f"H[{i}]"] = grow_map(a.heads, h)
                maps[f"G[{i}]"] = grow_map(a.kv_heads, g)
        return Change(new, maps, zero_side=IO.IN, init=self.init)


@dataclass
class AddKVHeads(Pass):
    """G[l] ↑ by splitting each kv group: the new kv heads duplicate their group's (exact)."""

    name = "add_kv_heads"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    n: int = 1
    layers: list[int] | None = None

    def _plan(self, model) -> dict[int, int]:
        spec = spec_of(model)
        plan = {}
        for i in layer_list(model, self.layers, self.name):
            _not_nested(self.name, spec, i, "attention")
            a = spec.layers[i].attention
            g = a.kv_heads + self.n
            if self.n < 1 or g > a.heads or a.heads % g or g % a.kv_heads:
                ok = [d for d in range(a.kv_heads + 1, a.heads + 1) if a.heads % d == 0 and d % a.kv_heads == 0]
                raise PassError(f"add_kv_heads: layer {i} cannot go from {a.kv_heads} to {g} kv heads; the count "
                                f"must divide heads = {a.heads} and be a multiple of {a.kv_heads}",
                                hint=f"reachable kv head counts: {', '.join(map(str, ok)) or 'none'}")
            plan[i] = g
        return plan

    def requires(self, model):
        super().requires(model)
        self._plan(model)

    def new_spec(self, model):
        plan = self._plan(model)
        return _with_layers(spec_of(model), lambda i, ly: replace(ly, attention=replace(ly.attention, kv_heads=plan[i]))
                            if i in plan else ly)

    def change(self, model):
        spec, plan, new = spec_of(model), self._plan(model), self.new_spec(model)
        maps = {f"G[{i}]": torch.arange(g) // (g // spec.layers[i].attention.kv_heads) for i, g in plan.items()}
        return Change(new, maps)


@dataclass
class GrowHeadDim(Pass):
    """Dv[l] ↑: new value columns free; the matching rows of the output projection zero."""

    name = "grow_head_dim"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    value: int = 0
    layers: list[int] | None = None
    init: Init = field(default_factory=Init)

    def requires(self, model):
        super().requires(model)
        spec = spec_of(model)
        for i in layer_list(model, self.layers, self.name):
            _not_smaller(self.name, "value dim", spec.layers[i].attention.value_dim, self.value, i)

    def new_spec(self, model):
        ls = layer_list(model, self.layers, self.name)
        return _with_layers(spec_of(model), lambda i, ly: replace(ly, attention=replace(
            ly.attention, value_dim=self.value)) if i in ls else ly)

    def change(self, model):
        spec, ls = spec_of(model), layer_list(model, self.layers, self.name)
        maps = {f"Dv[{i}]": grow_map(spec.layers[i].attention.value_dim, self.value) for i in ls}
        return Change(self.new_spec(model), maps, zero_side=IO.IN, init=self.init)


@dataclass
class GrowQK(Pass):
    """K[l] ↑: new query columns free, new key columns zero, old keys × √(K'/K) so that the
    1/√K' logit scale gives the old logits. With RoPE the new dims stay unrotated (the rotary
    dims and their frequencies are unchanged)."""

    name = "grow_qk"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    dim: int = 0
    layers: list[int] | None = None
    init: Init = field(default_factory=Init)

    def requires(self, model):
        super().requires(model)
        spec = spec_of(model)
        for i in layer_list(model, self.layers, self.name):
            a = spec.layers[i].attention
            _not_smaller(self.name, "query/key dim", a.head_dim, self.dim, i)
            if a.qk_norm is not None:
                raise PassRefused(
                    f"grow_qk cannot grow layers.{i}.attn.q_norm.weight (a norm over K[{i}]) exactly: the new query "
                    f"dims are free, so they change the statistics the q/k norm divides by, and the norm undoes "
                    f"the √(K'/K) key rescale that keeps the logits", hint="grow the layers without a q/k norm "
                    "(layers = …), or add heads (add_heads) to grow attention")
            if spec.embed.positions.kind == "rope" and (self.dim - a.head_dim) % 2:
                raise PassError(f"grow_qk: layer {i} uses rotary embeddings, which work on pairs of dimensions; "
                                f"{a.head_dim} → {self.dim} adds an odd number",
                                hint=f"grow to {self.dim + 1} (whole rotary pairs)")

    def new_spec(self, model):
        spec, ls = spec_of(model), layer_list(model, self.layers, self.name)
        rope = spec.embed.positions.kind == "rope"

        def edit(i, ly):
            if i not in ls:
                return ly
            a = ly.attention  # with rope, the rotary dims (and so their frequencies) stay as they were
            return replace(ly, attention=replace(a, head_dim=self.dim, rotary_dim=a.rotary if rope else None))

        return _with_layers(spec, edit)

    def change(self, model):
        spec, ls, new = spec_of(model), layer_list(model, self.layers, self.name), self.new_spec(model)
        maps = {f"K[{i}]": grow_map(spec.layers[i].attention.head_dim, self.dim) for i in ls}
        factors = {i: math.sqrt(self.dim / spec.layers[i].attention.head_dim) for i in ls}
        return Change(new, maps, zero_roles=frozenset({Role.ATTN_K}), init=self.init,
                      scale=lambda name, info: factors[info.layer] if info.role == Role.ATTN_K and
                      info.layer in factors else 1.0)


@dataclass
class GrowWidth(Pass):
    """D ↑, two exact rules.

    Duplication (`factor = k`, or `width = k·D`): every channel is copied k times, x → [x, x, …].
    Embeddings and residual writers duplicate their outputs, every reader divides its input columns
    by k, norm gains and shifts duplicate with eps unchanged (the mean, variance and RMS of [x, x]
    are those of x), so LayerNorm and RMSNorm, pre- and post-norm, are exact; a tied head reads the
    token table twice, so the norm before it is scaled by 1/k.

    Zero padding (`width = N`, RMSNorm models): new embedding columns and residual writers' new rows
    zero, readers' new columns free; RMSNorm gains × √(D/D') and eps × D/D'. LayerNorm is refused
    here: zero-padded channels change its mean and variance.

    Norms over other symbols (q/k norms over K) read values the growth leaves unchanged, so they are
    kept. A `head none` model's output widens too: the check compares the old output with the new
    one's copies (duplication) or its first D channels (zero padding).
    """

    name = "grow_width"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    width: int | None = None
    factor: float | None = None
    init: Init = field(default_factory=Init)

    def copies(self, model: fx.GraphModule) -> int | None:
        """k when channels are duplicated k times; None for zero padding."""
        spec = spec_of(model)
        if (self.width is None) == (self.factor is None):
            raise PassError("grow_width needs exactly one of `width = N` or `factor = k`")
        if self.factor is not None:
            if float(self.factor) != int(self.factor):
                raise PassRefused(f"grow_width(factor = {self.factor}): the factor must be a whole number, since "
                                  "each channel is copied that many times", hint="use factor = 2, 3, …, or "
                                  "width = N on an RMSNorm model (zero padding)")
            return int(self.factor)
        _not_smaller(self.name, "width", spec.width, self.width)
        if any(n.kind == "layernorm" for n in _norms(spec) if n is not None):
            if self.width % spec.width:
                raise PassRefused(
                    f"grow_width(width = {self.width}) is not exact for LayerNorm: zero-padded channels change the "
                    "mean and the variance it normalises by, and only a multiple of the width "
                    f"({spec.width}) can be reached by copying channels",
                    hint=f"use width = {2 * spec.width} (or factor = 2), which duplicates every channel")
            return self.width // spec.width
        return None

    def requires(self, model):
        super().requires(model)
        spec = spec_of(model)
        k = self.copies(model)
        for name, info in param_info(model).items():
            if IO.NORM in info.io and info.norm_over is None:
                raise PassRefused(f"grow_width does not know how to grow {name} ({info.describe()}): it does not say "
                                  "which axis it normalises over", hint="only norms over D are rescaled")
        if spec.embed.positions.kind == "sinusoidal":
            raise PassRefused("grow_width is not exact with sinusoidal positions: the table's frequencies depend on "
                              "the width, so the position signal of every channel would change",
                              hint="grow models with learned, rope or no positions")
        if k is not None and spec.head.kind == "lm" and spec.head.tied and self._tied_norm(spec) is None:
            where = "transform" if spec.head.transform is not None else "head"
            raise PassRefused(f"grow_width cannot copy channels under a tied head without a norm before it: the "
                              f"token table is read by the head too, so its input must be scaled by 1/{k}, and "
                              f"only a norm's gain can do that exactly (the {where} has none)",
                              hint="add a norm before the head, or untie it")

    @staticmethod
    def _tied_norm(spec: S.Spec) -> Role | None:
        """The role of the norm right before a tied head's matrix (None: there is none)."""
        t = spec.head.transform
        if t is not None:
            return Role.NORM_TRANSFORM if t.norm is not None else None
        return Role.NORM_HEAD if spec.head.norm is not None else None

    def _new_width(self, model: fx.GraphModule) -> int:
        k = self.copies(model)
        return spec_of(model).width * k if k is not None else self.width

    def new_spec(self, model):
        spec = spec_of(model)
        if self.copies(model) is not None:
            return spec.replace(width=self._new_width(model))
        f = spec.width / self.width

        def norm(n: S.Norm | None) -> S.Norm | None:
            return None if n is None else replace(n, eps=n.eps * f)

        t = spec.head.transform
        return spec.replace(
            width=self.width,
            embed=replace(spec.embed, norm=norm(spec.embed.norm)),
            layers=tuple(replace(ly, norm=norm(ly.norm)) for ly in spec.layers),
            head=replace(spec.head, norm=norm(spec.head.norm),
                         transform=None if t is None else replace(t, norm=norm(t.norm))),
        )

    def change(self, model):
        spec = spec_of(model)
        k = self.copies(model)
        new = self.new_spec(model)
        self._copies = k
        if k is None:
            g = math.sqrt(spec.width / self.width)
            return Change(new, {"D": grow_map(spec.width, self.width)}, zero_side=IO.OUT, init=self.init,
                          scale=lambda name, info: g if info.norm_over == "D" else 1.0)
        tied = self._tied_norm(spec) if spec.head.kind == "lm" and spec.head.tied else None

        def scale(name: str, info) -> float:
            reads = sum(io == IO.IN and "D" in ax for io, ax in zip(info.io, info.axes, strict=True))
            return (1.0 / k) ** (reads + (info.role == tied))

        return Change(new, {"D": torch.arange(k * spec.width) % spec.width}, init=self.init, scale=scale)

    def comparable(self, old, new):
        """A wider last-hidden-state output (head none): its copies, or its first D channels, against the old."""
        if old.shape[:-1] != new.shape[:-1] or new.shape[-1] <= old.shape[-1]:
            return old, new
        k = getattr(self, "_copies", None)
        if k is not None and new.shape[-1] == k * old.shape[-1]:
            return torch.cat([old] * k, dim=-1), new
        return old, new[..., : old.shape[-1]]

    def notes(self, old: fx.GraphModule) -> list[str]:
        """What the check compared, where it is not the whole output."""
        spec = spec_of(old)
        if spec.head.kind != "none":
            return []
        k = self.copies(old)
        if k is not None:
            return [f"head none: the output widens from {spec.width} to {k * spec.width} channels; the check "
                    f"compared each of its {k} copies with the old output"]
        return [f"head none: the output widens from {spec.width} to {self.width} channels; the check compared "
                f"the first {spec.width} with the old output (the new ones are zero)"]


def _shift_task(t: S.Task, at: int, n: int, layers: int) -> S.Task:
    """A task after inserting n whole layers at `at`: per-layer lists get `xl`, skips move."""
    def insert(text: str | None) -> str | None:
        parts = [p for p in (text or "").replace(" ", ",").split(",") if p]
        if len(parts) != layers:
            return text  # one granularity for every layer
        return ",".join(parts[:at] + ["xl"] * n + parts[at:])

    return replace(t, mix=insert(t.mix), heads=insert(t.heads), skip=tuple(i + n if i >= at else i for i in t.skip))


def _norms(spec: S.Spec) -> list[S.Norm | None]:
    """Every norm over D: embeddings, layers, the final norm and an lm transform's."""
    t = spec.head.transform
    return [spec.embed.norm, spec.head.norm, t.norm if t is not None else None, *(ly.norm for ly in spec.layers)]


@dataclass
class AddLayers(Pass):
    """L ↑: new blocks (shaped like their neighbour) whose residual writers (attention output
    and MLP down projections) start at zero, so each new block is the identity."""

    name = "add_layers"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    n: int = 1
    at: int | None = None  # insert before this layer index; default: at the end
    init: Init = field(default_factory=Init)

    def _at(self, spec: S.Spec) -> int:
        at = spec.n_layers if self.at is None else self.at
        if not 0 <= at <= spec.n_layers:
            raise PassError(f"add_layers: at = {at} is out of range; use 0..{spec.n_layers} (the model has "
                            f"{spec.n_layers} layers)")
        return at

    def requires(self, model):
        super().requires(model)
        spec = spec_of(model)
        if self.n < 1:
            raise PassError(f"add_layers needs n ≥ 1, got {self.n}")
        self._at(spec)
        if any(ly.placement == "post" for ly in spec.layers):
            raise PassError("add_layers is not exact for post-norm layers: the norm after the residual sum changes "
                            "the stream even when the new block adds zero", hint="grow pre-norm models")

    def new_params(self, model):
        """The old layers once each and n more of the template (counted without the new spec:
        n may be far more layers than could be listed)."""
        spec = spec_of(model)
        tpl = max(self._at(spec) - 1, 0)
        return resized_params(model, sizes(spec) | {"L": spec.n_layers + self.n}, {tpl: 1 + self.n})

    def change(self, model):
        spec = spec_of(model)
        at, n = self._at(spec), self.n
        tpl = max(at - 1, 0)
        layers = spec.layers[:at] + (replace(spec.layers[tpl], skippable=False),) * n + spec.layers[at:]
        new = spec.replace(layers=layers, tasks=tuple(_shift_task(t, at, n, spec.n_layers) for t in spec.tasks))

        def origin(name: str) -> tuple[str | None, bool]:
            if not name.startswith("layers."):
                return name, False
            _, j, rest = name.split(".", 2)
            j = int(j)
            if j < at:
                return name, False
            if j < at + n:
                return f"layers.{tpl}.{rest}", True
            return f"layers.{j - n}.{rest}", False

        return Change(new, origin=origin, zero_roles=frozenset({Role.ATTN_O, Role.MLP_DOWN}), init=self.init)


@dataclass
class GrowVocab(Pass):
    """V ↑: new token rows (and output rows of an untied head) free; a tied head stays tied.
    The old tokens' logits are unchanged."""

    name = "grow_vocab"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    vocab: int = 0
    init: Init = field(default_factory=Init)

    def requires(self, model):
        super().requires(model)
        spec = spec_of(model)
        if spec.vocab is None:
            raise PassError("grow_vocab needs a model that reads tokens")
        if spec.embed.types:
            names = ", ".join(t.name for t in spec.embed.types)
            raise PassError(f"grow_vocab: the vocabulary is split into token types ({names}); which type new ids "
                            "join is a choice the pass cannot make", hint="grow a type's range in the spec and "
                            "initialise its new rows yourself")
        _not_smaller(self.name, "vocabulary", spec.vocab, self.vocab)

    def new_spec(self, model):
        return spec_of(model).replace(vocab=self.vocab)

    def change(self, model):
        spec = spec_of(model)
        return Change(self.new_spec(model), {"V": grow_map(spec.vocab, self.vocab)}, init=self.init)

    def comparable(self, old, new):
        return (old, new[..., : old.shape[-1]]) if spec_is_lm(old, new) else (old, new)


def spec_is_lm(old: torch.Tensor, new: torch.Tensor) -> bool:
    return old.shape[:-1] == new.shape[:-1] and old.shape[-1] < new.shape[-1]


@dataclass
class GrowContext(Pass):
    """P ↑: longer sequences; new learned position rows free (other position kinds just
    change `context`)."""

    name = "grow_context"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    context: int = 0
    init: Init = field(default_factory=Init)

    def requires(self, model):
        super().requires(model)
        spec = spec_of(model)
        if not spec.reads_tokens:
            raise PassError("grow_context applies to token models; an image model's length is set by its patches")
        _not_smaller(self.name, "context", spec.context or 0, self.context)

    def new_spec(self, model):
        return spec_of(model).replace(context=self.context)

    def change(self, model):
        spec, new = spec_of(model), self.new_spec(model)
        learned = spec.embed.positions.kind == "learned"
        if learned and spec.multimodal and not spec.image_first:
            raise PassError("grow_context: the text comes before the image, so longer text would move the image's "
                            "positions", hint="put the image first: input = [patches(…), tokens]")
        # new position rows go at the end (after the image's, if any)
        maps = {"P": grow_map(spec.seq_len, new.seq_len)} if learned else {}
        return Change(new, maps, init=self.init)


GROWTH: tuple[type[Pass], ...] = (GrowMLP, AddHeads, GrowHeadDim, GrowQK, GrowWidth, AddLayers, AddKVHeads, GrowVocab,
                                  GrowContext)
