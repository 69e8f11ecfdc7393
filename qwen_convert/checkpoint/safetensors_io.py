"""Read and write safetensors files without loading tensors into memory.

We parse headers ourselves (8-byte little-endian length + JSON) so that we can
  * validate a file completely (offsets contiguous, inside the file, sizes matching shapes) before use,
  * copy tensor bytes verbatim (bit-for-bit dtype preservation) with a bounded buffer,
  * read single rows (the yes/no rows of a 151k x 1024 embedding) by seeking.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.errors import WeightsError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# User-facing names (and torch's) -> safetensors codes.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 16 * 1024 * 1024
PAGE = 4096


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: Path | str) -> SafetensorsFile:
    """Parse and fully validate a safetensors header against the file size.

    Raises WeightsError naming the file for anything a loader would choke on later: a short file,
    an absurd header length, bad JSON, unknown dtypes, sizes that do not match shapes, overlapping
    or gapped data, or data running past the end of the file (a truncated download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)", "re-download or re-export it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER or 8 + header_len > size:
                raise WeightsError(f"{path}: corrupt or truncated safetensors header", "re-download or re-export it")
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror})", "check the path and permissions") from exc
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{path}: corrupt safetensors header ({exc})", "re-download or re-export it") from exc

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            itemsize = DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: malformed entry for tensor {name!r}", "re-download or re-export it") from exc
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise WeightsError(f"{path}: tensor {name!r} byte range does not match its shape", "re-download or re-export it")
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise WeightsError(f"{path}: tensor {name!r} overlaps or leaves a gap in the data", "re-download or re-export it")
        cursor = end
    if cursor != data_size:
        what = "truncated" if cursor > data_size else "has trailing bytes"
        raise WeightsError(
            f"{path}: file is {what} (header says {cursor} data bytes, file has {data_size})",
            "re-download or re-export it",
        )
    return SafetensorsFile(path, tensors, dict(metadata))


# --- numeric helpers ---------------------------------------------------------------------------

def _decode(raw: bytes, dtype: str, count: int) -> np.ndarray:
    """Raw little-endian bytes -> float32 array (exact for bf16/f16/f32)."""
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2", count=count).astype(np.float32)
    if dtype == "BF16":
        # bf16 is the top half of an fp32: shift into place, in place (`u16 << 16` was a second
        # fp32-sized copy: +192 MiB while an 8B-wide MLP weight loads).
        u32 = np.frombuffer(raw, dtype="<u2", count=count).astype(np.uint32)
        u32 <<= 16
        return u32.view(np.float32)
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8", count=count).astype(np.float32)
    raise WeightsError(f"cannot use a {dtype} tensor as a floating-point weight", "use a float checkpoint")


def encode(values: np.ndarray, dtype: str) -> bytes:
    """float32 array -> raw bytes in `dtype` (bf16 rounds to nearest even, like torch)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "BF16":
        u32 = values.view(np.uint32).astype(np.uint64)
        rounded = ((u32 + 0x7FFF + ((u32 >> 16) & 1)) >> 16).astype("<u2")
        return rounded.tobytes()
    raise ValueError(f"unsupported output dtype {dtype}")


def read_rows(info: TensorInfo, rows: Iterable[int]) -> np.ndarray:
    """Read whole rows of a 2-D tensor as float32, seeking to each (no full-tensor load)."""
    if len(info.shape) != 2:
        raise WeightsError(f"{info.file}: {info.name} is not a matrix", "check the checkpoint")
    n_rows, n_cols = info.shape
    row_bytes = n_cols * DTYPE_SIZES[info.dtype]
    out = []
    with open(info.file, "rb") as f:
        for r in rows:
            if not 0 <= r < n_rows:
                raise WeightsError(f"row {r} is outside {info.name} (shape {list(info.shape)})", "check the token ids")
            f.seek(info.start + r * row_bytes)
            out.append(_decode(f.read(row_bytes), info.dtype, n_cols))
    return np.stack(out)


def read_row_range(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor (its first axis) as float32, in one read. A 1-D tensor's
    'rows' are its elements. Only those bytes are read: a 151669 x 4096 embedding never is whole."""
    n_rows = info.shape[0] if info.shape else 1
    if not 0 <= start <= stop <= n_rows:
        raise WeightsError(f"rows {start}:{stop} are outside {info.name} (shape {list(info.shape)})", "check the checkpoint")
    row_elems = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    row_bytes = row_elems * DTYPE_SIZES[info.dtype]
    count = (stop - start) * row_bytes
    with open(info.file, "rb") as f:
        f.seek(info.start + start * row_bytes)
        raw = f.read(count)
    if len(raw) != count:
        raise WeightsError(f"{info.file}: {info.name} ends early", "re-download the checkpoint")
    return _decode(raw, info.dtype, (stop - start) * row_elems).reshape((stop - start, *info.shape[1:]) if info.shape else ())


