// Greedy generation with transformers.js from a qconv causal-LM export (kind causal-lm), offline.
//
//   node generate.mjs request.json     (request: {"model": DIR, "dtypes": [...], "prompts": [[token ids], ...], "max_new_tokens": N})
//
// Prints {"versions", "results": {dtype: [[new token ids] per prompt] | {"error"}}}. Token ids in, token
// ids out: the comparison with torch is of the model and its KV-cache loop, not of the two tokenizers.
import { readFile } from "node:fs/promises";
import path from "node:path";
import { createRequire } from "node:module";

import { env, AutoModelForCausalLM, Tensor } from "@huggingface/transformers";

const request = JSON.parse(await readFile(process.argv[2], "utf8"));
const dir = path.resolve(request.model);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(dir);
const name = path.basename(dir);

const require = createRequire(import.meta.url);
const versions = {
  node: process.versions.node,
  "@huggingface/transformers": env.version,
  "onnxruntime-node": require("onnxruntime-node/package.json").version,
};

const results = {};
for (const dtype of request.dtypes) {
  try {
    const model = await AutoModelForCausalLM.from_pretrained(name, { dtype });
    const runs = [];
    for (const ids of request.prompts) {
      const input_ids = new Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
      const attention_mask = new Tensor("int64", new BigInt64Array(ids.length).fill(1n), [1, ids.length]);
      const out = await model.generate({ input_ids, attention_mask, max_new_tokens: request.max_new_tokens, do_sample: false });
      runs.push(Array.from(out.data, Number).slice(ids.length));
    }
    results[dtype] = runs;
    await model.dispose();
  } catch (err) {
    results[dtype] = { error: String(err?.stack ?? err).slice(0, 2000) };
  }
}
console.log(JSON.stringify({ versions, results }));
