"""Which kernels a graph runs on this CPU: 4-bit weights expanded to int8 at session load.

onnxruntime's CPU MatMulNBits (4-bit blocks) has no AMX kernel and at best VNNI: on the Xeon of
BENCHMARKS.md (bench_prefix) a q4 graph scored at 0.18-0.36x the int8 graph's pairs/s, while
DynamicQuantizeMatMul's int8 GEMMs run on AMX. So a q4 graph opened for the CPU is rewritten in
memory before the session starts: every 4-bit MatMulNBits becomes DynamicQuantizeMatMul over int8
weights with one scale per output column, dequantized from the 4-bit blocks and requantized
(symmetric, round half to even; 7-bit on CPUs without VNNI, whose u8s8 kernel saturates a pair of
products above 32767: see onnx/precision.py). The file on disk is untouched. The int8 weights never
enter the protobuf: the serialized graph names them as external data and onnxruntime gets them as
OrtValues (SessionOptions.add_external_initializers), like the file's other large inline tensors of
a numpy type (the embedding's scales); the rest of the file's external data is read from its folder.
So the graph handed over is small (80 MB for the 0.6B shape, its 4-bit embedding) whatever the
model's size: no 2 GiB protobuf cap, 4B and 8B q4 graphs expand too. Measured on the 0.6B shape
under load (BENCHMARKS.md): peak RSS 1.5-1.6 GB, was 2.9 GB when the whole rewritten model was
serialized; scores equal to the bit, speed unchanged. The int8 weights take 2x the 4-bit bytes and exist twice while
the session starts (ours, and onnxruntime's copy that its prepacked layout replaces), so the rewrite
runs only when that fits (MemAvailable). Requantizing adds at most half an int8 step per weight
(max|w| / 254 of its column) on top of the 4-bit error; verify scores through the same session, so
a q4 variant's gate holds what actually runs.

Graphs with fp16 activations (q4f16) keep MatMulNBits: DynamicQuantizeMatMul takes float32 only.

DynamicQuantizeMatMul quantizes its input with one range per tensor, which activation outliers (a
few channels 20-100x the rest) take over; MatMulNBits' own kernels quantize it per block of K, and
the AWQ fold of a calibrated q4 graph is chosen for 4-bit weights, not for that. Measured before
this smoothing (BENCHMARKS.md, bench_fidelity): max |dP| 0.997 on the int8 kernels vs 0.770 on the
file's own, on a 0.6B-width model with x50 outliers. So a calibrated q4 export records each linear
group's input max |x| per channel (as the graph sees it, after the AWQ fold) in
`onnx/model_q4.activations.safetensors` (written by onnx/calibration.py), and the expansion applies
SmoothQuant to the int8 weights it makes: s = max|x|^a / max|w|^(1-a) per input channel (a =
SMOOTH_ALPHA), the weights' rows times s, the producer's output divided by s (the RMSNorm's gamma;
up_proj's output channels for down_proj). The fold is exact in real numbers: only the rounding
moves. Graphs without that file (naive exports, older ones) expand unsmoothed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"
IN_MEMORY = "qconv-in-memory"  # the location a stub initializer names: its data comes as an OrtValue
# onnx's numpy_helper unpacks 4-bit types to a byte per value and OrtValue.ortvalue_from_numpy
# cannot take them back: those stay in the serialized graph (the 0.6B's 78 MB 4-bit embedding).
PLAIN_TYPES = frozenset({1, 2, 3, 6, 7, 10})  # float, uint8, int8, int32, int64, float16
INLINE_LIMIT = 1 << 20  # inline initializers this big leave the serialized graph too (the embedding's scales)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
ACTIVATIONS_SUFFIX = ".activations.safetensors"  # OUT/onnx/model_q4.activations.safetensors
ACTIVATIONS_FORMAT = "qconv activation absmax 1"
SMOOTH_ALPHA = 0.5  # SmoothQuant's default; measured in BENCHMARKS.md (bench_fidelity's CPU int8 rows)


@dataclass(frozen=True)
class Expansion:
    """What expand_q4() did to a graph: how many MatMulNBits became int8, or why none did."""

    model: bytes | None  # the rewritten graph without its large weights (None: open the file as it is)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # those weights, by initializer name
    data_dir: str = ""  # the folder of the graph's remaining external data files
    expanded: int = 0
    int8_bytes: int = 0
    reason: str = ""
    smoothed: int = 0  # linear groups whose int8 weights were smoothed from the activation record

    @property
    def kernels(self) -> str:
        if not self.model:
            return ""
        smoothed = f", {self.smoothed} groups smoothed" if self.smoothed else ""
        return f"int8 DynamicQuantizeMatMul ({self.expanded} 4-bit MatMulNBits expanded at load{smoothed})"


# --- the activation record of a calibrated q4 export ------------------------------------------


@dataclass(frozen=True)
class Fold:
    """One group of linears sharing an input: where its smoothing scale goes."""

    linears: tuple[str, ...]  # MatMulNBits node names: their int8 rows (input channels) times s
    producer: str  # "vector": the RMSNorm gamma initializer divided by s; "rows": the linear node whose output channels are
    axis: str  # "vector" | "rows"


def activations_file(graph: Path) -> Path | None:
    """The activation record of a graph: beside it (OUT/onnx/model_q4.onnx) or one folder up (the
    with-past graph OUT/onnx/prefix/model_q4.onnx shares its variant's fold and record)."""
    name = Path(graph).stem + ACTIVATIONS_SUFFIX
    for folder in (Path(graph).parent, Path(graph).parent.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def write_activations(path: Path, absmax: dict[str, np.ndarray], folds: dict[str, Fold], about: dict) -> None:
    """Each group's per-channel input max |x| (key -> float32 [in]) and where its scale folds."""
    from safetensors.numpy import save_file

    # One metadata entry: safetensors writes its metadata map in hash order, and re-exports are byte-identical.
    meta = {"qconv": json.dumps({"format": ACTIVATIONS_FORMAT, "about": about,
                                 "folds": {k: [list(f.linears), f.producer, f.axis] for k, f in folds.items()}}, sort_keys=True)}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(absmax.items())}, str(path), metadata=meta)


