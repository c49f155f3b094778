"""Compose passes; check each result before the next pass sees it; carry an optimizer along."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from mptc.graph import spec_of

from .base import CheckFailed, Pass, PassError, PassRefused
from .engine import Certificate, TensorClaim, kept_entries, lifted, put, scale_at, take
from .verify import (
    F32_TOL,
    F64_TOL,
    certificate_problems,
    compare,
    exact_values,
    nonfinite,
    outputs,
    probes,
    well_formed,
)


@dataclass
class PassReport:
    """What one pass did and what the checks measured (one entry of report.json)."""

    name: str
    call: str
    params_before: int
    params_after: int
    tensors: list[dict]
    max_abs_error_float64: float
    max_abs_error_float32: float
    seconds: float
    verify_seconds: float
    notes: list[str] = field(default_factory=list)  # what the check compared, and changes made after it


@dataclass
class Report:
    passes: list[PassReport] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None

    def to_json(self) -> dict:
        return {"passes": [asdict(p) for p in self.passes],
                "tolerances": {"float64": F64_TOL, "float32": F32_TOL}}


class Pipeline:
    """`Pipeline([grow_mlp(...), add_layers(...)])(model) -> (model, report)`.

    After every pass: well-formedness, the certificate, and behaviour (old and new models agree
    on probe batches within 1e-9 in float64 and 1e-5 in float32, relative to max(1, |logit|)).
    A pass that does not apply raises PassRefused; a failed check raises CheckFailed (both
    PassError). With `optimizer=` (Adam or AdamW) its state is grown with the parameters and the
    new optimizer is `report.optimizer`.

    A pipeline is itself a pass of a pipeline: `Pipeline([Pipeline([a, b]), c])` runs a, b, c,
    each checked (unless the inner pipeline has check = False), and reports every one.
    """

    name = "pipeline"

    def __init__(self, passes: list[Pass | Pipeline], check: bool = True):
        self.passes = list(passes)
        self.check = check

    def __str__(self) -> str:
        return f"pipeline({', '.join(str(p) for p in self.passes)})"

    def call(self) -> str:
        return ", ".join(p.call() for p in self.passes)

    def flat(self) -> list[tuple[Pass, bool]]:
        """The passes in order, nested pipelines opened, each with whether it is checked."""
        out = []
        for p in self.passes:
            out += [(q, self.check and c) for q, c in p.flat()] if isinstance(p, Pipeline) else [(p, self.check)]
        return out

    def requires(self, model: fx.GraphModule) -> None:
        """The first pass's preconditions (each later one is checked on the model before it)."""
        flat = self.flat()
        if flat:
            flat[0][0].requires(model)

    def apply(self, model: fx.GraphModule) -> tuple[fx.GraphModule, Report]:
        """Run the passes, checked: the new model and the report of every pass."""
        return self(model)

    def __call__(self, model: fx.GraphModule, optimizer: torch.optim.Optimizer | None = None
                 ) -> tuple[fx.GraphModule, Report]:
        report = Report()
        carry = Carry()
        for p, check in self.flat():
            t0 = time.perf_counter()
            try:
                new, cert = p.apply(model)
            except (PassRefused, CheckFailed):
                raise
            except PassError as e:  # raised by `requires`, `fits` or `change`: the pass does not apply
                raise PassRefused(e.message, e.span, e.hint) from None
            t1 = time.perf_counter()
            e64, e32 = self._verify(p, model, new, cert, carry) if check else (float("nan"),) * 2
            if not check:
                carry.keep(None, {})
            notes = p.notes(model) if hasattr(p, "notes") else []
            after = p.after_check(new) if hasattr(p, "after_check") else None
            if after is not None:  # a change made on purpose after the check (upcycle_moe's noise)
                new, more = after
                notes += more
                carry.keep(None, {})  # the checked outputs are not this model's
            t2 = time.perf_counter()
            if optimizer is not None:
                optimizer = grow_optimizer(optimizer, model, new, cert)
            report.passes.append(PassReport(
                p.name, str(p), _count(model), _count(new), cert.to_json(), e64, e32, t1 - t0, t2 - t1, notes))
            model = new
        report.optimizer = optimizer
        return model, report

    def _verify(self, p: Pass, old: fx.GraphModule, new: fx.GraphModule, cert: Certificate, carry: Carry
                ) -> tuple[float, float]:
        problems = well_formed(new) + certificate_problems(old, new, cert)
        if problems:
            raise CheckFailed(f"{p} produced an inconsistent model: " + "; ".join(problems[:5]))
        if not p.exact:
            carry.keep(None, {})  # nothing checked, nothing to hand on
            return float("nan"), float("nan")
        inputs = probes(spec_of(old))
        exact = exact_values(old, new, cert)
        reference = p.reference if type(p).reference is not Pass.reference else None
        handed = carry.take(inputs) if reference is None else {}
        errors, kept = [], {}
        for dtype, ex in ((torch.float64, exact), (torch.float32, None)):
            before = handed.get(dtype) or outputs(old, inputs, dtype, reference)
            after = outputs(new, inputs, dtype, None, ex)
            if bad := nonfinite(before):
                raise CheckFailed(f"{p} cannot be checked: the model it was given has {bad} NaN or infinite "
                                f"outputs on the probe batches ({_dtype_name(dtype)})",
                                hint="its weights hold NaN or inf values, or overflow in this dtype")
            if bad := nonfinite(after):
                raise CheckFailed(f"{p} produced a model with {bad} NaN or infinite outputs on the probe batches "
                                f"({_dtype_name(dtype)}), where the model it was given has none")
            errors.append(compare(before, after, p.comparable))
            if not ex:
                kept[dtype] = after
        carry.keep(inputs, kept)
        e64, e32 = errors
        if not (e64 <= F64_TOL and e32 <= p.f32_tol):
            raise CheckFailed(f"{p} changed the model's function: max error {e64:.3g} in float64 (tolerance "
                            f"{F64_TOL:g}), {e32:.3g} in float32 (tolerance {p.f32_tol:g})")
        return e64, e32


