"""Weights in, graph out: the checkpoint reader and the GraphWriter that streams initializers.

`GraphWriter` appends nodes and initializers as the builder walks the model. Every initializer is
written to the external-data file the moment it is made (or kept inline when it is tiny), so only
the tensor in hand is ever in memory. `save` then writes the .onnx itself:

  * above `threshold` bytes of weights, the tensors stay in `<file>_data` (offsets aligned to 64 KiB
    for big tensors, as onnx's own external-data writer does, so onnxruntime can map them);
  * at or below it, they are streamed back into the .onnx as inline `raw_data`. Protobuf merges
    repeated occurrences of an embedded message, so the file is the serialized graph without its
    big initializers followed by one `graph { initializer { ... } }` record per tensor, each
    copied from the data file in bounded chunks: a 1.2 GB fp16 graph is written in ~16 MB of RAM.

With `path=None` everything stays in memory (`model()`), for single-op test graphs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.files import Checkpoint
from qwen_convert.checkpoint.safetensors_io import TensorInfo, iter_row_chunks, read_row_range, read_tensor
from qwen_convert.errors import ExportError, WeightsError
from qwen_convert.formats import EXTERNAL_DATA_THRESHOLD

INLINE_BYTES = 1024  # tensors this small stay in the graph proto (onnx's size_threshold)
ALIGN_BYTES = 1 << 20  # tensors from this size on start at an ALIGNMENT boundary in the data file
ALIGNMENT = 1 << 16  # onnx's allocation granularity for mmap-able external data
COPY_CHUNK = 16 << 20
LINEAR_CHUNK = 16 << 20  # float32 bytes of one weight read at a time: memory stays flat with model width
MS_DOMAIN = "com.microsoft"
DEFAULT_OPSET = 21

# protobuf field numbers (onnx.proto3): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def elem_type(dtype) -> int:
    """numpy dtype (or an onnx TensorProto data type, passed through) -> onnx data type."""
    from onnx import helper

    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class GraphWriter:
    """Nodes and initializers of one ONNX graph, weights streamed to disk as they come.

    `initializer(name, array)` writes an array in its final dtype now; for types numpy lacks (INT4,
    UINT4) pass `onnx_type` and the logical `shape` with the packed bytes as a uint8 array.
    `initializer_chunks` streams a tensor given as row chunks (concatenated along axis 0).
    `node(op, inputs, ...)` returns its output names. `save()` writes the .onnx.
    """

    def __init__(self, path: Path | str | None = None, *, opset: int = DEFAULT_OPSET,
                 threshold: int = EXTERNAL_DATA_THRESHOLD, graph_name: str = "qwen3_reranker"):
        from onnx import GraphProto

        self.path = Path(path) if path is not None else None
        self.opset = opset
        self.threshold = threshold
        self.graph = GraphProto(name=graph_name)
        self._names: set[str] = set()
        self._counter = 0
        self._data = None  # open external data file
        self._offset = 0
        self._external: list = []  # TensorProto stubs (no data) of the tensors in the data file
        self.weight_bytes = 0  # every initializer's bytes, inline ones included
        # False: value_info keeps only fully static shapes. The symbolic tool's auto-merge can equate
        # two sequence dims it cannot tell apart (prefix.py's split attention), and onnxruntime's
        # memory planner then reuses a buffer of the wrong size; onnxruntime infers the rest at load.
        self.symbolic_value_info = True
        if self.path is not None:
            self.data_path = self.path.with_name(self.path.name + "_data")
            self.data_path.unlink(missing_ok=True)

    def __enter__(self) -> GraphWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the data file (save does; after a failure the caller's atomic OUT removes it)."""
        if self._data is not None:
            self._data.close()
            self._data = None

    # --- names ----------------------------------------------------------------------------------

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ExportError(f"graph builder: duplicate tensor name {name!r}", "this is a bug in qconv")
        self._names.add(name)
        return name

    def unique(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}_{self._counter}"

    # --- initializers ---------------------------------------------------------------------------

    def _stub(self, name: str, data_type: int, shape: Sequence[int]):
        from onnx import TensorProto

        return TensorProto(name=name, data_type=data_type, dims=[int(d) for d in shape])

    def initializer(self, name: str, array: np.ndarray, *, onnx_type: int | None = None,
                    shape: Sequence[int] | None = None) -> str:
        array = np.ascontiguousarray(array)
        data_type = elem_type(onnx_type if onnx_type is not None else array.dtype)
        shape = tuple(array.shape) if shape is None else tuple(shape)
        return self.initializer_chunks(name, data_type, shape, [array], nbytes=array.nbytes)

    def initializer_chunks(self, name: str, dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray], *,
                           nbytes: int | None = None) -> str:
        """Stream a tensor of `shape` whose data is the chunks' raw bytes in order (no reshaping or
        casting; INT4/UINT4 chunks are packed uint8, two values a byte). The byte count must match
        the shape; `nbytes`, when given, is checked too."""
        self._claim(name)
        data_type = elem_type(dtype)
        expected = -(-math.prod(shape) // 2) if _packed(data_type) else math.prod(shape) * np.dtype(_np_of(data_type)).itemsize
        if nbytes is not None and nbytes != expected:
            raise ExportError(f"graph builder: {name} given as {nbytes} bytes, its shape needs {expected}", "this is a bug in qconv")
        nbytes = expected
        tensor = self._stub(name, data_type, shape)
        if self.path is None or nbytes <= INLINE_BYTES:
            tensor.raw_data = b"".join(memoryview(np.ascontiguousarray(c)).cast("B").tobytes() for c in chunks)
            if len(tensor.raw_data) != nbytes:
                raise ExportError(f"graph builder: {name} has {len(tensor.raw_data)} bytes, expected {nbytes}", "this is a bug in qconv")
            self.weight_bytes += len(tensor.raw_data)
            self.graph.initializer.append(tensor)
            return name
        f = self._data_file()
        if nbytes >= ALIGN_BYTES:
            pad = -self._offset % ALIGNMENT
            if pad:
                f.write(b"\0" * pad)
                self._offset += pad
        start, written = self._offset, 0
        for chunk in chunks:
            view = memoryview(np.ascontiguousarray(chunk)).cast("B")
            f.write(view)
            written += len(view)
        if written != nbytes:
            raise ExportError(f"graph builder: {name} has {written} bytes, expected {nbytes}", "this is a bug in qconv")
        self._offset += written
        self.weight_bytes += written
        self._external.append((tensor, start, written))
        return name

    def initializer_transposed(self, name: str, dtype, shape: tuple[int, int], chunks: Iterable[np.ndarray]) -> str:
        """A [K, N] tensor given as row chunks of its transpose ([r, K] each, N rows in all): a
        linear weight's [out, in] rows stored as MatMul's B = W.T without ever holding W or B.
        Each chunk's columns of B are written in place (one pwrite per row of B), so memory is
        one chunk whatever the weight's size."""
        k, n = (int(d) for d in shape)
        dtype = np.dtype(dtype)
        nbytes = k * n * dtype.itemsize
        if self.path is None or nbytes <= INLINE_BYTES:
            parts = [np.asarray(c, dtype=dtype) for c in chunks]
            whole = np.concatenate(parts) if parts else np.zeros((0, k), dtype)
            if whole.shape != (n, k):
                raise ExportError(f"graph builder: {name} chunks make {list(whole.shape)}, expected [{n}, {k}]", "this is a bug in qconv")
            return self.initializer(name, np.ascontiguousarray(whole.T))
        self._claim(name)
        f = self._data_file()
        pad = -self._offset % ALIGNMENT if nbytes >= ALIGN_BYTES else 0
        start = self._offset + pad
        f.flush()
        fd, row_bytes, column = f.fileno(), n * dtype.itemsize, 0
        for chunk in chunks:
            chunk = np.asarray(chunk, dtype=dtype)
            if chunk.ndim != 2 or chunk.shape[1] != k or column + chunk.shape[0] > n:
                raise ExportError(f"graph builder: {name} chunk of shape {list(chunk.shape)} at column {column} of [{k}, {n}]",
                                  "this is a bug in qconv")
            block = np.ascontiguousarray(chunk.T)  # [K, r]: row i goes to row i of B at `column`
            offset = start + column * dtype.itemsize
            for row in block:
                os.pwrite(fd, row, offset)
                offset += row_bytes
            column += chunk.shape[0]
        if column != n:
            raise ExportError(f"graph builder: {name} has {column} columns, expected {n}", "this is a bug in qconv")
        self._offset = start + nbytes
        f.seek(self._offset)
        self.weight_bytes += nbytes
        self._external.append((self._stub(name, elem_type(dtype), (k, n)), start, nbytes))
        return name

    def reserve(self, name: str, dtype, shape: tuple[int, ...]) -> Region:
        """Space for a tensor whose rows arrive while another tensor streams (the embedding's scales
        beside its quantized rows): `region.write(first_row, rows)` in any order, then `close()`
        checks that every row came. In the data file the space is a gap the rows are pwritten into,
        so a table's scales never pile up in memory."""
        self._claim(name)
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if self.path is None or nbytes <= INLINE_BYTES:
            return Region(self, name, dtype, tuple(shape), None, np.zeros(shape, dtype))
        f = self._data_file()
        pad = -self._offset % ALIGNMENT if nbytes >= ALIGN_BYTES else 0
        start = self._offset + pad
        f.flush()
        self._offset = start + nbytes
        f.seek(self._offset)
        self.weight_bytes += nbytes
        self._external.append((self._stub(name, elem_type(dtype), shape), start, nbytes))
        return Region(self, name, dtype, tuple(shape), start, None)

    def _data_file(self):
        if self._data is None:
            self._data = open(self.data_path, "wb")
        return self._data

    # --- graph ----------------------------------------------------------------------------------

    def node(self, op_type: str, inputs: Sequence[str], n_outputs: int = 1, *, domain: str = "",
             name: str | None = None, outputs: Sequence[str] | None = None, **attrs) -> list[str]:
        from onnx import helper

        name = name or self.unique(op_type)
        if outputs is None:
            outputs = [f"{name}/out{i}" if n_outputs > 1 else f"{name}/out" for i in range(n_outputs)]
        for o in outputs:
            if o:
                self._claim(o)
        self.graph.node.append(helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain or None,
                                                **{k: v for k, v in attrs.items() if v is not None}))
        return list(outputs)

    def input(self, name: str, dtype, shape: Sequence[int | str]) -> str:
        from onnx import helper

        self.graph.input.append(helper.make_tensor_value_info(self._claim(name), elem_type(dtype), list(shape)))
        return name

    def output(self, name: str, dtype, shape: Sequence[int | str]) -> str:
        from onnx import helper

        self.graph.output.append(helper.make_tensor_value_info(name, elem_type(dtype), list(shape)))
        return name

    def _model(self, graph):
        from onnx import helper

        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, producer_name="qconv", ir_version=10)

    def model(self):
        """The whole model in memory (in-memory writers only: tests, single-op graphs)."""
        if self.path is not None:
            raise ExportError("graph builder: model() is for in-memory graphs; call save()", "this is a bug in qconv")
        return self._model(self.graph)

    def save(self) -> list[Path]:
        """Write the .onnx (and keep `<file>_data` when the weights pass the threshold); returns the files."""
        if self.path is None:
            raise ExportError("graph builder: save() needs a path", "this is a bug in qconv")
        self.close()
        external = self.weight_bytes > self.threshold
        self._infer_shapes()
        try:
            if external:
                self._save_external()
                self.data_path.chmod(0o644)
                return [self.path, self.data_path]
            self._save_inline()
            self.data_path.unlink(missing_ok=True)
            return [self.path]
        except OSError as exc:
            raise ExportError(f"cannot write {self.path.name}: {exc.strerror}", "check free disk space") from exc

    def _external_stub(self, tensor, start: int, length: int):
        from onnx import TensorProto

        stub = type(tensor)()
        stub.CopyFrom(tensor)
        stub.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(start)), ("length", str(length))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        return stub

    def _infer_shapes(self) -> None:
        """Every intermediate's type and shape as value_info (onnxruntime's symbolic inference knows
        the contrib ops; onnx's does not), so consumers and the session start have them. Runs on the
        graph with data-less initializer stubs: weights are never loaded."""
        from onnx import GraphProto
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        class Inference(SymbolicShapeInference):
            def __init__(self, *args):
                super().__init__(*args)
                # A float [.., K] x int8 [K, N] product: MatMul's shape rule (the tool lacks this op).
                self.dispatcher_.setdefault("DynamicQuantizeMatMul", self._compute_matmul_shape)

        graph = GraphProto()
        graph.CopyFrom(self.graph)
        graph.initializer.extend(self._external_stub(t, s, n) for t, s, n in self._external)
        inference = Inference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
        inference._preprocess(self._model(graph))
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        if not complete:  # (the tool's own wrapper would also dump a temp model into the cwd)
            raise ExportError("graph builder: shape inference left tensors untyped", "this is a bug in qconv")
        del self.graph.value_info[:]
        self.graph.value_info.extend(v for v in inference.out_mp_.graph.value_info
                                     if self.symbolic_value_info or not any(d.dim_param for d in v.type.tensor_type.shape.dim))

    def _save_external(self) -> None:
        graph = self.graph
        graph.initializer.extend(self._external_stub(t, s, n) for t, s, n in self._external)
        self.path.write_bytes(self._model(graph).SerializeToString())

    def _save_inline(self) -> None:
        head = self._model(self.graph).SerializeToString()
        with open(self.path, "wb") as out:
            out.write(head)
            if not self._external:
                return
            fd = os.open(self.data_path, os.O_RDONLY)
            try:
                for tensor, start, length in self._external:
                    prefix = tensor.SerializeToString() + _field(_TENSOR_RAW_DATA, length)
                    record = _field(_GRAPH_INITIALIZER, len(prefix) + length) + prefix
                    out.write(_field(_MODEL_GRAPH, len(record) + length) + record)
                    offset, remaining = start, length
                    while remaining:
                        chunk = os.pread(fd, min(remaining, COPY_CHUNK), offset)
                        if not chunk:
                            raise ExportError(f"graph builder: {self.data_path.name} ended early", "check free disk space")
                        out.write(chunk)
                        offset += len(chunk)
                        remaining -= len(chunk)
            finally:
                os.close(fd)


