"""The query-expansion model of a search stack: a Qwen3 causal LM as ONNX *with* KV cache.

`export_causal_lm` writes the "text-generation-with-past" decoder (inputs input_ids,
attention_mask, position_ids, past_key_values.*; outputs logits, present.*) that optimum's
ORTModelForCausalLM, transformers.js and a plain onnxruntime loop (decode.py) generate() from.
Two exporters (CAUSAL_EXPORTERS):
  * builder (default): causal_graph.py writes every variant straight from the safetensors, one
    streaming pass each, no torch (torch runs only for the calibrated variants' calibration pass);
    int8/q4/q4f16 are calibrated (SmoothQuant / AWQ folded into the weights, calibration.py) unless
    quant_method is "naive".
  * optimum: optimum-onnx traces a torch model to fp32 and onnxruntime's whole-graph quantizers make
    the other variants (the cross-check; needs qconv[optimum] and several times the fp32 weights in RAM).
Layout, as for the reranker export (transformers.js style):
    OUT/config.json, generation_config.json, tokenizer files, chat template, quantize_config.json,
    OUT/genai_config.json (onnxruntime-genai's og.Model(OUT); genai_config.py)
    OUT/onnx/model.onnx (+ model.onnx_data), OUT/onnx/model_q4f16.onnx ...

causal_verify.py checks each variant against torch (greedy tokens, logits).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwen_convert.errors import ExportError, SourceError, first_line
from qwen_convert.formats import EXTERNAL_DATA_THRESHOLD, ONNX_DIR, QUANTIZE_CONFIG, QuantMode, VariantFile, parse_modes
from qwen_convert.fsutil import atomic_output_dir, check_output_dir
from qwen_convert.progress import NULL, Reporter

from .. import __version__
from .build import build_logged
from .export import quantize_variants, variant_file
from .genai_config import write_genai_config
from .optimum_compat import check_optimum_source, optimum_source
from .quantize import QuantizeOptions, quiet_logs

TASK = "text-generation-with-past"
CAUSAL_EXPORTERS = ("builder", "optimum")
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.jinja", "generation_config.json", "LICENSE")
# transformers.js 3.x sizes the empty first-step cache from this key (4.x reads the session's inputs).
FP16_CACHE = {"fp16": "float16", "q4f16": "float16"}


@dataclass(frozen=True)
class CausalExportOptions:
    modes: tuple[str, ...] = ("fp32", "q4f16")  # the optimum exporter writes fp32 whatever is listed
    block_size: int = 32
    quantize_embedding: bool = True
    per_channel: bool = False
    force: bool = False
    exporter: str = "builder"  # builder | optimum
    quant_method: str | None = None  # calibrated | naive; None: calibrated with the builder, naive with optimum
    calibration_file: Path | None = None  # JSONL pairs (as export-onnx --calibration); None: the built-in probes
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD

    def method(self) -> str:
        return self.quant_method or ("calibrated" if self.exporter == "builder" else "naive")

    def quantize_options(self) -> QuantizeOptions:
        return QuantizeOptions(block_size=self.block_size, quantize_embedding=self.quantize_embedding,
                               per_channel=self.per_channel, external_data_threshold=self.external_data_threshold)


@dataclass(frozen=True)
class CausalExportResult:
    out: Path
    source: str
    variants: tuple[VariantFile, ...]
    seconds: float
    exporter: str = "builder"
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "source": self.source, "task": TASK, "exporter": self.exporter,
                "variants": [v.to_dict() for v in self.variants], "seconds": round(self.seconds, 3)}

    def render(self) -> str:
        lines = [f"wrote {self.out}  (causal LM with KV cache, {self.exporter} exporter, {self.seconds:.1f} s)"]
        lines += [f"  {v.mode:<6} {v.path:<28} {v.bytes / 2**20:9.1f} MiB" for v in self.variants]
        return "\n".join(lines)


def causal_modes(names: Sequence[str], exporter: str = "builder") -> list[QuantMode]:
    """The modes to write, fp32 first when listed; the optimum path always writes fp32 (its
    quantizers start from that graph)."""
    rest = list(parse_modes([n for n in names if n.strip().lower() != QuantMode.FP32.value]))
    fp32 = exporter == "optimum" or any(n.strip().lower() == QuantMode.FP32.value for n in names)
    modes = ([QuantMode.FP32] if fp32 else []) + rest
    if not modes:
        raise ExportError("nothing to export: no ONNX mode listed", 'list modes, e.g. ["fp32", "q4f16"]')
    return modes


def has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    cfg = path / "tokenizer_config.json"
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")) if cfg.is_file() else False
    except (OSError, ValueError):
        return False


def check_causal_source(path: Path, exporter: str = "builder") -> dict:
    """Refuse, before OUT exists, what the query-expansion export cannot take; returns config.json."""
    from qwen_convert.checkpoint.files import open_checkpoint
    from qwen_convert.checkpoint.kind import check_causal_qwen3

    ckpt = open_checkpoint(path)  # a missing config or weights: one error naming the file
    check_causal_qwen3(ckpt)  # not Qwen3, or already a seq-cls model
    if not has_chat_template(path):
        # A Qwen3-Reranker (and qconv:tiny-reranker) is a Qwen3ForCausalLM too, but a scoring model:
        # generate() from chat prompts needs the instruct model's chat template.
        raise SourceError(f"{path} has no chat template, so it is not a chat model to generate queries with "
                          "(a reranker?)", "point the causal-lm recipe at an instruct model, e.g. Qwen/Qwen3-0.6B")
    if exporter == "builder":
        from qwen_convert.checkpoint.validate import check_checkpoint

        from .causal_graph import check_causal_shape

        check_causal_shape(ckpt.config, path)
        check_checkpoint(ckpt)
    else:
        check_optimum_source(ckpt.config, path)
    return ckpt.config


def export_causal_lm(src: str | Path, out: str | Path, options: CausalExportOptions = CausalExportOptions(),
                     reporter: Reporter = NULL) -> CausalExportResult:
    """Export a local Qwen3 causal LM directory to ONNX with KV cache (+ quantized variants), atomically."""
    from .calibration import calibration_set

    started = time.perf_counter()
    src, out = Path(src), Path(out)
    if options.exporter not in CAUSAL_EXPORTERS:
        raise ExportError(f"unknown exporter {options.exporter!r}", f"valid exporters: {', '.join(CAUSAL_EXPORTERS)}")
    if options.exporter == "optimum":
        from ..extras import require_optimum

        require_optimum("the query-expansion export with --exporter optimum")
    modes = causal_modes(options.modes, options.exporter)
    check_output_dir(out, options.force)
    if out.resolve() == src.resolve():
        raise SourceError(f"OUT {out} is the source directory", "choose a new OUT")
    config = check_causal_source(src, options.exporter)
    calibration = calibration_set(src, modes, options.method(), options.exporter, options.calibration_file)
    with atomic_output_dir(out, options.force) as tmp:
        (tmp / ONNX_DIR).mkdir()
        reporter.log(f"exporting {src} -> {out}/{ONNX_DIR} ({options.exporter} exporter, {TASK}: "
                     f"{', '.join(m.value for m in modes)})")
        write = _write_builder if options.exporter == "builder" else _write_optimum
        made = write(src, tmp, modes, options, reporter, calibration)
        variants = tuple(variant_file(tmp, m) for m in modes)
        write_causal_sidecars(tmp, src, config, fp16_cache=options.exporter == "builder")
        # genai_config.json names one decoder: the first variant, fp32 whenever it is listed (causal_modes
        # puts it first), the one verified token for token against torch and the file ORTModelForCausalLM
        # and transformers.js load by default. Another variant: og.Config(OUT).overlay() its filename.
        write_genai_config(tmp, config, variants[0].path, shared_buffer=options.exporter == "builder")
        settings = causal_settings(options, variants, made)
        (tmp / QUANTIZE_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return CausalExportResult(out, str(src), variants, time.perf_counter() - started, options.exporter, settings)


def _write_builder(src: Path, tmp: Path, modes: list[QuantMode], options: CausalExportOptions, reporter: Reporter,
                   calibration=None) -> dict:
    """Every variant from the checkpoint (causal_graph.py); with a calibration set, one calibration
    pass first and each quantized variant's scales folded in."""
    from qwen_convert.checkpoint.files import open_checkpoint

    from .causal_graph import build_causal_onnx
    from .shapes import shape_choices

    ckpt = open_checkpoint(src)
    qopts = options.quantize_options()
    plans, keep, record = {}, {}, {"method": "naive"}
    if calibration is not None:
        from .calibration import plan_variants

        planned = plan_variants(src, calibration, modes, qopts, reporter=reporter)
        plans, keep, record = planned.plans, planned.keep, planned.record
    q4 = any(m in (QuantMode.Q4, QuantMode.Q4F16) for m in modes)
    for note in shape_choices(ckpt.config, options.block_size, options.quantize_embedding).notes(q4):
        reporter.log(note)
    for mode in modes:
        build_logged(reporter, mode, lambda mode=mode: build_causal_onnx(
            ckpt, tmp / ONNX_DIR / mode.file_name, mode, qopts, options.external_data_threshold,
            fold=plans.get(mode.value), keep=keep.get(mode.value, frozenset())))
    return {"quantization": record}


