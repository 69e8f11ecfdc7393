"""Train the tiny Qwen3 reranker shipped as `qconv:tiny-reranker` (qwen_convert/data/tiny-reranker/).

Random weights cannot tell a good quantizer from a bad one: their score gaps are noise. This model
is trained, deterministically, on a synthetic lexical relevance task, so its rankings mean something
and a quantized copy that reorders them is visibly worse.

Task. Words come from a fixed vocabulary: eight topics (food, travel, sports, weather, animals,
computers, health, music), each a list of concepts (groups of synonyms); plus stop words and general
words that never carry relevance. A query names one or two concepts of one topic. A document is
  2 (exact)    if it contains one of the query's words verbatim,
  1 (related)  if it contains only other words listed under the query's topic (its synonyms and
               the topic's other concepts),
  0            otherwise: words of other topics, plus stop/general words (often the query's own,
               so lexical overlap on topic-less words must not count) and random letter strings.

Model. A real Qwen3ForCausalLM (tied embeddings, the package tokenizer, the official template); the
target is the token after the template: P(yes) from the softmax over the yes/no logits. The loss is
binary cross-entropy on logit(yes) - logit(no) with graded soft targets (exact > related > 0), the
same loss on every document token ("relevant so far", a dense version of the label), and a small
full-vocabulary term that keeps "yes"/"no" the most likely next tokens. Two curricula make it learn
in minutes on one core: the template's 60 constant head tokens (system prompt, instruction) grow in
over the first half of training, and distractor words over the first 40%; with either at full
strength from step 0 the query/document comparison sits on a loss plateau for thousands of steps. Every matmul input
dimension is a multiple of 32 so that 4-bit block-32 quantization splits rows evenly.

Determinism: fixed seeds, one thread, torch.use_deterministic_algorithms(True); the same command
gives bit-identical weights on the same torch build. Run once; the output is committed:

    flock /tmp/qconv-heavy.lock .venv/bin/python scripts/train_tiny_reranker.py

Progress and the evaluation table go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "qwen_convert" / "data" / "tiny-reranker"

# Concepts: each tuple is one concept, its first word the canonical form and the rest synonyms.
# A word appears in exactly one place in the whole vocabulary (checked by `_check_vocabulary`).
TOPICS: dict[str, list[tuple[str, ...]]] = {
    "food": [
        ("rice",), ("soup", "broth", "stew"), ("bread", "loaf", "toast"), ("cook", "prepare"),
        ("boil", "simmer"), ("bake", "roast"), ("meal", "dinner", "lunch"), ("pasta", "noodles", "spaghetti"),
        ("chicken", "poultry"), ("vegetables", "veggies"), ("fruit", "berries"), ("recipe", "cookbook"),
        ("salt", "seasoning"), ("cake", "dessert", "pie"), ("eggs", "omelette"), ("coffee", "espresso"),
        ("tea",), ("cheese",), ("kitchen", "stove"),
    ],
    "travel": [
        ("trip", "journey", "voyage"), ("flight", "flights", "airline"), ("hotel", "inn", "motel"),
        ("train", "railway"), ("airport", "terminal"), ("luggage", "baggage", "suitcase"), ("ticket", "tickets", "fare"),
        ("passport", "visa"), ("beach", "coast", "shore"), ("paris",), ("london",), ("map", "directions"),
        ("vacation", "holiday"), ("tourist", "traveler"), ("museum", "gallery"),
    ],
    "sports": [
        ("football", "soccer"), ("match", "game"), ("tennis",), ("team", "squad"), ("coach", "trainer"),
        ("goal", "goals"), ("player", "athlete"), ("basketball",), ("swimming", "swim"), ("race", "marathon"),
        ("stadium", "arena"), ("win", "victory"), ("draw", "tie"), ("league", "championship"), ("referee", "umpire"),
    ],
    "weather": [
        ("rain", "shower", "drizzle"), ("snow", "snowfall"), ("sunny", "sunshine"), ("storm", "thunderstorm", "thunder"),
        ("wind", "windy", "breeze"), ("forecast", "outlook"), ("temperature", "degrees"), ("cold", "chilly", "freezing"),
        ("hot", "heatwave"), ("cloudy", "overcast"), ("tomorrow",), ("umbrella", "raincoat"), ("fog", "mist"),
    ],
    "animals": [
        ("dog", "puppy", "hound"), ("cat", "kitten"), ("bird", "parrot"), ("horse", "pony"), ("fish", "goldfish"),
        ("pet", "pets"), ("vet", "veterinarian"), ("zoo",), ("lion",), ("wolf",), ("rabbit", "bunny"),
        ("cow", "cattle"), ("snake", "serpent"),
    ],
    "computers": [
        ("computer", "laptop", "pc"), ("software", "program", "app"), ("keyboard",), ("password", "passcode"),
        ("internet", "wifi", "online"), ("screen", "monitor", "display"), ("restart", "reboot"), ("email", "mail"),
        ("printer",), ("phone", "smartphone"), ("battery", "charger"), ("install", "setup"), ("virus", "malware"),
        ("update", "upgrade"), ("files", "folder"),
    ],
    "health": [
        ("doctor", "physician"), ("medicine", "medication", "pills"), ("hospital", "clinic"), ("sleep", "insomnia"),
        ("exercise", "workout"), ("pain", "ache"), ("fever", "flu"), ("headache", "migraine"), ("diet", "nutrition"),
        ("sick", "ill"), ("heart",), ("vitamins", "supplements"), ("blood",), ("nurse",),
    ],
    "music": [
        ("song", "songs", "tune"), ("guitar",), ("piano",), ("concert", "gig"), ("band",), ("singer", "vocalist"),
        ("music", "melody"), ("album", "record"), ("drums", "drummer"), ("violin", "fiddle"), ("playlist",),
        ("lyrics",), ("orchestra", "symphony"),
    ],
}

# Never relevant: shared by queries and distractor documents alike.
STOP = (
    "how to the a an is are what for in of and my best can i do does with on why where when which it will "
    "your you this that at from about get some good new after before there was be by or not all more most very "
    "should need help tips easy way"
).split()
GENERAL = (
    "time people day week year minutes hours water house room door window table chair book money price cheap "
    "free open close start end today morning evening night family friends children school work job office street "
    "car bus road river mountain garden tree flowers color red blue green white black small large big old young "
    "long short fast slow hard twenty ten two three five hundred first last next many few power cable light paper "
    "letter story news history art picture photo question answer plan idea place country world number list name "
    "part group side line thing problem reason result level check take make learn play find buy sell read write "
    "walk run sit stand show tell ask use try keep leave bring put set move live feel drink ease eight ended "
    "expected falling final gave heavy hour me near needs our out prescribed rest says scored sleeps starts strong "
    "treat won"
).split()

Q_TEMPLATES = (
    "{a}", "{a} {b}", "how to {a}", "how to {a} {b}", "best {a} for {b}", "what is the best {a}", "{a} and {b}",
    "why does my {a} {b}", "where can i find a {a}", "tips for {a}", "how do i {a} my {b}", "{a} with {b}",
    "is the {a} good", "when is the {a}", "help with {a} and {b}",
)
TARGET_PROB = {2: 0.98, 1: 0.8, 0: 0.02}  # soft BCE targets: exact > related > unrelated, with wide margins


def _check_vocabulary() -> None:
    seen: dict[str, str] = {}
    for where, words in [("stop", STOP), ("general", GENERAL)] + [
        (f"{t}/{c[0]}", c) for t, cs in TOPICS.items() for c in cs
    ]:
        for w in words:
            if w in seen and seen[w] != where:
                raise ValueError(f"word {w!r} in both {seen[w]} and {where}")
            seen[w] = where


@dataclass(frozen=True)
class Concept:
    topic: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class Query:
    text: str
    concepts: tuple[Concept, ...]
    exact: frozenset[str]  # the concept words as written in the query
    synonyms: frozenset[str]  # "related": every other word listed under the query's topic


class TaskSampler:
    """Draws (query, document, label) triples from one seeded random stream."""

    def __init__(self, seed: int):
        _check_vocabulary()
        self.rng = random.Random(seed)
        self.concepts = [Concept(t, c) for t, cs in TOPICS.items() for c in cs]
        self.by_topic = {t: [c for c in self.concepts if c.topic == t] for t in TOPICS}
        # 0..1: how many distractor words documents carry. Training starts clean (the match is the
        # whole document) and ramps up: the comparison circuit forms long before it would in noise.
        self.noise = 1.0

    def query(self) -> Query:
        rng = self.rng
        topic = rng.choice(sorted(TOPICS))
        template = rng.choice(Q_TEMPLATES)
        n = 2 if "{b}" in template else 1
        # The second slot is sometimes a general word: a query word that carries no relevance.
        picks = rng.sample(self.by_topic[topic], n)
        if n == 2 and rng.random() < 0.3:
            picks = picks[:1]
        words = [rng.choice(c.words) for c in picks]
        fill = words + [rng.choice(GENERAL) for _ in range(n - len(words))]
        rng.shuffle(fill)
        text = template.format(a=fill[0], b=fill[1] if n == 2 else "")
        exact = frozenset(words)
        synonyms = frozenset(w for c in self.by_topic[topic] for w in c.words) - exact
        return Query(text.strip(), tuple(picks), exact, synonyms)

    def document(self, q: Query, label: int) -> str:
        rng = self.rng
        banned = q.exact | q.synonyms
        content: list[str] = []
        if label == 2:
            content.append(rng.choice(sorted(q.exact)))
            if rng.random() < 0.3 and q.synonyms:
                content.append(rng.choice(sorted(q.synonyms)))
        elif label == 1:
            content += rng.sample(sorted(q.synonyms), rng.randint(1, 2))
        # Context words: the query's own topic (hard negatives when label 0) or another topic. Relevant
        # documents stay on topic more often, as in real text; the topic is a coarse signal the model
        # picks up first, the exact words the fine one that decides.
        topic = rng.choice(sorted(set(TOPICS) - {q.concepts[0].topic}))
        # One word per concept: a concept named twice in a document is the query's own.
        others = [rng.choice(c.words) for c in self.by_topic[topic] if not banned & set(c.words)]
        most = max(1, round(3 * self.noise))
        content += rng.sample(others, rng.randint(0 if content else 1, most))
        # Topic-less words, including the query's own stop/general words (lexical overlap that must not count).
        q_common = [w for w in q.text.split() if w not in banned]
        common = rng.sample(STOP, rng.randint(0, most)) + rng.sample(GENERAL, rng.randint(0, most))
        if q_common and rng.random() < 0.6 * self.noise:
            common += rng.sample(q_common, min(len(q_common), rng.randint(1, 2)))
        # Unknown words (random letters) so that unseen vocabulary reads as noise, not as a signal.
        if rng.random() < 0.3 * self.noise:
            common += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
                       for _ in range(rng.randint(1, 2))]
        words = content + common
        rng.shuffle(words)
        return " ".join(words)

    def label(self) -> int:
        r = self.rng.random()
        return 2 if r < 0.32 else 1 if r < 0.55 else 0

    def example_with_query(self) -> tuple[Query, str, int]:
        q = self.query()
        label = self.label()
        if label == 1 and not q.synonyms:
            label = 2
        return q, self.document(q, label), label

    def example(self) -> tuple[str, str, int]:
        q, doc, label = self.example_with_query()
        return q.text, doc, label

    def ranking_group(self, docs_per_label: dict[int, int]) -> list[dict]:
        q = self.query()
        rows = []
        for label, n in docs_per_label.items():
            if label == 1 and not q.synonyms:
                continue
            rows += [{"query": q.text, "document": self.document(q, label), "label": label} for _ in range(n)]
        self.rng.shuffle(rows)
        return rows


def eval_rows(seed: int, n_queries: int) -> list[dict]:
    sampler = TaskSampler(seed)
    rows = []
    for _ in range(n_queries):
        rows += sampler.ranking_group({2: 2, 1: 2, 0: 5})
    return rows


# --- model and training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    eval_seed: int = 98765  # the held-out eval.jsonl: a different random stream than training
    steps: int = 3000
    batch_size: int = 32
    lr: float = 6e-3
    warmup: int = 50
    weight_decay: float = 0.0
    template_curriculum: float = 0.5  # fraction of the steps over which the template's constant head grows in
    curriculum: float = 0.4  # fraction of the steps over which distractor words ramp up to their full count
    dense_term: float = 1.0  # weight of the per-token "relevant so far" loss (see _dense_labels)
    vocab_term: float = 0.05  # weight of -log(P(yes)+P(no)) over the full vocabulary
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    eval_queries: int = 60
    log_every: int = 100


@contextlib.contextmanager
def deterministic_torch(seed: int) -> Iterator[None]:
    """Fixed seed, one thread, deterministic kernels; restores the process-wide settings afterwards."""
    import torch

    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import Qwen3ForCausalLM

    from qwen_convert.fixtures import TinySpec, tiny_config

    spec = TinySpec(
        tied=True, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, seed=cfg.seed,
    )
    config = tiny_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    config.pad_token_id = tokenizer.pad_token_id
    return Qwen3ForCausalLM(config)


def word_strength(q: Query, word: str) -> int:
    return 2 if word in q.exact else 1 if word in q.synonyms else 0


@dataclass
class Batch:
    input_ids: object  # [B, T] right-padded
    attention_mask: object  # [B, T]
    last_index: object  # [B]
    target: object  # [B] soft target of the last token
    dense_target: object  # [B, T] relevance of the document read so far, from its first word on
    dense_weight: object  # [B, T] 1 where dense_target applies


def _dense_labels(encoder, q: Query, doc: str, length: int) -> tuple[list[float], list[float]]:
    """Per-token 'relevance so far' over the document and the suffix: a dense version of the label.

    A word counts from its last token on; the suffix tokens carry the whole document's label. This
    makes the match-detection circuit learnable in minutes instead of after a long plateau.
    """
    from qwen_convert.reranker import format_body

    body = format_body(q.text, doc, encoder.instruction)
    enc = encoder.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
    start = len(body) - len(doc)
    ends, pos = {}, start
    for w in doc.split(" "):
        pos += len(w)
        ends[pos] = word_strength(q, w)
        pos += 1
    base = len(encoder.prefix_ids)
    target, weight = [0.0] * length, [0.0] * length
    best = 0
    for i, (_s, e) in enumerate(enc["offset_mapping"]):
        if e <= start:
            continue
        best = max(best, ends.get(e, 0))
        target[base + i], weight[base + i] = TARGET_PROB[best], 1.0
    for i in range(base + len(enc["input_ids"]), length):
        target[i], weight[i] = TARGET_PROB[best], 1.0
    return target, weight


def _batches(cfg: TrainConfig, encoder) -> Iterator[Batch]:
    import numpy as np
    import torch

    from qwen_convert.reranker import Pair

    sampler = TaskSampler(cfg.seed)
    a, b = encoder.ids(Pair("a", "x")), encoder.ids(Pair("z", "x"))
    constant = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # template tokens before the query
    for step in itertools.count():
        sampler.noise = min(1.0, step / max(1, cfg.curriculum * cfg.steps))
        # The first steps see the template with its constant head (system prompt, instruction) cut
        # off, then a longer and longer part of it. With all 60 constant tokens from step 0 the
        # query/document comparison drowns in them and sits on a plateau for thousands of steps.
        shown = min(1.0, step / max(1, cfg.template_curriculum * cfg.steps))
        drop = constant - round(shown * constant)
        examples = [sampler.example_with_query() for _ in range(cfg.batch_size)]
        batch = encoder.encode([Pair(q.text, d) for q, d, _ in examples], padding_side="right")
        dense_t = np.zeros(batch.input_ids.shape, np.float32)
        dense_w = np.zeros(batch.input_ids.shape, np.float32)
        for row, (q, d, lab) in enumerate(examples):
            n = int(batch.attention_mask[row].sum())
            t, w = _dense_labels(encoder, q, d, n)
            if t[n - 1] != TARGET_PROB[lab]:
                raise AssertionError(f"dense labels disagree with the label for {q.text!r} / {d!r}")
            dense_t[row, :n], dense_w[row, :n] = t, w
        last = np.ascontiguousarray(batch.last_index) - drop
        yield Batch(
            torch.from_numpy(batch.input_ids[:, drop:]), torch.from_numpy(batch.attention_mask[:, drop:]),
            torch.from_numpy(last),
            torch.tensor([TARGET_PROB[lab] for _, _, lab in examples], dtype=torch.float32),
            torch.from_numpy(dense_t[:, drop:]), torch.from_numpy(dense_w[:, drop:]),
        )


def _hidden_states(model, input_ids, attention_mask):
    """Last hidden states; the template prefix every row shares is run once and its KV cache repeated.

    Mathematically the same forward pass as running every row in full (causal attention: the shared
    prefix never sees what follows), at about half the cost for these short bodies.
    """
    import torch

    same = (input_ids == input_ids[:1]).all(0)
    shared = int(same.long().cumprod(0).sum()) - 1  # keep at least one token per row after the prefix
    if shared < 1:
        return model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    prefix = model.model(input_ids=input_ids[:1, :shared], use_cache=True)
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    rest = model.model(input_ids=input_ids[:, shared:], attention_mask=attention_mask, past_key_values=cache,
                       use_cache=True).last_hidden_state
    return torch.cat([prefix.last_hidden_state.expand(input_ids.shape[0], -1, -1), rest], 1)


def train(cfg: TrainConfig, log=None, on_checkpoint=None):
    """Train from scratch; returns the model (fp32, eval mode). Deterministic for a given cfg."""
    import torch
    import torch.nn.functional as F

    from qwen_convert.fixtures import tokenizer_path
    from qwen_convert.reranker import PromptEncoder, load_tokenizer

    tok = load_tokenizer(tokenizer_path())
    encoder = PromptEncoder(tok)
    yes, no = encoder.tokens.yes_id, encoder.tokens.no_id
    with deterministic_torch(cfg.seed):
        model = build_model(cfg, tok)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

        def lr_at(step: int) -> float:
            if step < cfg.warmup:
                return (step + 1) / cfg.warmup
            return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        batches = _batches(cfg, encoder)
        start, running = time.time(), 0.0
        for step in range(cfg.steps):
            b = next(batches)
            hidden = _hidden_states(model, b.input_ids, b.attention_mask)
            rows = torch.arange(hidden.shape[0])
            logits = model.lm_head(hidden[rows, b.last_index])
            margin = logits[:, yes] - logits[:, no]
            loss = F.binary_cross_entropy_with_logits(margin, b.target)
            if cfg.dense_term:
                yes_no = model.lm_head.weight[yes] - model.lm_head.weight[no]
                dense = F.binary_cross_entropy_with_logits(hidden @ yes_no, b.dense_target, weight=b.dense_weight,
                                                           reduction="sum") / b.dense_weight.sum()
                loss = loss + cfg.dense_term * dense
            if cfg.vocab_term:
                yes_no = torch.logsumexp(logits[:, [yes, no]], -1) - torch.logsumexp(logits, -1)
                loss = loss - cfg.vocab_term * yes_no.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += F.binary_cross_entropy_with_logits(margin.detach(), b.target).item()
            if log and (step + 1) % cfg.log_every == 0:
                log(f"step {step + 1}/{cfg.steps}  last-token loss {running / cfg.log_every:.4f}  "
                    f"{time.time() - start:.0f}s")
                running = 0.0
            if on_checkpoint and (step + 1) % (cfg.log_every * 5) == 0:
                model.eval()
                on_checkpoint(step + 1, model)
                model.train()
    return model.eval()


# --- evaluation -----------------------------------------------------------------------------------------


def ndcg_at_k(rows: Sequence[dict], scores: Sequence[float], k: int = 10) -> float:
    """Mean NDCG@k over queries (rows grouped by query text), gain 2**label - 1, via qwen_convert.scoring.metrics."""
    import numpy as np

    from qwen_convert.scoring.metrics import mean_ndcg

    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["query"], []).append(i)
    gains = np.array([row["label"] for row in rows], dtype=np.float64)
    return mean_ndcg(list(groups.values()), np.asarray(scores, dtype=np.float64), gains, k)


def score_rows(scorer, encoder, rows: Sequence[dict], batch_size: int = 64):
    import numpy as np

    from qwen_convert.reranker import Pair

    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        out.append(scorer.score(encoder.encode([Pair(r["query"], r["document"]) for r in chunk])))
    return np.concatenate(out)


# Plain English: (query, documents with the expected best first). Used by the tests and the README.
EXAMPLES: list[tuple[str, list[str]]] = [
    ("how to cook rice", ["boil rice in water for twenty minutes", "the football match ended in a draw",
                          "heavy rain is expected in the evening"]),
    ("will it rain tomorrow", ["the forecast says rain and strong wind tomorrow", "my cat sleeps on the chair all day",
                               "install the software on your laptop"]),
    ("my dog is sick", ["take your puppy to the vet", "the concert starts at eight in the evening",
                        "book a cheap hotel near the beach"]),
    ("computer will not start", ["restart your laptop and check the power cable", "the tennis player won the final",
                                 "bake the bread for an hour"]),
    ("cheap flights to paris", ["book a cheap flight to paris in the morning", "the soup needs more salt",
                                "the doctor gave me medicine for the fever"]),
    ("best guitar songs", ["learn to play this song on the guitar", "the doctor prescribed pills for the pain",
                           "snow is falling on the mountain"]),
    ("how to treat a headache", ["drink water and rest to ease a migraine", "our team scored three goals",
                                 "the printer is out of paper"]),
]


def example_rows() -> list[dict]:
    return [{"query": q, "document": d, "label": int(i == 0)} for q, docs in EXAMPLES for i, d in enumerate(docs)]


# --- quantization simulation (what the ONNX variants will do, in torch) ------------------------------------


def _fake_q4_blockwise(w, block: int = 32):
    """Asymmetric 4-bit per block of `block` along the input dim, zero point as MatMulNBits stores it."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // block, block)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zp = (-lo / scale).round().clamp(0, 15)
    q = (g / scale + zp).round().clamp(0, 15)
    return ((q - zp) * scale).reshape(rows, cols)


