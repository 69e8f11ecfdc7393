"""Build the small Qwen-style tokenizer shipped in qwen_convert/data/tokenizer/.

Byte-level BPE with Qwen2's pre-tokenizer regex and Qwen's special tokens, trained on a fixed
corpus, so any text (English, Chinese, emoji) encodes and "yes"/"no" are single ordinary tokens,
as in the real Qwen3 vocabulary. Run once; the output is committed:

    python scripts/build_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "qwen_convert" / "data" / "tokenizer"
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]

ENGLISH = """
Judge whether the Document meets the requirements based on the Query and the Instruct provided.
Note that the answer can only be "yes" or "no".
Given a web search query, retrieve relevant passages that answer the query
<Instruct>: <Query>: <Document>: system user assistant
The capital of France is Paris, a city on the river Seine known for art, food and history.
Python is a programming language that lets you work quickly and integrate systems effectively.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Photosynthesis converts light energy into chemical energy stored in glucose inside plant cells.
A reranker scores how relevant each document is to a search query and sorts the results.
The weather today is cloudy with a chance of rain in the afternoon and wind from the north.
Football, basketball, tennis and swimming are popular sports around the world.
The heart pumps blood through arteries and veins to deliver oxygen to the body.
Bread is made from flour, water, salt and yeast, baked in a hot oven until golden.
The stock market rose after the central bank announced lower interest rates.
Mount Everest is the highest mountain on Earth, on the border of Nepal and China.
Machine learning models learn patterns from data to make predictions about new examples.
How do I reset my password? Click the link in the email and choose a new password.
What is the boiling point of water? Water boils at one hundred degrees Celsius at sea level.
Who wrote the novel about a whale? Herman Melville wrote Moby Dick in eighteen fifty one.
The train to the airport leaves every fifteen minutes from platform two.
Electric cars use batteries instead of gasoline and produce no exhaust while driving.
Coffee contains caffeine, which can improve focus but may disturb sleep at night.
The museum is open from nine in the morning until six in the evening, closed on Monday.
Dogs are loyal animals; cats are independent; birds can fly; fish swim in the sea.
The recipe needs two eggs, one cup of milk, sugar, butter and a pinch of salt.
Solar panels convert sunlight into electricity for homes and businesses.
The library lends books, music and movies to anyone with a card.
A doctor treats patients; a teacher teaches students; an engineer builds machines.
red green blue yellow black white orange purple small large fast slow old new good bad
one two three four five six seven eight nine ten hundred thousand million first last
apple banana orange grape lemon rice tea water milk cheese chicken fish soup salad
car bus train plane bike ship road city house room door window table chair bed
run walk eat drink read write open close buy sell find lose give take make build learn
""".strip().splitlines()

CHINESE = """
法国的首都是巴黎，位于塞纳河畔，以艺术、美食和历史闻名。
北京是中国的首都，有故宫、长城和天安门广场。
光合作用把光能转化为储存在葡萄糖中的化学能。
如何重置密码？点击邮件中的链接并设置新密码。
水的沸点是多少？在海平面，水在一百摄氏度沸腾。
机器学习模型从数据中学习规律，并对新样本进行预测。
今天天气多云，下午可能有雨，北风三级。
电动汽车使用电池而不是汽油，行驶时没有尾气排放。
咖啡含有咖啡因，可以提神，但晚上喝可能影响睡眠。
重排序模型为每个文档和查询的相关性打分并排序。
""".strip().splitlines()


def corpus() -> list[str]:
    lines = ENGLISH * 20 + CHINESE * 20
    # "yes"/"no" follow "\n\n" in the template, so they must be tokens without a leading space.
    lines += ["yes", "no", "\nyes", "\nno", "yes\n", "no\n"] * 200
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens(THINK)
    return tok


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(OUT / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 8192,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    print(f"wrote {OUT} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
