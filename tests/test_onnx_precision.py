"""The per-tensor encoders of qwen_convert/onnx/precision.py, one op at a time.

Each encoder is held to two independent references: onnxruntime's own whole-graph quantizers
(quantize_dynamic, MatMulNBitsQuantizer, the float16 converter) must write the same bytes for the
same weight, and onnxruntime must compute, from the written graph, what numpy computes from the
dequantized weight (tight) and close to the float32 product (loose: the quantization error).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_convert.errors import ExportError
from qwen_convert.formats import QuantMode
from qwen_convert.onnx.precision import (
    PRECISIONS,
    LinearWeight,
    pack_nibbles,
    quantize_int8,
    quantize_int8_rows,
    quantize_q4_matmul,
    quantize_q4_rows,
)
from qwen_convert.onnx.quantize import QuantizeOptions
from qwen_convert.onnx.weights import GraphWriter

ort = pytest.importorskip("onnxruntime")

FLOAT_OF = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
RNG = np.random.default_rng(0)
OUT, IN, VOCAB, HIDDEN = 48, 128, 37, 64


def weight(out: int = OUT, inp: int = IN, seed: int = 0) -> np.ndarray:
    """An [out, in] weight with the spread of a trained layer: a few large entries per row."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (out, inp)).astype(np.float32)
    w[rng.integers(0, out, 5), rng.integers(0, inp, 5)] *= 8
    return w


def run(model, **feeds) -> np.ndarray:
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def linear_graph(mode: QuantMode, w: np.ndarray, options: QuantizeOptions):
    p = PRECISIONS[mode]
    g = GraphWriter()
    x = g.input("x", p.activation, ["batch", "seq", w.shape[1]])
    y = p.linear(g, "layer.proj", x, [LinearWeight.of("layer.proj", w)], options)
    g.output(y, p.activation, ["batch", "seq", w.shape[0]])
    return g.model()


def embedding_graph(mode: QuantMode, table: np.ndarray, options: QuantizeOptions, rows_per_chunk: int = 5):
    p = PRECISIONS[mode]
    g = GraphWriter()
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    chunks = lambda: (table[i:i + rows_per_chunk] for i in range(0, len(table), rows_per_chunk))  # noqa: E731
    y = p.embedding(g, "embed_tokens", ids, chunks, table.shape, options)
    g.output(y, p.activation, ["batch", "seq", table.shape[1]])
    return g.model()


