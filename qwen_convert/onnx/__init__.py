"""The Qwen3 reranker's ONNX graph, written straight from the safetensors checkpoint.

    weights.py    checkpoint in (tensor by tensor, row chunks), GraphWriter out (external data)
    precision.py  QuantMode -> how each weight is stored and which op consumes it
    build.py      the graph: embedding -> layers -> last token -> final norm -> score head
    header.py     an .onnx file's opsets and data files, read without loading its weights
"""
