"""A running server as a `verify` candidate: the probe pairs sent over HTTP, the answers read back as P(yes).

A server formats the prompt itself, so it is sent the raw query and document texts, never token ids:
what is verified is the whole deployment (weights, template, dtype, pooling), as its clients see it.
One table maps an API to the request it takes and the answer it gives:

  rerank, v1/rerank : vLLM / Cohere / Jina  {"query", "documents"} -> results[{index, relevance_score}]
  score, v1/score   : vLLM                  {"text_1", "text_2"} (or {"queries", "documents"}) -> data[{index, score}]
  tei               : text-embeddings-inference /rerank {"query", "texts"} -> [{index, score}]

`auto` tries them in that order on the first batch and keeps the first that answers in its shape
(404/405/400/422 mean "not this API"; anything else is reported at once).

The instruction: vLLM (0.32) folds a request's `instruction` into the chat template's kwargs, and
qconv's chat_template.jinja reads it, so a non-default `--instruction` is sent with every request
of the vLLM APIs; without one the template applies the default instruction. TEI has no such field:
it only ever scores the default instruction. A server that ignores the field scores the default
instruction, and the diagnosis below recognises that.

Scores: a relevance score is P(yes) = sigmoid(logit); the logit is recovered as log(p / (1 - p)).
A float32 P saturates near 1 (1 - 2**-24), so logits beyond about ±16 are not recoverable and the
server gates are in P (verify.SERVER_GATES).
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from qwen_convert.errors import QconvError
from qwen_convert.reranker import DEFAULT_INSTRUCTION, Pair

DEFAULT_TIMEOUT = 60.0
# float32's largest value below 1: a saturated P maps to logit ≈ 16.6 instead of +inf.
_P_MAX = 1.0 - 2.0**-24
_P_MIN = 1e-30


class ServerError(QconvError):
    """A server candidate could not be reached, or answered something that is not a score list."""


class ServerApi(str, Enum):
    AUTO = "auto"
    RERANK = "rerank"
    V1_RERANK = "v1/rerank"
    SCORE = "score"
    V1_SCORE = "v1/score"
    TEI = "tei"


@dataclass(frozen=True)
class ServerOptions:
    api: str = "auto"  # a ServerApi value
    precision: str = "fp32"  # what the server computes in: picks the gate (fp32 | fp16 | bf16 | int8 | q4 | q4f16)
    timeout: float = DEFAULT_TIMEOUT  # seconds per request
    model: str | None = None  # the served model name, for servers that require one (Cohere-style); vLLM: optional
    api_key: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer KEY` (qconv serve --api-key, vLLM)


def is_server_url(candidate) -> bool:
    return isinstance(candidate, str) and candidate.startswith(("http://", "https://"))


# --- the API table -------------------------------------------------------------------------------

Body = Callable[[str, Sequence[str], "str | None", "str | None"], dict]
Parse = Callable[[object, int], list[float]]


def _extras(instruction: str | None, model: str | None) -> dict:
    out = {}
    if model:
        out["model"] = model
    if instruction is not None:
        out["instruction"] = instruction
    return out


def _rerank_body(query, documents, instruction, model) -> dict:
    return {"query": query, "documents": list(documents), **_extras(instruction, model)}


def _score_text_body(query, documents, instruction, model) -> dict:
    return {"text_1": query, "text_2": list(documents), **_extras(instruction, model)}


def _score_queries_body(query, documents, instruction, model) -> dict:
    return {"queries": query, "documents": list(documents), **_extras(instruction, model)}


def _tei_body(query, documents, instruction, model) -> dict:
    return {"query": query, "texts": list(documents), "raw_scores": False}


def _by_index(rows, n: int, key: str, where: str) -> list[float]:
    if not isinstance(rows, list):
        raise ValueError(f"{where} is not a list")
    out: list[float | None] = [None] * n
    for row in rows:
        if not isinstance(row, dict) or "index" not in row or key not in row:
            raise ValueError(f"an entry of {where} lacks 'index' or '{key}': {json.dumps(row)[:120]}")
        i, value = row["index"], row[key]
        if not isinstance(i, int) or not 0 <= i < n or out[i] is not None:
            raise ValueError(f"{where} has index {i!r} for {n} documents")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}[{i}].{key} is {value!r}, not a number")
        out[i] = float(value)
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"{where} has no score for documents {missing[:5]} of {n}")
    return out  # type: ignore[return-value]


def _parse_rerank(data, n: int) -> list[float]:
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError("the JSON has no 'results' list")
    return _by_index(data["results"], n, "relevance_score", "results")


def _parse_score(data, n: int) -> list[float]:
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError("the JSON has no 'data' list")
    return _by_index(data["data"], n, "score", "data")


def _parse_tei(data, n: int) -> list[float]:
    return _by_index(data, n, "score", "the answer")


@dataclass(frozen=True)
class Endpoint:
    name: str  # the --api value it answers to
    path: str
    body: Body
    parse: Parse
    takes_instruction: bool = True


ENDPOINTS: dict[ServerApi, tuple[Endpoint, ...]] = {
    ServerApi.RERANK: (Endpoint("rerank", "/rerank", _rerank_body, _parse_rerank),),
    ServerApi.V1_RERANK: (Endpoint("v1/rerank", "/v1/rerank", _rerank_body, _parse_rerank),),
    # text_1/text_2 is what every vLLM with /score takes; newer ones also take queries/documents.
    ServerApi.SCORE: (Endpoint("score", "/score", _score_text_body, _parse_score),
                      Endpoint("score", "/score", _score_queries_body, _parse_score)),
    ServerApi.V1_SCORE: (Endpoint("v1/score", "/v1/score", _score_text_body, _parse_score),
                         Endpoint("v1/score", "/v1/score", _score_queries_body, _parse_score)),
    ServerApi.TEI: (Endpoint("tei", "/rerank", _tei_body, _parse_tei, takes_instruction=False),),
}
AUTO_ORDER = (ServerApi.RERANK, ServerApi.V1_RERANK, ServerApi.SCORE, ServerApi.V1_SCORE, ServerApi.TEI)
# Answers that mean "this server has no such API (or not in this shape)": try the next one.
_NOT_THIS_API = (400, 404, 405, 422)


def parse_api(value: str) -> ServerApi:
    try:
        return ServerApi(value)
    except ValueError:
        raise QconvError(f"unknown server API {value!r}", f"use one of {', '.join(a.value for a in ServerApi)}") from None


# --- HTTP ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    content_type: str


def _post(url: str, payload: dict, timeout: float, api_key: str | None = None) -> _Answer:
    """POST JSON; HTTP errors are answers, everything else that goes wrong is one ServerError line.
    A 401 is the one answer no API detection gets past: it names the key to send."""
    import urllib.request

    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST", headers=headers)
    answer = _send(request, url, timeout)
    if answer.status == 401:
        raise ServerError(f"{url} answered HTTP 401: {'the API key was refused' if api_key else 'it needs an API key'}",
                          "set QCONV_API_KEY to the server's key (or pass --api-key)")
    return answer


def _send(request, url: str, timeout: float) -> _Answer:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return _Answer(response.status, response.read(), response.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as exc:
        return _Answer(exc.code, exc.read() or b"", exc.headers.get("Content-Type", "") if exc.headers else "")
    except (TimeoutError, socket.timeout):
        raise ServerError(f"{url} did not answer within {timeout:g} s", "raise --timeout, or check the server is not stuck") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise ServerError(f"{url} did not answer within {timeout:g} s", "raise --timeout, or check the server is not stuck") from None
        raise ServerError(f"cannot reach {url} ({reason})", "is the server running, and is the URL its base (http://HOST:PORT)?") from None
    except (ConnectionError, OSError) as exc:  # reset or closed mid-answer
        raise ServerError(f"the connection to {url} failed ({exc})", "check the server's log") from None


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:160] + ("…" if len(text) > 160 else "")


def _decode(url: str, answer: _Answer):
    try:
        return json.loads(answer.body)
    except ValueError:
        what = answer.content_type or "no content type"
        raise ServerError(f"{url} answered HTTP {answer.status} that is not JSON ({what}): {_snippet(answer.body)!r}",
                          "is this the base URL of a reranking server?") from None


# --- the scorer ----------------------------------------------------------------------------------

def probability_to_logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _P_MIN, _P_MAX)
    return np.log(p) - np.log1p(-p)


@dataclass
class RemoteScorer:
    """Scores raw (query, document) texts on a server; `name` is the API it answers ("v1/rerank", ...).

    Unlike the local Scorers it takes texts, not token ids (`score_texts`): the server tokenizes and
    applies its own template, which is part of what is being verified."""

    url: str
    endpoint: Endpoint
    options: ServerOptions
    instruction: str | None  # sent only when it is not the template's default
    kind: str = "server"
    engine: str = "server"

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def precision(self) -> str:
        return self.options.precision

    def request(self, query: str, documents: Sequence[str]) -> list[float]:
        url = self.url + self.endpoint.path
        payload = self.endpoint.body(query, documents, self.instruction if self.endpoint.takes_instruction else None, self.options.model)
        answer = _post(url, payload, self.options.timeout, self.options.api_key)
        if not 200 <= answer.status < 300:
            raise ServerError(f"POST {url} returned HTTP {answer.status}: {_snippet(answer.body)!r}", "check the server's log")
        data = _decode(url, answer)
        try:
            return self.endpoint.parse(data, len(documents))
        except ValueError as exc:
            raise ServerError(f"{url} answered JSON that is not a {self.endpoint.name} answer: {exc}",
                              f"pick the server's API with --api ({', '.join(a.value for a in AUTO_ORDER)})") from None

    def relevance(self, pairs: Sequence[Pair], batch_size: int, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """The server's relevance score of every pair, in order: one request per query and batch_size documents."""
        out = np.empty(len(pairs))
        for query, idx in _requests(pairs, batch_size):
            out[idx] = self.request(query, [pairs[i].document for i in idx])
            if on_batch is not None:
                on_batch(len(idx))
        return out

    def score_texts(self, pairs: Sequence[Pair], batch_size: int = 8, on_batch=None) -> np.ndarray:
        """logit = log(P / (1 − P)) of each relevance score (NaN where it is not a probability)."""
        p = self.relevance(pairs, batch_size, on_batch)
        with np.errstate(invalid="ignore"):
            return np.where((p >= 0) & (p <= 1), probability_to_logit(np.clip(p, 0, 1)), np.nan)


