"""VerifyOptions: what verify scores, how it batches, and which gates it applies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.reranker import DEFAULT_MAX_LENGTH, PaddingSide
from qwen_convert.scoring.probes import LabeledPair
from qwen_convert.scoring.remote import ServerOptions

from .gates import DEFAULT_GATES, DRIFT_GATED, GATE_CHECKS, Gate

PADDING_SIDES: tuple[PaddingSide, ...] = ("left", "right")


PADDING_CHECKS = ("probe", "full")


REFERENCE_PADDING_TOL = 1e-4


@dataclass(frozen=True)
class VerifyOptions:
    pairs_file: Path | None = None  # JSONL; None = the built-in probe set
    variants: tuple[str, ...] = ()  # ONNX variants to check (empty = all in the directory)
    tol_logit: float | None = None  # fp32 gate: max |Δlogit|
    tol_fp16: float | None = None  # fp16 gate: max |Δlogit|
    min_retention: float | None = None  # bf16 and quantized gates: min NDCG retention
    max_prob_drift: float | None = None  # bf16 and quantized gates: max |ΔP(yes)|
    p95_prob_drift: float | None = None  # bf16 and quantized gates: 95th percentile of |ΔP(yes)|
    min_kendall_tau: float | None = None  # bf16 and quantized gates: mean per-query Kendall τ
    instruction: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 8
    padding_sides: tuple[PaddingSide, ...] = PADDING_SIDES
    gates: Mapping[str, Gate] | None = None  # per-precision overrides (recipes); the tol_* options win
    ndcg_k: int = 10
    ndcg_gains: str = "auto"  # labels | reference | auto (labels when every pair has one)
    # Batch pairs in order of length, cut where a longer prompt would pad the batch past 1.25x its real
    # tokens (scoring.length_batches): 0.45x the padded tokens of the built-in probes' given order.
    # Off: batches of batch_size in the given order.
    sort_by_length: bool = True
    tol_reference_padding: float = REFERENCE_PADDING_TOL
    # "probe": every pair on the first padding side, and on each other side one batch (padding_probe):
    # the shortest prompt and the next longer one, padded to twice the shortest. A padding bug shows on
    # any padded row (that batch is at least half padding, and its rows end at different tokens); the
    # parity and ranking gates keep every pair. It scores 0.52x the tokens of "full" (every pair on
    # every side) on the built-in probes. The reference's own padding invariance is checked on the probe.
    padding_check: str = "probe"
    pairs: tuple[LabeledPair, ...] | None = None  # in-memory pairs (library callers); beats pairs_file
    # Torch models (the reference, seq-cls candidates): transformers, streamed (one layer at a time),
    # or auto = streamed when the whole fp32 model would not fit (qwen_convert/scoring/streamed).
    engine: str = "auto"
    cache_dir: Path | None = None  # score cache of the reference and the candidates (stream/cache.py); None = no cache
    memory_limit: int | None = None  # bytes a model may use; None = what the machine (and its cgroup) has left
    server: ServerOptions = ServerOptions()  # candidates that are URLs of running servers (qwen_convert/scoring/remote.py)


def check_options(options: VerifyOptions) -> None:
    if options.batch_size < 1:
        raise QconvError(f"batch size {options.batch_size} is not positive", "use --batch-size 1 or more")
    sides = options.padding_sides
    if not sides or any(s not in PADDING_SIDES for s in sides) or len(set(sides)) != len(sides):
        raise QconvError(f"padding sides {sides!r} are invalid", "use ('left', 'right'), or one of them")
    if options.padding_check not in PADDING_CHECKS:
        raise QconvError(f"padding check {options.padding_check!r} is invalid", f"use one of {', '.join(PADDING_CHECKS)}")
    if options.ndcg_gains not in ("auto", "labels", "reference"):
        raise QconvError(f"ndcg_gains {options.ndcg_gains!r} is invalid", "use auto, labels or reference")
    if options.ndcg_k < 1:
        raise QconvError(f"NDCG cut-off {options.ndcg_k} is not positive", "use k = 10")


def gate_table(options: VerifyOptions) -> dict[str, Gate]:
    """The gates in force: defaults, then options.gates, then the CLI tolerances."""
    table = dict(DEFAULT_GATES)
    table.update(options.gates or {})
    if options.tol_logit is not None:
        table["fp32"] = replace(table["fp32"], max_abs_logit=options.tol_logit)
    if options.tol_fp16 is not None:
        table["fp16"] = replace(table["fp16"], max_abs_logit=options.tol_fp16)
    table.update({p: replace(table[p], **drift_overrides(options)) for p in DRIFT_GATED if p in table})
    for precision, gate in table.items():
        for name in GATE_CHECKS:
            value = getattr(gate, name)
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise QconvError(f"the {precision} gate's {name} is {value}", "tolerances must be finite and not negative")
    return table


def drift_overrides(options: VerifyOptions) -> dict[str, float]:
    """The Gate fields the drift options set (those given), for bf16 and the quantized precisions."""
    given = {"min_retention": options.min_retention, "max_abs_prob": options.max_prob_drift,
             "p95_abs_prob": options.p95_prob_drift, "min_mean_kendall_tau": options.min_kendall_tau}
    return {name: value for name, value in given.items() if value is not None}
