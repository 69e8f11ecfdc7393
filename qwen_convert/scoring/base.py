"""The one interface every engine implements: an EncodedBatch in, one relevance logit per row out.

Logit conventions (so P(yes) = sigmoid(logit) everywhere):
  causal  : logit(yes) - logit(no) at the last real token, from the full lm_head logits
            (computed independently of the converted score head);
  seqcls  : the model's single logit, pooled by transformers itself (last non-pad token);
  onnx    : the graph's `logits` output, run by onnxruntime;
  server  : a running server's scores, as logits (scoring/remote.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qwen_convert.formats import ArtifactKind
from qwen_convert.reranker import EncodedBatch


class Scorer(Protocol):
    name: str  # e.g. "seqcls", "onnx/fp32", "onnx/q4f16"
    kind: ArtifactKind
    precision: str  # fp32 | fp16 | bf16 | int8 | q4 | q4f16: selects the verify gate

    def score(self, batch: EncodedBatch) -> np.ndarray: ...
