"""Which kernels a graph runs on this CPU: 4-bit weights expanded to int8 at session load.

onnxruntime's CPU MatMulNBits (4-bit blocks) has no AMX kernel and at best VNNI: on the Xeon of
BENCHMARKS.md (bench_prefix) a q4 graph scored at 0.18-0.36x the int8 graph's pairs/s, while
DynamicQuantizeMatMul's int8 GEMMs run on AMX. So a q4 graph opened for the CPU is rewritten in
memory before the session starts: every 4-bit MatMulNBits becomes DynamicQuantizeMatMul over int8
weights with one scale per output column, dequantized from the 4-bit blocks and requantized
(symmetric, round half to even; 7-bit on CPUs without VNNI, whose u8s8 kernel saturates a pair of
products above 32767: see onnx/precision.py). The file on disk is untouched; the weights take 2x
the 4-bit bytes in memory, so the rewrite runs only when that fits (MemAvailable) and the result
stays under protobuf's 2 GiB. Requantizing adds at most half an int8 step per weight (max|w| / 254
of its column) on top of the 4-bit error; verify scores through the same session, so a q4 variant's
gate holds what actually runs.

Graphs with fp16 activations (q4f16) keep MatMulNBits: DynamicQuantizeMatMul takes float32 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)  # a serialized model must stay under 2 GiB; keep a margin
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Expansion:
    """What expand_q4() did to a graph: how many MatMulNBits became int8, or why none did."""

    model: bytes | None  # the rewritten model (None: open the file as it is)
    expanded: int = 0
    int8_bytes: int = 0
    reason: str = ""

    @property
    def kernels(self) -> str:
        return f"int8 DynamicQuantizeMatMul ({self.expanded} 4-bit MatMulNBits expanded at load)" if self.model else ""


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


def expand_q4(path: Path, flags: tuple[str, ...] | None = None, memory: int | None = None) -> Expansion:
    """The graph at `path` with its 4-bit MatMulNBits over float32 activations rewritten to int8
    DynamicQuantizeMatMul (see the module docstring), or Expansion(None, reason=...) where it has none
    or the expansion does not fit."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    head = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in head.graph.initializer}
    candidates = [n for n in _nbits_nodes(head.graph) if inits.get(n.input[2]) is not None
                  and inits[n.input[2]].data_type == TensorProto.FLOAT]
    if not candidates:
        return Expansion(None, reason="no 4-bit MatMulNBits over float32 activations")
    sizes = {n.name: next(a.i for a in n.attribute if a.name == "K") * next(a.i for a in n.attribute if a.name == "N")
             for n in candidates}
    int8_bytes = sum(sizes.values())
    file_bytes = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "_data*"))
    if file_bytes + int8_bytes > PROTOBUF_LIMIT:
        return Expansion(None, int8_bytes=int8_bytes, reason="the expanded graph would pass protobuf's 2 GiB")
    memory = available_memory() if memory is None else memory
    if memory is not None and memory < 3 * (file_bytes + int8_bytes):
        return Expansion(None, int8_bytes=int8_bytes, reason=f"{memory >> 20} MiB available, the expansion needs ~{3 * (file_bytes + int8_bytes) >> 20}")
    seven_bit = not any(f in (cpu_flags() if flags is None else flags) for f in VNNI_FLAGS)
    model = onnx.load(str(path))  # with its external data: the rewritten graph is serialized whole
    inits = {t.name: t for t in model.graph.initializer}
    drop: set[str] = set()
    for node in _nbits_nodes(model.graph):
        if node.name not in sizes:
            continue
        k = next(a.i for a in node.attribute if a.name == "K")
        zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        w = dequantize_nbits(numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]]), zp, k)
        q, scale = quantize_columns(w, seven_bit)
        base = node.input[1]
        drop.update(x for x in node.input[1:4] if x)
        model.graph.initializer.extend([numpy_helper.from_array(q, base + ".int8"), numpy_helper.from_array(scale, base + ".int8_scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + ".int8_zero_point")])
        new = helper.make_node("DynamicQuantizeMatMul", [node.input[0], base + ".int8", base + ".int8_scale", base + ".int8_zero_point"],
                               list(node.output), name=node.name, domain=MS_DOMAIN)
        node.CopyFrom(new)
    used = {x for n in model.graph.node for x in n.input}
    keep = [t for t in model.graph.initializer if t.name not in drop or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return Expansion(model.SerializeToString(), expanded=len(sizes), int8_bytes=int8_bytes)
