// Score (query, document) pairs with transformers.js on a qconv ONNX export, offline, and print JSON.
//
//   node score.mjs request.json        (request: {"model": DIR, "dtypes": [...], "pairs": [{query, document}], "instruction": str|null})
//
// Prints {"versions", "ids": per pair, "results": {dtype: {"single": [logit per pair], "batch": [...]} | {"error"}}}.
// The loading and prompt code below is what the export's README.md shows (qwen_convert/onnx/export.py
// onnx_card); keep the two identical.
import { readFile } from "node:fs/promises";
import path from "node:path";
import { createRequire } from "node:module";

import { env, AutoTokenizer, PreTrainedModel } from "@huggingface/transformers";

const request = JSON.parse(await readFile(process.argv[2], "utf8"));
const dir = path.resolve(request.model);

// --- card code begins ---
env.allowRemoteModels = false;            // never reach the hub: everything comes from the directory
env.localModelPath = path.dirname(dir);   // from_pretrained(name) reads <localModelPath>/<name>/
const name = path.basename(dir);

const tokenizer = await AutoTokenizer.from_pretrained(name);
// transformers.js reads a chat template only from tokenizer_config.json; the reranker prompt ships
// as chat_template.jinja, so pass its text.
const chat_template = await readFile(path.join(dir, "chat_template.jinja"), "utf8");

// The instruction goes in a "system" message, always: @huggingface/jinja's `first` of an empty list
// throws instead of yielding undefined, so the template's fallback for a missing one fails in JS.
const DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query";

function prompt(query, document, instruction = DEFAULT_INSTRUCTION) {
  const messages = [
    { role: "system", content: instruction },
    { role: "query", content: query },
    { role: "document", content: document },
  ];
  return tokenizer.apply_chat_template(messages, { chat_template, tokenize: false });
}

// transformers.js has no Qwen3ForSequenceClassification (AutoModelForSequenceClassification refuses
// model_type qwen3). The base PreTrainedModel loads onnx/model{_fp16,_quantized,_q4,_q4f16}.onnx for
// dtype fp32/fp16/q8/q4/q4f16 and runs it as an encoder: input_ids + attention_mask -> logits.
async function loadReranker(dtype) {
  return await PreTrainedModel.from_pretrained(name, { dtype });
}

async function logits(model, texts) {
  const inputs = tokenizer(texts, { padding: true, add_special_tokens: false });
  const { logits } = await model(inputs);  // [batch, 1]: logit(yes) - logit(no); P(yes) = sigmoid
  return Array.from(logits.data, Number);
}
// --- card code ends ---

const require = createRequire(import.meta.url);
const versions = {
  node: process.versions.node,
  "@huggingface/transformers": env.version,
  "onnxruntime-node": require("onnxruntime-node/package.json").version,
};

const texts = request.pairs.map((p) => prompt(p.query, p.document, request.instruction ?? undefined));
const ids = texts.map((t) => Array.from(tokenizer(t, { add_special_tokens: false }).input_ids.data, Number));

const results = {};
for (const dtype of request.dtypes) {
  try {
    const model = await loadReranker(dtype);
    const single = [];
    for (const t of texts) single.push(...(await logits(model, [t])));
    const batch = await logits(model, texts);
    results[dtype] = { single, batch };
    await model.dispose();
  } catch (err) {
    results[dtype] = { error: String(err?.message ?? err).split("\n")[0] };
  }
}

let auto_seqcls;
try {
  const { AutoModelForSequenceClassification } = await import("@huggingface/transformers");
  await AutoModelForSequenceClassification.from_pretrained(name, { dtype: "fp32" });
  auto_seqcls = "loaded";
} catch (err) {
  auto_seqcls = String(err?.message ?? err).split("\n")[0];
}

process.stdout.write(JSON.stringify({ versions, texts, ids, results, auto_seqcls }) + "\n");
