"""One candidate's scores against the reference's: how far they moved, whether the rankings held,
and which gates that misses (gates.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.reranker import PromptEncoder, open_tokenizer
from qwen_convert.scoring.metrics import kendall_tau, mean_ndcg, ranking, sigmoid
from qwen_convert.scoring.probes import LabeledPair

from .gates import Failure, Gate, gate_failures
from .report import CandidateResult, Ranking


@dataclass(frozen=True)
class Baseline:
    """The reference's side of every comparison: its logits per padding side and what ranks them."""

    scores: Mapping[str, np.ndarray]  # side -> logits in the pairs' order (NaN where a side did not score a pair)
    pairs: Sequence[LabeledPair]
    groups: list[list[int]]  # pair indices per query
    gains: np.ndarray  # NDCG gains per pair (labels, or the reference's P(yes))
    ndcg: float | None
    k: int
    rows: Mapping[str, np.ndarray]  # side -> the pairs it scored
    padding_tol: float


@dataclass(frozen=True)
class Drift:
    """How far a candidate's scores moved from the reference's, over every pair each side scored."""

    max_abs_logit: float
    max_abs_prob: float
    p95_abs_prob: float  # over the pairs of the sides that scored every pair
    worst: dict  # the pair behind max |Δlogit|
    per_side: dict[str, dict]
    ranking: Ranking
    ndcg: float | None
    retention: float | None
    non_finite: int


def tokenizer_failures(path: Path, pairs: Sequence[LabeledPair], reference: PromptEncoder) -> list[Failure]:
    """A candidate is served with its own tokenizer: it must turn every prompt into the reference's ids."""
    try:
        encoder = PromptEncoder(open_tokenizer(path), reference.instruction, reference.max_length)
    except QconvError as exc:
        return [Failure("tokenizer", None, None, f"tokenizer unusable: {exc}")]
    failures = []
    if encoder.tokens != reference.tokens:
        failures.append(Failure("tokenizer", None, None, f"yes/no/pad ids {encoder.tokens} differ from the reference's {reference.tokens}"))
    differ = sum(encoder.ids(p) != reference.ids(p) for p in pairs)
    if differ:
        failures.append(Failure("tokenizer", float(differ), 0.0, f"tokenizer: {differ} of {len(pairs)} prompts tokenize differently from the reference"))
    return failures


def _ranking(groups: list[list[int]], ref: np.ndarray, cand: np.ndarray) -> tuple[int, int, list[float]]:
    identical = top1 = 0
    taus = []
    for idx in groups:
        r, c = ranking(ref[idx]), ranking(cand[idx])
        identical += bool(np.array_equal(r, c))
        top1 += bool(r[0] == c[0])
        taus.append(kendall_tau(ref[idx], cand[idx]))
    return identical, top1, taus


def measure(base: Baseline, cand: Mapping[str, np.ndarray]) -> Drift:
    """Differences on every pair each side scored (base.rows); ranking and NDCG on the sides that scored all."""
    ref, pairs = base.scores, base.pairs
    per_side: dict[str, dict] = {}
    worst = {"max_abs_logit": -1.0}
    max_prob = 0.0
    whole_probs, rank_stats, ndcgs = [], [], []
    for side in ref:
        idx = np.asarray(base.rows[side])
        with np.errstate(invalid="ignore"):
            d_logit = np.abs(cand[side][idx] - ref[side][idx])
            d_prob = np.abs(sigmoid(cand[side][idx]) - sigmoid(ref[side][idx]))
        # NaN must count as the worst possible difference, never as "no difference".
        d_logit = np.where(np.isnan(d_logit), np.inf, d_logit)
        d_prob = np.where(np.isnan(d_prob), 1.0, d_prob)
        j = int(np.argmax(d_logit))
        i = int(idx[j])
        per_side[side] = {"max_abs_logit": float(d_logit[j]), "max_abs_prob": float(d_prob.max()), "worst_pair": i,
                          "pairs": len(idx)}
        if d_logit[j] > worst["max_abs_logit"]:
            worst = {"max_abs_logit": float(d_logit[j]), "pair": i, "side": side, "query": pairs[i].query,
                     "reference_logit": float(ref[side][i]), "candidate_logit": float(cand[side][i])}
        max_prob = max(max_prob, float(d_prob.max()))
        if len(idx) == len(pairs):  # a padding probe has too few pairs to rank
            whole_probs.append(d_prob)
            rank_stats.append(_ranking(base.groups, ref[side], cand[side]))
            ndcgs.append(mean_ndcg(base.groups, cand[side], base.gains, base.k))
    max_logit = worst.pop("max_abs_logit")
    rank = Ranking(
        queries=len(base.groups),
        identical=min(s[0] for s in rank_stats),
        top1=min(s[1] for s in rank_stats),
        mean_kendall_tau=float(min(np.mean(s[2]) for s in rank_stats)),
        min_kendall_tau=float(min(min(s[2]) for s in rank_stats)),
    )
    ndcg = None if any(v is None for v in ndcgs) else min(ndcgs)
    retention = None if ndcg is None or base.ndcg is None else (ndcg / base.ndcg if base.ndcg > 0 else 1.0)
    non_finite = sum(int(np.count_nonzero(~np.isfinite(cand[side][base.rows[side]]))) for side in ref)
    return Drift(max_logit, max_prob, float(max(np.percentile(p, 95) for p in whole_probs)), worst, per_side, rank,
                 ndcg, retention, non_finite)


