"""The bos / eos / pad token ids a model dir carries from its Hugging Face checkpoint, read without torch.

`mptc import-hf` stores them in the weights' metadata (`hf.bos_token_id` … as JSON); the deploy path reads
them here (safetensors' numpy reader, the header only) to write them into `genai_config.json` and Optimum's
configs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import MptcError
from .files import WEIGHTS_FILE

__all__ = ["TOKEN_KEYS", "special_tokens"]

TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_tokens(model_dir: str | os.PathLike) -> dict[str, int | list[int]]:
    """The bos / eos / pad ids stored in `model_dir`'s weights (absent ones left out; {} for a model without)."""
    p = Path(model_dir) / WEIGHTS_FILE
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # the same message as loading the weights
        raise MptcError(f"cannot read weights from {p}: {e}", hint="the file is damaged or not a safetensors "
                        "file; write the model dir again") from None
    out: dict[str, int | list[int]] = {}
    for k in TOKEN_KEYS:
        if f"hf.{k}" not in meta:
            continue
        try:
            v = json.loads(meta[f"hf.{k}"])
        except json.JSONDecodeError:
            v = None
        if not (isinstance(v, int) and not isinstance(v, bool)
                or isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise MptcError(f"{p}: the stored {k} is {meta[f'hf.{k}']!r}, not a token id or a list of them",
                            hint="import the checkpoint again (mptc import-hf HF_DIR -o DIR)")
        out[k] = v
    return out
