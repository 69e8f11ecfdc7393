"""4-bit graphs on the CPU run int8 kernels (scoring/kernels.py): held against onnxruntime's own
MatMulNBits (the dequantized weights it multiplies with) and against the 4-bit file's scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_convert.onnx.export import ExportOptions, export_onnx
from qwen_convert.onnx.precision import quantize_q4_matmul
from qwen_convert.reranker import Pair, PromptEncoder, load_tokenizer, pad_rows
from qwen_convert.scoring.kernels import dequantize_nbits, expand_q4, quantize_columns
from qwen_convert.scoring.onnx_scorers import load_onnx_scorers


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantized_blocks_are_what_matmulnbits_multiplies_with(symmetric):
    """MatMulNBits(I) = W^T exactly: onnxruntime's kernel is the reference for the unpacking rule
    (nibble order, zero points, a ragged last block of K = 80 over blocks of 32)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    n, k, block = 24, 80, 32
    w = rng.normal(size=(n, k)).astype(np.float32)
    packed, scales, zp = quantize_q4_matmul(w, block, symmetric)
    inputs = ["a", "b", "s"] + ([] if zp is None else ["z"])
    inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.reshape(-1), "s")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp.reshape(-1), "z"))
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = session.run(["y"], {"a": np.eye(k, dtype=np.float32)})
    got = dequantize_nbits(packed, scales, zp, k)
    assert np.abs(got.T - ref).max() <= 1e-6 * np.abs(ref).max()
    # Requantized per column: within half an int8 step of each column's range.
    q, scale = quantize_columns(got, seven_bit=False)
    assert q.shape == (k, n) and np.all(np.abs(q.T * scale[:, None] - got) <= scale[:, None] / 2 + 1e-7)


@pytest.fixture(scope="module")
def q4_export(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kernels") / "onnx"
    export_onnx(tiny_models["tied_fp32"], out, ExportOptions(modes=("q4",), verify=False, prefix_graphs=False))
    return out


def test_q4_on_cpu_runs_int8_kernels_and_scores_like_the_4bit_file(q4_export):
    import onnxruntime as ort

    file = q4_export / "onnx" / "model_q4.onnx"
    expansion = expand_q4(file, memory=1 << 40)
    graph = onnx.load_from_string(expansion.model)
    ops = {n.op_type for n in graph.graph.node}
    assert expansion.expanded > 0 and "MatMulNBits" not in ops and "DynamicQuantizeMatMul" in ops
    assert file.read_bytes() == file.read_bytes() and "MatMulNBits" in {n.op_type for n in onnx.load(str(file)).graph.node}

    (scorer,) = load_onnx_scorers(q4_export, ["q4"])
    (plain,) = load_onnx_scorers(q4_export, ["q4"], expand_q4=False)
    enc = PromptEncoder(load_tokenizer(q4_export), max_length=256)
    docs = ["cats are obligate carnivores", "the stock market closed higher today", "fish " * 20, "kittens need protein"]
    batch = pad_rows([enc.ids(Pair("what does a cat eat", d)) for d in docs], enc.tokens.pad_id, "left")
    got, ref = scorer.score(batch), plain.score(batch)
    assert "expanded at load" in scorer.kernels and plain.kernels == ""
    # What runs is int8 (not the file's 4-bit kernel), and it stays within verify's q4 gate of it.
    assert 0 < np.abs(got - ref).max() and np.abs(1 / (1 + np.exp(-got)) - 1 / (1 + np.exp(-ref))).max() <= 0.05
    fp32 = ort.InferenceSession(str(q4_export / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (full,) = fp32.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    p = lambda x: 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))  # noqa: E731
    # A random tiny model is hard on 4 bits: the int8 requantization adds little to the file's own error.
    assert np.abs(p(got) - p(full[:, 0])).max() <= np.abs(p(ref) - p(full[:, 0])).max() + 0.02


def test_no_expansion_when_memory_is_short(q4_export):
    result = expand_q4(q4_export / "onnx" / "model_q4.onnx", memory=1024)
    assert result.model is None and "available" in result.reason
