"""The FastAPI app: thin routes over serving_*.py, plus the HTTP concerns around them.

- Body limit (413) before anything parses the body; malformed JSON is 400, fields that do not fit
  the request model are 422, an unknown model 404, a full queue 503 with Retry-After; every error
  has the one shape of protocol.ErrorResponse.
- A client that disconnects cancels its request, and with it its pairs still waiting in the queue.
- Access (access.py) is checked before any of that: without the key a request is 401 before its body
  is read, whatever the route; model management answers 403 unless the operator enabled it.
- Nothing a client is told holds a host path it did not send: internal errors are answered with an
  id that the log line carrying the details repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_convert.errors import QconvError
from qwen_convert.serve import serving_rerank, serving_score

from .. import __version__
from .access import Access, redact, told_as
from .metrics import ServerMetrics
from .options import ServeOptions
from .protocol import (
    ApiError,
    ErrorResponse,
    Health,
    LoadRequest,
    ModelCard,
    ModelList,
    RequestTooLarge,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    UnloadRequest,
)
from .registry import ModelRegistry, Served

RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")
SCORE_PATHS = ("/score", "/v1/score")
CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; nobody receives it
log = logging.getLogger("qconv.serve")
# The page has a key field: it may not be framed by another site, and it talks to this server only.
PAGE_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'; connect-src 'self'", "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer"}


def error_response(status: int, type_: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error={"message": message, "type": type_, "code": status, "param": param})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# --- ASGI middleware: limits and metrics see every request, matched or not -----------------------

class BodyLimit:
    """413 for a body over the limit, by Content-Length or, when chunked, by counting."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # chunked: buffer (bounded), then replay to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, RequestTooLarge.type, f"request body over {self.limit} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


class RequireKey:
    """401 (or 403) before the app, and before a body is read, for a request the access policy refuses."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.access.check_request(scope["path"], scope["headers"])
        if refused is None:
            return await self.app(scope, receive, send)
        response = error_response(refused.status, refused.type, str(refused), headers=refused.headers)
        await response(scope, receive, send)


class RequestMetrics:
    def __init__(self, app, metrics: ServerMetrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        endpoint = scope["path"] if scope["path"] in self.paths else "other"
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)


# --- client disconnects ---------------------------------------------------------------------------

class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work):
    """Await `work`, cancelling it (and so its queued pairs) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone()
    return task.result()


# --- the app --------------------------------------------------------------------------------------

def _card(name: str, served: Served, default: str | None) -> ModelCard:
    m = served.model
    return ModelCard(id=name, created=served.created, root=str(m.path), kind=m.kind.value, variant=m.engine.variant,
                     providers=m.engine.providers, max_model_len=m.max_length, default=name == default,
                     share_prefix=m.prefix is not None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts[:5]) or "invalid request", param


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the one JSON shape; what reaches a client holds no host path (see _internal)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, str(exc), headers=exc.headers)

    @app.exception_handler(QconvError)
    async def _qconv_error(request: Request, exc: QconvError):  # e.g. a model that cannot be loaded
        log.warning("%s %s: %s", request.method, request.url.path, str(exc))
        return error_response(400, "invalid_model", redact(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return error_response(400, "invalid_json", "the body is not valid JSON")
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if request.method == "POST" and not content_type.endswith("json"):
            return error_response(415, "unsupported_media_type", f"the body is {content_type}, not JSON",
                                  "content-type")
        message, param = _validation_message(exc)
        return error_response(422, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # The exception's text may hold host paths (onnxruntime names its files): the log gets it, the client an id.
        # (Starlette re-raises it after this answer, so uvicorn logs the traceback right below this line.)
        incident = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s: %s: %s", incident, request.method, request.url.path, type(exc).__name__, exc)
        return error_response(500, "internal_error", f"internal error {incident} (the server's log has the details)")


def build_app(registry: ModelRegistry, metrics: ServerMetrics, options: ServeOptions, access: Access = Access()) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        registry.start()
        yield
        await registry.close()  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="qconv serve", version=__version__, lifespan=lifespan)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    add_error_handlers(app)

    async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
        return await unless_disconnected(request, serving_rerank.rerank(registry, body, options))

    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        return await unless_disconnected(request, serving_score.score(registry, body, options))

    for path in RERANK_PATHS:
        app.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse, response_model_exclude_none=True)
    for path in SCORE_PATHS:
        app.add_api_route(path, score, methods=["POST"], response_model=ScoreResponse)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", models=list(registry.models))

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[_card(n, s, registry.default) for n, s in registry.models.items()])

    @app.post("/v1/models/load", response_model=ModelCard)
    async def load(body: LoadRequest) -> ModelCard:
        spec = access.load_spec(body.model, body.name, body.variant)
        with told_as(spec.path, body.model):
            served = await registry.load(spec)
        log.info("model %r loaded from %s (%s)", served.model.name, str(served.model.path), served.model.engine.variant)
        return _card(served.model.name, served, registry.default)

    @app.post("/v1/models/unload", response_model=ModelList)
    async def unload(body: UnloadRequest) -> ModelList:
        access.require_management()
        await registry.unload(body.name)
        log.info("model %r unloaded", body.name)
        return await models()

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    paths = {r.path for r in app.routes}
    app.add_middleware(BodyLimit, limit=options.max_request_bytes)
    app.add_middleware(RequireKey, access=access)  # outside BodyLimit: an anonymous body is never buffered
    app.add_middleware(RequestMetrics, metrics=metrics, paths=paths)  # added last = outermost: counts 401s and 413s too
    return app
