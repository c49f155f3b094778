"""The pass contract: a name, parameters, `requires` (preconditions) and `apply`."""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import ClassVar

import torch
from torch import fx

from mptc import spec as S
from mptc.dims import sizes
from mptc.errors import MptcError
from mptc.graph import param_info, spec_of
from mptc.memory import INT64_MAX, check_fits, count_params, sci

from .engine import Certificate, Change, Init, remap


class PassError(MptcError):
    """A pass cannot apply, or its result failed a check; nothing is written."""


class PassRefused(PassError):  # noqa: N818 (the name says what happened)
    """The pass does not apply to this model (its `requires`, or its arguments, say why)."""


class CheckFailed(PassError):  # noqa: N818
    """The pass ran, but its result failed a check (well-formedness, certificate or behaviour)."""


@dataclass
class Pass:
    """A rewrite of a compiled model. Subclasses say what changes (`change`); the engine does it."""

    name: ClassVar[str] = "pass"
    exact: ClassVar[bool] = True  # the function is preserved: equal to `reference(old)`'s
    f32_tol: ClassVar[float] = 1e-5
    handles: ClassVar[frozenset[str]] = frozenset()  # the parameter roles (`lower.Role`) it knows how to rewrite
    # the optional language features (`spec.Feature`) it has a rule for; a spec using any other is refused
    features: ClassVar[frozenset[S.Feature]] = S.BASE_FEATURES

    def __post_init__(self):
        init = getattr(self, "init", None)
        if isinstance(init, str):
            self.init = Init(init)
        if isinstance(getattr(self, "init", None), Init) and self.init.kind not in ("zeros", "normal", "copy"):
            raise PassRefused(f"{self.name}: unknown init '{self.init.kind}'",
                              hint="use zeros, normal(std = …) or copy")
        for f in fields(self):
            problem = argument_problem(f.name, getattr(self, f.name))
            if problem:
                raise PassRefused(f"{self.name}: {problem}")
        std = self.init.std if isinstance(getattr(self, "init", None), Init) else None
        if std is not None and not (math.isfinite(std) and std >= 0):
            raise PassRefused(f"{self.name}: std must be a finite non-negative number, got {std}")

    def params(self) -> dict:
        """The arguments pass text can write (fields marked `metadata={"text": False}`, such as
        calibration tensors given from Python, are left out)."""
        out = {}
        for f in fields(self):
            if f.metadata.get("text", True):
                v = getattr(self, f.name)
                out[f.name] = v.describe() if isinstance(v, Init) else v
        return out

    def __str__(self) -> str:
        """The pass as text that `mptc grow -p` reads back (every argument that is set)."""
        args = ", ".join(f"{f.name} = {text_value(getattr(self, f.name))}" for f in fields(self)
                         if f.metadata.get("text", True) and getattr(self, f.name) is not None)
        return f"{self.name}({args})"

    def call(self) -> str:
        """The pass as it would be written: the arguments that differ from their defaults."""
        args = []
        for f in fields(self):
            if not f.metadata.get("text", True):
                continue
            v = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if v != default:
                args.append(f"{f.name} = {text_value(v)}")
        return f"{self.name}({', '.join(args)})"

    def requires(self, model: fx.GraphModule) -> None:
        """Raise PassError, saying why and what would work, if the pass cannot apply. Here: refuse a
        model using a language feature not in `features`, or holding a parameter whose role is not in
        `handles` (subclasses call this first)."""
        self.require_features(spec_of(model))
        for name, info in param_info(model).items():
            if info.role not in self.handles:
                raise PassRefused(f"{self.name} does not know how to rewrite {name} ({info.describe()})",
                                  hint=f"{self.name} rewrites only the parameter roles it declares (`handles`), "
                                  f"and {info.role} is not one of them; use another pass, or leave that part out")

    def require_features(self, spec: S.Spec) -> None:
        """Refuse, by name, the first language feature of `spec` this pass has no rule for."""
        for f in sorted(S.features(spec) - self.features):
            raise PassRefused(f"{self.name} does not handle {f} ({S.FEATURE_FIELDS[f]})",
                              hint=f"{self.name} declares the language features it has a rule for (`features`), and "
                              f"{f} is not one of them; leave {S.FEATURE_FIELDS[f]} out, or use another pass")

    def change(self, model: fx.GraphModule) -> Change:
        raise NotImplementedError

    def apply(self, model: fx.GraphModule) -> tuple[fx.GraphModule, Certificate]:
        self.requires(model)
        self.fits(model)
        return remap(model, self.change(model))

    def new_spec(self, model: fx.GraphModule) -> S.Spec | None:
        """The spec of the result, made from sizes alone (no tensors), for passes that keep the
        layers; None where it is not known before `change`."""
        return None

    def new_params(self, model: fx.GraphModule) -> int | None:
        """The result's parameter count, counted from the sizes (nothing is built); None: unknown."""
        spec = self.new_spec(model)
        return None if spec is None else resized_params(model, sizes(spec))

    def fits(self, model: fx.GraphModule) -> None:
        """Refuse, saying how big the result would be, if it cannot fit in the memory available.

        The old model is already in memory and the new one shares its unchanged tensors, so the
        bound is the new model's size (in the old one's dtype) against the memory still free.
        """
        n = self.new_params(model)
        if n is None:
            return
        p = next(iter(model.parameters()), None)
        check_fits(f"{self.call()} would make a model of", n, p.dtype if p is not None else torch.float32, "cpu",
                   hint="a pass builds the new model in memory: choose a smaller size", error=PassError)

    def reference(self, old: fx.GraphModule) -> contextlib.AbstractContextManager:
        """A context in which the old model computes what the new one must (itself, by default;
        extraction: the old model run at the extracted granularity)."""
        return contextlib.nullcontext()

    def comparable(self, old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts of the old and new outputs that must agree (all of them, by default)."""
        return old, new


def text_value(v) -> str:
    """A pass argument as pass text: names bare, other strings quoted, lists bracketed, true/false."""
    if isinstance(v, Init):
        return v.describe()
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v).replace("e+", "e")
    if isinstance(v, str):
        bare = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) and v not in ("true", "false", "none")
        return v if bare else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(text_value(x) for x in v) + "]"
    return str(v)


SIZES = ("hidden", "value", "dim", "width", "vocab", "context")  # arguments that set a size: 1 or more
COUNTS = ("n",)  # arguments that count what is added: 1 or more


def argument_problem(key: str, x) -> str | None:
    """What is wrong with a pass argument's value, in words (None: nothing). Sizes and counts are
    positive, integers fit in int64, a growth factor is finite and above 1."""
    if key == "factor" and isinstance(x, (int, float)) and not isinstance(x, bool):
        return None if math.isfinite(x) and x > 1 else f"factor must be a finite number greater than 1, got {x}"
    if isinstance(x, (list, tuple)) and key in ("layers", "drop_layers"):
        return next((p for i in x if (p := argument_problem("layer index", i))), None)
    if isinstance(x, bool) or not isinstance(x, int):
        return None
    if abs(x) > INT64_MAX:
        return f"{key} {'' if key == 'layer index' else '= '}{sci(abs(x))} is beyond the largest size a tensor can " \
               "have (2^63 - 1)"
    if key in SIZES and x < 1:
        return f"{key} must be a positive size, got {x}"
    if key in COUNTS and x < 1:
        return f"{key} must be at least 1, got {x}"
    if key == "at" and x < 0:
        return f"at must be 0 or more (a layer index to insert before), got {x}"
    return None


def resized_params(model: fx.GraphModule, sz: dict[str, int], layers: dict[int, int] | None = None) -> int:
    """The parameter count of `model`'s tensors at the symbol sizes `sz` (Python ints: any size).

    layers: how many times each layer's tensors occur in the result (default: once each).
    """
    by_layer: dict[int | None, list] = {}
    for info in param_info(model).values():
        by_layer.setdefault(info.layer, []).append(info.axes)
    total = count_params(by_layer.pop(None, []), sz)
    for i, axes in by_layer.items():
        total += count_params(axes, sz) * (1 if layers is None else layers.get(i, 1))
    return total


def layer_list(model: fx.GraphModule, layers: list[int] | int | None, what: str) -> list[int]:
    n = spec_of(model).n_layers
    if layers is None:
        return list(range(n))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
            raise PassRefused(f"{what}: layer {i} is out of range; the model has {n} layers (0..{n - 1})")
    return sorted({i % n for i in layers})
