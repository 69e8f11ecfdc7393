"""`verify`: correct candidates pass at 1e-4 on every fixture; perturbed heads fail with the right numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _handmade import one_torch_thread, reference_logit, seqcls_by_hand
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.errors import QconvError, SourceError
from qwen_convert.formats import ArtifactKind
from qwen_convert.reranker import load_tokenizer, reranker_tokens
from qwen_convert.scoring import registry, torch_scorers
from qwen_convert.scoring.batches import encode_batches, prompt_encoder, score_pairs
from qwen_convert.scoring.probes import PROBE_PAIRS
from qwen_convert.scoring.registry import load_scorers
from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls
from qwen_convert.verify import DEFAULT_GATES, Gate, VerifyOptions, gate_table, verify

# Mixed lengths (102 to 523 tokens), English and Chinese, three queries: enough to exercise padding
# on every fixture while staying fast; the full probe set runs in the CLI tests.
SUBSET = tuple(PROBE_PAIRS[i] for i in (0, 1, 2, 3, 9, 22, 23, 24, 25))
_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

SHORT = tuple(PROBE_PAIRS[i] for i in (0, 1, 2, 3, 22, 23, 24, 25))  # two queries, four documents each


@pytest.fixture(scope="session")
def candidates(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Seq-cls candidates: streaming conversions of every fixture, hand-built cross-checks, broken heads."""
    root = tmp_path_factory.mktemp("candidates")
    out = {}
    for name, src in tiny_models.items():
        out[f"{name}/converted"] = convert_to_seqcls(src, root / f"{name}-converted").out
    for name in ("tied_fp32", "untied_bf16_sharded"):
        out[f"{name}/by_hand"] = seqcls_by_hand(tiny_models[name], root / f"{name}-by-hand")
    src = tiny_models["tied_fp32"]
    out["noisy_head"] = seqcls_by_hand(src, root / "noisy-head", noise=1e-2)
    out["bf16_head"] = convert_to_seqcls(src, root / "bf16-head", ConvertOptions(score_dtype="bfloat16")).out
    return out


def _logits(model_dir: Path, pairs, batch_size: int, side: str, encoder_dir: Path | None = None, scorer=None) -> np.ndarray:
    encoder = prompt_encoder(encoder_dir or model_dir, None, 8192)
    return score_pairs(scorer or load_scorers(model_dir)[0], encode_batches(encoder, list(pairs), batch_size, side))


