"""The (query, document) pairs that `verify` and `score` run: a built-in probe set, or a JSONL file.

The built-in set mixes English and Chinese (and one cross-lingual query), short and long documents,
and several documents per query, each with a relevance label assigned by hand:
3 = answers the query, 2 = mostly answers it, 1 = on topic but does not answer, 0 = unrelated.
The long documents (a few hundred tokens) make a small `--max-length` truncate the body.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_convert.errors import InputFileError
from qwen_convert.reranker import Pair


@dataclass(frozen=True)
class LabeledPair(Pair):
    label: float | None = None  # graded relevance (higher = more relevant); None = unlabeled


def group_by_query(pairs: Iterable[Pair]) -> dict[str, list[int]]:
    """query -> indices of its pairs, queries in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.query, []).append(i)
    return groups


def _q(query: str, *docs: tuple[int, str]) -> list[LabeledPair]:
    return [LabeledPair(query, doc, float(label)) for label, doc in docs]


_VACCINE_LONG = (
    "Vaccines work by training the immune system to recognise a pathogen before a real infection happens. "
    "A vaccine contains an antigen: a weakened or inactivated virus, a piece of it such as a surface protein, "
    "or genetic instructions (mRNA) that let the body's own cells make that protein for a short time. "
    "Antigen-presenting cells take up the antigen and show fragments of it to helper T cells in the lymph nodes. "
    "The helper T cells activate B cells that recognise the same antigen; those B cells multiply and mature into "
    "plasma cells that release antibodies, which bind the pathogen and mark it for destruction. Cytotoxic T cells "
    "learn to kill infected cells. Crucially, some of the activated B and T cells remain as long-lived memory cells. "
    "When the real pathogen arrives later, the memory cells recognise it within hours instead of days, so the "
    "immune response is fast and strong enough to stop the infection or keep it mild. Booster doses remind the "
    "immune system and raise antibody levels again, and adjuvants are added to some vaccines to provoke a "
    "stronger initial response. Because vaccinated people are less likely to spread the disease, high coverage "
    "also protects people who cannot be vaccinated, an effect known as herd immunity."
)

_SORTING_LONG = (
    "Sorting algorithms arrange the elements of a collection in order. Bubble sort repeatedly swaps adjacent "
    "elements that are out of order and needs O(n^2) comparisons. Insertion sort builds the sorted prefix one "
    "element at a time and is fast on nearly sorted data. Merge sort splits the input in halves, sorts each half "
    "recursively and merges them, guaranteeing O(n log n) time at the cost of extra memory. Quicksort partitions "
    "around a pivot and is usually the fastest in practice, although its worst case is quadratic. Heapsort uses a "
    "binary heap and sorts in place in O(n log n). Many language runtimes use hybrids: Python's built-in sort is "
    "Timsort, a stable merge sort that detects runs already in order, which is why sorting a list that is almost "
    "sorted is very cheap. Stability means that elements that compare equal keep their original relative order, "
    "which matters when sorting records by several keys one after another."
)

_APOLLO_LONG = (
    "Apollo 11 was the American spaceflight that first landed humans on the Moon. Commander Neil Armstrong and "
    "lunar module pilot Buzz Aldrin landed the lunar module Eagle in the Sea of Tranquility on July 20, 1969, at "
    "20:17 UTC, while Michael Collins stayed in lunar orbit aboard the command module Columbia. Armstrong became "
    "the first person to step onto the lunar surface six and a half hours later, on July 21 at 02:56 UTC, "
    "followed by Aldrin about twenty minutes later. The two men spent about two and a quarter hours outside the "
    "spacecraft, collected 21.5 kilograms of lunar material, deployed scientific instruments including a "
    "seismometer and a laser retroreflector, and planted a United States flag. After 21.5 hours on the surface "
    "they lifted off, rejoined Columbia, and returned to Earth, splashing down in the Pacific Ocean on July 24, 1969. "
    "The mission fulfilled the national goal set by President John F. Kennedy in 1961 of landing a man on the "
    "Moon and returning him safely to Earth before the end of the decade."
)

