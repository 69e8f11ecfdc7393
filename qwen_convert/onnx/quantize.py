"""ONNX precision variants: one table from QuantMode to a ModelProto -> ModelProto function.

Every function takes the fp32 graph (weights loaded, shape-inferred value_info present) and returns
a new graph; `save_onnx` writes any of them, with external data above a size threshold, so every
mode works the same on a 50 KB fixture and on a 2.4 GB model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.errors import ExportError
from qwen_convert.formats import EXTERNAL_DATA_THRESHOLD, QuantMode

# Ops kept fp32 wherever they occur: softmax sums exp() over the sequence; CumSum/Range/ArgMax
# compute positions. The RMSNorm statistics are kept fp32 by structure (see _rms_statistics):
# blocking Pow and ReduceMean by type is not enough, as each blocked op is wrapped in its own casts
# and mean(x^2) overflows when cast back to fp16 (measured: the trained tiny reranker's residual
# stream reaches |x| ~ 70, its mean square passes 65504, every fp16 logit came out 0).
FP16_OP_BLOCK_LIST = ("Softmax", "CumSum", "Range", "ArgMax")
RMS_CHAIN = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul")


@dataclass(frozen=True)
class QuantizeOptions:
    block_size: int = 32  # q4: weights per scale
    quantize_embedding: bool = True  # q4: embedding Gather -> GatherBlockQuantized (4-bit)
    # q4: int4 without zero points (ORT's and transformers.js' quantize scripts default to it); the
    # zero points of asymmetric uint4 add ~9 MB to the 0.6B model, pushing q4f16 past 340 MB.
    symmetric: bool = True
    accuracy_level: int = 4  # q4: MatMulNBits computes in int8 (ORT CPU's fast path)
    per_channel: bool = False  # int8: one scale per output channel instead of per tensor
    fp16_op_block_list: tuple[str, ...] = FP16_OP_BLOCK_LIST
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD

    def __post_init__(self):
        # MatMulNBits and GatherBlockQuantized take power-of-two blocks of at least 16.
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"block size {self.block_size} is not a power of two >= 16", "use 16, 32, 64 or 128")


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Mute the per-node INFO/WARNING chatter of the ORT quantizers and exporters (python logging
    and warnings); errors still surface as exceptions. Progress is the reporter's job."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _weight_matmuls(model) -> list[str]:
    """MatMul nodes whose second input is a weight (an initializer), i.e. not attention's
    activation x activation products, and not the one-column score head (see _head_nodes)."""
    inits = {t.name for t in model.graph.initializer}
    head = set(_head_nodes(model))
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and n.name not in head]


def _head_nodes(model) -> list[str]:
    """The score head (hidden -> 1 logit): a few KB, and its error lands on the logit unscaled."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and dims.get(n.input[1], [0, 0])[-1] == 1]


