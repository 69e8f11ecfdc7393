"""The ONNX exports: the Qwen3 reranker's graph written straight from the safetensors checkpoint,
its precision variants, and the export command that writes and verifies them.

    weights.py    checkpoint in (tensor by tensor, row chunks), GraphWriter out (external data)
    precision.py  QuantMode -> how each weight is stored and which op consumes it
    build.py      the graph: embedding -> layers -> last token -> final norm -> score head
    quantize.py   onnxruntime's whole-graph quantizers (the traced graphs and the causal LM)
    export.py     export_onnx(): builder or optimum, variants, sidecars, card, verify
    causal_lm.py  the query-expansion causal LM with KV cache (optimum) and its greedy check

Imports the core modules, checkpoint/, hub/, seqcls/, scoring/ and verify/ (an export is verified).
"""
