"""qconv: turn Qwen3-Reranker checkpoints into deployable artifacts and prove the scores survived."""

__version__ = "0.1.0"
