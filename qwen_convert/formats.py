"""What qconv's artifacts look like on disk: artifact kinds, ONNX precision modes and their file names.

The lowest layer beside errors.py: every stage names variants and kinds through this module, so the
exporter, the scorers, verify, recipes and the server agree on one list.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import ExportError

# protobuf cannot serialize a message over 2 GiB: above this, weights go to `<file>_data`.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # 2 GiB less headroom for the graph itself


class QuantMode(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    Q4 = "q4"
    Q4F16 = "q4f16"

    @property
    def file_name(self) -> str:
        """transformers.js names (DEFAULT_DTYPE_SUFFIX_MAPPING): q8/int8 -> `_quantized`."""
        return FILE_NAMES[self]


ONNX_DIR = "onnx"  # the variants' folder inside an export (where transformers.js and optimum look)
# Each variant's with-past graph (prefix-shared scoring), same file name, in this folder under ONNX_DIR:
# onnx/prefix/model_quantized.onnx. A subfolder, so loaders that glob onnx/*.onnx never pick it up.
PREFIX_DIR = "prefix"


FILE_NAMES = {
    QuantMode.FP32: "model.onnx",
    QuantMode.FP16: "model_fp16.onnx",
    QuantMode.INT8: "model_quantized.onnx",
    QuantMode.Q4: "model_q4.onnx",
    QuantMode.Q4F16: "model_q4f16.onnx",
}


QUANTIZED_MODES = tuple(m for m in QuantMode if m is not QuantMode.FP32)


def parse_modes(names: tuple[str, ...] | list[str]) -> tuple[QuantMode, ...]:
    """`--quantize` values -> modes; 'all' expands; unknown names fail listing the valid ones."""
    valid = [m.value for m in QUANTIZED_MODES]
    modes: list[QuantMode] = []
    for name in names:
        name = name.strip().lower()
        if name == "all":
            picked = list(QUANTIZED_MODES)
        elif name in valid:
            picked = [QuantMode(name)]
        else:
            raise ExportError(f"unknown quantization mode {name!r}", f"valid modes: {', '.join(valid)}, all")
        modes += [m for m in picked if m not in modes]
    return tuple(modes)


class ArtifactKind(str, Enum):
    CAUSAL = "causal"
    SEQCLS = "seqcls"
    ONNX = "onnx"
    SERVER = "server"  # a running server's URL (qwen_convert/scoring/remote.py); scores texts, not token ids


QUANTIZE_CONFIG = "quantize_config.json"
# How the seq-cls head score.weight may be stored (bf16 costs ~1e-3 of parity).
SCORE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class VariantFile:
    mode: str
    path: str  # relative to OUT
    bytes: int  # the .onnx file plus its external data
    external_data: bool

    def to_dict(self) -> dict:
        return {"mode": self.mode, "path": self.path, "bytes": self.bytes, "external_data": self.external_data}
