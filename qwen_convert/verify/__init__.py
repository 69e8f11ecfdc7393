"""Parity of candidates (seq-cls, ONNX variants, live servers) against the original causal reranker.

The pipeline of a verify, one module per step:
    options.py     VerifyOptions, checked; the gate table in force (defaults, recipe, CLI)
    plan.py        the pairs' batches per padding side (length order, the padding probe)
    reference.py   the reference pass (transformers or streamed), per padding side
    cache.py       reference and candidate scores on disk, keyed by all that could change them
    candidates.py  each candidate scored once, one model in memory at a time, or read from the cache
    server.py      candidates that are running servers (their own API shape, the likely cause)
    compare.py     a candidate's drift from the reference: |Δlogit|, |ΔP|, rankings, NDCG
    gates.py       per precision, what the drift must stay within, and the failures it collects
    report.py      VerifyReport: render and --json
    run.py         verify(): the steps above, in order

Imports the core modules, checkpoint/, hub/ and scoring/; never onnx/, pipeline/ or serve/.
"""

from .gates import DEFAULT_GATES, Gate
from .options import PADDING_CHECKS, PADDING_SIDES, VerifyOptions, gate_table
from .plan import plan_batches
from .report import ParityReport, VerifyReport
from .run import verify

__all__ = ["DEFAULT_GATES", "PADDING_CHECKS", "PADDING_SIDES", "Gate", "ParityReport", "VerifyOptions", "VerifyReport",
           "gate_table", "plan_batches", "verify"]