def _write_optimum(src: Path, tmp: Path, modes: list[QuantMode], options: CausalExportOptions, reporter: Reporter,
                   calibration=None) -> dict:
    """fp32 traced by optimum-onnx, then onnxruntime's whole-graph quantizers (naive)."""
    import onnx
    from optimum.exporters.onnx import main_export

    trace = tmp / ".optimum"
    task = reporter.task("export fp32 (with past, optimum)", total=None)
    with quiet_logs(), optimum_source(src, tmp) as traced:  # a transformers-5 config, as transformers 4.x must read it
        try:
            # fp32 whatever the checkpoint's storage dtype; optimum's own validation is skipped
            # because causal_verify checks far more (generation, decode logits).
            main_export(str(traced.path), output=str(trace), task=TASK, device="cpu", dtype="fp32",
                        do_validation=False, local_files_only=True)
        except Exception as exc:  # the exporter raises every type
            raise ExportError(f"ONNX export failed: {first_line(exc)}", "run with QCONV_DEBUG=1 for the traceback") from exc
    task.advance()
    for f in trace.glob("model.onnx*"):
        shutil.move(str(f), tmp / ONNX_DIR / f.name)  # .onnx and its _data keep their relative location
    shutil.rmtree(trace)
    fp32 = tmp / ONNX_DIR / QuantMode.FP32.file_name
    # On the path (works past 2 GB): the fp16 pass relies on value_info from shape inference.
    onnx.shape_inference.infer_shapes_path(str(fp32), str(fp32))
    quantize_variants(tmp / ONNX_DIR, modes[1:], options.quantize_options(), reporter)
    return {"quantization": {"method": "naive"}, **traced.settings()}


