"""The calibration pass's memory savings (issue #19: the 8B-wide export's peak) change no number.

Each saving drops or narrows something the search holds; these tests hold the scales it finds to the
ones the pass finds without it, and check the saving is really made.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from qwen_convert.fixtures import OutlierSpec, inject_outliers
from qwen_convert.onnx import calibration
from qwen_convert.onnx.smoothing import simulation


def tiny() -> Path:
    return Path(str(resources.files("qwen_convert").joinpath("data/tiny-reranker")))


@pytest.fixture(scope="module")
def outlier(tmp_path_factory) -> Path:
    return inject_outliers(tiny(), tmp_path_factory.mktemp("memory") / "outlier", OutlierSpec(scale=40.0, channels=4, seed=11))


@pytest.fixture(scope="module")
def cset(tmp_path_factory):
    small = tmp_path_factory.mktemp("memory") / "calibration.jsonl"  # 3 queries: each pass a few seconds
    small.write_text("".join((tiny() / "calibration.jsonl").read_text().splitlines(keepends=True)[:27]))
    return calibration.load_calibration_set(small)


SIMS = {"smoothquant": simulation("smoothquant"), "awq": simulation("awq", 32, False, 4)}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key].scale, b[key].scale), key
        assert (a[key].family, a[key].alpha, a[key].error, a[key].error_naive) == \
               (b[key].family, b[key].alpha, b[key].error, b[key].error_naive), key


def test_attention_is_freed_before_the_mlp_search(outlier, cset, monkeypatch):
    """Every method's attention groups first, then the attention's weights go (meta: no storage),
    then the MLP groups; and each method finds what it finds when searched alone."""
    events = []
    search, release = calibration.search_group, calibration._release_attention

    def searched(method, forward, weights, *args):
        events.append((method, len(weights)))
        return search(method, forward, weights, *args)

    def released(layer, *args):
        release(layer, *args)
        assert all(p.is_meta for p in layer.self_attn.parameters())
        events.append("released")

    monkeypatch.setattr(calibration, "search_group", searched)
    monkeypatch.setattr(calibration, "_release_attention", released)
    both = calibration.calibrate(outlier, cset, SIMS)
    per_layer = [("smoothquant", 3), ("awq", 3), "released", ("smoothquant", 1), ("smoothquant", 2), ("awq", 1), ("awq", 2)]
    assert events == per_layer * 3
    for method, sim in SIMS.items():
        _same(both.scales[method], calibration.calibrate(outlier, cset, {method: sim}).scales[method])


@pytest.fixture(scope="module")
def bf16_twins(tmp_path_factory) -> tuple[Path, Path]:
    """A bf16 random reranker and its exact fp32 copy (the same values, stored widened)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwen_convert.fixtures import TinySpec, build_tiny_reranker

    root = tmp_path_factory.mktemp("twins")
    bf16 = build_tiny_reranker(root / "bf16", TinySpec(tied=False, dtype="bfloat16", seed=3))
    fp32 = root / "fp32"
    shutil.copytree(bf16, fp32)
    for f in fp32.glob("*.safetensors"):
        save_file({k: t.float() for k, t in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    return bf16, fp32


def test_bf16_weights_are_searched_as_stored_with_the_fp32_results(bf16_twins, cset, monkeypatch):
    """The pass holds a bf16 checkpoint's matrices as bf16 (the search reads widened samples and row
    chunks of them) and finds exactly what it finds on the same values stored as fp32."""
    import torch

    dtypes = []
    release = calibration._release_attention

    def released(layer, *args):
        dtypes.append(layer.mlp.gate_proj.weight.dtype)
        release(layer, *args)

    monkeypatch.setattr(calibration, "_release_attention", released)
    bf16 = calibration.calibrate(bf16_twins[0], cset, SIMS)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    fp32 = calibration.calibrate(bf16_twins[1], cset, SIMS)
    assert set(dtypes[len(dtypes) // 2:]) == {torch.float32}
    assert np.array_equal(bf16.logits, fp32.logits)
    assert bf16.absmax.keys() == fp32.absmax.keys() and all(np.array_equal(bf16.absmax[k], fp32.absmax[k]) for k in bf16.absmax)
    for method in SIMS:
        _same(bf16.scales[method], fp32.scales[method])
    embedding = calibration.choose_embedding_precision(bf16_twins[0], cset, bf16, SIMS["awq"], 32, True)
    assert embedding == calibration.choose_embedding_precision(bf16_twins[1], cset, fp32, SIMS["awq"], 32, True)


@pytest.mark.parametrize("model", ["outlier", "bf16"])
def test_variant_forward_from_4bit_codes_is_the_fp32_one(model, outlier, bf16_twins, cset):
    """mixed.quantized_layers(compact=True) keeps each rounded weight as its 4-bit codes (a byte a
    weight, widened as the linear runs): the simulated variant's logits are those of the weights
    rounded in place in fp32, bit for bit, row factors (mlp_out's fold on up_proj) included."""
    from qwen_convert.onnx.mixed import quantized_layers
    from qwen_convert.progress import NULL

    path = outlier if model == "outlier" else bf16_twins[0]
    cal = calibration.calibrate(path, cset, {"awq": SIMS["awq"]})
    plan = cal.plan("awq")
    if model == "outlier":
        assert any(k.endswith("up_proj.weight") for k in plan.rows)
    run = calibration._prepare(path, cset)
    held = []
    compact = quantized_layers(plan, SIMS["awq"], compact=True)

    def observe(index, layer):
        compact(index, layer)
        held.append(all(layer.get_submodule(n).weight.is_meta for n in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")))

    codes = run.forward(NULL, "codes", observer=observe, stored=True)
    plain = run.forward(NULL, "fp32", observer=quantized_layers(plan, SIMS["awq"]))
    assert held == [True] * len(held) and held
    assert np.array_equal(codes, plain)
    assert not np.array_equal(plain, cal.logits)  # the simulation rounds something


def test_layers_left_in_the_file_calibrate_as_held(bf16_twins, cset, monkeypatch):
    """With no layer held (HOLD_BYTES 0: every matrix read from the checkpoint as its linear runs, and
    by the row chunk or sample in the search), the pass finds exactly what it finds holding them:
    the same logits, statistics and scales, the same embedding choice, and the same simulated 4-bit
    variant from codes (whose rows it also reads from the file)."""
    from qwen_convert.onnx.mixed import quantized_layers
    from qwen_convert.progress import NULL
    from qwen_convert.scoring.streamed import weights

    held = calibration.calibrate(bf16_twins[0], cset, SIMS)
    run = calibration._prepare(bf16_twins[0], cset)
    held_variant = run.forward(NULL, "held", observer=quantized_layers(held.plan("awq"), SIMS["awq"], compact=True), stored=True)
    held_embedding = calibration.choose_embedding_precision(bf16_twins[0], cset, held, SIMS["awq"], 32, True)

    monkeypatch.setattr(weights, "HOLD_BYTES", 0)
    meta = []
    release = calibration._release_attention

    def released(layer, *args):
        meta.append(all(layer.get_submodule(n).weight.is_meta for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")))
        release(layer, *args)

    monkeypatch.setattr(calibration, "_release_attention", released)
    in_file = calibration.calibrate(bf16_twins[0], cset, SIMS)
    assert meta and all(meta)
    assert np.array_equal(in_file.logits, held.logits)
    assert all(np.array_equal(in_file.absmax[k], held.absmax[k]) for k in held.absmax)
    for method in SIMS:
        _same(in_file.scales[method], held.scales[method])
    from qwen_convert.onnx import mixed

    spilled = []
    rows = mixed._FileCodes.rows
    monkeypatch.setattr(mixed._FileCodes, "rows", lambda self, a, b: spilled.append((a, b)) or rows(self, a, b))
    variant = run.forward(NULL, "file", observer=quantized_layers(in_file.plan("awq"), SIMS["awq"], compact=True), stored=True)
    assert spilled  # the codes of a layer left in the file wait in a temporary file too
    assert np.array_equal(variant, held_variant) and not np.array_equal(variant, held.logits)
    assert calibration.choose_embedding_precision(bf16_twins[0], cset, in_file, SIMS["awq"], 32, True) == held_embedding
    int8 = quantized_layers(in_file.plan("smoothquant"), SIMS["smoothquant"])  # no codes: rounded in fp32 from the file
    from_file = run.forward(NULL, "int8 file", observer=int8, stored=True)
    monkeypatch.setattr(weights, "HOLD_BYTES", 1 << 40)
    assert np.array_equal(from_file, run.forward(NULL, "int8 held", observer=int8, stored=True))


def _record_rounded_rows(monkeypatch) -> tuple[list, list]:
    """Every RoundedRows chunk made ((start, stop, weight shape)) and every whole copy asked for."""
    from qwen_convert.onnx import smoothing

    calls, wholes = [], []
    fill, whole = smoothing.RoundedRows.__call__, smoothing.RoundedRows.whole
    monkeypatch.setattr(smoothing.RoundedRows, "__call__", lambda self, a, b, out: calls.append((a, b, tuple(self.w.shape))) or fill(self, a, b, out))
    monkeypatch.setattr(smoothing.RoundedRows, "whole", lambda self: wholes.append(self) or whole(self))
    return calls, wholes


def _same_choices(one, chunked) -> None:
    """The same scales, families and alphas in every group; errors within float noise."""
    for method in SIMS:
        a, b = one.scales[method], chunked.scales[method]
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key].scale, b[key].scale) and (a[key].family, a[key].alpha) == (b[key].family, b[key].alpha), key
            assert a[key].error == pytest.approx(b[key].error, rel=1e-4, abs=1e-9), key


def test_attention_search_rounds_qkv_a_chunk_of_rows_at_a_time(outlier, cset, monkeypatch):
    """A 4-bit candidate of q/k/v (a row-wise rule) reaches the attention as rows the linear asks for
    (smoothing.RoundedRows through layer.Widening), never as a whole fp32 copy; in several row chunks
    it finds the scales it finds in one (the int8 rule, per tensor, still rounds whole weights)."""
    from qwen_convert.scoring.streamed import layer

    one = calibration.calibrate(outlier, cset, SIMS)
    calls, wholes = _record_rounded_rows(monkeypatch)
    monkeypatch.setattr(layer, "ROW_CHUNK_BYTES", 16 * 64 * 4)  # 16 rows of 64 inputs: q/k/v in several chunks
    chunked = calibration.calibrate(outlier, cset, SIMS)
    assert calls and not wholes
    assert any(b - a < n[0] for a, b, n in calls)  # rows in chunks, not whole
    _same_choices(one, chunked)


def test_mlp_search_rounds_its_row_samples_a_chunk_at_a_time(outlier, cset, monkeypatch):
    """The MLP groups' 4-bit candidates (gate/up, down_proj: row samples) reach their products as
    rounded row chunks (smoothing._product over RoundedRows), never whole copies; in several chunks
    the search finds the scales it finds in one."""
    from qwen_convert.onnx import smoothing

    one = calibration.calibrate(outlier, cset, SIMS)
    calls, wholes = _record_rounded_rows(monkeypatch)
    monkeypatch.setattr(smoothing, "CHUNK_BYTES", 24 * 384 * 4)  # 24 rows of down_proj (384 wide), 72 of gate/up
    chunked = calibration.calibrate(outlier, cset, SIMS)
    assert not wholes
    shapes = {shape for _, _, shape in calls}
    assert (128, 384) in shapes and (384, 128) in shapes  # down_proj's and gate/up's samples were rounded by the chunk
    assert any(b - a == 24 and n == (128, 384) for a, b, n in calls)
    assert any(b - a == 72 and n == (384, 128) for a, b, n in calls)
    _same_choices(one, chunked)
