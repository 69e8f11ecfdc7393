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


def _batch(export: Path):
    enc = PromptEncoder(load_tokenizer(export), max_length=256)
    docs = ["cats are obligate carnivores", "the stock market closed higher today", "fish " * 20, "kittens need protein"]
    return pad_rows([enc.ids(Pair("what does a cat eat", d)) for d in docs], enc.tokens.pad_id, "left")


def _run(session, batch) -> np.ndarray:
    (logits,) = session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    return logits


def test_int8_weights_stay_out_of_the_serialized_graph_and_score_as_if_inline(q4_export):
    """The graph handed to onnxruntime names its int8 weights as external data and gets them as
    OrtValues (no 2 GiB protobuf cap); it scores to the bit like the same graph serialized whole,
    as expand_q4 did before, and the OrtValues need not outlive the session (onnxruntime copies)."""
    import gc

    import onnxruntime as ort

    from qwen_convert.scoring.kernels import IN_MEMORY, open_expanded

    expansion = expand_q4(q4_export / "onnx" / "model_q4.onnx", memory=1 << 40)
    int8 = {k: v for k, v in expansion.weights.items() if k.endswith(".int8")}
    assert len(int8) == expansion.expanded and sum(v.nbytes for v in int8.values()) == expansion.int8_bytes
    graph = onnx.load_from_string(expansion.model)
    stubs = {t.name: t for t in graph.graph.initializer if t.name in expansion.weights}
    assert stubs.keys() == expansion.weights.keys()
    assert all(not t.raw_data and t.external_data[0].value == IN_MEMORY for t in stubs.values())
    weight_bytes = sum(v.nbytes for v in expansion.weights.values())

    for t in graph.graph.initializer:  # the old path: the same graph with its weights serialized inline
        if t.name in expansion.weights:
            t.CopyFrom(numpy_helper.from_array(expansion.weights[t.name], t.name))
    serialized = graph.SerializeToString()
    # The bytes handed over lack every weight (what stays is mostly the tiny's 4-bit embedding); a
    # stub costs ~64 bytes (name, dims, external-data entries) where its tensor stood.
    saved = len(serialized) - len(expansion.model)
    assert weight_bytes > 70_000 and weight_bytes - 100 * len(stubs) <= saved <= weight_bytes
    whole = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    session = open_expanded(expansion, ort.SessionOptions(), ["CPUExecutionProvider"])
    del expansion, int8
    gc.collect()
    filler = [np.full(1 << 16, 7, np.uint8) for _ in range(64)]  # would land in freed weight buffers
    batch = _batch(q4_export)
    got, ref = _run(session, batch), _run(whole, batch)
    assert filler and np.array_equal(got, ref) and np.isfinite(got).all()
    (scorer,) = load_onnx_scorers(q4_export, ["q4"])
    assert np.array_equal(scorer.score(batch), np.asarray(ref, dtype=np.float64)[:, 0])


def test_external_data_of_the_file_is_read_from_its_folder(q4_export, tmp_path):
    """A q4 graph with its weights in a _data file (the layout of 4B and 8B exports) expands from
    the file without loading it into the graph, and scores like the same graph stored inline."""
    import onnxruntime as ort

    from qwen_convert.scoring.kernels import open_expanded

    src = q4_export / "onnx" / "model_q4.onnx"
    external = tmp_path / "model_q4.onnx"
    onnx.save_model(onnx.load(str(src)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model_q4.onnx_data", size_threshold=1024)
    assert (tmp_path / "model_q4.onnx_data").stat().st_size > external.stat().st_size
    record = "model_q4.activations.safetensors"  # the calibrated export's record goes along
    (tmp_path / record).write_bytes((src.parent / record).read_bytes())
    inline, split = expand_q4(src, memory=1 << 40), expand_q4(external, memory=1 << 40)
    assert split.expanded == inline.expanded > 0 and split.int8_bytes == inline.int8_bytes
    assert split.smoothed == inline.smoothed > 0
    # Tensors already in the _data file stay there: the int8 weights are all that is handed over.
    assert all(name.endswith(".int8") for name in split.weights) and len(split.model) < 64 << 10
    batch = _batch(q4_export)
    a = _run(open_expanded(inline, ort.SessionOptions(), ["CPUExecutionProvider"]), batch)
    b = _run(open_expanded(split, ort.SessionOptions(), ["CPUExecutionProvider"]), batch)
    assert np.array_equal(a, b)


def test_the_with_past_graph_shares_its_variants_activation_record(tmp_path):
    from qwen_convert.scoring.kernels import activations_file

    (tmp_path / "onnx" / "prefix").mkdir(parents=True)
    record = tmp_path / "onnx" / "model_q4.activations.safetensors"
    assert activations_file(tmp_path / "onnx" / "prefix" / "model_q4.onnx") is None
    record.write_bytes(b"")
    assert activations_file(tmp_path / "onnx" / "prefix" / "model_q4.onnx") == record
    assert activations_file(tmp_path / "onnx" / "model_q4.onnx") == record
    assert activations_file(tmp_path / "onnx" / "prefix" / "model_q4f16.onnx") is None


def test_an_unreadable_activation_record_is_one_error_not_other_weights(q4_export, tmp_path):
    import shutil

    from qwen_convert.errors import QconvError

    copy = tmp_path / "export"
    shutil.copytree(q4_export, copy)
    record = copy / "onnx" / "model_q4.activations.safetensors"
    assert record.is_file()  # the fixture's export is calibrated (the default method)
    record.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (scorer,) = load_onnx_scorers(copy, ["q4"])
    with pytest.raises(QconvError) as err:
        scorer.score(_batch(copy))
    message = str(err.value)
    assert "model_q4.activations.safetensors is not a readable qconv activation record" in message
    assert "onnxruntime failed to load model_q4.onnx" in message and "\n" not in message
