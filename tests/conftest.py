"""Session-wide fixtures: tiny Qwen3 rerankers built locally (never downloaded)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never reach a hub: make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# verify's reference cache defaults to ~/.cache/qconv: tests keep theirs in a throw-away directory,
# removed when the run ends (every run used to leave one behind in /tmp).
if "QCONV_CACHE_DIR" not in os.environ:
    os.environ["QCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="qconv-test-cache-")
    atexit.register(shutil.rmtree, os.environ["QCONV_CACHE_DIR"], ignore_errors=True)

from qwen_convert.fixtures import TinySpec, build_tiny_reranker  # noqa: E402

SPECS = {
    "tied_fp32": TinySpec(tied=True, dtype="float32", seed=1),
    "untied_fp32": TinySpec(tied=False, dtype="float32", seed=2),
    "tied_bf16_sharded": TinySpec(tied=True, sharded=True, dtype="bfloat16", seed=3),
    "untied_bf16_sharded": TinySpec(tied=False, sharded=True, dtype="bfloat16", seed=4),
}


def optimum_installed() -> bool:
    """optimum-onnx (qconv[optimum]) importable: it lives in .venv-optimum, not in the main venv."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in ("optimum.exporters.onnx", "optimum.onnxruntime"))
    except ModuleNotFoundError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `optimum` need qconv[optimum], whose optimum-onnx pins transformers < 4.58: they skip
    in the main venv (transformers 5) and run in .venv-optimum through `make test-optimum`, which CI
    runs. Selecting them with `-m optimum` where optimum-onnx is missing is an error, not a silent
    run of skips, so CI cannot pass without running them somewhere."""
    marked = [item for item in items if item.get_closest_marker("optimum")]
    if not marked or optimum_installed():
        return
    if "optimum" in (config.option.markexpr or "") and "not optimum" not in config.option.markexpr:
        raise pytest.UsageError("-m optimum selects the tests that need qconv[optimum], and optimum-onnx does not "
                                "import in this venv: run them with `make test-optimum` (.venv-optimum)")
    skip = pytest.mark.skip(reason="needs qconv[optimum] (optimum-onnx, transformers < 4.58): runs in .venv-optimum, `make test-optimum`")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> directory of a random tiny causal Qwen3 reranker, one per checkpoint shape."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_reranker(root / name, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session", params=sorted(SPECS))
def tiny_model(request, tiny_models) -> Path:
    """Parametrized over every fixture shape."""
    return tiny_models[request.param]
