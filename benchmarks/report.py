"""Shared by the benchmark scripts: each owns one marked section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(text: str, start: str, end: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between `start` and `end` (markers included in `text`), or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def machine() -> dict:
    """The CPU a benchmark ran on (model, count, the flags that pick GEMM kernels), its load and the time:
    speed figures are only comparable on one machine, so every table prints these beside them."""
    import os
    import subprocess
    import time

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"cpu": fields.get("Model name", "?").strip(), "cpus": fields.get("CPU(s)", "?").strip(),
            "flags": [f for f in CPU_FLAGS if f in flags], "load": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def builder_stamp() -> str:
    """sha256 of the graph builder's sources (qwen_convert/onnx): a benchmark's kept export made by
    other code is made again, so no table times graphs an older builder wrote."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((BENCHMARKS_MD.parent / "qwen_convert" / "onnx").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def stale(export: Path, marker: Path) -> bool:
    """Whether `export` must be made again: `marker` missing, or its builder stamp not today's."""
    stamp = export / ".builder-sha256"
    return not marker.exists() or not stamp.exists() or stamp.read_text() != builder_stamp()


def stamp(export: Path) -> None:
    """Record the builder that made `export` (see stale)."""
    (export / ".builder-sha256").write_text(builder_stamp())
