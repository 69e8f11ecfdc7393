"""A model directory -> what the server runs: its tokenizer, prompt encoders and an inference engine.

ONNX exports run on onnxruntime (CUDA when the installed onnxruntime has it, else CPU) and import
neither torch nor transformers: the tokenizer is tokenizer.json read by the `tokenizers` library,
and the prompts are reranker.PromptEncoder's, so the ids are exactly `qconv score`'s. Seq-cls torch
directories are served too, through scoring.load_scorers (that path imports torch).

Default ONNX variant: the fastest, for the provider, of those a verify report (verify.json of a
`qconv run` output, next to the export or one level up) says passed their gate; without a report,
int8 if present, else fp32.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.kind import detect_kind
from qwen_convert.errors import SourceError
from qwen_convert.formats import ONNX_DIR, ArtifactKind, QuantMode
from qwen_convert.reranker import DEFAULT_INSTRUCTION, EncodedBatch, PromptEncoder, load_fast_tokenizer

from .options import ModelSpec, ServeOptions

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
VERIFY_REPORT = "verify.json"  # what `qconv run` writes next to its onnx/ output
# Fastest first, measured on the 0.6B shape (BENCHMARKS.md, export-onnx section): on CPU int8's
# integer matmuls lead and fp16 trails (ORT CPU computes fp16 through casts); on CUDA fp16 leads.
SPEED_ORDER: dict[str, tuple[QuantMode, ...]] = {
    CPU: (QuantMode.INT8, QuantMode.Q4, QuantMode.FP32, QuantMode.Q4F16, QuantMode.FP16),
    CUDA: (QuantMode.FP16, QuantMode.Q4F16, QuantMode.FP32, QuantMode.Q4, QuantMode.INT8),
}
UNVERIFIED_ORDER = (QuantMode.INT8, QuantMode.FP32)


class Engine:
    """Maps a padded batch to one logit per row (P(yes) = sigmoid(logit))."""

    variant: str
    providers: list[str]

    def score(self, batch: EncodedBatch) -> np.ndarray: ...


@dataclass
class OnnxEngine(Engine):
    path: Path
    variant: str
    providers: list[str]
    threads: int | None = None
    session: object = field(init=False, repr=False)

    def __post_init__(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(f"onnxruntime cannot load {self.path}: {first}", "re-export it with qconv export-onnx") from exc
        self.providers = list(self.session.get_providers())

    def score(self, batch: EncodedBatch) -> np.ndarray:
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        (logits,) = self.session.run(["logits"], feeds)
        return np.asarray(logits, dtype=np.float64).reshape(-1)


@dataclass
class TorchEngine(Engine):
    scorer: object  # scoring.SeqClsScorer
    variant: str = "float32"
    providers: list[str] = field(default_factory=lambda: ["torch-cpu"])

    def score(self, batch: EncodedBatch) -> np.ndarray:
        return np.asarray(self.scorer.score(batch), dtype=np.float64).reshape(-1)


@dataclass(eq=False)
class LoadedModel:
    name: str
    path: Path
    kind: ArtifactKind
    engine: Engine
    tokenizer: object  # reranker.FastTokenizer
    max_length: int
    prefix: object = None  # scoring.prefix.PrefixScorer: the with-past graph, when prefix sharing is on
    pad_id: int = field(init=False)
    templates: object = field(init=False, default=None)  # sharing.TemplateCache (the worker thread's)

    def __post_init__(self):
        # Caches per model, not per class: a class-level lru_cache keyed by self kept an unloaded model
        # (and its sessions) alive until 64 other entries pushed it out.
        self.encoder = functools.lru_cache(maxsize=64)(self._encoder)
        self.template = functools.lru_cache(maxsize=64)(self._template)
        self.pad_id = self.encoder(None).tokens.pad_id  # also checks the tokenizer is a reranker's
        if self.prefix is not None:
            from .sharing import TemplateCache

            self.templates = TemplateCache(self.prefix)

    def _encoder(self, instruction: str | None) -> PromptEncoder:
        """One encoder per instruction (it tokenizes the template's prefix and suffix once)."""
        return PromptEncoder(self.tokenizer, instruction or DEFAULT_INSTRUCTION, self.max_length)

    def _template(self, instruction: str | None) -> tuple[int, ...]:
        """The template tokens every prompt with this instruction starts with (sharing.template_tokens)."""
        from .sharing import template_tokens

        return template_tokens(self.encoder(instruction))


def model_dir(path: Path) -> Path:
    """A `qconv run` output serves its onnx/ export (the directory with config.json and onnx/)."""
    if not (path / "config.json").is_file() and (path / ONNX_DIR / "config.json").is_file():
        return path / ONNX_DIR
    return path


def gate_results(export: Path) -> dict[QuantMode, bool] | None:
    """variant -> passed, from a verify report next to the export or one level up; None: no report."""
    for folder in (export, export.parent):
        report = folder / VERIFY_REPORT
        if not report.is_file():
            continue
        try:
            candidates = json.loads(report.read_text(encoding="utf-8")).get("candidates") or []
        except (OSError, ValueError):
            continue
        out = {}
        for c in candidates:
            name = str(c.get("name", ""))
            if name.startswith(f"{ONNX_DIR}/") and Path(str(c.get("path", ""))).name == export.name:
                try:
                    out[QuantMode(name.removeprefix(f"{ONNX_DIR}/"))] = bool(c.get("passed"))
                except ValueError:
                    continue
        if out:
            return out
    return None


def choose_variant(export: Path, requested: str | None, provider: str) -> QuantMode:
    present = [m for m in QuantMode if (export / ONNX_DIR / m.file_name).is_file()]
    if not present:
        raise SourceError(f"{export / ONNX_DIR} holds no ONNX variant", "export one with qconv export-onnx")
    if requested:
        from qwen_convert.scoring.onnx_scorers import _mode

        mode = _mode(requested)
        if mode not in present:
            raise SourceError(f"{export} has no {mode.value} variant ({mode.file_name})",
                              f"present: {', '.join(m.value for m in present)}")
        return mode
    gates = gate_results(export)
    if gates is not None:
        passed = [m for m in SPEED_ORDER[provider] if m in present and gates.get(m)]
        if passed:
            return passed[0]
        raise SourceError(f"no variant of {export} passed its gate in {VERIFY_REPORT}",
                          "pick one explicitly with --variant, or fix the export")
    for mode in UNVERIFIED_ORDER:
        if mode in present:
            return mode
    return present[0]


def onnx_providers(options: ServeOptions) -> list[str]:
    if options.providers:
        return list(options.providers)
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in (CUDA, CPU) if p in available]


