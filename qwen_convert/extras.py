"""Optional dependencies that a default install leaves out, checked before any work is done.

optimum-onnx is the `optimum` extra, not part of `convert`/`all`: its only release (0.1.0) pins
transformers < 4.58, so installing it beside transformers 5 would downgrade the user's stack. It is
needed only by `--exporter optimum` (the traced cross-check) and the query-expansion causal LM's
`artifacts.exporter = "optimum"` (the graph builder writes both kinds without it).
"""

from __future__ import annotations

from .errors import ExtraError

OPTIMUM_INSTALL = "pip install 'qconv[optimum]' in a venv of its own: optimum-onnx pins transformers < 4.58"


def require_optimum(what: str) -> None:
    """Raise ExtraError naming the install command unless optimum-onnx's exporter and runtime import."""
    try:
        import optimum.exporters.onnx  # noqa: F401
        import optimum.onnxruntime  # noqa: F401
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("optimum"):
            raise ExtraError(f"{what} needs optimum-onnx, which does not import here (no module {exc.name})",
                             OPTIMUM_INSTALL) from exc
        raise ExtraError(f"{what} needs optimum-onnx, which is not installed", OPTIMUM_INSTALL) from exc
    except ImportError as exc:  # e.g. optimum-onnx installed with --no-deps beside transformers 5
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExtraError(f"{what} needs optimum-onnx, which does not import here ({first})", OPTIMUM_INSTALL) from exc