def read_activations(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Fold]]:
    """write_activations' record; a file that is not one is a ValueError naming it (never skipped:
    the int8 weights would silently be other ones than verify held)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {}).get("qconv", "{}"))
            if meta.get("format") != ACTIVATIONS_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            folds = {k: Fold(tuple(v[0]), v[1], v[2]) for k, v in meta["folds"].items()}
            return {k: fh.get_tensor(k) for k in fh.keys()}, folds
    except Exception as exc:  # safetensors' own errors, a truncated file, JSON without the fields
        raise ValueError(f"{Path(path).name} is not a readable qconv activation record ({exc})") from exc


def smooth_scale(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float = SMOOTH_ALPHA) -> np.ndarray:
    """SmoothQuant's per-input-channel s = max|x|^a / max|w|^(1-a) (X / s and W s: the product is unchanged)."""
    x = np.maximum(x_absmax.astype(np.float64), 1e-5)
    w = np.maximum(w_absmax.astype(np.float64), 1e-5)
    return (x ** alpha / w ** (1 - alpha)).astype(np.float32)


def cpu_flags() -> tuple[str, ...]:
    """The x86 feature flags that pick onnxruntime's GEMM kernels (empty where /proc/cpuinfo has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile",
                      "asimddp", "i8mm", "sve")
            return tuple(f for f in wanted if f in have)
    return ()


def available_memory() -> int | None:
    """MemAvailable in bytes, or None where the kernel does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int) -> np.ndarray:
    """MatMulNBits' 4-bit B (uint8 [N, blocks, block / 2], low nibble first), scales [N, blocks] and
    packed uint8 zero points [N, ceil(blocks / 2)] (None: 8) -> float32 [N, K]."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, half * 2), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    if zero_points is None:
        zp = np.full((n, blocks), 8.0, dtype=np.float32)
    else:
        both = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)
        zp = both[:, :blocks].astype(np.float32)
    w = (q - zp[..., None]) * scales.astype(np.float32).reshape(n, blocks)[..., None]
    return w.reshape(n, blocks * half * 2)[:, :k]


def quantize_columns(w: np.ndarray, seven_bit: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, K] -> (int8 [K, N] for MatMul's B, float32 scale [N]): symmetric per output column."""
    levels = 64.0 if seven_bit else 127.0
    absmax = np.abs(w).max(axis=1)
    scale = (absmax.astype(np.float64) / levels).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1), scale).astype(np.float32)
    q = np.clip(np.round(w / scale[:, None]), -levels, levels).astype(np.int8)
    return np.ascontiguousarray(q.T), scale