def read_tensor(info: TensorInfo) -> np.ndarray:
    """A whole tensor as float32 (one decoder weight at a time; use read_row_range or iter_row_chunks
    for the embedding and lm_head)."""
    return read_row_range(info, 0, info.shape[0] if info.shape else 1).reshape(info.shape)


# Stored dtypes a whole tensor can be read as is (read_stored), as the numpy dtype of the same bits:
# numpy has no bfloat16, so its bits come as int16 (torch views them back as bfloat16).
STORED_BITS = {"BF16": "<i2", "F16": "<f2", "F32": "<f4"}


def read_stored(info: TensorInfo) -> np.ndarray:
    """A whole tensor's bytes, undecoded, read straight into one writable array (STORED_BITS[dtype],
    shaped): a bf16 weight held at half the size of its float32 decoding."""
    if info.dtype not in STORED_BITS:
        raise WeightsError(f"cannot hold a {info.dtype} tensor as stored", "use a float checkpoint")
    out = np.empty(info.shape, dtype=STORED_BITS[info.dtype])
    with open(info.file, "rb") as f:
        f.seek(info.start)
        if f.readinto(memoryview(out.reshape(-1)).cast("B")) != info.nbytes:
            raise WeightsError(f"{info.file}: {info.name} ends early", "re-download the checkpoint")
    return out


def iter_row_chunks(info: TensorInfo, max_bytes: int = 64 << 20) -> Iterable[tuple[int, np.ndarray]]:
    """(first row, float32 rows) chunks of at most ~max_bytes of float32 each, in order."""
    n_rows = info.shape[0] if info.shape else 1
    row_elems = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    step = max(1, max_bytes // (4 * row_elems))
    for start in range(0, n_rows, step):
        yield start, read_row_range(info, start, min(n_rows, start + step))


# --- writing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: either copied verbatim from `source`, or given as raw `data` bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    data: bytes | None = None

    @property
    def nbytes(self) -> int:
        return self.source.nbytes if self.source is not None else len(self.data or b"")


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, on_bytes: Callable[[int], None]) -> None:
    """Copy bytes between files in the kernel when possible; bounded user-space buffer otherwise."""
    remaining = count
    try:
        while remaining:
            n = os.copy_file_range(src_fd, dst_fd, min(remaining, 1 << 30), offset)
            if n == 0:
                raise WeightsError("source file ended early while copying", "re-download the checkpoint")
            offset += n
            remaining -= n
            on_bytes(n)
        return
    except (AttributeError, OSError):
        pass  # not supported on this filesystem/platform: fall back below
    while remaining:
        chunk = os.pread(src_fd, min(remaining, COPY_CHUNK), offset)
        if not chunk:
            raise WeightsError("source file ended early while copying", "re-download the checkpoint")
        os.write(dst_fd, chunk)
        offset += len(chunk)
        remaining -= len(chunk)
        on_bytes(len(chunk))


def _contiguous_runs(tensors: list[OutTensor]) -> list[list[OutTensor]]:
    """Group tensors whose source bytes follow each other in one file, so each group is one copy."""
    runs: list[list[OutTensor]] = []
    for t in tensors:
        prev = runs[-1][-1] if runs else None
        if (t.source is not None and prev is not None and prev.source is not None
                and prev.source.file == t.source.file and prev.source.start + prev.nbytes == t.source.start):
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def write_safetensors(
    path: Path | str,
    tensors: list[OutTensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Write `tensors` in the given order to `path`; returns the data size in bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        expected = math.prod(t.shape) * DTYPE_SIZES[t.dtype]
        if t.nbytes != expected:
            raise ValueError(f"{t.name}: {t.nbytes} bytes for shape {t.shape} {t.dtype}")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep data 8-byte aligned, as the reference writer does
    first = tensors[0].source if tensors else None
    if first is not None:
        # Pad the header (trailing spaces are valid) so the data keeps the source's offset within a
        # page: the kernel copies page-aligned ranges much faster (1.5x on a 0.6B checkpoint).
        blob += b" " * ((first.start - 8 - len(blob)) % PAGE)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        out.flush()
        dst_fd = out.fileno()
        open_files: dict[Path, int] = {}
        try:
            for run in _contiguous_runs(tensors):
                head = run[0]
                if head.source is None:
                    os.write(dst_fd, head.data or b"")
                    on_bytes(head.nbytes)
                    continue
                fd = open_files.get(head.source.file)
                if fd is None:
                    fd = open_files[head.source.file] = os.open(head.source.file, os.O_RDONLY)
                _copy_range(fd, dst_fd, head.source.start, sum(t.nbytes for t in run), on_bytes)
        finally:
            for fd in open_files.values():
                os.close(fd)
    return offset
