"""Versions of qconv and of the libraries that change bytes or numbers, read from package metadata
(no import of the libraries themselves)."""

from __future__ import annotations

import platform
from importlib import metadata

# Libraries whose versions change the bytes or the numbers; read from package metadata (no import).
LIBRARIES = (
    "torch", "transformers", "tokenizers", "safetensors", "numpy", "onnx", "onnxruntime", "onnx-ir",
    "optimum", "optimum-onnx", "huggingface_hub", "modelscope", "sentence-transformers",
)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tool_info() -> dict:
    from . import __version__

    return {"name": "qconv", "version": __version__, "python": platform.python_version(),
            "platform": platform.platform(terse=True), "libraries": library_versions()}
