"""Greedy generation from a causal-LM graph with KV cache, onnxruntime alone (no optimum, no torch).

The loop generate() runs: the prompt with an empty past (its `present.*` become the cache), then
one token a step with the cache, the mask one column longer and position_ids = the count of real
tokens so far minus one. It reads the cache's dtype and sizes from the session's inputs, so it runs
the builder's graphs (fp16 cache in fp16/q4f16) and optimum's traced ones (fp32 cache) alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_convert.errors import ExportError

PAST_PREFIX = "past_key_values."
ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class GreedyRun:
    tokens: list[int]  # the new tokens, eos included when one ended the run
    logits: np.ndarray  # float64 [steps, vocab]: the logits each new token was chosen from
    seconds_prefill: float
    seconds_decode: float  # every step after the first token

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.seconds_decode if steps > 0 and self.seconds_decode > 0 else 0.0


class OrtCausalLM:
    """One ONNX variant in an onnxruntime session, with generate()'s two input shapes."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        from qwen_convert.scoring.onnx_scorers import session_options

        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}", "re-export the model") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        if "input_ids" not in inputs or not self.past_names:
            raise ExportError(f"{path} is not a causal LM with KV cache (inputs {sorted(inputs)})",
                              "pass an export of kind causal-lm")
        first = inputs[self.past_names[0]]
        self.kv_dtype = ORT_FLOAT.get(first.type, np.float32)
        self.kv_heads, self.head_dim = (int(d) for d in first.shape[1:4:2])
        self.has_positions = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for n in self.past_names}

    def forward(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
        """logits [batch, seq, vocab] and the next cache; positions from the mask as transformers does."""
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **past}
        if self.has_positions:
            positions = np.cumsum(mask, axis=1) - 1
            positions[mask == 0] = 1
            feed["position_ids"] = positions[:, -ids.shape[1]:].astype(np.int64)
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = {n: outs[n.replace(PAST_PREFIX, "present.")] for n in self.past_names}
        return outs["logits"], present

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced float64 logits [len(ids), vocab]: one pass, empty past."""
        row = np.asarray([ids], np.int64)
        logits, _ = self.forward(row, np.ones_like(row), self.empty_past(1))
        return logits[0].astype(np.float64)

    def generate(self, ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()) -> GreedyRun:
        """Greedy continuation of one prompt, stopping after max_new_tokens or at an eos token."""
        import time

        row = np.asarray([ids], np.int64)
        mask = np.ones_like(row)
        started = time.perf_counter()
        logits, past = self.forward(row, mask, self.empty_past(1))
        prefill = time.perf_counter() - started
        tokens, steps = [], []
        while True:
            step = logits[0, -1].astype(np.float64)
            token = int(np.argmax(step))
            tokens.append(token)
            steps.append(step)
            if len(tokens) >= max_new_tokens or token in eos_ids:
                break
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = self.forward(np.asarray([[token]], np.int64), mask, past)
        decode = time.perf_counter() - started - prefill
        return GreedyRun(tokens, np.stack(steps), prefill, decode)
