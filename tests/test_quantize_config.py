"""quantize_config.json of the graph builder (precision.precision_settings): it keeps every key of
quantize_settings (readers of the file know those), and its `encoders` description is held against
the graphs the builder actually wrote: ops, attributes, initializer dtypes and shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from qwen_convert.formats import QuantMode
from qwen_convert.onnx.export import ExportOptions, export_onnx
from qwen_convert.onnx.precision import describe_kept, precision_settings
from qwen_convert.onnx.quantize import QuantizeOptions, quantize_settings

MODES = ("fp16", "int8", "q4", "q4f16")


def _graph(out: Path, mode: str) -> onnx.ModelProto:
    return onnx.load(str(out / "onnx" / QuantMode(mode).file_name), load_external_data=False)


def _ops(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    ops: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        ops.setdefault(n.op_type, []).append(n)
    return ops


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


@pytest.fixture(scope="module", params=["defaults", "per_channel_keep_embedding_b64"])
def export(request, tiny_models, tmp_path_factory):
    kw = {} if request.param == "defaults" else {"per_channel": True, "quantize_embedding": False, "block_size": 64}
    out = tmp_path_factory.mktemp("qcfg") / request.param
    # --no-fp32, as the 4B/8B recipes export: the config must describe exactly the variants written.
    export_onnx(tiny_models["untied_fp32"], out, ExportOptions(modes=MODES, fp32=False, verify=False, **kw))
    options = QuantizeOptions(**kw)
    return out, options, json.loads((out / "quantize_config.json").read_text())


def test_keeps_every_key_of_quantize_settings(export):
    out, options, settings = export
    assert settings["exporter"] == "builder" and list(settings["files"]) == list(MODES)
    assert not (out / "onnx" / "model.onnx").exists()
    old = quantize_settings(options)
    for key, value in old.items():
        assert key in settings, key
        if isinstance(value, dict):
            assert set(value) <= set(settings[key]), key
    # What the fields mean is unchanged, and follows the options.
    assert settings["q4"]["block_size"] == options.block_size and settings["q4"]["bits"] == 4
    assert settings["q4"]["quantize_embedding"] is options.quantize_embedding
    assert settings["int8"]["per_channel"] is options.per_channel and settings["int8"]["weight_type"] == "QInt8"
    assert settings["fp16"]["keep_io_types"] is True and "RMSNorm" in settings["fp16"]["node_block_list"]
    assert settings["external_data_threshold"] == options.external_data_threshold
    # The builder's file names what made it, not onnxruntime's whole-graph quantizers.
    assert all("qconv graph builder" in settings[m]["method"] for m in ("fp16", "int8", "q4"))
    assert settings["shape"]["attention"] == "com.microsoft GroupQueryAttention" and not settings["shape"]["notes"]
    # How the weights were prepared before encoding (calibration, tests/test_calibration.py) is its own key.
    assert settings["quantization"]["method"] == "calibrated"
    written = {k: v for k, v in settings.items() if k not in ("qconv_version", "exporter", "opset", "files", "shape", "quantization", "prefix")}
    kept = settings["quantization"].get("mixed_precision", {}).get("kept", {})
    # what export wrote is this function (with what calibration kept at higher precision written in)
    assert written == json.loads(json.dumps(describe_kept(precision_settings(options), kept)))


def test_int8_description_matches_the_graph(export):
    out, options, settings = export
    desc = settings["encoders"]["int8"]
    model = _graph(out, "int8")
    ops, inits = _ops(model), _inits(model)
    assert desc["op"] == "com.microsoft DynamicQuantizeMatMul" and desc["per_channel"] is options.per_channel
    dqm = ops["DynamicQuantizeMatMul"]
    assert {n.domain for n in dqm} == {"com.microsoft"}
    # One product per weight (q/k/v, gate/up unfused): 7 a layer; no float MatMul but the head.
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert len(dqm) == 7 * layers and desc["fused"] == []
    assert [n.name for n in ops["MatMul"] if inits.get(n.input[1]) is not None] == ["score"]
    for n in dqm:
        weight, scale, zero = (inits[i] for i in n.input[1:4])
        assert weight.data_type == TensorProto.INT8 and zero.data_type == TensorProto.INT8
        assert scale.data_type == TensorProto.FLOAT
        if options.per_channel:
            assert list(scale.dims) == [weight.dims[1]]  # one scale per output column
        else:
            assert int(np.prod(scale.dims)) == 1  # a single weight: one per-tensor scale
        if "symmetric" in desc["weights"]:
            assert not onnx.numpy_helper.to_array(zero).any()
    # The embedding: int8 rows and one float32 scale per row.
    table = next(t for name, t in inits.items() if name.endswith("embed_tokens.weight_quantized"))
    row_scale = next(t for name, t in inits.items() if name.endswith("embed_tokens.weight_scale"))
    assert table.data_type == TensorProto.INT8 and list(row_scale.dims) == [table.dims[0], 1]
    assert "per row" in desc["embedding"]


@pytest.mark.parametrize("mode, scale_type", [("q4", TensorProto.FLOAT), ("q4f16", TensorProto.FLOAT16)])
def test_q4_description_matches_the_graph(export, mode, scale_type):
    out, options, settings = export
    desc = settings["encoders"][mode]
    model = _graph(out, mode)
    ops, inits = _ops(model), _inits(model)
    assert desc["op"] == "com.microsoft MatMulNBits"
    for n in ops["MatMulNBits"]:
        a = _attrs(n)
        assert (a["bits"], a["block_size"]) == (desc["bits"], desc["block_size"]) == (4, options.block_size)
        assert a.get("accuracy_level", 0) == desc["accuracy_level"]
        assert len(n.input) == (3 if desc["symmetric"] else 4)  # no zero points when symmetric
        assert inits[n.input[2]].data_type == scale_type
    assert desc["scales"] == {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}[scale_type]
    gbq = ops.get("GatherBlockQuantized", [])
    kept = settings["quantization"].get("mixed_precision", {}).get("kept", {})
    if mode in kept:  # calibration kept 8-bit rows: their 4-bit table alone moved P(yes) past its budget
        assert not gbq and "int8 rows" in desc["embedding"] and "mixed_precision" in desc["embedding"]
        assert next(t for name, t in inits.items() if name.endswith("embed_tokens.weight_quantized")).data_type == TensorProto.INT8
    elif options.quantize_embedding:
        assert len(gbq) == 1 and _attrs(gbq[0])["block_size"] == options.block_size
        assert desc["embedding"].startswith("com.microsoft GatherBlockQuantized") and f"blocks of {options.block_size}" in desc["embedding"]
    else:
        assert not gbq and desc["embedding"].startswith("Gather (") and "kept" in desc["embedding"]
        table = next(t for name, t in inits.items() if name.endswith("embed_tokens.weight"))
        assert table.data_type == {TensorProto.FLOAT: TensorProto.FLOAT, TensorProto.FLOAT16: TensorProto.FLOAT16}[scale_type]


@pytest.mark.parametrize("mode", ["fp16", "q4f16"])
def test_fp16_numerics_match_the_graph(export, mode):
    out, _options, settings = export
    desc = settings["encoders"][mode]
    model = _graph(out, mode)
    ops, inits = _ops(model), _inits(model)
    # fp32 inputs/outputs: int64 ids and mask, float32 logits.
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.INT64, TensorProto.INT64]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    assert "int64" in desc["inputs_outputs"] and "logits float32" in desc["inputs_outputs"]
    # RMSNorm statistics in fp32; softmax inside GroupQueryAttention (no Softmax op in fp16).
    assert all(_attrs(n)["stash_type"] == 1 for n in ops["SimplifiedLayerNormalization"])
    assert ops["SkipSimplifiedLayerNormalization"] and "Softmax" not in ops and ops["GroupQueryAttention"]
    assert "fp32" in desc["rmsnorm"] and desc["softmax"].startswith("fp32")
    if mode == "fp16":
        assert desc["weights"] == "float16"
        assert all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in ops["MatMul"] if n.name != "score")


def test_final_norm_and_head_are_fp32_in_every_variant(export):
    out, _options, settings = export
    assert "fp32" in settings["encoders"]["all"]["head"] and "fp32" in settings["score_head"]
    for mode in MODES:
        model = _graph(out, mode)
        inits = _inits(model)
        assert inits["score.weight"].data_type == TensorProto.FLOAT and list(inits["score.weight"].dims)[1] == 1
        assert inits["model.norm.weight"].data_type == TensorProto.FLOAT
        # The head consumes [batch, hidden]: the last real token only.
        head = next(n for n in model.graph.node if n.name == "score")
        assert head.output[0] == "logits"


def test_settings_follow_the_options_without_an_export():
    a = precision_settings(QuantizeOptions())
    b = precision_settings(QuantizeOptions(per_channel=True, quantize_embedding=False, block_size=128, symmetric=False))
    assert a["encoders"]["int8"]["scales"].startswith("per-tensor") and b["encoders"]["int8"]["scales"].startswith("per-channel")
    assert a["encoders"]["q4"]["embedding"].startswith("com.microsoft GatherBlockQuantized (int4,")
    assert b["encoders"]["q4"]["embedding"] == "Gather (float32, kept: --keep-embedding)"
    assert b["encoders"]["q4f16"]["embedding"] == "Gather (float16, kept: --keep-embedding)"
    assert b["encoders"]["q4"]["block_size"] == 128 and b["encoders"]["q4"]["symmetric"] is False
    assert set(quantize_settings(QuantizeOptions())) < set(a) and "encoders" in a
    assert np.isfinite(a["external_data_threshold"])