@pytest.mark.parametrize("name", ["tied_fp32", "untied_fp32", "tied_bf16_sharded", "untied_bf16_sharded"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_correct_candidates_pass_on_every_fixture(tiny_models, candidates, name, batch_size):
    cands = [candidates[k] for k in candidates if k.startswith(f"{name}/")]
    # Given order: batches mix 102- and 523-token prompts (the CLI tests cover the length-sorted default).
    report = verify(tiny_models[name], cands, VerifyOptions(pairs=SUBSET, batch_size=batch_size, sort_by_length=False))
    assert report.passed, report.render()
    assert report.padding_sides == ("left", "right") and report.reference.padding_invariant
    assert report.reference.max_padding_delta < 1e-5
    for c in report.candidates:
        assert c.precision == "fp32" and c.gate == Gate(max_abs_logit=1e-4)
        assert set(c.per_side) == {"left", "right"}
        assert c.max_abs_logit < 1e-5, c.to_dict()  # an order of magnitude inside the gate
        assert c.ranking.identical == c.ranking.queries == 3
        assert c.retention == pytest.approx(1.0)


def test_reference_is_the_plain_unpadded_forward(tiny_models):
    """The padded, batched reference equals logit(yes) − logit(no) of each prompt run alone, unpadded."""
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_models["untied_bf16_sharded"]
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    encoder = prompt_encoder(src, None, 8192)
    expected = np.array([reference_logit(model, encoder.tokens, encoder.ids(p)) for p in SUBSET])
    assert np.abs(expected).max() > 0.05  # not a degenerate model whose scores are all ~0
    for side in ("left", "right"):
        np.testing.assert_allclose(_logits(src, SUBSET, 4, side), expected, atol=2e-6, rtol=0)


def test_scores_do_not_depend_on_batch_composition(tiny_models, candidates):
    src = tiny_models["untied_fp32"]
    shuffled = np.random.default_rng(0).permutation(len(SUBSET))
    for model_dir in (src, candidates["untied_fp32/converted"]):
        scorer = load_scorers(model_dir)[0]
        alone = _logits(model_dir, SUBSET, 1, "left", src, scorer)
        for side in ("left", "right"):
            together = _logits(model_dir, SUBSET, len(SUBSET), side, src, scorer)
            mixed = np.empty(len(SUBSET))
            mixed[shuffled] = _logits(model_dir, [SUBSET[i] for i in shuffled], 3, side, src, scorer)
            np.testing.assert_allclose(together, alone, atol=2e-6, rtol=0)
            np.testing.assert_allclose(mixed, alone, atol=2e-6, rtol=0)


@pytest.mark.parametrize(("bad", "low", "high"), [("noisy_head", 1e-2, 1.0), ("bf16_head", 1e-5, 1e-2)])
def test_perturbed_head_fails_with_the_measured_numbers(tiny_models, candidates, bad, low, high):
    src = tiny_models["tied_fp32"]
    report = verify(src, [candidates["tied_fp32/converted"], candidates[bad]],
                    VerifyOptions(pairs=SHORT, batch_size=3, padding_check="full"))
    good, broken = report.candidates
    assert good.passed and not broken.passed and not report.passed
    # The reported number is the real one: recompute it independently.
    expected = max(np.abs(_logits(candidates[bad], SHORT, 3, side, src) - _logits(src, SHORT, 3, side)).max()
                   for side in ("left", "right"))
    assert broken.max_abs_logit == pytest.approx(expected, abs=2e-6)  # batching differs: fp32 rounding only
    assert low < broken.max_abs_logit < high
    [failure] = broken.failures
    assert (failure.check, failure.value, failure.tolerance) == ("max_abs_logit", broken.max_abs_logit, 1e-4)
    assert f"max |Δlogit| {broken.max_abs_logit:.3e} > 1.0e-04" in failure.detail
    assert broken.worst["side"] in ("left", "right") and 0 <= broken.worst["pair"] < len(SHORT)
    w = broken.worst
    assert abs(w["candidate_logit"] - w["reference_logit"]) == pytest.approx(broken.max_abs_logit)
    assert "FAIL" in report.render() and failure.detail in report.render()
    # A looser, explicitly chosen tolerance lets the same candidate through.
    loose = verify(src, [candidates[bad]], VerifyOptions(pairs=SHORT[:3], tol_logit=1.0, padding_sides=("right",)))
    assert loose.passed and loose.gates["fp32"].max_abs_logit == 1.0


class _Shifted:
    """A fake candidate of a given precision: the real seq-cls scores, moved by `shift(scores)`."""

    def __init__(self, inner, precision, shift):
        self.inner, self.precision, self.shift = inner, precision, shift
        self.name, self.kind = f"onnx/{precision}", ArtifactKind.ONNX

    def score(self, batch):
        s = self.inner.score(batch)
        return s + self.shift(s)


def test_gate_table_chooses_by_precision(tiny_models, candidates, monkeypatch, tmp_path):
    """Through the ONNX seam: each variant's precision picks its gate; every miss is listed."""
    onnx_dir = tmp_path / "export"
    shutil.copytree(candidates["tied_fp32/converted"], onnx_dir)
    (onnx_dir / "onnx").mkdir()
    seen = {}

    def fake_onnx_loader(path, variants, dtype):
        seen["variants"] = variants
        base = load_scorers(candidates["tied_fp32/converted"])[0]
        return [
            _Shifted(base, "fp32", lambda s: np.full_like(s, 5e-3)),  # fails 1e-4
            _Shifted(base, "fp16", lambda s: np.full_like(s, 5e-3)),  # passes 2e-2
            _Shifted(base, "int8", lambda s: np.full_like(s, 0.5)),  # ranking intact, but P(yes) moved: fails |ΔP|
            _Shifted(base, "bf16", lambda s: np.full_like(s, 0.05)),  # ranking intact, P within 0.0125: passes
            _Shifted(base, "q4", lambda s: -2 * s),  # ranking reversed: fails retention
            _Shifted(base, "q2", lambda s: 0 * s),  # no gate for this precision: fails, says so
        ]

    monkeypatch.setitem(registry.LOADERS, ArtifactKind.ONNX, fake_onnx_loader)
    options = VerifyOptions(pairs=SHORT, batch_size=len(SHORT), variants=("fp32", "q4"), padding_sides=("left",))
    report = verify(tiny_models["tied_fp32"], [onnx_dir], options)
    assert seen["variants"] == ("fp32", "q4")
    by = {c.precision: c for c in report.candidates}
    assert [c.kind for c in report.candidates] == ["onnx"] * 6
    for precision in ("fp32", "fp16", "int8", "q4"):
        assert by[precision].gate == DEFAULT_GATES[precision]
    assert [f.check for f in by["fp32"].failures] == ["max_abs_logit"]
    # the shift plus the conversion's own fp32 noise (~5e-7 on this fixture)
    assert by["fp32"].max_abs_logit == pytest.approx(5e-3, abs=2e-6)
    assert by["fp16"].passed and by["fp16"].max_abs_logit == pytest.approx(5e-3, abs=2e-6)
    # NDCG retention alone would pass it: the ranking is intact, but every P(yes) moved by up to 0.125
    assert by["int8"].retention == pytest.approx(1.0) and by["int8"].max_abs_logit == pytest.approx(0.5, abs=2e-6)
    assert by["int8"].ranking.mean_kendall_tau == pytest.approx(1.0)
    expected = np.tanh(0.5 / 4)  # the largest |ΔP| a shift of 0.5 makes: σ(0.25) - σ(-0.25)
    assert 0.1 < by["int8"].max_abs_prob <= expected + 1e-6
    failed = {f.check: f for f in by["int8"].failures}
    assert "max_abs_prob" in failed and failed["max_abs_prob"].tolerance == 0.1
    assert failed["max_abs_prob"].value == pytest.approx(by["int8"].max_abs_prob)
    assert "max |ΔP(yes)|" in failed["max_abs_prob"].detail
    assert by["bf16"].passed and by["bf16"].gate == DEFAULT_GATES["bf16"]
    q4_failed = {f.check: f for f in by["q4"].failures}
    assert {"retention", "kendall_tau", "max_abs_prob", "p95_abs_prob"} <= q4_failed.keys()
    assert q4_failed["retention"].tolerance == 0.97 and q4_failed["retention"].value < 0.97
    assert q4_failed["kendall_tau"].value == pytest.approx(-1.0) and q4_failed["kendall_tau"].tolerance == 0.8
    assert by["q4"].retention == pytest.approx(by["q4"].ndcg / by["q4"].ndcg_reference)
    assert by["q4"].ranking.identical == 0 and by["q4"].ranking.min_kendall_tau == -1.0
    assert by["fp32"].per_side.keys() == {"left"} and report.reference.max_padding_delta is None
    assert "no gate for precision 'q2'" in by["q2"].failures[0].detail
    assert not report.passed

    # Each gate is configurable: tolerances from the CLI options and per-precision overrides.
    table = gate_table(VerifyOptions(tol_fp16=1e-3, min_retention=0.5, gates={"q2": Gate(max_abs_prob=0.1)}))
    assert table["fp16"].max_abs_logit == 1e-3 and table["q4"].min_retention == 0.5 and table["bf16"].min_retention == 0.5
    assert table["q2"] == Gate(max_abs_prob=0.1) and table["fp32"] == DEFAULT_GATES["fp32"]
    with pytest.raises(QconvError, match="must be finite and not negative"):
        gate_table(VerifyOptions(tol_logit=-1.0))


def test_non_finite_candidate_scores_fail_and_json_stays_strict(tiny_models, candidates, monkeypatch, tmp_path):
    onnx_dir = tmp_path / "export"
    shutil.copytree(candidates["tied_fp32/converted"], onnx_dir)
    (onnx_dir / "onnx").mkdir()
    base = load_scorers(candidates["tied_fp32/converted"])[0]
    nan_first = _Shifted(base, "fp16", lambda s: np.where(np.arange(s.size) == 0, np.nan, 0.0))
    monkeypatch.setitem(registry.LOADERS, ArtifactKind.ONNX, lambda path, variants, dtype: [nan_first])
    report = verify(tiny_models["tied_fp32"], [onnx_dir], VerifyOptions(pairs=SHORT, batch_size=4))
    [c] = report.candidates
    assert {f.check for f in c.failures} == {"finite", "max_abs_logit"}
    # the first row of each batch: 2 batches on the left, and the right side's padding probe
    assert next(f for f in c.failures if f.check == "finite").value == 3.0
    assert c.max_abs_logit == np.inf and c.max_abs_prob == 1.0
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["candidates"][0]["max_abs_logit"] is None and data["passed"] is False


def test_plan_cuts_batches_at_long_prompts_and_the_probe_pads_the_shortest_to_twice_its_length(tiny_models):
    from qwen_convert.verify import plan_batches

    encoder = prompt_encoder(tiny_models["tied_fp32"], None, 8192)
    lengths = [len(encoder.ids(p)) for p in SUBSET]
    batches, orders = plan_batches(encoder, SUBSET, VerifyOptions(pairs=SUBSET, batch_size=4))
    assert sorted(orders["left"]) == list(range(len(SUBSET)))
    by_length = sorted(lengths)
    # the one long document (523 tokens) gets a batch of its own instead of padding three others to it
    assert by_length[-1] > 3 * by_length[-2]
    assert [b.input_ids.shape for b in batches["left"]] == [(4, by_length[3]), (4, by_length[7]), (1, by_length[8])]
    for batch, rows in zip(batches["left"], np.split(orders["left"], [4, 8])):
        assert batch.attention_mask.sum(axis=1).tolist() == [lengths[i] for i in rows] and batch.attention_mask[:, -1].all()
    # the other side: the shortest prompt and the next longer one, padded to twice the shortest
    shortest, second = int(np.argsort(lengths, kind="stable")[0]), int(np.argsort(lengths, kind="stable")[1])
    assert list(orders["right"]) == [shortest, second] and lengths[second] > lengths[shortest]
    [probe] = batches["right"]
    mask = probe.attention_mask
    assert mask.shape == (2, 2 * lengths[shortest]) and mask.sum(axis=1).tolist() == [lengths[shortest], lengths[second]]
    assert mask[:, 0].all() and not mask[:, lengths[second]:].any()  # right-padded, half the shortest row is padding
    # capped at the longest prompt when that is shorter than twice the shortest
    few = plan_batches(encoder, SUBSET[:3], VerifyOptions(pairs=SUBSET[:3]))[0]["right"][0]
    assert max(lengths[:3]) < 2 * min(lengths[:3]) and few.attention_mask.shape == (2, max(lengths[:3]))
    full = plan_batches(encoder, SUBSET, VerifyOptions(pairs=SUBSET, batch_size=4, padding_check="full"))
    assert [list(v) for v in full[1].values()] == [list(orders["left"])] * 2
    assert [b.input_ids.shape for b in full[0]["right"]] == [b.input_ids.shape for b in batches["left"]]
    # one pair (or prompts all of one length): one unpadded row
    one_b, one = plan_batches(encoder, SUBSET[:1], VerifyOptions())
    assert list(one["right"]) == [0] and one_b["right"][0].attention_mask.all()
    # sort_by_length off: fixed batches in the given order
    given = plan_batches(encoder, SUBSET, VerifyOptions(pairs=SUBSET, batch_size=4, sort_by_length=False))
    assert list(given[1]["left"]) == list(range(len(SUBSET))) and [len(b.input_ids) for b in given[0]["left"]] == [4, 4, 1]
    with pytest.raises(QconvError, match="padding check"):
        verify(tiny_models["tied_fp32"], [], VerifyOptions(pairs=SHORT, padding_check="some"))


class _RightPaddingBug(_Shifted):
    """Right-padded rows move by 0.5: what pooling the last position instead of the last real token does."""

    def score(self, batch):
        return self.inner.score(batch) + 0.5 * (batch.attention_mask[:, -1] == 0)


def test_the_padding_probe_catches_a_candidate_broken_only_on_the_other_side(tiny_models, candidates, monkeypatch, tmp_path):
    onnx_dir = tmp_path / "export"
    shutil.copytree(candidates["tied_fp32/converted"], onnx_dir)
    (onnx_dir / "onnx").mkdir()
    base = load_scorers(candidates["tied_fp32/converted"])[0]
    monkeypatch.setitem(registry.LOADERS, ArtifactKind.ONNX, lambda path, variants, dtype: [_RightPaddingBug(base, "fp32", None)])
    report = verify(tiny_models["tied_fp32"], [onnx_dir], VerifyOptions(pairs=SUBSET, batch_size=4))
    [c] = report.candidates
    assert report.padding_check == "probe" and report.padding_rows == {"left": len(SUBSET), "right": 2}
    assert c.per_side["left"]["max_abs_logit"] < 1e-5 and c.per_side["right"]["pairs"] == 2
    assert c.max_abs_logit == pytest.approx(0.5, abs=1e-5) and c.worst["side"] == "right"
    encoder = prompt_encoder(tiny_models["tied_fp32"], None, 8192)
    assert c.worst["pair"] == int(np.argmin([len(encoder.ids(p)) for p in SUBSET]))  # the padded row of the probe
    assert [f.check for f in c.failures] == ["max_abs_logit"] and not report.passed
    assert c.ranking.queries == 3 and c.ranking.identical == 3  # ranked on the left side, where every pair was scored
    assert "right (probe: 2 pairs)" in report.render()
    data = report.to_dict()
    assert data["padding_check"] == "probe" and data["padding_rows"] == {"left": len(SUBSET), "right": 2}


def test_the_probe_gates_a_quantized_candidate_by_its_own_padding_invariance(tiny_models, candidates, monkeypatch, tmp_path):
    """q4/int8 are gated by ranking, which a two-pair probe cannot give: their probe rows must agree
    with their own first-side scores within twice their worst first-side error."""
    onnx_dir = tmp_path / "export"
    shutil.copytree(candidates["tied_fp32/converted"], onnx_dir)
    (onnx_dir / "onnx").mkdir()
    base = load_scorers(candidates["tied_fp32/converted"])[0]
    noisy = _Shifted(base, "int8", lambda s: 0.01 * np.cos(7 * s))  # quantization-like error, batch independent
    broken = _RightPaddingBug(base, "q4", None)
    monkeypatch.setitem(registry.LOADERS, ArtifactKind.ONNX, lambda path, variants, dtype: [noisy, broken])
    report = verify(tiny_models["tied_fp32"], [onnx_dir], VerifyOptions(pairs=SUBSET, batch_size=4))
    ok, bad = report.candidates
    assert ok.passed and ok.per_side["right"]["padding_delta"] < 1e-5 and "padding_delta" not in ok.per_side["left"]
    # the broken one ranks perfectly on the left (retention 1.0): only the padding check catches it
    assert bad.retention == pytest.approx(1.0) and [f.check for f in bad.failures] == ["padding"]
    [f] = bad.failures
    assert f.value == pytest.approx(0.5, abs=1e-5) and f.tolerance == pytest.approx(2 * bad.per_side["left"]["max_abs_logit"] + 1e-4)
    assert "right padding moves its own score by 5.000e-01" in f.detail and f"FAIL {bad.label}: right padding" in report.render()
    # with every pair on both sides the right side's own ranking is gated instead
    full = verify(tiny_models["tied_fp32"], [onnx_dir], VerifyOptions(pairs=SUBSET, batch_size=4, padding_check="full"))
    assert "padding_delta" not in full.candidates[1].per_side["right"] and full.candidates[0].passed


def test_reference_that_depends_on_padding_is_flagged(tiny_models, candidates, monkeypatch):
    original = torch_scorers.CausalScorer.score

    def left_padding_bug(self, batch):  # left-padded rows drift: what a forgotten attention mask does
        return original(self, batch) + 1e-3 * (batch.attention_mask[:, 0] == 0)

    monkeypatch.setattr(torch_scorers.CausalScorer, "score", left_padding_bug)
    report = verify(tiny_models["tied_fp32"], [candidates["tied_fp32/converted"]], VerifyOptions(pairs=SHORT, batch_size=4))
    assert not report.reference.padding_invariant and not report.passed
    assert report.reference.max_padding_delta == pytest.approx(1e-3, rel=1e-3)
    assert "FAIL reference: its logits change with the padding side" in report.render()


def test_candidate_tokenizer_must_match(tiny_models, candidates, tmp_path):
    cand = tmp_path / "no-tokenizer"
    shutil.copytree(candidates["tied_fp32/converted"], cand)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (cand / f).unlink(missing_ok=True)
    report = verify(tiny_models["tied_fp32"], [cand], VerifyOptions(pairs=SUBSET[:2]))
    [failure] = report.candidates[0].failures
    assert failure.check == "tokenizer" and "tokenizer unusable" in failure.detail


def test_truncation_keeps_the_suffix_and_matches_explicitly_truncated_ids(tiny_models, candidates):
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_models["tied_fp32"]
    long_pairs = [p for p in PROBE_PAIRS if len(p.document) > 500][:3] + [PROBE_PAIRS[0]]
    report = verify(src, [candidates["tied_fp32/converted"]], VerifyOptions(pairs=tuple(long_pairs), max_length=96, batch_size=4))
    assert report.passed and report.max_length == 96
    assert report.num_truncated == 4 and report.to_dict()["pairs"]["truncated"] == 4 and "(4 truncated)" in report.render()

    tok = load_tokenizer(src)
    encoder = prompt_encoder(src, None, 96)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    for p in long_pairs:
        body = tok.encode(f"<Instruct>: {encoder.instruction}\n<Query>: {p.query}\n<Document>: {p.document}", add_special_tokens=False)
        ids = encoder.prefix_ids + body[: 96 - len(encoder.prefix_ids) - len(encoder.suffix_ids)] + encoder.suffix_ids
        assert encoder.ids(p) == ids and len(ids) == 96
        assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    expected = np.array([reference_logit(model, reranker_tokens(tok), encoder.ids(p)) for p in long_pairs])
    for model_dir in (src, candidates["tied_fp32/converted"]):
        for side in ("left", "right"):
            got = score_pairs(load_scorers(model_dir)[0], encode_batches(encoder, long_pairs, 4, side))
            np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    full = _logits(src, long_pairs[:3], 4, "left")
    assert np.abs(full - expected[:3]).max() > 1e-3  # truncation really changed the input


def test_refusals(tiny_models, candidates, tmp_path):
    src = tiny_models["tied_fp32"]
    good = candidates["tied_fp32/converted"]
    with pytest.raises(SourceError, match="does not exist"):
        verify(src, [tmp_path / "missing"], VerifyOptions(pairs=SUBSET[:1]))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SourceError, match="LlamaForCausalLM model, not Qwen3"):
        verify(src, [llama], VerifyOptions(pairs=SUBSET[:1]))
    with pytest.raises(SourceError, match="is not a causal reranker"):
        verify(good, [good], VerifyOptions(pairs=SUBSET[:1]))
    with pytest.raises(QconvError, match="--variant applies to ONNX exports"):
        verify(src, [good], VerifyOptions(pairs=SUBSET[:1], variants=("q4",)))
    with pytest.raises(QconvError, match="leaves no room"):
        verify(src, [good], VerifyOptions(pairs=SUBSET[:1], max_length=20))


# --- through the CLI -----------------------------------------------------------------------------

def test_cli_full_probe_set_json_and_exit_codes(tiny_models, candidates):
    runner = CliRunner()
    src, good, bad = str(tiny_models["tied_fp32"]), str(candidates["tied_fp32/converted"]), str(candidates["noisy_head"])
    r = runner.invoke(app, ["verify", src, good, bad, "--json", "--quiet"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["passed"] is False
    assert report["pairs"] == {"source": "builtin", "count": len(PROBE_PAIRS), "queries": 11, "truncated": 0}
    assert report["padding_sides"] == ["left", "right"] and report["ndcg"] == {"k": 10, "gains": "labels"}
    assert report["batch_order"] == "length" and report["batch_size"] == 8
    assert report["tolerances"]["fp32"]["max_abs_logit"] == 1e-4 and report["tolerances"]["q4f16"]["min_retention"] == 0.97
    assert {"torch", "transformers", "qconv", "numpy"} <= set(report["versions"])
    assert report["reference"]["padding_invariant"] is True
    ok, broken = report["candidates"]
    for c in (ok, broken):
        assert {"path", "name", "kind", "precision", "passed", "gate", "max_abs_logit", "max_abs_prob", "worst",
                "per_side", "ranking", "ndcg_reference", "ndcg", "retention", "failures"} <= set(c)
    assert ok["passed"] and ok["max_abs_logit"] < 1e-5 and ok["ranking"]["identical"] == 11
    assert not broken["passed"] and broken["max_abs_logit"] > 1e-2
    assert broken["failures"][0]["check"] == "max_abs_logit" and broken["failures"][0]["tolerance"] == 1e-4
    assert 0 < report["reference"]["ndcg"] <= 1 and ok["retention"] == pytest.approx(1.0)

    assert report["padding_check"] == "probe" and report["padding_rows"] == {"left": len(PROBE_PAIRS), "right": 2}
    assert ok["per_side"]["right"]["pairs"] == 2 and ok["per_side"]["left"]["pairs"] == len(PROBE_PAIRS)

    r = runner.invoke(app, ["verify", src, good, "--quiet"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.stdout and "NDCG" in r.stdout and r.stdout.rstrip().endswith("PASSED")
    assert "left + right (probe: 2 pairs)" in r.stdout

    r = runner.invoke(app, ["verify", src, good, "--quiet", "--json", "--no-cache", "--padding-check", "full"])
    assert r.exit_code == 0, r.output
    full = json.loads(r.stdout)
    assert full["padding_check"] == "full" and full["padding_rows"] == {"left": len(PROBE_PAIRS), "right": len(PROBE_PAIRS)}
    assert full["candidates"][0]["per_side"]["right"]["pairs"] == len(PROBE_PAIRS)
    r = runner.invoke(app, ["verify", src, good, "--padding-check", "half"])
    assert r.exit_code == 2 and "half" in r.output  # typer refuses values outside the enum


def test_cli_errors_are_one_line(tiny_models, candidates, tmp_path):
    runner = CliRunner()
    src, good = str(tiny_models["tied_fp32"]), str(candidates["tied_fp32/converted"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q", "document": "d"}\n{"query": "q", "document": 5}\n')
    r = runner.invoke(app, ["verify", src, good, "--pairs", str(pairs), "--quiet"])
    assert r.exit_code == 1
    assert r.stderr.strip() == f'error: {pairs}, line 2: "document" must be a string, got int ' \
        '(each line must be a JSON object like {"query": "...", "document": "...", "label": 1})'
    assert r.stdout == ""
    r = runner.invoke(app, ["verify", src, str(tmp_path / "nope"), "--quiet"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = runner.invoke(app, ["verify", good, good, "--quiet"])
    assert r.exit_code == 1 and "not a causal reranker" in r.stderr and "Traceback" not in r.output


def test_cli_pairs_file_and_tolerance(tiny_models, candidates, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": p.query, "document": p.document}, ensure_ascii=False) + "\n" for p in SUBSET),
                     encoding="utf-8")
    args = ["verify", str(tiny_models["tied_fp32"]), str(candidates["bf16_head"]), "--pairs", str(pairs), "--json", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["pairs"]["source"] == str(pairs) and report["ndcg"]["gains"] == "reference"  # no labels in the file
    r = CliRunner().invoke(app, args + ["--tol-logit", "1e-2", "--batch-size", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tolerances"]["fp32"]["max_abs_logit"] == 1e-2



def test_cli_real_onnx_export_with_variant(tiny_models, candidates, tmp_path):
    """A real export through onnxruntime next to a seq-cls candidate; --variant picks the graphs."""
    from qwen_convert.onnx.export import ExportOptions, export_onnx

    src = tiny_models["untied_fp32"]
    out = export_onnx(src, tmp_path / "onnx", ExportOptions(modes=("fp16", "int8"), verify=False)).out
    args = ["verify", str(src), str(out), str(candidates["untied_fp32/converted"]), "--variant", "fp32", "--variant", "fp16",
            "--pairs", str(_write_pairs(tmp_path / "p.jsonl", SHORT)), "--json", "--quiet"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # --quiet: not even transformers' own "Loading weights" bar
    data = json.loads(r.stdout)
    # Each variant's with-past graph (onnx/prefix/) is a candidate of its own, under the variant's gate.
    assert [(c["name"], c["precision"]) for c in data["candidates"]] == [
        ("onnx/fp32", "fp32"), ("onnx/fp32+prefix", "fp32"), ("onnx/fp16", "fp16"), ("onnx/fp16+prefix", "fp16"), ("seqcls", "fp32")]
    fp32, fp32_prefix, fp16, fp16_prefix, seqcls = data["candidates"]
    assert fp32["max_abs_logit"] < 1e-5 and seqcls["max_abs_logit"] < 1e-5 and fp32_prefix["max_abs_logit"] < 1e-5
    assert 1e-6 < fp16["max_abs_logit"] < 2e-2 and fp16["gate"]["max_abs_logit"] == 2e-2
    assert 1e-6 < fp16_prefix["max_abs_logit"] < 2e-2 and fp16_prefix["passed"]
    assert "onnxruntime" in data["versions"] and data["ndcg"]["gains"] == "labels"


def _write_pairs(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"query": p.query, "document": p.document, "label": p.label}, ensure_ascii=False) + "\n"
                            for p in pairs), encoding="utf-8")
    return path
