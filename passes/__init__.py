"""Graph-rewrite passes over compiled models, verified after every step.

    from mptc import passes
    model, report = passes.Pipeline([passes.grow_mlp(hidden=4096), passes.add_layers(n=2, at=6)])(model)

Each pass is a small object with `requires(model)` and `apply(model) -> (model, certificate)`;
the dimension-symbol engine (`passes.engine`) does the tensor work for all of them.

A pass of your own is a `Pass` dataclass whose `change` returns a `Change`, decorated with
`@register`: it is then known to `PASSES`, to pass text and to `mptc grow -p` (load its file with
`mptc grow --plugin FILE.py`, or publish it under the entry-point group `mptc.passes`).
docs/write-a-pass.md has a worked example.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

from mptc.errors import MptcError
from mptc.graph import spec_of

from .base import CheckFailed, Pass, PassError, PassRefused, layer_list
from .engine import Certificate, Change, Init, along, coupling_graph, grouped_grow_map, grow_map, remap, sites
from .extract import Extract, Reorder
from .grow import (
    GROWTH,
    KNOWN_ROLES,
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
from .moe import UpcycleMoE
from .pipeline import Pipeline, Report, grow_optimizer

PASSES: dict[str, type[Pass]] = {p.name: p for p in (*GROWTH, UpcycleMoE, Extract, Reorder)}
ENTRY_POINTS = "mptc.passes"  # the entry-point group of installed pass packages


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a `Pass` dataclass known by its `name` to `PASSES`, pass text and
    `mptc grow -p`. Registering a class again (the same module and name, e.g. a file loaded
    twice) replaces it; another pass's name is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or "__dataclass_fields__" not in cls.__dict__:
        raise MptcError(f"register takes a Pass dataclass, got {cls!r}",
                        hint="write @register above @dataclass, on a subclass of mptc.passes.Pass")
    name = cls.name
    if name == Pass.name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise MptcError(f"{cls.__qualname__}: a registered pass needs a name that text can call, got '{name}'",
                        hint='set name = "my_pass" in the class body')
    had = PASSES.get(name)
    if had is not None and (had.__module__, had.__qualname__) != (cls.__module__, cls.__qualname__):
        raise MptcError(f"a pass named '{name}' is already registered (by {had.__module__}.{had.__qualname__})",
                        hint="give your pass another name")
    PASSES[name] = cls
    return cls


def load_plugin(path: str | Path) -> list[str]:
    """Import a Python file whose `@register`ed passes become usable; the names it registered."""
    path = Path(path)
    if not path.is_file():
        raise MptcError(f"cannot read plugin {path}: no such file", hint="give the path of a .py file")
    where = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]  # two files with one name stay apart
    stem = re.sub(r"\W", "_", path.stem)
    module = f"mptc_plugin_{stem}_{where}"
    before = dict(PASSES)
    spec = importlib.util.spec_from_file_location(module, path)
    if spec is None or spec.loader is None:
        raise MptcError(f"cannot load plugin {path}: not a Python file", hint="plugins are .py files")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod  # dataclasses and typing look the module up while it runs
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # anything the plugin's code raises, its own MptcErrors included
        del sys.modules[module]
        PASSES.clear()
        PASSES.update(before)
        raise MptcError(f"plugin {path} failed to import: {type(e).__name__}: {e}",
                        hint="fix the plugin file (run it with python to see the traceback)") from None
    names = [n for n, c in PASSES.items() if c.__module__ == module]
    if not names:
        raise MptcError(f"plugin {path} registers no pass",
                        hint="decorate a Pass dataclass with @mptc.passes.register")
    return names


def entry_point_names() -> list[str]:
    """The pass names installed packages offer under the `mptc.passes` entry-point group."""
    return [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)]


def find_pass(name: str) -> type[Pass] | None:
    """The registered pass `name`, loading it from its entry point (group `mptc.passes`) if it
    is not registered yet; None when no one offers it."""
    if name in PASSES:
        return PASSES[name]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        if ep.name != name:
            continue
        try:
            obj = ep.load()  # a Pass class, or a module whose passes register themselves
        except Exception as e:
            raise MptcError(f"the pass '{name}' (entry point {ep.value}) failed to load: {type(e).__name__}: {e}",
                            hint="reinstall or fix the package that provides it") from None
        if isinstance(obj, type) and issubclass(obj, Pass) and name not in PASSES:
            if obj.name != name:
                raise MptcError(f"the entry point '{name}' ({ep.value}) gives the pass '{obj.name}'",
                                hint="the entry point's name must be the pass's name")
            register(obj)
        if name not in PASSES:
            raise MptcError(f"the entry point '{name}' ({ep.value}) registers no pass named '{name}'",
                            hint="point it at a Pass class, or at a module that @registers it")
        return PASSES[name]
    return None

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
upcycle_moe = UpcycleMoE

__all__ = [
    "KNOWN_ROLES",
    "AddHeads",
    "AddKVHeads",
    "AddLayers",
    "Certificate",
    "Change",
    "CheckFailed",
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
    "PassRefused",
    "Pipeline",
    "Reorder",
    "UpcycleMoE",
    "Report",
    "add_heads",
    "add_kv_heads",
    "add_layers",
    "along",
    "coupling_graph",
    "extract",
    "find_pass",
    "grouped_grow_map",
    "grow_context",
    "grow_head_dim",
    "grow_map",
    "grow_mlp",
    "grow_optimizer",
    "grow_qk",
    "grow_vocab",
    "grow_width",
    "layer_list",
    "load_plugin",
    "register",
    "remap",
    "reorder",
    "sites",
    "spec_of",
    "upcycle_moe",
]
