"""torch engines: the causal reranker (yes - no at the last real token) and the seq-cls classifier,
each loaded whole by transformers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.files import open_checkpoint
from qwen_convert.checkpoint.rope import pretrained_kwargs, transformers_config
from qwen_convert.errors import SourceError
from qwen_convert.formats import ArtifactKind
from qwen_convert.reranker import EncodedBatch, open_tokenizer, reranker_tokens

from .base import Scorer


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
    from transformers.utils import logging as hf_logging

    stored = {t.dtype for t in checkpoint.tensors.values()}
    load_as = _STORED.get(next(iter(stored))) if dtype == "float32" and len(stored) == 1 else None
    # transformers 5 draws a "Loading weights" bar on stderr for every load, even under --quiet:
    # progress is the reporter's job.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # Under transformers 4.x, a transformers-5 config's RoPE (rope_parameters) given as the 4.x keys.
        model = auto_class.from_pretrained(str(path), dtype=_torch_dtype(load_as or dtype), **pretrained_kwargs(path))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return (model.float() if load_as else model).eval()


def _load_causal(path: Path, variants: Sequence[str], dtype: str) -> list[Scorer]:
    from transformers import AutoModelForCausalLM

    checkpoint = open_checkpoint(path)  # headers only: refuses pickle-only, truncated or incomplete weights up front
    tokens = reranker_tokens(open_tokenizer(path))
    model = _from_pretrained(AutoModelForCausalLM, path, dtype, checkpoint)
    return [CausalScorer(model, tokens.yes_id, tokens.no_id, precision=_PRECISION[dtype])]


def _check_seqcls(path: Path):
    """The checkpoint's headers, once its head and config are fit to score."""
    checkpoint = open_checkpoint(path)
    if "score.weight" not in checkpoint.tensors:
        # transformers would silently initialise a random head and every score would be noise.
        raise SourceError(f"{path} declares a sequence classifier but its weights have no score.weight",
                          "re-run `qconv seqcls` on the original reranker")
    config = transformers_config(path)
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


_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
