"""mptc: a compiler for transformer architectures.

    spec = mptc.load("examples/gpt2-small.mpt")      # a .mpt file or a model dir
    model = mptc.build(spec, seed=0)                  # torch.fx.GraphModule, trainable
    logits = model(input_ids=ids, attention_mask=mask)
    mptc.save(model, "out/gpt2")                      # model.mpt + weights.safetensors
    mptc.export_onnx(model, "out/gpt2.onnx")
"""

from .errors import MptcError, SpecError
from .export import example_inputs, export_onnx, export_pt2, run_onnx
from .model import build, load, load_model, save, spec_of
from .printer import format_spec
from .schema import parse
from .spec import Spec
from .summary import summarize


def from_hf(path_or_model, **kw):
    """A GraphModule from a Hugging Face model dir or a `transformers` model object (see mptc.hf)."""
    from .hf import from_hf as _from_hf

    return _from_hf(path_or_model, **kw)


def to_hf(model, path, **kw):
    """Write a Hugging Face checkpoint (config.json + model.safetensors) for a GPT-2 or Llama-family model."""
    from .hf import to_hf as _to_hf

    return _to_hf(model, path, **kw)


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
