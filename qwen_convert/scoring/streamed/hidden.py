"""Each batch's hidden states between decoder layers: in memory, or spilled to a temporary file.

The streamed forward runs every batch through a layer before the next layer, so the hidden states
of all batches live between layers. Held, they are the set's tokens x hidden x 4 bytes (calibration's
40 probe prompts on an 8B: 125 MiB, a sixth of the export's peak); spilled, one batch's at a time is
in the process, the rest in an unlinked temporary file (the page cache, not the process, holds it).
Written and read back as raw float32 bytes: the same numbers either way.
"""

from __future__ import annotations

import tempfile

import numpy as np


class HeldStates:
    """The hidden states of every batch, kept as tensors."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.states: list = [None] * len(shapes)

    def get(self, index: int):
        return self.states[index]

    def put(self, index: int, state) -> None:
        self.states[index] = state

    def close(self) -> None:
        self.states = []


class SpilledStates:
    """The hidden states of every batch in an unlinked temporary file, one slot per batch (a batch's
    states keep their shape from layer to layer)."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        self.shapes = [tuple(shape) for shape in shapes]
        sizes = [int(np.prod(shape)) * 4 for shape in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        self.file = tempfile.TemporaryFile(prefix="qconv-hidden-")

    def get(self, index: int):
        import torch

        out = np.empty(self.shapes[index], dtype=np.float32)
        self.file.seek(self.offsets[index])
        self.file.readinto(memoryview(out.reshape(-1)).cast("B"))
        return torch.from_numpy(out)

    def put(self, index: int, state) -> None:
        data = np.ascontiguousarray(state.detach().numpy(), dtype=np.float32)
        if data.shape != self.shapes[index]:
            raise ValueError(f"batch {index}: hidden states {data.shape}, slot {self.shapes[index]}")
        self.file.seek(self.offsets[index])
        self.file.write(memoryview(data.reshape(-1)).cast("B"))

    def close(self) -> None:
        self.file.close()


def hidden_states(shapes: list[tuple[int, ...]], spill: bool):
    """An empty store for one float32 tensor per batch of these shapes ([rows, seq, hidden]), each
    given by `put`: SpilledStates with `spill`, else HeldStates."""
    return SpilledStates(shapes) if spill else HeldStates(shapes)
