"""Seq-cls candidates built the slow, obvious way (two torch models, head copied by hand).

Independent of qwen_convert.seqcls.convert: a cross-check that the streaming converter and verify agree
with what anyone would write with transformers alone.
"""

from __future__ import annotations

from pathlib import Path

from qwen_convert.reranker import load_tokenizer, reranker_tokens


def seqcls_by_hand(src: Path, out: Path, noise: float = 0.0, head_dtype=None) -> Path:
    """Qwen3ForSequenceClassification with score.weight = lm_head[yes] − lm_head[no] (+ noise, or rounded)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForSequenceClassification

    tok = load_tokenizer(src)
    ids = reranker_tokens(tok)
    causal = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    cfg = causal.config.to_dict()
    for key in ("id2label", "label2id"):
        cfg.pop(key, None)
    cfg.update(num_labels=1, pad_token_id=ids.pad_id, architectures=["Qwen3ForSequenceClassification"])
    model = Qwen3ForSequenceClassification(Qwen3Config.from_dict(cfg))
    model.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad():
        w = causal.lm_head.weight
        head = (w[ids.yes_id] - w[ids.no_id]).unsqueeze(0)
        if noise:
            head = head + noise * torch.randn(head.shape, generator=torch.Generator().manual_seed(0))
        if head_dtype is not None:
            head = head.to(head_dtype).float()
        model.score.weight.copy_(head)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return Path(out)


def reference_logit(model, tokens, ids: list[int]) -> float:
    """logit(yes) − logit(no) of one unpadded sequence, the plainest possible forward pass."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return float(logits[tokens.yes_id] - logits[tokens.no_id])


def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box the thread
    hand-off costs ~7x (measured: 0.53 s vs 3.7 s for the 40 probe pairs). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
