"""The gates: what a candidate of each precision must satisfy, and the failures it collects.

Like optimum's validation, every check that misses is kept (check, measured value, tolerance) and
reported together; a candidate passes only with none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

GATE_CHECKS = ("max_abs_logit", "max_abs_prob", "p95_abs_prob", "min_mean_kendall_tau", "min_retention")


@dataclass(frozen=True)
class Gate:
    """What a candidate of one precision must satisfy; None = reported, not gated."""

    max_abs_logit: float | None = None
    max_abs_prob: float | None = None  # max |ΔP(yes)| over every pair and padding side
    p95_abs_prob: float | None = None  # 95th percentile of |ΔP(yes)|: drift on most pairs, not one outlier
    min_mean_kendall_tau: float | None = None  # per-query Kendall τ with the reference's ranking, averaged
    min_retention: float | None = None  # NDCG@k(candidate) / NDCG@k(reference)

    def describe(self) -> str:
        parts = []
        if self.max_abs_logit is not None:
            parts.append(f"|Δlogit|≤{self.max_abs_logit:.0e}")
        if self.max_abs_prob is not None:
            parts.append(f"|ΔP|≤{self.max_abs_prob:g}")
        if self.p95_abs_prob is not None:
            parts.append(f"p95|ΔP|≤{self.p95_abs_prob:g}")
        if self.min_mean_kendall_tau is not None:
            parts.append(f"τ≥{self.min_mean_kendall_tau:g}")
        if self.min_retention is not None:
            parts.append(f"retention≥{self.min_retention:g}")
        return ", ".join(parts) or "report only"

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in GATE_CHECKS}


QUANTIZED = ("int8", "q4", "q4f16")


# fp32 : a correct yes−no head reproduces the reference to ~1e-6; a bf16-stored head already costs ~1e-3.
# fp16 : fp16 activations move logits by up to ~1e-2 on real models.
# quantized: the logits move by 1e-1 or more, so they are gated in P(yes) and in ranking, not in logits.
#   NDCG retention alone cannot see drift: on the trained tiny reranker rescaled to carry activation
#   outliers (an exact rescaling; fp32 unchanged), naive per-tensor int8 moved P(yes) by up to 0.42
#   with NDCG retention 0.99 (issue #19). Measured with the naive quantizers (BENCHMARKS.md, fidelity):
#                       max |ΔP|        p95 |ΔP|       mean τ
#                    probes  eval60  probes  eval60  probes  eval60   (probes: verify's default 40 pairs)
#   clean int8        0.008   0.028   0.006   0.012   0.94    0.99
#   clean q4/q4f16    0.019   0.137   0.016   0.030   0.88    0.97
#   outliers int8     0.207   0.423   0.062   0.138   0.94    0.88
#   outliers q4       0.070   0.263   0.042   0.074   1.00    0.95
#   So: max |ΔP| ≤ 0.1 for int8 (a user thresholding P at 0.5 must get the same answer within 0.1),
#   0.2 for 4-bit (round-to-nearest 4-bit moves one eval pair of the clean model by 0.137); p95 |ΔP|
#   ≤ 0.05 (most pairs: clean ≤ 0.03, outliers ≥ 0.06); mean per-query Kendall τ ≥ 0.8 (a backstop:
#   one swap among four documents is τ 0.67, so a per-query minimum would be noise); NDCG retention ≥ 0.97.
# bf16: only servers report it (server.py gates them in P); kept at retention for torch callers.
DRIFT_GATES: Mapping[str, Gate] = MappingProxyType({
    "int8": Gate(max_abs_prob=0.1, p95_abs_prob=0.05, min_mean_kendall_tau=0.8, min_retention=0.97),
    "q4": Gate(max_abs_prob=0.2, p95_abs_prob=0.05, min_mean_kendall_tau=0.8, min_retention=0.97),
    "q4f16": Gate(max_abs_prob=0.2, p95_abs_prob=0.05, min_mean_kendall_tau=0.8, min_retention=0.97),
})
DEFAULT_GATES: Mapping[str, Gate] = MappingProxyType({
    "fp32": Gate(max_abs_logit=1e-4),
    "fp16": Gate(max_abs_logit=2e-2),
    "bf16": Gate(min_retention=0.97),
    **DRIFT_GATES,
})
# The gates the drift overrides (--max-prob-drift, --p95-prob-drift, --min-kendall-tau, recipes) apply to.
DRIFT_GATED = ("bf16", *QUANTIZED)


@dataclass(frozen=True)
class Failure:
    check: str  # max_abs_logit | max_abs_prob | p95_abs_prob | kendall_tau | retention | padding | tokenizer | finite | gate
    value: float | None
    tolerance: float | None
    detail: str

    def to_dict(self) -> dict:
        return {"check": self.check, "value": self.value, "tolerance": self.tolerance, "detail": self.detail}


def gate_failures(gate: Gate, drift, base) -> list[Failure]:
    """Every check of `gate` that a candidate's drift (compare.Drift) misses, with value and tolerance."""
    failures = []
    where = f"pair {drift.worst['pair']}, {drift.worst['side']} padding" if drift.worst else "no pair"
    if gate.max_abs_logit is not None and not drift.max_abs_logit <= gate.max_abs_logit:
        failures.append(Failure("max_abs_logit", drift.max_abs_logit, gate.max_abs_logit,
                                f"max |Δlogit| {drift.max_abs_logit:.3e} > {gate.max_abs_logit:.1e} ({where})"))
    if gate.max_abs_prob is not None and not drift.max_abs_prob <= gate.max_abs_prob:
        failures.append(Failure("max_abs_prob", drift.max_abs_prob, gate.max_abs_prob,
                                f"max |ΔP(yes)| {drift.max_abs_prob:.3e} > {gate.max_abs_prob:g}"))
    if gate.p95_abs_prob is not None and not drift.p95_abs_prob <= gate.p95_abs_prob:
        failures.append(Failure("p95_abs_prob", drift.p95_abs_prob, gate.p95_abs_prob,
                                f"p95 |ΔP(yes)| {drift.p95_abs_prob:.3e} > {gate.p95_abs_prob:g}"))
    tau = drift.ranking.mean_kendall_tau
    if gate.min_mean_kendall_tau is not None and not tau >= gate.min_mean_kendall_tau:
        failures.append(Failure("kendall_tau", tau, gate.min_mean_kendall_tau,
                                f"mean per-query Kendall τ {tau:.4f} < {gate.min_mean_kendall_tau:g} "
                                f"({drift.ranking.identical}/{drift.ranking.queries} rankings identical)"))
    if gate.min_retention is not None:
        if drift.retention is None:
            failures.append(Failure("retention", None, gate.min_retention, f"NDCG@{base.k} retention cannot be computed (no relevant documents)"))
        elif not drift.retention >= gate.min_retention:
            ref = "n/a" if base.ndcg is None else f"{base.ndcg:.4f}"
            failures.append(Failure("retention", drift.retention, gate.min_retention,
                                    f"NDCG@{base.k} retention {drift.retention:.4f} < {gate.min_retention:g} "
                                    f"({ref} → {drift.ndcg:.4f})"))
    return failures