def inits(model) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def one_op(op: str, w_name: str, w: np.ndarray, out_dim: int):
    """A float32 graph of one MatMul (B = w, [K, N]) or one Gather (table = w), as the traced export has."""
    if op == "MatMul":
        node = helper.make_node("MatMul", ["x", w_name], ["y"], name="mm")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w.shape[0]])
    else:
        node = helper.make_node("Gather", [w_name, "x"], ["y"], name="gather")
        x = helper.make_tensor_value_info("x", TensorProto.INT64, ["b"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", out_dim])
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, w_name)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


# --- bytes: the same as onnxruntime's whole-graph quantizers ---------------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_bytes_match_quantize_dynamic(tmp_path, per_channel):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = weight()
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(one_op("MatMul", "W", np.ascontiguousarray(w.T), OUT), src)
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=per_channel, reduce_range=per_channel,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    ref = {k: numpy_helper.to_array(v) for k, v in inits(onnx.load(dst)).items()}
    q, scale = quantize_int8(w, per_channel, reduce_range=per_channel)
    assert np.abs(q.astype(np.int16)).max() == (64 if per_channel else 127)
    assert q.dtype == np.int8 and q.shape == (IN, OUT)
    np.testing.assert_array_equal(q, ref["W_quantized"])
    assert scale.tobytes() == ref["W_scale"].astype(np.float32).tobytes()
    assert scale.shape == ((OUT,) if per_channel else ())
    assert not ref["W_zero_point"].any()


def test_int8_embedding_rows_use_the_same_rule_per_row():
    table = weight(VOCAB, HIDDEN, seed=1)
    q, scale = quantize_int8_rows(table)
    for i in (0, 17, VOCAB - 1):
        q_row, s_row = quantize_int8(table[i:i + 1], per_channel=False)
        np.testing.assert_array_equal(q[i], q_row[:, 0])
        assert scale[i, 0] == s_row
    assert np.abs(q).max() == 127  # every row spans the full symmetric range


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("inp, block", [(IN, 32), (IN, 16), (96, 64)])  # 96/64: a ragged, padded last block
def test_q4_matmul_bytes_match_matmul_nbits_quantizer(symmetric, inp, block):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = weight(OUT, inp)
    quantizer = MatMulNBitsQuantizer(one_op("MatMul", "W", np.ascontiguousarray(w.T), OUT), bits=4, block_size=block,
                                     is_symmetric=symmetric, accuracy_level=4, op_types_to_quantize=("MatMul",))
    quantizer.process()
    model = quantizer.model.model
    ref = {k: numpy_helper.to_array(v) for k, v in inits(model).items()}
    packed, scales, zero_points = quantize_q4_matmul(w, block, symmetric)
    assert packed.tobytes() == ref["W_Q4"].tobytes() and packed.shape == ref["W_Q4"].shape
    assert scales.tobytes() == ref["W_scales"].tobytes() and scales.shape == ref["W_scales"].shape
    if symmetric:
        assert zero_points is None and "W_zero_points" not in ref
    else:
        assert zero_points.tobytes() == ref["W_zero_points"].tobytes()
    # ... and the node our encoder writes carries the quantizer's attributes.
    ours = linear_graph(QuantMode.Q4, w, QuantizeOptions(block_size=block, symmetric=symmetric))
    theirs = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: helper.get_attribute_value(a) for a in ours.graph.node[0].attribute} == \
        {a.name: helper.get_attribute_value(a) for a in theirs.attribute}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32])
