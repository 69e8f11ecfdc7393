"""Shared by the benchmark scripts: each owns one marked section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(text: str, start: str, end: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between `start` and `end` (markers included in `text`); where there is none,
    put it after the last section of the same benchmark on another CPU kind (see markers), else at the end."""
    import re

    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        name = start.removeprefix("<!-- ").split("[")[0].split(":")[0]
        siblings = list(re.finditer(rf"<!-- {re.escape(name)}(\[[^\]]*\])?:end -->", old))
        cut = siblings[-1].end() if siblings else len(old.rstrip("\n"))
        new = old[:cut] + "\n\n" + text + ("\n" if not siblings else "") + old[cut:]
    path.write_text(new)


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
# What picks the int8 and bf16 GEMM kernels of onnxruntime (MLAS), torch (oneDNN), OpenVINO and vLLM-cpu:
# the first kind whose flags a CPU has. Speed tables are kept one per kind, so a run on one CPU does not
# erase what another measured.
CPU_KINDS = (("amx", ("amx_int8",)), ("avx512-vnni", ("avx512_vnni",)), ("avx2-vnni", ("avx_vnni",)),
             ("avx2", ("avx2",)))
CPU_KIND_TITLES = {"amx": "AMX int8/bf16 tiles", "avx512-vnni": "AVX-512 VNNI, no AMX", "avx2-vnni": "AVX2 VNNI",
                   "avx2": "AVX2", "other": "no AVX2"}


def cpu_kind(flags) -> str:
    """'amx', 'avx512-vnni', 'avx2-vnni', 'avx2' or 'other' (flags: machine()'s)."""
    return next((kind for kind, need in CPU_KINDS if set(need) <= set(flags)), "other")


def markers(name: str, flags) -> tuple[str, str]:
    """The start and end markers of benchmark `name`'s section for this CPU kind."""
    kind = cpu_kind(flags)
    return f"<!-- {name}[{kind}]:start -->", f"<!-- {name}[{kind}]:end -->"


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


def kind_title(flags) -> str:
    """The CPU kind in words, for a section's heading."""
    return CPU_KIND_TITLES[cpu_kind(flags)]
