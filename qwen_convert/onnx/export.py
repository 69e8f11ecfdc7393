"""`qconv export-onnx`: a Qwen3 reranker -> single-logit ONNX graphs (fp32 + quantized variants).

SRC is a seq-cls directory or an original causal reranker. Two exporters (EXPORTERS):
  * builder (default): qwen_convert/onnx writes every variant's graph straight from the safetensors,
    tensor by tensor, each weight encoded in its variant's precision as it is written; no torch
    model, no seq-cls scratch copy, memory flat in the model size.
  * optimum: a causal source is converted by `convert_to_seqcls` into a scratch directory inside
    OUT's temporary sibling, traced to fp32 by optimum-onnx, then each variant made by onnxruntime's
    whole-graph quantizers (an independent cross-check of the builder; needs several times the
    fp32 weights in RAM).
The graph takes `input_ids`, `attention_mask` (int64, dynamic batch and sequence) and
returns `logits` [batch, 1]: the hidden state of the last real token (found from the mask, so left
and right padding both work) goes through the score head, and nothing of vocabulary size exists
anywhere in the graph.

OUT, laid out so that optimum's ORTModelForSequenceClassification and transformers.js load it:
    config.json, tokenizer files, chat_template.jinja, README.md, quantize_config.json
    onnx/model.onnx (+ model.onnx_data above the external-data threshold)
    onnx/model_fp16.onnx, model_quantized.onnx (int8), model_q4.onnx, model_q4f16.onnx
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_convert.checkpoint.kind import detect_kind
from qwen_convert.checkpoint.validate import check_model_dir
from qwen_convert.errors import ExportError, SourceError
from qwen_convert.formats import (
    EXTERNAL_DATA_THRESHOLD,
    ONNX_DIR,
    PREFIX_DIR,
    QUANTIZE_CONFIG,
    ArtifactKind,
    QuantMode,
    VariantFile,
    parse_modes,
)
from qwen_convert.fsutil import atomic_output_dir, check_output_dir
from qwen_convert.hub.resolve import resolve_model
from qwen_convert.progress import NULL, Reporter
from qwen_convert.seqcls.sidecars import Provenance, write_sidecars

from .. import __version__
from .auto import AutoChoice, check_auto, choose_variant, expand_auto, mark_choice
from .calibration import calibration_set, describe_kept
from .card import onnx_card, onnx_config
from .optimum_compat import check_optimum_source, optimum_source
from .prefix import build_prefix_onnx, prefix_settings, prefix_supported
from .quantize import QuantizeOptions, external_locations, quantize_file, quantize_settings, quiet_logs, save_onnx, tensor_bytes
from .shapes import record_shape, shape_choices

if TYPE_CHECKING:
    from qwen_convert.verify import VerifyOptions

SCRATCH = ".seqcls"


@dataclass(frozen=True)
class ExportOptions:
    modes: tuple[str, ...] = ()  # extra variants besides fp32: fp16, int8, q4, q4f16, or "all"
    block_size: int = 32
    quantize_embedding: bool = True
    per_channel: bool = False
    verify: bool = True
    force: bool = False
    reference: str | None = None  # verify against this causal model (default: SRC when it is causal)
    pairs_file: Path | None = None  # verification pairs (JSONL); None = verify's built-in probes
    exporter: str = "builder"  # key of EXPORTERS
    fp32: bool = True  # write the fp32 graph too (the 8B's is ~30 GB: a 16 GB runner cannot verify it)
    opset: int | None = None  # None: the exporter's default for qwen3
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD  # bytes; lowered by tests
    # int8/q4/q4f16: "calibrated" (SmoothQuant for int8, AWQ for 4-bit, folded into the weights;
    # qwen_convert/onnx/smoothing.py) or "naive" (round-to-nearest, as before). None: calibrated with
    # the builder; the optimum exporter has onnxruntime's naive quantizers only.
    quant_method: str | None = None
    calibration_file: Path | None = None  # JSONL pairs (as pairs_file); None = the built-in probes
    # verify's options for the export's own check (gates, instruction, lengths: a recipe's [gates]
    # reach --quantize auto's pick through here); pairs_file above wins over theirs. None: defaults.
    verify_options: "VerifyOptions | None" = None

    def method(self) -> str:
        return self.quant_method or ("calibrated" if self.exporter == "builder" else "naive")
    prefix_graphs: bool = True  # builder: also each variant's with-past graph, onnx/prefix/<file> (onnx/prefix.py)

    def quantize_options(self) -> QuantizeOptions:
        return QuantizeOptions(
            block_size=self.block_size, quantize_embedding=self.quantize_embedding,
            per_channel=self.per_channel, external_data_threshold=self.external_data_threshold,
        )


@dataclass(frozen=True)
class ExportResult:
    out: Path
    source: str
    source_kind: str  # causal | seqcls
    variants: tuple[VariantFile, ...]
    reference: str | None  # what the variants were verified against (None: not verified)
    reference_note: str
    verification: object | None = None  # verify's ParityReport
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    auto: AutoChoice | None = None  # --quantize auto: the smallest variant that passed (onnx/auto.py)

    @property
    def passed(self) -> bool:
        if self.auto is not None:  # candidates that miss a gate are expected; one must pass
            return self.auto.chosen is not None
        return self.verification is None or bool(self.verification.passed)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "source": self.source,
            "source_kind": self.source_kind,
            "variants": [v.to_dict() for v in self.variants],
            "reference": self.reference,
            "reference_note": self.reference_note,
            "verified": self.verification is not None,
            "passed": self.passed,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "seconds": round(self.seconds, 3),
            "settings": self.settings,
            "auto": self.auto.to_dict() if self.auto is not None else None,
        }

    def render(self) -> str:
        lines = [f"wrote {self.out}  ({self.source_kind} source {self.source}, {self.seconds:.1f} s)"]
        for v in self.variants:
            ext = " + external data" if v.external_data else ""
            lines.append(f"  {v.mode:<6} {v.path:<28} {v.bytes / 2**20:9.1f} MiB{ext}")
        if self.verification is None:
            lines.append("  not verified (--no-verify)")
        else:
            lines.append(f"  verified against {self.reference} ({self.reference_note})")
            lines.append(self.verification.render())
        if self.auto is not None:
            lines.append(self.auto.render())
        return "\n".join(lines)


# --- the graph ----------------------------------------------------------------------------------

def last_token_module(model):
    """Wrap a Qwen3ForSequenceClassification as forward(input_ids, attention_mask) -> logits [b, 1].

    The stock forward applies the score head to every position and pools by pad id; this one
    gathers the last real token's hidden state (from the mask) first, and derives RoPE positions
    from the mask so a left-padded row scores exactly like the same row unpadded.
    """
    import torch

    class LastTokenScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = model.model, model.score

        def forward(self, input_ids, attention_mask):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                               use_cache=False).last_hidden_state
            index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask * index).argmax(-1)  # highest position whose mask is 1
            picked = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
            return self.head(picked)

    return LastTokenScore().eval()


def _export_optimum(model, path: Path, opset: int | None) -> None:
    """optimum-onnx's exporter (TorchScript tracing, with its patches for transformers' masks),
    with a patcher that swaps the forward for `last_token_module`."""
    from optimum.exporters.onnx import export
    from optimum.exporters.onnx.model_configs import Qwen3OnnxConfig
    from optimum.exporters.onnx.model_patcher import ModelPatcher

    scorer = last_token_module(model)

    class LastTokenPatcher(ModelPatcher):
        def __init__(self, config, model, model_kwargs=None):
            super().__init__(config, model, model_kwargs)

            # A plain signature on purpose: the tracer orders its inputs by this signature.
            def forward(input_ids, attention_mask):
                return {"logits": scorer(input_ids, attention_mask)}

            self.patched_forward = forward

    class RerankerOnnxConfig(Qwen3OnnxConfig):
        _MODEL_PATCHER = LastTokenPatcher

    config = RerankerOnnxConfig(model.config, task="text-classification")
    export(model, config, path, opset=opset or config.DEFAULT_ONNX_OPSET)


# name -> fn(seq-cls model in fp32, output .onnx path, opset or None) for the traced path.
TRACERS: dict[str, Callable] = {"optimum": _export_optimum}


@dataclass(frozen=True)
class _Source:
    """What every exporter needs to know about SRC (resolved, checked)."""

    path: Path
    kind: ArtifactKind
    config: dict  # the seq-cls config.json the export carries
    provenance: Provenance


def _write_builder(source: _Source, tmp: Path, modes: tuple[QuantMode, ...], options: ExportOptions, reporter: Reporter,
                   calibration=None) -> dict:
    """Every variant built from the checkpoint (qwen_convert/onnx), one streaming pass each; with a
    calibration set, one calibration pass first and each quantized variant's scales folded in."""
    from qwen_convert.checkpoint.files import open_checkpoint

    from .build import build_logged, build_onnx

    ckpt = open_checkpoint(source.path)
    plans, keep, record = {}, {}, {"method": "naive"}
    if calibration is not None:
        from .calibration import plan_variants

        variants = plan_variants(source.path, calibration, modes, options.quantize_options(), reporter=reporter)
        plans, keep, record = variants.plans, variants.keep, variants.record
        variants.write_activations(tmp / ONNX_DIR, lambda v: QuantMode(v).file_name, reporter)
    q4 = any(m in (QuantMode.Q4, QuantMode.Q4F16) for m in modes)
    for note in shape_choices(source.config, options.block_size, options.quantize_embedding).notes(q4):
        reporter.log(note)
    for mode in modes:
        build_logged(reporter, mode, lambda mode=mode: build_onnx(
            ckpt, tmp / ONNX_DIR / mode.file_name, mode, options.quantize_options(), options.external_data_threshold,
            fold=plans.get(mode.value), keep=keep.get(mode.value, frozenset())))
        if options.prefix_graphs and prefix_supported(source.config):
            path = tmp / ONNX_DIR / PREFIX_DIR / mode.file_name
            path.parent.mkdir(exist_ok=True)
            result = build_prefix_onnx(ckpt, path, mode, options.quantize_options(), options.external_data_threshold,
                                       fold=plans.get(mode.value), keep=keep.get(mode.value, frozenset()))
            reporter.log(f"wrote {ONNX_DIR}/{PREFIX_DIR}/{mode.file_name} ({result.seconds:.1f} s)")
    return {"quantization": record}


