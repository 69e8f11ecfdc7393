"""What a model directory is: Qwen3 or not, and causal reranker, seq-cls classifier or ONNX export."""

from __future__ import annotations

from pathlib import Path

from qwen_convert.errors import SourceError
from qwen_convert.formats import ArtifactKind

from .files import Checkpoint, load_config
from .heads import SCORE


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


def check_causal_qwen3(ckpt: Checkpoint) -> None:
    """Refuse anything that is not an unconverted Qwen3 causal LM, naming what it is instead."""
    check_qwen3(ckpt.config, ckpt.root)
    archs = ckpt.architectures
    if any(a.endswith("ForSequenceClassification") for a in archs) or SCORE in ckpt.tensors:
        raise SourceError(
            f"{ckpt.root} is already a sequence-classification model (it has a score head)",
            "use it as is, or pass the original causal Qwen3-Reranker",
        )
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise SourceError(f"{ckpt.root} has architectures {archs}", "expected Qwen3ForCausalLM")
