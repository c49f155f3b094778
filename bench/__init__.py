"""mptc benchmarks: `python -m bench` (full, about 15 minutes on 2 cores) or `python -m bench --quick`.

Measures inference against `transformers` and ONNX Runtime, compile and export time, growth passes
against a safetensors load + save, and MatFormer extraction; writes docs/benchmarks.md and
docs/benchmarks.json. Everything is a ratio against a baseline measured in the same run.
"""

from .run import SUITES, run

__all__ = ["SUITES", "run"]
