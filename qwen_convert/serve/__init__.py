"""`qconv serve`: an HTTP rerank server for exported artifacts, without torch on the ONNX path.

The modules, in the order a request meets them:
    app.py              FastAPI app: thin routes, body limits, one JSON error shape, disconnects
    access.py           the API key (constant-time), model management's allowed directories, redaction
    protocol.py         pydantic request/response models (vLLM / Cohere / Jina shapes)
    serving_rerank.py   /rerank, /v1/rerank, /v2/rerank: documents -> ranked results
    serving_score.py    /score, /v1/score: text_1/text_2 or queries/documents -> scores
    registry.py         model name -> served model; tokenize, de-duplicate, submit; load/unload
    batcher.py          one queue and batching task per model: length-grouped, bounded batches
    engine.py           a model directory -> tokenizer + onnxruntime session (or torch seq-cls)
    metrics.py          Prometheus counters and histograms
    options.py          ServeOptions and ModelSpec
    server.py           serve(): load the models, run uvicorn, drain on SIGTERM
    static/index.html   the try-it page served at /
"""