def write_causal_sidecars(out: Path, src: Path, config: dict, fp16_cache: bool) -> list[str]:
    """config.json (+ the cache dtype transformers.js 3 reads), tokenizer, chat template, generation config."""
    written = []
    for name in SIDECAR_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            written.append(name)
    config = {**config, "use_cache": True}
    if fp16_cache:
        config["transformers.js_config"] = {**config.get("transformers.js_config", {}), "kv_cache_dtype": FP16_CACHE}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ["config.json", *written]


def causal_settings(options: CausalExportOptions, variants: Sequence[VariantFile], made: dict) -> dict:
    """quantize_config.json: how each variant was made (`made`: the writer's entries, "quantization" and
    any "source_config_adapted"), and the graph's inputs and outputs."""
    from .precision import precision_settings

    settings = {"qconv_version": __version__, "task": TASK, "exporter": options.exporter,
                "files": {v.mode: v.path for v in variants}, **made}
    if options.exporter == "builder":
        encoders = precision_settings(options.quantize_options())["encoders"]
        encoders.pop("all", None)
        settings["encoders"] = {v.mode: encoders[v.mode] for v in variants}
        settings["io"] = {
            "inputs": "input_ids, attention_mask [batch, past + sequence], position_ids int64; "
                      "past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim] in the activation dtype",
            "outputs": "logits [batch, sequence, vocab] float32; present.{i}.key/.value [batch, kv_heads, past + sequence, head_dim]",
            "head": "final RMSNorm on every position, lm_head (the embedding when tied) in the variant's precision",
            "limits": "onnxruntime's GroupQueryAttention: more than one new token with a non-empty past only at batch 1 "
                      "(generate() prefills with an empty past, then decodes one token a step)",
        }
    return settings


def load_ort_causal_lm(path: str | Path, mode: str = "fp32"):
    """optimum's ORTModelForCausalLM for one variant of an export_causal_lm directory."""
    from ..extras import require_optimum

    require_optimum("generating with the query-expansion export (ORTModelForCausalLM)")
    from optimum.onnxruntime import ORTModelForCausalLM

    with quiet_logs():
        model = ORTModelForCausalLM.from_pretrained(str(path), subfolder=ONNX_DIR, file_name=QuantMode(mode).file_name)
    head_dim = getattr(model.config, "head_dim", None)
    if head_dim:
        # optimum-onnx sizes the empty first-step cache as hidden_size // num_attention_heads, but
        # Qwen3 sets head_dim explicitly (0.6B: 1024 // 16 = 64, head_dim 128), and onnxruntime then
        # refuses the input (huggingface/optimum#2379).
        model.embed_size_per_head = head_dim
    return model


# --- a tiny local causal LM (tests, CI) --------------------------------------------------------------

# Qwen3's chat format, reduced to what generation from one user turn needs (no tools, no reasoning
# history); enable_thinking=False adds the empty think block as Qwen3's template does.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def build_tiny_causal_lm(out: str | Path, seed: int = 0, head_dim: int = 32, tied: bool = True, dtype: str = "float32") -> Path:
    """A random tiny Qwen3ForCausalLM with the package tokenizer and a chat template. head_dim
    deliberately differs from hidden_size // num_attention_heads (as in the real Qwen3-0.6B) so the
    cache-shape pitfall shows."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from qwen_convert.fixtures import TinySpec, copy_tokenizer, tiny_config

    out = Path(out)
    copy_tokenizer(out)
    (out / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE, encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(out))
    config = tiny_config(TinySpec(head_dim=head_dim, seed=seed, tied=tied, dtype=dtype), len(tok), tok.pad_token_id, tok.eos_token_id)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)  # spread the logits so greedy choices are not near-ties
    model.to(getattr(torch, dtype)).save_pretrained(str(out), safe_serialization=True)
    return out
