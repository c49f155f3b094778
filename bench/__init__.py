"""mptc benchmarks: `python -m bench` (full, about 15 minutes on 2 cores) or `python -m bench --quick`.

Measures inference against `transformers` and ONNX Runtime, compile and export time, growth passes
against a safetensors load + save, and MatFormer extraction; writes docs/benchmarks.md and
docs/benchmarks.json. Everything is a ratio against a baseline measured in the same run.

`bench.run(mode)` runs it from Python (`bench.config.FULL`, `QUICK`, `TOY`). Importing `bench` and
`bench.harness` is cheap (no torch), so worker processes start fast.
"""

__all__ = ["SUITES", "run"]


def __getattr__(name: str):
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
