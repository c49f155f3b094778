"""Hugging Face interop: import checkpoints of every family in `mptc.hf_families`, export those a config can hold.

    mptc.hf.import_hf("hf/llama", "out/llama")        # config.json + weights → model dir (no transformers needed)
    model = mptc.from_hf("hf/llama")                   # or a transformers model object
    mptc.hf.export_hf(model, "hf/llama-grown")        # config.json + model.safetensors (mptc.hf_export)

Each family is a row of `FAMILIES` (mptc.hf_families): a reader from config.json to a Spec, and a table from mptc
parameter names to checkpoint tensors (`Map`), used in both directions. Weights are read one tensor at a time
(`safetensors.safe_open`, or a memory-mapped `torch.load`), so importing holds about one copy of the model.
`transformers` is never imported here except by `check_hf`: config.json is JSON, the weights are safetensors or
torch files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, fx

from . import spec as S
from .atomic import atomic_dir
from .errors import MptcError
from .files import SPEC_FILE, WEIGHTS_FILE
from .graph import spec_of
from .hf_export import EXPORTS, export_hf, to_hf
from .hf_families import (
    BERT_WEIGHTS,
    FAMILIES,
    GPT2_WEIGHTS,
    LLAMA_WEIGHTS,
    VIT_WEIGHTS,
    Config,
    Family,
    Map,
    _family,
    _hf_names,
    _json,
    _template,
    spec_from_config,
)
from .lower import lower
from .model import build, load_model
from .tokens import special_tokens as stored_tokens

__all__ = ["BERT_WEIGHTS", "CHECK_TOL", "EXPORTS", "FAMILIES", "GPT2_WEIGHTS", "LLAMA_WEIGHTS", "VIT_WEIGHTS",
           "Checkpoint", "Family", "Map", "check_hf", "export_hf", "from_hf", "import_hf", "open_checkpoint",
           "read_config", "spec_from_config", "special_tokens", "to_hf"]

# --- reading checkpoints --------------------------------------------------------------------------------


class Checkpoint:
    """The tensors of a checkpoint by name, read one at a time; it remembers which were read."""

    def __init__(self, keys: set[str], read: Callable[[str], Tensor], where: str):
        self.keys, self._read, self.where = keys, read, where
        self.used: set[str] = set()

    def find(self, names: tuple[str, ...], prefix: str) -> str | None:
        """The stored spelling of a tensor: as named, without the base-model prefix, under `transformer.` for a
        `model.` prefix (the question-answering classes of Llama, Qwen2, Qwen3), or with old gamma/beta."""
        for name in names:
            bare = name.removeprefix(prefix)
            alias = ("transformer." + bare,) if prefix == "model." and name.startswith(prefix) else ()
            for n in (name, bare, *alias):
                for old, new in (("", ""), (".weight", ".gamma"), (".bias", ".beta")):
                    cand = n[: -len(old)] + new if old and n.endswith(old) else n
                    if cand in self.keys:
                        return cand
        return None

    def get(self, key: str) -> Tensor:
        self.used.add(key)
        return self._read(key)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DAMAGED = "the file is damaged or incomplete (an interrupted download?): fetch it again"


def _shard_map(index: Path) -> dict[str, Path]:
    """The shard of each tensor from an index's `weight_map`; every shard must lie inside the checkpoint dir."""
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MptcError(f"{index} is not valid JSON: {e}", hint=DAMAGED) from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict):
        raise MptcError(f"{index} has no `weight_map`", hint="a shard index maps each tensor name to its file")
    root, files, seen = index.parent, {}, set()
    for key, name in wm.items():
        entry = f"{index}: weight_map['{key}'] = {_json(name)}"
        if not isinstance(name, str) or not name:
            raise MptcError(f"{entry} is not a file name")
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
            why = "an absolute path" if os.path.isabs(name) else "a path that leaves the directory"
            raise MptcError(f"{entry} names a file outside the checkpoint dir {root} ({why})",
                            hint="shard paths must be relative and stay inside the checkpoint dir")
        if name not in seen and not (root / name).is_file():
            raise MptcError(f"{entry}: no such file in {root}", hint="the checkpoint is missing a shard")
        seen.add(name)
        files[key] = root / name
    return files


