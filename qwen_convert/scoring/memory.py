"""Memory: what this process may still use, what a model needs, and the peak a phase reached.

`available_bytes` is the smaller of the kernel's MemAvailable and the room left under the memory
cgroup's limit (v1 memory.limit_in_bytes or v2 memory.max), counting only the cgroup's anonymous
memory as used: page cache is reclaimable and must not make a model look as if it would not fit.

The estimates are deliberately simple and err high; their factors are what BENCHMARKS.md measured
(onnxruntime 1.32, CPU), plus the interpreter's base and the activations, estimated apart:
fp32 1.1x the bytes on disk, fp16 3.3x (the CPU provider computes fp16 graphs through fp32 casts of
the weights), int8 1.5x and q4/q4f16 1.7x (the graph builder's variants: weights stay quantized in
the session, 1.33x / 1.63x / 1.73x after session creation on the 0.6B shape; `qconv verify` of the
full 8B shape's 3.97 GiB q4f16 peaked at 7.1 GB, i.e. 1.6x plus base and activations). The earlier
2.4x / 3.5x came from whole-process peaks of small files and refused the 8B's q4f16 (14.5 GiB
estimated) on a 16 GB machine where it verifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
BASE_BYTES = 600 << 20  # python + torch + onnxruntime + tokenizer, before any model
ONNX_FACTORS = {"fp32": 1.1, "fp16": 3.3, "int8": 1.5, "q4": 1.7, "q4f16": 1.7}
TORCH_FACTOR = 1.15  # fp32 parameters + transformers' transient copies at load


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's memory cgroup limit, or None when it has none."""
    lines = _read(Path("/proc/self/cgroup")) or ""
    for line in lines.splitlines():
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / rel
            limit, stat, anon_key = _read(base / "memory.max"), _read(base / "memory.stat"), "anon"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel
            limit, stat, anon_key = _read(base / "memory.limit_in_bytes"), _read(base / "memory.stat"), "total_rss"
        else:
            continue
        if not limit or limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            continue
        used = 0
        for entry in (stat or "").splitlines():
            key, _, value = entry.partition(" ")
            if key == anon_key and value.isdigit():
                used = int(value)
        return max(0, int(limit) - used)
    return None


def available_bytes() -> int:
    """Memory this process can still take without being killed (best estimate)."""
    meminfo = _read(Path("/proc/meminfo")) or ""
    avail = None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    room = _cgroup_room()
    candidates = [v for v in (avail, room) if v is not None]
    return min(candidates) if candidates else 1 << 62


def parse_size(text: str) -> int:
    """'12G', '512M', '3.5GiB', '1000000' -> bytes."""
    from qwen_convert.errors import QconvError

    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    try:
        out = int(float(number) * scale)
    except ValueError:
        raise QconvError(f"memory size {text!r} is not a size", "use e.g. 12G or 512M") from None
    if out <= 0:
        raise QconvError(f"memory size {text!r} is not positive", "use e.g. 12G or 512M")
    return out


@dataclass(frozen=True)
class Estimate:
    needed: int  # bytes
    what: str  # how it was estimated, for the "not verified" line

    def fits(self, budget: int) -> bool:
        return self.needed <= budget


def parameter_count(path: Path) -> int:
    from qwen_convert.checkpoint.files import open_checkpoint

    return sum(_elements(t.shape) for t in open_checkpoint(path).tensors.values())


def _elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def torch_estimate(path: Path, activations: int = 0) -> Estimate:
    """A whole transformers model in fp32 (what from_pretrained(dtype=float32) holds)."""
    params = parameter_count(path)
    return Estimate(BASE_BYTES + int(params * 4 * TORCH_FACTOR) + activations, f"{params / 1e9:.2f}B parameters in fp32")


def streamed_estimate(path: Path, activations: int = 0) -> Estimate:
    """The largest decoder layer in fp32, plus the probe set's activations."""
    from qwen_convert.checkpoint.files import open_checkpoint

    layers: dict[str, int] = {}
    for name, info in open_checkpoint(path).tensors.items():
        if ".layers." in name:
            key = name.split(".layers.", 1)[1].split(".", 1)[0]
            layers[key] = layers.get(key, 0) + _elements(info.shape)
    layer = max(layers.values(), default=0)
    return Estimate(BASE_BYTES + layer * 4 * 2 + activations, f"one decoder layer ({layer / 1e6:.0f}M parameters) in fp32")


def onnx_estimate(onnx_file: Path, precision: str, external: list[Path], activations: int = 0) -> Estimate:
    disk = onnx_file.stat().st_size + sum(p.stat().st_size for p in external if p.is_file())
    factor = ONNX_FACTORS.get(precision, 3.5)
    return Estimate(BASE_BYTES + int(disk * factor) + activations, f"{disk / GIB:.2f} GiB on disk x {factor:g} ({precision})")


def activation_bytes(tokens: int, hidden: int, intermediate: int) -> int:
    """Hidden states of `tokens` padded tokens (a few live copies) and one batch's MLP intermediates."""
    return tokens * hidden * 4 * 3 + MLP_STEP_BYTES


MLP_STEP_BYTES = 3 * (64 << 20)


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM), so peak_rss() measures from here. False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """Peak resident set size of this process since the last reset_peak (bytes)."""
    for line in (_read(Path("/proc/self/status")) or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


def describe(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.1f} GiB"
