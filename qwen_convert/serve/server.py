"""serve(): open the models, then run the app under uvicorn until SIGTERM/SIGINT.

Models load before the port opens, so a bad path fails the command with one line instead of a
server that answers 404. On SIGTERM uvicorn stops accepting, lets in-flight requests finish
(at most `drain_seconds`), then the lifespan drains every batcher: nothing admitted is dropped.
The server keeps no state between requests: scale out with replicas behind a load balancer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .options import ModelSpec, ServeOptions


@dataclass(frozen=True)
class ServedModelInfo:
    name: str
    path: str
    kind: str
    variant: str
    providers: tuple[str, ...]


@dataclass(frozen=True)
class ServeResult:
    url: str
    models: tuple[ServedModelInfo, ...]

    def to_dict(self) -> dict:
        return {"url": self.url, "models": [m.__dict__ | {"providers": list(m.providers)} for m in self.models]}

    def render(self) -> str:
        lines = [f"served {self.url} (stopped)"]
        lines += [f"  {m.name}: {m.path} ({m.kind} {m.variant}, {', '.join(m.providers)})" for m in self.models]
        return "\n".join(lines)


def _log_config(level: str) -> dict:
    """uvicorn's logging, with its access log on stderr: stdout is for results."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    # qconv's own lines (model loads, refused load paths, internal errors with their id) go where uvicorn's do.
    config["loggers"]["qconv"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    for logger in config["loggers"].values():
        logger["level"] = level.upper()
    return config


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _warn_if_open(access, host: str) -> None:
    log = logging.getLogger("qconv.serve")
    if access.api_key is None:
        log.warning("serving %s without an API key: anyone who reaches the port can score (set QCONV_API_KEY)", host)
    if access.management and access.api_key is None and access.admin_key is None:
        log.warning("model management is on without a key: anyone who reaches the port can load models from "
                    "the allowed directories and unload any (set QCONV_API_KEY or QCONV_ADMIN_KEY)")


def serve(models: Sequence[ModelSpec], options: ServeOptions = ServeOptions(), access_log: bool = False) -> ServeResult:
    """Serve MODELS at options.host:port until stopped; returns what was served."""
    import uvicorn

    from qwen_convert.errors import QconvError

    from .access import resolve_access
    from .app import build_app
    from .metrics import ServerMetrics
    from .registry import ModelRegistry

    if not models:
        raise QconvError("no model to serve", "pass one or more exported model directories")
    names = [m.served_name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise QconvError(f"two models would be served as {duplicates[0]!r}", "give each a distinct --name")
    access = resolve_access(options.access)  # a bad key file fails before minutes of model loading
    metrics = ServerMetrics()
    registry = ModelRegistry(options, metrics)
    loaded = [registry.preload(spec) for spec in models]
    app = build_app(registry, metrics, options, access)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_config=_log_config(options.log_level),
                            access_log=access_log, timeout_graceful_shutdown=options.drain_seconds, lifespan="on")
    server = uvicorn.Server(config)
    if options.host not in LOOPBACK:
        _warn_if_open(access, options.host)
    server.run()
    if not server.started:
        raise QconvError(f"the server could not start on {options.host}:{options.port} (see the log above)",
                         "is the port already in use? pick another with --port")
    info = tuple(ServedModelInfo(m.name, str(m.path), m.kind.value, m.engine.variant, tuple(m.engine.providers)) for m in loaded)
    return ServeResult(f"http://{options.host}:{options.port}", info)
