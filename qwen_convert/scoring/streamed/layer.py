"""The math of one Qwen3 decoder layer, and the per-batch inputs every layer shares.

Not a re-implementation: it is transformers' own Qwen3DecoderLayer (attention with q/k norms, RoPE,
GQA, SwiGLU MLP, RMSNorms), built once on the meta device and given each layer's fp32 tensors in
turn (`load_state_dict(assign=True)`: no second copy, strict names and shapes). The attention mask
and rotary embeddings come from the same transformers functions Qwen3Model.forward calls, with the
same attention implementation (sdpa), so a streamed pass is the full model's forward split by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = "sdpa"  # what from_pretrained picks on CPU; the streamed pass must run the same kernels


def prepare_config(config):
    """A copy of the model's config set up the way from_pretrained(dtype=float32) would run it."""
    import copy

    config = copy.deepcopy(config)
    config._attn_implementation = ATTENTION
    config.use_cache = False
    return config


def build_layer(config):
    """One Qwen3DecoderLayer with no storage: each layer's tensors are assigned by load_layer."""
    import torch
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    with torch.device("meta"):
        return Qwen3DecoderLayer(config, layer_idx=0).eval()


def layer_shapes(config) -> dict[str, tuple[int, ...]]:
    """Relative tensor name -> shape, for one decoder layer of this config."""
    return {name: tuple(t.shape) for name, t in build_layer(config).state_dict().items()}


def load_layer(layer, tensors: dict, index: int, config) -> None:
    """Give `layer` the tensors of decoder layer `index` (names relative to model.layers.N.)."""
    from qwen_convert.errors import WeightsError

    try:
        layer.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise WeightsError(f"decoder layer {index} does not match config.json ({first})",
                           "the config disagrees with the tensors; re-download or re-convert the model") from exc
    layer.attention_type = config.layer_types[index]
    layer.self_attn.layer_idx = index


class Widening:
    """Lets a layer's linears hold their weights in a compact form and widen each to fp32 only while
    it runs: the same F.linear on the same fp32 values as nn.Linear's own forward, so the same outputs
    bit for bit, with one matrix in fp32 at a time instead of the whole layer.

    The compact form is the weight as the checkpoint stores it (bf16: half of fp32), or what a linear's
    `widen_into(out)` writes (mixed.py: a rounded weight from its 4-bit codes). While `reuse`, the fp32
    matrix goes into one scratch buffer the size of the largest: a fresh 192 MiB allocation per call
    (an 8B-wide MLP weight) cost twice the copy itself in page faults. close() drops the buffer, and
    later calls (calibration's search, after the batches) widen into tensors of their own."""

    def __init__(self, layer):
        import types

        import torch

        self.linears = [m for m in layer.modules() if type(m) is torch.nn.Linear]
        self.buffer = None
        self.reuse = True
        for module in self.linears:
            module.forward = types.MethodType(lambda m, x: self.forward(m, x), module)

    def forward(self, module, x):
        import torch
        from torch.nn.functional import linear

        fill = getattr(module, "widen_into", None)
        w = module.weight
        if fill is None and w.dtype == torch.float32:
            pass  # already fp32 (a search's replaced weight, an fp32 checkpoint)
        elif self.reuse:
            if self.buffer is None:
                self.buffer = torch.empty(max(m.weight.numel() for m in self.linears))
            out = self.buffer[:w.numel()].view(w.shape)
            w = fill(out) if fill is not None else out.copy_(w)
        else:
            w = fill(torch.empty(w.shape)) if fill is not None else w.float()
        return linear(x, w, None if module.bias is None else module.bias.float())

    def close(self) -> None:
        self.buffer, self.reuse = None, False


@dataclass
class BatchInputs:
    """What every layer needs for one padded batch besides its hidden states."""

    masks: dict  # attention type -> mask (as Qwen3Model builds it)
    position_ids: object
    position_embeddings: tuple  # (cos, sin)


def batch_inputs(config, rotary, hidden, attention_mask, position_ids) -> BatchInputs:
    """Masks and rotary embeddings for one batch, built exactly as Qwen3Model.forward builds them."""
    import torch
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = _mask_kwargs(create_causal_mask, config=config, embeds=hidden, attention_mask=attention_mask,
                          cache_position=torch.arange(hidden.shape[1]), position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in config.layer_types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return BatchInputs(masks, position_ids, rotary(hidden, position_ids))


def _mask_kwargs(create_mask, *, config, embeds, attention_mask, cache_position, position_ids) -> dict:
    """The mask builder's arguments under the names this transformers uses: 4.5x takes `input_embeds`,
    `cache_position` and `past_key_values`; 5.x `inputs_embeds` and `cache` (a required argument,
    with `past_key_values` a deprecated alias of it) and no `cache_position`."""
    import inspect

    params = inspect.signature(create_mask).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    given = {"config": config, "input_embeds": embeds, "inputs_embeds": embeds, "attention_mask": attention_mask,
             "cache_position": cache_position, cache: None, "position_ids": position_ids}
    return {name: value for name, value in given.items() if name in params}


def run_layer(layer, hidden, inputs: BatchInputs):
    """hidden [batch, seq, hidden] through one decoder layer (fp32, no cache)."""
    return layer(hidden, attention_mask=inputs.masks[layer.attention_type], position_ids=inputs.position_ids,
                 position_embeddings=inputs.position_embeddings, use_cache=False)


def build_rotary(config):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return Qwen3RotaryEmbedding(config)


def build_norm(config, weight):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.data = weight
    return norm
