"""qwen_convert/checkpoint/onnx_header.py against onnx's own parser: opsets and external data files, for
inline graphs, external-data graphs and the builder's streamed inline layout (repeated graph
records), and one-line errors for files that are not ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_convert.checkpoint.onnx_header import read_header
from qwen_convert.errors import SourceError
from qwen_convert.onnx.quantize import external_locations
from qwen_convert.onnx.weights import GraphWriter


def small_model(n_weights: int = 3):
    inits = [numpy_helper.from_array(np.full((64, 64), i, np.float32), f"w{i}") for i in range(n_weights)]
    nodes, x = [], "x"
    for i in range(n_weights):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def onnx_says(path):
    model = onnx.load(str(path), load_external_data=False)
    return {o.domain: o.version for o in model.opset_import}, frozenset(external_locations(model))


def test_inline_graph(tmp_path):
    onnx.save(small_model(), tmp_path / "m.onnx")
    header = read_header(tmp_path / "m.onnx")
    assert (header.opsets, header.external_locations) == onnx_says(tmp_path / "m.onnx")
    assert header.opset == 17 and header.external_locations == frozenset()


def test_external_data_graph(tmp_path):
    onnx.save(small_model(), tmp_path / "m.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    header = read_header(tmp_path / "m.onnx")
    assert (header.opsets, header.external_locations) == onnx_says(tmp_path / "m.onnx")
    assert header.external_locations == frozenset({"weights.bin"})


@pytest.mark.parametrize("threshold", [0, 1 << 30])  # external data file / inline records streamed back in
def test_graph_writer_layouts(tmp_path, threshold):
    path = tmp_path / "b.onnx"
    with GraphWriter(path, threshold=threshold) as g:
        x = g.input("x", np.float32, ["b", 512])
        y = g.node("MatMul", [x, g.initializer("w", np.ones((512, 512), np.float32))], name="mm")[0]
        y = g.node("MatMul", [y, g.initializer("w2", np.ones((512, 512), np.float32))], name="mm2")[0]
        g.output(y, np.float32, ["b", 512])
        g.save()
    header = read_header(path)
    assert (header.opsets, header.external_locations) == onnx_says(path)
    assert header.external_locations == (frozenset({"b.onnx_data"}) if threshold == 0 else frozenset())


def test_not_onnx_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 40)
    with pytest.raises(SourceError, match="is not a readable ONNX file"):
        read_header(bad)
    good = tmp_path / "m.onnx"
    onnx.save(small_model(), good)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[:-100])  # truncated mid-weight
    with pytest.raises(SourceError, match="is not a readable ONNX file"):
        read_header(cut)
    with pytest.raises(SourceError, match="cannot read"):
        read_header(tmp_path / "missing.onnx")
