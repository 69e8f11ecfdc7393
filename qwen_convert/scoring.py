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

from .checkpoint import load_config
from .errors import SourceError
from .reranker import EncodedBatch, PromptEncoder, load_tokenizer, reranker_tokens


class ArtifactKind(str, Enum):
    CAUSAL = "causal"
    SEQCLS = "seqcls"
    ONNX = "onnx"


class Scorer(Protocol):
    name: str  # e.g. "seqcls", "onnx/fp32", "onnx/q4f16"
    kind: ArtifactKind
    precision: str  # fp32 | fp16 | bf16 | int8 | q4 | q4f16: selects the verify gate

    def score(self, batch: EncodedBatch) -> np.ndarray: ...


def check_qwen3(config: dict, path: Path) -> None:
    model_type = config.get("model_type")
    if model_type != "qwen3":
        arch = ", ".join(config.get("architectures") or []) or model_type or "unknown"
        raise SourceError(f"{path} is a {arch} model, not Qwen3", "qconv converts Qwen3-Reranker checkpoints only")


def detect_kind(path: Path) -> ArtifactKind:
    path = Path(path)
    if (path / "onnx").is_dir():
        return ArtifactKind.ONNX
    config = load_config(path)
    check_qwen3(config, path)
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

    def score(self, batch: EncodedBatch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask))
        return out.logits[:, 0].double().numpy()


def _load_causal(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    from transformers import AutoModelForCausalLM

    tokens = reranker_tokens(load_tokenizer(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_torch_dtype(dtype)).eval()
    return [CausalScorer(model, tokens.yes_id, tokens.no_id, precision=_PRECISION[dtype])]


def _load_seqcls(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=_torch_dtype(dtype)).eval()
    return [SeqClsScorer(model, precision=_PRECISION[dtype])]


def _load_onnx(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    from .onnx_scoring import load_onnx_scorers  # provided by the ONNX export module

    return load_onnx_scorers(path, variants)


_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LOADERS: dict[ArtifactKind, Callable[[Path, Sequence[str], str], list[Scorer]]] = {
    ArtifactKind.CAUSAL: _load_causal,
    ArtifactKind.SEQCLS: _load_seqcls,
    ArtifactKind.ONNX: _load_onnx,
}


def load_scorers(path: Path, variants: Sequence[str] = (), dtype: str = "float32") -> list[Scorer]:
    """All scorers a directory provides (one for torch models, one per ONNX variant)."""
    path = Path(path)
    return LOADERS[detect_kind(path)](path, variants, dtype)


def prompt_encoder(path: Path, instruction: str | None, max_length: int) -> PromptEncoder:
    from .reranker import DEFAULT_INSTRUCTION

    return PromptEncoder(load_tokenizer(path), instruction or DEFAULT_INSTRUCTION, max_length)
