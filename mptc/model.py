"""Build, load and save models: a Spec plus weights as a torch.fx GraphModule.

The GraphModule keeps its Spec in `gm.meta["mptc.spec"]` and the parameters' dimension
symbols in `gm.meta["mptc.params"]`; `forward` takes the inputs by their ONNX names
(`input_ids`, `attention_mask` or `pixel_values`) and returns the logits.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx

from . import spec as S
from .atomic import atomic_dir
from .dims import sizes
from .errors import MptcError
from .files import SPEC_FILE, WEIGHTS_FILE, load
from .graph import param_info, spec_of
from .lower import Lowered, NodeInfo, lower
from .memory import check_fits, count_params

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
__all__ = ["SPEC_FILE", "WEIGHTS_FILE", "build", "cached", "init_weights", "is_cached", "load", "load_model",
           "param_info", "save", "spec_of"]


def build(spec: S.Spec, weights: str | os.PathLike | dict | None = None, seed: int = 0,
          device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, cache: bool = False
          ) -> fx.GraphModule:
    """Compile a Spec to a trainable GraphModule.

    weights: a safetensors file, a model dir, or a state dict; else initialised from `seed`.
    device="meta" allocates nothing (shapes only, for summaries of large specs).
    cache: the KV-cached form of a decoder (inputs with past keys and values, output (logits, presents);
    docs/generate.md).
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    on_meta = weights is not None or str(device) == "meta"
    low = lower(spec, "meta", cache=cache)  # shapes only: the size is checked before anything is allocated
    if weights is not None or str(device) != "meta":
        _check_fits(spec, low, dtype, device)
    name = re.sub(r"\W", "_", spec.name) or "Model"
    try:
        gm = fx.GraphModule(low.root, low.graph, class_name=name)
    except SyntaxError as e:  # the generated forward does not compile: a name from the spec Python cannot use
        model = spec.spans.get("model")
        raise MptcError(f"cannot build model '{spec.name}': its generated code does not compile ({e.msg})",
                        model.span if model is not None else None, "rename the names the spec gives") from None
    gm.meta["mptc.spec"] = spec
    gm.meta["mptc.params"] = low.params
    gm.meta["mptc.cache"] = cache
    if weights is not None:
        _load_weights(gm, weights, low.params)
        gm.to(device)
    elif not on_meta:
        gm.to_empty(device=device)
        init_weights(gm, seed)
    return gm.to(dtype)


def is_cached(model: fx.GraphModule) -> bool:
    """Whether a module is the KV-cached form of its spec (`build(…, cache=True)` or `cached`)."""
    return bool(getattr(model, "meta", {}).get("mptc.cache", False))


def cached(model: fx.GraphModule) -> fx.GraphModule:
    """The KV-cached form of a built decoder, sharing its parameters (the same tensors: no copy), its
    train/eval mode and, for a nested model, its Nest module (so `granularity(model, …)` picks the cached
    form's sub-network too). A model that is already cached is returned as it is."""
    if is_cached(model):
        return model
    spec = spec_of(model)
    low = lower(spec, "meta", cache=True)
    gm = fx.GraphModule(low.root, low.graph, class_name=re.sub(r"\W", "_", spec.name) or "Model")
    gm.meta.update({"mptc.spec": spec, "mptc.params": low.params, "mptc.cache": True})
    gm.load_state_dict({k: model.get_parameter(k) for k in low.params}, strict=True, assign=True)
    if spec.nested:
        gm.nest = model.get_submodule("nest")
    return gm.train(model.training)


def _check_fits(spec: S.Spec, low: Lowered, dtype: torch.dtype, device: str | torch.device) -> None:
    """Refuse a model whose parameters cannot fit in the memory available (on the host when loading)."""
    n = count_params((info.axes for info in low.params.values()), sizes(spec))
    where = "cpu" if str(device) == "meta" else device
    check_fits(f"model {spec.name} would have", n, dtype, where, hint="`mptc summary SPEC` shows the size of each "
               "part without allocating anything; make the spec smaller (width, vocab, layers, hidden)")


def init_weights(model: fx.GraphModule, seed: int = 0) -> None:
    """Deterministic initialisation: normal(std) for matrices, std/√(2L) for residual writers
    (GPT-2), zeros for biases, ones for norm gains."""
    spec = spec_of(model)
    gen = torch.Generator().manual_seed(seed)
    std = spec.init.std
    with torch.no_grad():
        for name, info in param_info(model).items():
            p = model.get_parameter(name)
            if info.init == "zeros":
                p.zero_()
            elif info.init == "ones":
                p.fill_(1.0)
            else:
                s = std / math.sqrt(2 * spec.n_layers) if info.init == "residual" else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)


def _load_weights(gm: fx.GraphModule, weights, params: dict[str, NodeInfo]) -> None:
    where = "the state dict"
    if isinstance(weights, dict):
        sd = weights
    else:
        p = Path(weights)
        if p.is_dir():
            p = p / WEIGHTS_FILE
        where = str(p)
        if not p.is_file():
            raise MptcError(f"no weights file: {p}")
        try:
            with safe_open(p, framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # empty, truncated, not safetensors
            raise MptcError(f"cannot read weights from {p}: {e}", hint="the file is damaged or not a safetensors "
                            "file; write the model dir again (`mptc compile SPEC -o DIR`)") from None
    missing = [k for k in params if k not in sd]
    extra = [k for k in sd if k not in params]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" …" if len(missing) > 4 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}" + (" …" if len(extra) > 4 else ""))
        raise MptcError(f"{where} does not fit the spec: " + "; ".join(parts),
                        hint="the weights were written for a different spec")
    for k in params:
        want = tuple(gm.get_parameter(k).shape)
        if tuple(sd[k].shape) != want:
            raise MptcError(f"{where}: '{k}' has shape {tuple(sd[k].shape)}, the spec needs {want}",
                            hint="the weights were written for a different spec")
        if not sd[k].is_floating_point():
            dt = str(sd[k].dtype).removeprefix("torch.")
            raise MptcError(f"{where}: '{k}' holds {dt} values; weights must be floating point",
                            hint="save the weights as float32, float16, bfloat16 or float64")
    gm.load_state_dict({k: sd[k].float() if sd[k].dtype != torch.float64 else sd[k] for k in params},
                       strict=True, assign=True)


def load_model(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype | str = torch.float32) -> fx.GraphModule:
    """A model from a model dir (its weights) or a spec file (weights from `seed`)."""
    spec = load(path)
    weights = path if Path(path).is_dir() else None
    return build(spec, weights, seed=seed, dtype=dtype)


def save(model: fx.GraphModule, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
    """Write a model dir: model.mpt (canonical spec) and weights.safetensors (and `extra` text
    files, such as report.json), all at once: the dir appears complete or not at all."""
    spec = spec_of(model)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in param_info(model)}
    with atomic_dir(path, kind="model") as tmp:  # replaces only a model dir (or with --force)
        (tmp / SPEC_FILE).write_text(str(spec))
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mptc.spec": spec.name})
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return Path(path)
