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
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from .checkpoint import load_config, open_checkpoint
from .errors import QconvError, SourceError
from .reranker import DEFAULT_INSTRUCTION, EncodedBatch, PaddingSide, Pair, PromptEncoder, open_tokenizer, pad_rows, reranker_tokens


class ArtifactKind(str, Enum):
    CAUSAL = "causal"
    SEQCLS = "seqcls"
    ONNX = "onnx"
    SERVER = "server"  # a running server's URL (qwen_convert/remote.py); scores texts, not token ids


class Scorer(Protocol):
    name: str  # e.g. "seqcls", "onnx/fp32", "onnx/q4f16"
    kind: ArtifactKind
    precision: str  # fp32 | fp16 | bf16 | int8 | q4 | q4f16: selects the verify gate

    def score(self, batch: EncodedBatch) -> np.ndarray: ...


def check_qwen3(config: dict, path: Path) -> None:
    """Refuse anything but Qwen3 (by model_type and by every declared architecture), naming what it is."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "qwen3" or not all(a.startswith("Qwen3") for a in archs):
        arch = ", ".join(archs) or model_type or "unknown"
        raise SourceError(f"{path} is a {arch} model, not Qwen3", "qconv converts Qwen3-Reranker checkpoints only")


def detect_kind(path: Path) -> ArtifactKind:
    path = Path(path)
    config = load_config(path)  # an ONNX export keeps config.json at its root too
    check_qwen3(config, path)
    if (path / "onnx").is_dir():
        return ArtifactKind.ONNX
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return ArtifactKind.SEQCLS
    if any(a.endswith("ForCausalLM") for a in archs):
        return ArtifactKind.CAUSAL
    raise SourceError(f"{path} has architectures {archs}", "expected Qwen3ForCausalLM or Qwen3ForSequenceClassification")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass
class CausalScorer:
    model: object
    yes_id: int
    no_id: int
    name: str = "causal"
    kind: ArtifactKind = ArtifactKind.CAUSAL
    precision: str = "fp32"
    engine: str = "transformers"

    def score(self, batch: EncodedBatch) -> np.ndarray:
        import torch

        ids = torch.from_numpy(batch.input_ids)
        mask = torch.from_numpy(batch.attention_mask)
        # Positions count real tokens only, so left padding does not shift RoPE.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            hidden = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            last = hidden[torch.arange(ids.shape[0]), torch.from_numpy(batch.last_index)]
            logits = self.model.lm_head(last).float()
        return (logits[:, self.yes_id] - logits[:, self.no_id]).double().numpy()


@dataclass
class SeqClsScorer:
    model: object
    name: str = "seqcls"
    kind: ArtifactKind = ArtifactKind.SEQCLS
    precision: str = "fp32"
    engine: str = "transformers"

    def score(self, batch: EncodedBatch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask))
        return out.logits[:, 0].double().numpy()


_STORED = {"BF16": "bfloat16", "F16": "float16"}


def _from_pretrained(auto_class, path: Path, dtype: str, checkpoint):
    """auto_class.from_pretrained in `dtype`. A float32 load of a checkpoint stored wholly in bf16 or
    fp16 loads it as stored and widens it after: the same fp32 weights bit for bit (widening is
    exact), without transformers' per-tensor conversion on load (0.6B: 1.4-1.7 s instead of 2.2-3.6 s)."""
    stored = {t.dtype for t in checkpoint.tensors.values()}
    load_as = _STORED.get(next(iter(stored))) if dtype == "float32" and len(stored) == 1 else None
    model = auto_class.from_pretrained(str(path), dtype=_torch_dtype(load_as or dtype))
    return (model.float() if load_as else model).eval()


