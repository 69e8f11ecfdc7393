"""The ONNX exports: the Qwen3 reranker's graph written straight from the safetensors checkpoint,
its precision variants, and the export command that writes and verifies them.

    weights.py    checkpoint in (tensor by tensor, row chunks), GraphWriter out (external data)
    precision.py  QuantMode -> how each weight is stored and which op consumes it
    build.py      the graph: embedding -> layers -> last token -> final norm -> score head
    quantize.py   onnxruntime's whole-graph quantizers (the traced graphs)
    export.py     export_onnx(): builder or optimum, variants, sidecars, card, verify
    causal_graph.py  the query-expansion causal LM with KV cache: prefix.py's builder + position_ids + lm_head
    causal_lm.py  export_causal_lm(): builder (default) or optimum, variants, sidecars
    decode.py     greedy generate() with onnxruntime alone (prompt with an empty cache, then a token a step)
    causal_verify.py  verify_causal_lm(): greedy tokens and logits of each variant against torch

Imports the core modules, checkpoint/, hub/, seqcls/, scoring/ and verify/ (an export is verified).
"""
