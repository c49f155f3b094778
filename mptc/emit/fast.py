"""The torch-free path from a model dir to ONNX (docs/onnx.md, "Torch-free path").

`mptc compile DIR -o X.onnx` (and `mptc deploy DIR`) for a spec the emitter covers: `model.mpt` parsed,
`weights.safetensors` checked against the spec from its header and read one tensor at a time while the
file is written. Nothing imports torch, and no weight is held longer than it takes to write it.

`write_onnx` is also the writer of `mptc.export.export_onnx` for the models the emitter covers, so both
paths write the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from .. import spec as S
from ..atomic import atomic_onnx, check_onnx_output
from ..errors import MptcError
from ..files import SPEC_FILE, WEIGHTS_FILE, load
from . import Emitted, emit, unsupported
from .model import LazyModel
from .weights import Weight, check, expected, from_safetensors, stored_dtypes

__all__ = ["BIG", "check_graph", "compile_onnx", "covers", "is_model_dir", "read_model_dir", "write_onnx"]

BIG = 1.8e9  # weights past this go to external data (protobuf's limit for one file is 2 GB)
DTYPES = ("float32", "float16")


def is_model_dir(src: str | os.PathLike) -> bool:
    """A model dir: model.mpt and weights.safetensors."""
    p = Path(src)
    return p.is_dir() and (p / SPEC_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def covers(spec: S.Spec, *, cache: bool = False, profile: str = "portable") -> bool:
    """Whether the torch-free path serves `spec`: the emitter covers it and its parameters are listed."""
    return expected(spec) is not None and not unsupported(spec, cache=cache, profile=profile)


def read_model_dir(src: str | os.PathLike, spec: S.Spec | None = None) -> tuple[S.Spec, dict[str, Weight]]:
    """The spec of a model dir (`spec` if already read) and its weights (nothing read yet but the header),
    checked against the spec as `mptc.load_model` checks them: every tensor present, none extra, shapes,
    floating point."""
    spec = load(src) if spec is None else spec
    path = Path(src) / WEIGHTS_FILE
    weights = from_safetensors(path)
    check(spec, weights, str(path), stored_dtypes(path))
    return spec, weights


def check_graph(model: LazyModel) -> None:
    """`onnx.checker` (full check: ops, types, shape inference) on the graph with every weight as a reference
    (name, dtype, shape) rather than its bytes, so a 500 MB model is checked without being held in memory.
    The bytes themselves are written from arrays of exactly those dtypes and shapes (`LazyModel.save`)."""
    try:
        model.check()
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise MptcError(f"the emitted graph of '{model.graph.name}' fails onnx.checker: "
                        f"{str(e).strip().splitlines()[0]}",
                        hint="this is a bug in mptc's emitter; `mptc compile` traces the model instead if the "
                        "emitter is bypassed") from None


def write_onnx(emitted: Emitted, path: str | os.PathLike, external: bool, check: bool = True) -> Path:
    """Write an emitted model atomically (weights in `PATH.data` if `external`), checked first (`check_graph`)."""
    if check:
        check_graph(emitted.model)
    with atomic_onnx(path, external=external) as tmp:
        emitted.save(tmp, external_data=external)
    return Path(path)


def compile_onnx(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32", opset: int | None = None,
                 external_data: bool | None = None, check: bool = True) -> Path | None:
    """`mptc compile DIR -o OUT.onnx` without torch, writing what `export_onnx(load_model(DIR, dtype=…), …)` writes;
    None (nothing done) where this path does not serve the model: not a model dir, a dtype other than
    float32/float16, or a spec the emitter does not cover."""
    if dtype not in DTYPES or not is_model_dir(src):
        return None
    spec = load(src)
    if not covers(spec):
        return None
    if opset is not None and opset < 18:
        raise MptcError(f"opset {opset} is too old; mptc emits opset 18 or newer")
    spec, weights = read_model_dir(src, spec)
    # as load_model: float64 stays float64 until the model's dtype, everything else passes through float32
    weights = {k: w if w.dtype == np.float64 else w.astype(np.float32) for k, w in weights.items()}
    size = np.dtype(dtype).itemsize * sum(int(np.prod(w.shape)) for w in weights.values())
    big = size > BIG
    if big and external_data is False:
        raise MptcError(f"the weights of '{spec.name}' pass the 2 GB limit of one ONNX file",
                        hint="write them as external data (external_data=True, or leave it unset)")
    external = big if external_data is None else external_data
    check_onnx_output(out, external)  # before the work: a refused output costs nothing
    return write_onnx(emit(spec, weights=weights, dtype=dtype, opset=opset), out, external, check)
