"""Scoring the candidates: one at a time (one model or ONNX session in memory), each from the score
cache when its inputs are unchanged, never loaded when it would not fit, then compared (compare.py)."""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.errors import SourceError
from qwen_convert.formats import ArtifactKind
from qwen_convert.progress import Reporter

from .compare import Baseline, compare, tokenizer_failures
from .gates import Failure, Gate
from .options import VerifyOptions
from .plan import Plan
from .report import CandidateResult, Ranking


def check_candidate(path: Path):
    from qwen_convert.checkpoint.kind import detect_kind

    path = Path(path)
    if not path.exists():
        raise SourceError(f"candidate {path} does not exist", "pass the output directory of `qconv seqcls` or `qconv export-onnx`")
    return detect_kind(path)


def _candidate_engine(path: Path, kind, options: VerifyOptions, batches: Mapping[str, list]):
    """The engine a candidate runs on and whether it fits (ONNX: decided per variant, see _variant_fit)."""
    from qwen_convert.checkpoint.files import load_config
    from qwen_convert.scoring.memory import activation_bytes
    from qwen_convert.scoring.registry import choose_engine

    from .reference import padded_tokens

    config = load_config(path)
    total, largest = padded_tokens(batches)
    tokens = largest if options.engine == "transformers" else total
    return choose_engine(path, kind, options.engine, "float32", options.memory_limit,
                         activation_bytes(tokens, int(config.get("hidden_size", 0)), int(config.get("intermediate_size", 0))))


def _variant_fit(scorer, choice, options: VerifyOptions, batches: Mapping[str, list]):
    """An ONNX variant's estimated peak against the memory budget (torch candidates: `choice` itself)."""
    from qwen_convert.formats import ArtifactKind
    from qwen_convert.scoring.memory import available_bytes, onnx_estimate
    from qwen_convert.scoring.registry import EngineChoice

    if getattr(scorer, "kind", None) is not ArtifactKind.ONNX or not hasattr(scorer, "path"):
        return choice
    from qwen_convert.scoring.onnx_scorers import external_data_files

    estimate = onnx_estimate(Path(scorer.path), scorer.precision, external_data_files(Path(scorer.path)))
    budget = options.memory_limit if options.memory_limit is not None else available_bytes()
    return EngineChoice("onnxruntime", estimate.needed, budget, estimate.what)


def _not_verified(path: Path, name: str, kind: str, precision: str, gates: Mapping[str, Gate], choice) -> CandidateResult:
    """A candidate that would not fit in memory: reported with what it needs, never loaded."""
    from qwen_convert.scoring.memory import describe

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


