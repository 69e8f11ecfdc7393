"""A model directory as it is on disk, read without loading it: safetensors headers and row reads,
config.json against the tensors, the reranker's head rows and ids, what kind of artifact it is.

    safetensors_io.py  headers, row and chunk reads, the safetensors writer
    files.py           open_checkpoint(): config, shards, index; pickle-only refused
    onnx_header.py     an .onnx file's opsets and data files, without loading its weights
    heads.py           lm_head or the tied embedding; yes/no/pad ids; the score row W[yes] - W[no]
    kind.py            Qwen3 or not; causal, seq-cls or ONNX
    validate.py        config.json against every tensor's shape, each disagreement named
    rope.py            a transformers-5 config's RoPE (rope_parameters) as transformers 4.x must be given it

Imports only the core modules (errors, formats, reranker, fsutil, progress).
"""
