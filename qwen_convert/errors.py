"""One exception family. Every message says what went wrong *and* what to do next.

The CLI prints `error: <message>` on one line and exits 1; set QCONV_DEBUG=1 for the traceback.
"""

from __future__ import annotations


class QconvError(Exception):
    """Base of every error qconv raises on purpose."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class SourceError(QconvError):
    """The input model is missing, not a Qwen3 reranker, or unusable."""


class WeightsError(QconvError):
    """Weight files are missing, corrupt, truncated, or in a format we refuse (pickle)."""


class TokenizerError(QconvError):
    """The tokenizer cannot be loaded or lacks the tokens a reranker needs."""


class OutputError(QconvError):
    """The output location exists, is not empty, or is not writable."""


class InputFileError(QconvError):
    """A user-provided file (pairs, recipe, manifest) is malformed."""


class ExportError(QconvError):
    """ONNX export or quantization failed."""


class DownloadError(QconvError):
    """No source could provide the model, or what arrived failed integrity checks."""


class RecipeError(QconvError):
    """A recipe is invalid or inconsistent with the output directory."""


class ExtraError(QconvError):
    """An optional dependency (one of qconv's extras) is missing or cannot be imported."""


class EngineError(QconvError):
    """onnxruntime, torch or the tokenizer failed while loading or running a model."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (the type's name when it has none): what a
    one-line error quotes of a library's multi-line message."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
