"""Guarded, atomic outputs.

Every output is built beside its destination under a temporary name that records the writing process
(`.NAME.mptc-<pid>.tmp`), then takes the destination's place in one step: a failed or killed command
leaves the previous output as it was. Temporaries of processes that are gone are removed by the next
write of the same destination.

Before anything is built, `check_output` decides whether the destination may be replaced: an earlier
output of the same kind (a model dir, an ONNX file, …) is; anything else would lose data and needs
`force`; the command's inputs (and the dirs that hold them), the current directory and its parents, the
root and the home directory never are. The command line sets the policy (`--force`, the inputs) once,
with `output_policy`; library calls get the defaults (no force, no inputs).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
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


def _kind(kind: str | Kind | None, dest: Path, is_dir: bool) -> Kind:
    if isinstance(kind, Kind):
        return kind
    if kind is None:
        kind = "model" if is_dir else _KIND_BY_SUFFIX.get(dest.suffix.lower(), "file")
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown output kind {kind!r}; known: {', '.join(KINDS)}") from None


# --- the policy: --force and the command's inputs ---------------------------------------------

LIBRARY_HINT = ("choose another path, or replace it anyway inside `with mptc.atomic.output_policy(force=True):`")
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


def _lost(dest: Path, k: Kind) -> tuple[list[str], bool]:
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
    k = _kind(kind, dest, is_dir)
    why = _never(_resolve(dest), policy)
    if why is not None:
        raise MptcError(f"refusing to write {dest}: it is {why}",
                        hint="choose another output path; --force does not override this")
    if policy.force or _resolve(dest) in policy.in_place:
        return
    lost, alike = _lost(dest, k)
    if lost:
        head = f"{dest} holds files that are no part of {k.what}" if alike else f"{dest} exists and is not {k.what}"
        raise MptcError(f"{head}: replacing it would delete {_listing(lost)}", hint=policy.hint)


# --- errors while writing ----------------------------------------------------------------------

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_HINTS = {errno.ENOSPC: "free some space, or write the output to another disk",
          errno.EDQUOT: "free some space, or write the output to another disk",
          errno.EROFS: "write the output somewhere writable",
          errno.EACCES: "write the output somewhere you may write",
          errno.EPERM: "write the output somewhere you may write"}


def _disk_full(where: Path) -> bool:
    try:
        st = os.statvfs(where)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < 64 << 10


def _errno_of(e: BaseException, where: Path) -> int | None:
    """The write error behind `e`, also where a writer (safetensors, torch.save) lost the errno."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno if e.errno in WRITE_ERRNOS else None
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m and int(m.group(1)) in WRITE_ERRNOS:
        return int(m.group(1))
    if "No space left on device" in str(e) or _disk_full(where):
        return errno.ENOSPC
    return None


@contextmanager
def _write_errors(dest: Path) -> Iterator[None]:
    """Turn a write failure (no space, read-only file system, no permission) into an MptcError."""
    try:
        yield
    except MptcError:
        raise
    except Exception as e:
        code = _errno_of(e, dest.parent if dest.parent.exists() else Path("."))
        if code is None:
            raise
        raise MptcError(f"{os.strerror(code).lower()} while writing {dest}", hint=_HINTS.get(code)) from None


# --- temporaries -------------------------------------------------------------------------------

_TEMP = re.compile(r"(\d+)(?:-\d+)?\.(tmp|old)(\..*)?")


def _temp_path(dest: Path, tag: str = "tmp", suffix: str = "") -> Path:
    """A free name `.NAME.mptc-<pid>[-n].<tag><suffix>` beside `dest`."""
    base = f".{dest.name}.mptc-{os.getpid()}"
    n = 0
    while True:
        p = dest.with_name(f"{base}{f'-{n}' if n else ''}.{tag}{suffix}")
        if not os.path.lexists(p):
            return p
        n += 1


