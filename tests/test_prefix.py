"""Prefix-shared scoring (onnx/prefix.py writes the with-past graph, scoring/prefix.py runs it).

Scores through a shared prefix are held against two independent references: the export's own
full-prompt graph run on padded batches (both padding sides), and transformers' causal model in
fp32, one unpadded prompt at a time. Each parity test also asserts that the prefix path really
ran (shared_pairs), so a silent fallback to full prompts cannot pass it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from qwen_convert.errors import QconvError
from qwen_convert.onnx.export import ExportOptions, export_onnx
from qwen_convert.reranker import Pair, PromptEncoder, load_tokenizer, pad_rows
from qwen_convert.scoring.prefix import SUFFIX_PADDED_RATIO, KVCache, PrefixScorer, common_length, plan_sharing, score_rows
from qwen_convert.scoring.score import ScoreOptions, score_documents

QUERY = "what does a cat eat"
DOCS = [
    "cats are obligate carnivores and eat mostly meat",
    "the stock market closed higher today",
    "a cat " * 40,  # long: the short ones are heavily padded next to it in a full-prompt batch
    "fish",
    "Kittens need more protein than adult cats; wet food helps them drink enough water.",
]
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def export(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prefix") / "onnx"
    export_onnx(tiny_models["tied_fp32"], out, ExportOptions(modes=("int8",), verify=False))
    return out


def _full_graph(export: Path, mode_file: str, pairs: list[Pair], side: str) -> np.ndarray:
    """The export's single-input graph over one padded batch of full prompts."""
    import onnxruntime as ort

    enc = PromptEncoder(load_tokenizer(export), max_length=MAX_LENGTH)
    batch = pad_rows([enc.ids(p) for p in pairs], enc.tokens.pad_id, side)
    session = ort.InferenceSession(str(export / "onnx" / mode_file), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})[0][:, 0].astype(np.float64)


