"""Request and response models: the shapes rerank clients already send.

/rerank follows vLLM's and Jina's `rerank` (Cohere's v1/v2 fields included): documents are strings
or `{"text": ...}`, results come sorted by relevance_score = P(yes). /score follows vLLM's `score`:
`text_1`/`text_2` (or `queries`/`documents`), one string against many, or two equal-length lists.
Unknown fields are ignored, as those servers do, so a client written for one of them works here.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qwen_convert.errors import QconvError

# --- errors -------------------------------------------------------------------------------------

class ApiError(QconvError):
    """An error the API answers with: an HTTP status and a type, in the one JSON error shape."""

    status = 400
    type = "bad_request"

    def __init__(self, message: str, hint: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message, hint)
        self.headers = headers or {}


class BadJson(ApiError):
    status, type = 400, "invalid_json"


class InvalidRequest(ApiError):
    status, type = 422, "invalid_request"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"


class Forbidden(ApiError):
    status, type = 403, "forbidden"


class RequestTooLarge(ApiError):
    status, type = 413, "request_too_large"


class InvalidModel(ApiError):
    status, type = 400, "invalid_model"


class ModelNotFound(ApiError):
    status, type = 404, "model_not_found"


class Overloaded(ApiError):
    status, type = 503, "overloaded"


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every error, whatever its status: {"error": {"message", "type", "code", "param"}} (OpenAI's shape)."""

    error: ErrorBody


# --- rerank -------------------------------------------------------------------------------------

class Document(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str | Document] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    instruction: str | None = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Document | None = None


class RerankResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"rerank-{uuid.uuid4().hex}")
    model: str
    results: list[RerankResult]
    usage: Usage


# --- score --------------------------------------------------------------------------------------

class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    instruction: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> "ScoreRequest":
        vllm = self.text_1 is not None or self.text_2 is not None
        named = self.queries is not None or self.documents is not None
        if vllm == named:
            raise ValueError("give text_1 and text_2, or queries and documents")
        left, right = (self.text_1, self.text_2) if vllm else (self.queries, self.documents)
        if left is None or right is None:
            raise ValueError("both sides are needed: text_1 with text_2, or queries with documents")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """vLLM's pairing: one query against every document, or two equal-length lists, zipped."""
        left, right = (self.text_1, self.text_2) if self.text_1 is not None else (self.queries, self.documents)
        left = [left] if isinstance(left, str) else list(left)
        right = [right] if isinstance(right, str) else list(right)
        if not left or not right:
            raise InvalidRequest("nothing to score: a side is an empty list")
        if len(left) == 1:
            left = left * len(right)
        if len(left) != len(right):
            raise InvalidRequest(f"{len(left)} queries and {len(right)} documents",
                                 "send one query, or as many queries as documents")
        return list(zip(left, right))


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"score-{uuid.uuid4().hex}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: Usage


# --- models -------------------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qconv"
    root: str  # the directory served
    kind: str  # onnx | seqcls
    variant: str  # onnx: fp32 | fp16 | int8 | q4 | q4f16; seqcls: the torch dtype
    providers: list[str]
    max_model_len: int
    default: bool = False
    share_prefix: bool = False  # documents of a query run on its prompt prefix's cache (onnx/prefix/ graph, CPU)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="directory to serve")
    name: str | None = Field(default=None, min_length=1, description="served name (default: the directory name); an existing name is replaced")
    variant: str | None = None


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)


class Health(BaseModel):
    status: Literal["ok", "draining"]
    models: list[str]
