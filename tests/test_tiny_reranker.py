"""qconv:tiny-reranker: the trained tiny model shipped in the package ranks well, and its training is
reproducible bit for bit.

NDCG is computed here from scratch (not through qwen_convert.scoring.metrics) so the gate does not depend on
the code it helps to check.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_convert.formats import ArtifactKind
from qwen_convert.hub.resolve import resolve_model
from qwen_convert.reranker import Pair
from qwen_convert.scoring.batches import prompt_encoder
from qwen_convert.scoring.metrics import mean_ndcg
from qwen_convert.scoring.registry import load_scorers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_tiny_reranker.py"

# query -> (the document that must rank first, distractors). Plain English, not from eval.jsonl.
EXAMPLES = {
    "how to cook rice": ("boil rice in water for twenty minutes",
                         ["the football match ended in a draw", "heavy rain is expected in the evening"]),
    "will it rain tomorrow": ("the forecast says rain and strong wind tomorrow",
                              ["my cat sleeps on the chair all day", "install the software on your laptop"]),
    "computer will not start": ("restart your laptop and check the power cable",
                                ["the tennis player won the final", "bake the bread for an hour"]),
    "cheap flights to paris": ("book a cheap flight to paris in the morning",
                               ["the soup needs more salt", "the doctor gave me medicine for the fever"]),
    "best guitar songs": ("learn to play this song on the guitar",
                          ["the doctor prescribed pills for the pain", "snow is falling on the mountain"]),
}


@pytest.fixture(scope="module")
def tiny():
    resolved = resolve_model("qconv:tiny-reranker")
    assert resolved.source == "builtin"
    (scorer,) = load_scorers(resolved.path)
    return resolved.path, scorer, prompt_encoder(resolved.path, None, 512)


def _scores(tiny, pairs: list[Pair]) -> np.ndarray:
    _path, scorer, encoder = tiny
    return np.concatenate([scorer.score(encoder.encode(pairs[i : i + 64])) for i in range(0, len(pairs), 64)])


def test_builtin_is_a_small_trained_qwen3_causal_reranker(tiny):
    path, scorer, encoder = tiny
    assert path.name == "tiny-reranker" and path.parent.name == "data"
    assert scorer.kind == ArtifactKind.CAUSAL and scorer.precision == "fp32"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["pad_token_id"] == encoder.tokens.pad_id
    # Quantization-friendly: every matmul input dimension splits into 4-bit blocks of 32.
    for key in ("hidden_size", "intermediate_size", "head_dim"):
        assert config[key] % 32 == 0, key
    assert sum(f.stat().st_size for f in path.iterdir()) < 4.5e6
    for f in ("tokenizer.json", "tokenizer_config.json", "README.md", "eval.jsonl", "model.safetensors"):
        assert (path / f).is_file(), f


def test_ndcg_on_held_out_eval_set(tiny):
    path = tiny[0]
    rows = [json.loads(line) for line in (path / "eval.jsonl").read_text().splitlines()]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["query"], []).append(i)
    assert len(groups) >= 40 and all(len(ix) >= 5 for ix in groups.values())
    assert {r["label"] for r in rows} == {0, 1, 2}
    scores = _scores(tiny, [Pair(r["query"], r["document"]) for r in rows])
    ndcg = mean_ndcg(list(groups.values()), scores, np.array([r["label"] for r in rows]))
    assert ndcg >= 0.9, ndcg
    # Margins, not just order: relevant documents get P(yes) > 0.5, unrelated ones < 0.5 on average.
    labels = np.array([r["label"] for r in rows])
    assert scores[labels == 2].mean() > 0 > scores[labels == 0].mean()


def test_plain_english_examples_rank_the_relevant_document_first(tiny):
    for query, (best, others) in EXAMPLES.items():
        docs = [*others, best]  # the relevant one last, so a constant score would fail
        scores = _scores(tiny, [Pair(query, d) for d in docs])
        assert int(np.argmax(scores)) == len(docs) - 1, (query, dict(zip(docs, scores.round(2))))


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_reranker", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_eval_set_is_regenerated_by_the_training_script(tiny):
    script = _load_script()
    cfg = script.TrainConfig()
    assert cfg.eval_seed != cfg.seed
    rows = [json.loads(line) for line in (tiny[0] / "eval.jsonl").read_text().splitlines()]
    assert rows == script.eval_rows(cfg.eval_seed, cfg.eval_queries)


def test_training_is_bit_for_bit_deterministic():
    import torch

    script = _load_script()
    cfg = script.TrainConfig(steps=4, batch_size=4, warmup=2, num_hidden_layers=1, log_every=10**9)
    first, second = (script.train(cfg).state_dict() for _ in range(2))
    other = script.train(script.TrainConfig(**{**cfg.__dict__, "seed": cfg.seed + 1})).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the check can fail at all
