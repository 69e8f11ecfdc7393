"""The streamed forward (qwen_convert/scoring/streamed) against transformers, its cache, and verify's memory checks.

The independent reference is transformers itself: Qwen3ForCausalLM's full-vocabulary logits at the
last real token (logit(yes) - logit(no)) and Qwen3ForSequenceClassification's pooled logit, both
in fp32, on every tiny fixture (tied, untied, bf16, sharded) and both padding sides, and on a
two-layer checkpoint with the real 8B attention widths (head_dim 128, 32 query / 8 key-value heads).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.errors import QconvError, WeightsError
from qwen_convert.fixtures import TinySpec, build_tiny_reranker
from qwen_convert.formats import ArtifactKind
from qwen_convert.scoring import registry
from qwen_convert.scoring.batches import encode_batches, prompt_encoder
from qwen_convert.scoring.memory import activation_bytes, parse_size
from qwen_convert.scoring.probes import PROBE_PAIRS
from qwen_convert.scoring.registry import choose_engine
from qwen_convert.scoring.streamed.engine import stream_forward
from qwen_convert.seqcls.convert import convert_to_seqcls
from qwen_convert.verify import VerifyOptions, plan_batches, verify
from qwen_convert.verify.reference import padded_tokens

PAIRS = tuple(PROBE_PAIRS[i] for i in (0, 1, 2, 3, 9, 22, 23, 24, 25))  # 102 to 523 tokens, two languages
SHORT = tuple(PROBE_PAIRS[i] for i in (0, 1, 22, 23))
TOL = 1e-5
REAL_WIDTHS = TinySpec(tied=False, dtype="bfloat16", hidden_size=256, num_hidden_layers=2, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=512, seed=7)


@pytest.fixture(scope="module")
def real_widths(tmp_path_factory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("wide") / "wide", REAL_WIDTHS)


def _batches(model: Path, side: str, pairs=PAIRS, batch_size: int = 4):
    return encode_batches(prompt_encoder(model, None, 8192), list(pairs), batch_size, side)


def _transformers_causal(model: Path, batches) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    encoder = prompt_encoder(model, None, 8192)
    yes, no = encoder.tokens.yes_id, encoder.tokens.no_id
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for b in batches:
            mask = torch.from_numpy(b.attention_mask)
            logits = lm(input_ids=torch.from_numpy(b.input_ids), attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            last = logits[torch.arange(len(b.last_index)), torch.from_numpy(b.last_index)]
            out.append((last[:, yes] - last[:, no]).double().numpy())
    return np.concatenate(out)


def _transformers_seqcls(model: Path, batches) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification

    seq = AutoModelForSequenceClassification.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.inference_mode():
        return np.concatenate([seq(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask))
                               .logits[:, 0].double().numpy() for b in batches])


def _yes_no(model: Path) -> tuple[int, int]:
    tokens = prompt_encoder(model, None, 8192).tokens
    return tokens.yes_id, tokens.no_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_streamed_causal_equals_transformers_on_every_fixture(tiny_model, side):
    batches = _batches(tiny_model, side)
    expected = _transformers_causal(tiny_model, batches)
    got = np.concatenate(stream_forward(tiny_model, batches, "causal", _yes_no(tiny_model)))
    assert np.abs(expected).max() > 0.1  # the logits spread out: the comparison means something
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_streamed_seqcls_equals_transformers(tiny_models, tmp_path_factory, side):
    root = tmp_path_factory.mktemp("seqcls")
    for name in ("tied_fp32", "untied_bf16_sharded"):
        seqcls = convert_to_seqcls(tiny_models[name], root / f"{name}-{side}").out
        batches = _batches(seqcls, side)
        expected = _transformers_seqcls(seqcls, batches)
        got = np.concatenate(stream_forward(seqcls, batches, "seqcls"))
        assert np.abs(got - expected).max() <= TOL, name


@pytest.mark.parametrize("side", ["left", "right"])
def test_streamed_equals_transformers_at_real_widths(real_widths, tmp_path, side):
    batches = _batches(real_widths, side)
    got = np.concatenate(stream_forward(real_widths, batches, "causal", _yes_no(real_widths)))
    assert np.abs(got - _transformers_causal(real_widths, batches)).max() <= TOL
    seqcls = convert_to_seqcls(real_widths, tmp_path / "seqcls").out
    got = np.concatenate(stream_forward(seqcls, batches, "seqcls"))
    assert np.abs(got - _transformers_seqcls(seqcls, batches)).max() <= TOL


def test_weights_held_as_stored_give_the_same_bits(real_widths):
    """stored=True (bf16 matrices, each widened to fp32 only while its linear runs) is the fp32
    forward exactly, not within a tolerance: calibration's scales and the exports depend on it."""
    batches = _batches(real_widths, "left", SHORT)
    seen = []
    observe = lambda _i, layer: seen.append(layer.mlp.down_proj.weight.dtype)  # noqa: E731
    held = stream_forward(real_widths, batches, "causal", _yes_no(real_widths), observer=observe, stored=True)
    plain = stream_forward(real_widths, batches, "causal", _yes_no(real_widths))
    assert seen == [torch_dtype("bfloat16")] * REAL_WIDTHS.num_hidden_layers
    assert all(np.array_equal(a, b) for a, b in zip(held, plain))