@dataclass
class CandidateRunner:
    """Every result of the candidates, in order: servers, torch models, and each ONNX variant."""

    base: Baseline
    plan: Plan
    options: VerifyOptions
    gates: Mapping[str, Gate]
    reporter: Reporter
    cache: object | None = None  # cache.ScoreCache, or None with the cache off
    results: list[CandidateResult] = field(default_factory=list)

    def run(self, kinds, verify_server) -> list[CandidateResult]:
        # Memory is freed and measured between candidates. Everything alive now (modules, tokenizers, the
        # reference's scores) is frozen out of the collector, so those collections scan only what a
        # candidate made: 0.2 s each otherwise once transformers is imported, 3 s of a 5-variant verify.
        gc.collect()
        gc.freeze()
        try:
            for path, kind in kinds:
                if kind is ArtifactKind.SERVER:
                    self.results.append(verify_server(path))
                else:
                    self.check(path, kind)
        finally:
            gc.unfreeze()
        return self.results

    def check(self, path: Path, kind: ArtifactKind) -> None:
        """A torch model (whole, from the cache, or not verified) or each variant of an ONNX export."""
        from qwen_convert.scoring.registry import load_scorers

        failures = tokenizer_failures(path, self.base.pairs, self.plan.encoder)
        choice = _candidate_engine(path, kind, self.options, self.plan.batches)
        found = material = None
        if kind is not ArtifactKind.ONNX:  # a torch model: nothing is loaded when its scores are cached
            found, material = self.cached(path, kind.value, "fp32", None, None, choice.engine)
            if found is not None and found.scores is not None:
                self.reporter.log(f"candidate: {path} [{kind.value}]: cached scores {found.path}")
                result = compare(self.base, path, _Cached(kind.value, "fp32", kind), found.scores, self.gates, failures)
                self.finish(result, found.scores, time.perf_counter(), choice.engine, None, choice.needed, found, material)
                return
        if not choice.fits:  # a torch candidate too big even streamed: reported, never loaded
            self.results.append(_not_verified(path, kind.value, kind.value, "fp32", self.gates, choice))
            return
        scorers = load_scorers(path, self.options.variants, "float32", kind, engine=choice.engine, reporter=self.reporter)
        if kind is ArtifactKind.ONNX:  # each variant's with-past graph too (onnx/prefix/), under the variant's gate
            from qwen_convert.scoring.prefix import shared_prefix_candidate

            scorers = [s for scorer in scorers for s in (scorer, shared_prefix_candidate(scorer)) if s is not None]
        while scorers:
            scorer = scorers.pop(0)  # dropped after use: one model (or ONNX session) in memory at a time
            self.score(path, kind, scorer, choice, failures, found, material)
            del scorer
            gc.collect()

    def score(self, path: Path, kind: ArtifactKind, scorer, choice, failures: list[Failure], found=None, material=None) -> None:
        """One scorer: from the cache (ONNX variants are looked up here, by their own files), or scored
        on every padding side; `found`/`material`: a torch candidate's cache lookup, made before loading."""
        from qwen_convert.scoring.memory import peak_rss, reset_peak

        from .reference import score_sides

        started = time.perf_counter()
        if kind is ArtifactKind.ONNX and getattr(scorer, "path", None) is not None:  # sessions start on first use
            found, material = self.cached(path, scorer.name, scorer.precision, Path(scorer.path),
                                          getattr(scorer, "threads", None), getattr(scorer, "engine", "onnxruntime"))
            if found is not None and found.scores is not None:
                self.reporter.log(f"candidate: {path} [{scorer.name}]: cached scores {found.path}")
                self.finish(compare(self.base, path, scorer, found.scores, self.gates, failures), found.scores, started,
                            getattr(scorer, "engine", "onnxruntime"), None, None, found, material)
                return
        fit = _variant_fit(scorer, choice, self.options, self.plan.batches)
        if not fit.fits:
            self.results.append(_not_verified(path, scorer.name, kind.value, scorer.precision, self.gates, fit))
            return
        self.reporter.log(f"candidate: {path} [{scorer.name}, {scorer.precision}]")
        reset_peak()
        started = time.perf_counter()
        cand = score_sides(scorer, self.plan.batches, self.plan.orders, self.reporter, f"{path.name} [{scorer.name}]")
        self.finish(compare(self.base, path, scorer, cand, self.gates, failures), cand, started,
                    getattr(scorer, "engine", "onnxruntime"), peak_rss(), fit.needed, found, material)

    def cached(self, path: Path, name: str, precision: str, onnx_path, threads, engine: str):
        """(lookup, key material) for a candidate's scores, or (None, None) with the cache off."""
        if self.cache is None:
            return None, None
        from .cache import candidate_key

        material = candidate_key(path, name, precision, onnx_path, threads, self.plan.batches, engine, self.plan.settings)
        found = self.cache.lookup(material, {side: len(self.base.pairs) for side in self.plan.batches})
        if found.reason:
            self.reporter.log(f"score cache entry {found.path} is {found.status} ({found.reason}); recomputing")
        return found, material

    def finish(self, result: CandidateResult, cand: Mapping[str, np.ndarray], started: float, engine: str, peak,
               needed, found, material) -> None:
        from .reference import all_finite

        result.seconds = time.perf_counter() - started
        result.engine, result.peak_rss, result.memory_needed = engine, peak, needed
        if found is not None:
            result.cache, result.cache_path = found.status, str(found.path)
            if found.scores is None and all_finite(cand, self.plan.orders):
                self.cache.store(material, cand, {"engine": engine, "seconds": round(result.seconds, 3)})
        self.results.append(result)
