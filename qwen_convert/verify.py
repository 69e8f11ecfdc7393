"""verify(reference, candidates) -> VerifyReport: do the candidates score like the original reranker?

The reference is the causal model itself, scored without any converted head: logit(yes) − logit(no)
at the last real token (scoring.CausalScorer), always in fp32. Every candidate (a seq-cls directory, or
each variant of an ONNX export: scoring.load_scorers is the seam) runs on the same prompts in the same
padded batches: every pair on the first padding side (in length order, batches cut before a prompt
that would pad the others past scoring.MAX_PADDED_RATIO), and on each other side a padding probe (the
two shortest prompts in one batch, padded to twice the shortest), or every pair on every side with
padding_check="full". The candidate's precision picks its gate from one table
(DEFAULT_GATES); like optimum's validation, every check that misses is collected and reported against
its tolerance, and the report fails if any candidate fails or if the reference itself depends on the
padding side (then nothing measured against it can be trusted).
"""

from __future__ import annotations

import gc
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .errors import QconvError, SourceError
from .metrics import kendall_tau, mean_ndcg, ranking, sigmoid
from .probes import LabeledPair, group_by_query, has_labels, resolve_pairs
from .progress import NULL, Reporter
from .remote import ServerOptions
from .reranker import DEFAULT_MAX_LENGTH, PaddingSide, PromptEncoder, open_tokenizer, pad_rows

PADDING_SIDES: tuple[PaddingSide, ...] = ("left", "right")
PADDING_CHECKS = ("probe", "full")
REFERENCE_PADDING_TOL = 1e-4


@dataclass(frozen=True)
class Gate:
    """What a candidate of one precision must satisfy; None = reported, not gated."""

    max_abs_logit: float | None = None
    max_abs_prob: float | None = None
    min_retention: float | None = None  # NDCG@k(candidate) / NDCG@k(reference)

    def describe(self) -> str:
        parts = []
        if self.max_abs_logit is not None:
            parts.append(f"|Δlogit|≤{self.max_abs_logit:.0e}")
        if self.max_abs_prob is not None:
            parts.append(f"|ΔP|≤{self.max_abs_prob:.0e}")
        if self.min_retention is not None:
            parts.append(f"retention≥{self.min_retention:g}")
        return ", ".join(parts) or "report only"

    def to_dict(self) -> dict:
        return {"max_abs_logit": self.max_abs_logit, "max_abs_prob": self.max_abs_prob, "min_retention": self.min_retention}


QUANTIZED = ("int8", "q4", "q4f16")
# fp32 : a correct yes−no head reproduces the reference to ~1e-6; a bf16-stored head already costs ~1e-3.
# fp16 : fp16 activations move logits by up to ~1e-2 on real models.
# bf16 and quantized: the logits move by 1e-1 or more; what must survive is the ranking, so they are
#        gated on NDCG retention, with max |Δlogit| and |ΔP(yes)| reported.
DEFAULT_GATES: Mapping[str, Gate] = MappingProxyType({
    "fp32": Gate(max_abs_logit=1e-4),
    "fp16": Gate(max_abs_logit=2e-2),
    "bf16": Gate(min_retention=0.97),
    **{mode: Gate(min_retention=0.97) for mode in QUANTIZED},
})


@dataclass(frozen=True)
class VerifyOptions:
    pairs_file: Path | None = None  # JSONL; None = the built-in probe set
    variants: tuple[str, ...] = ()  # ONNX variants to check (empty = all in the directory)
    tol_logit: float | None = None  # fp32 gate: max |Δlogit|
    tol_fp16: float | None = None  # fp16 gate: max |Δlogit|
    min_retention: float | None = None  # bf16 and quantized gates: min NDCG retention
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
    # or auto = streamed when the whole fp32 model would not fit (qwen_convert/stream).
    engine: str = "auto"
    cache_dir: Path | None = None  # score cache of the reference and the candidates (stream/cache.py); None = no cache
    memory_limit: int | None = None  # bytes a model may use; None = what the machine (and its cgroup) has left
    server: ServerOptions = ServerOptions()  # candidates that are URLs of running servers (qwen_convert/remote.py)


