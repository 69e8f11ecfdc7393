"""/rerank, /v1/rerank, /v2/rerank: one query, many documents -> results sorted by P(yes)."""

from __future__ import annotations

from qwen_convert.reranker import Pair

from .options import ServeOptions
from .protocol import Document, InvalidRequest, RerankRequest, RerankResponse, RerankResult, Usage
from .registry import ModelRegistry


async def rerank(registry: ModelRegistry, request: RerankRequest, options: ServeOptions) -> RerankResponse:
    texts = request.texts()
    if len(texts) > options.max_documents:
        raise InvalidRequest(f"{len(texts)} documents in one request (limit {options.max_documents})",
                             "split the documents over several requests")
    scores = await registry.score(request.model, [Pair(request.query, t) for t in texts], request.instruction)
    order = sorted(range(len(texts)), key=lambda i: (-scores.p_yes[i], i))  # ties keep input order
    if request.top_n is not None:
        order = order[: request.top_n]
    results = [RerankResult(index=i, relevance_score=scores.p_yes[i],
                            document=Document(text=texts[i]) if request.return_documents else None) for i in order]
    usage = Usage(prompt_tokens=scores.prompt_tokens, total_tokens=scores.prompt_tokens)
    return RerankResponse(model=scores.model, results=results, usage=usage)
