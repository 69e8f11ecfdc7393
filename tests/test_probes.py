"""The built-in probe set, the pairs-file reader and the ranking metrics."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qwen_convert.errors import InputFileError
from qwen_convert.fixtures import tokenizer_path
from qwen_convert.reranker import Pair, PromptEncoder, format_prompt, load_tokenizer
from qwen_convert.scoring.metrics import kendall_tau, mean_ndcg, ndcg_at_k, sigmoid
from qwen_convert.scoring.probes import PROBE_PAIRS, LabeledPair, group_by_query, has_labels, load_pairs

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_probe_set_covers_languages_lengths_and_grades():
    assert len(PROBE_PAIRS) >= 32
    assert has_labels(PROBE_PAIRS)
    groups = group_by_query(PROBE_PAIRS)
    assert len(groups) >= 8
    chinese_queries = [q for q in groups if CJK.search(q)]
    assert len(chinese_queries) >= 3 and len(groups) - len(chinese_queries) >= 3
    assert any(CJK.search(p.document) and not CJK.search(p.query) for p in PROBE_PAIRS)  # cross-lingual
    for query, idx in groups.items():
        labels = [PROBE_PAIRS[i].label for i in idx]
        assert len(idx) >= 3, query
        assert max(labels) == 3 and min(labels) == 0, query  # each query has an answer and a distractor
    assert {p.label for p in PROBE_PAIRS} == {0.0, 1.0, 2.0, 3.0}
    assert len({(p.query, p.document) for p in PROBE_PAIRS}) == len(PROBE_PAIRS)

    encoder = PromptEncoder(load_tokenizer(tokenizer_path()))
    lengths = [len(encoder.ids(p)) for p in PROBE_PAIRS]
    assert min(lengths) < 120 and sum(n > 400 for n in lengths) >= 4, lengths  # short ones, and long ones to cut
    assert sum(n > 128 for n in lengths) >= 8


def test_encoder_matches_tokenizing_the_whole_prompt():
    """Prefix, body and suffix tokenized apart give the same ids as the full template string."""
    tok = load_tokenizer(tokenizer_path())
    encoder = PromptEncoder(tok)
    for p in PROBE_PAIRS:
        assert encoder.ids(p) == tok.encode(format_prompt(p.query, p.document), add_special_tokens=False)


def test_labeled_pair_is_a_pair():
    p = LabeledPair("q", "d", 2.0)
    assert isinstance(p, Pair) and (p.query, p.document, p.label) == ("q", "d", 2.0)
    assert LabeledPair("q", "d").label is None


def test_load_pairs_reads_jsonl(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        '\ufeff{"query": "q1", "document": "a", "label": 1}\n\n'
        '{"query": "q1", "document": "b"}\n'
        '{"query": "问题", "document": "文档", "label": 0.5, "extra": true}\n',
        encoding="utf-8",
    )
    pairs = load_pairs(f)
    assert pairs == [LabeledPair("q1", "a", 1.0), LabeledPair("q1", "b", None), LabeledPair("问题", "文档", 0.5)]
    assert not has_labels(pairs)
    assert group_by_query(pairs) == {"q1": [0, 1], "问题": [2]}


@pytest.mark.parametrize(
    ("lines", "bad_line", "what"),
    [
        (['{"query": "q", "document": "d"}', '{"query": "q", "document": '], 2, "not valid JSON"),
        (['{"query": "q", "document": "d"}', "", '{"query": "q"}'], 3, 'missing key "document"'),
        (['{"query": 3, "document": "d"}'], 1, '"query" must be a string, got int'),
        (['{"query": "q", "document": ["d"]}'], 1, '"document" must be a string, got list'),
        (['{"query": "q", "document": "d", "label": "high"}'], 1, '"label" must be a finite number'),
        (['{"query": "q", "document": "d", "label": true}'], 1, '"label" must be a finite number'),
        (['["q", "d"]'], 1, "expected a JSON object, got list"),
        (['{"query": "  ", "document": "d"}'], 1, '"query" is empty'),
    ],
)
def test_bad_pairs_file_names_the_line(tmp_path, lines, bad_line, what):
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputFileError) as info:
        load_pairs(f)
    message = str(info.value)
    assert f"line {bad_line}: " in message and what in message
    assert "\n" not in message


def test_empty_missing_and_binary_pairs_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(InputFileError, match="is empty"):
        load_pairs(empty)
    with pytest.raises(InputFileError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"query": "q", "document": "d"}\n\xff\xfe\n')
    with pytest.raises(InputFileError, match="line 2: not valid UTF-8"):
        load_pairs(binary)


def test_ndcg_by_hand():
    gains = [3, 0, 1]
    assert ndcg_at_k([0.9, 0.1, 0.5], gains) == pytest.approx(1.0)
    # ranking b, c, a: DCG = 0/1 + 1/log2(3) + 7/log2(4); ideal = 7 + 1/log2(3)
    expected = (1 / np.log2(3) + 7 / 2) / (7 + 1 / np.log2(3))
    assert ndcg_at_k([0.1, 0.9, 0.5], gains) == pytest.approx(expected)
    assert ndcg_at_k([1, 2, 3], [0, 0, 0]) is None
    assert ndcg_at_k([3, 2, 1], [1, 1, 1], k=2) == pytest.approx(1.0)
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8])
    assert mean_ndcg([[0, 1, 2], [3, 4]], scores, np.array([3, 0, 1, 0, 0])) == pytest.approx(1.0)


def test_kendall_tau_and_sigmoid():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    assert kendall_tau([1.0], [5.0]) == 1.0
    assert sigmoid(np.array([0.0, 800.0, -800.0])).tolist() == [0.5, 1.0, 0.0]