def _open_file(p: Path, stack: ExitStack) -> Any:
    """A safetensors file, or a torch pickle of tensors (memory-mapped when it is a zip, else read whole)."""
    if p.suffix == ".safetensors":
        try:
            return stack.enter_context(safe_open(str(p), framework="pt"))
        except (SafetensorError, OSError) as e:
            raise MptcError(f"cannot read {p}: {e}", hint=DAMAGED) from None
    try:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the old (tar) format cannot be memory-mapped
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load of a damaged file raises many kinds (OSError, KeyError, …)
        raise MptcError(f"cannot read {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint=DAMAGED + "; pickles of whole models are refused (tensors only)") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise MptcError(f"cannot read {p}: not a state dict (tensor names → tensors)")
    return state


@contextmanager
def open_checkpoint(d: Path) -> Iterator[Checkpoint]:
    """A Hugging Face weights dir: model.safetensors, sharded safetensors, or pytorch_model.bin (sharded or not)."""
    found = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if found is None:
        raise MptcError(f"no weights file in {d}", hint=f"expected one of: {', '.join(WEIGHT_FILES)}")
    files = _shard_map(found) if found.name.endswith(".index.json") else None
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(p: Path):
            if p not in handles:
                handles[p] = _open_file(p, stack)
            return handles[p]

        if files is None:
            files = dict.fromkeys(handle(found).keys(), found)
        else:  # a tensor a shard holds but the index leaves out is part of the checkpoint too
            for p in sorted(set(files.values())):
                for k in handle(p).keys():
                    files.setdefault(k, p)

        def read(k: str) -> Tensor:
            h = handle(files[k])
            if files[k].suffix != ".safetensors":
                return h[k].clone()
            try:
                return h.get_tensor(k)
            except SafetensorError as e:  # an index naming a tensor its shard lacks, or a damaged shard
                raise MptcError(f"cannot read '{k}' from {files[k]}: {e}", hint=DAMAGED) from None

        yield Checkpoint(set(files), read, str(found))


def _checkpoint_of_state(state: dict[str, Tensor], where: str) -> Checkpoint:
    return Checkpoint(set(state), lambda k: state[k].detach().clone(), where)



def _fetch(ck: Checkpoint, fam: Family, name: str, shape: tuple[int, ...], blocks: dict | None = None
           ) -> Tensor | None:
    """One mptc tensor in mptc layout (the table's, else its `alt` layouts), or None when the checkpoint lacks it.

    blocks: fused checkpoint name → {part: size} of its blocks (q, k, v rows: H·K, G·K, G·Dv).
    """
    m = fam.weights[_template(name)[0]]
    while m is not None:
        t = _read(ck, fam, m, name, shape, blocks or {})
        if t is not None:
            return t
        m = m.alt
    return None


def _block(ck: Checkpoint, key: str, name: str, t: Tensor, m: Map, sizes: dict[int, int]) -> Tensor:
    """Block `m.part` of a fused tensor along `m.dim`; sizes: part → size, and -1 → the head size when the blocks
    alternate per head (rows (H, parts, K))."""
    rows = [sizes[k] for k in sorted(sizes) if k >= 0]
    if t.dim() <= m.dim or t.shape[m.dim] != sum(rows):
        raise MptcError(f"{ck.where}: '{key}' has the shape {tuple(t.shape)}; config.json implies "
                        f"{' + '.join(map(str, rows))} along axis {m.dim} (the fused blocks of {name} and its "
                        "neighbours)")
    if m.interleave:  # (H·parts·K, …) → (H, parts, K, …) → block (H·K, …)
        k = sizes[-1]
        t = t.reshape(rows[0] // k, len(rows), k, *t.shape[1:])[:, m.part]
        return t.reshape(rows[m.part], *t.shape[2:]).clone(memory_format=torch.contiguous_format)
    return t.split(rows, dim=m.dim)[m.part].clone(memory_format=torch.contiguous_format)


def _read(ck: Checkpoint, fam: Family, m: Map, name: str, shape: tuple[int, ...], blocks: dict) -> Tensor | None:
    """One mptc tensor from the checkpoint in layout `m`, or None when it has none of m's names."""
    names = _hf_names(fam, name, m)
    if m.experts:  # (E, …): one tensor per expert
        keys = [ck.find(tuple(n.replace("{e}", str(e)) for n in names), fam.prefix) for e in range(shape[0])]
        if None in keys:
            return None
        key, t = keys[0], torch.stack([ck.get(k) for k in keys])
    else:
        key = ck.find(names, fam.prefix)
        if key is None:
            return None
        t = ck.get(key)
    if m.conv1d and t.dim() == 2:
        t = t.t()  # (in, out) → (out, in)
    sizes = blocks.get(names[0])
    if m.part is not None and sizes:  # a copy, so the fused tensor is freed
        t = _block(ck, key, name, t, m, sizes)
    if m.offset and t.dim() == 2 and t.shape[0] > shape[0]:  # RoBERTa: real tokens read rows pad + 1 …
        t = t[t.shape[0] - shape[0]:].clone(memory_format=torch.contiguous_format)
    if m.plus_one:  # Gemma: (1 + w)
        t = t + 1
    if m.flat and t.numel() == torch.Size(shape).numel():
        t = t.reshape(shape)
    if tuple(t.shape) != shape:
        raise MptcError(f"{ck.where}: '{key}' gives {name} the shape {tuple(t.shape)}; config.json implies {shape}")
    return t.contiguous()


# --- every tensor used, every tensor found ----------------------------------------------------------------

SHOWN = 5  # names listed in a message


def _natural(key: str) -> list:
    """Sort key: `h.10` after `h.9`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _some(names: list[str]) -> str:
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _allowed(spec: S.Spec, fam: Family) -> set[str]:
    """The family's known extras (and tied copies, for a tied head), under the names a checkpoint may use."""
    names = fam.extras + (fam.tied if spec.head.tied else ())
    full = {n.format(i=i) for n in names for i in (range(spec.n_layers) if "{i}" in n else [None])}
    return full | {n.removeprefix(fam.prefix) for n in full}


def _layers_in(fam: Family, keys: set[str]) -> set[int]:
    """The layer indices that checkpoint names carry (`transformer.h.3.…` → 3)."""
    stems = {h.split("{i}")[0] for m in fam.weights.values() for h in m.hf if "{i}" in h}
    stems |= {s.removeprefix(fam.prefix) for s in stems}
    found = set()
    for k in keys:
        for s in stems:
            if k.startswith(s) and k[len(s):].split(".", 1)[0].isdigit():
                found.add(int(k[len(s):].split(".", 1)[0]))
    return found


def _layer_hint(spec: S.Spec, fam: Family, keys: set[str]) -> str | None:
    have = _layers_in(fam, keys)
    if not have or have == set(range(spec.n_layers)):
        return None
    lo, hi = min(have), max(have)
    span = f"{lo}..{hi}" if have == set(range(lo, hi + 1)) else ", ".join(map(str, sorted(have)))
    return f"config.json says {fam.layers_key} = {spec.n_layers}, the checkpoint has layers {span}"


def _account(spec: S.Spec, fam: Family, ck: Checkpoint, missing: dict[str, list[str]]) -> None:
    """Raise unless every model tensor was found and every checkpoint tensor was used (or is a known extra).

    missing: checkpoint name → the mptc tensors it would give (GPT-2's fused c_attn gives three).
    """
    unused = sorted(ck.keys - ck.used - _allowed(spec, fam), key=_natural)
    if not missing and not unused:
        return
    problems = []
    if missing:
        n = len(missing)
        problems.append(f"{n} tensor{'s' * (n > 1)} of the model {'are' if n > 1 else 'is'} not in the checkpoint: "
                        + _some([f"'{k}' (for {', '.join(v)})" for k, v in missing.items()]))
    if unused:
        n = len(unused)
        problems.append(f"{n} tensor{'s' * (n > 1)} of the checkpoint {'are' if n > 1 else 'is'} not used: "
                        f"{_some(unused)}")
    hint = _layer_hint(spec, fam, ck.keys) or (
        f"config.json and the weights disagree: a {fam.name} model with this config has other tensors; "
        "mptc imports a checkpoint whole or not at all")
    raise MptcError(f"{ck.where}: {'; '.join(problems)}", hint=hint)


def _missing_name(ck: Checkpoint, fam: Family, name: str, shape: tuple[int, ...]) -> str:
    """The checkpoint name to report for a tensor not found: for experts, the first expert missing."""
    m, first = fam.weights[_template(name)[0]], _hf_names(fam, name)[0]
    if not m.experts:
        return first
    names = _hf_names(fam, name)
    e = next((e for e in range(shape[0]) if ck.find(tuple(n.replace("{e}", str(e)) for n in names), fam.prefix)
              is None), 0)
    return first.replace("{e}", str(e))


def _state(spec: S.Spec, fam: Family, ck: Checkpoint) -> dict[str, Tensor]:
    """The mptc state dict of a spec, read from a checkpoint one tensor at a time, every tensor accounted for."""
    low = lower(spec, "meta")  # names and shapes only
    shapes = {n: tuple(low.root.get_parameter(n).shape) for n in low.params}
    blocks: dict[str, dict[int, int]] = {}  # fused checkpoint tensor → its blocks' sizes by part
    for n, shape in shapes.items():
        m = fam.weights[_template(n)[0]]
        while m is not None:
            if m.part is not None:
                sizes = blocks.setdefault(_hf_names(fam, n, m)[0], {})
                sizes[m.part] = shape[m.dim]
                if m.interleave:  # the head size the blocks alternate by
                    sizes[-1] = spec.layers[_template(n)[1]].attention.head_dim
            m = m.alt
    state: dict[str, Tensor] = {}
    missing: dict[str, list[str]] = {}
    for n in low.params:
        t = _fetch(ck, fam, n, shapes[n], blocks)
        if t is None:
            missing.setdefault(_missing_name(ck, fam, n, shapes[n]), []).append(n)
        else:
            state[n] = t
    _account(spec, fam, ck, missing)
    return state


def read_config(d: Path) -> Config:
    p = d / "config.json"
    if not d.is_dir():
        raise MptcError(f"no such directory: {d}")
    if not p.is_file():
        raise MptcError(f"{d} has no config.json", hint="a Hugging Face model dir holds config.json and weights")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MptcError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise MptcError(f"{p} is not a JSON object", hint='config.json holds {"model_type": …, …}')
    return cfg


def _read_dir(d: Path) -> tuple[S.Spec, dict[str, Tensor]]:
    cfg = read_config(d)
    spec = spec_from_config(cfg)  # refusals come before any weights are read
    with open_checkpoint(d) as ck:
        return spec, _state(spec, _family(cfg), ck)


# --- checking an import against transformers ------------------------------------------------------------

CHECK_TOL = 1e-4  # on |mptc − transformers| / max(1, |transformers|), real positions


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MptcError('checking an import against transformers needs it: pip install "mptc[hf]"') from None
    return transformers


def _probe(spec: S.Spec) -> tuple[dict[str, Tensor], Tensor | None]:
    """A fixed batch: 2 images, or 2 × 12 token ids with row 1 right-padded; and the mask of real positions."""
    g = torch.Generator().manual_seed(0)
    if spec.patches is not None:
        p = spec.patches
        return {"pixel_values": torch.randn(2, p.channels, p.image, p.image, generator=g)}, None
    t = min(12, spec.context or 12)
    ids = torch.randint(0, spec.vocab, (2, t), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, t // 2 + 1:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if spec.embed.segments:
        inputs["token_type_ids"] = (torch.arange(t) >= t // 3).long().expand(2, t) % spec.embed.segments
    return inputs, mask.bool()


def _get_pad(cfg: Config) -> int:
    pad = cfg.get("pad_token_id", 1)
    return pad if isinstance(pad, int) else 1


def _pad_probe(inputs: dict[str, Tensor], valid: Tensor, pad: int, vocab: int) -> None:
    """RoBERTa numbers positions from the ids, and decoder classifiers read the last token that is not the pad id:
    padding holds the pad id, and no real token may (see docs/hf.md)."""
    ids = inputs["input_ids"]  # (B, T)
    ids[valid & (ids == pad)] = (pad + 1) % vocab
    ids[~valid] = pad


def _reference(hf_dir: Path, arch: str) -> Any:
    """The transformers model of a checkpoint dir, float32, eager attention, local files only."""
    tf = _transformers()
    cls = getattr(tf, arch, None)
    if cls is None:
        raise MptcError(f"transformers {tf.__version__} has no class {arch}")
    dtype = {"dtype": torch.float32} if int(tf.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        return cls.from_pretrained(hf_dir, local_files_only=True, attn_implementation="eager", **dtype).eval()
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the check cannot run
        raise MptcError(f"transformers could not load {hf_dir} as {arch}: {e}") from None
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()


def _reference_output(r: Any) -> Tensor:
    """transformers' output as mptc gives it: logits, start and end logits as (B, T, 2), or the hidden states."""
    if getattr(r, "start_logits", None) is not None:
        return torch.stack([r.start_logits, r.end_logits], dim=-1)
    return r.logits if getattr(r, "logits", None) is not None else r.last_hidden_state


def check_hf(hf_dir: str | os.PathLike, model_dir: str | os.PathLike, hint: str | None = None) -> float:
    """The max error of an imported model dir against transformers on a fixed padded probe batch.

    The error is max |mptc − transformers| / max(1, |transformers|) over real (unpadded) positions; above
    CHECK_TOL it raises MptcError (with `hint`).
    """
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    arch = (cfg.get("architectures") or [next(iter(_family(cfg).heads))])[0]
    model = load_model(model_dir).eval()
    spec = spec_of(model)
    inputs, valid = _probe(spec)
    if any(m.offset for m in _family(cfg).weights.values()) or spec.head.pool == "last":
        _pad_probe(inputs, valid, _get_pad(cfg), spec.vocab)
    ref_model = _reference(hf_dir, arch)
    with torch.no_grad():
        out, r = model(**inputs), ref_model(**inputs)
    ref = _reference_output(r)
    if valid is not None and out.dim() == 3:  # per token: real positions only, (N, V)
        out, ref = out[valid], ref[valid]
    if out.shape != ref.shape:
        raise MptcError(f"check failed: the import gives outputs of shape {tuple(out.shape)}, transformers' {arch} "
                        f"{tuple(ref.shape)}")
    err = ((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1)).max().item()
    if not err <= CHECK_TOL:  # NaN fails too
        raise MptcError(f"check failed: the import differs from transformers' {arch}: max error {err:.2e} relative "
                        f"to max(1, |output|) > {CHECK_TOL:g}", hint=hint)
    return err


TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _special_tokens(d: Path) -> dict[str, int | list[int]]:
    """bos, eos and pad ids from config.json, overridden by generation_config.json where it sets them."""
    out: dict[str, int | list[int]] = {}
    gen = d / "generation_config.json"
    try:
        generation = json.loads(gen.read_text()) if gen.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MptcError(f"{gen} is not valid JSON: {e}") from None
    for cfg in (read_config(d), generation):
        for k in TOKEN_KEYS:
            v = cfg.get(k) if isinstance(cfg, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, list) and v and
                                                                  all(isinstance(x, int) for x in v)):
                out[k] = v
    return out


def special_tokens(model_dir: str | os.PathLike) -> dict[str, int | list[int]]:
    """The bos / eos / pad token ids an `import_hf` model dir carries from its checkpoint (absent ones left out)."""
    return stored_tokens(model_dir)


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, check: bool = False,
              log: Callable[[str], None] | None = None) -> Path:
    """Convert a Hugging Face model dir to an mptc model dir (model.mpt + weights.safetensors), atomically.

    check: before the dir is moved into place, compare it with transformers on a probe batch (`check_hf`);
    `log` gets the measured error. The checkpoint's bos / eos / pad ids travel in the weights' metadata
    (`special_tokens`).
    """
    if check:
        _transformers()  # before any work
    spec, state = _read_dir(Path(hf_dir))
    tokens = {f"hf.{k}": json.dumps(v) for k, v in _special_tokens(Path(hf_dir)).items()}
    with atomic_dir(out_dir, kind="model") as tmp:
        (tmp / SPEC_FILE).write_text(str(spec))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mptc.spec": spec.name,
                                                             "mptc.source": "huggingface", **tokens})
        del state
        err = check_hf(hf_dir, tmp, hint=f"nothing was written to {out_dir}") if check else None
    if err is not None and log is not None:
        log(f"check: max error {err:.2e} relative to max(1, |output|) (tolerance {CHECK_TOL:g}) against transformers")
    return Path(out_dir)


def from_hf(src: Any, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> fx.GraphModule:
    """A GraphModule (eval mode, like `from_pretrained`) from a Hugging Face model dir or a transformers model.

    For a model object, its config and `state_dict()` are used and its class picks the head.
    """
    if isinstance(src, (str, os.PathLike)):
        spec, state = _read_dir(Path(src))
    elif hasattr(src, "config") and hasattr(src, "state_dict"):
        cfg, arch = src.config.to_dict(), type(src).__name__
        spec = spec_from_config(cfg, arch)
        state = _state(spec, _family(cfg), _checkpoint_of_state(src.state_dict(), arch))
    else:
        raise MptcError(f"from_hf needs a model dir or a transformers model, got {type(src).__name__}")
    return build(spec, weights=state, device=device, dtype=dtype).eval()