def _padding_failures(cand: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray], per_side: dict[str, dict], n: int,
                      gate: Gate | None, tol: float) -> list[Failure]:
    """The candidate's own padding invariance on each side that scored only the padding probe (its
    `padding_delta` in per_side). Gated where the precision is not gated in logits (int8, q4, ...):
    a probe of two pairs has no ranking, and a |ΔP| gate of 0.1-0.2 lets a row move by 0.5 in logit,
    so without this a graph broken only on that side would pass. Each row carries its own quantization error, which may change with the batch, so the limit
    is twice the worst |Δlogit| on the first side plus the reference's padding tolerance; a padding
    bug (pooling a pad token, an ignored mask over half a row) moves a score far more."""
    first = next(iter(cand))
    failures = []
    for side, idx in rows.items():
        if side == first or len(idx) == n or not len(idx):
            continue
        with np.errstate(invalid="ignore"):
            delta = np.abs(cand[side][idx] - cand[first][idx])
        delta = np.where(np.isnan(delta), np.inf, delta)
        j = int(np.argmax(delta))
        per_side[side]["padding_delta"] = float(delta[j])
        if gate is None or gate.max_abs_logit is not None:
            continue  # gated pair by pair against the reference, in logits, already
        limit = 2 * per_side[first]["max_abs_logit"] + tol
        per_side[side]["padding_limit"] = limit
        if not delta[j] <= limit:
            failures.append(Failure("padding", float(delta[j]), limit,
                                    f"{side} padding moves its own score by {delta[j]:.3e} > {limit:.1e} (pair {int(idx[j])}; "
                                    f"limit: twice its worst |Δlogit| with {first} padding + {tol:g})"))
    return failures


def compare(base: Baseline, path: Path, scorer, cand: Mapping[str, np.ndarray], gates: Mapping[str, Gate],
            extra_failures: Sequence[Failure] = ()) -> CandidateResult:
    """A candidate's result: its drift, and every check of its precision's gate that the drift misses
    (plus the failures found before scoring, e.g. its tokenizer's)."""
    drift = measure(base, cand)
    gate = gates.get(scorer.precision)
    failures = list(extra_failures)
    failures += _padding_failures(cand, base.rows, drift.per_side, len(base.pairs), gate, base.padding_tol)
    if drift.non_finite:
        failures.append(Failure("finite", float(drift.non_finite), 0.0, f"{drift.non_finite} scores are NaN or infinite"))
    if gate is None:
        failures.append(Failure("gate", None, None, f"no gate for precision {scorer.precision!r} (known: {', '.join(gates)})"))
    else:
        failures += gate_failures(gate, drift, base)
    return CandidateResult(
        path=str(path), name=scorer.name, kind=getattr(scorer.kind, "value", str(scorer.kind)), precision=scorer.precision,
        gate=gate, max_abs_logit=drift.max_abs_logit, max_abs_prob=drift.max_abs_prob, p95_abs_prob=drift.p95_abs_prob,
        worst=drift.worst, per_side=drift.per_side, ranking=drift.ranking, ndcg_reference=base.ndcg, ndcg=drift.ndcg,
        retention=drift.retention, failures=failures,
    )