def _requests(pairs: Sequence[Pair], batch_size: int) -> list[tuple[str, list[int]]]:
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.query, []).append(i)
    return [(q, idx[s : s + batch_size]) for q, idx in groups.items() for s in range(0, len(idx), batch_size)]


def connect(url: str, options: ServerOptions, probe: Pair, instruction: str | None) -> RemoteScorer:
    """A RemoteScorer for the server at URL, its API chosen by `options.api` or detected on one request.

    `instruction`: the prompt's instruction (None or the default: none is sent)."""
    url = url.rstrip("/")
    if not is_server_url(url):
        raise ServerError(f"{url} is not an http(s) URL", "pass the server's base URL, e.g. http://127.0.0.1:8000")
    api = parse_api(options.api)
    if not (options.timeout > 0 and math.isfinite(options.timeout)):
        raise QconvError(f"timeout {options.timeout} is not a positive number of seconds", "use --timeout 60")
    sent = None if instruction in (None, DEFAULT_INSTRUCTION) else instruction
    apis = AUTO_ORDER if api is ServerApi.AUTO else (api,)
    if sent is not None:
        if api is ServerApi.TEI:
            raise QconvError("the tei API takes no instruction: TEI scores the template's default instruction",
                             "drop --instruction, or verify a vLLM server (its /rerank and /score take one)")
        apis = tuple(a for a in apis if a is not ServerApi.TEI)
    tried = []
    for candidate in apis:
        for endpoint in ENDPOINTS[candidate]:
            scorer = RemoteScorer(url, endpoint, options, sent)
            payload = endpoint.body(probe.query, [probe.document], sent if endpoint.takes_instruction else None, options.model)
            answer = _post(url + endpoint.path, payload, options.timeout, options.api_key)
            if answer.status in _NOT_THIS_API:
                tried.append(f"{endpoint.path} {answer.status}")
                continue
            if not 200 <= answer.status < 300:
                raise ServerError(f"POST {url}{endpoint.path} returned HTTP {answer.status}: {_snippet(answer.body)!r}",
                                  "check the server's log")
            data = _decode(url + endpoint.path, answer)
            try:
                endpoint.parse(data, 1)
            except ValueError as exc:
                if api is not ServerApi.AUTO:
                    raise ServerError(f"{url}{endpoint.path} answered JSON that is not a {endpoint.name} answer: {exc}",
                                      f"pick the server's API with --api ({', '.join(a.value for a in AUTO_ORDER)})") from None
                tried.append(f"{endpoint.path} {answer.status} ({exc})")
                continue
            return scorer
    raise ServerError(f"{url} answers none of the scoring APIs tried: {'; '.join(tried)}",
                      "start a reranking server (vLLM: --runner pooling), or name its API with --api")