def _rms_statistics(model) -> list[str]:
    """Nodes computing an RMSNorm's 1/rms(x): from each Pow(x, 2) feeding a ReduceMean, along single
    consumers through Add(eps), Sqrt, Reciprocal/Div up to the Mul that rescales x (included)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(node):
        nxt = consumers.get(node.output[0], [])
        return nxt[0] if len(nxt) == 1 and nxt[0].op_type in RMS_CHAIN else None

    chain: list[str] = []
    for node in model.graph.node:
        current = only_consumer(node) if node.op_type == "Pow" else None
        if current is None or current.op_type != "ReduceMean":
            continue
        chain += [node.name, current.name]
        while current.op_type != "Mul" and (current := only_consumer(current)) is not None:
            chain.append(current.name)
    return chain


def _drop_fp16_round_trips(model):
    """The converter wraps every blocked node in its own casts, so a chain of blocked nodes still
    passes each intermediate through fp16 (fp32 -> Cast fp16 -> Cast fp32). Connect the consumers of
    such a pair to the fp32 tensor directly and drop the casts nobody reads any more."""
    import onnx

    graph = model.graph
    float32 = onnx.TensorProto.FLOAT
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {out: node for node in graph.node for out in node.output}
    kept_outputs = {o.name for o in graph.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rewire: dict[str, str] = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if cast_to(node) == float32 else None
        if (first is not None and cast_to(first) == onnx.TensorProto.FLOAT16 and types.get(first.input[0]) == float32
                and node.output[0] not in kept_outputs):
            rewire[node.output[0]] = first.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    while True:  # a dropped second cast can leave its first cast unread
        used = {name for node in graph.node for name in node.input} | kept_outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            return model
        for node in dead:
            graph.node.remove(node)


def to_fp16(model, options: QuantizeOptions):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # value_info comes from export-time shape inference (run on disk, so it works past 2 GB).
    converted = convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True, op_block_list=list(options.fp16_op_block_list),
        node_block_list=_rms_statistics(model),
    )
    return _drop_fp16_round_trips(converted)


def to_int8(model, options: QuantizeOptions):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="qconv-int8-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(
            model, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=_weight_matmuls(model),
            per_channel=options.per_channel, reduce_range=options.per_channel,  # as the builder: see onnx/precision.py
            weight_type=QuantType.QInt8, use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(str(out), load_external_data=True)


def to_q4(model, options: QuantizeOptions):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    op_types = ("MatMul", "Gather") if options.quantize_embedding else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, nodes_to_exclude=_head_nodes(model),
        op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    return quantizer.model.model


def to_q4f16(model, options: QuantizeOptions):
    return to_fp16(to_q4(model, options), options)


# fp32 has no entry: it is the exported graph itself, the input of every function here.
QUANTIZERS: dict[QuantMode, Callable] = {
    QuantMode.FP16: to_fp16,
    QuantMode.INT8: to_int8,
    QuantMode.Q4: to_q4,
    QuantMode.Q4F16: to_q4f16,
}


def quantize_settings(options: QuantizeOptions) -> dict:
    """Every setting of every mode, for quantize_config.json (the settings are fixed per run)."""
    return {
        "score_head": "fp32 in every variant (hidden -> 1: a few KB, and its error lands on the logit unscaled)",
        "fp16": {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
                 "op_block_list": list(options.fp16_op_block_list),
                 "node_block_list": "every RMSNorm's statistics in fp32: Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul"},
        "int8": {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "op_types": ["MatMul"],
                 "nodes": "weight MatMuls only (attention's activation x activation MatMuls stay float)",
                 "per_channel": options.per_channel},
        "q4": {"method": "onnxruntime MatMulNBitsQuantizer (DEFAULT/RTN)", "bits": 4, "block_size": options.block_size,
               "symmetric": options.symmetric, "accuracy_level": options.accuracy_level,
               "quantize_embedding": options.quantize_embedding,
               "embedding": "GatherBlockQuantized (4-bit, blocks along hidden)" if options.quantize_embedding else "Gather (fp32)"},
        "q4f16": "q4, then fp16 with the settings above",
        "external_data_threshold": options.external_data_threshold,
    }


def tensor_bytes(model) -> int:
    """Bytes of all initializers (in memory or external), without serializing (protobuf caps at 2 GB)."""
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def external_locations(model) -> set[str]:
    """The external data file names the graph's initializers point at (weights need not be loaded)."""
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def save_onnx(model, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write `model` to `path`; above `threshold` bytes its weights go to `<name>_data` next to it
    (the name transformers.js and optimum look for). Returns the files written."""
    import onnx

    path = Path(path)
    external = tensor_bytes(model) > threshold
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)
    try:
        onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024, convert_attribute=False)
    except (ValueError, OSError) as exc:
        raise ExportError(f"cannot write {path.name}: {exc}", "check free disk space") from exc
    if external:
        data.chmod(0o644)  # onnx creates it owner-only; the .onnx next to it is world-readable
    return [path, data] if external else [path]


def quantize_file(src: Path, dst: Path, mode: QuantMode, options: QuantizeOptions) -> list[Path]:
    """Load the fp32 graph at `src` (external data included), apply `mode`, save to `dst`."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    with quiet_logs():
        try:
            result = QUANTIZERS[mode](model, options)
        except ExportError:
            raise
        except Exception as exc:  # the ORT quantizers raise bare asserts/ValueErrors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{mode.value} quantization failed: {first}", "run with QCONV_DEBUG=1 for the traceback") from exc
    return save_onnx(result, dst, options.external_data_threshold)
