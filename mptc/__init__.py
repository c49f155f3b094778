"""mptc: a compiler for transformer architectures.

    spec = mptc.load("examples/gpt2-small.mpt")      # a .mpt file or a model dir
    model = mptc.build(spec, seed=0)                  # torch.fx.GraphModule, trainable
    logits = model(input_ids=ids, attention_mask=mask)
    mptc.save(model, "out/gpt2")                      # model.mpt + weights.safetensors
    mptc.export_onnx(model, "out/gpt2.onnx")
"""

from importlib import import_module

from .errors import MptcError, SpecError
from .files import load
from .graph import spec_of
from .schema import parse
from .spec import Spec, format_spec

# Imported on first use, so that `import mptc` (and `mptc check`, `mptc fmt`) does not import torch.
LAZY = {"build": "model", "load_model": "model", "save": "model", "example_inputs": "inputs",
        "export_onnx": "export", "export_pt2": "export", "run_onnx": "export", "summarize": "summary"}
LAZY["generate"] = "generate"  # mptc.generate(model, ids, n): new ids through the KV cache (docs/generate.md)
LAZY["next_tokens"] = "generate"  # the sampling rule, for torch-free modules that pick tokens (mptc.genai)


def __getattr__(name: str):
    if name in LAZY:
        value = getattr(import_module(f".{LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mptc' has no attribute {name!r}")


def from_hf(path_or_model, **kw):
    """A GraphModule from a Hugging Face model dir or a `transformers` model object (see mptc.hf)."""
    return import_module(".hf", __name__).from_hf(path_or_model, **kw)


def to_hf(model, path, **kw):
    """Write a Hugging Face checkpoint (config.json + model.safetensors) for a GPT-2 or Llama-family model."""
    return import_module(".hf", __name__).to_hf(model, path, **kw)


__all__ = [
    "from_hf",
    "to_hf",
    "MptcError",
    "Spec",
    "SpecError",
    "build",
    "example_inputs",
    "export_onnx",
    "export_pt2",
    "format_spec",
    "load",
    "load_model",
    "parse",
    "run_onnx",
    "save",
    "spec_of",
    "summarize",
]
__version__ = "0.1.0"