def gate_table(options: VerifyOptions) -> dict[str, Gate]:
    """The gates in force: defaults, then options.gates, then the CLI tolerances."""
    table = dict(DEFAULT_GATES)
    table.update(options.gates or {})
    if options.tol_logit is not None:
        table["fp32"] = replace(table["fp32"], max_abs_logit=options.tol_logit)
    if options.tol_fp16 is not None:
        table["fp16"] = replace(table["fp16"], max_abs_logit=options.tol_fp16)
    if options.min_retention is not None:
        for precision in ("bf16", *QUANTIZED):
            table[precision] = replace(table[precision], min_retention=options.min_retention)
    for precision, gate in table.items():
        for name in ("max_abs_logit", "max_abs_prob", "min_retention"):
            value = getattr(gate, name)
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise QconvError(f"the {precision} gate's {name} is {value}", "tolerances must be finite and not negative")
    return table


@dataclass(frozen=True)
class Failure:
    check: str  # max_abs_logit | max_abs_prob | retention | tokenizer | gate
    value: float | None
    tolerance: float | None
    detail: str

    def to_dict(self) -> dict:
        return {"check": self.check, "value": self.value, "tolerance": self.tolerance, "detail": self.detail}


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
            "max_abs_logit": self.max_abs_logit, "max_abs_prob": self.max_abs_prob, "worst": self.worst,
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
        header = ("candidate", "prec", "max|Δlogit|", "max|ΔP|", "ranking", "NDCG ref→cand", "retention", "gate", "result")
        rows = [header]
        for c in self.candidates:
            rows.append((
                c.label + (" (cached)" if c.cache == "hit" else ""), c.precision, f"{c.max_abs_logit:.2e}", f"{c.max_abs_prob:.2e}",
                f"{c.ranking.identical}/{c.ranking.queries} τ≥{c.ranking.min_kendall_tau:.2f}",
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
    from . import __version__

    out = {"qconv": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for module in ("torch", "transformers", "onnxruntime", "onnx", "optimum"):
        mod = sys.modules.get(module)
        if mod is not None and getattr(mod, "__version__", None):
            out[module] = str(mod.__version__)
    return out


# --- the run -------------------------------------------------------------------------------------

def _check_options(options: VerifyOptions) -> None:
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


def _check_candidate(path: Path):
    from .scoring import detect_kind

    path = Path(path)
    if not path.exists():
        raise SourceError(f"candidate {path} does not exist", "pass the output directory of `qconv seqcls` or `qconv export-onnx`")
    return detect_kind(path)


def _tokenizer_failures(path: Path, pairs: Sequence[LabeledPair], reference: PromptEncoder) -> list[Failure]:
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


def padding_probe(lengths: np.ndarray, by_length: np.ndarray) -> tuple[np.ndarray, int]:
    """(pair indices, batch width) of the one batch each other padding side scores: the shortest prompt
    and the next longer one (rows that end at different tokens, so a pooling index taken from the wrong
    row shows), padded to twice the shortest's length or to the longest prompt if that is shorter. At
    least half of the shortest row is padding, or the most the pairs allow, at a fraction of the cost
    of padding it to the longest prompt (2 x 204 tokens instead of 2 x 512 on the bench's probes)."""
    if not len(by_length):
        return by_length, 0
    shortest = int(by_length[0])
    longer = [int(i) for i in by_length if lengths[i] > lengths[shortest]][:1]
    rows = np.array([shortest, *longer])
    width = int(max(lengths[rows].max(), min(2 * lengths[shortest], lengths.max())))
    return rows, width


def plan_batches(encoder: PromptEncoder, pairs: Sequence[LabeledPair], options: VerifyOptions) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """(side -> padded batches, side -> the pair index of each of their rows): every pair on the first
    side, in length order (unless sort_by_length is off) and in batches cut where a longer prompt
    would pad the others past scoring.MAX_PADDED_RATIO; each other side per padding_check."""
    from .scoring import length_batches

    ids = encoder.batch_ids(pairs)  # one tokenizer call for every prompt
    lengths = np.array([len(row) for row in ids], dtype=np.int64)
    by_length = np.argsort(lengths, kind="stable")
    order = by_length if options.sort_by_length else np.arange(len(pairs))
    size = options.batch_size
    bounds = (length_batches(lengths[order], size) if options.sort_by_length
              else [(i, min(i + size, len(order))) for i in range(0, len(order), size)])
    pad = encoder.tokens.pad_id

    def batched(side: str) -> list:
        return [pad_rows([ids[i] for i in order[a:b]], pad, side) for a, b in bounds]

    first, *others = options.padding_sides
    batches, orders = {first: batched(first)}, {first: order}
    probe, width = padding_probe(lengths, by_length)
    for side in others:
        if options.padding_check == "full":
            batches[side], orders[side] = batched(side), order
        else:
            batches[side], orders[side] = [pad_rows([ids[i] for i in probe], pad, side, width)] if len(probe) else [], probe
    return batches, orders


def _score_sides(scorer, batches: Mapping[str, list], orders: Mapping[str, np.ndarray], reporter: Reporter, label: str) -> dict[str, np.ndarray]:
    """Logits per padding side, in the pairs' own order (NaN where a side did not score a pair)."""
    from .stream.reference import score_sides

    return score_sides(scorer, batches, orders, reporter, label)


def _candidate_engine(path: Path, kind, options: VerifyOptions, batches: Mapping[str, list]):
    """The engine a candidate runs on and whether it fits (ONNX: decided per variant, see _variant_fit)."""
    from .checkpoint import load_config
    from .scoring import choose_engine
    from .stream.memory import activation_bytes
    from .stream.reference import padded_tokens

    config = load_config(path)
    total, largest = padded_tokens(batches)
    tokens = largest if options.engine == "transformers" else total
    return choose_engine(path, kind, options.engine, "float32", options.memory_limit,
                         activation_bytes(tokens, int(config.get("hidden_size", 0)), int(config.get("intermediate_size", 0))))


def _variant_fit(scorer, choice, options: VerifyOptions, batches: Mapping[str, list]):
    """An ONNX variant's estimated peak against the memory budget (torch candidates: `choice` itself)."""
    from .scoring import EngineChoice
    from .stream.memory import available_bytes, onnx_estimate

    from .scoring import ArtifactKind

    if getattr(scorer, "kind", None) is not ArtifactKind.ONNX or not hasattr(scorer, "path"):
        return choice
    from .onnx_scoring import external_data_files

    estimate = onnx_estimate(Path(scorer.path), scorer.precision, external_data_files(Path(scorer.path)))
    budget = options.memory_limit if options.memory_limit is not None else available_bytes()
    return EngineChoice("onnxruntime", estimate.needed, budget, estimate.what)


def _not_verified(path: Path, name: str, kind: str, precision: str, gates: Mapping[str, Gate], choice) -> CandidateResult:
    """A candidate that would not fit in memory: reported with what it needs, never loaded."""
    from .stream.memory import describe

    nan = float("nan")
    reason = (f"needs about {describe(choice.needed)} ({choice.engine}: {choice.what}), "
              f"{describe(choice.budget)} available; run it on a bigger machine or raise --memory-limit")
    return CandidateResult(
        path=str(path), name=name, kind=kind, precision=precision, gate=gates.get(precision), max_abs_logit=nan,
        max_abs_prob=nan, worst={}, per_side={}, ranking=Ranking(0, 0, 0, nan, nan), ndcg_reference=None, ndcg=None,
        retention=None, engine=choice.engine, not_verified=reason, memory_needed=choice.needed,
    )


@dataclass(frozen=True)
class _Cached:
    """What _compare reads of a scorer, for a torch candidate whose scores came from the cache."""

    name: str
    precision: str
    kind: object


def _ranking(groups: list[list[int]], ref: np.ndarray, cand: np.ndarray) -> tuple[int, int, list[float]]:
    identical = top1 = 0
    taus = []
    for idx in groups:
        r, c = ranking(ref[idx]), ranking(cand[idx])
        identical += bool(np.array_equal(r, c))
        top1 += bool(r[0] == c[0])
        taus.append(kendall_tau(ref[idx], cand[idx]))
    return identical, top1, taus


def _padding_failures(cand: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray], per_side: dict[str, dict], n: int,
                      gate: Gate | None, tol: float) -> list[Failure]:
    """The candidate's own padding invariance on each side that scored only the padding probe (its
    `padding_delta` in per_side). Gated where the precision is gated by ranking alone (int8, q4, ...):
    a probe of two pairs has no ranking, and without this a graph broken only on that side would
    pass. Each row carries its own quantization error, which may change with the batch, so the limit
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
        if gate is None or gate.max_abs_logit is not None or gate.max_abs_prob is not None:
            continue  # gated pair by pair against the reference already
        limit = 2 * per_side[first]["max_abs_logit"] + tol
        per_side[side]["padding_limit"] = limit
        if not delta[j] <= limit:
            failures.append(Failure("padding", float(delta[j]), limit,
                                    f"{side} padding moves its own score by {delta[j]:.3e} > {limit:.1e} (pair {int(idx[j])}; "
                                    f"limit: twice its worst |Δlogit| with {first} padding + {tol:g})"))
    return failures


def _compare(path: Path, scorer, ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], pairs: Sequence[LabeledPair],
             groups: list[list[int]], gains: np.ndarray, ndcg_ref: float | None, k: int, gates: Mapping[str, Gate],
             extra_failures: list[Failure], rows: Mapping[str, np.ndarray], padding_tol: float = REFERENCE_PADDING_TOL) -> CandidateResult:
    """Differences on every pair each side scored (`rows`); ranking and NDCG on the sides that scored all;
    a side that scored only the padding probe against the candidate's own first side too (_padding_failures)."""
    per_side: dict[str, dict] = {}
    worst = {"max_abs_logit": -1.0}
    max_prob = 0.0
    rank_stats = []
    ndcgs = []
    for side in ref:
        idx = np.asarray(rows[side])
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
            rank_stats.append(_ranking(groups, ref[side], cand[side]))
            ndcgs.append(mean_ndcg(groups, cand[side], gains, k))
    max_logit = worst.pop("max_abs_logit")
    rank = Ranking(
        queries=len(groups),
        identical=min(s[0] for s in rank_stats),
        top1=min(s[1] for s in rank_stats),
        mean_kendall_tau=float(min(np.mean(s[2]) for s in rank_stats)),
        min_kendall_tau=float(min(min(s[2]) for s in rank_stats)),
    )
    ndcg = None if any(v is None for v in ndcgs) else min(ndcgs)
    retention = None if ndcg is None or ndcg_ref is None else (ndcg / ndcg_ref if ndcg_ref > 0 else 1.0)

    gate = gates.get(scorer.precision)
    failures = list(extra_failures)
    failures += _padding_failures(cand, rows, per_side, len(pairs), gate, padding_tol)
    non_finite = sum(int(np.count_nonzero(~np.isfinite(cand[side][rows[side]]))) for side in ref)
    if non_finite:
        failures.append(Failure("finite", float(non_finite), 0.0, f"{non_finite} scores are NaN or infinite"))
    if gate is None:
        failures.append(Failure("gate", None, None, f"no gate for precision {scorer.precision!r} (known: {', '.join(gates)})"))
    else:
        where = f"pair {worst['pair']}, {worst['side']} padding"
        if gate.max_abs_logit is not None and not max_logit <= gate.max_abs_logit:
            failures.append(Failure("max_abs_logit", max_logit, gate.max_abs_logit,
                                    f"max |Δlogit| {max_logit:.3e} > {gate.max_abs_logit:.1e} ({where})"))
        if gate.max_abs_prob is not None and not max_prob <= gate.max_abs_prob:
            failures.append(Failure("max_abs_prob", max_prob, gate.max_abs_prob,
                                    f"max |ΔP(yes)| {max_prob:.3e} > {gate.max_abs_prob:.1e}"))
        if gate.min_retention is not None:
            if retention is None:
                failures.append(Failure("retention", None, gate.min_retention, f"NDCG@{k} retention cannot be computed (no relevant documents)"))
            elif not retention >= gate.min_retention:
                failures.append(Failure("retention", retention, gate.min_retention,
                                        f"NDCG@{k} retention {retention:.4f} < {gate.min_retention:g} "
                                        f"({_fmt(ndcg_ref, '.4f')} → {_fmt(ndcg, '.4f')})"))
    return CandidateResult(
        path=str(path), name=scorer.name, kind=getattr(scorer.kind, "value", str(scorer.kind)), precision=scorer.precision,
        gate=gate, max_abs_logit=max_logit, max_abs_prob=max_prob, worst=worst, per_side=per_side, ranking=rank,
        ndcg_reference=ndcg_ref, ndcg=ndcg, retention=retention, failures=failures,
    )


def verify(reference: str | Path, candidates: Sequence[Path | str], options: VerifyOptions = VerifyOptions(),
           reporter: Reporter = NULL) -> VerifyReport:
    """Score the probe pairs with the causal reference and every candidate; gate each by its precision."""
    from .resolve import resolve_model
    from .remote import connect, is_server_url
    from .scoring import ArtifactKind, detect_kind, load_scorers, prompt_encoder

    _check_options(options)
    gates = gate_table(options)
    if options.pairs is not None:
        pairs, pairs_source = list(options.pairs), "in-memory"
        if not pairs:
            raise QconvError("no pairs to verify on", "pass at least one (query, document) pair")
    else:
        pairs, pairs_source = resolve_pairs(options.pairs_file)

    # Everything that can be refused is refused before any model is loaded.
    resolved = resolve_model(reference, reporter=reporter)
    if detect_kind(resolved.path) is not ArtifactKind.CAUSAL:
        raise SourceError(f"reference {resolved.path} is not a causal reranker (Qwen3ForCausalLM)",
                          "the reference must be the original Qwen3-Reranker; pass converted models as candidates")
    kinds = [(str(c), ArtifactKind.SERVER) if is_server_url(str(c)) else (Path(c), _check_candidate(Path(c))) for c in candidates]
    if options.variants and not any(kind is ArtifactKind.ONNX for _, kind in kinds):
        raise QconvError("--variant applies to ONNX exports, and no candidate is one", "drop --variant")

    encoder = prompt_encoder(resolved.path, options.instruction, options.max_length)
    servers = {c: connect(c, options.server, pairs[0], encoder.instruction) for c, kind in kinds if kind is ArtifactKind.SERVER}
    batches, orders = plan_batches(encoder, pairs, options)
    groups = list(group_by_query(pairs).values())
    use_labels = options.ndcg_gains == "labels" or (options.ndcg_gains == "auto" and has_labels(pairs))
    if use_labels and not has_labels(pairs):
        raise QconvError("ndcg_gains='labels' but some pairs have no label", 'add "label" to every line, or use gains from the reference')

    from .stream.reference import all_finite, reference_scores

    settings = {"instruction": encoder.instruction, "max_length": options.max_length, "batch_size": options.batch_size,
                "padding_sides": list(options.padding_sides), "batch_order": "length" if options.sort_by_length else "given",
                "padding_check": options.padding_check, "pairs": len(pairs)}
    run = reference_scores(resolved.path, batches, orders, settings, options.engine, options.cache_dir,
                           options.memory_limit, reporter)
    ref, ref_seconds = run.scores, run.seconds
    if not all_finite(ref, orders):
        raise SourceError(f"the reference {resolved.path} produced NaN or infinite scores", "its weights are broken; re-download it")

    first = options.padding_sides[0]
    gains = (np.array([p.label for p in pairs], dtype=np.float64) if use_labels else sigmoid(ref[first]))
    ndcg_ref = mean_ndcg(groups, ref[first], gains, options.ndcg_k)
    both = np.intersect1d(orders[PADDING_SIDES[0]], orders[PADDING_SIDES[1]]) if len(ref) == 2 else None
    pad_delta = float(np.max(np.abs(ref["left"][both] - ref["right"][both]))) if both is not None and len(both) else None
    reference_result = ReferenceResult(
        path=str(resolved.path), source=resolved.source, ndcg=ndcg_ref, max_padding_delta=pad_delta,
        padding_invariant=pad_delta is None or bool(pad_delta <= options.tol_reference_padding),
        tolerance=options.tol_reference_padding, seconds=ref_seconds, engine=run.engine, peak_rss=run.peak_rss,
        cache=run.cache, cache_path=str(run.cache_path) if run.cache_path else None,
    )

    from .stream.memory import peak_rss, reset_peak

    cache = None
    if options.cache_dir is not None:
        from .stream.cache import ScoreCache

        cache = ScoreCache(Path(options.cache_dir))
    sizes = {side: len(pairs) for side in batches}

    def finish(result: CandidateResult, cand: dict[str, np.ndarray], started: float, engine: str, peak,
               needed, found, material) -> None:
        result.seconds = time.perf_counter() - started
        result.engine, result.peak_rss, result.memory_needed = engine, peak, needed
        if found is not None:
            result.cache, result.cache_path = found.status, str(found.path)
            if found.scores is None and all_finite(cand, orders):
                cache.store(material, cand, {"engine": engine, "seconds": round(result.seconds, 3)})
        results.append(result)

    def cached(path: Path, name: str, precision: str, onnx_path, threads, engine: str):
        """(lookup, key material) for a candidate's scores, or (None, None) with the cache off."""
        if cache is None:
            return None, None
        from .stream.cache import candidate_key

        material = candidate_key(path, name, precision, onnx_path, threads, batches, engine, settings)
        found = cache.lookup(material, sizes)
        if found.reason:
            reporter.log(f"score cache entry {found.path} is {found.status} ({found.reason}); recomputing")
        return found, material

    def compare(path: Path, scorer, scores: dict[str, np.ndarray], tokenizer_failures: list[Failure]) -> CandidateResult:
        return _compare(path, scorer, ref, scores, pairs, groups, gains, ndcg_ref, options.ndcg_k, gates, tokenizer_failures,
                        orders, options.tol_reference_padding)

    def check(path, kind) -> None:
        """Every result of one candidate (a server, a torch model, or each variant of an ONNX export)."""
        if kind is ArtifactKind.SERVER:
            results.append(_verify_server(servers[path], options, pairs, ref, groups, gains, ndcg_ref, resolved.path, encoder, reporter, orders))
            return
        tokenizer_failures = _tokenizer_failures(path, pairs, encoder)
        choice = _candidate_engine(path, kind, options, batches)
        if kind is not ArtifactKind.ONNX:  # a torch model: nothing is loaded when its scores are cached
            found, material = cached(path, kind.value, "fp32", None, None, choice.engine)
            if found is not None and found.scores is not None:
                reporter.log(f"candidate: {path} [{kind.value}]: cached scores {found.path}")
                result = compare(path, _Cached(kind.value, "fp32", kind), found.scores, tokenizer_failures)
                finish(result, found.scores, time.perf_counter(), choice.engine, None, choice.needed, found, material)
                return
        if not choice.fits:  # a torch candidate too big even streamed: reported, never loaded
            results.append(_not_verified(path, kind.value, kind.value, "fp32", gates, choice))
            return
        scorers = load_scorers(path, options.variants, "float32", kind, engine=choice.engine, reporter=reporter)
        while scorers:
            scorer = scorers.pop(0)  # dropped after use: one model (or ONNX session) in memory at a time
            started = time.perf_counter()
            if kind is ArtifactKind.ONNX:  # sessions start on first use: none is made for cached scores
                found = material = None
            if kind is ArtifactKind.ONNX and getattr(scorer, "path", None) is not None:
                found, material = cached(path, scorer.name, scorer.precision, Path(scorer.path),
                                         getattr(scorer, "threads", None), "onnxruntime")
                if found is not None and found.scores is not None:
                    reporter.log(f"candidate: {path} [{scorer.name}]: cached scores {found.path}")
                    finish(compare(path, scorer, found.scores, tokenizer_failures), found.scores, started, "onnxruntime",
                           None, None, found, material)
                    continue
            fit = _variant_fit(scorer, choice, options, batches)
            if not fit.fits:
                results.append(_not_verified(path, scorer.name, kind.value, scorer.precision, gates, fit))
                continue
            reporter.log(f"candidate: {path} [{scorer.name}, {scorer.precision}]")
            reset_peak()
            started = time.perf_counter()
            cand = _score_sides(scorer, batches, orders, reporter, f"{path.name} [{scorer.name}]")
            finish(compare(path, scorer, cand, tokenizer_failures), cand, started, getattr(scorer, "engine", "onnxruntime"),
                   peak_rss(), fit.needed, found, material)
            del scorer
            gc.collect()

    results: list[CandidateResult] = []
    # Memory is freed and measured between candidates. Everything alive now (modules, tokenizers, the
    # reference's scores) is frozen out of the collector, so those collections scan only what a
    # candidate made: 0.2 s each otherwise once transformers is imported, 3 s of a 5-variant verify.
    gc.collect()
    gc.freeze()
    try:
        for path, kind in kinds:
            check(path, kind)
    finally:
        gc.unfreeze()

    return VerifyReport(
        reference=reference_result, candidates=results, pairs_source=pairs_source, num_pairs=len(pairs),
        num_truncated=sum(encoder.truncated(p) for p in pairs),
        num_queries=len(groups), ndcg_gains="labels" if use_labels else "reference", ndcg_k=options.ndcg_k,
        padding_sides=tuple(options.padding_sides), batch_size=options.batch_size, max_length=options.max_length,
        padding_check=options.padding_check, padding_rows={side: len(rows) for side, rows in orders.items()},
        instruction=encoder.instruction, gates=gates, versions=versions(),
        batch_order="length" if options.sort_by_length else "given",
    )



# --- candidates that are running servers (qwen_convert/remote.py) --------------------------------

# A server answers P(yes), in float32 at best, so its gates are in P (a logit recovered from a
# saturated P is not exact): fp32 ≤ 1e-4, fp16/bf16 ≤ 2e-2; quantized by NDCG retention as above.
SERVER_GATES: Mapping[str, Gate] = MappingProxyType({
    "fp32": Gate(max_abs_prob=1e-4),
    "fp16": Gate(max_abs_prob=2e-2),
    "bf16": Gate(max_abs_prob=2e-2),
    **{mode: Gate(min_retention=0.97) for mode in QUANTIZED},
})


def server_gate_table(options: VerifyOptions) -> dict[str, Gate]:
    table = dict(SERVER_GATES)
    if options.min_retention is not None:
        for precision in QUANTIZED:
            table[precision] = replace(table[precision], min_retention=options.min_retention)
    return table


def _alternative_probabilities(reference: Path, pairs: Sequence[LabeledPair], encoder: PromptEncoder,
                               options: VerifyOptions, reporter: Reporter) -> dict:
    """P(yes) of the reference on the prompts a misconfigured server scores instead (remote.diagnose)."""
    from .reranker import DEFAULT_INSTRUCTION, pad_rows
    from .remote import DEFAULT_INSTRUCTION_IGNORED, NO_TEMPLATE, no_template_ids
    from .scoring import encode_batches
    from .stream.reference import reference_scores

    size = options.batch_size
    order = np.arange(len(pairs))
    rows = no_template_ids(encoder.tokenizer, pairs)
    prompts = {NO_TEMPLATE: [pad_rows(rows[s : s + size], encoder.tokens.pad_id, "right") for s in range(0, len(rows), size)]}
    if encoder.instruction != DEFAULT_INSTRUCTION:
        default = PromptEncoder(encoder.tokenizer, DEFAULT_INSTRUCTION, encoder.max_length)
        prompts[DEFAULT_INSTRUCTION_IGNORED] = encode_batches(default, pairs, size, "right")
    out = {}
    for alt, batches in prompts.items():
        settings = {"prompt": alt.name, "instruction": encoder.instruction, "max_length": options.max_length,
                    "batch_size": size, "padding_sides": ["right"], "batch_order": "given", "pairs": len(pairs)}
        run = reference_scores(reference, {"right": batches}, {"right": order}, settings, options.engine, options.cache_dir,
                               options.memory_limit, reporter)
        out[alt] = sigmoid(run.scores["right"])
    return out


def _verify_server(scorer, options: VerifyOptions, pairs: Sequence[LabeledPair], ref: dict[str, np.ndarray],
                   groups: list[list[int]], gains: np.ndarray, ndcg_ref: float | None, reference: Path,
                   encoder: PromptEncoder, reporter: Reporter, rows: Mapping[str, np.ndarray]) -> CandidateResult:
    """Score the pairs once on the server (it pads and batches as it likes), compare with every padding
    side of the reference, and on a mismatch name the likely cause."""
    from .remote import diagnose, probability_to_logit

    reporter.log(f"candidate: {scorer.url} [{scorer.name}, {scorer.precision}]")
    task = reporter.task(f"{scorer.url} [{scorer.name}]", total=len(pairs))
    started = time.perf_counter()
    p = scorer.relevance(pairs, options.batch_size, on_batch=task.advance)
    seconds = time.perf_counter() - started
    with np.errstate(invalid="ignore"):
        logits = np.where((p >= 0) & (p <= 1), probability_to_logit(np.clip(p, 0, 1)), np.nan)
    result = _compare(Path(scorer.url), scorer, ref, {side: logits for side in ref}, pairs, groups, gains, ndcg_ref,
                      options.ndcg_k, server_gate_table(options), [], rows)
    result.path, result.seconds, result.engine = scorer.url, seconds, "server"
    if result.failures:
        first = next(iter(ref))
        alternatives = _alternative_probabilities(reference, pairs, encoder, options, reporter)
        for cause in diagnose(p, sigmoid(ref[first]), alternatives, scorer.precision):
            result.failures.append(Failure("cause", None, None, f"likely cause: {cause}"))
    return result


ParityReport = VerifyReport