def _fake_q4_symmetric(w, block: int = 32):
    """Symmetric int4 per block (MLAS: the largest-magnitude weight maps to -8, no zero point)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // block, block)
    idx = g.abs().argmax(-1, keepdim=True)
    scale = (g.gather(-1, idx) / -8).where(g.gather(-1, idx) != 0, 1e-12)
    q = (g / scale).round().clamp(-8, 7)
    return (q * scale).reshape(rows, cols)


def _fake_int8_tensor(w):
    """Symmetric int8 per tensor (onnxruntime dynamic quantization's weight default)."""
    scale = w.abs().max().clamp(min=1e-12) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def _fake_uint8_activation(x):
    """Dynamic asymmetric uint8 per tensor, as DynamicQuantizeLinear does at run time."""
    lo = x.amin().clamp(max=0)
    hi = x.amax().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zp = (-lo / scale).round().clamp(0, 255)
    return ((x / scale + zp).round().clamp(0, 255) - zp) * scale


def _fake_int8_blocks(x, block: int = 32):
    """MatMulNBits accuracy_level 4: inputs quantized to int8, symmetric, per row and block of 32."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = (g.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return ((g / scale).round().clamp(-127, 127) * scale).reshape(x.shape)


def simulated_variants(model) -> dict[str, tuple[object, object]]:
    """name -> (model copy, context) with weights (and for int8 activations) fake-quantized in place.

    The seq-cls head is W[yes] - W[no], quantized as its own matrix in the ONNX graph; here the scorer
    reads logit(yes) - logit(no) from the quantized tied embedding, a slightly harsher setting.
    """
    import copy

    import torch

    variants: dict[str, tuple[object, object]] = {}
    fake_4bit = {"q4": _fake_q4_symmetric, "q4-asym": _fake_q4_blockwise}
    for name in ("q4", "q4-asym", "int8", "fp16"):
        m = copy.deepcopy(model)
        hooks = []
        with torch.no_grad():
            if name == "fp16":
                m = m.half()
            else:
                for mod in m.modules():
                    if isinstance(mod, torch.nn.Linear) and mod is not m.lm_head:
                        fq = fake_4bit.get(name, _fake_int8_tensor)
                        mod.weight.copy_(fq(mod.weight))
                        act = _fake_uint8_activation if name == "int8" else _fake_int8_blocks
                        hooks.append(mod.register_forward_pre_hook(lambda _m, a, act=act: (act(a[0]),)))
                emb = m.model.embed_tokens.weight
                emb.copy_(fake_4bit.get(name, _fake_int8_tensor)(emb))
        variants[name] = (m, hooks)
    return variants


# --- output ---------------------------------------------------------------------------------------------


def save(model, out: Path, rows: Sequence[dict], record: dict) -> None:
    from qwen_convert.fixtures import copy_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "config.json", "generation_config.json"):
        (out / f).unlink(missing_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    copy_tokenizer(out)
    with (out / "eval.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def report(model, rows: Sequence[dict], log) -> dict:
    from qwen_convert.fixtures import tokenizer_path
    from qwen_convert.reranker import PromptEncoder, load_tokenizer
    from qwen_convert.scoring.torch_scorers import CausalScorer

    encoder = PromptEncoder(load_tokenizer(tokenizer_path()))
    yes, no = encoder.tokens.yes_id, encoder.tokens.no_id
    fp32 = ndcg_at_k(rows, score_rows(CausalScorer(model, yes, no), encoder, rows))
    metrics = {"ndcg@10": {"fp32": fp32}, "retention": {}}
    log(f"NDCG@10 fp32 {fp32:.4f}")
    for name, (m, _hooks) in simulated_variants(model).items():
        v = ndcg_at_k(rows, score_rows(CausalScorer(m, yes, no), encoder, rows))
        metrics["ndcg@10"][name] = v
        metrics["retention"][name] = v / fp32
        log(f"NDCG@10 {name:5s} {v:.4f}  retention {v / fp32:.4f} (simulated)")
    ex = example_rows()
    scores = score_rows(CausalScorer(model, yes, no), encoder, ex)
    good = 0
    for q, docs in EXAMPLES:
        s = [scores[i] for i, r in enumerate(ex) if r["query"] == q]
        ok = max(range(len(s)), key=s.__getitem__) == 0
        good += ok
        log(f"{'ok ' if ok else 'BAD'} {q!r}: " + ", ".join(f"{v:+.2f}" for v in s))
    metrics["examples_top1"] = f"{good}/{len(EXAMPLES)}"
    return metrics


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cfg = replace(TrainConfig(), steps=args.steps)
    log(f"training {json.dumps(asdict(cfg))}")
    start = time.time()
    model = train(cfg, log)
    log(f"trained in {time.time() - start:.0f}s")
    rows = eval_rows(cfg.eval_seed, cfg.eval_queries)
    metrics = report(model, rows, log)
    save(model, args.out, rows, {"command": "python scripts/train_tiny_reranker.py", "config": asdict(cfg),
                                 "torch": _torch_version(), "metrics": metrics})
    log(f"wrote {args.out}\n{json.dumps(metrics, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
