"""The query-expansion model of a search stack: a Qwen3 causal LM as ONNX *with* KV cache.

`export_causal_lm` runs optimum's exporter with task "text-generation-with-past" (inputs input_ids,
attention_mask, position_ids, past_key_values.*; outputs logits, present.*), so optimum's
`ORTModelForCausalLM` can `generate()` from it; quantized variants come from the same mode table
as the reranker's (quantize.py). Layout, as for the reranker export (transformers.js style):
    OUT/config.json, generation_config.json, tokenizer files
    OUT/onnx/model.onnx (+ model.onnx_data), OUT/onnx/model_q4f16.onnx ...

`verify_causal_lm` compares each variant with the torch model on the same prompts: greedy
generate() token for token (the KV-cache decode path), the per-step logits of that decode while the
tokens agree, and the teacher-forced next-token argmax along torch's greedy continuation.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.errors import ExportError, QconvError, SourceError
from qwen_convert.formats import ONNX_DIR, QuantMode, VariantFile, parse_modes
from qwen_convert.fsutil import atomic_output_dir
from qwen_convert.progress import NULL, Reporter

from .export import quantize_variants, variant_file
from .quantize import QuantizeOptions, quiet_logs

TASK = "text-generation-with-past"


@dataclass(frozen=True)
class CausalExportOptions:
    modes: tuple[str, ...] = ("fp32", "q4f16")  # fp32 is always written: every variant derives from it
    block_size: int = 32
    quantize_embedding: bool = True
    force: bool = False


@dataclass(frozen=True)
class CausalExportResult:
    out: Path
    source: str
    variants: tuple[VariantFile, ...]
    seconds: float

    def to_dict(self) -> dict:
        return {"out": str(self.out), "source": self.source, "task": TASK,
                "variants": [v.to_dict() for v in self.variants], "seconds": round(self.seconds, 3)}


def _modes(names: Sequence[str]) -> list[QuantMode]:
    """fp32 first (every variant derives from it), then the quantized modes as quantize parses them."""
    return [QuantMode.FP32, *parse_modes([n for n in names if n.strip().lower() != QuantMode.FP32.value])]


def export_causal_lm(src: str | Path, out: str | Path, options: CausalExportOptions = CausalExportOptions(),
                     reporter: Reporter = NULL) -> CausalExportResult:
    """Export a local Qwen3 causal LM directory to ONNX with KV cache (+ quantized variants), atomically."""
    from ..extras import require_optimum

    require_optimum("the query-expansion export (causal LM)")
    from optimum.exporters.onnx import main_export

    from qwen_convert.checkpoint.files import load_config
    from qwen_convert.checkpoint.kind import check_qwen3

    started = time.perf_counter()
    src, out = Path(src), Path(out)
    config = load_config(src)
    check_qwen3(config, src)
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise SourceError(f"{src} is not a causal LM ({config.get('architectures')})", "a causal-lm recipe needs a Qwen3ForCausalLM")
    modes = _modes(options.modes)
    qopts = QuantizeOptions(block_size=options.block_size, quantize_embedding=options.quantize_embedding)
    with atomic_output_dir(out, options.force) as tmp:
        reporter.log(f"exporting {src} -> {out}/{ONNX_DIR}/model.onnx (task {TASK})")
        task = reporter.task("export fp32 (with past)", total=None)
        with quiet_logs():
            try:
                # fp32 whatever the checkpoint's storage dtype; optimum's own validation is skipped
                # because verify_causal_lm checks far more (generation, decode logits).
                main_export(str(src), output=str(tmp), task=TASK, device="cpu", dtype="fp32",
                            do_validation=False, local_files_only=True)
            except Exception as exc:  # the exporter raises every type
                raise ExportError(f"ONNX export failed: {exc}".splitlines()[0], "run with QCONV_DEBUG=1 for the traceback") from exc
        task.advance()
        onnx_dir = tmp / ONNX_DIR
        onnx_dir.mkdir()
        for f in tmp.glob("model.onnx*"):
            shutil.move(str(f), onnx_dir / f.name)  # .onnx and its _data keep their relative location
        fp32 = onnx_dir / QuantMode.FP32.file_name
        import onnx

        # On the path (works past 2 GB): the fp16 pass relies on value_info from shape inference.
        onnx.shape_inference.infer_shapes_path(str(fp32), str(fp32))
        quantize_variants(onnx_dir, modes[1:], qopts, reporter)
        variants = tuple(variant_file(tmp, m) for m in modes)
    return CausalExportResult(out, str(src), variants, time.perf_counter() - started)


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


# --- verification ---------------------------------------------------------------------------------

@dataclass
class VariantCheck:
    mode: str
    prompts: int
    greedy_identical: int  # prompts whose greedy continuation equals torch's token for token
    first_divergence: list[int | None]  # per prompt: index of the first differing new token
    decode_max_abs_logit: float  # generate() logits (KV-cache path) while the tokens agree
    prefill_max_abs_logit: float  # teacher-forced logits over torch's greedy continuation
    token_agreement: float  # teacher-forced argmax == torch's greedy token, fraction of positions
    checks: list[dict] = field(default_factory=list)  # {name, value, gate, passed}: the manifest's metrics
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def greedy_match(self) -> float:
        return self.greedy_identical / self.prompts

    @property
    def max_abs_logit(self) -> float:
        return max(self.decode_max_abs_logit, self.prefill_max_abs_logit)

    @property
    def gate(self) -> str:
        return ", ".join(f"{c['name']} {c['gate']}" for c in self.checks if c["gate"]) or "none"

    def to_dict(self) -> dict:
        return {"name": f"onnx/{self.mode}", "mode": self.mode, "passed": self.passed, "gate": self.gate,
                "prompts": self.prompts, "greedy_identical": self.greedy_identical, "greedy_match": self.greedy_match,
                "first_divergence": self.first_divergence, "max_abs_logit": self.max_abs_logit,
                "decode_max_abs_logit": self.decode_max_abs_logit, "prefill_max_abs_logit": self.prefill_max_abs_logit,
                "token_agreement": self.token_agreement, "checks": self.checks, "failures": self.failures}

    def gated(self, gates: "CausalGates") -> "VariantCheck":
        """Fill checks and failures: fp32 must generate identically within tol_logit; quantized
        variants must agree on the next token at least min_token_agreement of the time."""
        fp32 = self.mode == QuantMode.FP32.value
        self.checks = [
            {"name": "greedy_match", "value": self.greedy_match, "gate": ">= 1" if fp32 else None,
             "passed": self.greedy_match >= 1 if fp32 else None},
            {"name": "max_abs_logit", "value": self.max_abs_logit, "gate": f"<= {gates.tol_logit:g}" if fp32 else None,
             "passed": bool(self.max_abs_logit <= gates.tol_logit) if fp32 else None},
            {"name": "token_agreement", "value": self.token_agreement, "gate": None if fp32 else f">= {gates.min_token_agreement:g}",
             "passed": None if fp32 else bool(self.token_agreement >= gates.min_token_agreement)},
        ]
        details = {
            "greedy_match": f"greedy generation differs from torch on {self.prompts - self.greedy_identical} of {self.prompts} prompts",
            "max_abs_logit": f"max |Δlogit| {self.max_abs_logit:.3e} > {gates.tol_logit:.1e}",
            "token_agreement": f"teacher-forced top-1 agreement {self.token_agreement:.3f} < {gates.min_token_agreement:g}",
        }
        self.failures = [f"onnx/{self.mode}: {details[c['name']]}" for c in self.checks if c["passed"] is False]
        return self


@dataclass
class CausalVerifyReport:
    reference: str
    prompts: tuple[str, ...]
    max_new_tokens: int
    variants: list[VariantCheck]
    chat_template: bool

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reference": self.reference, "prompts": list(self.prompts),
                "max_new_tokens": self.max_new_tokens, "chat_template": self.chat_template,
                "candidates": [v.to_dict() for v in self.variants]}

    def render(self) -> str:
        lines = [f"reference {self.reference} (torch fp32), {len(self.prompts)} prompts x {self.max_new_tokens} greedy tokens"]
        for v in self.variants:
            lines.append(f"  onnx/{v.mode:<6} greedy {v.greedy_identical}/{v.prompts} identical  max|Δlogit| {v.max_abs_logit:.2e}  "
                         f"top-1 agreement {v.token_agreement:.3f}  gate {v.gate}  {'PASS' if v.passed else 'FAIL'}")
            lines += [f"    FAIL {f}" for f in v.failures]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


@dataclass(frozen=True)
class CausalGates:
    tol_logit: float = 1e-3  # fp32: max |Δlogit| (decode and prefill), and greedy tokens identical
    min_token_agreement: float = 0.9  # quantized: teacher-forced top-1 agreement with torch's greedy tokens


def _encode(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        except TypeError:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def _greedy(model, ids: list[int], max_new_tokens: int, pad_id: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation and the raw logits of each generated step (float64 [steps, vocab])."""
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    logits = np.stack([step[0].float().numpy() for step in out.logits]).astype(np.float64)
    return tokens, logits


