"""MatFormer nesting at run time: the compiled module runs any of its sub-networks without copying
weights (`granularity(model, …)`). What a sub-network is (`Choice`, its text form, `sub_spec`) is
mptc/choice.py; `mptc extract` cuts one out physically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, fx, nn

from . import spec as S
from .choice import Choice, active_sizes, parse_choice, task_choice
from .errors import MptcError
from .graph import spec_of


class Nest(nn.Module):
    """Slices weights to the active prefix and silences skipped layers, per layer.

    The lowered graph routes each nested weight through `nest(w, layer, site)` and each
    skippable layer's residual branches through `nest(x, layer, "skip")`. Slices are views,
    so sub-networks share (and train) the parent's parameters.
    """

    def __init__(self, spec: S.Spec):
        super().__init__()
        self.spec = spec
        self.choice = Choice.full(spec)
        self._sizes = active_sizes(spec, self.choice)

    def set(self, choice: Choice) -> None:
        self.choice = choice
        self._sizes = active_sizes(self.spec, choice)

    def forward(self, x: Tensor, layer: int, site: str) -> Tensor:
        if site == "skip":
            return torch.zeros_like(x) if layer in self.choice.skip else x
        f, h, g = self._sizes[layer]
        a = self.spec.layers[layer].attention
        if site in ("mlp.up", "mlp.gate"):
            return x[:f]
        if site == "mlp.down":
            return x[..., :f]
        if site == "attn.q":
            return x[: h * a.head_dim]
        if site == "attn.k":
            return x[: g * a.head_dim]
        if site == "attn.v":
            return x[: g * a.value_dim]
        if site == "attn.o":
            return x[..., : h * a.value_dim]
        raise AssertionError(site)


def nest_of(model: fx.GraphModule) -> Nest:
    try:
        return model.get_submodule("nest")
    except AttributeError:
        raise MptcError("this model has no nested sub-networks",
                        hint="declare `nested = […]` in mlp or attention, or `skippable` layers") from None


@contextlib.contextmanager
def granularity(model: fx.GraphModule, mix: str | Choice | None = None, *, mlp: str | None = None,
                heads: str | None = None, skip: Sequence[int] | str = (), task: str | None = None
                ) -> Iterator[Choice]:
    """Run `model` as one of its sub-networks inside the block (no weights are copied):

        with granularity(model, "s,s,m,l"):      # Mix'n'Match, one granularity per layer
            logits = model(input_ids=ids)
        with granularity(model, mlp="s", skip=[3]):
            ...
        with granularity(model, task="fast"):     # a sub-network named in the spec's `tasks`
            ...
    """
    nest = nest_of(model)
    spec = spec_of(model)
    if task is not None:
        choice = task_choice(spec, task)
    else:
        choice = mix if isinstance(mix, Choice) else parse_choice(spec, mix, mlp=mlp, heads=heads, skip=skip)
    before = nest.choice
    nest.set(choice)
    try:
        yield choice
    finally:
        nest.set(before)