# --- what a wrong answer looks like --------------------------------------------------------------

@dataclass(frozen=True)
class Alternative:
    """A prompt a misconfigured server may have scored instead of the right one, and what causes it."""

    name: str
    cause: str


NO_TEMPLATE = Alternative(
    "no-template",
    "the scores match query+document WITHOUT the reranker prompt: the server was started without the "
    "chat template (vLLM applies one only when given: add --chat-template OUT/chat_template.jinja)",
)
DEFAULT_INSTRUCTION_IGNORED = Alternative(
    "default-instruction",
    "the scores match the DEFAULT instruction, not --instruction: the server ignores the request's "
    "`instruction` (older vLLM), so only the template's default can be verified; edit the default in "
    "chat_template.jinja to serve another instruction",
)


def diagnose(p_server: np.ndarray, p_reference: np.ndarray, alternatives: dict[Alternative, np.ndarray],
             precision: str) -> list[str]:
    """Likely causes of a mismatch, read from the pattern of the server's scores (most specific first)."""
    p = np.asarray(p_server, dtype=np.float64)
    ref = np.asarray(p_reference, dtype=np.float64)
    finite = np.isfinite(p)
    causes = []
    if finite.any() and ((p[finite] < 0) | (p[finite] > 1)).any():
        causes.append("relevance scores outside [0, 1]: the server returns raw logits, not P(yes) (vLLM picks the "
                      "activation from config.json's sentence_transformers.activation_fn, which `qconv seqcls` writes)")
        return causes
    if len(p) > 1 and finite.all() and np.ptp(p) < 1e-6:
        what = "0.5 (a logit of 0: the score head is zero or missing)" if abs(p[0] - 0.5) < 1e-6 else f"{p[0]:.6f}"
        causes.append(f"every pair scored the same, {what}: the server is not reading the yes/no head. Serving the "
                      "original causal checkpoint needs vLLM's --hf-overrides (and an untied 4B/8B head is not "
                      "rebuilt from them); serve the output of `qconv seqcls` instead")
        return causes
    err = float(np.nanmax(np.abs(p - ref))) if finite.any() else math.inf
    for alt, p_alt in alternatives.items():
        alt_err = float(np.nanmax(np.abs(p - p_alt)))
        # The alternative explains the scores when it is far closer to them than the right prompt is.
        if alt_err <= max(2e-2, 1e-4) and alt_err < 0.1 * err:
            causes.append(alt.cause)
    if causes:
        return causes
    if precision == "fp32" and err <= 2e-2:
        causes.append(f"the scores are close (max |ΔP| {err:.1e}) but not fp32-exact: the server computes in reduced "
                      "precision (vLLM casts a float32 checkpoint to float16 unless started with --dtype float32); "
                      "pass --precision fp16 or bf16 to gate it as such")
    elif finite.all() and len(p) > 2 and np.corrcoef(p, ref)[0, 1] < -0.9:
        causes.append("the scores run opposite to the reference: the head computes P(no) (W[no] − W[yes])")
    return causes


def no_template_ids(tokenizer, pairs: Sequence[Pair]) -> list[list[int]]:
    """What vLLM scores without a chat template (use_sep_token false): the tokens of query + document."""
    return [tokenizer.encode(p.query + p.document, add_special_tokens=True) for p in pairs]
