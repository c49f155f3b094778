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
from .atomic import atomic_file
from .errors import MptcError
from .model import spec_of

ONNX_OPSET = 23  # Attention, RMSNormalization (ONNX Runtime ≥ 1.23 runs them on CPU); 18 for older runtimes


def example_inputs(spec: S.Spec, batch: int = 2, seq: int = 8, seed: int = 0,
                   padded: bool = False) -> dict[str, torch.Tensor]:
    """Random inputs for a spec (ids, a padding mask with the last tokens masked if `padded`)."""
    g = torch.Generator().manual_seed(seed)
    p = spec.patches
    image = {"pixel_values": torch.randn(batch, p.channels, p.image, p.image, generator=g)} if p else {}
    if not spec.reads_tokens:
        return image
    if spec.context is not None:
        seq = min(seq, spec.context)
    ids = torch.randint(0, spec.vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if padded:  # right padding, a different amount per row, never a whole row
        for i in range(batch):
            mask[i, seq - min(seq - 1, 1 + i + seq // 4):] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if spec.embed.segments:  # two segments, as in BERT's sentence pairs
        out["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    if spec.conditions:  # the side input: one vector per example
        out["conditions"] = torch.randn(batch, spec.conditions, generator=g)
    out |= image
    return {k: out[k] for k in spec.inputs}  # in the order of the forward signature and the ONNX inputs


def dynamic_shapes(spec: S.Spec) -> dict:
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("sequence", min=1, max=spec.context or 1 << 20)
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
    spec = spec_of(model)
    model.eval()
    kwargs = {k: v.to(next(model.parameters()).device) for k, v in _export_inputs(spec).items()}
    with _quiet():
        return torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes(spec))


def export_pt2(model: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write a torch.export program (`.pt2`) atomically."""
    ep = exported_program(model)
    with atomic_file(path) as tmp:
        torch.export.save(ep, str(tmp))
    return Path(path)


def export_onnx(model: fx.GraphModule, path: str | os.PathLike, opset: int = ONNX_OPSET, check: bool = True) -> Path:
    """Write an ONNX file atomically; it passes `onnx.checker` (full check) before it lands."""
    import onnx

    spec = spec_of(model)
    if opset < 18:
        raise MptcError(f"opset {opset} is too old; mptc emits opset 18 or newer")
    model.eval()
    dtype = next(model.parameters()).dtype
    kwargs = _export_inputs(spec)
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    with _quiet():
        prog = torch.onnx.export(
            model, (), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes(spec),
            input_names=list(spec.inputs), output_names=[spec.output], opset_version=opset, verbose=False,
        )
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
    with atomic_file(path) as tmp:
        if big:
            prog.save(str(tmp), external_data=True)
        else:
            prog.save(str(tmp))
        if check:
            onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)


def run_onnx(path: str | os.PathLike, inputs: dict[str, np.ndarray | torch.Tensor]) -> np.ndarray:
    """Run an ONNX file in ONNX Runtime (CPU); feeds only the inputs the file declares."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items() if k in names}
    missing = [n for n in names if n not in feed]
    if missing:
        raise MptcError(f"{path} needs inputs {', '.join(missing)}")
    return sess.run(None, feed)[0]
