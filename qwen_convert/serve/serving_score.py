"""/score, /v1/score: vLLM's score API; each pair's score is P(yes), in request order."""

from __future__ import annotations

from qwen_convert.reranker import Pair

from .options import ServeOptions
from .protocol import InvalidRequest, ScoreData, ScoreRequest, ScoreResponse, Usage
from .registry import ModelRegistry


async def score(registry: ModelRegistry, request: ScoreRequest, options: ServeOptions) -> ScoreResponse:
    pairs = request.pairs()
    if len(pairs) > options.max_documents:
        raise InvalidRequest(f"{len(pairs)} pairs in one request (limit {options.max_documents})",
                             "split the pairs over several requests")
    scores = await registry.score(request.model, [Pair(q, d) for q, d in pairs], request.instruction)
    data = [ScoreData(index=i, score=s) for i, s in enumerate(scores.p_yes)]
    usage = Usage(prompt_tokens=scores.prompt_tokens, total_tokens=scores.prompt_tokens)
    return ScoreResponse(model=scores.model, data=data, usage=usage)