def _nbits_nodes(graph) -> list:
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN]
    out = []
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        extra = [x for x in node.input[4:] if x]  # g_idx, bias: not written by qconv's builder
        if attrs.get("bits") is not None and attrs["bits"].i != 4 or extra:
            continue
        out.append(node)
    return out


def _attr(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _stub(tensor, array: np.ndarray) -> None:
    """Turn `tensor` into a reference to data that comes at load as an OrtValue: onnxruntime replaces
    only initializers with external data (add_external_initializers), so it names a location that
    is never read."""
    from onnx import TensorProto, helper

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    del tensor.dims[:]
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _memory_check(head, sizes: dict[str, int], memory: int | None) -> str:
    """Why the expansion does not fit in MemAvailable, or "" where it does."""
    from onnx.external_data_helper import uses_external_data

    int8_bytes = sum(sizes.values())
    inline = sum(len(t.raw_data) for t in head.graph.initializer if not uses_external_data(t))
    # Measured on the 0.6B shape (BENCHMARKS.md): at load the int8 weights exist twice (ours, handed
    # over, and onnxruntime's copy of them, which its prepacked GEMM layout then replaces) beside the
    # graph's other weights, held once as arrays and once by onnxruntime.
    need = 3 * int8_bytes + 2 * inline
    memory = available_memory() if memory is None else memory
    if memory is not None and memory < need:
        return f"{memory >> 20} MiB available, the expansion needs ~{need >> 20}"
    return ""


def expand_q4(path: Path, flags: tuple[str, ...] | None = None, memory: int | None = None, smooth: bool = True) -> Expansion:
    """The graph at `path` with its 4-bit MatMulNBits over float32 activations rewritten to int8
    DynamicQuantizeMatMul (see the module docstring), or Expansion(None, reason=...) where it has none
    or the expansion does not fit. With `smooth` and the export's activation record, the int8
    weights are smoothed. The int8 weights and the file's large inline initializers leave the graph:
    they are `Expansion.weights`, for open_expanded() to hand to onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    head = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in head.graph.initializer}
    candidates = [n for n in _nbits_nodes(head.graph) if inits.get(n.input[2]) is not None
                  and inits[n.input[2]].data_type == TensorProto.FLOAT]
    if not candidates:
        return Expansion(None, reason="no 4-bit MatMulNBits over float32 activations")
    sizes = {n.name: _attr(n, "K") * _attr(n, "N") for n in candidates}
    int8_bytes = sum(sizes.values())
    short = _memory_check(head, sizes, memory)
    if short:
        return Expansion(None, int8_bytes=int8_bytes, reason=short)
    seven_bit = not any(f in (cpu_flags() if flags is None else flags) for f in VNNI_FLAGS)
    base_dir = str(path.parent)
    array = lambda name: numpy_helper.to_array(inits[name], base_dir)  # noqa: E731  (reads external data)
    by_name = {n.name: n for n in candidates}

    def dequantized(node) -> np.ndarray:
        zp = array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        return dequantize_nbits(array(node.input[1]), array(node.input[2]), zp, _attr(node, "K"))

    record = activations_file(path) if smooth else None
    quantized, smoothed = _smoothed_weights(head.graph, inits, by_name, record, dequantized, seven_bit) if record else ({}, 0)
    weights: dict[str, np.ndarray] = {}
    drop: set[str] = set()
    for node in candidates:
        q, scale = quantized.pop(node.name, None) or quantize_columns(dequantized(node), seven_bit)
        base = node.input[1]
        drop.update(x for x in node.input[1:4] if x)
        weights[base + ".int8"] = q
        stub = TensorProto(name=base + ".int8")
        _stub(stub, q)
        head.graph.initializer.extend([stub, numpy_helper.from_array(scale, base + ".int8_scale"),
                                       numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + ".int8_zero_point")])
        node.CopyFrom(helper.make_node("DynamicQuantizeMatMul", [node.input[0], base + ".int8", base + ".int8_scale",
                                       base + ".int8_zero_point"], list(node.output), name=node.name, domain=MS_DOMAIN))
    used = {x for n in head.graph.node for x in n.input}
    keep = [t for t in head.graph.initializer if t.name not in drop or t.name in used]
    del head.graph.initializer[:]
    head.graph.initializer.extend(keep)
    for tensor in head.graph.initializer:  # the embedding's scales and the like: out of the graph too
        if not uses_external_data(tensor) and len(tensor.raw_data) >= INLINE_LIMIT and tensor.data_type in PLAIN_TYPES:
            weights[tensor.name] = numpy_helper.to_array(tensor)
            _stub(tensor, weights[tensor.name])
    return Expansion(head.SerializeToString(), weights=weights, data_dir=base_dir, expanded=len(sizes), int8_bytes=int8_bytes,
                     smoothed=smoothed)


def _smoothed_weights(graph, inits: dict, nodes: dict, record: Path, dequantized, seven_bit: bool) -> tuple[dict, int]:
    """The int8 weights (node name -> (q, scale)) of every group the activation record folds, with
    SmoothQuant's scale in their rows and its inverse in the producer: the RMSNorm gamma (changed in
    `inits`, in place) or, for down_proj, up_proj's output channels. A group is left as it is where
    the graph is not the shape the record describes (a linear kept at higher precision, a producer
    with other consumers). Groups folding into a linear go first, so that linear's own group sees
    its divided rows."""
    from onnx import numpy_helper

    absmax, folds = read_activations(record)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producer_of = {out: n for n in graph.node for out in n.output}
    divide: dict[str, np.ndarray] = {}  # node -> its output channels divided by these
    done: dict[str, tuple] = {}
    count = 0
    for key, fold in sorted(folds.items(), key=lambda kv: kv[1].axis != "rows"):
        linears = [nodes.get(n) for n in fold.linears]
        if any(n is None or n.name in done for n in linears) or key not in absmax:
            continue
        if len({n.input[0] for n in linears}) != 1 or {c.name for c in consumers.get(linears[0].input[0], [])} != set(fold.linears):
            continue  # the group's input feeds something else too: scaling it would change that
        source = producer_of.get(linears[0].input[0])
        if fold.axis == "vector":
            gamma = inits.get(fold.producer)
            if gamma is None or source is None or fold.producer not in source.input or len(consumers.get(fold.producer, [])) != 1:
                continue
        elif fold.producer not in nodes or fold.producer in done:
            continue
        ws = {n.name: dequantized(n) for n in linears}
        for name, w in ws.items():
            if name in divide:
                w /= divide.pop(name)[:, None]
        s = smooth_scale(absmax[key], np.max([np.abs(w).max(axis=0) for w in ws.values()], axis=0))
        if fold.axis == "vector":
            value = numpy_helper.to_array(gamma)
            gamma.CopyFrom(numpy_helper.from_array((value.astype(np.float32) / s).astype(value.dtype), gamma.name))
        else:
            divide[fold.producer] = s
        for name, w in ws.items():
            w *= s[None, :]
            done[name] = quantize_columns(w, seven_bit)
        count += 1
    for name, s in divide.items():  # a producer no group of the record re-quantized: its own rows, divided
        w = dequantized(nodes[name])
        done[name] = quantize_columns(w / s[:, None], seven_bit)
    return done, count


def open_expanded(expansion: Expansion, opts, providers: list[str]):
    """An onnxruntime session of an expanded graph: its weights handed over as OrtValues, its other
    external data read from the file's folder (a graph from bytes has no path of its own).
    onnxruntime copies OrtValues given to add_external_initializers into the graph ("the user
    provided buffers can then be deallocated", OrtApi::AddExternalInitializers; test_kernels holds
    this), so the session does not keep `expansion.weights` alive. `opts` is spent: it still points
    at those buffers, so it must not open another session."""
    import onnxruntime as ort

    names = list(expansion.weights)
    opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(expansion.weights[n]) for n in names])
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", expansion.data_dir)
    return ort.InferenceSession(expansion.model, opts, providers=providers)
