"""What verify found: per candidate, the reference, and the whole report (render and --json)."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .gates import Failure, Gate


@dataclass(frozen=True)
class Ranking:
    """Per-query agreement of a candidate's ranking with the reference's (worst padding side)."""

    queries: int
    identical: int  # queries whose full order is unchanged
    top1: int  # queries whose best document is unchanged
    mean_kendall_tau: float
    min_kendall_tau: float

    def to_dict(self) -> dict:
        return {"queries": self.queries, "identical": self.identical, "top1": self.top1,
                "mean_kendall_tau": self.mean_kendall_tau, "min_kendall_tau": self.min_kendall_tau}


@dataclass
class CandidateResult:
    path: str
    name: str  # scorer name: seqcls, causal, onnx/fp32, onnx/q4f16 ...
    kind: str
    precision: str
    gate: Gate | None
    max_abs_logit: float
    max_abs_prob: float
    worst: dict  # the pair behind max |Δlogit|
    per_side: dict[str, dict]
    ranking: Ranking
    ndcg_reference: float | None
    ndcg: float | None
    retention: float | None
    failures: list[Failure] = field(default_factory=list)
    p95_abs_prob: float | None = None  # over the pairs of the sides that scored every pair
    seconds: float = 0.0  # scoring time, all padding sides
    engine: str = ""  # transformers | streamed | onnxruntime
    peak_rss: int | None = None  # bytes, this process while scoring this candidate
    not_verified: str | None = None  # why it was not scored (e.g. it would not fit in memory)
    memory_needed: int | None = None  # estimated bytes
    cache: str = "off"  # off | miss | hit | stale | corrupt: whether its scores came from the score cache
    cache_path: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures and self.not_verified is None

    @property
    def label(self) -> str:
        return f"{Path(self.path).name} [{self.name}]"

    def to_dict(self) -> dict:
        return _finite({
            "path": self.path, "name": self.name, "kind": self.kind, "precision": self.precision,
            "passed": self.passed, "gate": self.gate.to_dict() if self.gate else None,
            "max_abs_logit": self.max_abs_logit, "max_abs_prob": self.max_abs_prob, "p95_abs_prob": self.p95_abs_prob,
            "worst": self.worst,
            "per_side": self.per_side, "ranking": self.ranking.to_dict(),
            "ndcg_reference": self.ndcg_reference, "ndcg": self.ndcg, "retention": self.retention,
            "failures": [f.to_dict() for f in self.failures], "seconds": round(self.seconds, 3),
            "engine": self.engine, "peak_rss_bytes": self.peak_rss, "not_verified": self.not_verified,
            "memory_needed_bytes": self.memory_needed, "cache": self.cache, "cache_path": self.cache_path,
        })


@dataclass
class ReferenceResult:
    path: str
    source: str
    ndcg: float | None
    max_padding_delta: float | None  # max |left − right| of the reference's own logits; None with one side
    padding_invariant: bool
    tolerance: float
    seconds: float = 0.0
    engine: str = "transformers"  # transformers | streamed
    peak_rss: int | None = None  # bytes, this process during the reference pass (None: read from the cache)
    cache: str = "off"  # off | miss | hit | stale | corrupt (stale and corrupt entries were recomputed)
    cache_path: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "source": self.source, "kind": "causal", "precision": "fp32", "ndcg": self.ndcg,
                "max_padding_delta": self.max_padding_delta, "padding_invariant": self.padding_invariant,
                "padding_tolerance": self.tolerance, "seconds": round(self.seconds, 3), "engine": self.engine,
                "peak_rss_bytes": self.peak_rss, "cache": self.cache, "cache_path": self.cache_path}


@dataclass
class VerifyReport:  # STYLE.md calls it ParityReport; both names work
    reference: ReferenceResult
    candidates: list[CandidateResult]
    pairs_source: str
    num_pairs: int
    num_queries: int
    num_truncated: int  # prompts cut to max_length (body only; prefix and suffix are kept)
    ndcg_gains: str  # labels | reference
    ndcg_k: int
    padding_sides: tuple[str, ...]
    batch_size: int
    max_length: int
    instruction: str
    gates: dict[str, Gate]
    batch_order: str  # length | given
    versions: dict[str, str]
    padding_check: str = "full"  # probe | full (VerifyOptions.padding_check)
    padding_rows: dict[str, int] = field(default_factory=dict)  # side -> pairs scored on it

    @property
    def passed(self) -> bool:
        return self.reference.padding_invariant and all(c.passed for c in self.candidates)

    @property
    def failed(self) -> bool:
        """A gate failed (as opposed to candidates left not verified, e.g. too big for this machine)."""
        return not self.reference.padding_invariant or any(c.failures for c in self.candidates)

    @property
    def not_verified(self) -> list[CandidateResult]:
        return [c for c in self.candidates if c.not_verified is not None]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "not_verified": [c.label for c in self.not_verified],
            "reference": self.reference.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "pairs": {"source": self.pairs_source, "count": self.num_pairs, "queries": self.num_queries,
                      "truncated": self.num_truncated},
            "ndcg": {"k": self.ndcg_k, "gains": self.ndcg_gains},
            "padding_sides": list(self.padding_sides),
            "padding_check": self.padding_check,
            "padding_rows": dict(self.padding_rows),
            "batch_size": self.batch_size,
            "batch_order": self.batch_order,
            "max_length": self.max_length,
            "instruction": self.instruction,
            "tolerances": {p: g.to_dict() for p, g in self.gates.items()},
            "versions": self.versions,
        }

    def _sides(self) -> str:
        def one(side: str) -> str:
            n = self.padding_rows.get(side, self.num_pairs)
            return side if n == self.num_pairs else f"{side} (probe: {n} pair{'s' if n != 1 else ''})"
        return " + ".join(one(side) for side in self.padding_sides)

    def render(self) -> str:
        ref = self.reference
        pad = ("n/a (one padding side)" if ref.max_padding_delta is None
               else f"{'ok' if ref.padding_invariant else 'FAILED'} (max |left−right| {ref.max_padding_delta:.1e})")
        lines = [
            f"reference  {ref.path} (causal, fp32, {ref.engine}"
            + (", cached" if ref.cache == "hit" else "")
            + (f", peak {ref.peak_rss / (1 << 30):.1f} GiB" if ref.peak_rss else "")
            + f")  NDCG@{self.ndcg_k} {_fmt(ref.ndcg, '.3f')}",
            f"pairs      {self.num_pairs} from {self.pairs_source}, {self.num_queries} queries; padding "
            f"{self._sides()}; batch {self.batch_size}; max length {self.max_length}"
            + (f" ({self.num_truncated} truncated)" if self.num_truncated else ""),
            f"reference padding invariance: {pad}",
            "",
        ]
        header = ("candidate", "prec", "max|Δlogit|", "max|ΔP|", "p95|ΔP|", "ranking", "NDCG ref→cand", "retention", "gate", "result")
        rows = [header]
        for c in self.candidates:
            rows.append((
                c.label + (" (cached)" if c.cache == "hit" else ""), c.precision, f"{c.max_abs_logit:.2e}", f"{c.max_abs_prob:.2e}",
                _fmt(c.p95_abs_prob, ".2e"), f"{c.ranking.identical}/{c.ranking.queries} τ {c.ranking.mean_kendall_tau:.2f} (min {c.ranking.min_kendall_tau:.2f})",
                f"{_fmt(c.ndcg_reference, '.3f')}→{_fmt(c.ndcg, '.3f')}", _fmt(c.retention, ".3f"),
                c.gate.describe() if c.gate else "none",
                "NOT VERIFIED" if c.not_verified and not c.failures else "PASS" if c.passed else "FAIL",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        for c in self.candidates:
            lines += [f"  FAIL {c.label}: {f.detail}" for f in c.failures]
            if c.not_verified:
                lines.append(f"  NOT VERIFIED {c.label}: {c.not_verified}")
        if not ref.padding_invariant:
            lines.append(f"  FAIL reference: its logits change with the padding side by {ref.max_padding_delta:.2e} "
                         f"(> {ref.tolerance:.0e}); the comparison cannot be trusted")
        lines.append("")
        lines.append("PASSED" if self.passed else "FAILED" if self.failed
                     else f"NOT VERIFIED ({len(self.not_verified)} candidate(s) not checked)")
        return "\n".join(lines)


def _finite(value):
    """Strict JSON has no NaN/Infinity: non-finite numbers become null (the failures say why)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def versions() -> dict[str, str]:
    """Versions of what computed the numbers (torch/transformers/onnxruntime only if they were used)."""
    from .. import __version__

    out = {"qconv": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "transformers", "onnxruntime", "onnx", "optimum"):
        mod = sys.modules.get(module)
        if mod is not None and getattr(mod, "__version__", None):
            out[module] = str(mod.__version__)
    return out


ParityReport = VerifyReport
