"""`mptc verify A B`: run two models (model dirs, specs or ONNX files) on the same probes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import MptcError
from .export import run_onnx
from .inputs import example_inputs
from .model import load, load_model


@dataclass
class Comparison:
    max_abs: float  # NaN when either model has a NaN or infinite output
    max_rel: float  # max abs error / largest |output of A|
    batches: int
    compared: int  # size of the last output axis that was compared
    width_b: int
    nonfinite_a: int = 0  # NaN or ±inf outputs of A, of B
    nonfinite_b: int = 0

    def agree(self, tol: float) -> bool:
        """Within `tol`, with every output of both models finite."""
        return self.nonfinite_a == 0 and self.nonfinite_b == 0 and self.max_abs <= tol


def _runner(path: str, seed: int):
    if str(path).endswith(".onnx"):
        if not Path(path).is_file():
            raise MptcError(f"no such ONNX file: {path}")
        return None, lambda x: run_onnx(path, x)
    model = load_model(path, seed=seed).eval()

    def run(x):
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()

    return load(path), run


OPTIONAL = ("attention_mask", "token_type_ids")  # left out, a model reads all tokens as real, all segment 0


def _shared_inputs(a: str, spec_a, b: str, spec_b) -> set[str]:
    """The inputs the probes hold: both models must read the same required inputs; an optional one
    that only one of them reads is left out."""
    specs = [s for s in (spec_a, spec_b) if s is not None]
    if len(specs) < 2:
        return set(specs[0].inputs) if specs else set()
    ia, ib = set(spec_a.inputs), set(spec_b.inputs)
    if (ia ^ ib) - set(OPTIONAL):
        raise MptcError(f"the models read different inputs: {a} reads {', '.join(spec_a.inputs)}; "
                        f"{b} reads {', '.join(spec_b.inputs)}",
                        hint="verify compares two versions of one model (say, before and after `mptc grow`)")
    return ia & ib


def compare(a: str, b: str, seed: int = 0, batches: int = 3) -> Comparison:
    spec_a, run_a = _runner(a, seed)
    spec_b, run_b = _runner(b, seed)
    spec = spec_a or spec_b
    if spec is None:
        raise MptcError("both are ONNX files; give a model dir or spec as A or B (it defines the probe inputs)")
    shared = _shared_inputs(a, spec_a, b, spec_b)
    if spec_a is not None and spec_b is not None and spec_b.vocab and spec_a.vocab and spec_b.vocab < spec_a.vocab:
        spec = spec_b  # probes valid for both
    worst_abs = worst_rel = 0.0
    compared = width_b = bad_a = bad_b = 0
    for i in range(batches):
        x = {k: v.numpy() for k, v in example_inputs(spec, batch=2, seq=16, seed=seed + i, padded=i % 2 == 1).items()
             if k in shared}
        ya, yb = run_a(x).astype(np.float64), run_b(x).astype(np.float64)
        width_b = yb.shape[-1]
        if ya.shape[:-1] != yb.shape[:-1]:
            raise MptcError(f"the outputs differ in shape: {ya.shape} and {yb.shape}")
        n = min(ya.shape[-1], yb.shape[-1])
        ya, yb = ya[..., :n], yb[..., :n]
        compared = n
        bad_a += int((~np.isfinite(ya)).sum())
        bad_b += int((~np.isfinite(yb)).sum())
        diff = np.abs(ya - yb)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float(diff.max() / max(np.abs(ya).max(), 1e-30)))  # relative to the largest output
    if bad_a or bad_b:  # NaN compares false with everything: never let it read as a small error
        worst_abs = worst_rel = float("nan")
    return Comparison(worst_abs, worst_rel, batches, compared, width_b, bad_a, bad_b)
