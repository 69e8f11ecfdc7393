"""Candidates that are running servers: the pairs sent once in the server's own API shape, its P(yes)
compared with every padding side of the reference, and on a mismatch the likely cause named."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from qwen_convert.progress import Reporter
from qwen_convert.reranker import PromptEncoder
from qwen_convert.scoring.metrics import sigmoid
from qwen_convert.scoring.probes import LabeledPair

from .compare import Baseline, compare
from .gates import DRIFT_GATES, QUANTIZED, Failure, Gate
from .options import VerifyOptions, drift_overrides
from .report import CandidateResult

# A server answers P(yes), in float32 at best, so its gates are in P (a logit recovered from a
# saturated P is not exact): fp32 ≤ 1e-4, fp16/bf16 ≤ 2e-2; quantized as gates.DRIFT_GATES.
SERVER_GATES: Mapping[str, Gate] = MappingProxyType({
    "fp32": Gate(max_abs_prob=1e-4),
    "fp16": Gate(max_abs_prob=2e-2),
    "bf16": Gate(max_abs_prob=2e-2),
    **DRIFT_GATES,
})


def server_gate_table(options: VerifyOptions) -> dict[str, Gate]:
    table = dict(SERVER_GATES)
    table.update({p: replace(table[p], **drift_overrides(options)) for p in QUANTIZED})
    return table


def _alternative_probabilities(reference: Path, pairs: Sequence[LabeledPair], encoder: PromptEncoder,
                               options: VerifyOptions, reporter: Reporter) -> dict:
    """P(yes) of the reference on the prompts a misconfigured server scores instead (remote.diagnose)."""
    from qwen_convert.reranker import DEFAULT_INSTRUCTION, pad_rows
    from qwen_convert.scoring.batches import encode_batches
    from qwen_convert.scoring.remote import DEFAULT_INSTRUCTION_IGNORED, NO_TEMPLATE, no_template_ids

    from .reference import reference_scores

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


def verify_server(scorer, base: Baseline, options: VerifyOptions, reference: Path, encoder: PromptEncoder,
                  reporter: Reporter) -> CandidateResult:
    """Score the pairs once on the server (it pads and batches as it likes), compare with every padding
    side of the reference, and on a mismatch name the likely cause."""
    from qwen_convert.scoring.remote import diagnose, probability_to_logit

    pairs = base.pairs
    reporter.log(f"candidate: {scorer.url} [{scorer.name}, {scorer.precision}]")
    task = reporter.task(f"{scorer.url} [{scorer.name}]", total=len(pairs))
    started = time.perf_counter()
    p = scorer.relevance(pairs, options.batch_size, on_batch=task.advance)
    seconds = time.perf_counter() - started
    with np.errstate(invalid="ignore"):
        logits = np.where((p >= 0) & (p <= 1), probability_to_logit(np.clip(p, 0, 1)), np.nan)
    result = compare(base, Path(scorer.url), scorer, {side: logits for side in base.scores}, server_gate_table(options))
    result.path, result.seconds, result.engine = scorer.url, seconds, "server"
    if result.failures:
        first = next(iter(base.scores))
        alternatives = _alternative_probabilities(reference, pairs, encoder, options, reporter)
        for cause in diagnose(p, sigmoid(base.scores[first]), alternatives, scorer.precision):
            result.failures.append(Failure("cause", None, None, f"likely cause: {cause}"))
    return result
