"""What an .onnx file says about itself, read without loading its weights.

`onnx.load(path, load_external_data=False)` still parses every inline initializer: a 570 MB int8
graph (under the 2 GB external-data threshold, so its weights are inline) costs ~1.1 GB of RAM just
to learn its opset or its data files. This walks the protobuf wire format instead, seeking over
every field it does not need (nodes, raw_data), so reading the header of any graph costs a few KB.

    ModelProto: 7 graph (repeated records merge), 8 opset_import {1 domain, 2 version}
    GraphProto: 5 initializer (TensorProto)
    TensorProto: 13 external_data {1 key, 2 value}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qwen_convert.errors import SourceError

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MODEL_GRAPH, _MODEL_OPSET = 7, 8
_GRAPH_INITIALIZER = 5
_TENSOR_EXTERNAL = 13
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_SMALL = 1 << 16  # a message read whole (opset ids, external-data entries) is at most this big


@dataclass(frozen=True)
class OnnxHeader:
    opsets: dict[str, int]  # domain ("" for ai.onnx) -> version
    external_locations: frozenset[str] = field(default_factory=frozenset)

    @property
    def opset(self) -> int:
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))


class _Reader:
    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.f.read(1)
            if not b:
                raise EOFError
            result |= (b[0] & 0x7F) << shift
            if not b[0] & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def fields(self, end: int):
        """(field number, wire type, payload length or None) until offset `end`; the caller reads or
        skips each payload (`skip`)."""
        while self.f.tell() < end:
            tag = self.varint()
            number, wire = tag >> 3, tag & 7
            if wire == _LENGTH:
                yield number, wire, self.varint()
            elif wire in (_VARINT, _FIXED64, _FIXED32):
                yield number, wire, None
            else:
                raise ValueError(f"unsupported wire type {wire}")

    def skip(self, wire: int, length: int | None) -> None:
        if wire == _LENGTH:
            self.f.seek(length, os.SEEK_CUR)
        elif wire == _VARINT:
            self.varint()
        else:
            self.f.seek(8 if wire == _FIXED64 else 4, os.SEEK_CUR)

    def small(self, length: int) -> bytes:
        if length > _SMALL:
            raise ValueError("message too large for its kind")
        data = self.f.read(length)
        if len(data) != length:
            raise EOFError
        return data


def _parse_small(data: bytes) -> dict[int, bytes | int]:
    """A flat message of strings and varints (OperatorSetIdProto, StringStringEntryProto)."""
    import io

    r = _Reader(io.BytesIO(data), Path("<message>"))
    out: dict[int, bytes | int] = {}
    for number, wire, length in r.fields(len(data)):
        if wire == _LENGTH:
            out[number] = r.small(length)
        elif wire == _VARINT:
            out[number] = r.varint()
        else:
            r.skip(wire, length)
    return out


def read_header(path: Path | str) -> OnnxHeader:
    """The opsets and external data files of the .onnx at `path` (SourceError if it is not one)."""
    path = Path(path)
    opsets: dict[str, int] = {}
    locations: set[str] = set()
    try:
        with open(path, "rb") as f:
            r = _Reader(f, path)
            size = os.fstat(f.fileno()).st_size
            for number, wire, length in r.fields(size):
                if number == _MODEL_OPSET and wire == _LENGTH:
                    entry = _parse_small(r.small(length))
                    domain = entry.get(_OPSET_DOMAIN, b"")
                    opsets[domain.decode() if isinstance(domain, bytes) else ""] = int(entry.get(_OPSET_VERSION, 0))
                elif number == _MODEL_GRAPH and wire == _LENGTH:
                    _graph(r, f.tell() + length, locations)
                else:
                    r.skip(wire, length)
            if f.tell() != size:
                raise EOFError
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}", "check the path") from exc
    except (EOFError, ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is not a readable ONNX file ({type(exc).__name__})", "re-export it with qconv export-onnx") from exc
    if not opsets:
        raise SourceError(f"{path} is not a readable ONNX file (no opset)", "re-export it with qconv export-onnx")
    return OnnxHeader(opsets, frozenset(locations))


def _graph(r: _Reader, end: int, locations: set[str]) -> None:
    for number, wire, length in r.fields(end):
        if number == _GRAPH_INITIALIZER and wire == _LENGTH:
            tensor_end = r.f.tell() + length
            for t_number, t_wire, t_length in r.fields(tensor_end):
                if t_number == _TENSOR_EXTERNAL and t_wire == _LENGTH:
                    entry = _parse_small(r.small(t_length))
                    if entry.get(_ENTRY_KEY) == b"location":
                        locations.add(entry.get(_ENTRY_VALUE, b"").decode())
                else:
                    r.skip(t_wire, t_length)
        else:
            r.skip(wire, length)
    if r.f.tell() != end:
        raise ValueError("graph record overruns its length")
