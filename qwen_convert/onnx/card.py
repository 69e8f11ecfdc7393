"""What an ONNX export says about itself: config.json beside the variants, and the model card
(variants, sizes, gates, loading snippets for onnxruntime, optimum and transformers.js)."""

from __future__ import annotations

from pathlib import Path

from qwen_convert.formats import QUANTIZE_CONFIG, VariantFile
from qwen_convert.seqcls.sidecars import TEMPLATE_FILE, Provenance, provenance_lines


def onnx_config(seqcls_config: dict, variants: list[VariantFile]) -> dict:
    """The seq-cls config plus transformers.js' external-data hint (`<file>_data`, one chunk)."""
    config = dict(seqcls_config)
    external = {Path(v.path).name: 1 for v in variants if v.external_data}
    tjs = dict(config.get("transformers.js_config") or {})
    tjs.pop("use_external_data_format", None)
    if external:
        tjs["use_external_data_format"] = external
    if tjs:
        config["transformers.js_config"] = tjs
    else:
        config.pop("transformers.js_config", None)
    return config


# Run verbatim by tests/test_transformersjs.py (node, @huggingface/transformers as pinned in tests/js).
_TRANSFORMERSJS_SNIPPET = """\
import { readFile } from "node:fs/promises";
import { env, AutoTokenizer, PreTrainedModel } from "@huggingface/transformers";

env.allowRemoteModels = false;  // local files only
env.localModelPath = "./";      // the folder that holds NAME/
const tokenizer = await AutoTokenizer.from_pretrained("NAME");
// transformers.js reads chat templates only from tokenizer_config.json: pass the reranker's
const chat_template = await readFile("NAME/chat_template.jinja", "utf8");
// No Qwen3ForSequenceClassification in transformers.js: the base class runs the graph as an encoder.
const model = await PreTrainedModel.from_pretrained("NAME", { dtype: "q4f16" });  // fp32 | fp16 | q8 | q4 | q4f16

// Always give the instruction as a "system" message (@huggingface/jinja cannot take the template's fallback).
const messages = [
  { role: "system", content: "Given a web search query, retrieve relevant passages that answer the query" },
  { role: "query", content: "What is the capital of China?" },
  { role: "document", content: "The capital of China is Beijing." },
];
const text = tokenizer.apply_chat_template(messages, { chat_template, tokenize: false });
const { logits } = await model(tokenizer([text], { padding: true, add_special_tokens: false }));
console.log(1 / (1 + Math.exp(-logits.data[0])));  // P(yes); logits [batch, 1] = logit(yes) - logit(no)
"""


def transformersjs_section(name: str) -> str:
    """The card's transformers.js part: the loading code that works (no Qwen3 seq-cls class there)."""
    return f"""## transformers.js

`AutoModelForSequenceClassification` refuses `model_type` qwen3 ("Unsupported model type"); the
base `PreTrainedModel` loads `onnx/model{{,_fp16,_quantized,_q4,_q4f16}}.onnx` for `dtype`
fp32 / fp16 / q8 / q4 / q4f16 and feeds it `input_ids` + `attention_mask`. Batches pad left (the
tokenizer's setting); the graph reads the last real token from the mask.

```js
{_TRANSFORMERSJS_SNIPPET.replace("NAME", name)}```
"""


def onnx_card(provenance: Provenance, variants: list[VariantFile], name: str = "OUT",
              how: str = "optimum-onnx exporter, last-token gather before the score head") -> str:
    rows = "\n".join(f"| `{v.path}` | {v.mode} | {v.bytes / 2**20:.1f} MiB{' (+ `_data`)' if v.external_data else ''} |" for v in variants)
    return f"""---
library_name: onnx
pipeline_tag: text-ranking
tags:
  - reranker
  - qwen3
  - onnx
  - qconv
---

# Qwen3 reranker as a single-logit ONNX graph

Inputs `input_ids`, `attention_mask` (int64, [batch, sequence], either padding side); output
`logits` [batch, 1] = `logit(yes) - logit(no)` of the original model at the last real token of the
official prompt, so `sigmoid(logits)` is P(yes). Tokenize with the template in `{TEMPLATE_FILE}`.

| file | precision | size |
|---|---|---|
{rows}

Settings of every variant: `{QUANTIZE_CONFIG}`.

## Provenance

{provenance_lines(provenance)}
- exported by qconv {provenance.qconv_version} ({how})

## onnxruntime / optimum

```python
from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained("{name}")
model = ORTModelForSequenceClassification.from_pretrained("{name}", subfolder="onnx", file_name="model_q4f16.onnx")
messages = [{{"role": "query", "content": "What is the capital of China?"}},
            {{"role": "document", "content": "The capital of China is Beijing."}}]
text = tok.apply_chat_template(messages, tokenize=False)
logit = model(**tok(text, return_tensors="pt")).logits[0, 0]  # P(yes) = sigmoid(logit)
```

{transformersjs_section(name)}"""
