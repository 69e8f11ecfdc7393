"""A streamed fp32 forward of Qwen3 rerankers: one decoder layer's weights in memory at a time.

The pipeline, one module per stage:
  weights.py  safetensors in: the embedding rows the prompts use, one layer's tensors, the head rows
  layer.py    the math of one decoder layer (transformers' own Qwen3DecoderLayer, weights assigned)
  hidden.py   every batch's hidden states between layers (held, or spilled to a temporary file)
  engine.py   embed -> layer 1..N (every prompt through a layer, then the next) -> norm -> head

Memory is about one layer in fp32 plus the hidden states of the probe set, whatever the model size,
so `verify` can use the 8B reranker as its reference on a 16 GB machine.
"""

from __future__ import annotations
