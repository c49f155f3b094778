"""Byte-level text data: files read as bytes are token ids 0..255 (no tokenizer to ship).

The real-text corpus every machine has is the Python standard library's own source.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import fx

from .errors import MptcError
from .model import spec_of

BYTE_VOCAB = 256


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The .py files of this Python's standard library, sorted (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    return files[:limit] if limit else files


def read_bytes(paths: Sequence[str | os.PathLike]) -> torch.Tensor:
    """All files as one stream of byte ids (int64), each file followed by a newline."""
    chunks = []
    for p in paths:
        try:
            chunks.append(Path(p).read_bytes() + b"\n")
        except OSError as e:
            raise MptcError(f"cannot read {p}: {e.strerror}") from None
    if not chunks:
        raise MptcError("no data files given")
    data = b"".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(tokens: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """n random windows of `length` tokens: (n, length)."""
    if tokens.numel() <= length:
        raise MptcError(f"the data has {tokens.numel()} tokens, fewer than one window of {length + 1}")
    start = torch.randint(0, tokens.numel() - length, (n,), generator=generator)
    return torch.stack([tokens[s: s + length] for s in start.tolist()])


def calibration_batches(model: fx.GraphModule, paths: Sequence[str], samples: int = 64, seed: int = 0,
                        batch: int = 16) -> list[dict[str, torch.Tensor]]:
    """Calibration inputs for a token model with a byte vocabulary (vocab ≥ 256)."""
    spec = spec_of(model)
    if spec.vocab is None or spec.vocab < BYTE_VOCAB:
        raise MptcError(f"byte-level data needs vocab ≥ {BYTE_VOCAB}, model '{spec.name}' has {spec.vocab}")
    length = min(spec.context or 128, 128)
    x = windows(read_bytes(paths), samples, length, torch.Generator().manual_seed(seed))
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in x.split(batch)]
