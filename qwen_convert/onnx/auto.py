"""`--quantize auto`: export every candidate variant, verify each against the causal reference with
verify's gates (qwen_convert/verify/gates.py: drift in P(yes), ranking, retention), and pick the
smallest on disk that passes. Every candidate stays in OUT (a user may still want another); the
choice, each candidate's size and verdict, and the checks that failed go into quantize_config.json
under "auto" and into the export's result.

fp32 is never a candidate (it is the floor the others are measured against); fp16 is the fallback
when no quantized variant passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.errors import ExportError
from qwen_convert.formats import QuantMode

AUTO = "auto"
CANDIDATES = (QuantMode.FP16, QuantMode.INT8, QuantMode.Q4, QuantMode.Q4F16)


@dataclass(frozen=True)
class Candidate:
    mode: str
    bytes: int
    passed: bool
    failures: tuple[str, ...]  # verify's failing checks, each "check: detail"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "bytes": self.bytes, "passed": self.passed, "failures": list(self.failures)}


@dataclass(frozen=True)
class AutoChoice:
    """The smallest candidate that passed its gates (None: none did), and every candidate's verdict."""

    chosen: str | None
    candidates: tuple[Candidate, ...]

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "rule": "the smallest variant on disk that passes verify's gates",
                "candidates": [c.to_dict() for c in self.candidates]}

    def render(self) -> str:
        verdicts = ", ".join(f"{c.mode} {c.bytes / 2**20:.1f} MiB {'PASS' if c.passed else 'FAIL'}" for c in self.candidates)
        head = f"auto: chose {self.chosen}" if self.chosen else "auto: no variant passed its gates"
        return f"  {head} ({verdicts})"


def expand_auto(names: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """`--quantize` names with 'auto' replaced by the candidates; and whether it was there."""
    wanted = [n.strip().lower() for n in names]
    if AUTO not in wanted:
        return tuple(names), False
    rest = [n for n in wanted if n != AUTO]
    return tuple(rest + [m.value for m in CANDIDATES if m.value not in rest]), True


def check_auto(auto: bool, verify: bool) -> None:
    if auto and not verify:
        raise ExportError("--quantize auto picks a variant by verifying every candidate, and --no-verify was given",
                          "drop --no-verify, or name the variants with --quantize")


def choose_variant(variants: Sequence, report) -> AutoChoice:
    """variants: the export's VariantFiles; report: verify's report over them (CandidateResults whose
    precision is the variant's mode)."""
    results = {c.precision: c for c in report.candidates if c.kind == "onnx"} if report is not None else {}
    candidates = []
    for v in variants:
        if v.mode not in {m.value for m in CANDIDATES}:
            continue
        result = results.get(v.mode)
        passed = bool(result is not None and result.passed and report.reference.padding_invariant)
        failures = tuple(f"{f.check}: {f.detail}" for f in result.failures) if result is not None else ("not verified",)
        if result is not None and result.not_verified:
            failures += (f"not verified: {result.not_verified}",)
        candidates.append(Candidate(v.mode, v.bytes, passed, failures))
    passing = sorted((c for c in candidates if c.passed), key=lambda c: (c.bytes, c.mode))
    return AutoChoice(passing[0].mode if passing else None, tuple(sorted(candidates, key=lambda c: c.bytes)))


def mark_choice(config_path: Path, choice: AutoChoice) -> dict:
    """quantize_config.json with the choice under "auto" (written to a temp sibling, then renamed)."""
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    settings["auto"] = choice.to_dict()
    tmp = config_path.with_name(f".{config_path.name}.tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)
    return settings


def resolve_auto(modes: Sequence[str], onnx_record: dict | None) -> tuple[str, ...]:
    """A recipe's artifacts.onnx with 'auto' replaced by what its onnx step chose (recorded in the
    step's result); unchanged without 'auto'."""
    if AUTO not in modes:
        return tuple(modes)
    chosen = ((onnx_record or {}).get("result") or {}).get("auto", {}).get("chosen")
    return tuple(dict.fromkeys(chosen if m == AUTO else m for m in modes if m != AUTO or chosen))