class Region:
    """A reserved tensor (GraphWriter.reserve), filled row range by row range."""

    def __init__(self, g: GraphWriter, name: str, dtype: np.dtype, shape: tuple[int, ...], start: int | None,
                 array: np.ndarray | None):
        self.g, self.name, self.dtype, self.shape, self.start, self.array = g, name, dtype, shape, start, array
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.rows_written = 0

    def write(self, first_row: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if tuple(rows.shape[1:]) != self.shape[1:] or first_row < 0 or first_row + len(rows) > self.shape[0]:
            raise ExportError(f"graph builder: rows {first_row}+{len(rows)} of shape {list(rows.shape)} do not fit "
                              f"{self.name} {list(self.shape)}", "this is a bug in qconv")
        if self.array is not None:
            self.array[first_row:first_row + len(rows)] = rows
        else:
            os.pwrite(self.g._data_file().fileno(), memoryview(rows).cast("B"), self.start + first_row * self.row_bytes)
        self.rows_written += len(rows)

    def close(self) -> str:
        if self.rows_written != self.shape[0]:
            raise ExportError(f"graph builder: {self.name} got {self.rows_written} of {self.shape[0]} rows", "this is a bug in qconv")
        if self.array is not None:
            tensor = self.g._stub(self.name, elem_type(self.dtype), self.shape)
            tensor.raw_data = self.array.tobytes()
            self.g.weight_bytes += len(tensor.raw_data)
            self.g.graph.initializer.append(tensor)
        return self.name


def _np_of(data_type: int):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(data_type)


def _packed(data_type: int) -> bool:
    """Types stored two values a byte, whose byte count the shape alone does not give."""
    from onnx import TensorProto

    return data_type in (TensorProto.INT4, TensorProto.UINT4)


# --- the checkpoint side --------------------------------------------------------------------------

class WeightReader:
    """Tensors of one checkpoint by name, as float32, each checked against the shape the config implies."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.tensors = ckpt.tensors

    def info(self, name: str, shape: Sequence[int] | None = None) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise WeightsError(f"{self.ckpt.root} has no tensor {name} that its config.json implies",
                               "the config and the weights disagree; re-download or re-convert the model")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise WeightsError(f"{self.ckpt.root}: {name} has shape {list(info.shape)}, config.json implies {list(shape)}",
                               "the config and the weights disagree; re-download or re-convert the model")
        return info

    def read(self, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
        return read_tensor(self.info(name, shape))

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return read_row_range(self.info(name), start, stop)

    def linear(self, name: str, shape: Sequence[int] | None = None, max_bytes: int = LINEAR_CHUNK):
        """A 2-D [out, in] weight as a LinearWeight: float32 row chunks of ~max_bytes, never whole."""
        from .precision import LinearWeight

        info = self.info(name, shape)
        if len(info.shape) != 2:
            raise WeightsError(f"{self.ckpt.root}: {name} has shape {list(info.shape)}, not [out, in]",
                               "the config and the weights disagree; re-download or re-convert the model")
        return LinearWeight(name, (int(info.shape[0]), int(info.shape[1])), self.chunks(name, max_bytes=max_bytes))

    def chunks(self, name: str, shape: Sequence[int] | None = None, max_bytes: int = LINEAR_CHUNK):
        """A callable returning the tensor's float32 row chunks in order (each call starts over)."""
        info = self.info(name, shape)
        return lambda: (rows for _start, rows in iter_row_chunks(info, max_bytes))