def _write_traced(source: _Source, tmp: Path, modes: tuple[QuantMode, ...], options: ExportOptions, reporter: Reporter,
                  calibration=None) -> dict:
    """fp32 traced from a seq-cls torch model, then onnxruntime's whole-graph quantizers."""
    seqcls = source.path
    if source.kind is ArtifactKind.CAUSAL:
        from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls

        seqcls = tmp / SCRATCH
        convert_to_seqcls(source.path, seqcls, ConvertOptions(score_dtype="float32"), reporter=reporter)
    onnx_dir = tmp / ONNX_DIR
    step = time.perf_counter()
    task = reporter.task("export fp32", total=None)
    with optimum_source(seqcls, tmp) as traced:  # a transformers-5 config, as transformers 4.x must read it
        _export_fp32(traced.path, onnx_dir / QuantMode.FP32.file_name, options)
    task.advance()
    reporter.log(f"wrote {ONNX_DIR}/{QuantMode.FP32.file_name} ({time.perf_counter() - step:.1f} s)")
    quantize_variants(onnx_dir, [m for m in modes if m is not QuantMode.FP32], options.quantize_options(), reporter)
    if QuantMode.FP32 not in modes:  # every quantizer here starts from the fp32 graph
        for f in (onnx_dir / QuantMode.FP32.file_name, onnx_dir / (QuantMode.FP32.file_name + "_data")):
            f.unlink(missing_ok=True)
    shutil.rmtree(tmp / SCRATCH, ignore_errors=True)
    return {"quantization": {"method": "naive"}, **traced.settings()}


