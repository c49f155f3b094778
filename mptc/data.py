"""Text data: by default files read as bytes are token ids 0..255 (no tokenizer to ship); with a
Hugging Face `tokenizer.json` (the `tokenizers` library), the ids are its tokens.

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
from .graph import spec_of

BYTE_VOCAB = 256
TOKENIZER_FILE = "tokenizer.json"  # the name a tokenizer has in a checkpoint dir


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


# --- training data: sources, the held-out split, batches ------------------------------------

STDLIB = "stdlib"  # the name `--data stdlib` gives the standard library corpus


def resolve_sources(data: Sequence[str | os.PathLike]) -> list[Path]:
    """`--data` arguments as files, in order: `stdlib` → the standard library's .py files, a directory →
    every file under it (sorted), a file → itself."""
    if not data:
        raise MptcError("no training data given", hint="pass --data FILES…, or --data stdlib for the Python standard "
                        "library's source (byte-level text every machine has)")
    out: list[Path] = []
    for d in data:
        if str(d) == STDLIB:
            out += stdlib_files()
            continue
        p = Path(d)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            if not files:
                raise MptcError(f"data directory {p} holds no files")
            out += files
        elif p.is_file():
            out.append(p)
        else:
            raise MptcError(f"no such data file: {p}", hint="--data takes files, directories, or `stdlib`")
    return out


def split_tokens(tokens: torch.Tensor, held_out: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the last `held_out` fraction of the stream."""
    if not 0.0 < held_out < 1.0:
        raise MptcError(f"the held-out fraction must be in (0, 1), got {held_out}")
    cut = int(tokens.numel() * (1.0 - held_out))
    return tokens[:cut], tokens[cut:]


def even_windows(tokens: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n windows of `length` tokens at evenly spaced starts (deterministic, for evaluation): (n, length)."""
    if tokens.numel() < length:
        raise MptcError(f"the held-out data has {tokens.numel()} tokens, fewer than one window of {length}",
                        hint="give more data or a larger held-out fraction")
    start = torch.linspace(0, tokens.numel() - length, n).long()
    return torch.stack([tokens[s: s + length] for s in start.tolist()])


# --- a tokenizer instead of bytes ------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike):
    """The Hugging Face tokenizer in `path` (a tokenizer.json), set to encode whole files (no truncation,
    no padding). Returns a `tokenizers.Tokenizer`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MptcError(f"cannot read the tokenizer {path}: {getattr(e, 'strerror', None) or e}",
                        hint="--tokenizer takes a Hugging Face tokenizer.json") from None
    return tokenizer_from_text(text, str(path))


def tokenizer_from_text(text: str, name: str = "tokenizer.json"):
    """A `tokenizers.Tokenizer` from the text of a tokenizer.json (`name` for errors)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MptcError("--tokenizer needs the `tokenizers` library", hint="pip install tokenizers") from None
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the library raises a bare Exception for malformed JSON or unknown models
        raise MptcError(f"{name} is not a Hugging Face tokenizer.json: {e}") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenizer_vocab(tok) -> int:
    """How many ids the tokenizer can give (added and special tokens included)."""
    return tok.get_vocab_size(with_added_tokens=True)


def read_tokens(paths: Sequence[str | os.PathLike], tokenizer=None) -> torch.Tensor:
    """All files as one stream of token ids (int64): bytes without a tokenizer (see `read_bytes`),
    else each file's UTF-8 text followed by a newline, encoded without special tokens."""
    if tokenizer is None:
        return read_bytes(paths)
    texts = []
    for p in paths:
        try:
            texts.append(Path(p).read_text(encoding="utf-8") + "\n")
        except OSError as e:
            raise MptcError(f"cannot read {p}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise MptcError(f"{p} is not UTF-8 text (byte {e.start}): a tokenizer reads text",
                            hint="leave out --tokenizer to train on bytes, which reads any file") from None
    if not texts:
        raise MptcError("no data files given")
    ids = [i for enc in tokenizer.encode_batch(texts, add_special_tokens=False) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)
