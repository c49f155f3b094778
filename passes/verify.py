"""The checks run after every pass: well-formedness, the certificate, and behaviour."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.node import map_aggregate

from mptc import spec as S
from mptc.graph import spec_of
from mptc.inputs import example_inputs
from mptc.schema import parse

from .engine import Certificate, check_claim, check_shapes, is_one, kept_entries, lifted, put, scale_at, take

F64_TOL = 1e-9
F32_TOL = 1e-5


def probes(spec: S.Spec, n: int = 1, batch: int = 2, seed: int = 1234) -> list[dict[str, Tensor]]:
    """Probe batches valid for `spec`: random inputs, each with an unpadded first row and the others
    padded by different amounts, so one forward pass covers both cases. Sequences are 8 tokens, or
    long enough that a sliding window cuts in (2 × window + 1)."""
    windows = [ly.attention.window for ly in spec.layers if ly.attention.window]
    seq = max([8] + [2 * w + 1 for w in windows])
    out = []
    for i in range(n):
        x = example_inputs(spec, batch=batch, seq=seq, seed=seed + i, padded=True)
        if "attention_mask" in x:
            x["attention_mask"][0] = 1
        out.append(x)
    return out


PIECE = 1 << 22  # elements (32 MiB in float64): larger tensors are widened a piece at a time


class Upcast(fx.Interpreter):
    """Run a model in another dtype (float64 for the exact check) without a converted copy of it:
    each parameter is converted as the graph reads it and freed after its last use; a large one
    (a token table, an output head) is converted only where it is used: the rows an embedding
    picks, a slab of rows at a time in a linear layer. So the run allocates little more than one
    layer's weights, and the memory it frees is reused by the next conversion.

    `exact` replaces some parameters by values given in the wide dtype (a scaled tensor before it
    was rounded to the model's dtype).
    """

    def __init__(self, model: fx.GraphModule, dtype: torch.dtype, exact: dict[str, Tensor] | None = None):
        super().__init__(model)
        self.dtype, self.exact = dtype, exact or {}
        self._large: set[int] = set()  # ids of the large parameters handed on unwidened

    def __call__(self, **inputs) -> Tensor:
        return self.run(*[inputs.get(name) for name in spec_of(self.module).inputs])

    def get_attr(self, target, args, kwargs):
        t = self.exact.get(target)
        if t is None:
            t = super().get_attr(target, args, kwargs)
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dtype == self.dtype:
            return t
        if t.numel() > PIECE:
            self._large.add(id(t))
            return t
        return t.to(self.dtype)

    def call_function(self, target, args, kwargs):
        if target is F.embedding and id(args[1]) in self._large:  # a gather: widen the rows it picks
            return F.embedding(*args, **kwargs).to(self.dtype)
        if target is F.linear and id(args[1]) in self._large:
            return self._linear(*args, **kwargs)
        return super().call_function(target, *self._widen(args, kwargs))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *self._widen(args, kwargs))

    def call_module(self, target, args, kwargs):
        return super().call_module(target, *self._widen(args, kwargs))

    def _widen(self, args, kwargs):
        """Any large parameter an op other than embedding and linear reads, widened whole."""
        if not self._large:
            return args, kwargs
        def widen(t):
            return t.to(self.dtype) if torch.is_tensor(t) and id(t) in self._large else t

        return map_aggregate(args, widen), map_aggregate(kwargs, widen)

    def _linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        """F.linear with a large weight (out, in), widened a slab of output rows at a time."""
        out = x.new_empty(*x.shape[:-1], w.shape[0])  # (…, out)
        rows = max(1, PIECE // w.shape[1])
        for i in range(0, w.shape[0], rows):
            b = None if bias is None else bias[i:i + rows].to(self.dtype)
            out[..., i:i + rows] = F.linear(x, w[i:i + rows].to(self.dtype), b)
        return out


def exact_values(old: fx.GraphModule, new: fx.GraphModule, cert: Certificate) -> dict[str, Tensor]:
    """The scaled tensors of `new` in float64 as their claims describe them, before rounding: the
    entries taken from `old` times the scale (one factor, or one per entry), computed exactly, and
    `new`'s own everywhere else. With these, the float64 check sees the rule itself rather than its rounding."""
    out = {}
    for c in cert.claims:
        if is_one(c.scale) or c.fresh:
            continue
        t = new.get_parameter(c.name).detach().to(torch.float64, copy=True)
        new_sel, old_sel = kept_entries(c.srcs)
        src = lifted(old.get_parameter(c.source).detach(), c.old_shape) if c.old_shape else old.get_parameter(c.source)
        put(t, new_sel, take(src.detach(), old_sel).to(torch.float64) *
            scale_at(c.scale, new_sel))
        out[c.name] = t
    return out


@torch.no_grad()
def outputs(model: fx.GraphModule, inputs: list[dict], dtype: torch.dtype, reference=None,
            exact: dict[str, Tensor] | None = None) -> list[Tensor]:
    """The model's outputs (eval mode) on each input, computed in `dtype`; `reference`: a context
    the model runs in (`Pass.reference`); `exact`: float64 values of some of its tensors."""
    run = _runner(model, dtype, exact)
    was = model.training
    model.eval()
    try:
        out = []
        for x in inputs:
            x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
            with reference(model) if reference else contextlib.nullcontext():
                out.append(run(**x))
        return out
    finally:
        model.train(was)


def compare(old: list[Tensor], new: list[Tensor], comparable=None) -> float:
    """Max abs difference between two runs' outputs, relative to max(1, |old output|); NaN when
    either run has a NaN or infinite output (so no tolerance test `err <= tol` can pass it)."""
    worst = 0.0
    for a, b in zip(old, new, strict=True):
        if comparable is not None:
            a, b = comparable(a, b)
        if a.shape != b.shape:
            return float("inf")
        if nonfinite([a, b]):
            return float("nan")
        worst = max(worst, float(((a - b).abs() / a.abs().clamp(min=1.0)).max()))
    return worst


def nonfinite(tensors: list[Tensor]) -> int:
    """How many entries of these tensors are NaN or ±inf."""
    return sum(_nonfinite(t) for t in tensors if t.is_floating_point())


def _nonfinite(t: Tensor) -> int:
    if bool(torch.isfinite(t.sum())):  # NaN and ±inf reach the sum: no temporary the size of `t`
        return 0
    return int((~torch.isfinite(t)).sum())  # or the sum overflowed


def max_error(old: fx.GraphModule, new: fx.GraphModule, inputs: list[dict], dtype: torch.dtype,
              comparable=None, reference=None, exact: dict[str, Tensor] | None = None) -> float:
    """`compare` of the two models' outputs in `dtype` (`old` run in `reference`, `new` with `exact`)."""
    return compare(outputs(old, inputs, dtype, reference), outputs(new, inputs, dtype, None, exact), comparable)


def _runner(model: fx.GraphModule, dtype: torch.dtype, exact: dict[str, Tensor] | None = None):
    if not exact and all(p.dtype == dtype for p in model.parameters()):
        return model
    return Upcast(model, dtype, exact)


def well_formed(model: fx.GraphModule) -> list[str]:
    """Graph lint, spec ↔ graph sizes, and the spec's text round trip."""
    problems = []
    try:
        model.graph.lint()
    except Exception as e:  # lint raises plain RuntimeErrors
        problems.append(f"graph lint: {e}")
    problems += check_shapes(model)
    spec = spec_of(model)
    if parse(str(spec)) != spec:
        problems.append("the new spec does not round-trip through its text")
    return problems


def certificate_problems(old: fx.GraphModule, new: fx.GraphModule, cert: Certificate) -> list[str]:
    """Every claim checked against the old and new weights, and every tensor taken over unchanged
    compared with its source (free when it is the same storage)."""
    old_sd, new_sd = old.state_dict(), new.state_dict()
    out = []
    for name, src in cert.kept.items():
        a, b = old_sd.get(src), new_sd[name]
        if a is None or not (a.data_ptr() == b.data_ptr() and a.shape == b.shape or torch.equal(a, b)):
            out.append(f"{name}: claimed unchanged from {src}, but it differs")
    for c in cert.claims:
        t, src = new_sd[c.name], old_sd.get(c.source) if c.source else None
        why = check_claim(c, src, t)
        if why:
            out.append(why)
        elif (bad := nonfinite([t]) - (nonfinite([src]) if src is not None and not c.fresh else 0)) > 0:
            out.append(f"{c.name}: {bad} of its new entries are NaN or infinite")  # the kept ones equal the old
    return out
