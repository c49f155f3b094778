"""Which destinations an output may replace.

Before anything is built, `check_output` decides whether the destination may be replaced: an earlier
output of the same kind (a model dir, an ONNX file, …) is; anything else would lose data and needs
`force`; the command's inputs (and the dirs that hold them), the current directory and its parents, the
root and the home directory never are. The command line sets the policy (`--force`, the inputs) once,
with `output_policy`; library calls get the defaults (no force, no inputs). `mptc.atomic` asks before
every write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from .errors import MptcError

# --- kinds of output ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of output: which existing destination an output of this kind may replace."""

    name: str
    what: str  # "a model dir", for messages
    is_dir: bool
    files: frozenset[str] = frozenset()  # dir kinds: the files such a dir may hold
    required: frozenset[str] = frozenset()  # dir kinds: the files it must hold
    matches: Callable[[Path], bool] | None = None  # file kinds: whether an existing file is one


def _suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda p: p.suffix.lower() in suffixes


def _magic(prefix: bytes) -> Callable[[Path], bool]:
    def check(p: Path) -> bool:
        with open(p, "rb") as f:
            return f.read(len(prefix)) == prefix
    return check


def _search_json(p: Path) -> bool:
    if p.stat().st_size > 64 << 20:
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"budget", "heuristic", "front"} <= set(data)


MODEL_FILES = frozenset({"model.mpt", "weights.safetensors", "report.json", "trainer.pt", "log.json",
                         "tokenizer.json"})
KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Make a kind of output known to `atomic_dir`/`atomic_file` (by its name)."""
    KINDS[kind.name] = kind
    return kind


for _k in (
    Kind("model", "a model dir (model.mpt, weights.safetensors)", True, MODEL_FILES,
         frozenset({"model.mpt", "weights.safetensors"})),
    Kind("hf", "a Hugging Face checkpoint written by mptc (config.json, model.safetensors)", True,
         frozenset({"config.json", "model.safetensors"}), frozenset({"config.json", "model.safetensors"})),
    Kind("deploy", "a deploy dir written by `mptc deploy` (model.onnx, deploy.json)", True,
         frozenset({"model.onnx", "model.onnx.data", "genai_config.json", "config.json", "generation_config.json",
                    "deploy.json"}), frozenset({"model.onnx", "deploy.json"})),
    Kind("onnx", "an ONNX file", False, matches=_suffix(".onnx")),
    Kind("pt2", "a .pt2 program", False, matches=_suffix(".pt2")),
    Kind("array", "a NumPy array file", False, matches=_magic(b"\x93NUMPY")),
    Kind("png", "a PNG image", False, matches=_magic(b"\x89PNG\r\n\x1a\n")),
    Kind("search", "an `mptc search` JSON file", False, matches=_search_json),
    Kind("spec", "a .mpt spec file", False, matches=_suffix(".mpt")),
    Kind("file", "an output of this command", False, matches=lambda p: False),
):
    register_kind(_k)

_KIND_BY_SUFFIX = {".onnx": "onnx", ".pt2": "pt2", ".npy": "array", ".png": "png", ".mpt": "spec"}


def kind_of(kind: str | Kind | None, dest: Path, is_dir: bool) -> Kind:
    if isinstance(kind, Kind):
        return kind
    if kind is None:
        kind = "model" if is_dir else _KIND_BY_SUFFIX.get(dest.suffix.lower(), "file")
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)}") from None


# --- the policy: --force and the command's inputs ---------------------------------------------

LIBRARY_HINT = ("choose another path, or replace it anyway inside `with mptc.outputs.output_policy(force=True):`")
CLI_HINT = "choose another output path (-o), or pass --force to replace it"


@dataclass(frozen=True)
class OutputPolicy:
    """What the running command allows: `force` replaces foreign destinations; `inputs` are never
    replaced (nor a dir that holds one, nor written into); `in_place` inputs may be replaced by
    themselves (`mptc train --resume DIR -o DIR`, `mptc fmt --write`)."""

    force: bool = False
    inputs: tuple[tuple[Path, str], ...] = ()  # (resolved, as given)
    in_place: tuple[Path, ...] = ()
    hint: str = LIBRARY_HINT


_POLICY: ContextVar[OutputPolicy | None] = ContextVar("mptc_output_policy", default=None)


def current_policy() -> OutputPolicy:
    """The policy `output_policy` set, else the library default (no force, no inputs)."""
    return _POLICY.get() or OutputPolicy()


def _resolve(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


@contextmanager
def output_policy(force: bool = False, inputs: Iterable[str | os.PathLike] = (),
                  in_place: Iterable[str | os.PathLike] = (), hint: str | None = None) -> Iterator[OutputPolicy]:
    """Set the output policy for the writes inside the block."""
    policy = OutputPolicy(force, tuple((_resolve(p), str(p)) for p in inputs),
                          tuple(_resolve(p) for p in in_place), hint or LIBRARY_HINT)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def _never(p: Path, policy: OutputPolicy) -> str | None:
    """Why `p` (resolved) may never be replaced, or None."""
    if p == Path(p.anchor):
        return "the root directory"
    cwd = Path.cwd().resolve()
    if p == cwd:
        return "the current directory"
    if p in cwd.parents:
        return f"a parent of the current directory {cwd}"
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):
        home = None
    if home is not None and (p == home or p in home.parents):
        return "the home directory" if p == home else f"a parent of the home directory {home}"
    for inp, shown in policy.inputs:
        if p == inp and p not in policy.in_place:
            return f"an input of this command ({shown})"
        if p in inp.parents:
            return f"a directory that holds an input of this command ({shown})"
        if inp in p.parents:
            return f"inside an input of this command ({shown})"
    return None


def _listing(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def would_lose(dest: Path, k: Kind) -> tuple[list[str], bool]:
    """What replacing `dest` with an output of kind `k` would delete that is no part of such an
    output ([] when it may be replaced), and whether `dest` looks like one at all."""
    if not os.path.lexists(dest):
        return [], True
    if dest.is_symlink():
        return [f"the symbolic link {dest}"], False
    if dest.is_dir():
        entries = sorted(os.listdir(dest))
        if not entries:
            return [], True
        if not k.is_dir or not k.required <= set(entries):
            return [str(dest / e) + ("/" if (dest / e).is_dir() else "") for e in entries], False
        odd = [e for e in entries if e not in k.files or (dest / e).is_symlink() or not (dest / e).is_file()]
        return [str(dest / e) + ("/" if (dest / e).is_dir() else "") for e in odd], True
    if not dest.is_file():
        return [f"{dest} (not a regular file)"], False
    if dest.stat().st_size == 0:
        return [], True
    if k.is_dir or not k.matches(dest):
        return [f"the file {dest}"], False
    return [], True


def check_output(dest: str | os.PathLike, kind: str | Kind | None = None, *, is_dir: bool = False,
                 policy: OutputPolicy | None = None) -> None:
    """Raise MptcError unless `dest` may be replaced by an output of `kind`, given the policy (by default
    the one `output_policy` set): never an input, the cwd, its parents, the root or the home dir; an
    existing destination only when it is an output of the same kind, or with force."""
    policy = policy or current_policy()
    dest = Path(dest)
    k = kind_of(kind, dest, is_dir)
    why = _never(_resolve(dest), policy)
    if why is not None:
        raise MptcError(f"refusing to write {dest}: it is {why}",
                        hint="choose another output path; --force does not override this")
    if policy.force or _resolve(dest) in policy.in_place:
        return
    lost, alike = would_lose(dest, k)
    if lost:
        head = f"{dest} holds files that are no part of {k.what}" if alike else f"{dest} exists and is not {k.what}"
        raise MptcError(f"{head}: replacing it would delete {_listing(lost)}", hint=policy.hint)