@pytest.mark.parametrize("chunk", ["whole", "rows"])
def test_layers_left_in_the_file_give_the_fp32_forward(real_widths, monkeypatch, chunk):
    """A layer over HOLD_BYTES is not read at all: its linears read their rows from the checkpoint as
    they run. A matrix that fits one chunk is the same single matmul (the same bits); a matrix read
    in row chunks fills its output a slice of columns at a time (within fp32 rounding)."""
    from qwen_convert.scoring.streamed import layer, weights
    from qwen_convert.scoring.streamed.weights import FileMatrix

    batches = _batches(real_widths, "left", SHORT)
    plain = np.concatenate(stream_forward(real_widths, batches, "causal", _yes_no(real_widths)))
    monkeypatch.setattr(weights, "HOLD_BYTES", 0)
    if chunk == "rows":
        monkeypatch.setattr(layer, "ROW_CHUNK_BYTES", 4 * REAL_WIDTHS.hidden_size * 100)  # 100 rows a chunk
    reads = []
    rows = FileMatrix.rows
    monkeypatch.setattr(FileMatrix, "rows", lambda self, a, b: reads.append((self.info.name, a, b)) or rows(self, a, b))
    seen = []
    observe = lambda _i, m: seen.append((m.mlp.down_proj.weight.is_meta, m.self_attn.q_proj.source.shape))  # noqa: E731
    got = np.concatenate(stream_forward(real_widths, batches, "causal", _yes_no(real_widths), observer=observe, stored=True))
    q_rows = REAL_WIDTHS.num_attention_heads * REAL_WIDTHS.head_dim
    assert seen == [(True, (q_rows, REAL_WIDTHS.hidden_size))] * REAL_WIDTHS.num_hidden_layers
    up = [(a, b) for name, a, b in reads if name == "model.layers.0.mlp.up_proj.weight"]
    if chunk == "whole":
        assert set(up) == {(0, REAL_WIDTHS.intermediate_size)}
        assert np.array_equal(got, plain)
    else:
        assert sorted(set(up))[:2] == [(0, 100), (100, 200)] and max(b for _a, b in up) == REAL_WIDTHS.intermediate_size
        assert np.abs(got - plain).max() <= TOL


def test_spilled_hidden_states_give_the_same_bits(real_widths, monkeypatch):
    """spill=True keeps every batch's hidden states in a temporary file between layers (calibration's
    passes): each batch is read back once per layer and at the head, and the logits are the held ones."""
    from qwen_convert.scoring.streamed import hidden

    batches = _batches(real_widths, "right", SHORT, batch_size=2)
    held = stream_forward(real_widths, batches, "causal", _yes_no(real_widths))
    reads = []
    get = hidden.SpilledStates.get
    monkeypatch.setattr(hidden.SpilledStates, "get", lambda self, i: reads.append(i) or get(self, i))
    spilled = stream_forward(real_widths, batches, "causal", _yes_no(real_widths), spill=True)
    assert sorted(reads) == sorted(list(range(len(batches))) * (REAL_WIDTHS.num_hidden_layers + 1))
    assert all(np.array_equal(a, b) for a, b in zip(spilled, held))


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


class _Recorder:
    def __init__(self):
        self.tasks, self.lines = [], []

    def task(self, description, total=None):
        record = {"description": description, "total": total, "done": 0}
        self.tasks.append(record)

        class _T:
            def advance(self, n=1):
                record["done"] += n

        return _T()

    def log(self, message):
        self.lines.append(message)