def _make_temp(dest: Path, is_dir: bool, suffix: str = "") -> Path:
    while True:
        p = _temp_path(dest, "tmp", suffix)
        try:
            if is_dir:
                os.mkdir(p)
            else:
                os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return p
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def temporaries(dest: str | os.PathLike) -> list[tuple[Path, int, str]]:
    """The temporaries of `dest` in its folder: (path, pid of the writer, "tmp" or "old")."""
    dest = Path(dest)
    head = f".{dest.name}.mptc-"
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    out = []
    for name in names:
        m = _TEMP.fullmatch(name[len(head):]) if name.startswith(head) else None
        if m:
            out.append((dest.with_name(name), int(m.group(1)), m.group(2)))
    return out


def _tidy(dest: Path, keep: Iterable[Path] = ()) -> None:
    """Remove the temporaries of `dest` whose writer is gone (never `keep`); where a replace was killed
    between its two renames (`dest` missing, its aside copy there), put the aside copy back."""
    keep = set(keep)
    stale = [(p, tag) for p, pid, tag in temporaries(dest) if not _alive(pid) and p not in keep]
    asides = [p for p, tag in stale if tag == "old"]
    if asides and not os.path.lexists(dest):
        last = max(asides, key=lambda p: p.lstat().st_mtime)
        os.rename(last, dest)
        stale = [(p, tag) for p, tag in stale if p != last]
    for p, _ in stale:
        try:
            _remove(p)
        except OSError:
            pass


# --- filesystem steps (each one atomic) --------------------------------------------------------

AT_FDCWD, RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename(a: Path, b: Path) -> None:
    os.rename(a, b)


def _replace(a: Path, b: Path) -> None:
    os.replace(a, b)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    """A second name for `src` (a hard link; a copy where links are not supported)."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        shutil.copyfile(src, dst)


def _write_bytes(dest: Path, data: bytes) -> None:
    """Replace `dest` by a file holding `data`, in one rename."""
    tmp = _make_temp(dest, is_dir=False)
    try:
        tmp.write_bytes(data)
        _replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _swap_into(new: Path, dest: Path) -> Path | None:
    """Put `new` at `dest`; return the path now holding what was there (None if nothing was).
    One step with RENAME_EXCHANGE; else two renames, which `_tidy` recovers from if cut between."""
    if not os.path.lexists(dest):
        _rename(new, dest)
        return None
    if _exchange(new, dest):
        return new
    aside = _temp_path(dest, "old")
    _rename(dest, aside)
    _rename(new, dest)
    return aside


# --- pending replacements ----------------------------------------------------------------------


@dataclass
class _Replace:
    """A built temporary (file or dir) waiting to take `dest`'s place."""

    dest: Path
    tmp: Path
    old: Path | None = None
    done: bool = False

    def commit(self, keep_old: bool) -> None:
        d = self.dest
        if self.tmp.is_dir() or (d.is_dir() and not d.is_symlink()):
            self.old = _swap_into(self.tmp, d)
        else:
            if keep_old and os.path.lexists(d):
                self.old = _temp_path(d, "old")
                _link(d, self.old)
            _replace(self.tmp, d)
        self.done = True

    def undo(self) -> None:
        if not self.done:
            return
        if self.old is None:
            _remove(self.dest)
        elif self.old.is_dir() or self.dest.is_dir():
            new = _swap_into(self.old, self.dest)
            if new is not None:
                _remove(new)
        else:
            _replace(self.old, self.dest)
        self.old, self.done = None, False

    def finish(self) -> None:
        if self.old is not None:
            _remove(self.old)

    def discard(self) -> None:
        _remove(self.tmp)
        if self.old is not None and not self.done:  # the link made for an undo that is not needed
            _remove(self.old)


_GROUP: ContextVar[list | None] = ContextVar("mptc_output_group", default=None)


def _commit_all(pending: list, keep_old: bool) -> None:
    """Move every pending output into place; if one fails, put back those already moved."""
    done = []
    try:
        for p in pending:
            done.append(p)
            with _write_errors(p.dest):
                p.commit(keep_old)
    except BaseException:
        for p in reversed(done):
            try:
                p.undo()
            except OSError:
                pass
        for p in pending:
            p.discard()
        raise
    for p in pending:
        p.finish()