_PHOTOSYNTHESIS_LONG = (
    "光合作用是绿色植物、藻类和某些细菌利用光能，把二氧化碳和水转化为有机物（主要是葡萄糖），并释放氧气的过程。"
    "它主要在叶绿体中进行，分为两个阶段：光反应和暗反应（卡尔文循环）。在光反应阶段，叶绿素吸收光能，"
    "水分子被分解，产生氧气，同时生成ATP和NADPH。在暗反应阶段，植物利用光反应产生的ATP和NADPH，"
    "通过卡尔文循环把二氧化碳固定下来，最终合成糖类。光合作用的总反应式可以概括为：二氧化碳加水在光照和"
    "叶绿体的作用下生成有机物和氧气。光合作用为地球上几乎所有生物提供了能量来源，也维持了大气中氧气和"
    "二氧化碳含量的相对稳定，是地球生命系统最重要的化学反应之一。影响光合作用强度的因素包括光照强度、"
    "二氧化碳浓度、温度以及水分等。"
)

_COLD_LONG = (
    "普通感冒大多由病毒引起，通常一周左右可以自愈，抗生素对病毒无效，不需要使用。感冒后应注意多休息，"
    "保证充足睡眠；多喝温水，保持室内空气流通；饮食宜清淡，多吃蔬菜水果。如果鼻塞、咽痛或发热让人难受，"
    "可以在医生或药师指导下使用对症的非处方药，例如退烧止痛药或缓解鼻塞的药物，注意不要同时服用成分相同的"
    "复方感冒药，以免过量。出现以下情况应及时就医：高烧超过三天不退、呼吸困难、胸痛、症状持续超过十天，"
    "或者婴幼儿、老人、孕妇及有慢性病的人出现明显不适。勤洗手、咳嗽时遮住口鼻，可以减少传染给家人和同事。"
)

PROBE_PAIRS: tuple[LabeledPair, ...] = tuple(
    _q(
        "What is the capital of France?",
        (3, "Paris is the capital and most populous city of France."),
        (0, "Berlin is the capital and largest city of Germany."),
        (1, "Lyon, the third-largest city in France, is known for its cuisine and its Roman ruins."),
        (1, "The Eiffel Tower was built for the 1889 World's Fair and is the most visited monument in Paris."),
    )
    + _q(
        "how do vaccines work",
        (3, _VACCINE_LONG),
        (3, "Vaccines teach the immune system to recognise a germ without causing the disease, so the body can fight it off quickly later."),
        (1, "Edward Jenner tested the first smallpox vaccine in 1796 using material from cowpox sores."),
        (0, "Boil the pasta in plenty of salted water and drain it one minute before it is fully cooked."),
    )
    + _q(
        "python sort list descending",
        (3, "Use sorted(items, reverse=True) to get a new list, or items.sort(reverse=True) to sort the list in place from largest to smallest."),
        (1, _SORTING_LONG),
        (1, "Python lists support append, extend, insert, pop and remove."),
        (0, "Pythons are large non-venomous snakes found in Africa, Asia and Australia."),
    )
    + _q(
        "when did Apollo 11 land on the moon",
        (3, _APOLLO_LONG),
        (3, "The Apollo 11 lunar module landed on the Moon on July 20, 1969."),
        (1, "Apollo 13 suffered an oxygen tank explosion in 1970 and had to abort its Moon landing."),
        (0, "The tides are caused mainly by the gravitational pull of the Moon on the oceans."),
    )
    + _q(
        "symptoms of dehydration",
        (3, "Signs of dehydration include thirst, dark yellow urine, dry mouth, tiredness, dizziness and headache."),
        (2, "Drink more water in hot weather and during exercise to replace the fluid you lose through sweat."),
        (0, "Dehydrated vegetables keep for months when stored in an airtight jar."),
    )
    + _q(
        "best way to store fresh basil",
        (3, "Trim the stems and keep basil in a glass of water at room temperature, loosely covered with a bag; the fridge turns the leaves black."),
        (1, "Basil is a culinary herb of the mint family, used widely in Italian and Thai cooking."),
        (0, "Store important documents in a fireproof safe."),
    )
    + _q(
        "北京是哪个国家的首都？",
        (3, "北京是中华人民共和国的首都，也是全国的政治和文化中心。"),
        (1, "上海是中国最大的经济中心城市，位于长江入海口。"),
        (0, "巴黎是法国的首都。"),
        (1, "长城是中国古代的军事防御工程，北京附近的八达岭长城最为著名。"),
    )
    + _q(
        "光合作用是什么？",
        (3, _PHOTOSYNTHESIS_LONG),
        (3, "光合作用是植物利用光能把二氧化碳和水合成有机物并释放氧气的过程。"),
        (1, "叶绿素使植物的叶子呈现绿色。"),
        (0, "今天的股票市场整体上涨，科技板块领涨。"),
    )
    + _q(
        "感冒了应该怎么办",
        (3, _COLD_LONG),
        (2, "感冒时多喝水、多休息，一般一周左右就会好转。"),
        (0, "这款手机的电池容量为五千毫安时，支持快速充电。"),
    )
    + _q(
        "如何煮米饭",
        (3, "把米淘洗干净，按米和水一比一点二的比例加水，浸泡二十分钟后放进电饭锅煮熟，再焖十分钟。"),
        (1, "大米是中国南方的主食，常见的品种有粳米和籼米。"),
        (0, "跑步前要充分热身，避免拉伤肌肉。"),
    )
    + _q(
        "How long is the Great Wall of China?",
        (3, "根据2012年国家文物局公布的测量结果，明长城及历代长城的总长度为21196.18千米。"),
        (3, "The Great Wall of China, counting all its branches built over the centuries, is about 21,196 km long."),
        (1, "The Great Wall was built to protect Chinese states from raids by nomadic groups from the north."),
        (0, "The Great Barrier Reef is the world's largest coral reef system, off the coast of Australia."),
    )
)


