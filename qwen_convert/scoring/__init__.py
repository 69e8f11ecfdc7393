"""Every way qconv scores a pair, behind one Scorer protocol, and the commands built on scoring.

    base.py            Scorer: an EncodedBatch in, one relevance logit per row out
    batches.py         pairs -> padded, length-ordered batches -> logits
    torch_scorers.py   transformers' causal reranker and seq-cls classifier
    streamed/          the same forward one decoder layer at a time (flat memory at any size)
    memory.py          what the machine has, what an engine needs, which engine fits
    onnx_scorers.py    onnxruntime sessions over an export's variants (the last two kept open)
    denormals.py       denormal floats flushed on the threads that run those sessions
    kernels.py         what a graph runs on this CPU: q4's 4-bit weights as int8 kernels at load
    prefix.py          prefix-shared scoring on an export's with-past graphs
    choose.py          the default variant: verified, then the fastest measured here (cached)
    remote.py          a running server (vLLM, TEI, Cohere/Jina /rerank, qconv serve) as a scorer
    registry.py        load_scorers(): artifact kind -> loader, engine choice
    probes.py          the built-in probe pairs and the pairs-file reader
    metrics.py         sigmoid, NDCG, Kendall tau
    score.py           score_documents(): the `qconv score` command

Imports the core modules, checkpoint/ and hub/; never verify/, onnx/, pipeline/ or serve/.
"""
