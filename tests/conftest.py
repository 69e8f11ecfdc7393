"""Session-wide fixtures: tiny Qwen3 rerankers built locally (never downloaded)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tests never reach a hub: make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# verify's reference cache defaults to ~/.cache/qconv: tests keep theirs in a throw-away directory.
os.environ.setdefault("QCONV_CACHE_DIR", tempfile.mkdtemp(prefix="qconv-test-cache-"))

from qwen_convert.fixtures import TinySpec, build_tiny_reranker  # noqa: E402

SPECS = {
    "tied_fp32": TinySpec(tied=True, dtype="float32", seed=1),
    "untied_fp32": TinySpec(tied=False, dtype="float32", seed=2),
    "tied_bf16_sharded": TinySpec(tied=True, sharded=True, dtype="bfloat16", seed=3),
    "untied_bf16_sharded": TinySpec(tied=False, sharded=True, dtype="bfloat16", seed=4),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> directory of a random tiny causal Qwen3 reranker, one per checkpoint shape."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_reranker(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session", params=sorted(SPECS))
def tiny_model(request, tiny_models) -> Path:
    """Parametrized over every fixture shape."""
    return tiny_models[request.param]
