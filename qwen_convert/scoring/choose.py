"""Which ONNX variant of an export to score with on this machine: the fastest one that may be used.

`choose_variant(export)` -> VariantChoice. A named variant is taken as asked. Otherwise the
candidates are the variants that passed their gate in a verify report beside the export (or one
level up, where `qconv run` writes it), else, with no report, int8 and fp32 (the two serve trusts
unverified; serve/engine.py's UNVERIFIED_ORDER). One candidate is the choice; between several, the
speed on this CPU decides, because it differs by CPU more than any static order can say (int8
leads on AMX and VNNI; q4 runs int8 kernels on the CPU since scoring/kernels.py, fp16 trails):
a short measurement at load, a few batches of 4 x 128 tokens per candidate, cached in
variant-choice.json keyed by the CPU's flags, the thread count and each candidate's graph hash, so
it runs once per machine and export. The CUDA provider keeps a static order (fp16 first) for now.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen_convert.errors import SourceError
from qwen_convert.formats import ONNX_DIR, QuantMode

VERIFY_REPORT = "verify.json"
UNVERIFIED = (QuantMode.INT8, QuantMode.FP32)
# Ties and the no-measurement case: fastest first on the 0.6B shape (BENCHMARKS.md), as serve/engine.py's SPEED_ORDER.
CPU_ORDER = (QuantMode.INT8, QuantMode.Q4, QuantMode.FP32, QuantMode.Q4F16, QuantMode.FP16)
CUDA_ORDER = (QuantMode.FP16, QuantMode.Q4F16, QuantMode.FP32, QuantMode.Q4, QuantMode.INT8)
MEASURE_SHAPE = (4, 128)
MEASURE_SECONDS = 1.0


@dataclass(frozen=True)
class VariantChoice:
    mode: QuantMode
    reason: str  # requested | only candidate | measured | cached measurement | static order
    candidates: tuple[str, ...] = ()
    verified: bool = False  # the candidates come from a verify report
    pairs_per_s: dict[str, float] = field(default_factory=dict)  # what the measurement found

    def to_dict(self) -> dict:
        return {"variant": self.mode.value, "reason": self.reason, "candidates": list(self.candidates),
                "verified": self.verified, "pairs_per_s": self.pairs_per_s}


def gate_results(export: Path) -> dict[QuantMode, bool] | None:
    """variant -> passed, from a verify report next to the export or one level up; None: no report."""
    for folder in (export, export.parent):
        report = folder / VERIFY_REPORT
        if not report.is_file():
            continue
        try:
            candidates = json.loads(report.read_text(encoding="utf-8")).get("candidates") or []
        except (OSError, ValueError):
            continue
        out = {}
        for c in candidates:
            name = str(c.get("name", ""))
            if name.startswith(f"{ONNX_DIR}/") and Path(str(c.get("path", ""))).name == export.name:
                try:
                    out[QuantMode(name.removeprefix(f"{ONNX_DIR}/"))] = bool(c.get("passed"))
                except ValueError:
                    continue
        if out:
            return out
    return None


def choose_variant(export: Path | str, requested: str | None = None, threads: int | None = None,
                   provider: str = "CPUExecutionProvider", cache: Path | None = None) -> VariantChoice:
    """The variant of `export` (a directory with onnx/) to score with; see the module docstring."""
    from .onnx_scorers import _mode

    export = Path(export)
    present = [m for m in QuantMode if (export / ONNX_DIR / m.file_name).is_file()]
    if requested:
        mode = _mode(requested)
        if mode not in present:
            raise SourceError(f"{export} has no {mode.value} variant ({mode.file_name})",
                              f"present: {', '.join(m.value for m in present) or 'none'}")
        return VariantChoice(mode, "requested", (mode.value,))
    if not present:
        raise SourceError(f"{export / ONNX_DIR} holds no ONNX variant", "export one with qconv export-onnx")
    gates = gate_results(export)
    order = CUDA_ORDER if provider == "CUDAExecutionProvider" else CPU_ORDER
    if gates is not None:
        candidates = [m for m in order if m in present and gates.get(m)]
        if not candidates:
            raise SourceError(f"no variant of {export} passed its gate in {VERIFY_REPORT}",
                              "pick one explicitly with --variant, or fix the export")
    else:
        candidates = [m for m in order if m in UNVERIFIED and m in present] or present[:1]
    names = tuple(m.value for m in candidates)
    verified = gates is not None
    if len(candidates) == 1:
        return VariantChoice(candidates[0], "only candidate", names, verified)
    if provider != "CPUExecutionProvider":
        return VariantChoice(candidates[0], "static order", names, verified)
    return _measured_choice(export, candidates, threads, cache or default_cache(), verified)


def default_cache() -> Path:
    """$QCONV_CACHE_DIR/variant-choice.json, else $XDG_CACHE_HOME (or ~/.cache)/qconv/variant-choice.json."""
    if os.environ.get("QCONV_CACHE_DIR"):
        return Path(os.environ["QCONV_CACHE_DIR"]) / "variant-choice.json"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qconv" / "variant-choice.json"


def _file_identity(path: Path) -> str:
    """sha256 of the .onnx file (the graph; large weights sit in <file>_data) and its data files' sizes."""
    from qwen_convert.fsutil import sha256_file

    digest = hashlib.sha256(sha256_file(path).encode())
    for data in sorted(path.parent.glob(path.name + "_data*")):
        digest.update(f"{data.name}:{data.stat().st_size}".encode())
    return digest.hexdigest()


