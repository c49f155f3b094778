"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): a dense MLP becomes a mixture of E
identical experts and a router, exactly.

Proof: every expert is the dense MLP, so Σ_e g_e · expert_e(x) = (Σ_e g_e) · mlp(x). With renormalised
top-k gates (`normalize = true`) the chosen gates sum to one whatever the router says, so any router is
exact. Without renormalisation the gates of a zero router are 1/E each, k of them chosen, so the
experts' down projections × E/k give Σ = 1 again. In the engine: the new symbol E[l] stands at size 1
in the dense model (`Change.lift`), and its source map copies index 0 E times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import fx

from mptc import spec as S
from mptc.graph import param_info, spec_of
from mptc.lower import Role

from .base import Pass, PassError, PassRefused, layer_list
from .engine import Change, Init
from .grow import GROWTH_FEATURES, KNOWN_ROLES, _with_layers

MLP_PARTS = ("up", "gate", "down")


@dataclass
class UpcycleMoE(Pass):
    """Dense MLP → E identical experts and a router (top-k of E); `noise` perturbs the expert copies
    after the check, to break their symmetry."""

    name = "upcycle_moe"
    handles = KNOWN_ROLES
    features = GROWTH_FEATURES
    experts: int = 8
    top_k: int = 2
    layers: list[int] | None = None
    noise: float = 0.0
    router: Literal["zero", "random"] = "zero"
    normalize: bool = True
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.experts, bool) or not isinstance(self.experts, int) or self.experts < 1:
            raise PassRefused(f"upcycle_moe: experts must be a whole number of at least 1, got {self.experts}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.experts:
            raise PassRefused(f"upcycle_moe: top_k must be between 1 and experts = {self.experts}, got {self.top_k}")
        if not (isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0):
            raise PassRefused(f"upcycle_moe: noise must be a finite non-negative number, got {self.noise}")
        if self.router not in ("zero", "random"):
            raise PassRefused(f"upcycle_moe: unknown router '{self.router}'", hint="use router = zero or random")
        if not self.normalize and self.router != "zero" and self.top_k != self.experts:
            raise PassRefused("upcycle_moe(normalize = false) is exact only with router = zero: without "
                              "renormalised gates the chosen gates sum to one only when the router is uniform",
                              hint="use router = zero, or normalize = true")

    def _layers(self, model: fx.GraphModule) -> list[int]:
        spec = spec_of(model)
        out = layer_list(model, self.layers, self.name)
        for i in out:
            m = spec.layers[i].mlp
            if m.moe:
                raise PassError(f"upcycle_moe: layer {i}'s MLP is already a mixture of {m.experts} experts",
                                hint="choose dense layers (layers = …)")
            if m.nested:
                raise PassError(f"upcycle_moe: layer {i}'s MLP is nested (MatFormer); its experts could not be",
                                hint="extract the sub-network you want first")
            h = spec.layers[i].hyper
            if h is not None and S.HYPER_TARGETS[h.target].startswith("mlp."):
                raise PassError(f"upcycle_moe: layer {i} has a hypernetwork delta on its MLP ({h.target}), which a "
                                "mixture of experts cannot carry", hint="upcycle the other layers (layers = …)")
        return out

    def requires(self, model):
        super().requires(model)
        self._layers(model)

    def new_spec(self, model):
        ls = self._layers(model)
        return _with_layers(spec_of(model), lambda i, ly: replace(ly, mlp=replace(
            ly.mlp, experts=self.experts, top_k=self.top_k, normalize=self.normalize)) if i in ls else ly)

    def change(self, model):
        ls = set(self._layers(model))
        down = 1.0 if self.normalize or self.top_k == self.experts else self.experts / self.top_k

        def origin(name: str) -> tuple[str | None, bool]:
            parts = name.split(".")  # layers.{i}.mlp.experts.{part}.{weight|bias}
            if len(parts) < 4 or parts[0] != "layers" or int(parts[1]) not in ls or parts[2] != "mlp":
                return name, False
            if parts[3] == "router":
                return None, True
            return ".".join(parts[:3] + parts[4:]), False

        maps = {f"E[{i}]": torch.zeros(self.experts, dtype=torch.long) for i in ls}
        return Change(self.new_spec(model), maps, zero_roles=frozenset({Role.MLP_ROUTER}) if self.router == "zero"
                      else frozenset(), origin=origin, init=Init("normal", seed=self.seed),
                      lift=frozenset(maps), scale=lambda name, info: down if info.role == Role.MLP_DOWN and
                      info.layer in ls and ".experts." in name else 1.0)

    def after_check(self, model: fx.GraphModule) -> tuple[fx.GraphModule, list[str]] | None:
        """With noise > 0: normal(0, noise) added to every expert weight, after the check (the copies
        are then no longer identical, so the model is no longer the checked one)."""
        if not self.noise:
            return None
        ls = self._layers_of(model)
        gen = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            for name, info in param_info(model).items():
                if info.layer in ls and ".mlp.experts." in name and name.endswith(".weight"):
                    p = model.get_parameter(name)
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * self.noise)
        return model, [f"noise: after the check, normal(0, {self.noise:g}) noise was added to the expert weights of "
                       f"layers {sorted(ls)} to break the symmetry of the copies; the model differs from the checked "
                       "one by that noise"]

    def _layers_of(self, model: fx.GraphModule) -> set[int]:
        """The upcycled layers, read off the new model."""
        spec = spec_of(model)
        return {i for i in layer_list(model, self.layers, self.name) if spec.layers[i].mlp.moe}