def _forward_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    return out.logits[0].float().numpy().astype(np.float64)


def verify_causal_lm(reference: str | Path, export_dir: str | Path, prompts: Sequence[str], max_new_tokens: int = 16,
                     modes: Sequence[str] = ("fp32",), gates: CausalGates = CausalGates(), reporter: Reporter = NULL) -> CausalVerifyReport:
    """Each ONNX variant against the torch model: greedy tokens, decode logits, teacher-forced argmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not prompts:
        raise QconvError("no prompts to verify on", "give at least one prompt")
    reference, export_dir = Path(reference), Path(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_encode(tokenizer, p) for p in prompts]

    with quiet_logs():
        ref_model = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32).eval()
    ref_runs = []
    task = reporter.task("reference (torch)", total=len(encoded))
    for ids in encoded:
        tokens, step_logits = _greedy(ref_model, ids, max_new_tokens, pad_id)
        full = ids + tokens
        ref_runs.append((tokens, step_logits, full, _forward_logits(ref_model, full)))
        task.advance()
    del ref_model
    gc.collect()

    checks = []
    for mode in _modes(modes):
        model = load_ort_causal_lm(export_dir, mode.value)
        identical, divergence, decode_max, prefill_max = 0, [], 0.0, 0.0
        agree = total = 0
        task = reporter.task(f"onnx/{mode.value}", total=len(encoded))
        for ids, (ref_tokens, ref_steps, full, ref_full) in zip(encoded, ref_runs):
            tokens, steps = _greedy(model, ids, max_new_tokens, pad_id)
            first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
            if first is None and len(tokens) != len(ref_tokens):
                first = min(len(tokens), len(ref_tokens))
            identical += first is None
            divergence.append(first)
            upto = len(ref_tokens) if first is None else first + 1  # the diverging step's logits still share a prefix
            upto = min(upto, len(steps), len(ref_steps))
            decode_max = max(decode_max, float(np.max(np.abs(steps[:upto] - ref_steps[:upto]))) if upto else 0.0)
            logits = _forward_logits(model, full)
            # Positions whose prediction is a generated token: len(ids)-1 ... len(full)-2.
            span = slice(len(ids) - 1, len(full) - 1)
            prefill_max = max(prefill_max, float(np.max(np.abs(logits[span] - ref_full[span]))))
            agree += int(np.sum(np.argmax(logits[span], axis=-1) == np.asarray(ref_tokens)))
            total += len(ref_tokens)
            task.advance()
        del model
        gc.collect()
        agreement = agree / total if total else 1.0
        checks.append(VariantCheck(mode.value, len(encoded), identical, divergence, decode_max, prefill_max, agreement).gated(gates))
    return CausalVerifyReport(str(reference), tuple(prompts), max_new_tokens, checks, bool(getattr(tokenizer, "chat_template", None)))


# --- a tiny local causal LM (tests, CI) --------------------------------------------------------------

def build_tiny_causal_lm(out: str | Path, seed: int = 0, head_dim: int = 32) -> Path:
    """A random tiny Qwen3ForCausalLM with the package tokenizer. head_dim deliberately differs from
    hidden_size // num_attention_heads (as in the real Qwen3-0.6B) so the cache-shape pitfall shows."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from qwen_convert.fixtures import TinySpec, copy_tokenizer, tiny_config

    out = Path(out)
    copy_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = tiny_config(TinySpec(head_dim=head_dim, seed=seed), len(tok), tok.pad_token_id, tok.eos_token_id)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)  # spread the logits so greedy choices are not near-ties
    model.save_pretrained(str(out), safe_serialization=True)
    return out
