"""Scorers for an ONNX export directory: one onnxruntime session per variant file.

`load_onnx_scorers(OUT)` returns every variant present under OUT/onnx/ (or only the requested
ones), named "onnx/<mode>" with precision = mode, so `verify` picks each variant's gate. Files are
checked up front (the .onnx and any external data it names); sessions are created on first use,
so listing five variants of a large model does not load five models at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.errors import SourceError
from qwen_convert.formats import ONNX_DIR, ArtifactKind, QuantMode
from qwen_convert.reranker import EncodedBatch

from .base import Scorer, run_failure


def _mode(name: str) -> QuantMode:
    """'q4', 'onnx/q4' or 'model_q4.onnx' -> QuantMode.Q4."""
    key = name.strip().lower().removeprefix(f"{ONNX_DIR}/")
    for mode in QuantMode:
        if key in (mode.value, mode.file_name):
            return mode
    valid = ", ".join(m.value for m in QuantMode)
    raise SourceError(f"unknown ONNX variant {name!r}", f"valid variants: {valid}")


def external_data_files(onnx_path: Path) -> list[Path]:
    """The external data files an .onnx file refers to (read from its header: weights, inline ones
    included, are never loaded)."""
    from qwen_convert.checkpoint.onnx_header import read_header

    return [onnx_path.parent / n for n in sorted(read_header(onnx_path).external_locations)]


def check_variant_files(onnx_path: Path) -> None:
    if not onnx_path.is_file():
        raise SourceError(f"{onnx_path} is missing", "re-export with qconv export-onnx, or pick a variant that exists")
    for data in external_data_files(onnx_path):
        if not data.is_file():
            raise SourceError(f"{data} is missing (external data of {onnx_path.name})", "copy it next to the .onnx file, or re-export")


# Sessions recently opened, by file and settings: `score_documents` called once per query (a library
# user, the benchmarks) would otherwise start the same 0.6B session again on every call (~0.5-1 s).
SESSION_CACHE = 2
_sessions: OrderedDict = OrderedDict()


def cpu_session(scorer):
    """An onnxruntime CPU session of `scorer.path` with `scorer.threads` threads; a failure to load is
    one EngineError line naming the variant (run_failure). A 4-bit graph runs int8 kernels when
    `scorer.expand_q4` (default) and memory allow (kernels.py); `scorer.kernels` then says so. The
    last SESSION_CACHE sessions are reused while their file is unchanged."""
    path = Path(scorer.path)
    expand = getattr(scorer, "expand_q4", True)
    try:
        stat = path.stat()
    except OSError as exc:
        raise SourceError(f"{path} is missing", "re-export with qconv export-onnx") from exc
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, scorer.threads, expand, _record_stamp(path, expand, scorer.precision))
    if key in _sessions:
        _sessions.move_to_end(key)
        session, kernels = _sessions[key]
    else:
        session, kernels = _open_session(scorer, path, expand)
        _sessions[key] = (session, kernels)
        while len(_sessions) > SESSION_CACHE:
            _sessions.popitem(last=False)
    if hasattr(scorer, "kernels"):
        scorer.kernels = kernels
    return session


def _record_stamp(path: Path, expand: bool, precision: str) -> tuple:
    """What the expansion reads beside the graph (kernels.activations_file): a changed record is a new session."""
    if not (expand and precision in ("q4", "int4")):
        return ()
    from .kernels import activations_file

    record = activations_file(path)
    if record is None:
        return ()
    stat = record.stat()
    return (str(record), stat.st_mtime_ns, stat.st_size)


def open_session(scorer):
    """(session, kernels) of `scorer.path` as cpu_session opens it, not kept in its cache: for a
    caller that owns the session's lifetime (`qconv serve` frees an unloaded model at once)."""
    return _open_session(scorer, Path(scorer.path), getattr(scorer, "expand_q4", True))


def session_options(threads: int | None):
    """The onnxruntime SessionOptions every qconv session is made with: `threads` intra-op threads and
    one inter-op thread (None: onnxruntime's defaults), quiet logs, denormals flushed (denormals.py)."""
    import onnxruntime as ort

    from .denormals import SESSION_CONFIG

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's own warnings (e.g. unused initializers) are not for users
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry(*SESSION_CONFIG)
    return opts


def _open_session(scorer, path: Path, expand: bool):
    import onnxruntime as ort

    from .kernels import expand_q4, open_expanded

    opts = session_options(scorer.threads)
    try:
        expansion = expand_q4(path) if expand and scorer.precision in ("q4", "int4") else None
        if expansion is not None and expansion.model is not None:
            session = open_expanded(expansion, opts, ["CPUExecutionProvider"])
        else:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise run_failure(scorer, exc, "load") from exc
    return session, expansion.kernels if expansion is not None else ""


@dataclass
class OnnxScorer:
    path: Path
    name: str
    precision: str
    threads: int | None = None
    kind: ArtifactKind = ArtifactKind.ONNX
    expand_q4: bool = True  # q4 on CPU: int8 kernels from the 4-bit weights at load (kernels.py)
    kernels: str = ""  # what the session runs where that differs from the file (set at load)
    _session: object = field(default=None, repr=False)

    @property
    def session(self):
        if self._session is None:
            self._session = cpu_session(self)
        return self._session

    @property
    def engine(self) -> str:
        """Known before the session starts (verify keys its score cache by it): a q4 graph on the CPU
        runs int8 kernels unless told not to."""
        if not (self.expand_q4 and self.precision in ("q4", "int4")):
            return "onnxruntime"
        from .kernels import activations_file

        return "onnxruntime q4-as-int8, smoothed" if activations_file(Path(self.path)) else "onnxruntime q4-as-int8"

    def score(self, batch: EncodedBatch) -> np.ndarray:
        feeds = {"input_ids": batch.input_ids.astype(np.int64), "attention_mask": batch.attention_mask.astype(np.int64)}
        (logits,) = self.session.run(["logits"], feeds)
        return np.asarray(logits, dtype=np.float64)[:, 0]


def load_onnx_scorers(path: Path | str, variants: Sequence[str] = (), threads: int | None = None,
                      expand_q4: bool = True) -> list[Scorer]:
    """Scorers for the variants in PATH/onnx (all present, or exactly `variants`)."""
    root = Path(path) / ONNX_DIR
    if variants:
        modes = list(dict.fromkeys(_mode(v) for v in variants))
    else:
        modes = [m for m in QuantMode if (root / m.file_name).is_file()]
        if not modes:
            expected = ", ".join(m.file_name for m in QuantMode)
            raise SourceError(f"{root} holds no ONNX variant", f"expected one of {expected}")
    scorers = []
    for mode in modes:
        file = root / mode.file_name
        check_variant_files(file)
        scorers.append(OnnxScorer(file, f"{ONNX_DIR}/{mode.value}", mode.value, threads, expand_q4=expand_q4))
    return scorers