def test_progress_is_per_layer_and_batch(tiny_models):
    model = tiny_models["tied_fp32"]
    rec = _Recorder()
    batches = _batches(model, "left")
    stream_forward(model, batches, "causal", _yes_no(model), reporter=rec)
    (task,) = rec.tasks
    assert task["total"] == task["done"] == 2 * len(batches)  # 2 layers x batches


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_config_that_disagrees_with_tensors_is_one_line_error(tiny_models, tmp_path):
    model = _copy(tiny_models["untied_fp32"], tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    batches = _batches(model, "left", SHORT)
    config.pop("layer_types", None)  # derived from num_hidden_layers when absent
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(WeightsError, match=r"model\.layers\.2\..* which the weights lack"):
        stream_forward(model, batches, "causal", _yes_no(model))
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(WeightsError, match="layer tensors the config does not describe"):
        stream_forward(model, batches, "causal", _yes_no(model))
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(WeightsError, match=r"mlp\.gate_proj\.weight has shape \[128, 64\], config.json implies \[96, 64\]"):
        stream_forward(model, batches, "causal", _yes_no(model))
    r = CliRunner().invoke(app, ["score", str(model), "--query", "q", "--doc", "d", "--engine", "streamed"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "disagrees with the tensors" in r.stderr


def test_score_with_streamed_engine_matches_transformers(tiny_models):
    model = tiny_models["untied_bf16_sharded"]
    args = ["score", str(model), "--query", PAIRS[0].query, "--doc", PAIRS[0].document, "--doc", PAIRS[1].document, "--json"]
    runs = {}
    for engine in ("transformers", "streamed"):
        r = CliRunner().invoke(app, [*args, "--engine", engine])
        assert r.exit_code == 0, r.output
        runs[engine] = json.loads(r.stdout)
        assert runs[engine]["engine"] == engine
    a = [d["logit"] for d in runs["transformers"]["queries"][0]["results"]]
    b = [d["logit"] for d in runs["streamed"]["queries"][0]["results"]]
    assert np.allclose(a, b, atol=TOL, rtol=0)


def test_verify_streamed_reference_and_candidate(tiny_models, tmp_path):
    src = tiny_models["untied_bf16_sharded"]
    cand = convert_to_seqcls(src, tmp_path / "seqcls").out
    plain = verify(src, [cand], VerifyOptions(pairs=SHORT, batch_size=2))
    streamed = verify(src, [cand], VerifyOptions(pairs=SHORT, batch_size=2, engine="streamed"))
    assert plain.reference.engine == "transformers" and streamed.reference.engine == "streamed"
    assert streamed.candidates[0].engine == "streamed" and streamed.passed, streamed.render()
    assert streamed.reference.max_padding_delta < 1e-5
    assert streamed.candidates[0].max_abs_logit < TOL
    assert streamed.reference.peak_rss > 50 << 20
    assert "streamed" in streamed.render().splitlines()[0]


def test_auto_engine_streams_only_what_does_not_fit(tiny_models):
    model = tiny_models["untied_fp32"]
    whole = choose_engine(model, ArtifactKind.CAUSAL, "auto", budget=1 << 40)
    assert whole.engine == "transformers" and whole.fits
    tight = choose_engine(model, ArtifactKind.CAUSAL, "auto", budget=whole.needed - 1)
    assert tight.engine == "streamed" and tight.needed < whole.needed
    assert choose_engine(model, ArtifactKind.CAUSAL, "auto", "bfloat16", budget=1).engine == "transformers"
    with pytest.raises(QconvError, match="unknown"):
        choose_engine(model, ArtifactKind.CAUSAL, "gpu")


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json"))


def test_reference_cache_hit_miss_and_bad_entries(tiny_models, tmp_path):
    src = _copy(tiny_models["tied_fp32"], tmp_path / "model")
    cache = tmp_path / "cache"
    options = VerifyOptions(pairs=SHORT, batch_size=2, cache_dir=cache)
    first = verify(src, [], options)
    assert first.reference.cache == "miss" and len(_entries(cache)) == 1
    rec = _Recorder()
    second = verify(src, [], options, reporter=rec)
    assert second.reference.cache == "hit" and second.reference.ndcg == first.reference.ndcg
    assert second.reference.max_padding_delta == first.reference.max_padding_delta
    assert any("cached" in line for line in rec.lines)

    (entry,) = _entries(cache)
    # strict JSON: the pairs the right side's padding probe did not score are null, not NaN
    data = json.loads(entry.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a cache entry"))
    assert all(v is not None for v in data["scores"]["left"]) and sum(v is not None for v in data["scores"]["right"]) == 2
    data["scores"]["left"][0] += 1.0  # a flipped score: the checksum no longer matches
    entry.write_text(json.dumps(data))
    rec = _Recorder()
    third = verify(src, [], options, reporter=rec)
    assert third.reference.cache == "corrupt" and third.reference.ndcg == first.reference.ndcg
    assert [line for line in rec.lines if "corrupt" in line and "recomputing" in line]
    assert verify(src, [], options).reference.cache == "hit"  # rewritten intact

    entry.write_text("{not json")
    assert verify(src, [], options).reference.cache == "corrupt"
    data = json.loads(entry.read_text())
    data["material"]["engine"] = "someone else"
    entry.write_text(json.dumps(data))
    assert verify(src, [], options).reference.cache == "stale"

    # Anything the scores depend on is in the key: each change is a miss (a new entry).
    assert verify(src, [], VerifyOptions(pairs=SHORT, batch_size=2, cache_dir=cache, instruction="other")).reference.cache == "miss"
    assert verify(src, [], VerifyOptions(pairs=SHORT, batch_size=2, cache_dir=cache, max_length=120)).reference.cache == "miss"
    assert verify(src, [], VerifyOptions(pairs=SHORT[:3], batch_size=2, cache_dir=cache)).reference.cache == "miss"
    assert verify(src, [], VerifyOptions(pairs=SHORT, batch_size=2, cache_dir=cache, engine="streamed")).reference.cache == "miss"
    weights = src / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # re-written weights
    assert verify(src, [], options).reference.cache == "miss"
    assert verify(src, [], VerifyOptions(pairs=SHORT, batch_size=2)).reference.cache == "off"


def test_candidate_that_does_not_fit_is_not_verified(tiny_models, real_widths, tmp_path):
    ref = tiny_models["tied_fp32"]
    big = convert_to_seqcls(real_widths, tmp_path / "big-seqcls").out
    small = convert_to_seqcls(ref, tmp_path / "small-seqcls").out
    # The same estimates verify makes: the model's largest layer plus the probe set's activations.
    options = VerifyOptions(pairs=SHORT, batch_size=2)
    sides = plan_batches(prompt_encoder(ref, None, options.max_length), SHORT, options)[0]
    tokens = padded_tokens(sides)[0]

    def need(model, kind):
        config = json.loads((model / "config.json").read_text())
        return choose_engine(model, kind, "streamed", budget=0, activations=activation_bytes(
            tokens, config["hidden_size"], config["intermediate_size"])).needed

    ref_need, big_need = need(ref, ArtifactKind.CAUSAL), need(big, ArtifactKind.SEQCLS)
    assert big_need > ref_need
    limit = (ref_need + big_need) // 2
    report = verify(ref, [small, big], replace(options, memory_limit=limit))
    good, skipped = report.candidates
    assert good.passed and good.not_verified is None
    assert skipped.not_verified and "needs about" in skipped.not_verified and skipped.memory_needed >= big_need
    assert not report.passed and not report.failed and report.not_verified == [skipped]
    assert "NOT VERIFIED" in report.render()

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": p.query, "document": p.document}) + "\n" for p in SHORT))
    r = CliRunner().invoke(app, ["verify", str(ref), str(small), str(big), "--memory-limit", str(limit), "--json",
                                 "--quiet", "--no-cache", "--pairs", str(pairs), "--batch-size", "2"])
    assert r.exit_code == 3, r.output
    data = json.loads(r.stdout)
    assert data["not_verified"] == [skipped.label]
    assert data["candidates"][1]["memory_needed_bytes"] >= big_need and data["candidates"][1]["max_abs_logit"] is None

    with pytest.raises(QconvError, match="the reference needs about"):
        verify(ref, [small], VerifyOptions(pairs=SHORT, batch_size=2, memory_limit=1 << 20))


def test_cli_verify_json_reports_engine_peak_and_cache(tiny_models, tmp_path):
    src = tiny_models["tied_fp32"]
    cand = convert_to_seqcls(src, tmp_path / "c").out
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": p.query, "document": p.document}) + "\n" for p in SHORT))
    args = ["verify", str(src), str(cand), "--engine", "streamed", "--cache-dir", str(tmp_path / "cache"), "--json", "--quiet",
            "--pairs", str(pairs)]
    first = json.loads(CliRunner().invoke(app, args).stdout)
    assert first["passed"] and first["reference"]["engine"] == "streamed" and first["reference"]["cache"] == "miss"
    assert first["reference"]["peak_rss_bytes"] > 0 and first["candidates"][0]["engine"] == "streamed"
    again = json.loads(CliRunner().invoke(app, args).stdout)
    assert again["reference"]["cache"] == "hit" and again["reference"]["peak_rss_bytes"] is None
    assert again["candidates"][0]["max_abs_logit"] == first["candidates"][0]["max_abs_logit"]


def test_parse_size():
    assert parse_size("12G") == 12 << 30 and parse_size("512M") == 512 << 20 and parse_size("3.5GiB") == int(3.5 * (1 << 30))
    with pytest.raises(QconvError):
        parse_size("lots")


def test_candidate_scores_are_cached_and_any_change_rescores(tiny_models, tmp_path, monkeypatch):
    """Re-verifying unchanged candidates reads their scores (no ONNX session, no torch model is made);
    touching a data file, other inputs or a broken entry rescores; the gates are re-applied either way."""
    import onnxruntime

    from qwen_convert.onnx.export import ExportOptions, export_onnx

    src = tiny_models["untied_fp32"]
    # Without onnx/prefix/: the with-past graphs are candidates of their own, cached the same way (test_prefix.py).
    onnx = export_onnx(src, tmp_path / "onnx", ExportOptions(modes=("int8",), verify=False, prefix_graphs=False)).out
    seqcls = convert_to_seqcls(src, tmp_path / "seqcls").out
    cache = tmp_path / "cache"
    options = VerifyOptions(pairs=SHORT, batch_size=2, cache_dir=cache)
    first = verify(src, [onnx, seqcls], options)
    assert first.passed and [c.cache for c in first.candidates] == ["miss", "miss", "miss"]
    assert len(_entries(cache)) == 4  # the reference and three candidates

    real_session = onnxruntime.InferenceSession

    def no_session(*a, **k):
        raise AssertionError("a cached candidate created an onnxruntime session")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    monkeypatch.setitem(registry.LOADERS, ArtifactKind.SEQCLS, no_session)
    second = verify(src, [onnx, seqcls], options)
    assert [c.cache for c in second.candidates] == ["hit", "hit", "hit"] and second.passed
    assert [c.max_abs_logit for c in second.candidates] == [c.max_abs_logit for c in first.candidates]
    assert [c.retention for c in second.candidates] == [c.retention for c in first.candidates]
    assert "(cached)" in second.render()
    tight = verify(src, [seqcls], replace(options, tol_logit=1e-12))  # gates apply to cached numbers too
    assert tight.candidates[0].cache == "hit" and not tight.passed

    monkeypatch.setattr(onnxruntime, "InferenceSession", real_session)
    data = onnx / "onnx" / "model.onnx"  # inline weights at this size: the graph file is the data
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    third = verify(src, [onnx], options)
    assert [c.cache for c in third.candidates] == ["miss", "hit"]  # fp32 rescored, int8 untouched
    (entry,) = [p for p in _entries(cache) if third.candidates[1].cache_path == str(p)]
    entry.write_text(entry.read_text().replace('"scores"', '"scorez"', 1))
    assert verify(src, [onnx], options).candidates[1].cache == "corrupt"
    assert verify(src, [onnx], replace(options, max_length=120)).candidates[1].cache == "miss"
    assert [c.cache for c in verify(src, [onnx], replace(options, cache_dir=None)).candidates] == ["off", "off"]


def test_onnx_verify_with_a_cached_reference_imports_neither_transformers_nor_torch(tiny_models, tmp_path):
    """With the reference scores cached, checking an ONNX export needs tokenizer.json (read with
    `tokenizers`) and onnxruntime only: importing transformers, and through it torch, cost ~5 s of
    such a verify on the 0.6B. A fresh interpreter, so nothing the test session imported counts."""
    import subprocess
    import sys

    from qwen_convert.onnx.export import ExportOptions, export_onnx

    src = tiny_models["untied_fp32"]
    onnx = export_onnx(src, tmp_path / "onnx", ExportOptions(modes=("int8",), verify=False)).out
    cache = tmp_path / "cache"
    assert verify(src, [], VerifyOptions(pairs=SHORT, batch_size=2, cache_dir=cache)).reference.cache == "miss"
    script = (
        "import json, sys; from pathlib import Path\n"
        "from qwen_convert.scoring.probes import PROBE_PAIRS\n"
        "from qwen_convert.verify import VerifyOptions, verify\n"
        "pairs = tuple(PROBE_PAIRS[i] for i in (0, 1, 22, 23))\n"
        f"r = verify(Path({str(src)!r}), [Path({str(onnx)!r})], VerifyOptions(pairs=pairs, batch_size=2, cache_dir=Path({str(cache)!r})))\n"
        "print(json.dumps({'passed': r.passed, 'reference': r.reference.cache, 'candidates': [c.cache for c in r.candidates],\n"
        "                  'imported': sorted(m for m in ('torch', 'transformers') if m in sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # fp32, int8 and their with-past graphs (onnx/prefix/): none of the four imports torch or transformers
    assert result == {"passed": True, "reference": "hit", "candidates": ["miss"] * 4, "imported": []}
