"""Extraction and importance reordering: the same engine, with prefix and permutation maps.

`extract` cuts a sub-network out physically: each MLP keeps an index prefix of its hidden units,
each attention a prefix of its kv groups (whole groups, with their query heads), left-out layers
go. A MatFormer-nested layer (Devvrit et al. 2023) cuts at one of its declared levels; a layer
without nesting at any fraction (an implied single level: the prefix a `reorder` ranked first),
and any pre-norm layer may be left out. The result is checked against the parent run as that
sub-network (`mptc.nested.granularity` for nested parts, the cut parts silenced for the others),
which must agree to float rounding. `correct = lsq` then refits the shrunk projections' consumers
(passes/correct.py): the function changes by design, the held-out loss is checked instead.

`reorder` ranks MLP units and attention heads (passes/scores.py: weight, activation or taylor) and
permutes them (function-preserving), so that the prefix a later `extract` keeps is the most
important part. Heads rank inside their kv group and whole groups rank by their summed score,
so GQA stays intact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from mptc import choice as C
from mptc.graph import spec_of
from mptc.nested import granularity

from .base import CheckFailed, Pass, PassError, layer_list
from .correct import DEFAULT_RIDGE, RefitClaim, sequential_refits
from .engine import Certificate, Change, remap
from .grow import GROWTH_FEATURES, KNOWN_ROLES
from .scores import (
    SCORES,
    Calibration,
    calibration_of,
    head_order,
    layer_losses,
    masked,
    mean_loss,
    mlp_groups,
    scores,
    shared_kept,
)
from .verify import F64_TOL, max_error, probes

NOT_TEXT = {"text": False}  # a field pass text cannot write (tensors given from Python)
CORRECTIONS = ("lsq",)


def _cal_field():
    return field(default=None, metadata=NOT_TEXT, compare=False, repr=False)


@dataclass
class Extract(Pass):
    """A sub-network as a smaller model: MLP units and kv groups to a prefix, left-out layers removed."""

    name = "extract"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES  # the base language and mixtures of experts (each expert cut to its prefix)
    f32_tol = 1e-5  # a sliced matmul against one with zeroed columns: float32 sums in another order
    mlp: str | None = None  # one granularity (s, m, l, xl) or fraction (0.5) for every MLP
    mix: str | None = None  # one MLP granularity or fraction per layer, "s,s,m,l" or "0.5,0.25,0.5,1"
    heads: str | None = None  # one granularity or fraction of kv groups for every attention (or one per layer)
    drop_layers: list[int] | None = None
    task: str | None = None  # a sub-network named in the spec's `tasks`
    kv_groups: int | None = None  # kv groups every attention keeps (with their query heads)
    drop_least: int | None = None  # leave out the N layers whose removal raises the calibration loss least
    correct: str | None = None  # lsq: refit each shrunk projection's consumer on calibration data
    merge_kv: bool = False  # with kv_groups: keep every query head, average the k/v of the groups merged
    ridge: float = DEFAULT_RIDGE  # the refit's ridge, relative to the mean activation energy
    data: list[str] | None = None  # calibration text (files, directories or stdlib), read as bytes
    samples: int = 64  # calibration windows
    seed: int = 0  # which windows
    calibration: list[dict] | None = _cal_field()  # calibration batches given from Python (model inputs)
    held_out: list[dict] | None = _cal_field()  # held-out batches for the correction's check

    def __post_init__(self):
        super().__post_init__()
        self._choice: tuple[int, C.Choice] | None = None
        self._record: dict = {}
        if self.correct is not None and self.correct not in CORRECTIONS:
            raise PassError(f"extract: unknown correction '{self.correct}'", hint="correct = lsq")
        for k in ("kv_groups", "drop_least", "samples"):
            v = getattr(self, k)
            if v is not None and v < (0 if k == "drop_least" else 1):
                raise PassError(f"extract: {k} must be at least 1, got {v}")
        if not self.ridge >= 0:
            raise PassError(f"extract: ridge must be a non-negative number, got {self.ridge}")

    @property
    def exact(self) -> bool:  # a refit or a merge changes the function by design; its check is the held-out loss
        return self.correct is None and not self.merge_kv

    # --- the sub-network ---

    def choice(self, model: fx.GraphModule) -> C.Choice:
        if self._choice is not None and self._choice[0] == id(model):
            return self._choice[1]
        spec = spec_of(model)
        if self.task is not None:
            if any(x is not None for x in (self.mlp, self.mix, self.heads, self.drop_layers, self.kv_groups,
                                           self.drop_least)):
                raise PassError("extract: a task names its own sub-network; give the task or the granularities")
            c = C.task_choice(spec, self.task)
        else:
            c = C.parse_choice(spec, self.mix, mlp=self.mlp, heads=self._heads(spec), skip=self.drop_layers or (),
                               implied=True)
            if self.drop_least:
                c = C.Choice(c.mlp, c.heads, c.skip | set(self._least(model, c)))
        merging = self.merge_kv and any(self.kv_groups < ly.attention.kv_heads for ly in spec.layers)
        if c.is_full and not merging:
            raise PassError("extract: this choice is the whole model", hint="pick a smaller granularity, e.g. "
                            "mlp = 0.5, or layers to drop")
        self._check_cuts(spec, c)
        self._choice = (id(model), c)
        return c

    def _heads(self, spec) -> str | None:
        if self.merge_kv:
            if self.kv_groups is None or self.correct is not None:
                raise PassError("extract: merge_kv merges kv groups down to kv_groups (and is not combined with "
                                "correct)", hint="give kv_groups = N, and leave out correct")
            for i, ly in enumerate(spec.layers):
                if ly.attention.kv_heads % self.kv_groups or ly.attention.nested:
                    raise PassError(f"extract: layer {i} has {ly.attention.kv_heads} kv groups"
                                    f"{' (nested)' if ly.attention.nested else ''}: merge_kv needs a count that "
                                    f"divides it, got kv_groups = {self.kv_groups}")
            return self.heads
        if self.kv_groups is None:
            return self.heads
        if self.heads is not None:
            raise PassError("extract: give heads (a fraction) or kv_groups (a count), not both")
        out = []
        for i, ly in enumerate(spec.layers):
            g = ly.attention.kv_heads
            if self.kv_groups > g:
                raise PassError(f"extract: kv_groups = {self.kv_groups}, but layer {i} has {g} kv groups")
            out.append(f"{self.kv_groups}/{g}")
        return ",".join(out)

    def _check_cuts(self, spec, c: C.Choice) -> None:
        """Refuse cuts the masked reference cannot stand for (see `scores.masked`)."""
        for i, ly in enumerate(spec.layers):
            if i in c.skip and not ly.skippable and ly.placement != "pre":
                raise PassError(f"extract: layer {i} has placement = {ly.placement}: only a pre-norm layer (or a "
                                "skippable one) can be left out", hint="drop pre-norm layers, or declare skippable")
            if c.mlp[i] < 1.0 and ly.mlp.moe and self.correct is not None:
                raise PassError(f"extract: layer {i}'s MLP is a mixture of experts; correct = lsq refits a dense "
                                "MLP's down projection", hint="leave out correct (each expert is cut to its "
                                "prefix and checked exactly)")

    def _least(self, model: fx.GraphModule, c: C.Choice) -> list[int]:
        """The `drop_least` layers whose removal alone raises the calibration loss least."""
        cal = self.calibration_data(model)
        spec = spec_of(model)
        free = [i for i in range(spec.n_layers) if i not in c.skip and spec.layers[i].placement == "pre"]
        if self.drop_least >= len(free):
            raise PassError(f"extract: drop_least = {self.drop_least}, but only {len(free)} layers can be left out")
        losses = layer_losses(model, cal.batches, free)
        self._record["layer_loss"] = {str(i): round(v, 6) for i, v in losses.items()}
        return sorted(free, key=lambda i: losses[i])[: self.drop_least]

    def calibration_data(self, model: fx.GraphModule) -> Calibration:
        cal = calibration_of(model, self.calibration, self.data, self.samples, self.seed,
                             f"extract({'correct = lsq' if self.correct else 'drop_least'})")
        self._record["calibration"] = cal.record()
        return cal

    def cuts(self, model: fx.GraphModule, c: C.Choice) -> dict[int, tuple[int | None, int | None, bool]]:
        """The parts of layers without nesting that the sub-network leaves out: (MLP units kept, query
        heads kept, layer left out), None where nothing is cut."""
        spec = spec_of(model)
        out = {}
        for i, (f, h, g) in enumerate(C.active_sizes(spec, c)):
            ly = spec.layers[i]
            drop = i in c.skip and not ly.skippable
            cf = f if f < ly.mlp.hidden and ly.mlp.nested is None else None
            ch = h if g < ly.attention.kv_heads and ly.attention.nested is None else None
            if drop or cf is not None or ch is not None:
                out[i] = (cf, ch, drop)
        return out

    def requires(self, model):
        super().requires(model)
        self.choice(model)
        if self.correct and any(spec_of(model).layers[i].mlp.nested or spec_of(model).layers[i].attention.nested
                                for i in range(spec_of(model).n_layers)):
            raise PassError("extract: correct = lsq refits layers without declared nesting; this model is nested "
                            "(its prefixes were trained)", hint="leave out correct")

    def change(self, model):
        spec = spec_of(model)
        choice = self.choice(model)
        new = C.sub_spec(spec, choice)
        kept = [i for i in range(spec.n_layers) if i not in choice.skip]
        sizes = C.active_sizes(spec, choice)
        maps = {}
        layers = list(new.layers)
        for new_i, old_i in enumerate(kept):
            f, h, g = sizes[old_i]
            ly = spec.layers[old_i]
            if f < ly.mlp.hidden:
                maps[f"F[{new_i}]"] = torch.arange(f)  # a mixture: every expert's first f units
                fs = shared_kept(ly.mlp, f)
                if fs is not None:  # and its shared expert's, the same fraction
                    maps[f"Fs[{new_i}]"] = torch.arange(fs)
                    layers[new_i] = replace(layers[new_i], mlp=replace(layers[new_i].mlp, shared=fs))
            if g < ly.attention.kv_heads:
                maps[f"H[{new_i}]"] = torch.arange(h)  # query heads of the first g groups
                maps[f"G[{new_i}]"] = torch.arange(g)
        new = new.replace(layers=tuple(layers))
        if self.merge_kv:  # each new group starts as the first of the groups merged into it
            layers = list(new.layers)
            for new_i, old_i in enumerate(kept):
                a = spec.layers[old_i].attention
                if self.kv_groups < a.kv_heads:
                    maps[f"G[{new_i}]"] = torch.arange(0, a.kv_heads, a.kv_heads // self.kv_groups)
                    layers[new_i] = replace(layers[new_i], attention=replace(layers[new_i].attention,
                                                                             kv_heads=self.kv_groups))
            new = new.replace(layers=tuple(layers))
        origin = dict(enumerate(kept))
        return Change(new, maps, origin=lambda name: (_renamed(name, origin), False), layer_origin=origin)

    @contextlib.contextmanager
    def reference(self, old):
        """The parent run as the sub-network: nested parts at their granularity, the cut parts of the
        others silenced."""
        c = self.choice(old)
        nested = any(ly.mlp.nested or ly.attention.nested or ly.skippable for ly in spec_of(old).layers)
        with granularity(old, c) if nested else contextlib.nullcontext(), masked(old, self.cuts(old, c)):
            yield

    # --- the correction ---

    def apply(self, model):
        if self.merge_kv:
            return self._merge(model)
        if self.correct is None:
            return super().apply(model)
        self.requires(model)
        self.fits(model)
        new, cert = remap(model, self.change(model))
        # before the refit the sub-model must be the parent's sub-network, as the pipeline checks an exact pass
        inputs = probes(spec_of(model))
        for dtype, tol in ((torch.float64, F64_TOL), (torch.float32, self.f32_tol)):
            err = max_error(model, new, inputs, dtype, reference=self.reference)
            if not err <= tol:
                raise CheckFailed(f"{self} changed the sub-network before its refit: max error {err:.3g} in {dtype} "
                                  f"(tolerance {tol:g})")
        c = self.choice(model)
        cal = self.calibration_data(model)
        held = self._held_out(model)
        refits = sequential_refits(model, self.cuts(model, c), cal.batches, self.ridge)
        before = mean_loss(new, held.batches)
        origin = {old_i: new_i for new_i, old_i in enumerate(i for i in range(len(c.mlp)) if i not in c.skip)}
        renamed = {}
        with torch.no_grad():
            for name, w in refits.items():
                _, i, rest = name.split(".", 2)
                renamed[f"layers.{origin[int(i)]}.{rest}"] = name
                new.get_parameter(f"layers.{origin[int(i)]}.{rest}").data.copy_(w)
        after = mean_loss(new, held.batches)
        self._record["held_out"] = held.record() | {"loss_uncorrected": round(before, 6),
                                                    "loss_corrected": round(after, 6)}
        if not after <= before:
            raise CheckFailed(f"{self.name}: the least-squares refit raised the held-out loss from {before:.4f} to "
                              f"{after:.4f}", hint="give more calibration data (samples), a larger ridge, or "
                              "leave out correct")
        return new, _refit_certificate(cert, renamed, cal.tokens)

    def _merge(self, model):
        """kv groups merged by averaging their k and v projections (GQA's mean pooling, Ainslie et al.
        2023); checked against dropping the same number of groups, on held-out data."""
        self.requires(model)
        self.fits(model)
        change = self.change(model)
        new, cert = remap(model, change)
        renamed = {}
        with torch.no_grad():
            for new_i, old_i in (change.layer_origin or {}).items():
                a = spec_of(model).layers[old_i].attention
                m = a.kv_heads // self.kv_groups
                if m == 1:
                    continue
                for name in ("k.weight", "v.weight", "k.bias", "v.bias"):
                    try:
                        w = model.get_parameter(f"layers.{old_i}.attn.{name}").detach()
                    except AttributeError:
                        continue
                    merged = w.reshape(self.kv_groups, m, -1, *w.shape[1:]).double().mean(1)  # (G', d, …)
                    new.get_parameter(f"layers.{new_i}.attn.{name}").copy_(merged.reshape(-1, *w.shape[1:]))
                    renamed[f"layers.{new_i}.attn.{name}"] = f"mean of each {m} consecutive kv groups of " \
                        f"layers.{old_i}.attn.{name}"
        dropped, _ = remap(model, Extract(**{**self.params(), "merge_kv": False, "kv_groups": self.kv_groups})
                           .change(model))
        held = self._held_out(model)
        before, after = mean_loss(dropped, held.batches), mean_loss(new, held.batches)
        self._record["held_out"] = held.record() | {"loss_dropped": round(before, 6), "loss_merged": round(after, 6)}
        if not after <= before:
            raise CheckFailed(f"{self.name}: merging kv groups gives a held-out loss of {after:.4f}, worse than "
                              f"dropping them ({before:.4f})", hint="leave out merge_kv")
        claims = [RefitClaim(c.name, c.source, c.old_shape, c.new_shape, [None] * len(c.new_shape), fresh=True,
                             note=renamed[c.name]) if c.name in renamed else c for c in cert.claims]
        return new, Certificate(claims, dict(cert.kept))

    def _held_out(self, model) -> Calibration:
        if self.held_out:
            return Calibration(list(self.held_out), "given", None)
        if not self.data:
            raise PassError("extract: correct = lsq and merge_kv check the result on held-out data",
                            hint="give data = stdlib (or files), or held_out batches from Python")
        return calibration_of(model, None, self.data, self.samples, self.seed, "extract", part="held_out")

    def notes(self, old: fx.GraphModule) -> list[str]:
        """What the pass measured and the data it read (report.json's notes)."""
        return _notes(self._record)


def _refit_certificate(cert: Certificate, renamed: dict[str, str], tokens: int) -> Certificate:
    """The certificate with each refit tensor's claim saying so (its shape is still checked; every
    other claim stands as the extraction made it)."""
    claims = []
    for cl in cert.claims:
        if cl.name in renamed:
            cl = RefitClaim(cl.name, cl.source, cl.old_shape, cl.new_shape, [None] * len(cl.new_shape), fresh=True,
                            note=f"refit by ridge least squares on {tokens} calibration tokens (kept inputs of "
                            f"{cl.source})")
        claims.append(cl)
    return Certificate(claims, dict(cert.kept))


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
    features = GROWTH_FEATURES  # the base language and mixtures of experts (each expert in its own order)
    by: str = "weight"  # weight | activation | taylor
    what: str = "both"  # mlp | heads | both
    layers: list[int] | None = None
    data: list[str] | None = None  # calibration text for activation and taylor (files, directories or stdlib)
    samples: int = 64  # calibration windows
    seed: int = 0  # which windows
    calibration: list[dict] | None = _cal_field()  # calibration batches given from Python (model inputs)

    def __post_init__(self):
        super().__post_init__()
        self._record: dict = {}
        self._experts: dict[int, torch.Tensor] = {}  # layer → (E, F): each expert's order of its units

    def requires(self, model):
        super().requires(model)
        if self.by not in SCORES:
            raise PassError(f"reorder: unknown score '{self.by}'", hint="by = weight, activation or taylor")
        if self.what not in ("mlp", "heads", "both"):
            raise PassError(f"reorder: what = {self.what}?", hint="what = mlp, heads or both")
        if self.by != "weight" and not self.calibration and not self.data:
            raise PassError(f"reorder by {self.by} needs calibration data",
                            hint="give data = stdlib (or files), --data FILES on the command line, or calibration "
                            "batches from Python")
        layer_list(model, self.layers, self.name)

    def change(self, model):
        spec = spec_of(model)
        ls = layer_list(model, self.layers, self.name)
        cal = None
        if self.by != "weight":
            cal = calibration_of(model, self.calibration, self.data, self.samples, self.seed, f"reorder by {self.by}")
            self._record["calibration"] = cal.record()
        s = scores(model, self.by, cal.batches if cal else None)
        maps = {}
        self._experts = {}
        for i in ls:
            units, heads, groups, shared = s[i]
            if self.what in ("mlp", "both") and units.dim() == 2:  # a mixture: each expert in its own order
                self._experts[i] = torch.argsort(units, dim=1, descending=True, stable=True)  # (E, F)
                if shared is not None:
                    maps[f"Fs[{i}]"] = torch.argsort(shared, descending=True, stable=True)
            elif self.what in ("mlp", "both"):
                maps[f"F[{i}]"] = torch.argsort(units, descending=True, stable=True)
            if self.what in ("heads", "both"):
                a = spec.layers[i].attention
                h_map, g_map = head_order(heads, groups, a)
                if not torch.equal(h_map, torch.arange(a.heads)):
                    maps[f"H[{i}]"] = h_map
                if not torch.equal(g_map, torch.arange(a.kv_heads)):
                    maps[f"G[{i}]"] = g_map
        return Change(spec, maps)

    def apply(self, model):
        new, cert = super().apply(model)
        return (new, cert) if not self._experts else _order_experts(model, new, cert, self._experts)

    def notes(self, old: fx.GraphModule) -> list[str]:
        """The calibration data the scores were measured on (report.json's notes)."""
        return _notes(self._record)


def _order_experts(old: fx.GraphModule, new: fx.GraphModule, cert: Certificate, orders: dict[int, torch.Tensor]
                   ) -> tuple[fx.GraphModule, Certificate]:
    """Each expert's hidden units permuted by its own order (layer → (E, F) source indices): the experts'
    stacked up/gate rows (and biases) and down columns, as new tensors. A per-expert permutation is no
    per-axis map, so the claim says it in words; the pass's function check (1e-9 in float64) stands."""
    claims = list(cert.claims)
    for i, order in orders.items():
        for name, axis in mlp_groups(i, "experts"):
            try:
                w = old.get_parameter(name).detach()
            except AttributeError:
                continue
            shape = [1] * w.dim()
            shape[0], shape[axis] = order.shape
            index = order.view(shape).expand(w.shape)  # (E, F, D), (E, D, F) or (E, F)
            new.get_parameter(name).data = torch.take_along_dim(w, index, dim=axis)
            cert.kept.pop(name, None)
            claims.append(RefitClaim(name, name, tuple(w.shape), tuple(w.shape), [None] * w.dim(), fresh=True,
                                     note=f"axis {axis}: each expert's units permuted by its own {order.shape[1]}-"
                                     "unit ranking"))
    return new, Certificate(claims, dict(cert.kept))


def _notes(record: dict) -> list[str]:
    out = []
    for key in ("calibration", "held_out"):
        r = record.get(key)
        if r:
            seed = "" if r["seed"] is None else f", seed {r['seed']}"
            where = "training part" if key == "calibration" else "held-out part"
            src = "batches given from Python" if r["source"] == "given" else f"{r['source']} ({where})"
            out.append(f"{key.replace('_', '-')} data: {src}, {r['tokens']} tokens in {r['windows']} windows{seed}")
    if "loss_merged" in record.get("held_out", {}):
        h = record["held_out"]
        out.append(f"held-out loss {h['loss_merged']:.4f} with kv groups merged, {h['loss_dropped']:.4f} with "
                   "them dropped")
    if "loss_corrected" in record.get("held_out", {}):
        h = record["held_out"]
        out.append(f"held-out loss {h['loss_uncorrected']:.4f} before the refit, {h['loss_corrected']:.4f} after")
    if "layer_loss" in record:
        out.append("calibration loss with each layer alone left out: " +
                   ", ".join(f"{i}: {v:.4f}" for i, v in record["layer_loss"].items()))
    return out

