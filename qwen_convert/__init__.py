"""qconv: turn Qwen3-Reranker checkpoints into deployable artifacts and prove the scores survived.

The pipeline, one package per stage (each imports only the stages above it in this list):
    errors, extras, progress, fsutil, versions, formats, reranker, fixtures   the core every stage shares
    checkpoint/   a model directory on disk: safetensors headers, config vs tensors, head rows, kind
    hub/          SRC -> local directory (path, qconv:NAME, ModelScope -> Hugging Face)
    seqcls/       the streamed one-logit Qwen3ForSequenceClassification directory and its card
    scoring/      Scorer engines (transformers, streamed, onnxruntime, servers), `qconv score`
    verify/       parity against the original: reference pass, score cache, gates, report
    onnx/         the graph builder, precision variants, `qconv export-onnx`, the causal LM
    pipeline/     `qconv run`: recipe -> every artifact -> manifest.json, REPORT.md
    serve/        `qconv serve`: the torch-free rerank server over ONNX exports
    inspect.py, cli.py   the commands
"""

__version__ = "0.1.0"
