"""verify(reference, candidates) -> VerifyReport: do the candidates score like the original reranker?

The reference is the causal model itself, scored without any converted head: logit(yes) − logit(no)
at the last real token (scoring.torch_scorers.CausalScorer), always in fp32. Every candidate (a
seq-cls directory, each variant of an ONNX export, a running server; scoring.registry.load_scorers is
the seam) runs on the same prompts in the same padded batches (plan.py). The candidate's precision
picks its gate from one table (gates.py); like optimum's validation, every check that misses is
collected and reported against its tolerance, and the report fails if any candidate fails or if the
reference itself depends on the padding side (then nothing measured against it can be trusted).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError, SourceError
from qwen_convert.formats import ArtifactKind
from qwen_convert.progress import NULL, Reporter
from qwen_convert.scoring.metrics import mean_ndcg, sigmoid
from qwen_convert.scoring.probes import group_by_query, has_labels, resolve_pairs

from .candidates import CandidateRunner, check_candidate
from .compare import Baseline
from .options import PADDING_SIDES, VerifyOptions, check_options, gate_table
from .plan import Plan, plan_batches
from .report import ReferenceResult, VerifyReport, versions


def verify(reference: str | Path, candidates: Sequence[Path | str], options: VerifyOptions = VerifyOptions(),
           reporter: Reporter = NULL) -> VerifyReport:
    """Score the probe pairs with the causal reference and every candidate; gate each by its precision."""
    from qwen_convert.scoring.remote import connect

    check_options(options)
    gates = gate_table(options)
    resolved, kinds = _refuse_early(reference, candidates, options, reporter)  # before any model is loaded
    plan = _plan(resolved.path, options)
    servers = {c: connect(c, options.server, plan.pairs[0], plan.encoder.instruction)
               for c, kind in kinds if kind is ArtifactKind.SERVER}
    base, reference_result = _reference(resolved, plan, options, reporter)
    runner = CandidateRunner(base, plan, options, gates, reporter, _score_cache(options))

    def server(url: str):
        from .server import verify_server

        return verify_server(servers[url], base, options, resolved.path, plan.encoder, reporter)

    results = runner.run(kinds, server)
    return VerifyReport(
        reference=reference_result, candidates=results, pairs_source=plan.source, num_pairs=len(plan.pairs),
        num_truncated=sum(plan.encoder.truncated(p) for p in plan.pairs),
        num_queries=len(plan.groups), ndcg_gains="labels" if plan.use_labels else "reference", ndcg_k=options.ndcg_k,
        padding_sides=tuple(options.padding_sides), batch_size=options.batch_size, max_length=options.max_length,
        padding_check=options.padding_check, padding_rows={side: len(rows) for side, rows in plan.orders.items()},
        instruction=plan.encoder.instruction, gates=gates, versions=versions(),
        batch_order="length" if options.sort_by_length else "given",
    )


def _refuse_early(reference: str | Path, candidates: Sequence[Path | str], options: VerifyOptions, reporter: Reporter):
    """(the resolved reference, [(candidate, kind)]): everything that can be refused, refused first."""
    from qwen_convert.checkpoint.kind import detect_kind
    from qwen_convert.hub.resolve import resolve_model
    from qwen_convert.scoring.remote import is_server_url

    resolved = resolve_model(reference, reporter=reporter)
    if detect_kind(resolved.path) is not ArtifactKind.CAUSAL:
        raise SourceError(f"reference {resolved.path} is not a causal reranker (Qwen3ForCausalLM)",
                          "the reference must be the original Qwen3-Reranker; pass converted models as candidates")
    kinds = [(str(c), ArtifactKind.SERVER) if is_server_url(str(c)) else (Path(c), check_candidate(Path(c))) for c in candidates]
    if options.variants and not any(kind is ArtifactKind.ONNX for _, kind in kinds):
        raise QconvError("--variant applies to ONNX exports, and no candidate is one", "drop --variant")
    return resolved, kinds


def _plan(reference: Path, options: VerifyOptions) -> Plan:
    from qwen_convert.scoring.batches import prompt_encoder

    if options.pairs is not None:
        pairs, source = list(options.pairs), "in-memory"
        if not pairs:
            raise QconvError("no pairs to verify on", "pass at least one (query, document) pair")
    else:
        pairs, source = resolve_pairs(options.pairs_file)
    use_labels = options.ndcg_gains == "labels" or (options.ndcg_gains == "auto" and has_labels(pairs))
    if use_labels and not has_labels(pairs):
        raise QconvError("ndcg_gains='labels' but some pairs have no label", 'add "label" to every line, or use gains from the reference')
    encoder = prompt_encoder(reference, options.instruction, options.max_length)
    batches, orders = plan_batches(encoder, pairs, options)
    settings = {"instruction": encoder.instruction, "max_length": options.max_length, "batch_size": options.batch_size,
                "padding_sides": list(options.padding_sides), "batch_order": "length" if options.sort_by_length else "given",
                "padding_check": options.padding_check, "pairs": len(pairs)}
    return Plan(pairs, source, encoder, batches, orders, list(group_by_query(pairs).values()), use_labels, settings)


def _reference(resolved, plan: Plan, options: VerifyOptions, reporter: Reporter) -> tuple[Baseline, ReferenceResult]:
    """The reference's scores (computed, or from the cache), its NDCG and its own padding invariance."""
    from .reference import all_finite, reference_scores

    run = reference_scores(resolved.path, plan.batches, plan.orders, plan.settings, options.engine, options.cache_dir,
                           options.memory_limit, reporter)
    ref = run.scores
    if not all_finite(ref, plan.orders):
        raise SourceError(f"the reference {resolved.path} produced NaN or infinite scores", "its weights are broken; re-download it")
    first = options.padding_sides[0]
    gains = np.array([p.label for p in plan.pairs], dtype=np.float64) if plan.use_labels else sigmoid(ref[first])
    ndcg = mean_ndcg(plan.groups, ref[first], gains, options.ndcg_k)
    orders = plan.orders
    both = np.intersect1d(orders[PADDING_SIDES[0]], orders[PADDING_SIDES[1]]) if len(ref) == 2 else None
    pad_delta = float(np.max(np.abs(ref["left"][both] - ref["right"][both]))) if both is not None and len(both) else None
    result = ReferenceResult(
        path=str(resolved.path), source=resolved.source, ndcg=ndcg, max_padding_delta=pad_delta,
        padding_invariant=pad_delta is None or bool(pad_delta <= options.tol_reference_padding),
        tolerance=options.tol_reference_padding, seconds=run.seconds, engine=run.engine, peak_rss=run.peak_rss,
        cache=run.cache, cache_path=str(run.cache_path) if run.cache_path else None,
    )
    base = Baseline(ref, plan.pairs, plan.groups, gains, ndcg, options.ndcg_k, orders, options.tol_reference_padding)
    return base, result


def _score_cache(options: VerifyOptions):
    if options.cache_dir is None:
        return None
    from .cache import ScoreCache

    return ScoreCache(Path(options.cache_dir))