def _load_causal(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    from transformers import AutoModelForCausalLM

    checkpoint = open_checkpoint(path)  # headers only: refuses pickle-only, truncated or incomplete weights up front
    tokens = reranker_tokens(open_tokenizer(path))
    model = _from_pretrained(AutoModelForCausalLM, path, dtype, checkpoint)
    return [CausalScorer(model, tokens.yes_id, tokens.no_id, precision=_PRECISION[dtype])]


def _check_seqcls(path: Path):
    """The checkpoint's headers, once its head and config are fit to score."""
    from transformers import AutoConfig

    checkpoint = open_checkpoint(path)
    if "score.weight" not in checkpoint.tensors:
        # transformers would silently initialise a random head and every score would be noise.
        raise SourceError(f"{path} declares a sequence classifier but its weights have no score.weight",
                          "re-run `qconv seqcls` on the original reranker")
    config = AutoConfig.from_pretrained(str(path))
    if config.num_labels != 1:
        raise SourceError(f"{path} is a sequence classifier with {config.num_labels} labels",
                          "qconv scores one-logit rerankers (num_labels: 1), as written by `qconv seqcls`")
    if config.pad_token_id is None:
        # Qwen3ForSequenceClassification finds the last real token by pad id; without one it cannot pool batches.
        raise SourceError(f"{path}/config.json has no pad_token_id", "set it to the tokenizer's pad id, or re-run `qconv seqcls`")
    return checkpoint


def _load_seqcls(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification, path, dtype, _check_seqcls(path))
    return [SeqClsScorer(model, precision=_PRECISION[dtype])]


def _load_onnx(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    try:
        from .onnx_scoring import load_onnx_scorers  # provided by the ONNX export module
    except ModuleNotFoundError as exc:
        if exc.name not in ("qwen_convert.onnx_scoring", "onnxruntime"):
            raise
        raise SourceError(f"{path} is an ONNX export, but ONNX scoring is unavailable ({exc.msg})",
                          "install qconv with onnxruntime") from exc
    return load_onnx_scorers(path, variants)


_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LOADERS: dict[ArtifactKind, Callable[[Path, Sequence[str], str], list[Scorer]]] = {
    ArtifactKind.CAUSAL: _load_causal,
    ArtifactKind.SEQCLS: _load_seqcls,
    ArtifactKind.ONNX: _load_onnx,
}


def _load_streamed(path: Path, kind: ArtifactKind, dtype: str, reporter) -> list[Scorer]:
    """The torch model at PATH as a layer-by-layer streamed fp32 forward (qwen_convert.stream)."""
    from .stream.engine import StreamedScorer

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
    from .stream.memory import available_bytes, streamed_estimate, torch_estimate

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
    from .progress import NULL

    path = Path(path)
    kind = kind or detect_kind(path)
    if kind is not ArtifactKind.ONNX and engine != "transformers":
        if choose_engine(path, kind, engine, dtype).engine == "streamed":
            return _load_streamed(path, kind, dtype, reporter or NULL)
    return LOADERS[kind](path, variants, dtype)


def score_pairs(scorer: Scorer, batches: Sequence[EncodedBatch], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """One logit per row over pre-encoded batches, concatenated in order (float64).

    A scorer with `score_batches` (the streamed engine) gets every batch at once: it streams the
    weights once for all of them instead of once per batch."""
    out = []
    whole = scorer.score_batches(batches) if hasattr(scorer, "score_batches") else None
    for i, batch in enumerate(batches):
        scores = np.asarray(whole[i] if whole is not None else scorer.score(batch), dtype=np.float64).reshape(-1)
        if scores.shape[0] != batch.input_ids.shape[0]:
            raise ValueError(f"{scorer.name} returned {scores.shape[0]} scores for a batch of {batch.input_ids.shape[0]}")
        out.append(scores)
        if on_batch is not None:
            on_batch(batch.input_ids.shape[0])
    return np.concatenate(out) if out else np.zeros(0)


# A batch of prompts in length order ends early where the next prompt would make its padded tokens
# exceed this multiple of its real ones: measured on verify's probes (ten prompts of 100-160 tokens,
# two of 512), batches of 8 padded 3,128 tokens for 2,307 real; cut at 1.25, 2,418.
MAX_PADDED_RATIO = 1.25


def encode_batches(encoder: PromptEncoder, pairs: Sequence[Pair], batch_size: int, padding_side: PaddingSide,
                   by_length: bool = False) -> list[EncodedBatch]:
    """Consecutive pairs in padded batches of at most batch_size (input order kept). by_length (pairs
    sorted from shortest prompt, see length_order): a batch also ends before a prompt that would pad it
    past MAX_PADDED_RATIO, so a long document gets a batch of its own instead of widening the others."""
    if batch_size < 1:
        raise QconvError(f"batch size {batch_size} is not positive", "use --batch-size 1 or more")
    if not by_length:
        return [encoder.encode(pairs[i : i + batch_size], padding_side) for i in range(0, len(pairs), batch_size)]
    rows = [encoder.ids(p) for p in pairs]
    return [pad_rows(rows[a:b], encoder.tokens.pad_id, padding_side) for a, b in length_batches([len(r) for r in rows], batch_size)]


def length_batches(lengths: Sequence[int], batch_size: int, ratio: float = MAX_PADDED_RATIO) -> list[tuple[int, int]]:
    """[start, stop) of each batch over ascending `lengths`: at most batch_size rows, and a row joins
    only if the batch, padded to it, stays within `ratio` × its real tokens."""
    bounds: list[tuple[int, int]] = []
    start, real = 0, 0
    for i, n in enumerate(lengths):
        rows = i - start + 1
        if i > start and (rows > batch_size or rows * n > ratio * (real + n)):
            bounds.append((start, i))
            start, real = i, 0
        real += n
    if len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def length_order(encoder: PromptEncoder, pairs: Sequence[Pair]) -> np.ndarray:
    """Indices of `pairs` from shortest to longest prompt: batching in this order halves padded tokens."""
    return np.argsort([len(encoder.ids(p)) for p in pairs], kind="stable")


def prompt_encoder(path: Path, instruction: str | None, max_length: int) -> PromptEncoder:
    return PromptEncoder(open_tokenizer(path), instruction or DEFAULT_INSTRUCTION, max_length)