@dataclass
class Carry:
    """The checked model's probe outputs, handed to the next pass's check: that pass's old model
    is this one, so its outputs need not be computed again. Float64 outputs computed with exact
    values of scaled tensors are not the rounded model's and are not handed on."""

    inputs: list[dict] | None = None
    out: dict[torch.dtype, list[torch.Tensor]] = field(default_factory=dict)

    def take(self, inputs: list[dict]) -> dict[torch.dtype, list[torch.Tensor]]:
        """The outputs handed on, if they were computed on these inputs."""
        same = self.inputs is not None and len(inputs) == len(self.inputs) and all(
            a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            for a, b in zip(inputs, self.inputs, strict=True))
        return self.out if same else {}

    def keep(self, inputs: list[dict] | None, out: dict[torch.dtype, list[torch.Tensor]]) -> None:
        self.inputs, self.out = inputs, out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count(model: fx.GraphModule) -> int:
    return sum(p.numel() for p in model.parameters())


def grow_optimizer(opt: torch.optim.Optimizer, old: fx.GraphModule, new: fx.GraphModule, cert: Certificate
                   ) -> torch.optim.Optimizer:
    """The same optimizer over the new parameters: moments mapped like the weights (new entries
    zero; first moments × scale, second × scale²), `step` kept."""
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise PassError(f"growing optimizer state is supported for Adam and AdamW, not {type(opt).__name__}")
    old_params = dict(old.named_parameters())
    claims: dict[str, TensorClaim] = {c.name: c for c in cert.claims}
    group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in opt.param_groups]
    states = {}
    for name, p in new.named_parameters():
        c = claims.get(name)
        src = old_params.get(c.source if c else name)
        groups[group_of.get(id(src), 0) if src is not None else 0]["params"].append(p)
        st = opt.state.get(src) if src is not None else None
        if st:
            states[p] = {k: _map_state(k, v, c, p) for k, v in st.items()}
    out = type(opt)(groups)
    for p, st in states.items():
        out.state[p] = st
    return out


def _map_state(key: str, v, c: TensorClaim | None, p: torch.Tensor):
    if not torch.is_tensor(v) or v.dim() == 0 or key == "step":
        return v.clone() if torch.is_tensor(v) else v
    if c is None:
        return v.clone()
    out = torch.zeros(p.shape, dtype=v.dtype)
    if c.fresh:
        return out
    new_sel, old_sel = kept_entries(c.srcs)
    v = lifted(v, c.old_shape) if c.old_shape else v
    s = scale_at(c.scale, new_sel)
    s = s ** (2 if key in ("exp_avg_sq", "max_exp_avg_sq") else 1)
    put(out, new_sel, take(v, old_sel) * (s.to(v.dtype) if torch.is_tensor(s) else s))
    return out
