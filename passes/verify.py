"""The checks run after every pass: well-formedness, the certificate, and behaviour."""

from __future__ import annotations

import contextlib

import torch
from torch import fx

from mptc import spec as S
from mptc.export import example_inputs
from mptc.model import build, spec_of
from mptc.schema import parse

from .engine import Certificate, check_claim, check_shapes

F64_TOL = 1e-9
F32_TOL = 1e-5


def probes(spec: S.Spec, n: int = 2, seq: int = 16, seed: int = 1234) -> list[dict[str, torch.Tensor]]:
    """Probe batches valid for `spec`: random inputs, the second with padding."""
    return [example_inputs(spec, batch=2, seq=seq, seed=seed + i, padded=i % 2 == 1) for i in range(n)]


def as_dtype(model: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """`model` in `dtype`: the model itself when it already is, else a copy (the original is kept)."""
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    return build(spec_of(model), weights=sd, dtype=dtype).train(model.training)


@torch.no_grad()
def max_error(old: fx.GraphModule, new: fx.GraphModule, inputs: list[dict], dtype: torch.dtype,
              comparable=None, reference=None) -> float:
    """Max abs difference between two models' outputs (eval mode), relative to max(1, |output|)."""
    models = [as_dtype(old, dtype), as_dtype(new, dtype)]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    worst = 0.0
    try:
        for x in inputs:
            x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
            with reference(models[0]) if reference else contextlib.nullcontext():
                a = models[0](**x)
            b = models[1](**x)
            if comparable is not None:
                a, b = comparable(a, b)
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, float(((a - b).abs() / a.abs().clamp(min=1.0)).max()))
    finally:
        for m, t in zip(models, modes, strict=True):
            m.train(t)
    return worst


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
    old_sd, new_sd = old.state_dict(), new.state_dict()
    out = []
    for c in cert.claims:
        why = check_claim(c, old_sd.get(c.source) if c.source else None, new_sd[c.name])
        if why:
            out.append(why)
    return out
