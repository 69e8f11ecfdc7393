"""The default ONNX variant (scoring/choose.py): verified first, then the fastest measured on this CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_convert.errors import SourceError
from qwen_convert.formats import QuantMode
from qwen_convert.onnx.export import ExportOptions, export_onnx
from qwen_convert.scoring import choose
from qwen_convert.scoring.choose import choose_variant


@pytest.fixture(scope="module")
def export(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("choose") / "onnx"
    export_onnx(tiny_models["tied_fp32"], out, ExportOptions(modes=("int8", "q4"), verify=False, prefix_graphs=False))
    return out


def _report(export: Path, passed: dict[str, bool]) -> None:
    rows = [{"name": f"onnx/{v}", "path": str(export), "passed": ok} for v, ok in passed.items()]
    (export / "verify.json").write_text(json.dumps({"candidates": rows}))


def test_unverified_export_measures_int8_and_fp32_once_and_caches_the_choice(export, tmp_path, monkeypatch):
    cache = tmp_path / "choice.json"
    calls = []
    real = choose._pairs_per_s
    monkeypatch.setattr(choose, "_pairs_per_s", lambda e, m, t: calls.append(m) or real(e, m, t))
    first = choose_variant(export, cache=cache)
    assert first.reason == "measured" and set(first.candidates) == {"int8", "fp32"} and not first.verified
    assert set(first.pairs_per_s) == {"int8", "fp32"} and all(v > 0 for v in first.pairs_per_s.values())
    assert first.mode.value == max(first.pairs_per_s, key=first.pairs_per_s.get)
    again = choose_variant(export, cache=cache)
    assert again.reason == "cached measurement" and again.mode == first.mode and len(calls) == 2
    # A changed graph file is a different key: measured again.
    stored = json.loads(cache.read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["variant"] == first.mode.value


def test_verify_report_decides_the_candidates(export, tmp_path):
    try:
        _report(export, {"fp32": True, "int8": False, "q4": False})
        only = choose_variant(export, cache=tmp_path / "c.json")
        assert only.mode is QuantMode.FP32 and only.reason == "only candidate" and only.verified
        _report(export, {"fp32": True, "int8": True, "q4": True})
        many = choose_variant(export, cache=tmp_path / "c.json")
        assert many.reason == "measured" and set(many.pairs_per_s) == {"fp32", "int8", "q4"}
        _report(export, {"fp32": False, "int8": False})
        with pytest.raises(SourceError, match="passed its gate"):
            choose_variant(export, cache=tmp_path / "c.json")
        # On CUDA nothing is measured: serve's static order, fp16-first (here: fp32 ahead of q4 and int8).
        _report(export, {"fp32": True, "int8": True})
        assert choose_variant(export, provider="CUDAExecutionProvider").reason == "static order"
    finally:
        (export / "verify.json").unlink(missing_ok=True)


def test_a_named_variant_is_taken_as_asked(export):
    assert choose_variant(export, "q4").mode is QuantMode.Q4
    with pytest.raises(SourceError, match="no fp16 variant"):
        choose_variant(export, "fp16")
