"""The files mptc reads and writes, and reading a spec from one (torch-free: `mptc check` and `fmt` use it).

A model dir holds `model.mpt` (the canonical spec) and `weights.safetensors`.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import spec as S
from .errors import MptcError
from .schema import parse

SPEC_FILE = "model.mpt"
WEIGHTS_FILE = "weights.safetensors"
ONNX_OPSET = 23  # Attention, RMSNormalization (ONNX Runtime ≥ 1.23 runs them on CPU); 18 for older runtimes


def load(path: str | os.PathLike) -> S.Spec:
    """Read a spec from a `.mpt` file or a model dir."""
    p = Path(path)
    if p.is_dir():
        if not (p / SPEC_FILE).is_file():
            raise MptcError(f"{p} is a directory without {SPEC_FILE}", hint="a model dir holds model.mpt and "
                            "weights.safetensors (written by `mptc compile SPEC -o DIR`)")
        p = p / SPEC_FILE
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise MptcError(f"no such file: {p}") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise MptcError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}") from None
    return parse(text, str(p))
