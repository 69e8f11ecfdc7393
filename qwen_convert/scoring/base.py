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


# scorer.engine -> the library named in a failure (an ONNX scorer has no `engine`: onnxruntime)
_LIBRARIES = {"transformers": "torch", "streamed": "torch (streamed engine)", "onnxruntime": "onnxruntime"}


def run_failure(scorer, exc: BaseException, operation: str = "run"):
    """A library's exception while `scorer` loads or runs, as one EngineError line that names the
    variant, the library, the file and the operation (the traceback stays on `__cause__`)."""
    from pathlib import Path

    from qwen_convert.errors import EngineError, first_line

    engine = getattr(scorer, "engine", "onnxruntime")
    library = _LIBRARIES.get(engine.split(" ")[0], engine)  # "onnxruntime q4-as-int8" is onnxruntime too
    path = getattr(scorer, "path", None)
    what = Path(path).name if path is not None else "the model"
    hint = ("re-export it with qconv export-onnx; QCONV_DEBUG=1 shows the traceback" if library == "onnxruntime" else
            "check the model files and free memory; QCONV_DEBUG=1 shows the traceback")
    return EngineError(f"{scorer.name}: {library} failed to {operation} {what}: {first_line(exc)}", hint)
