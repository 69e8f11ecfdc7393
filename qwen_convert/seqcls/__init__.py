"""The one-logit Qwen3ForSequenceClassification directory (vLLM, sentence-transformers, TEI),
streamed tensor by tensor: score.weight = W[yes] - W[no], lm_head dropped.

    convert.py   convert_to_seqcls(): checks, the copy, the score row, the atomic rename
    sidecars.py  config, tokenizer files, chat template and model card written beside the weights

Imports the core modules, checkpoint/ and hub/.
"""
