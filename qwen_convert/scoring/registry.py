"""Scorers: anything that maps an EncodedBatch to one relevance logit per row.

One table from artifact kind to loader. `verify`, `score` and the ONNX checks all go through
`load_scorers`, so a new artifact kind is one new entry here.

Logit conventions (so P(yes) = sigmoid(logit) everywhere):
  causal  : logit(yes) - logit(no) at the last real token, from the full lm_head logits
            (computed independently of the converted score head);
  seqcls  : the model's single logit, pooled by transformers itself (last non-pad token);
  onnx    : the graph's `logits` output, run by onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.checkpoint.files import open_checkpoint
from qwen_convert.checkpoint.kind import detect_kind
from qwen_convert.errors import EngineError, QconvError, SourceError, first_line
from qwen_convert.formats import ArtifactKind
from qwen_convert.reranker import open_tokenizer, reranker_tokens

from .base import Scorer
from .torch_scorers import _check_seqcls, _load_causal, _load_seqcls


def _load_onnx(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    try:
        from .onnx_scorers import load_onnx_scorers  # provided by the ONNX export module
    except ModuleNotFoundError as exc:
        if exc.name not in ("qwen_convert.onnx_scoring", "onnxruntime"):
            raise
        raise SourceError(f"{path} is an ONNX export, but ONNX scoring is unavailable ({exc.msg})",
                          "install qconv with onnxruntime") from exc
    return load_onnx_scorers(path, variants)


LOADERS: dict[ArtifactKind, Callable[[Path, Sequence[str], str], list[Scorer]]] = {
    ArtifactKind.CAUSAL: _load_causal,
    ArtifactKind.SEQCLS: _load_seqcls,
    ArtifactKind.ONNX: _load_onnx,
}


def _load_streamed(path: Path, kind: ArtifactKind, dtype: str, reporter) -> list[Scorer]:
    """The torch model at PATH as a layer-by-layer streamed fp32 forward (qwen_convert.stream)."""
    from qwen_convert.scoring.streamed.engine import StreamedScorer

    if dtype != "float32":
        raise QconvError(f"the streamed engine computes in fp32, not {dtype}", "use --dtype float32, or --engine transformers")
    if kind is ArtifactKind.CAUSAL:
        open_checkpoint(path)
        tokens = reranker_tokens(open_tokenizer(path))
        return [StreamedScorer(path, "causal", tokens.yes_id, tokens.no_id, reporter=reporter)]
    _check_seqcls(path)
    return [StreamedScorer(path, "seqcls", name="seqcls", kind=ArtifactKind.SEQCLS, reporter=reporter)]


ENGINES = ("auto", "transformers", "streamed")


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # transformers | streamed | onnxruntime
    needed: int  # estimated peak bytes of that engine
    budget: int  # bytes it may use
    what: str  # how `needed` was estimated

    @property
    def fits(self) -> bool:
        return self.needed <= self.budget


def choose_engine(path: Path, kind: ArtifactKind, engine: str = "auto", dtype: str = "float32",
                  budget: int | None = None, activations: int = 0) -> EngineChoice:
    """Which engine scores a torch model: `auto` takes transformers when the whole model fits in the
    memory budget (default: what the machine and its cgroup have left), the streamed forward otherwise."""
    from .memory import available_bytes, streamed_estimate, torch_estimate

    if engine not in ENGINES:
        raise QconvError(f"engine {engine!r} is unknown", f"use one of {', '.join(ENGINES)}")
    budget = budget if budget is not None else available_bytes()
    if kind is ArtifactKind.ONNX:
        return EngineChoice("onnxruntime", 0, budget, "per variant")
    whole = torch_estimate(path, activations)
    if engine == "transformers" or (engine == "auto" and (dtype != "float32" or whole.fits(budget))):
        return EngineChoice("transformers", whole.needed, budget, whole.what)
    streamed = streamed_estimate(path, activations)
    return EngineChoice("streamed", streamed.needed, budget, streamed.what)


def load_scorers(path: Path, variants: Sequence[str] = (), dtype: str = "float32", kind: ArtifactKind | None = None,
                 engine: str = "transformers", reporter=None) -> list[Scorer]:
    """All scorers a directory provides (one for torch models, one per ONNX variant).

    `kind`: what detect_kind already said of `path`, for callers that checked it before loading.
    `engine` (torch models): transformers (the whole model in memory), streamed (one layer at a
    time, fp32), or auto (streamed only when the whole model would not fit; see choose_engine)."""
    from qwen_convert.progress import NULL

    path = Path(path)
    kind = kind or detect_kind(path)
    try:
        if kind is not ArtifactKind.ONNX and engine != "transformers":
            if choose_engine(path, kind, engine, dtype).engine == "streamed":
                return _load_streamed(path, kind, dtype, reporter or NULL)
        return LOADERS[kind](path, variants, dtype)
    except (QconvError, ModuleNotFoundError):
        raise
    except Exception as exc:  # transformers/torch/safetensors raise their own types for a model they cannot load
        raise EngineError(f"{kind.value}: torch failed to load {path}: {first_line(exc)}",
                          "check the model files and free memory; QCONV_DEBUG=1 shows the traceback") from exc
