"""Graph-rewrite passes over compiled models, verified after every step.

    from mptc import passes
    model, report = passes.Pipeline([passes.grow_mlp(hidden=4096), passes.add_layers(n=2, at=6)])(model)

Each pass is a small object with `requires(model)` and `apply(model) -> (model, certificate)`;
the dimension-symbol engine (`passes.engine`) does the tensor work for all of them.
"""

from .base import Pass, PassError
from .engine import Certificate, Init, coupling_graph, sites
from .extract import Extract, Reorder
from .grow import (
    GROWTH,
    AddHeads,
    AddKVHeads,
    AddLayers,
    GrowContext,
    GrowHeadDim,
    GrowMLP,
    GrowQK,
    GrowVocab,
    GrowWidth,
)
from .pipeline import Pipeline, Report, grow_optimizer

PASSES: dict[str, type[Pass]] = {p.name: p for p in (*GROWTH, Extract, Reorder)}

grow_mlp = GrowMLP
add_heads = AddHeads
grow_head_dim = GrowHeadDim
grow_qk = GrowQK
grow_width = GrowWidth
add_layers = AddLayers
add_kv_heads = AddKVHeads
grow_vocab = GrowVocab
grow_context = GrowContext
extract = Extract
reorder = Reorder

__all__ = [
    "AddHeads",
    "AddKVHeads",
    "AddLayers",
    "Certificate",
    "Extract",
    "GrowContext",
    "GrowHeadDim",
    "GrowMLP",
    "GrowQK",
    "GrowVocab",
    "GrowWidth",
    "Init",
    "PASSES",
    "Pass",
    "PassError",
    "Pipeline",
    "Reorder",
    "Report",
    "add_heads",
    "add_kv_heads",
    "add_layers",
    "coupling_graph",
    "extract",
    "grow_context",
    "grow_head_dim",
    "grow_mlp",
    "grow_optimizer",
    "grow_qk",
    "grow_vocab",
    "grow_width",
    "reorder",
    "sites",
]