def _check_builder(source: _Source) -> None:
    """What the builder refuses beyond validate's config-vs-tensors check (rope scaling, biases)."""
    from qwen_convert.checkpoint.files import load_config

    from .build import Qwen3Shape

    Qwen3Shape.from_config(load_config(source.path), source.path)


@dataclass(frozen=True)
class Exporter:
    check: Callable[[_Source], None]  # refuse bad input before OUT exists
    write: Callable  # (source, tmp OUT, modes, options, reporter, calibration set): writes tmp/onnx/<variant files>
    card_note: str  # how the graphs were made, for the model card


EXPORTERS: dict[str, Exporter] = {
    "builder": Exporter(_check_builder, _write_builder,
                        "qconv graph builder: weights streamed from the safetensors and encoded per tensor as written; "
                        "onnxruntime fused CPU ops (SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention, "
                        "MatMulNBits, DynamicQuantizeMatMul); last-token gather before the fp32 score head"),
    "optimum": Exporter(lambda s: check_optimum_source(s.config, s.path), _write_traced,
                        "optimum-onnx exporter (TorchScript trace), onnxruntime quantizers; last-token gather before the score head"),
}


def _exporter(name: str) -> Exporter:
    exporter = EXPORTERS.get(name)
    if exporter is None:
        raise ExportError(f"unknown exporter {name!r}", f"valid exporters: {', '.join(EXPORTERS)}")
    if name == "optimum":
        from ..extras import require_optimum

        require_optimum("--exporter optimum")
    return exporter


