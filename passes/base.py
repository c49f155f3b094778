"""The pass contract: a name, parameters, `requires` (preconditions) and `apply`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import fx

from mptc.errors import MptcError
from mptc.model import spec_of

from .engine import Certificate, Change, Init, remap


class PassError(MptcError):
    """A pass cannot apply, or its result failed a check; nothing is written."""


@dataclass
class Pass:
    """A rewrite of a compiled model. Subclasses say what changes (`change`); the engine does it."""

    name: ClassVar[str] = "pass"
    exact: ClassVar[bool] = True  # the function is preserved: equal to `reference(old)`'s
    f32_tol: ClassVar[float] = 1e-5

    def __post_init__(self):
        init = getattr(self, "init", None)
        if isinstance(init, str):
            self.init = Init(init)
        if isinstance(getattr(self, "init", None), Init) and self.init.kind not in ("zeros", "normal", "copy"):
            raise PassError(f"{self.name}: unknown init '{self.init.kind}'", hint="use zeros, normal(std = …) or copy")

    def params(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.describe() if isinstance(v, Init) else v
        return out

    def __str__(self) -> str:
        args = ", ".join(f"{k} = {v}" for k, v in self.params().items() if v is not None)
        return f"{self.name}({args})"

    def requires(self, model: fx.GraphModule) -> None:
        """Raise PassError, saying why and what would work, if the pass cannot apply."""

    def change(self, model: fx.GraphModule) -> Change:
        raise NotImplementedError

    def apply(self, model: fx.GraphModule) -> tuple[fx.GraphModule, Certificate]:
        self.requires(model)
        return remap(model, self.change(model))

    def reference(self, old: fx.GraphModule) -> contextlib.AbstractContextManager:
        """A context in which the old model computes what the new one must (itself, by default;
        extraction: the old model run at the extracted granularity)."""
        return contextlib.nullcontext()

    def comparable(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts of the old and new outputs that must agree (all of them, by default)."""
        return old, new


def layer_list(model: fx.GraphModule, layers: list[int] | int | None, what: str) -> list[int]:
    n = spec_of(model).n_layers
    if layers is None:
        return list(range(n))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
            raise PassError(f"{what}: layer {i} is out of range; the model has {n} layers (0..{n - 1})")
    return sorted({i % n for i in layers})
