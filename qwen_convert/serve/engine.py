"""A model directory -> what the server runs: its tokenizer, prompt encoders and an inference engine.

ONNX exports run on onnxruntime (CUDA when the installed onnxruntime has it, else CPU) and import
neither torch nor transformers: the tokenizer is tokenizer.json read by the `tokenizers` library,
and the prompts are reranker.PromptEncoder's, so the ids are exactly `qconv score`'s. Seq-cls torch
directories are served too, through scoring.load_scorers (that path imports torch).

Default ONNX variant: scoring/choose.py's, as `qconv score` picks it: of the variants a verify
report (verify.json of a `qconv run` output, next to the export or one level up) says passed their
gate, else of int8 and fp32, the fastest on this CPU (measured once at load, cached); on CUDA a
static order. On the CPU a session is opened as scoring opens it (a q4 graph runs int8 kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.checkpoint.kind import detect_kind
from qwen_convert.errors import SourceError
from qwen_convert.formats import ONNX_DIR, ArtifactKind
from qwen_convert.reranker import DEFAULT_INSTRUCTION, EncodedBatch, PromptEncoder, load_fast_tokenizer

from .options import ModelSpec, ServeOptions

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


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
    choice: object = None  # scoring.choose.VariantChoice: why this variant
    kernels: str = ""  # what the session runs where it differs from the file (q4 as int8 on CPU)
    session: object = field(init=False, repr=False)

    def __post_init__(self):
        import onnxruntime as ort

        if self.providers[0] == CPU:  # as `qconv score` and verify open it: a q4 graph runs int8 kernels
            from qwen_convert.scoring.onnx_scorers import OnnxScorer, open_session

            self.session, self.kernels = open_session(OnnxScorer(self.path, f"{ONNX_DIR}/{self.variant}", self.variant, self.threads))
            self.providers = list(self.session.get_providers())
            return
        from qwen_convert.scoring.onnx_scorers import session_options

        try:
            self.session = ort.InferenceSession(str(self.path), session_options(self.threads), providers=self.providers)
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


def onnx_providers(options: ServeOptions) -> list[str]:
    if options.providers:
        return list(options.providers)
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in (CUDA, CPU) if p in available]


def _load_onnx(path: Path, spec: ModelSpec, options: ServeOptions) -> Engine:
    from qwen_convert.scoring.choose import choose_variant
    from qwen_convert.scoring.onnx_scorers import check_variant_files

    providers = onnx_providers(options)
    choice = choose_variant(path, spec.variant, options.threads, providers[0])
    file = path / ONNX_DIR / choice.mode.file_name
    check_variant_files(file)
    return OnnxEngine(file, choice.mode.value, providers, options.threads, choice)


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
    from qwen_convert.scoring.prefix import open_prefix_scorer

    # A request's documents run as single-threaded batches, one per core at once, as `qconv score` runs
    # them (scoring/workers.py); the full-prompt graph keeps one batch at a time on every core.
    prefix = open_prefix_scorer(engine.path, f"{engine.variant}+prefix", engine.variant, options.threads, parallel=True)
    if prefix is not None:
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