# --- steps --------------------------------------------------------------------------------------

def _seqcls_provenance(src: str, resolved, path: Path) -> Provenance:
    """Provenance of a directory that was converted before (by qconv or otherwise)."""
    from qwen_convert.checkpoint.files import open_checkpoint
    from qwen_convert.checkpoint.heads import SCORE, read_reranker_tokens

    ckpt = open_checkpoint(path)
    tokens = read_reranker_tokens(path)
    score = ckpt.tensors.get(SCORE)
    if score is None or len(score.shape) != 2 or score.shape[0] != 1:
        shape = list(score.shape) if score is not None else None
        raise SourceError(f"{path} has no one-logit score head (score.weight {shape})", "pass a causal Qwen3-Reranker or a qconv seqcls output")
    return Provenance(
        source=src, source_kind=resolved.source, revision=resolved.revision, yes_id=tokens.yes_id,
        no_id=tokens.no_id, pad_id=tokens.pad_id, tied=bool(ckpt.config.get("tie_word_embeddings", False)),
        score_dtype={"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(score.dtype, score.dtype),
        qconv_version=__version__,
    )


def _export_fp32(seqcls: Path, onnx_path: Path, options: ExportOptions) -> None:
    """seq-cls weights -> fp32 graph at onnx_path, normalized: one `<name>_data` file above the
    threshold (none below), and value_info from shape inference (fp16 conversion relies on it)."""
    import onnx
    from transformers import AutoModelForSequenceClassification

    exporter = TRACERS["optimum"]
    with quiet_logs():
        model = AutoModelForSequenceClassification.from_pretrained(str(seqcls), dtype="float32", attn_implementation="sdpa").eval()
        try:
            exporter(model, onnx_path, options.opset)
        except Exception as exc:  # tracer/exporter errors come in every type
            raise ExportError(f"ONNX export failed: {exc}".splitlines()[0], "run with QCONV_DEBUG=1 for the traceback") from exc
        finally:
            del model
            gc.collect()

    graph = onnx.load(str(onnx_path), load_external_data=False)
    data = onnx_path.with_name(onnx_path.name + "_data")
    locations = external_locations(graph)
    want_external = tensor_bytes(graph) > options.external_data_threshold
    if locations != ({data.name} if want_external else set()):
        stray = [onnx_path.parent / loc for loc in locations]
        graph = onnx.load(str(onnx_path), load_external_data=True)
        save_onnx(graph, onnx_path, options.external_data_threshold)
        for f in stray:
            if f != data:
                f.unlink(missing_ok=True)
    del graph
    if data.exists():
        data.chmod(0o644)  # the exporter creates it owner-only
    # On the path, not in memory: protobuf cannot hold a 2 GB model, and the data stays in place.
    onnx.shape_inference.infer_shapes_path(str(onnx_path), str(onnx_path))


def quantize_variants(onnx_dir: Path, modes, options: QuantizeOptions, reporter: Reporter) -> None:
    """Write each quantized mode next to the fp32 graph in onnx_dir (shared with causal_lm's export)."""
    for mode in modes:
        step = time.perf_counter()
        task = reporter.task(f"quantize {mode.value}", total=None)
        quantize_file(onnx_dir / QuantMode.FP32.file_name, onnx_dir / mode.file_name, mode, options)
        task.advance()
        reporter.log(f"wrote {ONNX_DIR}/{mode.file_name} ({time.perf_counter() - step:.1f} s)")


def variant_file(out: Path, mode: QuantMode) -> VariantFile:
    path = out / ONNX_DIR / mode.file_name
    data = path.with_name(path.name + "_data")
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return VariantFile(mode.value, f"{ONNX_DIR}/{mode.file_name}", size, data.exists())


def export_onnx(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(), reporter: Reporter = NULL) -> ExportResult:
    """Export SRC to single-logit ONNX graphs in OUT (atomically), then verify them unless told not to."""
    started = time.perf_counter()
    out = Path(out)
    names, auto = expand_auto(options.modes)
    check_auto(auto, options.verify)
    modes = parse_modes(names)  # an unknown mode fails before any work
    modes = ((QuantMode.FP32,) if options.fp32 else ()) + modes
    if not modes:
        raise ExportError("nothing to export: --no-fp32 and no --quantize mode", "name a variant with --quantize")
    exporter = _exporter(options.exporter)
    qopts = options.quantize_options()
    check_output_dir(out, options.force)
    resolved = resolve_model(src, reporter=reporter)
    path = Path(resolved.path)
    if out.resolve() == path.resolve():
        raise SourceError(f"OUT {out} is the source directory", "choose a new OUT")
    kind = detect_kind(path)
    if kind is ArtifactKind.ONNX:
        raise SourceError(f"{path} is already an ONNX export", "pass the causal reranker or its seq-cls conversion")
    reference, note = _reference(src, kind, options, reporter) or (None, "")
    check_model_dir(path)  # config vs tensor shapes (validate.py), from headers, before OUT exists
    source = _source(str(src), resolved, path, kind)
    exporter.check(source)
    calibration = calibration_set(path, modes, options.method(), options.exporter, options.calibration_file)

    with atomic_output_dir(out, options.force) as tmp:
        (tmp / ONNX_DIR).mkdir()
        reporter.log(f"exporting {path} -> {out}/{ONNX_DIR} ({options.exporter} exporter: {', '.join(m.value for m in modes)})")
        made = exporter.write(source, tmp, modes, options, reporter, calibration)

        variants = [variant_file(tmp, m) for m in modes]
        settings = {
            "qconv_version": __version__, "exporter": options.exporter,
            "opset": _opset(tmp / variants[0].path),
            "files": {v.mode: v.path for v in variants}, **_settings(options.exporter, qopts), **made,
        }
        if options.exporter == "builder":  # which op computes attention, how the q4 embedding is blocked
            record_shape(settings, shape_choices(source.config, options.block_size, options.quantize_embedding))
        describe_kept(settings)
        if (tmp / ONNX_DIR / PREFIX_DIR).is_dir():
            settings["prefix"] = prefix_settings(variants)
        write_sidecars(tmp, path, onnx_config(source.config, variants), source.provenance,
                       card=onnx_card(source.provenance, variants, out.name, exporter.card_note))
        (tmp / QUANTIZE_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    report = _verify(reference, out, options, reporter) if reference is not None else None
    choice = choose_variant(variants, report) if auto else None
    if choice is not None:
        settings = mark_choice(out / QUANTIZE_CONFIG, choice)
    return ExportResult(
        out=out, source=str(src), source_kind=kind.value, variants=tuple(variants), reference=reference,
        reference_note=note, verification=report, seconds=time.perf_counter() - started, settings=settings, auto=choice,
    )


def _source(src: str, resolved, path: Path, kind: ArtifactKind) -> _Source:
    """Provenance and seq-cls config of SRC, read without converting anything."""
    if kind is ArtifactKind.SEQCLS:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return _Source(path, kind, config, _seqcls_provenance(src, resolved, path))
    from qwen_convert.checkpoint.files import open_checkpoint
    from qwen_convert.checkpoint.heads import head_tensor, read_reranker_tokens
    from qwen_convert.checkpoint.kind import check_causal_qwen3
    from qwen_convert.seqcls.sidecars import seqcls_config

    ckpt = open_checkpoint(path)
    check_causal_qwen3(ckpt)
    tokens = read_reranker_tokens(path)
    _head, tied = head_tensor(ckpt)
    provenance = Provenance(
        source=src, source_kind=resolved.source, revision=resolved.revision, yes_id=tokens.yes_id, no_id=tokens.no_id,
        pad_id=tokens.pad_id, tied=tied, score_dtype="float32", qconv_version=__version__,
    )
    return _Source(path, kind, seqcls_config(ckpt.config, tokens), provenance)


def _settings(exporter: str, options: QuantizeOptions) -> dict:
    """quantize_config.json's per-mode settings: the builder's encoders, or onnxruntime's quantizers."""
    if exporter == "builder":
        from qwen_convert.onnx import precision

        describe = getattr(precision, "precision_settings", None)
        if describe is not None:
            return describe(options)
    return quantize_settings(options)


def _opset(path: Path) -> int:
    from qwen_convert.checkpoint.onnx_header import read_header

    return read_header(path).opset  # (onnx.load would parse an inline graph's every weight)


def _reference(src: str | Path, kind: ArtifactKind, options: ExportOptions, reporter: Reporter) -> tuple[str, str] | None:
    """What the export is verified against: always a causal reranker (checked before any work)."""
    if not options.verify:
        return None
    if options.reference is None:
        if kind is ArtifactKind.CAUSAL:
            return str(src), "the causal source"
        # A seq-cls torch model as reference would prove the export but not the head conversion;
        # `verify` only trusts the original.
        raise SourceError(f"{src} is already a seq-cls model, so there is no causal reference to verify against",
                          "pass --reference with the original Qwen3-Reranker, or --no-verify")
    ref = resolve_model(options.reference, reporter=reporter)
    if detect_kind(ref.path) is not ArtifactKind.CAUSAL:
        raise SourceError(f"reference {options.reference} is not a causal reranker (Qwen3ForCausalLM)", "pass the original Qwen3-Reranker")
    return options.reference, "the causal reference given with --reference"


def _verify(reference: str, out: Path, options: ExportOptions, reporter: Reporter):
    from qwen_convert.verify import VerifyOptions, verify

    base = options.verify_options or VerifyOptions()
    verify_options = replace(base, pairs_file=options.pairs_file or base.pairs_file, variants=())
    return verify(reference, [out], verify_options, reporter=reporter)
