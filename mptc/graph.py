"""What mptc records on a GraphModule it builds (torch-free: only `module.meta` is read).

`gm.meta["mptc.spec"]` holds the Spec and `gm.meta["mptc.params"]` a `NodeInfo` per parameter; every
node carries its own in `node.meta["mptc"]` (docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import spec as S
from .errors import MptcError

if TYPE_CHECKING:  # annotations only: this module stays torch-free
    from torch import fx

    from .lower import NodeInfo


def spec_of(model: fx.GraphModule) -> S.Spec:
    """The Spec a module was built from."""
    try:
        return model.meta["mptc.spec"]
    except (AttributeError, KeyError):
        raise MptcError("this module was not built by mptc (no spec in module.meta)") from None


def param_info(model: fx.GraphModule) -> dict[str, NodeInfo]:
    """Per parameter name: its role, layer, axis symbols, initialisation and axis kinds."""
    return model.meta["mptc.params"]