def _measured_choice(export: Path, candidates: list[QuantMode], threads: int | None, cache: Path,
                     verified: bool) -> VariantChoice:
    from .kernels import cpu_flags

    files = {m: export / ONNX_DIR / m.file_name for m in candidates}
    key = hashlib.sha256(json.dumps([cpu_flags(), os.cpu_count(), threads,
                                     sorted((m.value, _file_identity(f)) for m, f in files.items())]).encode()).hexdigest()
    stored = _read_cache(cache)
    names = tuple(m.value for m in candidates)
    if key in stored and stored[key].get("variant") in names:
        hit = stored[key]
        return VariantChoice(QuantMode(hit["variant"]), "cached measurement", names, verified, dict(hit.get("pairs_per_s", {})))
    speed = {m.value: _pairs_per_s(export, m, threads) for m in candidates}
    best = max(candidates, key=lambda m: speed[m.value])
    stored[key] = {"variant": best.value, "pairs_per_s": speed, "export": str(export), "measured_at": time.time()}
    _write_cache(cache, stored)
    return VariantChoice(best, "measured", names, verified, speed)


def _pairs_per_s(export: Path, mode: QuantMode, threads: int | None) -> float:
    """Rows per second of one variant over MEASURE_SHAPE (one warm-up run, then MEASURE_SECONDS)."""
    import numpy as np

    from .onnx_scorers import load_onnx_scorers

    (scorer,) = load_onnx_scorers(export, [mode.value], threads)
    try:
        vocab = int(json.loads((export / "config.json").read_text()).get("vocab_size", 1000))
    except (OSError, ValueError):
        vocab = 1000
    rows, length = MEASURE_SHAPE
    ids = np.random.default_rng(0).integers(0, min(vocab, 30000), size=(rows, length), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((rows, length), dtype=np.int64)}
    session = scorer.session
    session.run(["logits"], feeds)
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < MEASURE_SECONDS:
        session.run(["logits"], feeds)
        runs += 1
    return round(rows * runs / (time.perf_counter() - started), 3)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    """Best effort: a read-only cache directory costs a measurement next time, not a failure."""
    from qwen_convert.errors import QconvError
    from qwen_convert.fsutil import atomic_output_file

    try:
        with atomic_output_file(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except (OSError, QconvError):
        pass