def _load_onnx(path: Path, spec: ModelSpec, options: ServeOptions) -> Engine:
    from qwen_convert.scoring.onnx_scorers import check_variant_files

    providers = onnx_providers(options)
    mode = choose_variant(path, spec.variant, providers[0] if providers[0] in SPEED_ORDER else CPU)
    file = path / ONNX_DIR / mode.file_name
    check_variant_files(file)
    return OnnxEngine(file, mode.value, providers, options.threads)


def _load_seqcls(path: Path, spec: ModelSpec, options: ServeOptions) -> Engine:
    from qwen_convert.scoring.registry import load_scorers

    dtype = spec.variant or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SourceError(f"--variant {dtype} does not apply to a seq-cls model", "use float32, bfloat16 or float16")
    (scorer,) = load_scorers(path, (), dtype, ArtifactKind.SEQCLS)
    return TorchEngine(scorer, dtype)


def _refuse_causal(path: Path, spec: ModelSpec, options: ServeOptions) -> Engine:
    raise SourceError(f"{path} is the causal reranker", "serve its export: qconv export-onnx (or qconv seqcls) first")


ENGINES: dict[ArtifactKind, Callable[[Path, ModelSpec, ServeOptions], Engine]] = {
    ArtifactKind.ONNX: _load_onnx,
    ArtifactKind.SEQCLS: _load_seqcls,
    ArtifactKind.CAUSAL: _refuse_causal,
}


def load_prefix(engine: Engine, options: ServeOptions):
    """The with-past graph beside an ONNX variant (onnx/prefix/<file>), opened, or None: sharing off,
    an export without one (older exports, the optimum exporter), a torch model, or a GPU provider
    (the prefix scorer runs on CPU, where sharing pays; on CUDA the full-prompt graph stays)."""
    if not options.share_prefix or not isinstance(engine, OnnxEngine) or engine.providers[0] != CPU:
        return None
    from qwen_convert.scoring.onnx_scorers import check_variant_files
    from qwen_convert.scoring.prefix import PrefixScorer, prefix_graph

    graph = prefix_graph(engine.path)
    if not graph.is_file():
        return None
    check_variant_files(graph)
    prefix = PrefixScorer(graph, f"{engine.variant}+prefix", engine.variant, options.threads)
    prefix.session  # noqa: B018 (opens it now: a broken graph fails at start-up, not on a request)
    return prefix


def load_model(spec: ModelSpec, options: ServeOptions) -> LoadedModel:
    """Open SPEC's directory for serving (blocking: run it off the event loop)."""
    path = Path(spec.path).expanduser()
    if not path.is_dir():
        raise SourceError(f"{path} is not a directory", "pass an ONNX export (qconv export-onnx OUT) or a seq-cls directory")
    path = model_dir(path)
    kind = detect_kind(path)
    tokenizer = load_fast_tokenizer(path)
    engine = ENGINES[kind](path, spec, options)
    return LoadedModel(spec.served_name, path, kind, engine, tokenizer, options.max_length, load_prefix(engine, options))
