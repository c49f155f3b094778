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

__all__ = [
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
