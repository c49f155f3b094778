"""Least-squares correction of an extraction: refit each shrunk projection's consumer.

When an extraction keeps k of an MLP's F hidden units, the down projection W (D × F) loses the
columns of the others. The refit asks the kept columns to do what the whole matrix did, on
calibration activations h (N × F) seen by the sub-network:

    W' = argmin ‖h_k W'ᵀ − h Wᵀ‖² + λ‖W'‖²  =  W G[:, k] (G[k, k] + λI)⁻¹,   G = hᵀh (F × F)

(ridge least squares; λ = `ridge` × the mean of diag G[k, k]). The attention output projection is
refit the same way over the kept heads' outputs. Layers are refit in order, attention before MLP,
each on the activations of the sub-network with every earlier refit in place (the parent with the
cut parts silenced, `scores.masked`), so errors do not pile up with depth. This changes the
function by design: the certificate says "refit by ridge least squares on N calibration tokens",
and the pass checks the held-out loss instead of equality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx

from mptc.graph import spec_of

from .engine import TensorClaim
from .scores import masked, record

DEFAULT_RIDGE = 1e-3


@dataclass
class RefitClaim(TensorClaim):
    """A tensor refit on calibration data: only its shape is claimed (the values are a solution)."""

    note: str = ""

    def kinds(self) -> list[str]:
        return [self.note]


def _gram(model: fx.GraphModule, batches: list[dict], layer: int, kind: str) -> Tensor:
    """hᵀh of the input to layer `layer`'s down (kind mlp) or output (kind attn) projection, float64."""
    acc: dict[str, Tensor] = {}

    def on(i: int, k: str, x: Tensor) -> None:
        if i == layer and k == kind:
            h = x.reshape(-1, x.shape[-1]).double()  # (N, F)
            acc["g"] = acc.get("g", 0) + h.T @ h

    record(model, batches, on)
    return acc["g"]


def grams(model: fx.GraphModule, batches: list[dict]) -> dict[tuple[int, str], Tensor]:
    """hᵀh of the input to every layer's down ("mlp") and output ("attn") projection, float64, in one run:
    (layer, kind) → (F × F) or (H·Dv × H·Dv)."""
    acc: dict[tuple[int, str], Tensor] = {}

    def on(i: int, k: str, x: Tensor) -> None:
        if k in ("mlp", "attn"):
            h = x.reshape(-1, x.shape[-1]).double()  # (N, F)
            acc[i, k] = acc.get((i, k), 0) + h.T @ h

    record(model, batches, on)
    return acc


def refit(w: Tensor, g: Tensor, keep: int, ridge: float) -> Tensor:
    """The ridge least-squares W' (D × keep) whose kept inputs best reproduce W (D × F) on data with
    Gram matrix g (F × F): W' = W g[:, :keep] (g[:keep, :keep] + λI)⁻¹."""
    gkk = g[:keep, :keep]
    lam = ridge * float(gkk.diagonal().mean().clamp(min=1e-30))
    a = gkk + lam * torch.eye(keep, dtype=g.dtype)
    rhs = g[:keep] @ w.double().T  # (keep, D)
    return torch.linalg.solve(a, rhs).T.to(w.dtype)  # (D, keep)


def sequential_refits(model: fx.GraphModule, cuts: dict[int, tuple[int | None, int | None, bool]],
                      batches: list[dict], ridge: float = DEFAULT_RIDGE) -> dict[str, Tensor]:
    """The refit consumers of every cut layer, by old parameter name: `layers.{i}.attn.o.weight`
    (D × h·Dv) and `layers.{i}.mlp.down.weight` (D × f). The model is left as it was."""
    spec = spec_of(model)
    todo = []  # (layer, kind, kept inputs, parameter name), in the order the data flows
    for i in sorted(cuts):
        f, h, drop = cuts[i]
        if not drop:
            a = spec.layers[i].attention
            todo += [(i, "attn", None if h is None else h * a.value_dim, f"layers.{i}.attn.o.weight"),
                     (i, "mlp", f, f"layers.{i}.mlp.down.weight")]
    todo = [t for t in todo if t[2] is not None]
    params = {name: model.get_parameter(name) for *_, name in todo}
    whole = {name: p.detach().clone() for name, p in params.items()}  # (D, F): the targets' weights
    out: dict[str, Tensor] = {}
    try:
        with masked(model, cuts):
            for i, kind, keep, name in todo:
                new = refit(whole[name], _gram(model, batches, i, kind), keep, ridge)
                with torch.no_grad():  # in place: later layers see this refit
                    params[name].data[:, :keep] = new
                out[name] = new
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.data.copy_(whole[name])
    return out