def _land(pending) -> None:
    group = _GROUP.get()
    if group is not None:
        group.append(pending)
    else:
        _commit_all([pending], keep_old=False)


@contextmanager
def atomic_group() -> Iterator[None]:
    """The outputs written inside the block land together when it succeeds, and none otherwise."""
    pending: list = []
    token = _GROUP.set(pending)
    try:
        yield
    except BaseException:
        for p in pending:
            p.discard()
        raise
    finally:
        _GROUP.reset(token)
    _commit_all(pending, keep_old=True)


def _start(dest: Path, kind: Kind | str | None, is_dir: bool, keep: Iterable[Path] = ()) -> None:
    check_output(dest, kind, is_dir=is_dir)
    with _write_errors(dest):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise MptcError(f"cannot write {dest}: a file is in the way of its folder {dest.parent}",
                            hint="choose another output path") from None
        _tidy(dest, keep)


@contextmanager
def _built(dest: Path, tmp: Path) -> Iterator[None]:
    """Remove `tmp` if the body fails; turn its write errors into MptcErrors."""
    try:
        with _write_errors(dest):
            yield
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, kind: str | Kind | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.
    kind: what `path` may replace (default: from its suffix, see `check_output`)."""
    dest = Path(path)
    _start(dest, kind, is_dir=False)
    with _write_errors(dest):
        tmp = _make_temp(dest, is_dir=False, suffix=dest.suffix)
    with _built(dest, tmp):
        yield tmp
    _land(_Replace(dest, tmp))


@contextmanager
def atomic_dir(path: str | os.PathLike, kind: str | Kind | None = "model") -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes the place of `path` in one step."""
    dest = Path(path)
    _start(dest, kind, is_dir=True)
    with _write_errors(dest):
        tmp = _make_temp(dest, is_dir=True)
    with _built(dest, tmp):
        yield tmp
    _land(_Replace(dest, tmp))


# --- ONNX: a graph file and its external data --------------------------------------------------


def _tensors(graph) -> Iterator:
    """Every TensorProto in an ONNX graph, subgraphs included."""
    yield from graph.initializer
    for s in graph.sparse_initializer:
        yield s.values
        yield s.indices
    for node in graph.node:
        yield from _attr_tensors(node)


def _attr_tensors(node) -> Iterator:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("g"):
            yield from _tensors(a.g)
        for g in a.graphs:
            yield from _tensors(g)


def _model_tensors(model) -> Iterator:
    yield from _tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from _attr_tensors(node)


def _locations(t) -> list:
    import onnx

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return []
    return [e for e in t.external_data if e.key == "location"]


def onnx_data_files(path: str | os.PathLike) -> set[str]:
    """The external data files an ONNX graph reads, as written in it (relative to its folder);
    empty for a graph with its weights inside, or a file that is not ONNX."""
    import onnx

    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size > 256 << 20:  # weights inside: no external data
            return set()
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # not (readable) ONNX: nothing it reads
        return set()
    return {e.value for t in _model_tensors(model) for e in _locations(t)}


def _relocated(graph: bytes, names: dict[str, str]) -> bytes:
    """The ONNX graph with its external data locations renamed."""
    import onnx

    model = onnx.load_model_from_string(graph)
    for t in _model_tensors(model):
        for e in _locations(t):
            e.value = names.get(e.value, e.value)
    return model.SerializeToString()


