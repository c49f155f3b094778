"""Atomic outputs.

Every output is built beside its destination under a temporary name that records the writing process
(`.NAME.mptc-<pid>.tmp`), then takes the destination's place in one step: a failed or killed command
leaves the previous output as it was. Temporaries of processes that are gone are removed by the next
write of the same destination. Whether a destination may be replaced at all is `mptc.outputs`'s call,
made before anything is built.
"""

from __future__ import annotations

import ctypes
import errno
import functools
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
from .outputs import Kind, check_output, current_policy, kind_of, would_lose

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
        lost, _ = would_lose(data, kind_of("file", data, False))
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