def _bad(path: Path, line_no: int, what: str) -> InputFileError:
    return InputFileError(
        f"{path}, line {line_no}: {what}",
        'each line must be a JSON object like {"query": "...", "document": "...", "label": 1}',
    )


def _parse_line(path: Path, line_no: int, text: str) -> LabeledPair:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(path, line_no, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _bad(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("query", "document"):
        if key not in obj:
            raise _bad(path, line_no, f'missing key "{key}"')
        if not isinstance(obj[key], str):
            raise _bad(path, line_no, f'"{key}" must be a string, got {type(obj[key]).__name__}')
    if not obj["query"].strip():
        raise _bad(path, line_no, '"query" is empty')
    label = obj.get("label")
    if label is not None:
        # bool is an int subclass: {"label": true} is almost certainly a mistake worth naming.
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            raise _bad(path, line_no, f'"label" must be a finite number, got {label!r}')
        label = float(label)
    return LabeledPair(obj["query"], obj["document"], label)


def load_pairs(path: Path | str) -> list[LabeledPair]:
    """Read a JSONL pairs file. Blank lines are skipped; any other bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"pairs file {path} does not exist or is not a file", "pass a JSONL file with one pair per line")
    pairs: list[LabeledPair] = []
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                raise _bad(path, line_no, "not valid UTF-8") from None
            if text.strip():
                pairs.append(_parse_line(path, line_no, text))
    if not pairs:
        raise InputFileError(f"pairs file {path} is empty", 'add one {"query": ..., "document": ...} object per line')
    return pairs


def resolve_pairs(pairs_file: Path | str | None) -> tuple[list[LabeledPair], str]:
    """The pairs to run and where they came from ("builtin" or the file's path)."""
    if pairs_file is None:
        return list(PROBE_PAIRS), "builtin"
    return load_pairs(pairs_file), str(pairs_file)


def has_labels(pairs: Sequence[LabeledPair]) -> bool:
    return bool(pairs) and all(getattr(p, "label", None) is not None for p in pairs)