def _plain(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


@dataclass
class _OnnxReplace:
    """A built ONNX graph (and its external data) waiting to take `dest`'s place.

    The graph file is the commit point: at every moment `dest` is a whole graph whose data is there.
    Where the old graph reads `dest.data`, which the new data replaces, it is first pointed at a second
    link to its data; the files the old graph read that the new one does not are removed at the end."""

    dest: Path
    tmp: Path  # the graph, already reading `data`
    tmp_data: Path | None
    old_refs: set[str]
    backup: Path | None = None
    aside: Path | None = None
    orig: bytes = b""
    via_aside: bytes = b""
    data_moved: bool = False
    done: bool = False
    data: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data = self.dest.with_name(self.dest.name + ".data")

    def commit(self, keep_old: bool) -> None:
        d, data = self.dest, self.data
        if keep_old and os.path.lexists(d):
            self.backup = _temp_path(d, "old")
            _link(d, self.backup)
        if self.tmp_data is not None and data.name in self.old_refs:
            self.aside = _temp_path(data, "old")
            _link(data, self.aside)
            self.orig = d.read_bytes()
            self.via_aside = _relocated(self.orig, {data.name: self.aside.name})
            _write_bytes(d, self.via_aside)
        if self.tmp_data is not None:
            _replace(self.tmp_data, data)
            self.data_moved = True
        _replace(self.tmp, d)
        self.done = True

    def undo(self) -> None:
        d, data = self.dest, self.data
        if self.done:
            if self.aside is not None:
                _write_bytes(d, self.via_aside)
            elif self.backup is not None:
                _replace(self.backup, d)
                self.backup = None
            else:
                _remove(d)
        if self.aside is not None:  # `d` reads the aside link: the old data back under its name, then the old graph
            t = _temp_path(data, "tmp")
            _link(self.aside, t)
            _replace(t, data)
            _write_bytes(d, self.orig)
            _remove(self.aside)
        elif self.data_moved:
            _remove(data)
        self.done = self.data_moved = False
        self.aside = None

    def finish(self) -> None:
        new = self.data.name if self.tmp_data is not None else None
        gone = (self.old_refs | ({self.aside.name} if self.aside else set())) - {new}
        for name in gone:
            if _plain(name):
                _remove(self.dest.with_name(name))
        if self.backup is not None:
            _remove(self.backup)

    def discard(self) -> None:
        for p in (self.tmp, self.tmp_data, self.backup):
            if p is not None:
                _remove(p)


def check_onnx_output(path: str | os.PathLike, external: bool) -> set[str]:
    """`check_output` for an ONNX file, and, with external data, for `path.data` beside it: replaced only
    where the current graph reads it. Returns the data files the current graph reads."""
    dest = Path(path)
    data = dest.with_name(dest.name + ".data")
    check_output(dest, "onnx")
    old_refs = {r for r in onnx_data_files(dest) if _plain(r)}
    # a replace cut short may leave the graph reading an aside link of `data`: then `data` is ours too
    ours = {data.name} | {p.name for p, _, _ in temporaries(data)}
    if external and not old_refs & ours and not current_policy().force:
        lost, _ = _lost(data, _kind("file", data, False))
        if lost:
            raise MptcError(f"{data} exists and {dest.name} does not read it: replacing it would delete {lost[0]}",
                            hint=current_policy().hint)
    return old_refs


@contextmanager
def atomic_onnx(path: str | os.PathLike, external: bool = False) -> Iterator[Path]:
    """Yield a temporary `.onnx` path beside `path` for an ONNX writer (which may put its weights in
    `<tmp>.data`); on success the graph lands at `path`, reading `path.data`, both together.
    external: whether the weights go to external data (decides whether `path.data` is replaced)."""
    dest = Path(path)
    data = dest.with_name(dest.name + ".data")
    old_refs = check_onnx_output(dest, external)
    keep = [dest.with_name(r) for r in old_refs]
    _start(dest, "onnx", is_dir=False, keep=keep)
    with _write_errors(dest):
        _tidy(data, keep)
        tmp = _make_temp(dest, is_dir=False, suffix=".onnx")
    try:
        with _write_errors(dest):
            yield tmp
            refs = onnx_data_files(tmp)
            if len(refs) > 1 or any(not _plain(r) for r in refs):
                raise MptcError(f"the ONNX writer spread the weights of {dest} over {', '.join(sorted(refs))}")
            tmp_data = tmp.with_name(refs.pop()) if refs else None
            if tmp_data is not None:
                tmp.write_bytes(_relocated(tmp.read_bytes(), {tmp_data.name: data.name}))
    except BaseException:
        _remove(tmp)
        _remove(tmp.with_name(tmp.name + ".data"))
        raise
    _land(_OnnxReplace(dest, tmp, tmp_data, old_refs))
