"""A failure inside onnxruntime, torch or the tokenizer reaches the user as one line naming the
variant and the operation, exit 1, no traceback (QCONV_DEBUG=1 keeps it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.errors import EngineError
from qwen_convert.onnx.export import ExportOptions, export_onnx

runner = CliRunner()
ORT_MESSAGE = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running Gemm node.\ndetails"


def one_line(result) -> str:
    """The single stderr line of a failed command (and the proof that nothing else was printed)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # --quiet: no progress either
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rt") / "out"
    export_onnx(tiny_models["tied_fp32"], out, ExportOptions(modes=("int8",), verify=False))
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    """Two short pairs: the failures come on the first batch, the builtin probes would take ~10 s."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text('{"query": "q", "document": "a document", "label": 1}\n{"query": "q", "document": "other", "label": 0}\n')
    return str(path)


@pytest.fixture
def int8_fails(monkeypatch):
    """onnxruntime's own exception class, raised by the int8 graph's session at run time only."""
    real = ort.InferenceSession.run

    def run(self, *args, **kwargs):
        if self._model_path.endswith("model_quantized.onnx"):
            raise InvalidArgument(ORT_MESSAGE)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", run)


def test_export_names_the_variant_whose_run_failed(tiny_models, tmp_path, int8_fails, pairs):
    result = runner.invoke(app, ["export-onnx", str(tiny_models["tied_fp32"]), str(tmp_path / "out"), "--quantize", "int8", "-q",
                                 "--pairs", pairs])
    line = one_line(result)
    assert line == ("error: onnx/int8: onnxruntime failed to run model_quantized.onnx: [ONNXRuntimeError] : 2 : "
                    "INVALID_ARGUMENT : Non-zero status code returned while running Gemm node. "
                    "(re-export it with qconv export-onnx; QCONV_DEBUG=1 shows the traceback)")


def test_export_names_the_variant_whose_build_failed(tiny_models, tmp_path, monkeypatch):
    import qwen_convert.onnx.build as build

    def broken(ckpt, path, mode, *args, **kwargs):  # kwargs: the calibrated fold and keep
        raise ValueError("cannot pack\nsecond line")

    monkeypatch.setattr(build, "build_onnx", broken)
    line = one_line(runner.invoke(app, ["export-onnx", str(tiny_models["tied_fp32"]), str(tmp_path / "out"), "--no-verify", "-q"]))
    assert line == "error: onnx/fp32: building model.onnx failed: cannot pack (QCONV_DEBUG=1 shows the traceback)"
    assert not (tmp_path / "out").exists()


def test_verify_names_the_variant_and_debug_keeps_the_traceback(tiny_models, exported, int8_fails, monkeypatch, pairs):
    args = ["verify", str(tiny_models["tied_fp32"]), str(exported), "--no-cache", "-q", "--pairs", pairs]
    line = one_line(runner.invoke(app, args))
    assert line.startswith("error: onnx/int8: onnxruntime failed to run model_quantized.onnx: [ONNXRuntimeError]")
    monkeypatch.setenv("QCONV_DEBUG", "1")
    result = runner.invoke(app, args)
    assert isinstance(result.exception, EngineError) and isinstance(result.exception.__cause__, InvalidArgument)


def test_verify_names_torch_when_the_reference_fails(tiny_models, exported, monkeypatch, pairs):
    from qwen_convert.scoring import torch_scorers

    def oom(self, batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory\nmore")

    monkeypatch.setattr(torch_scorers.CausalScorer, "score", oom)
    line = one_line(runner.invoke(app, ["verify", str(tiny_models["tied_fp32"]), str(exported), "--no-cache", "-q", "--pairs", pairs]))
    assert line.startswith("error: causal: torch failed to run the model: [enforce fail at alloc_cpu.cpp:117] data. "
                           "DefaultCPUAllocator: not enough memory (check the model files")


def test_run_names_the_variant_and_keeps_the_finished_steps(tiny_models, tmp_path, int8_fails, pairs):
    recipe = tmp_path / "rt.toml"
    recipe.write_text(f'name = "rt"\n[source]\npath = "{tiny_models["tied_fp32"]}"\n'
                      f'[artifacts]\nseqcls = false\nonnx = ["int8"]\n[verify]\npairs = "{pairs}"\n')
    line = one_line(runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "out"), "-q"]))
    assert line.startswith("error: onnx/int8: onnxruntime failed to run model_quantized.onnx: [ONNXRuntimeError] : 2 :")
    assert (tmp_path / "out" / "onnx" / "onnx" / "model_quantized.onnx").is_file()  # the export step finished


def test_score_names_the_tokenizer_failure(exported, monkeypatch):
    from tokenizers import Tokenizer

    def panic(self, *args, **kwargs):
        raise Exception("Tokenizer panicked\nat src/lib.rs")

    monkeypatch.setattr(Tokenizer, "encode_batch", panic, raising=False)
    monkeypatch.setattr(Tokenizer, "encode", panic, raising=False)
    line = one_line(runner.invoke(app, ["score", str(exported), "--query", "q", "--doc", "d"]))
    assert line.startswith("error: the tokenizer failed to encode a prompt: Tokenizer panicked (")


def test_a_graph_onnxruntime_rejects_fails_score_in_one_line_in_a_real_process(exported, tmp_path):
    import onnx

    out = tmp_path / "rejected"
    shutil.copytree(exported, out)
    path = out / "onnx" / "model_quantized.onnx"
    graph = onnx.load(str(path))
    graph.graph.node[0].op_type = "NoSuchOp"  # a well-formed file whose graph onnxruntime refuses to load
    onnx.save(graph, str(path))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("QCONV_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "qwen_convert.cli", "score", str(out), "--variant", "int8", "--query", "q",
                           "--doc", "d"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: onnx/int8: onnxruntime failed to load model_quantized.onnx: [ONNXRuntimeError] : 10 : "
                               "INVALID_GRAPH"), lines
    assert lines[0].endswith("(re-export it with qconv export-onnx; QCONV_DEBUG=1 shows the traceback)")
