"""score_documents(model, query, documents) -> ScoreResult: rank documents with any reranker artifact.

Works the same on the original causal reranker, a seq-cls directory and an ONNX export (the
fastest verified variant on this machine unless one is named: choose.py), because all three go
through scoring.load_scorers. P(yes) is
sigmoid(logit) in every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.progress import NULL, Reporter
from qwen_convert.reranker import DEFAULT_MAX_LENGTH, PaddingSide

from .metrics import ranking, sigmoid
from .probes import LabeledPair, group_by_query, load_pairs

ONNX_DEFAULT_VARIANT = "fp32"


@dataclass(frozen=True)
class ScoreOptions:
    instruction: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    batch_size: int = 8
    variant: str | None = None  # ONNX exports only (default: the fastest verified one here, scoring/choose.py)
    dtype: str = "float32"  # torch models only: float32 | bfloat16 | float16
    padding_side: PaddingSide = "left"
    engine: str = "auto"  # torch models: auto | transformers | streamed (qwen_convert/scoring/streamed)
    share_prefix: bool = True  # ONNX exports with onnx/prefix/ graphs: run each query's shared prefix once (prefix.py)


@dataclass(frozen=True)
class ScoredDocument:
    index: int  # position among this query's documents, as given
    document: str
    logit: float
    p_yes: float
    rank: int  # 1 = most relevant
    label: float | None = None

    def to_dict(self) -> dict:
        out = {"rank": self.rank, "index": self.index, "p_yes": self.p_yes, "logit": self.logit, "document": self.document}
        if self.label is not None:
            out["label"] = self.label
        return out


@dataclass(frozen=True)
class QueryResult:
    query: str
    documents: tuple[ScoredDocument, ...]  # in rank order

    def to_dict(self) -> dict:
        return {"query": self.query, "results": [d.to_dict() for d in self.documents]}


@dataclass(frozen=True)
class ScoreResult:
    model: str
    kind: str
    scorer: str
    precision: str
    instruction: str
    max_length: int
    queries: tuple[QueryResult, ...]
    engine: str = ""  # transformers | streamed | onnxruntime
    shared_pairs: int = 0  # pairs scored through a shared prefix (the rest with full prompts)
    variant_choice: str = ""  # ONNX without --variant: why this variant (choose.py: measured, only candidate ...)
    kernels: str = ""  # what the session runs where it differs from the file (a q4 graph's int8 kernels on CPU)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "kind": self.kind, "scorer": self.scorer, "precision": self.precision, "engine": self.engine,
            "shared_pairs": self.shared_pairs, "variant_choice": self.variant_choice, "kernels": self.kernels,
            "instruction": self.instruction, "max_length": self.max_length,
            "queries": [q.to_dict() for q in self.queries],
        }

    def render(self, width: int = 88) -> str:
        lines = [f"model: {self.model} ({self.scorer}, {self.precision})"]
        for q in self.queries:
            lines += ["", f"query: {q.query}", f"{'rank':>4}  {'P(yes)':>7}  document"]
            for d in q.documents:
                text = " ".join(d.document.split())
                text = text if len(text) <= width else text[: width - 1] + "…"
                lines.append(f"{d.rank:>4}  {d.p_yes:7.4f}  {text}")
        return "\n".join(lines)


def _collect_pairs(query: str | None, documents: Sequence[str], pairs_file: Path | None) -> list[LabeledPair]:
    if pairs_file is not None:
        if query is not None or documents:
            raise QconvError("give either --query with --doc, or --pairs, not both", "put the query's documents in the pairs file")
        return load_pairs(pairs_file)
    if query is None and not documents:
        raise QconvError("nothing to score", "pass --query with one or more --doc, or --pairs FILE.jsonl")
    if query is None:
        raise QconvError("--doc given without --query", "add --query TEXT")
    if not query.strip():
        raise QconvError("the query is empty", "pass a non-empty --query")
    if not documents:
        raise QconvError("--query given without any --doc", "add one --doc TEXT per document")
    return [LabeledPair(query, doc) for doc in documents]


def score_documents(model: str | Path, query: str | None = None, documents: Sequence[str] = (),
                    pairs_file: Path | None = None, options: ScoreOptions = ScoreOptions(),
                    reporter: Reporter = NULL) -> ScoreResult:
    """Score every (query, document) pair and rank the documents of each query by P(yes)."""
    from qwen_convert.checkpoint.kind import detect_kind
    from qwen_convert.formats import ArtifactKind
    from qwen_convert.hub.resolve import resolve_model

    from .batches import prompt_encoder
    from .prefix import check_documents_fit, load_prefix_scorer, score_rows
    from .registry import load_scorers

    pairs = _collect_pairs(query, list(documents), pairs_file)
    resolved = resolve_model(model, reporter=reporter)
    kind = detect_kind(resolved.path)
    choice = None
    if kind is ArtifactKind.ONNX:
        choice = _onnx_variant(resolved.path, options.variant)
        variants: tuple[str, ...] = (choice.mode.value if choice is not None else options.variant or ONNX_DEFAULT_VARIANT,)
    elif options.variant is not None:
        raise QconvError(f"--variant {options.variant} applies to ONNX exports; {resolved.path} is a {kind.value} model", "drop --variant")
    else:
        variants = ()
    encoder = prompt_encoder(resolved.path, options.instruction, options.max_length)
    check_documents_fit(encoder, pairs)
    if options.batch_size < 1:
        raise QconvError(f"batch size {options.batch_size} is not positive", "use --batch-size 1 or more")
    rows = [encoder.ids(p) for p in pairs]
    scorers = load_scorers(resolved.path, variants, options.dtype, kind, engine=options.engine, reporter=reporter)
    if len(scorers) != 1:
        raise QconvError(f"{resolved.path} provides {len(scorers)} scorers for variant {variants}", "name one with --variant")
    scorer = scorers[0]
    prefix = load_prefix_scorer(scorer, parallel=True) if options.share_prefix else None
    task = reporter.task(f"scoring {len(pairs)} pairs", total=len(pairs))
    logits, plan = score_rows(scorer, prefix, rows, list(group_by_query(pairs).values()), options.batch_size,
                              options.padding_side, encoder.tokens.pad_id, on_rows=task.advance)
    probs = sigmoid(logits)

    queries = []
    for q, idx in group_by_query(pairs).items():
        order = ranking(logits[idx])
        rank_of = np.empty(len(idx), dtype=int)
        rank_of[order] = np.arange(1, len(idx) + 1)
        docs = [ScoredDocument(j, pairs[i].document, float(logits[i]), float(probs[i]), int(rank_of[j]), pairs[i].label)
                for j, i in enumerate(idx)]
        queries.append(QueryResult(q, tuple(sorted(docs, key=lambda d: d.rank))))
    return ScoreResult(
        model=str(resolved.path), kind=kind.value, scorer=scorer.name, precision=scorer.precision,
        instruction=encoder.instruction, max_length=options.max_length, queries=tuple(queries),
        engine=getattr(scorer, "engine", "onnxruntime"), shared_pairs=plan.shared_rows,
        variant_choice=choice.reason if choice is not None else "", kernels=getattr(scorer, "kernels", ""),
    )


def _onnx_variant(path: Path, requested: str | None):
    """The named variant, else the fastest verified one on this machine (choose.py); None where the
    export holds no variant file (the loader then says what is missing)."""
    from qwen_convert.formats import ONNX_DIR, QuantMode

    from .choose import choose_variant

    if requested is not None or not any((path / ONNX_DIR / m.file_name).is_file() for m in QuantMode):
        return None
    return choose_variant(path)
