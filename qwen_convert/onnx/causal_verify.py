"""The query-expansion export against torch: greedy tokens, decode logits, teacher-forced argmax.

`verify_causal_lm` runs each ONNX variant with onnxruntime alone (decode.py's generate() loop: the
prompt with an empty cache, then one token a step; no optimum) and compares with the torch model
on the same prompts: greedy generation token for token (the KV-cache decode path), the per-step
logits of that decode while the tokens agree, and the teacher-forced next-token argmax along
torch's greedy continuation.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.formats import ONNX_DIR, QuantMode
from qwen_convert.progress import NULL, Reporter

from .quantize import quiet_logs


@dataclass
class VariantCheck:
    mode: str
    prompts: int
    greedy_identical: int  # prompts whose greedy continuation equals torch's token for token
    first_divergence: list[int | None]  # per prompt: index of the first differing new token
    decode_max_abs_logit: float  # generate() logits (KV-cache path) while the tokens agree
    prefill_max_abs_logit: float  # teacher-forced logits over torch's greedy continuation
    token_agreement: float  # teacher-forced argmax == torch's greedy token, fraction of positions
    decode_tokens_per_s: float = 0.0  # onnxruntime decode steps per second over the prompts (this machine)
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
                "token_agreement": self.token_agreement,
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "checks": self.checks, "failures": self.failures}

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


@dataclass(frozen=True)
class _Reference:
    ids: list[int]  # the prompt
    tokens: list[int]  # torch's greedy continuation
    steps: np.ndarray  # its per-step logits
    full_logits: np.ndarray  # teacher-forced logits over prompt + continuation


def _reference_runs(reference: Path, encoded: list[list[int]], max_new_tokens: int, pad_id: int,
                    reporter: Reporter) -> tuple[list[_Reference], tuple[int, ...]]:
    """torch fp32's greedy runs, and the eos ids its generate() stopped at (the ONNX loop stops there too)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_convert.checkpoint.rope import pretrained_kwargs

    with quiet_logs():
        # pretrained_kwargs: a transformers-5 config's RoPE under transformers 4.x (the optimum venv).
        model = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32,
                                                     **pretrained_kwargs(reference)).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    runs = []
    task = reporter.task("reference (torch)", total=len(encoded))
    for ids in encoded:
        tokens, steps = _greedy(model, ids, max_new_tokens, pad_id)
        runs.append(_Reference(ids, tokens, steps, _forward_logits(model, ids + tokens)))
        task.advance()
    del model
    gc.collect()
    return runs, eos_ids


def check_variant(path: Path, mode: str, refs: Sequence[_Reference], max_new_tokens: int, eos_ids: Sequence[int],
                  gates: CausalGates, reporter: Reporter = NULL) -> VariantCheck:
    """One ONNX file, run by onnxruntime alone (decode.py), against the torch runs."""
    from .decode import OrtCausalLM

    model = OrtCausalLM(path)
    identical, divergence, decode_max, prefill_max = 0, [], 0.0, 0.0
    agree = total = 0
    decoded, decode_seconds = 0, 0.0
    task = reporter.task(f"onnx/{mode}", total=len(refs))
    for ref in refs:
        run = model.generate(ref.ids, max_new_tokens, eos_ids)
        decoded, decode_seconds = decoded + len(run.tokens) - 1, decode_seconds + run.seconds_decode
        first = next((i for i, (a, b) in enumerate(zip(run.tokens, ref.tokens)) if a != b), None)
        if first is None and len(run.tokens) != len(ref.tokens):
            first = min(len(run.tokens), len(ref.tokens))
        identical += first is None
        divergence.append(first)
        upto = len(ref.tokens) if first is None else first + 1  # the diverging step's logits still share a prefix
        upto = min(upto, len(run.logits), len(ref.steps))
        if upto:
            decode_max = max(decode_max, float(np.max(np.abs(run.logits[:upto] - ref.steps[:upto]))))
        full = ref.ids + ref.tokens
        logits = model.logits(full)
        # Positions whose prediction is a generated token: len(ids)-1 ... len(full)-2.
        span = slice(len(ref.ids) - 1, len(full) - 1)
        prefill_max = max(prefill_max, float(np.max(np.abs(logits[span] - ref.full_logits[span]))))
        agree += int(np.sum(np.argmax(logits[span], axis=-1) == np.asarray(ref.tokens)))
        total += len(ref.tokens)
        task.advance()
    del model
    gc.collect()
    check = VariantCheck(mode, len(refs), identical, divergence, decode_max, prefill_max, agree / total if total else 1.0,
                         decode_tokens_per_s=decoded / decode_seconds if decode_seconds else 0.0)
    return check.gated(gates)


def verify_causal_lm(reference: str | Path, export_dir: str | Path, prompts: Sequence[str], max_new_tokens: int = 16,
                     modes: Sequence[str] = ("fp32",), gates: CausalGates = CausalGates(), reporter: Reporter = NULL) -> CausalVerifyReport:
    """Each ONNX variant against the torch model: greedy tokens, decode logits, teacher-forced argmax."""
    from transformers import AutoTokenizer

    from qwen_convert.errors import SourceError

    if not prompts:
        raise QconvError("no prompts to verify on", "give at least one prompt")
    reference, export_dir = Path(reference), Path(export_dir)
    files = [(QuantMode(m), export_dir / ONNX_DIR / QuantMode(m).file_name) for m in dict.fromkeys(modes)]
    missing = [str(f) for _m, f in files if not f.is_file()]
    if missing:
        raise SourceError(f"{export_dir} lacks {', '.join(missing)}", "export those modes first")
    tokenizer = AutoTokenizer.from_pretrained(str(reference))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_encode(tokenizer, p) for p in prompts]
    refs, eos_ids = _reference_runs(reference, encoded, max_new_tokens, pad_id, reporter)
    checks = [check_variant(path, mode.value, refs, max_new_tokens, eos_ids, gates, reporter) for mode, path in files]
    return CausalVerifyReport(str(reference), tuple(prompts), max_new_tokens, checks, bool(getattr(tokenizer, "chat_template", None)))


# --- `qconv verify REFERENCE EXPORT` on a causal-LM export ---------------------------------------------

DEFAULT_PROMPTS = (  # pipeline/recipe.py's causal-lm default, for a verify without a recipe
    "Expand the search query into related search queries: cheap flights to tokyo",
    "Rewrite the query with synonyms: how to fix a leaking tap",
)


def is_causal_export(path: str | Path) -> bool:
    """A directory written by export_causal_lm (its quantize_config.json names the with-past task)."""
    import json

    settings = Path(path) / "quantize_config.json"
    try:
        return json.loads(settings.read_text(encoding="utf-8")).get("task") == "text-generation-with-past"
    except (OSError, ValueError, AttributeError):
        return False


def verify_causal_export(reference: str, export_dir: str | Path, variants: Sequence[str] = (), tol_logit: float | None = None,
                         prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 16,
                         reporter: Reporter = NULL) -> CausalVerifyReport:
    """verify_causal_lm on every variant the export holds (or `variants`), the reference resolved as
    `qconv verify` resolves it (directory, qconv:NAME or hub id)."""
    import json

    from qwen_convert.hub.resolve import resolve_model

    files = json.loads((Path(export_dir) / "quantize_config.json").read_text(encoding="utf-8")).get("files", {})
    modes = tuple(variants) or tuple(files)
    gates = CausalGates() if tol_logit is None else CausalGates(tol_logit=tol_logit)
    path = resolve_model(reference, reporter=reporter).path
    return verify_causal_lm(path, export_dir, prompts, max_new_tokens, modes, gates, reporter)
