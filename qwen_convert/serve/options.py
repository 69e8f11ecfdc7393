"""What `qconv serve` is told: the models to serve and the server's limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class ModelSpec:
    path: str  # an ONNX export directory, a `qconv run` output, or a seq-cls directory
    name: str | None = None  # default: the directory name
    variant: str | None = None  # ONNX only; default: the fastest variant that passed its gate

    @property
    def served_name(self) -> str:
        return self.name or Path(self.path).resolve().name


@dataclass(frozen=True)
class AccessOptions:
    """Who may call the server; serve/access.py resolves these at start-up (keys read, directories resolved)."""

    api_key: str | None = field(default=None, repr=False)  # every route but /health and / needs it
    api_key_file: Path | None = None  # the same, read from a file (a container secret)
    admin_key: str | None = field(default=None, repr=False)  # the only key model management accepts
    admin_key_file: Path | None = None
    # Model management (/v1/models/load, /unload) is off unless directories are named: loads only from inside them.
    model_dirs: tuple[str, ...] = ()
    public_metrics: bool = False  # /metrics without the key (a scraper that cannot send one)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    # A reranker server usually cuts far below the model's 8192: long prompts dominate batch cost.
    max_length: int = DEFAULT_MAX_LENGTH
    max_batch_tokens: int = 8192  # padded tokens per batch (rows x the longest row)
    max_batch_size: int = 32  # rows per batch
    max_wait_ms: float = 2.0  # how long the oldest waiting pair may wait for others to join its batch
    max_queue: int = 4096  # pairs admitted per model (waiting or running) before 503
    max_documents: int = 1000  # per request
    max_request_bytes: int = 4 * 2**20
    threads: int | None = None  # onnxruntime intra-op threads (default: onnxruntime's, all cores)
    providers: tuple[str, ...] = ()  # onnxruntime providers; empty: CUDA when available, then CPU
    # ONNX exports with onnx/prefix/ graphs, on CPU: run each request's shared prompt prefix once (serve/sharing.py)
    share_prefix: bool = True
    drain_seconds: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    log_level: str = "info"
    access: AccessOptions = AccessOptions()
