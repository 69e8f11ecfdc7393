"""Does config.json describe the tensors? Checked from safetensors headers alone, before anything is written.

A checkpoint whose config disagrees with its weights (vocab_size smaller than the embedding,
hidden_size different from the weights, a layer's tensor missing, an extra layer) would convert
"successfully" into a directory that transformers, vLLM or onnxruntime then refuse or, worse, run
wrong. Every expected tensor of a Qwen3 decoder is derived from the config here and compared with
what the headers say; no weight is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .checkpoint import Checkpoint
from .errors import SourceError, WeightsError
from .reranker import RerankerTokens

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
SCORE = "score.weight"
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
HINT = "config.json and the weights disagree; use the config that came with these weights, or re-download the model"


@dataclass(frozen=True)
class Qwen3Dims:
    """The numbers of config.json that fix every tensor's shape."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    attention_bias: bool
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Qwen3Dims:
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                vocab=int(config["vocab_size"]), hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]), attention_bias=bool(config.get("attention_bias", False)),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except KeyError as exc:
            raise SourceError(f"config.json has no {exc.args[0]}", "pass a complete Qwen3 config.json") from exc
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise SourceError(f"config.json has a non-numeric or zero size ({exc})", "pass a complete Qwen3 config.json") from exc


def _why(name: str, dims: Qwen3Dims) -> str:
    """Which config keys fix this tensor's shape, for the error line."""
    if name in (EMBED, LM_HEAD):
        return f"vocab_size {dims.vocab}, hidden_size {dims.hidden}"
    if name == SCORE:
        return f"num_labels, hidden_size {dims.hidden}"
    if ".self_attn.q_proj." in name or ".self_attn.o_proj." in name:
        return f"num_attention_heads {dims.heads} x head_dim {dims.head_dim}, hidden_size {dims.hidden}"
    if ".self_attn." in name and ("_proj." in name):
        return f"num_key_value_heads {dims.kv_heads} x head_dim {dims.head_dim}, hidden_size {dims.hidden}"
    if "_norm." in name and ".self_attn." in name:
        return f"head_dim {dims.head_dim}"
    if ".mlp." in name:
        return f"intermediate_size {dims.intermediate}, hidden_size {dims.hidden}"
    return f"hidden_size {dims.hidden}"


def expected_tensors(config: dict, tensors: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3 checkpoint with this config must hold, and its shape, in forward order.

    The head follows the checkpoint: score.weight [num_labels, hidden] for a seq-cls model,
    lm_head.weight [vocab, hidden] for an untied causal one, nothing extra for a tied one.
    """
    d = Qwen3Dims.from_config(config)
    h, q, kv = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim
    out: dict[str, tuple[int, ...]] = {EMBED: (d.vocab, h)}
    for i in range(d.layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d.head_dim,), p + "self_attn.k_norm.weight": (d.head_dim,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (d.intermediate, h), p + "mlp.up_proj.weight": (d.intermediate, h),
            p + "mlp.down_proj.weight": (h, d.intermediate),
        })
        if d.attention_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)})
    out["model.norm.weight"] = (h,)
    if SCORE in tensors:
        labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 1)
        out[SCORE] = (labels, h)
    elif LM_HEAD in tensors or not d.tied:
        out[LM_HEAD] = (d.vocab, h)
    return out


def _shape(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def checkpoint_problems(ckpt: Checkpoint, tokens: RerankerTokens | None = None) -> list[str]:
    """Every disagreement between config.json, the tensors' shapes and the token ids, one line each."""
    config, tensors = ckpt.config, ckpt.tensors
    dims = Qwen3Dims.from_config(config)
    problems = []
    for name, want in expected_tensors(config, tensors).items():
        info = tensors.get(name)
        if info is None:
            problems.append(f"{name} is missing; config.json ({_why(name, dims)}) expects shape {_shape(want)}")
        elif tuple(info.shape) != want:
            problems.append(f"{name} has shape {_shape(info.shape)} but config.json ({_why(name, dims)}) expects {_shape(want)}")
    extra = sorted({int(m.group(1)) for name in tensors if (m := LAYER.match(name)) and int(m.group(1)) >= dims.layers})
    if extra:
        first = min(n for n in tensors if LAYER.match(n) and int(LAYER.match(n).group(1)) == extra[0])
        problems.append(f"{first} belongs to layer {extra[0]}, but config.json has num_hidden_layers {dims.layers} "
                        f"(layers {', '.join(map(str, extra))} are extra)")
    ids = {} if tokens is None else {"yes": tokens.yes_id, "no": tokens.no_id, "pad": tokens.pad_id}
    if isinstance(config.get("pad_token_id"), int):
        ids["config pad_token_id"] = config["pad_token_id"]
    rows = tensors[EMBED].shape[0] if EMBED in tensors and tensors[EMBED].shape else dims.vocab
    for what, tok in ids.items():
        if not 0 <= tok < min(dims.vocab, rows):
            problems.append(f"{what} token id {tok} is outside the vocabulary ({EMBED} {_shape(tensors[EMBED].shape) if EMBED in tensors else '-'}, "
                            f"vocab_size {dims.vocab})")
    return problems


def check_checkpoint(ckpt: Checkpoint, tokens: RerankerTokens | None = None) -> None:
    """Raise WeightsError (one line: the first disagreement, and how many more) unless config and tensors agree."""
    problems = checkpoint_problems(ckpt, tokens)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightsError(f"{ckpt.root}: {problems[0]}{more}", HINT)


def check_model_dir(path) -> None:
    """check_checkpoint for a causal or seq-cls model directory, with its tokenizer's yes/no/pad ids."""
    from .checkpoint import open_checkpoint
    from .convert import read_reranker_tokens  # convert imports this module

    check_checkpoint(open_checkpoint(path), read_reranker_tokens(path))
