"""QuantMode -> per-tensor encoders: how one weight is stored and which op consumes it.

The graph builder hands every weight to its variant's `Precision` as row chunks ([rows, in] float32
of the checkpoint's [out, in] layout, a few MB each): a linear layer as one or more `LinearWeight`s
that share an input (fused into one product whose columns are the parts, in order; the builder
passes one weight at a time, build.py says why),
the embedding as a callable yielding row chunks. Each encoder writes its initializers and nodes
through the graph writer and returns the output tensor's name, so no step ever holds a whole weight
(MatMul's B = W.T is written transposed chunk by chunk), and no whole-graph pass (onnxruntime's
quantize_dynamic, MatMulNBitsQuantizer, float16 converter) runs.

The encoded bytes are those onnxruntime's own quantizers write for the same weight:
- int8: quantize_dynamic (QInt8, symmetric, per tensor or per output channel; a fused product keeps
  each part's own per-tensor scale, as a per-column scale vector: the numbers of separate products);
- q4: MatMulNBitsQuantizer (its C++ kernel for MatMul weights, its numpy rule for the Gather table);
- q4f16: q4, then the float16 converter's fp32 -> fp16 cast of the scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from qwen_convert.errors import ExportError
from qwen_convert.formats import QuantMode

from .quantize import QuantizeOptions
from .shapes import q4_embedding_block

MS = "com.microsoft"
RowChunks = Callable[[], Iterable[np.ndarray]]  # a fresh iterator of float32 row chunks per call


class Writer(Protocol):
    """What an encoder needs from the graph writer (qwen_convert/onnx/weights.py GraphWriter)."""

    def initializer(self, name: str, array: np.ndarray, *, onnx_type: int | None = None,
                    shape: Sequence[int] | None = None) -> str: ...

    def initializer_chunks(self, name: str, dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray], *,
                           nbytes: int | None = None) -> str: ...

    def initializer_transposed(self, name: str, dtype, shape: tuple[int, int], chunks: Iterable[np.ndarray]) -> str: ...

    def reserve(self, name: str, dtype, shape: tuple[int, ...]): ...

    def node(self, op_type: str, inputs: Sequence[str], n_outputs: int = 1, *, domain: str = "",
             name: str | None = None, **attrs) -> list[str]: ...


@dataclass(frozen=True)
class LinearWeight:
    """One [out, in] weight as float32 row chunks: `chunks()` starts a fresh pass (int8's
    per-tensor scale needs two)."""

    name: str
    shape: tuple[int, int]
    chunks: RowChunks

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> LinearWeight:
        """An in-memory weight (tests, single-op graphs)."""
        a = _check_2d(name, np.asarray(array, dtype=np.float32))
        return cls(name, (int(a.shape[0]), int(a.shape[1])), lambda: iter([a]))


# --- numeric kernels: one weight in, its stored form out ------------------------------------------

def int8_scale(absmax: np.ndarray, reduce_range: bool = False) -> np.ndarray:
    """quantize_dynamic's QInt8 scale of a symmetric range: max|w| / 127 (reduce_range: / 64),
    computed in float64 and stored float32; below float32's smallest normal (an all-zero weight) it is 1."""
    levels = 128.0 if reduce_range else 254.0
    scale = (np.asarray(absmax, dtype=np.float32).astype(np.float64) * 2 / levels).astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1), scale).astype(np.float32)


def int8_encode(rows: np.ndarray, scale: np.ndarray, reduce_range: bool = False) -> np.ndarray:
    """q = round-half-even(w / scale), clipped to int8 ([-64, 64] with reduce_range; scale: a scalar or
    one per row [n, 1])."""
    lo, hi = (-64, 64) if reduce_range else (-128, 127)
    return np.clip(np.round(np.asarray(rows, dtype=np.float32) / scale), lo, hi).astype(np.int8)


def _absmax(w: np.ndarray, axis=None) -> np.ndarray:
    lo, hi = w.min(axis=axis), w.max(axis=axis)
    return np.maximum(np.abs(np.minimum(lo, np.float32(0))), np.abs(np.maximum(hi, np.float32(0))))