def test_q4_embedding_bytes_match_matmul_nbits_quantizer(symmetric, block):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    table = weight(VOCAB, HIDDEN, seed=2)
    table[3] = 0  # an all-zero row: scale 0, the quantizer's special case
    quantizer = MatMulNBitsQuantizer(one_op("Gather", "E", table, HIDDEN), bits=4, block_size=block, is_symmetric=symmetric,
                                     op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    quantizer.process()
    ref = inits(quantizer.model.model)
    ours = inits(embedding_graph(QuantMode.Q4, table, QuantizeOptions(block_size=block, symmetric=symmetric), rows_per_chunk=4))
    pairs = [("embed_tokens.weight_Q4", "E_Q4"), ("embed_tokens.weight_scales", "E_scales")]
    if not symmetric:
        pairs.append(("embed_tokens.weight_zero_points", "E_zero_points"))
    for mine, theirs in pairs:
        assert ours[mine].data_type == ref[theirs].data_type, mine
        assert list(ours[mine].dims) == list(ref[theirs].dims), mine
        assert ours[mine].raw_data == ref[theirs].raw_data, mine
    assert len(ours) == len(pairs)


def test_q4f16_scales_are_the_float16_converters_cast_of_q4s():
    w, table = weight(), weight(VOCAB, HIDDEN, seed=3)
    options = QuantizeOptions()
    for graph in (lambda m: linear_graph(m, w, options), lambda m: embedding_graph(m, table, options)):
        q4, q4f16 = inits(graph(QuantMode.Q4)), inits(graph(QuantMode.Q4F16))
        for name, t in q4.items():
            if name.endswith("_scales"):
                assert q4f16[name].data_type == TensorProto.FLOAT16
                np.testing.assert_array_equal(numpy_helper.to_array(q4f16[name]),
                                              numpy_helper.to_array(t).astype(np.float16))
            else:
                assert q4f16[name].raw_data == t.raw_data, name


def test_pack_nibbles_is_onnx_int4_layout():
    values = np.array([[-8, 7, 3], [-1, 0, 5]], dtype=np.int8)
    tensor = numpy_helper.from_array(values.astype(__import__("ml_dtypes").int4))
    assert pack_nibbles(values).tobytes() == tensor.raw_data


# --- numbers: what onnxruntime computes from the written graph -------------------------------------

def dequantized_linear(mode: QuantMode, model) -> np.ndarray:
    """The [in, out] float32 weight the graph's initializers encode, decoded here with numpy
    (q4: symmetric blocks; the asymmetric bytes are held to the quantizer's above)."""
    t = {k: numpy_helper.to_array(v) for k, v in inits(model).items()}
    if mode in (QuantMode.FP32, QuantMode.FP16):
        return t["layer.proj.weight"].astype(np.float32)
    if mode is QuantMode.INT8:
        return t["layer.proj.weight_quantized"].astype(np.float32) * t["layer.proj.weight_scale"]
    packed, scales = t["layer.proj.weight_Q4"], t["layer.proj.weight_scales"].astype(np.float32)
    low, high = (packed & 0xF).astype(np.int8), (packed >> 4).astype(np.int8)
    q = np.stack([low, high], axis=-1).reshape(packed.shape[0], packed.shape[1], -1) - 8  # [N, blocks, block]
    return (q * scales[:, :, None]).reshape(packed.shape[0], -1)[:, :IN].T


def dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear's rounding of the activation, which DynamicQuantizeMatMul does first."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


@pytest.mark.parametrize("mode, options, tight, loose", [
    (QuantMode.FP32, QuantizeOptions(), 1e-6, 1e-6),
    (QuantMode.FP16, QuantizeOptions(), 2e-3, 2e-2),
    (QuantMode.INT8, QuantizeOptions(), 1e-5, 0.05),
    (QuantMode.INT8, QuantizeOptions(per_channel=True), 1e-5, 0.05),
    (QuantMode.Q4, QuantizeOptions(accuracy_level=0), 1e-5, 0.25),  # fp32 compute: exact on the 4-bit weight
    (QuantMode.Q4, QuantizeOptions(), 2e-2, 0.25),  # accuracy_level 4 also rounds x to int8 per block
    (QuantMode.Q4, QuantizeOptions(block_size=64), 2e-2, 0.25),
    (QuantMode.Q4F16, QuantizeOptions(), 2e-2, 0.25),
])
def test_linear_computes_the_encoded_product(mode, options, tight, loose):
    w = weight()
    model = linear_graph(mode, w, options)
    act = PRECISIONS[mode].activation
    x = RNG.normal(0, 1, (2, 5, IN)).astype(act)
    got = run(model, x=x)
    assert got.shape == (2, 5, OUT) and got.dtype == act
    got = got.astype(np.float32)
    xf = x.astype(np.float32)
    encoded = (dynamic_uint8(xf) if mode is QuantMode.INT8 else xf) @ dequantized_linear(mode, model)
    exact = xf @ w.T
    scale = np.abs(exact).max()
    assert np.abs(got - encoded).max() <= tight * scale, np.abs(got - encoded).max() / scale
    assert np.abs(got - exact).max() <= loose * scale, np.abs(got - exact).max() / scale
    assert np.abs(got - exact).max() > 0 or mode is QuantMode.FP32  # a quantized mode that is exact is not quantizing
    if mode is QuantMode.INT8 and options.per_channel:  # 7-bit: no u8s8 pair can saturate on a CPU without VNNI
        q = numpy_helper.to_array(inits(model)["layer.proj.weight_quantized"]).astype(np.int32)
        assert np.abs(q).max() == 64


@pytest.mark.parametrize("mode, options, loose", [
    (QuantMode.FP32, QuantizeOptions(), 0),
    (QuantMode.FP16, QuantizeOptions(), 1e-3),
    (QuantMode.INT8, QuantizeOptions(), 1 / 254),
    (QuantMode.Q4, QuantizeOptions(), 1 / 8),
    (QuantMode.Q4, QuantizeOptions(quantize_embedding=False), 0),
    (QuantMode.Q4F16, QuantizeOptions(), 1 / 8),
    (QuantMode.Q4F16, QuantizeOptions(quantize_embedding=False), 1e-3),
])
def test_embedding_gathers_the_encoded_rows(mode, options, loose):
    table = weight(VOCAB, HIDDEN, seed=4)
    ids = np.array([[0, 5, VOCAB - 1, 5], [12, 1, 2, 36]], dtype=np.int64)
    got = run(embedding_graph(mode, table, options), input_ids=ids)
    assert got.shape == (2, 4, HIDDEN) and got.dtype == PRECISIONS[mode].activation
    got = got.astype(np.float32)
    if mode is QuantMode.INT8:
        q, s = quantize_int8_rows(table)
        np.testing.assert_array_equal(got, (q.astype(np.float32) * s)[ids])
    elif mode in (QuantMode.Q4, QuantMode.Q4F16) and options.quantize_embedding:
        packed, s, _ = quantize_q4_rows(table, options.block_size, True)
        q = np.stack([(packed & 0xF), packed >> 4], axis=-1).reshape(VOCAB, HIDDEN).astype(np.int8)
        q = np.where(q > 7, q - 16, q).reshape(VOCAB, -1, options.block_size)
        s = s.astype(PRECISIONS[mode].activation).astype(np.float32)
        np.testing.assert_allclose(got, (q * s[:, :, None]).reshape(VOCAB, HIDDEN)[ids], rtol=1e-3 if mode is QuantMode.Q4F16 else 0)
    else:
        np.testing.assert_array_equal(got, table.astype(PRECISIONS[mode].activation).astype(np.float32)[ids])
    rows_max = np.abs(table[ids]).max(axis=-1, keepdims=True)
    assert (np.abs(got - table[ids]) <= loose * rows_max * 1.0001 + 1e-7).all()


@pytest.mark.parametrize("mode", list(QuantMode))
def test_embedding_bytes_do_not_depend_on_the_chunking(mode):
    table = weight(VOCAB, HIDDEN, seed=5)
    options = QuantizeOptions(block_size=16, symmetric=mode is not QuantMode.Q4)  # q4: with zero points, an odd count a row
    whole = inits(embedding_graph(mode, table, options, rows_per_chunk=VOCAB))
    for rows in (1, 6):
        chunked = inits(embedding_graph(mode, table, options, rows_per_chunk=rows))
        assert {k: v.raw_data for k, v in chunked.items()} == {k: v.raw_data for k, v in whole.items()}


def test_int8_embedding_is_a_quarter_of_fp32():
    table = weight(VOCAB, HIDDEN, seed=6)
    sizes = {m: sum(len(t.raw_data) for t in inits(embedding_graph(m, table, QuantizeOptions())).values())
             for m in (QuantMode.FP32, QuantMode.INT8)}
    assert sizes[QuantMode.INT8] == VOCAB * HIDDEN + VOCAB * 4  # int8 rows + one float32 scale a row
    assert sizes[QuantMode.FP32] == 4 * VOCAB * HIDDEN


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [QuantMode.Q4, QuantMode.Q4F16])
def test_q4_embedding_block_that_does_not_divide_hidden_falls_back(mode):
    """Blocks of 64 over hidden 48: blocks of 16 (the largest power of two >= 16 dividing it, shapes.py);
    hidden 40: no such block, int8 rows, cast to the variant's activation dtype."""
    ids = np.array([[0, 5, VOCAB - 1], [12, 1, 36]], dtype=np.int64)
    table = weight(VOCAB, 48, seed=6)
    model = embedding_graph(mode, table, QuantizeOptions(block_size=64))
    (node,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert next(a.i for a in node.attribute if a.name == "block_size") == 16
    got = run(model, input_ids=ids).astype(np.float32)
    packed, scale, _ = quantize_q4_rows(table, 16, True)
    q = np.stack([(packed & 0xF), packed >> 4], axis=-1).reshape(VOCAB, 48).astype(np.int8)
    q = np.where(q > 7, q - 16, q).reshape(VOCAB, 3, 16)
    scale = scale.astype(PRECISIONS[mode].activation).astype(np.float32)
    np.testing.assert_allclose(got, (q * scale[:, :, None]).reshape(VOCAB, 48)[ids], rtol=1e-3 if mode is QuantMode.Q4F16 else 0)
    assert np.abs(got - table[ids]).max() <= np.abs(table).max() / 8  # 4 bits of the row's range, not garbage
    table = weight(VOCAB, 40, seed=7)
    model = embedding_graph(mode, table, QuantizeOptions(block_size=64))
    assert not [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    got = run(model, input_ids=ids)
    assert got.dtype == PRECISIONS[mode].activation
    q, scale = quantize_int8_rows(table)
    np.testing.assert_allclose(got.astype(np.float32), (q.astype(np.float32) * scale)[ids], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", list(QuantMode))
def test_a_table_that_disagrees_with_its_shape_is_refused(mode):
    table = weight(VOCAB, HIDDEN)
    p, g = PRECISIONS[mode], GraphWriter()
    with pytest.raises(ExportError, match=f"36 rows, expected {VOCAB}"):
        p.embedding(g, "short", "ids", lambda: iter([table[:20], table[20:36]]), table.shape, QuantizeOptions())
    with pytest.raises(ExportError, match=r"row chunk of shape \(5, 32\)"):
        p.embedding(GraphWriter(), "narrow", "ids", lambda: iter([table[:5, :32]]), table.shape, QuantizeOptions())
    with pytest.raises(ExportError, match="expected a 2-D"):
        LinearWeight.of("w3d", np.zeros((2, 3, 4), np.float32))


# --- fused products and chunked weights -------------------------------------------------------------

def chunked(name: str, w: np.ndarray, rows: int) -> LinearWeight:
    return LinearWeight(name, w.shape, lambda: (w[i:i + rows] for i in range(0, len(w), rows)))


def fused_graph(mode: QuantMode, parts: list[LinearWeight], options: QuantizeOptions, path=None):
    """One product over `parts` (as the builder fuses q/k/v and gate/up), split back into them."""
    p = PRECISIONS[mode]
    g = GraphWriter(path, threshold=0) if path is not None else GraphWriter()
    x = g.input("x", p.activation, ["batch", "seq", parts[0].shape[1]])
    y = p.linear(g, "fused", x, parts, options)
    outs = g.node("Split", [y, g.initializer("sizes", np.array([w.shape[0] for w in parts], np.int64))],
                  n_outputs=len(parts), name="split", axis=-1)
    for o, w in zip(outs, parts):
        g.output(o, p.activation, ["batch", "seq", w.shape[0]])
    if path is None:
        return g.model()
    g.save()
    return onnx.load(str(path))


def run_all(model, **feeds) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("mode, options", [
    (QuantMode.FP32, QuantizeOptions()), (QuantMode.FP16, QuantizeOptions()),
    (QuantMode.INT8, QuantizeOptions()), (QuantMode.INT8, QuantizeOptions(per_channel=True)),
    (QuantMode.Q4, QuantizeOptions()), (QuantMode.Q4F16, QuantizeOptions()),
])
def test_a_fused_product_computes_each_part_as_its_own_product(mode, options):
    """q/k/v fused: every part's columns are what that part's own graph computes (int8 keeps each
    part's per-tensor scale), so fusing changes speed, not scores."""
    parts = [weight(48, IN, seed=10), weight(16, IN, seed=11) * 5, weight(16, IN, seed=12) / 3]  # different ranges
    act = PRECISIONS[mode].activation
    x = RNG.normal(0, 1, (2, 5, IN)).astype(act)
    got = run_all(fused_graph(mode, [LinearWeight.of(f"p{i}", w) for i, w in enumerate(parts)], options), x=x)
    for w, y in zip(parts, got):
        alone = run(linear_graph(mode, w, options), x=x)
        assert y.shape == alone.shape
        np.testing.assert_allclose(y.astype(np.float32), alone.astype(np.float32), rtol=0,
                                   atol=2e-6 * float(np.abs(alone.astype(np.float32)).max()))
    if mode is QuantMode.INT8 and not options.per_channel:
        scale = numpy_helper.to_array(inits(fused_graph(mode, [LinearWeight.of(f"p{i}", w) for i, w in enumerate(parts)], options))["fused.weight_scale"])
        assert scale.shape == (80,) and len(set(scale[:48])) == len(set(scale[48:64])) == len(set(scale[64:])) == 1
        assert len(set(scale)) == 3


@pytest.mark.parametrize("mode", list(QuantMode))
def test_weights_written_chunk_by_chunk_are_the_whole_weights_bytes(tmp_path, mode):
    """The same bytes whether a weight comes whole or in row chunks of any size, in memory or
    streamed to the external data file (B = W.T written transposed, column block by block)."""
    parts = [weight(48, IN, seed=13), weight(16, IN, seed=14)]
    options = QuantizeOptions(block_size=32)
    whole = {k: numpy_helper.to_array(v) for k, v in inits(fused_graph(mode, [LinearWeight.of(f"p{i}", w) for i, w in enumerate(parts)], options)).items()}
    for rows in (1, 7):
        streamed = fused_graph(mode, [chunked(f"p{i}", w, rows) for i, w in enumerate(parts)], options, tmp_path / f"m{rows}.onnx")
        got = {k: numpy_helper.to_array(v) for k, v in inits(streamed).items()}
        assert got.keys() == whole.keys()
        for k in whole:
            assert got[k].dtype == whole[k].dtype and got[k].shape == whole[k].shape and got[k].tobytes() == whole[k].tobytes(), k


def test_a_short_weight_is_refused():
    w = weight()
    short = LinearWeight("short", (OUT + 1, IN), lambda: iter([w]))
    with pytest.raises(ExportError, match=f"{OUT} rows, expected {OUT + 1}"):
        linear_graph_parts(QuantMode.INT8, [short])
    with pytest.raises(ExportError, match="differ in input width"):
        linear_graph_parts(QuantMode.FP32, [LinearWeight.of("a", w), LinearWeight.of("b", w[:, :64])])


def linear_graph_parts(mode, parts):
    p, g = PRECISIONS[mode], GraphWriter()
    return p.linear(g, "x.proj", "x", parts, QuantizeOptions())


@pytest.mark.parametrize("mode", list(QuantMode))
def test_embedding_streamed_to_a_file_is_the_in_memory_tables_bytes(tmp_path, mode):
    """Scales reserved in the data file and filled while the rows stream (GraphWriter.reserve)
    are the bytes the in-memory build keeps."""
    table = weight(300, HIDDEN, seed=7)  # scales of 300 rows pass the inline size, so they go to the file
    options = QuantizeOptions(block_size=16)
    whole = {k: numpy_helper.to_array(v) for k, v in inits(embedding_graph(mode, table, options)).items()}
    p, path = PRECISIONS[mode], tmp_path / "e.onnx"
    g = GraphWriter(path, threshold=0)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    y = p.embedding(g, "embed_tokens", ids, lambda: (table[i:i + 7] for i in range(0, 300, 7)), table.shape, options)
    g.output(y, p.activation, ["batch", "seq", HIDDEN])
    assert g.save()[-1].name == "e.onnx_data"
    got = {k: numpy_helper.to_array(v) for k, v in inits(onnx.load(str(path))).items()}
    assert got.keys() == whole.keys()
    for k in whole:
        assert got[k].shape == whole[k].shape and got[k].tobytes() == whole[k].tobytes(), k
    ids_in = np.array([[0, 299, 5]], np.int64)
    np.testing.assert_array_equal(run(onnx.load(str(path)), input_ids=ids_in), run(embedding_graph(mode, table, options), input_ids=ids_in))
