"""genai_config.json: what onnxruntime-genai's `og.Model(dir)` reads to load a causal-LM export.

The fields are those onnxruntime-genai's own model builder writes for a Qwen3 decoder
(`onnxruntime_genai/models/builders/base.py`, `make_genai_config`, 0.18), pointed at this export's
layout: the decoder under onnx/, the inputs and outputs causal_graph.py names (position_ids
included: genai fills it from the mask as cumsum - 1), the tokenizer files beside the config (genai
reads tokenizer.json, tokenizer_config.json and chat_template.jinja from the same directory).
Token ids are resolved as the builder does: generation_config.json before config.json, and the
tokenizer's eos_token (Qwen3: <|im_end|>, the end of a chat turn) added to eos when missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen_convert.errors import SourceError

GENAI_CONFIG = "genai_config.json"
# The builder's search defaults; generation_config.json overrides those it sets (Qwen3-0.6B: sampling
# at temperature 0.6, top_k 20, top_p 0.95), as the builder's make_genai_config does.
SEARCH_DEFAULTS = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
OUTPUTS = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def turn_end_id(out: Path) -> int | None:
    """The id of tokenizer_config.json's eos_token, looked up in tokenizer.json (no tokenizer loaded)."""
    token = _read(out / "tokenizer_config.json").get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    tokenizer = _read(out / "tokenizer.json")
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = tokenizer.get("model", {}).get("vocab", {})
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def genai_config(config: dict, generation: dict, decoder: str, shared_buffer: bool, turn_end: int | None = None) -> dict:
    """The genai_config.json dict for a Qwen3 causal LM whose graph is `decoder` (relative to the config).

    shared_buffer: genai's past_present_share_buffer, which its builder turns on for GroupQueryAttention
    graphs: the cache is one [batch, kv_heads, max_length, head_dim] buffer that GQA writes in place at
    the mask's length (no per-step copy of the whole cache). The builder's graph is GQA with lengths
    from the mask, so it qualifies; optimum's traced graph concatenates past and new keys, so its
    present.* must grow (onnxruntime refuses the preallocated buffer's shape there)."""
    def pick(key: str):
        value = generation.get(key)
        return value if value is not None else config.get(key)

    eos = pick("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    if turn_end is not None and turn_end not in eos_ids:
        eos_ids = [turn_end, *eos_ids]
    if not eos_ids:
        raise SourceError("no eos_token_id in config.json, generation_config.json or the tokenizer",
                          "set eos_token_id in the source's generation_config.json")
    pad = pick("pad_token_id")
    context = int(config.get("seq_length") or config["max_position_embeddings"])
    head_size = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    search = {k: generation.get(k, v) if generation.get(k) is not None else v for k, v in SEARCH_DEFAULTS.items()}
    search.update(max_length=context, past_present_share_buffer=shared_buffer)
    model_type = config["architectures"][0].split("For")[0].lower() if config.get("architectures") else config["model_type"]
    return {
        "model": {
            "bos_token_id": pick("bos_token_id") if pick("bos_token_id") is not None else 1,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": decoder, "head_size": head_size, "hidden_size": int(config["hidden_size"]),
                "inputs": dict(INPUTS), "outputs": dict(OUTPUTS),
                "num_attention_heads": int(config["num_attention_heads"]),
                "num_hidden_layers": int(config["num_hidden_layers"]),
                "num_key_value_heads": int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            },
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            "pad_token_id": pad if pad is not None else eos_ids[0],
            "type": model_type,
            "vocab_size": int(config["vocab_size"]),
        },
        "search": dict(sorted(search.items())),
    }


def write_genai_config(out: Path, config: dict, decoder: str, shared_buffer: bool) -> dict:
    """OUT/genai_config.json from config and the sidecars already in OUT (generation config, tokenizer)."""
    written = genai_config(config, _read(out / "generation_config.json"), decoder, shared_buffer, turn_end_id(out))
    (out / GENAI_CONFIG).write_text(json.dumps(written, indent=4) + "\n", encoding="utf-8")
    return written