def quantize_int8(weight: np.ndarray, per_channel: bool, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float32 -> (int8 [in, out] for MatMul's B, float32 scale: [] or [out]), by
    quantize_dynamic's QInt8 rule (`int8_scale`, `int8_encode`); per channel = per output column of B."""
    w = np.asarray(weight, dtype=np.float32)
    scale = int8_scale(_absmax(w, axis=1 if per_channel else None), reduce_range)
    q = int8_encode(w, scale[:, None] if per_channel else scale, reduce_range)
    return np.ascontiguousarray(q.T), scale


def quantize_int8_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embedding rows [n, hidden] -> (int8 [n, hidden], float32 scale [n, 1]): the int8 rule of
    `quantize_int8` with one scale per row (a token's vector), so row chunks encode independently."""
    q_t, scale = quantize_int8(rows, per_channel=True)
    return np.ascontiguousarray(q_t.T), scale[:, None]


def quantize_q4_matmul(weight: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[out, in] float32 -> MatMulNBits' B (uint8 [out, k_blocks, block_size / 2]), scales (float32
    [out, k_blocks]) and zero points (uint8 [out, ceil(k_blocks / 2)], None when symmetric), from
    the C++ kernel MatMulNBitsQuantizer calls (blocks run along `in`; a ragged last block is padded)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = weight.shape
    k_blocks = -(-k // block_size)
    b = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)  # MatMul's B: [K, N]
    if k_blocks * block_size != k:
        b = np.pad(b, ((0, k_blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, k_blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, (k_blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, b, scales, zero_points, block_size, n, k, symmetric)
    return packed, scales, None if symmetric else zero_points


def quantize_q4_rows(rows: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Embedding rows [n, hidden] -> packed 4-bit data (uint8 [n, hidden / 2], low nibble first),
    scales (float32 [n, hidden / block_size]) and zero points (uint8 [n, hidden / block_size], one
    value a byte: pack the whole table's with `pack_nibbles`; None when symmetric): the numpy rule
    MatMulNBitsQuantizer applies to a Gather table with blocks along hidden."""
    x = np.asarray(rows, dtype=np.float32)
    n, h = x.shape
    blocks = x.reshape(n, h // block_size, block_size)
    if symmetric:
        hi, lo = blocks.max(axis=2, keepdims=True), blocks.min(axis=2, keepdims=True)
        scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-8.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale == 0, 0, blocks / scale).round().clip(-8, 7).astype(np.int8)
        zero = None
    else:
        lo = np.minimum(blocks.min(axis=2, keepdims=True), 0)
        hi = np.maximum(blocks.max(axis=2, keepdims=True), 0)
        scale = (hi - lo) / np.float32(15.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale == 0, 8, -lo / scale).round().clip(0, 15).astype(np.uint8)
            q = np.where(scale == 0, 8, blocks / scale + zp).round().clip(0, 15).astype(np.uint8)
        zero = zp.reshape(n, -1)
    return pack_nibbles(q.reshape(n, h)).reshape(n, h // 2), scale.reshape(n, -1).astype(np.float32), zero


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit values (int8 or uint8, any shape) -> flat uint8 [ceil(size / 2)], element 2i in the low
    nibble (ONNX's INT4/UINT4 layout; an odd count leaves the last high nibble 0)."""
    v = values.reshape(-1).astype(np.uint8) & 0xF
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return (v[::2] | (v[1::2] << 4)).astype(np.uint8)


# --- encoders: write one weight and the op that consumes it ---------------------------------------

def _float_linear(dtype) -> Callable:
    def linear(g: Writer, name: str, x: str, weights: Sequence[LinearWeight], options: QuantizeOptions) -> str:
        k, n = _fused_shape(name, weights)
        b = g.initializer_transposed(f"{name}.weight", np.dtype(dtype), (k, n),
                                     (rows.astype(dtype) for _part, rows in _linear_rows(weights)))
        return g.node("MatMul", [x, b], name=name)[0]
    return linear


def _float_embedding(dtype) -> Callable:
    def embedding(g: Writer, name: str, ids: str, chunks: RowChunks, shape: tuple[int, int], options: QuantizeOptions) -> str:
        table = g.initializer_chunks(f"{name}.weight", np.dtype(dtype), tuple(shape),
                                     (np.asarray(c, dtype=dtype) for c in _checked_rows(name, chunks, shape)))
        return g.node("Gather", [table, ids], name=name)[0]
    return embedding


def _int8_linear(g: Writer, name: str, x: str, weights: Sequence[LinearWeight], options: QuantizeOptions) -> str:
    k, n = _fused_shape(name, weights)
    # Per-channel scales put every row's weights across the whole int8 range, and DynamicQuantizeMatMul's
    # u8s8 kernel on CPUs without VNNI (vpmaddubsw) saturates a pair of uint8 x int8 products above
    # 32767: measured 6% of a product's scale on such a CI machine. 7-bit weights (quantize_dynamic's
    # reduce_range) keep 2 x 255 x 64 below it; per-tensor scales, which outliers keep small, stay 8-bit.
    reduce = options.per_channel
    per_tensor = None if options.per_channel else [  # a first pass over each part for its range
        int8_scale(max(float(_absmax(rows)) for rows in w.chunks())) for w in weights]
    column_scales: list[np.ndarray] = []

    def encoded() -> Iterator[np.ndarray]:
        for part, rows in _linear_rows(weights):
            scale = int8_scale(_absmax(rows, axis=1), reduce)[:, None] if per_tensor is None else per_tensor[part]
            column_scales.append(np.broadcast_to(scale.reshape(-1), (len(rows),)))
            yield int8_encode(rows, scale, reduce)

    q = g.initializer_transposed(f"{name}.weight_quantized", np.dtype(np.int8), (k, n), encoded())
    # One weight per tensor: a scalar scale, as quantize_dynamic writes; otherwise one per column.
    scale = per_tensor[0] if per_tensor is not None and len(weights) == 1 else np.concatenate(column_scales)
    inputs = [x, q, g.initializer(f"{name}.weight_scale", scale),
              g.initializer(f"{name}.weight_zero_point", np.zeros(scale.shape, np.int8))]
    return g.node("DynamicQuantizeMatMul", inputs, domain=MS, name=name)[0]


def _int8_embedding(g: Writer, name: str, ids: str, chunks: RowChunks, shape: tuple[int, int], options: QuantizeOptions) -> str:
    scales = _Rows(g.reserve(f"{name}.weight_scale", np.float32, (shape[0], 1)))

    def encoded() -> Iterator[np.ndarray]:
        for rows in _checked_rows(name, chunks, shape):
            q, s = quantize_int8_rows(rows)
            scales.append(s)
            yield q

    table = g.initializer_chunks(f"{name}.weight_quantized", np.dtype(np.int8), tuple(shape), encoded())
    scale = scales.close()
    rows = g.node("Gather", [table, ids], name=f"{name}.gather")[0]
    row_scale = g.node("Gather", [scale, ids], name=f"{name}.gather_scale")[0]
    floats = g.node("Cast", [rows], name=f"{name}.cast", to=1)[0]  # TensorProto.FLOAT
    return g.node("Mul", [floats, row_scale], name=name)[0]


def _q4_linear(scale_dtype) -> Callable:
    def linear(g: Writer, name: str, x: str, weights: Sequence[LinearWeight], options: QuantizeOptions) -> str:
        k, n = _fused_shape(name, weights)
        k_blocks = -(-k // options.block_size)
        scales = _Rows(g.reserve(f"{name}.weight_scales", scale_dtype, (n, k_blocks)))
        zeros = None if options.symmetric else _Rows(g.reserve(f"{name}.weight_zero_points", np.uint8, (n, (k_blocks + 1) // 2)))

        def encoded() -> Iterator[np.ndarray]:
            for _part, rows in _linear_rows(weights):  # MatMulNBits' B is [N, blocks, ...]: row chunks stay in order
                packed, s, z = quantize_q4_matmul(rows, options.block_size, options.symmetric)
                scales.append(s)
                if zeros is not None:
                    zeros.append(z)
                yield packed

        inputs = [x, g.initializer_chunks(f"{name}.weight_Q4", np.dtype(np.uint8), (n, k_blocks, options.block_size // 2), encoded()),
                  scales.close()]
        if zeros is not None:
            inputs.append(zeros.close())
        attrs = {"K": k, "N": n, "bits": 4, "block_size": options.block_size}
        if options.accuracy_level:  # MatMulNBitsQuantizer omits a 0 (the attribute's default)
            attrs["accuracy_level"] = options.accuracy_level
        return g.node("MatMulNBits", inputs, domain=MS, name=name, **attrs)[0]
    return linear


def _q4_embedding(scale_dtype) -> Callable:
    def embedding(g: Writer, name: str, ids: str, chunks: RowChunks, shape: tuple[int, int], options: QuantizeOptions) -> str:
        if not options.quantize_embedding:
            return _float_embedding(scale_dtype)(g, name, ids, chunks, shape, options)
        from onnx import TensorProto

        vocab, hidden = shape
        block = q4_embedding_block(hidden, options.block_size)  # a smaller block, or int8 rows (shapes.py)
        if block is None:
            rows = _int8_embedding(g, name, ids, chunks, shape, options)
            return rows if np.dtype(scale_dtype) == np.float32 else g.node("Cast", [rows], name=f"{name}.fp16", to=10)[0]
        options = replace(options, block_size=block)
        scales = _Rows(g.reserve(f"{name}.weight_scales", scale_dtype, (vocab, hidden // options.block_size)))
        zeros: list[np.ndarray] = []  # one 4-bit value a block, packed across rows: kept (1/32 of the table at most)

        def encoded() -> Iterator[np.ndarray]:
            for rows in _checked_rows(name, chunks, shape):
                packed, s, z = quantize_q4_rows(rows, options.block_size, options.symmetric)
                scales.append(s)
                if z is not None:
                    zeros.append(z)
                yield packed

        # INT4 (UINT4 with zero points): two values a byte, so the writer takes the byte count.
        int4 = TensorProto.INT4 if options.symmetric else TensorProto.UINT4
        table = g.initializer_chunks(f"{name}.weight_Q4", int4, (vocab, hidden), encoded(), nbytes=vocab * hidden // 2)
        inputs = [table, ids, scales.close()]
        if zeros:
            blocks = hidden // options.block_size
            inputs.append(g.initializer(f"{name}.weight_zero_points", pack_nibbles(np.concatenate(zeros)),
                                        onnx_type=TensorProto.UINT4, shape=(vocab, blocks)))
        return g.node("GatherBlockQuantized", inputs, domain=MS, name=name,
                      gather_axis=0, quantize_axis=1, block_size=options.block_size)[0]
    return embedding


def _check_2d(name: str, weight: np.ndarray) -> np.ndarray:
    if weight.ndim != 2:
        raise ExportError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}",
                          "check that the checkpoint matches its config.json")
    return weight


class _Rows:
    """Appends row chunks to a reserved tensor (GraphWriter.reserve) in order: an encoder's scales,
    written beside the weight they belong to instead of piling up in memory."""

    def __init__(self, region):
        self.region, self.next = region, 0

    def append(self, rows: np.ndarray) -> None:
        self.region.write(self.next, rows)
        self.next += len(rows)

    def close(self) -> str:
        return self.region.close()


def _fused_shape(name: str, weights: Sequence[LinearWeight]) -> tuple[int, int]:
    """(K, N) of the product x @ [w_1; w_2; ...].T: the parts share `in`, their `out`s add up."""
    if not weights:
        raise ExportError(f"{name}: no weight to encode", "this is a bug in qconv")
    widths = {w.shape[1] for w in weights}
    if len(widths) != 1:
        raise ExportError(f"{name}: fused weights {[w.name for w in weights]} differ in input width {sorted(widths)}",
                          "check that the checkpoint matches its config.json")
    return widths.pop(), sum(w.shape[0] for w in weights)


def _linear_rows(weights: Sequence[LinearWeight]) -> Iterator[tuple[int, np.ndarray]]:
    """(part index, float32 row chunk) over every part in order, each part's chunks checked to
    tile its [out, in] shape exactly."""
    for i, w in enumerate(weights):
        yield from ((i, rows) for rows in _checked_rows(w.name, w.chunks, w.shape))


def _checked_rows(name: str, chunks: RowChunks, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """The chunks, each checked against the table's width, and their rows counted to its height:
    a short or ragged table is a broken checkpoint, not something to write."""
    vocab, hidden = shape
    seen = 0
    for rows in chunks():
        if rows.ndim != 2 or rows.shape[1] != hidden:
            raise ExportError(f"{name}: row chunk of shape {tuple(rows.shape)} in a [{vocab}, {hidden}] table",
                              "check that the checkpoint matches its config.json")
        seen += rows.shape[0]
        yield rows
    if seen != vocab:
        raise ExportError(f"{name}: {seen} rows, expected {vocab}", "check that the checkpoint matches its config.json")


@dataclass(frozen=True)
class Precision:
    """How one variant stores weights: the dtype flowing between ops, and one encoder per kind of
    weight (each writes its initializers and consuming op(s), and returns the output's name)."""

    mode: QuantMode
    activation: type  # np.float32 or np.float16
    linear: Callable[[Writer, str, str, Sequence[LinearWeight], QuantizeOptions], str]
    embedding: Callable[[Writer, str, str, RowChunks, tuple[int, int], QuantizeOptions], str]


PRECISIONS: dict[QuantMode, Precision] = {
    QuantMode.FP32: Precision(QuantMode.FP32, np.float32, _float_linear(np.float32), _float_embedding(np.float32)),
    QuantMode.FP16: Precision(QuantMode.FP16, np.float16, _float_linear(np.float16), _float_embedding(np.float16)),
    QuantMode.INT8: Precision(QuantMode.INT8, np.float32, _int8_linear, _int8_embedding),
    QuantMode.Q4: Precision(QuantMode.Q4, np.float32, _q4_linear(np.float32), _q4_embedding(np.float32)),
    QuantMode.Q4F16: Precision(QuantMode.Q4F16, np.float16, _q4_linear(np.float16), _q4_embedding(np.float16)),
}


# Mixed precision: where a quantized variant keeps a layer that calibration could not bring close
# (calibration.py), the precision that layer is written in. Same activation dtype as the variant,
# so no cast enters the graph: int8 and q4 keep fp32 MatMuls, q4f16 fp16 ones.
FALLBACK: dict[QuantMode, QuantMode] = {QuantMode.INT8: QuantMode.FP32, QuantMode.Q4: QuantMode.FP32,
                                        QuantMode.Q4F16: QuantMode.FP16}


def _int8_embedding_in(dtype) -> Callable:
    """int8's embedding (one scale per row) feeding a graph whose activations are `dtype`."""
    def embedding(g: Writer, name: str, ids: str, chunks: RowChunks, shape: tuple[int, int], options: QuantizeOptions) -> str:
        out = _int8_embedding(g, name, ids, chunks, shape, options)
        return out if np.dtype(dtype) == np.float32 else g.node("Cast", [out], name=f"{name}.to_fp16", to=10)[0]
    return embedding


# ... and the embedding, where its 4-bit rows alone move the calibration set's scores too far: 8-bit rows.
EMBEDDING_FALLBACK: dict[QuantMode, Callable] = {QuantMode.Q4: _int8_embedding_in(np.float32),
                                                 QuantMode.Q4F16: _int8_embedding_in(np.float16)}


# --- quantize_config.json -------------------------------------------------------------------------

KEPT_EMBEDDING = ("int8 rows with one float32 scale per row (Gather, Cast, Mul{cast}): kept at 8 bits by calibration, "
                  "see quantization.mixed_precision")


def describe_kept(settings: dict, kept: dict) -> dict:
    """settings' `encoders` with what calibration kept at higher precision (variant -> names) written in."""
    encoders = settings.get("encoders")
    for variant, names in kept.items():
        if encoders and variant in encoders and any(n.startswith("model.embed_tokens") for n in names):
            cast = ", Cast to fp16" if variant == QuantMode.Q4F16.value else ""
            encoders[variant] = {**encoders[variant], "embedding": KEPT_EMBEDDING.format(cast=cast)}
    return settings

_FUSED: list[str] = []  # products the builder fuses: none (q/k/v, gate/up fused measured slower, build.py)
_RMSNORM = ("every RMSNorm is SimplifiedLayerNormalization (stash_type=1) or SkipSimplifiedLayerNormalization: "
            "statistics in fp32 for fp16 inputs")
_FP16_NUMERICS = {
    "inputs_outputs": "input_ids, attention_mask int64; logits float32",
    "rmsnorm": _RMSNORM,
    "softmax": "fp32: GroupQueryAttention's CPU kernel computes Q.K, the softmax and P.V in fp32 for fp16 inputs",
    "rope": "cos/sin computed in fp32, then cast to fp16",
}


def precision_settings(options: QuantizeOptions) -> dict:
    """quantize_config.json for the builder: quantize_settings' keys (readers may rely on them) with
    the builder's values, and under `encoders` each variant's per-tensor encoding as PRECISIONS does it."""
    from .quantize import quantize_settings

    settings = quantize_settings(options)
    q4_embedding = (f"com.microsoft GatherBlockQuantized (int4{'' if options.symmetric else ' + zero points'}, "
                    f"blocks of {options.block_size} along hidden)") if options.quantize_embedding else None
    settings["fp16"] = {**settings["fp16"], "method": "qconv graph builder: weights cast to fp16 as written",
                        "op_block_list": [],  # no whole-graph converter runs, so nothing to block
                        "node_block_list": _RMSNORM}
    settings["int8"] = {**settings["int8"], "method": "qconv graph builder: DynamicQuantizeMatMul, weights encoded once "
                        "at export by quantize_dynamic's QInt8 rule",
                        "nodes": "weight MatMuls and the embedding (attention's activation x activation products stay float)"}
    settings["q4"] = {**settings["q4"], "method": "qconv graph builder: MatMulNBits, weights encoded at export by "
                      "MatMulNBitsQuantizer's kernel (RTN)",
                      "embedding": q4_embedding or "Gather (fp32, kept: --keep-embedding)"}
    settings["q4f16"] = "q4 with fp16 scales and activations; fp32 inputs/outputs, RMSNorm statistics and softmax in fp32"

    def q4(scales: str) -> dict:
        return {"op": "com.microsoft MatMulNBits", "bits": 4, "block_size": options.block_size,
                "symmetric": options.symmetric, "accuracy_level": options.accuracy_level, "scales": scales,
                "fused": _FUSED, "embedding": q4_embedding or f"Gather ({scales}, kept: --keep-embedding)"}

    settings["encoders"] = {
        "fp32": {"op": "MatMul", "weights": "float32", "activations": "float32", "fused": _FUSED,
                 "embedding": "Gather (float32)"},
        "fp16": {"op": "MatMul", "weights": "float16", "activations": "float16", "fused": _FUSED,
                 "embedding": "Gather (float16)", **_FP16_NUMERICS},
        "int8": {"op": "com.microsoft DynamicQuantizeMatMul", "weights": "int8, symmetric (zero point 0)",
                 "scales": ("per-channel: one float32 scale per output column, 7-bit weights in [-64, 64] (reduce_range)"
                            if options.per_channel else
                            "per-tensor: one float32 scale per weight (a fused product keeps each part's, as a per-column vector)"),
                 "per_channel": options.per_channel, "activations": "float32, quantized by the op at run time",
                 "fused": _FUSED, "embedding": "int8 rows with one float32 scale per row (Gather, Cast, Mul)"},
        "q4": {**q4("float32"), "activations": "float32"},
        "q4f16": {**q4("float16"), "activations": "float16", **_FP16_NUMERICS},
        "all": {"head": "final RMSNorm and score head (hidden -> 1) in fp32 on the last real token only "
                        "(fp16 variants cast that row to fp32 first)"},
    }
    return settings
