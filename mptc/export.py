"""Emitters for deployment: ONNX (via torch.onnx's dynamo exporter) and .pt2 (torch.export).

Inputs and outputs carry Hugging Face names; batch and sequence axes are dynamic.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx
from torch.export import Dim

from . import spec as S
from .atomic import atomic_file, atomic_onnx, check_onnx_output
from .emit import emit, unsupported
from .emit.fast import BIG, write_onnx
from .errors import MptcError
from .files import ONNX_OPSET
from .graph import spec_of
from .inputs import example_inputs
from .outputs import check_output


def dynamic_shapes(spec: S.Spec, named: bool = True) -> dict:
    """The dynamic axes of every input: batch (axis 0) and, for token inputs, sequence (axis 1).

    named: one named Dim per axis, shared by all inputs (the ONNX exporter names the axes after
    them). Otherwise Dim.DYNAMIC with the same bounds, which lets torch.export relate the sizes
    itself: a multi-modal model's sequence is the image's positions plus the text, and strict
    named Dims reject the guards the tracer derives from that sum (GQA's repeated kv heads).
    """
    top = spec.context or 1 << 20
    if named:
        batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=top)
    else:
        batch, seq = Dim.DYNAMIC(min=1, max=4096), Dim.DYNAMIC(min=1, max=top)
    return {name: {0: batch} if name in ("conditions", "pixel_values") else {0: batch, 1: seq}
            for name in spec.inputs}


def _export_inputs(spec: S.Spec) -> dict[str, torch.Tensor]:
    # sizes ≥ 2 on dynamic axes, so the exporter does not specialise them to 1
    return example_inputs(spec, batch=2, seq=min(8, spec.context or 8))


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings meant for their own developers."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def exported_program(model: fx.GraphModule) -> torch.export.ExportedProgram:
    """The model as a torch.export program with dynamic batch and sequence axes; an exporter
    failure is an MptcError that names the spec (ONNX is the alternative)."""
    spec = spec_of(model)
    model.eval()
    kwargs = {k: v.to(next(model.parameters()).device) for k, v in _export_inputs(spec).items()}
    try:
        with _quiet():
            return torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes(spec, named=False))
    except MptcError:
        raise
    except Exception as e:  # the exporter's own errors: torch._dynamo.exc.UserError, RuntimeError, …
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MptcError(f"cannot export '{spec.name}' as .pt2: {first}",
                        hint="compile it to ONNX instead (`mptc compile SRC -o OUT.onnx`)") from None


def export_pt2(model: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write a torch.export program (`.pt2`) atomically."""
    check_output(path, "pt2")  # before the export: a refused output costs nothing
    ep = exported_program(model)
    with atomic_file(path, kind="pt2") as tmp:
        torch.export.save(ep, str(tmp))
    return Path(path)


def export_onnx(model: fx.GraphModule, path: str | os.PathLike, opset: int = ONNX_OPSET, check: bool = True,
                external_data: bool | None = None) -> Path:
    """Write an ONNX file atomically; it passes `onnx.checker` (full check) before it lands.

    external_data: weights in `PATH.data` beside the graph (True), inside it (False), or inside unless
    they pass the 2 GB protobuf limit (None). The graph and its data land together.
    """
    import onnx

    spec = spec_of(model)
    if opset < 18:
        raise MptcError(f"opset {opset} is too old; mptc emits opset 18 or newer")
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > BIG  # protobuf's limit is 2 GB
    if big and external_data is False:
        raise MptcError(f"the weights of '{spec.name}' pass the 2 GB limit of one ONNX file",
                        hint="write them as external data (external_data=True, or leave it unset)")
    external = big if external_data is None else external_data
    check_onnx_output(path, external)  # before the export: a refused output costs nothing
    model.eval()
    dtype = next(model.parameters()).dtype
    if _direct(spec, dtype):  # written from the spec and weights, no tracing (mptc.emit, docs/onnx.md)
        return write_onnx(emit(model, dtype=str(dtype).removeprefix("torch."), opset=opset), path, external, check)
    kwargs = _export_inputs(spec)
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    with _quiet():
        prog = torch.onnx.export(
            model, (), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes(spec),
            input_names=list(spec.inputs), output_names=[spec.output], opset_version=opset, verbose=False,
        )
    with atomic_onnx(path, external=external) as tmp:  # the weights, if external, in `tmp.data`
        prog.save(str(tmp), external_data=external)
        if check:
            onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)


def _direct(spec: S.Spec, dtype: torch.dtype) -> bool:
    """Whether the direct emitter covers the model (else it is traced)."""

    return dtype in (torch.float32, torch.float16) and not unsupported(spec, cache=False)


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def run_onnx(path: str | os.PathLike, inputs: dict[str, np.ndarray | torch.Tensor]) -> np.ndarray:
    """Run an ONNX file in ONNX Runtime (CPU); feeds only the inputs the file declares.

    As in the PyTorch module, a declared `token_type_ids` left out is all zeros and an
    `attention_mask` left out is all ones (no padding); inputs are cast to the declared dtypes.
    """
    sess = _session(path)
    feed = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in inputs.items()}
    ids = feed.get("input_ids")
    args = {}
    for i in sess.get_inputs():
        x = feed.get(i.name)
        if x is None and ids is not None and i.name in ("token_type_ids", "attention_mask"):
            x = (np.zeros_like if i.name == "token_type_ids" else np.ones_like)(ids, dtype=np.int64)  # (B, T)
        if x is None:
            continue
        args[i.name] = x.astype(ORT_DTYPES.get(i.type, x.dtype), copy=False)
    missing = [i.name for i in sess.get_inputs() if i.name not in args]
    if missing:
        given = ", ".join(feed) or "nothing"
        raise MptcError(f"{path} needs the input{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                        f"given {given}", hint="was the file compiled from this model?")
    try:
        return sess.run(None, args)[0]
    except Exception as e:  # onnxruntime's errors: wrong shapes, ids out of range, …
        raise MptcError(f"ONNX Runtime cannot run {path} on these inputs: {_ort_message(e)}",
                        hint="was the file compiled from this model?") from None


def _session(path: str | os.PathLike):
    import onnxruntime as ort

    if not Path(path).is_file():
        raise MptcError(f"no such ONNX file: {path}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # InvalidProtobuf, Fail, …: not an ONNX file, or a damaged one
        raise MptcError(f"cannot load {path} as an ONNX model: {_ort_message(e)}",
                        hint="give a file written by `mptc compile SRC -o OUT.onnx`") from None


def _ort_message(e: Exception) -> str:
    """onnxruntime's message without its `[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :` prefix."""
    return str(e).rsplit(" : ", 1)[-1].strip() or type(e).__name__
