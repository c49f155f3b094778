"""An ONNX model whose weights are made as it is written: the graph as protobuf, the initializers as `Tensor`s.

`LazyModel.proto` is an `onnx.ModelProto` whose initializers carry only name, dims and element type;
`tensors` holds, by name and in the same order, what each one is made from. Passes (`mptc.quantize`) edit the
protobuf and the table together; `save` writes one tensor at a time, so peak memory stays near the largest
weight whatever the model's size.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx

from .tensors import Array, Stored, Tensor

__all__ = ["INLINE_BYTES", "LazyModel"]

INLINE_BYTES = 256  # with external data, tensors under this stay inside the graph (shapes, axes: ORT reads them)


class LazyModel:
    """`proto` (initializers without data) and `tensors` (name → what each initializer is made from)."""

    def __init__(self, proto: onnx.ModelProto, tensors: dict[str, Tensor]):
        self.proto, self.tensors = proto, tensors

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto) -> LazyModel:
        """A ModelProto with its weights inside (a traced export): each initializer becomes a `Stored` tensor."""
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(proto)
        tensors = {t.name: Stored(t) for t in proto.graph.initializer}
        del skeleton.graph.initializer[:]
        for t in tensors.values():
            skeleton.graph.initializer.add(name=t.proto.name, dims=t.shape, data_type=t.dtype)
        return cls(skeleton, tensors)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def add_initializer(self, name: str, tensor: Tensor, before: str | None = None) -> None:
        """Register `tensor` as initializer `name` (at the end, or just before initializer `before`)."""
        if name in self.tensors:
            raise ValueError(f"initializer {name} already exists")
        inits = self.proto.graph.initializer
        entry = onnx.TensorProto(name=name, dims=tensor.shape, data_type=tensor.dtype)
        at = next((i for i, t in enumerate(inits) if t.name == before), len(inits)) if before else len(inits)
        inits.insert(at, entry)
        self.tensors[name] = tensor

    def remove_initializer(self, name: str) -> None:
        inits = self.proto.graph.initializer
        at = next(i for i, t in enumerate(inits) if t.name == name)
        del inits[at]
        del self.tensors[name]

    # --- whole protos ---
    def to_proto(self) -> onnx.ModelProto:
        """The model with every weight inside (made now: for small models and tests)."""
        out = self._copy()
        for t in out.graph.initializer:
            t.raw_data = self.tensors[t.name].tobytes()
        return out

    def reference_proto(self, location: str) -> tuple[onnx.ModelProto, int]:
        """The model with every initializer as an external reference into `location` but the small arrays already
        in memory (constants), and the bytes that file would hold: nothing is made (no weight read or quantized)."""
        out = self._copy()
        return out, sum(n for _, n in self._layout(out, location, make=False))

    def _copy(self) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        return out

    def _layout(self, proto: onnx.ModelProto, location: str, make: bool = True) -> Iterator[tuple[Tensor, int]]:
        """Fill `proto`'s initializers: small ones inline (only those held as arrays unless `make`), the others as
        references at consecutive offsets; yields (tensor, length) of each external one, in file order."""
        offset = 0
        for entry in proto.graph.initializer:
            t = self.tensors[entry.name]
            n = t.nbytes
            if n < INLINE_BYTES and (make or isinstance(t, Array)):
                entry.raw_data = t.tobytes()
                continue
            entry.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", n)):
                entry.external_data.add(key=key, value=str(value))
            yield t, n
            offset += n

    # --- writing ---
    def save(self, path: str | os.PathLike, external_data: bool) -> None:
        """Write `path` (with the weights in `path.data` if `external_data`), one tensor at a time."""
        p = Path(path)
        if not external_data:
            self._save_inline(p)
            return
        data = p.with_name(p.name + ".data")
        proto = self._copy()
        with open(data, "wb") as f, Background(f) as out:
            for t, n in self._layout(proto, data.name):
                _write(out, t, n)
        p.write_bytes(proto.SerializeToString())

    def _save_inline(self, path: Path) -> None:
        """One `.onnx` file with the weights inside, without holding them serialised at once.

        Protobuf merges repeated occurrences of a message field, so the file is the model without
        initializers followed by one `graph { initializer }` record per weight, each made, written and
        dropped in turn (a transposed or cast weight exists only while it is written)."""
        proto = self._copy()
        entries = list(proto.graph.initializer)
        del proto.graph.initializer[:]
        graph = proto.graph.SerializeToString()
        proto.ClearField("graph")
        with open(path, "wb") as raw, Background(raw) as f:
            f.write(proto.SerializeToString())
            f.write(_key(GRAPH_FIELD, len(graph)))
            f.write(graph)
            for entry in entries:
                t = self.tensors[entry.name]
                head = entry.SerializeToString()
                n = t.nbytes
                raw = _key(RAW_DATA_FIELD, n)
                size = len(head) + len(raw) + n
                f.write(_key(GRAPH_FIELD, len(_key(INITIALIZER_FIELD, size)) + size))
                f.write(_key(INITIALIZER_FIELD, size))
                f.write(head)
                f.write(raw)
                _write(f, t, n)

    def check(self) -> None:
        """`onnx.checker` (full check: ops, types, shape inference) with every large weight as a reference into a
        sparse stand-in file, so a 500 MB model is checked without being made. Raises what the checker raises."""
        proto, size = self.reference_proto("weights.data")
        with tempfile.TemporaryDirectory() as d:  # the checker looks at the data file: a sparse one stands in
            with open(Path(d) / "weights.data", "wb") as f:
                f.truncate(size)
            path = Path(d) / "graph.onnx"
            path.write_bytes(proto.SerializeToString())
            onnx.checker.check_model(str(path), full_check=True)


def _write(f: Background, t: Tensor, n: int) -> None:
    at = f.tell()
    t.tofile(f)
    if f.tell() - at != n:
        raise AssertionError(f"a tensor of {n} bytes wrote {f.tell() - at}")


class Background:
    """A file written by a background thread: `write` queues a block and returns, so the next block (a transposed
    strip) is made while the disk takes this one (the write releases the GIL). A block must stay unchanged until
    written: the queue holds one, and the strips of `mptc.emit.tensors` rotate three buffers, so none is
    overwritten early. Leaving the `with` block waits for the writes and raises the first error."""

    def __init__(self, f: BinaryIO):
        self.f, self.n, self.error = f, 0, None
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, name="mptc-writer", daemon=True)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error

    def _run(self) -> None:
        while (block := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.f.write(block)
                except BaseException as e:  # raised in the caller's thread: next write, or on leaving
                    self.error = e

    def write(self, block) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(block)
        self.n += memoryview(block).nbytes

    def tell(self) -> int:
        return self.n


# --- protobuf records written by hand (the inline writer) ---
def _key(field: int, size: int) -> bytes:
    """The protobuf key and length of a length-delimited field."""
    return _varint(field << 3 | 2) + _varint(size)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, .raw_data