def _torch(src: Path, pairs: list[Pair]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    enc = PromptEncoder(load_tokenizer(src), max_length=MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            logits = model(input_ids=torch.tensor([enc.ids(pair)])).logits[0, -1]
            out.append(float(logits[enc.tokens.yes_id] - logits[enc.tokens.no_id]))
    return np.array(out)


def _scored(export: Path, pairs_file: Path | None = None, variant: str = "fp32", share: bool = True, **kw):
    options = ScoreOptions(max_length=MAX_LENGTH, variant=variant, share_prefix=share, **kw)
    if pairs_file is not None:
        result = score_documents(export, pairs_file=pairs_file, options=options)
    else:
        result = score_documents(export, QUERY, DOCS, options=options)
    logits = {(q.query, d.index): d.logit for q in result.queries for d in q.documents}
    return result, logits


def _in_order(logits: dict, pairs: list[Pair]) -> np.ndarray:
    seen: dict[str, int] = {}
    out = []
    for p in pairs:
        j = seen.get(p.query, 0)
        seen[p.query] = j + 1
        out.append(logits[(p.query, j)])
    return np.array(out)


def test_export_writes_prefix_graphs_and_leaves_the_plain_graphs_alone(export, tiny_models, tmp_path):
    config = json.loads((export / "quantize_config.json").read_text())
    assert config["prefix"]["files"] == {"fp32": "onnx/prefix/model.onnx", "int8": "onnx/prefix/model_quantized.onnx"}
    graph = onnx.load(str(export / "onnx" / "prefix" / "model_quantized.onnx"))
    layers = json.loads((export / "config.json").read_text())["num_hidden_layers"]
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    assert inputs[:2] == ["input_ids", "attention_mask"] and len(inputs) == 2 + 2 * layers
    assert inputs[2:4] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[0] == "logits" and outputs[1:3] == ["new_key_values.0.key", "new_key_values.0.value"] and len(outputs) == 1 + 2 * layers
    # The past's batch is its own dimension: one prefix cache serves a batch of documents.
    assert graph.graph.input[2].type.tensor_type.shape.dim[0].dim_param == "past_batch"
    # The single-input graphs ORTModel and transformers.js load are byte for byte what they were.
    plain = tmp_path / "plain"
    export_onnx(tiny_models["tied_fp32"], plain, ExportOptions(modes=("int8",), verify=False, prefix_graphs=False))
    assert not (plain / "onnx" / "prefix").exists() and "prefix" not in json.loads((plain / "quantize_config.json").read_text())
    for name in ("model.onnx", "model_quantized.onnx"):
        assert (plain / "onnx" / name).read_bytes() == (export / "onnx" / name).read_bytes()


def test_the_last_layer_runs_only_each_rows_scored_token_past_its_keys_and_values(export):
    """The logit reads one token and the cache needs every token's keys and values only: the last
    layer's q_proj and MLP read the gathered row, its k_proj/v_proj (and every earlier layer) all tokens."""
    graph = onnx.load(str(export / "onnx" / "prefix" / "model_quantized.onnx")).graph
    last = json.loads((export / "config.json").read_text())["num_hidden_layers"] - 1
    producer = {o: n for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}

    def source(linear: str) -> str:
        return producer[nodes[linear].input[0]].name

    assert last >= 1  # an earlier layer to compare with
    for i in (last - 1, last):
        norm = f"model.layers.{i}.input_layernorm"
        assert source(f"model.layers.{i}.self_attn.k_proj") == source(f"model.layers.{i}.self_attn.v_proj") == norm
        assert source(f"model.layers.{i}.self_attn.q_proj") == (norm if i < last else "last.normed")
    assert nodes["last.normed"].op_type == "GatherElements" and nodes["last.normed"].input[0] == nodes[norm].output[0]
    # The MLP's input is the attention of that row: post_attention_layernorm over [batch, 1, hidden].
    post = producer[nodes[f"model.layers.{last}.mlp.gate_proj"].input[0]]
    assert post.name == f"model.layers.{last}.post_attention_layernorm" and producer[post.input[1]].name == "last.residual"


def test_fp32_prefix_scores_equal_full_prompts_and_torch(export, tiny_models):
    pairs = [Pair(QUERY, d) for d in DOCS]
    result, logits = _scored(export)
    assert result.shared_pairs == len(DOCS)
    got = _in_order(logits, pairs)
    for side in ("left", "right"):
        full = _full_graph(export, "model.onnx", pairs, side)
        assert np.abs(got - full).max() <= 1e-5, side
    assert np.abs(got - _torch(tiny_models["tied_fp32"], pairs)).max() <= 1e-4
    # --no-share-prefix runs the full-prompt graph: the same numbers.
    off, off_logits = _scored(export, share=False)
    assert off.shared_pairs == 0
    assert np.abs(_in_order(off_logits, pairs) - got).max() <= 1e-5


def test_int8_prefix_scores_within_int8_gates(export, tiny_models):
    """DynamicQuantizeMatMul scales activations per run, so a prefix run and a padded batch quantize
    differently: held to verify's int8 gate (max |ΔP(yes)| 0.1) against both references."""
    pairs = [Pair(QUERY, d) for d in DOCS]
    result, logits = _scored(export, variant="int8")
    assert result.shared_pairs == len(DOCS) and result.precision == "int8"
    p = 1 / (1 + np.exp(-_in_order(logits, pairs)))
    for ref in (_full_graph(export, "model_quantized.onnx", pairs, "left"), _full_graph(export, "model_quantized.onnx", pairs, "right"),
                _torch(tiny_models["tied_fp32"], pairs)):
        assert np.abs(p - 1 / (1 + np.exp(-ref))).max() <= 0.1


@pytest.mark.parametrize("side", ["left", "right"])
def test_fp16_prefix_scores_equal_fp16_full_prompts(tiny_models, tmp_path_factory, side):
    """The fp16 with-past graph (fp16 activations and cache, the last layer on its gathered row, the
    attention cast to fp32) against the same export's fp16 full-prompt graph."""
    export = tmp_path_factory.getbasetemp() / "prefix-fp16"
    if not (export / "quantize_config.json").exists():
        export_onnx(tiny_models["tied_fp32"], export, ExportOptions(modes=("fp16",), fp32=False, verify=False))
    pairs = [Pair(QUERY, d) for d in DOCS]
    result, logits = _scored(export, variant="fp16", padding_side=side)
    assert result.shared_pairs == len(DOCS) and result.precision == "fp16"
    assert np.abs(_in_order(logits, pairs) - _full_graph(export, "model_fp16.onnx", pairs, side)).max() <= 2e-3


def test_pairs_file_shares_the_template_across_queries_and_the_query_within_one(export, tmp_path):
    rows = [{"query": q, "document": d} for q in ("cats", "what is the tallest mountain on earth") for d in DOCS[:3]]
    rows.append({"query": "alone", "document": "a query with one document is scored with its full prompt"})
    file = tmp_path / "pairs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [Pair(r["query"], r["document"]) for r in rows]
    result, logits = _scored(export, pairs_file=file)
    assert result.shared_pairs == 6
    full = _full_graph(export, "model.onnx", pairs, "left")
    assert np.abs(_in_order(logits, pairs) - full).max() <= 1e-5


def test_truncated_documents_score_like_truncated_full_prompts(export):
    """A document cut at --max-length: the prefix path runs the full path's truncated rows."""
    pairs = [Pair(QUERY, "word " * 400), Pair(QUERY, "cats " * 300), Pair(QUERY, "short")]
    file_logits = {}
    for share in (True, False):
        result = score_documents(export, QUERY, [p.document for p in pairs],
                                 options=ScoreOptions(max_length=120, share_prefix=share, variant="fp32"))
        assert result.shared_pairs == (3 if share else 0)
        file_logits[share] = np.array(sorted((d.index, d.logit) for q in result.queries for d in q.documents))[:, 1]
    assert np.abs(file_logits[True] - file_logits[False]).max() <= 1e-5


def test_a_prompt_that_leaves_documents_no_room_is_a_one_line_error(export):
    with pytest.raises(QconvError) as err:
        score_documents(export, "long query " * 100, ["a", "b"], options=ScoreOptions(max_length=120))
    assert "cut away entirely" in str(err.value) and "--max-length" in err.value.hint
    assert "\n" not in str(err.value)


def test_export_without_prefix_graphs_falls_back_to_full_prompts(export, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(export, old)
    shutil.rmtree(old / "onnx" / "prefix")
    result, logits = _scored(old)
    assert result.shared_pairs == 0
    _, shared = _scored(export)
    assert max(abs(logits[k] - shared[k]) for k in shared) <= 1e-5


def test_rows_with_different_instructions_share_only_what_their_tokens_share(export):
    """Pairs of one query under two instructions (a server request may mix them): the plan shares
    the common tokens only, and every score equals its own full prompt."""
    tok = load_tokenizer(export)
    a, b = PromptEncoder(tok, "Find passages about pets", MAX_LENGTH), PromptEncoder(tok, "Judge the finance relevance", MAX_LENGTH)
    pairs = [Pair(QUERY, d) for d in DOCS[:4]]
    rows = [a.ids(pairs[0]), b.ids(pairs[1]), a.ids(pairs[2]), b.ids(pairs[3])]
    plan = plan_sharing(rows, [[0, 1, 2, 3]])
    n = plan.groups[0][0]
    assert n == common_length(rows) and n < len(a.prefix_ids) + 12  # stops inside the instruction
    prefix = PrefixScorer(export / "onnx" / "prefix" / "model.onnx", "p", "fp32")
    got, _ = score_rows(None, prefix, rows, [[0, 1, 2, 3]], 8, "left", a.tokens.pad_id)
    import onnxruntime as ort

    session = ort.InferenceSession(str(export / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for i, row in enumerate(rows):
        (ref,) = session.run(["logits"], {"input_ids": np.array([row]), "attention_mask": np.ones((1, len(row)), np.int64)})
        assert abs(got[i] - ref[0, 0]) <= 1e-5


def test_plan_sharing_falls_back_where_nothing_is_shared():
    rows = [[1, 2, 3], [9, 8, 7, 6], list(range(40)), list(range(40)) + [5]]
    plan = plan_sharing(rows, [[0, 1], [2, 3]], min_shared=16)
    assert plan.full == (0, 1) and plan.groups == ((39, (2, 3)),) and plan.template == 0
    # Identical rows still keep one token each for their own run (the score is read there).
    assert common_length([[1, 2, 3], [1, 2, 3]]) == 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_documents_run_in_padded_batches_on_one_cache_and_score_like_full_prompts(export, side):
    """Step 3 batches a query's documents on one prefix cache (past batch 1, broadcast): every batch
    padded on `side`, and each score equals its full prompt run alone (no padding anywhere)."""
    import onnxruntime as ort

    enc = PromptEncoder(load_tokenizer(export), max_length=MAX_LENGTH)
    rows = [enc.ids(Pair(QUERY, d)) for d in DOCS]
    n = common_length(rows)
    prefix = PrefixScorer(export / "onnx" / "prefix" / "model.onnx", "p", "fp32")
    cache = prefix.extend(prefix.empty(), rows[0][:n])
    assert {a.shape[0] for a in cache.past.values()} == {1} and {a.shape[2] for a in cache.past.values()} == {n}
    runs = []
    real_logits = prefix._logits
    prefix._logits = lambda ids, mask, past: runs.append(ids.shape) or real_logits(ids, mask, past)
    # padded_ratio 10: the short documents share batches with much longer ones, so pads are everywhere.
    got = prefix.score_suffixes(cache, [r[n:] for r in rows], batch_size=3, padding_side=side, pad_id=enc.tokens.pad_id,
                                padded_ratio=10.0)
    assert max(b for b, _ in runs) > 1 and sum(b for b, _ in runs) == len(rows)  # batched, every row once
    full = ort.InferenceSession(str(export / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for i, row in enumerate(rows):
        (ref,) = full.run(["logits"], {"input_ids": np.array([row]), "attention_mask": np.ones((1, len(row)), np.int64)})
        assert abs(got[i] - ref[0, 0]) <= 1e-5, (side, i)


def test_suffix_batches_end_where_padding_would_pass_the_suffix_ratio():
    """The split attention pays for every pad in fp32 (SUFFIX_PADDED_RATIO): a document joins a
    batch only if the batch, padded to it, stays within 5% of its real tokens; batch_size still caps."""
    runs = []

    def logits(ids, mask, past):
        runs.append(mask[:, 4:].sum(axis=1).tolist())  # each row's own tokens (4: the cache's)
        return np.zeros((ids.shape[0], 1), np.float32)

    prefix = PrefixScorer(Path("unused.onnx"), "p", "fp32", _session=object())
    prefix.batched, prefix._logits = True, logits
    cache = KVCache((1, 2, 3, 4), {})
    lengths = [100, 101, 104, 120, 40, 41, 200, 201, 202, 203]
    prefix.score_suffixes(cache, [[7] * n for n in lengths], batch_size=3)
    assert SUFFIX_PADDED_RATIO == 1.05
    assert runs == [[40, 41], [100, 101, 104], [120], [200, 201, 202], [203]]


def test_sessions_stay_open_across_score_documents_calls(export, monkeypatch):
    """score_documents per query (a library user, the benchmark) opens each graph once, not per call."""
    from qwen_convert.scoring import onnx_scorers

    opened = []
    real = onnx_scorers._open_session
    monkeypatch.setattr(onnx_scorers, "_open_session", lambda s, p, e: opened.append(p.name) or real(s, p, e))
    monkeypatch.setattr(onnx_scorers, "_sessions", type(onnx_scorers._sessions)())
    for _ in range(3):
        assert _scored(export)[0].shared_pairs == len(DOCS)
        _scored(export, share=False)
    assert sorted(opened) == ["model.onnx", "model.onnx"]  # the full-prompt graph and the with-past graph, once each


def test_parallel_batches_run_on_the_workers_and_score_like_full_prompts(export, monkeypatch):
    """`qconv score`'s prefix scorer (parallel): batches of two queries run as single-threaded runs on
    two worker threads at once; every score equals its full prompt through the single-input graph, and
    a failing batch fails the call."""
    import threading

    import onnxruntime as ort

    from qwen_convert.scoring import workers
    from qwen_convert.scoring.onnx_scorers import OnnxScorer
    from qwen_convert.scoring.prefix import load_prefix_scorer

    monkeypatch.setattr(workers, "physical_cores", lambda: 2)
    scorer = OnnxScorer(export / "onnx" / "model.onnx", "onnx/fp32", "fp32")
    prefix = load_prefix_scorer(scorer, parallel=True)
    assert (prefix.workers, prefix.threads) == (2, 1)
    assert load_prefix_scorer(scorer).workers == 1  # verify's: one run at a time
    enc = PromptEncoder(load_tokenizer(export), max_length=MAX_LENGTH)
    rows = [enc.ids(Pair(q, d)) for q in (QUERY, "is the market up") for d in DOCS]
    groups = [list(range(len(DOCS))), list(range(len(DOCS), 2 * len(DOCS)))]
    ran_on, real = set(), prefix._logits
    prefix._logits = lambda *a: ran_on.add(threading.current_thread().name) or real(*a)
    got, plan = score_rows(None, prefix, rows, groups, 2, "left", enc.tokens.pad_id)
    assert plan.shared_rows == len(rows) and ran_on and all(name.startswith("qconv-run") for name in ran_on)
    full = ort.InferenceSession(str(export / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for i, row in enumerate(rows):
        (ref,) = full.run(["logits"], {"input_ids": np.array([row]), "attention_mask": np.ones((1, len(row)), np.int64)})
        assert abs(got[i] - ref[0, 0]) <= 1e-5, i

    def broken(*a):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

    prefix._logits = broken
    with pytest.raises(RuntimeError, match="RUNTIME_EXCEPTION"):
        score_rows(None, prefix, rows, groups, 2, "left", enc.tokens.pad_id)


def test_worker_batches_hold_at_most_worker_batch_documents():
    """With workers, a suffix batch holds at most WORKER_BATCH documents whatever --batch-size allows
    (smaller single-threaded runs measured faster); one run at a time keeps batch_size."""
    from qwen_convert.scoring.prefix import WORKER_BATCH

    def logits(ids, mask, past):
        runs.append(mask[:, 4:].sum(axis=1).tolist())
        return np.zeros((ids.shape[0], 1), np.float32)

    lengths = [100, 101, 102, 103, 104]
    for workers, want in ((2, [[100, 101], [102, 103], [104]]), (1, [lengths])):
        runs = []
        prefix = PrefixScorer(Path("unused.onnx"), "p", "fp32", workers=workers, _session=object())
        prefix.batched, prefix._logits = True, logits
        prefix.score_suffixes(KVCache((1, 2, 3, 4), {}), [[7] * n for n in lengths], batch_size=8)
        assert sorted(runs) == want, workers
    assert WORKER_BATCH == 2


@pytest.mark.parametrize("threads, want", [(2, (2, 1)), (1, (1, 1))])
def test_serve_runs_a_requests_documents_on_workers_too(export, threads, want):
    """`qconv serve --threads N` opens the with-past graph as `qconv score` does: N single-threaded
    runs at once (N > 1); the full-prompt graph keeps N intra-op threads."""
    from qwen_convert.serve.engine import CPU, OnnxEngine, load_prefix
    from qwen_convert.serve.options import ServeOptions

    engine = OnnxEngine(export / "onnx" / "model.onnx", "fp32", [CPU], threads)
    prefix = load_prefix(engine, ServeOptions(threads=threads))
    assert (prefix.workers, prefix.threads) == want
    assert engine.session.get_session_options().intra_op_num_threads == threads
