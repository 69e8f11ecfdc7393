"""`qconv serve`, tested as a client sees it: a real server process on 127.0.0.1, called over HTTP.

The model is the trained tiny reranker exported once per session (fp32 + int8). Every server is
started with torch and transformers made unimportable (a stub package on PYTHONPATH), so each test
also proves the ONNX serving path never needs them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import QCONV, Server, export, fp32_only, metric, no_torch, serving  # noqa: F401

from qwen_convert.reranker import Pair, PromptEncoder, load_fast_tokenizer, load_tokenizer

EVAL = Path(__file__).resolve().parents[1] / "qwen_convert" / "data" / "tiny-reranker" / "eval.jsonl"
LONG_DOC = " ".join(f"w{i} lorem ipsum dolor" for i in range(300))  # ~1,200 tokens: slow on purpose


def _eval_queries(n: int = 3) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in EVAL.read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["query"], []).append(row["document"])
    return dict(list(out.items())[:n])


QUERIES = _eval_queries()
QUERY, DOCS = next(iter(QUERIES.items()))


def qconv_score(model: Path, query: str, docs: list[str], variant: str, share_prefix: bool = False,
                padding_side: str = "left") -> dict[str, float]:
    """What `qconv score MODEL --query Q --doc D... --variant V [--no-share-prefix]` computes (its library
    function, in process): document -> P(yes). Full prompts in one batch, as the server batches one
    request alone: int8 quantizes activations per batch tensor, so its scores depend on a pair's batch
    companions."""
    from qwen_convert.scoring.score import ScoreOptions, score_documents

    options = ScoreOptions(variant=variant, batch_size=64, max_length=2048, share_prefix=share_prefix, padding_side=padding_side)
    result = score_documents(model, query, docs, options=options)
    assert result.shared_pairs == (len(docs) if share_prefix else 0)  # the path asked for is the path that ran
    return {d.document: d.p_yes for d in result.queries[0].documents}


def served_scores(c: httpx.Client, query: str, docs: list[str], model: str) -> list[dict[str, float]]:
    """P(yes) per document from every rerank route and /v1/score, checking each answer's shape."""
    out = []
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = c.post(route, json={"query": query, "documents": docs}).json()
        assert body["model"] == model
        assert [r["relevance_score"] for r in body["results"]] == sorted((r["relevance_score"] for r in body["results"]), reverse=True)
        assert sorted(r["index"] for r in body["results"]) == list(range(len(docs)))
        assert all(r["document"]["text"] == docs[r["index"]] for r in body["results"])
        out.append({docs[r["index"]]: r["relevance_score"] for r in body["results"]})
    scored = c.post("/v1/score", json={"text_1": query, "text_2": docs}).json()
    assert [d["index"] for d in scored["data"]] == list(range(len(docs)))
    out.append({docs[d["index"]]: d["score"] for d in scored["data"]})
    return out


def max_diff(got: dict[str, float], want: dict[str, float]) -> float:
    assert got.keys() == want.keys()
    return max(abs(got[d] - want[d]) for d in want)


@pytest.fixture(scope="module")
def server(export, no_torch, tmp_path_factory):
    """The default server: the export under its directory name, torch blocked."""
    with serving(str(export), "--max-documents", "64", "--max-request-bytes", "200000",
                 block_torch=no_torch, log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


# --- the tokenizer path -------------------------------------------------------------------------

def test_fast_tokenizer_ids_equal_the_transformers_prompt_encoder(export):
    """The server's torch-free tokenizer (tokenizer.json via `tokenizers`) gives PromptEncoder's ids."""
    pairs = [Pair(q, d) for q, docs in QUERIES.items() for d in docs]
    pairs += [Pair("émoji 🎉 <|im_end|> tail", "tab\tnew\nline  <think>x</think>"), Pair("q", LONG_DOC)]
    for max_length in (8192, 120):  # 120: the long document is cut, the template kept
        ref = PromptEncoder(load_tokenizer(export), "custom instruction", max_length)
        fast = PromptEncoder(load_fast_tokenizer(export), "custom instruction", max_length)
        assert fast.tokens == ref.tokens
        assert fast.batch_ids(pairs) == [ref.ids(p) for p in pairs]
        assert [fast.ids(p) for p in pairs] == [ref.ids(p) for p in pairs]
    cut = fast.batch_ids([Pair("q", LONG_DOC)])[0]
    assert len(cut) == 120 and cut[-len(fast.suffix_ids):] == fast.suffix_ids


# --- scores -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["int8", "fp32"])
def test_rerank_scores_equal_qconv_score(variant, export, fp32_only, no_torch, tmp_path):
    """--no-share-prefix: served P(yes) == `qconv score --no-share-prefix` on the same artifact (<= 1e-5),
    on every rerank route and /score; fp32 also against right padding."""
    model = export if variant == "int8" else fp32_only  # int8: the default variant when it exists
    with serving(str(model), "--no-share-prefix", block_torch=no_torch, log_dir=tmp_path) as s, s.client() as c:
        card = c.get("/v1/models").json()["data"][0]
        assert (card["id"], card["variant"], card["kind"], card["share_prefix"]) == (model.name, variant, "onnx", False)
        for query, docs in QUERIES.items():
            served = served_scores(c, query, docs, model.name)
            sides = ("left", "right") if variant == "fp32" else ("left",)  # int8: its batch tensor differs with the padding
            for side in sides:
                want = qconv_score(model, query, docs, variant, padding_side=side)
                assert max(max_diff(got, want) for got in served) <= 1e-5, side
        assert metric(s, "qconv_pairs_shared_total", model=model.name) == 0


# int8 quantizes each run's activations with one scale: the server runs the template prefix once per
# instruction and the query on top of it, `qconv score` runs a single query's prefix in one piece, so
# their int8 scores differ a little (measured on the trained tiny: max |dP| 8.6e-3; with the template in
# the same run as the query they are identical). fp32 does not drift that way.
PREFIX_TOLERANCE = {"fp32": 1e-5, "int8": 1.5e-2}


@pytest.mark.parametrize("variant", ["int8", "fp32"])
def test_prefix_shared_scores_equal_qconv_score(variant, export, fp32_only, no_torch, tmp_path):
    """By default an export with onnx/prefix/ graphs is served prefix-shared: P(yes) == `qconv score`'s
    prefix-shared scores (fp32 <= 1e-5, int8 within its run-split noise) and, for fp32, its full-prompt
    scores on both padding sides. The shared-pairs counter proves the prefix path ran."""
    model = export if variant == "int8" else fp32_only
    with serving(str(model), block_torch=no_torch, log_dir=tmp_path) as s, s.client() as c:
        card = c.get("/v1/models").json()["data"][0]
        assert (card["variant"], card["share_prefix"]) == (variant, True)
        for query, docs in QUERIES.items():
            served = served_scores(c, query, docs, model.name)
            for side in ("left", "right"):
                shared = max(max_diff(got, qconv_score(model, query, docs, variant, True, side)) for got in served)
                assert shared <= PREFIX_TOLERANCE[variant], (side, shared)
                if variant == "fp32":
                    assert max(max_diff(got, qconv_score(model, query, docs, variant, False, side)) for got in served) <= 1e-5
            assert all(got == served[0] for got in served[1:])  # the same template cache, the same numbers
        routes = 4 * len(QUERIES)  # three rerank routes and /v1/score per query
        assert metric(s, "qconv_pairs_shared_total", model=model.name) == 4 * sum(len(set(d)) for d in QUERIES.values())
        assert metric(s, "qconv_prefix_templates_total", model=model.name, result="miss") == 1
        assert metric(s, "qconv_prefix_templates_total", model=model.name, result="hit") == routes - 1


def test_prefix_sharing_falls_back_to_full_prompts_where_pairs_share_nothing(fp32_only, no_torch, tmp_path):
    """One document, pairs of different queries and exports without onnx/prefix/ run full prompts; a
    request mixing both runs each part its way; every score is `qconv score`'s (fp32, <= 1e-5). A new
    instruction computes its template once; a query that leaves its documents no token is refused."""
    (q1, docs1), (q2, docs2) = list(QUERIES.items())[:2]
    want1, want2 = qconv_score(fp32_only, q1, docs1, "fp32"), qconv_score(fp32_only, q2, docs2, "fp32")
    with serving(str(fp32_only), block_torch=no_torch, log_dir=tmp_path) as s, s.client() as c:
        def shared() -> float:
            return metric(s, "qconv_pairs_shared_total", model=fp32_only.name)

        one = c.post("/rerank", json={"query": q1, "documents": docs1[:1]}).json()
        assert abs(one["results"][0]["relevance_score"] - want1[docs1[0]]) <= 1e-5 and shared() == 0
        zipped = c.post("/score", json={"text_1": [q1, q2], "text_2": [docs1[0], docs2[0]]}).json()
        assert max(abs(d["score"] - w) for d, w in zip(zipped["data"], (want1[docs1[0]], want2[docs2[0]]))) <= 1e-5
        assert shared() == 0
        mixed = c.post("/score", json={"text_1": [q1, q2, q1, q1], "text_2": [docs1[0], docs2[0], docs1[1], docs1[2]]}).json()
        expected = [want1[docs1[0]], want2[docs2[0]], want1[docs1[1]], want1[docs1[2]]]
        assert max(abs(d["score"] - w) for d, w in zip(mixed["data"], expected)) <= 1e-5
        assert shared() == 3  # q1's three documents on q1's prefix, q2's one as a full prompt

        misses = metric(s, "qconv_prefix_templates_total", model=fp32_only.name, result="miss")
        for _ in range(2):
            custom = c.post("/rerank", json={"query": q1, "documents": docs1[:3], "instruction": "Find jokes"}).json()
        from qwen_convert.scoring.score import ScoreOptions, score_documents

        qconv_score_instruction = score_documents(fp32_only, q1, docs1[:3], options=ScoreOptions(
            variant="fp32", instruction="Find jokes", max_length=2048, share_prefix=False)).queries[0].documents
        want = {d.document: d.p_yes for d in qconv_score_instruction}
        assert max_diff({docs1[r["index"]]: r["relevance_score"] for r in custom["results"]}, want) <= 1e-5
        assert metric(s, "qconv_prefix_templates_total", model=fp32_only.name, result="miss") == misses + 1

        long_query = " ".join(f"word{i}" for i in range(3000))  # more than --max-length's 2048 tokens
        message = _error(c.post("/rerank", json={"query": long_query, "documents": ["a", "b"]}), 422, "invalid_request")
        assert "would be cut away entirely" in message

    plain = tmp_path / "no-prefix" / fp32_only.name  # an export without the with-past graphs (older exports)
    shutil.copytree(fp32_only, plain, ignore=shutil.ignore_patterns("prefix"))
    with serving(str(plain), block_torch=no_torch, log_dir=tmp_path) as s, s.client() as c:
        assert c.get("/v1/models").json()["data"][0]["share_prefix"] is False
        assert max(max_diff(got, want1) for got in served_scores(c, q1, docs1, plain.name)) <= 1e-5
        assert metric(s, "qconv_pairs_shared_total", model=plain.name) == 0


def test_rerank_options_dedup_and_score_shapes(server):
    docs = DOCS[:4] + [{"text": DOCS[1]}, DOCS[0]]  # two repeats, one as {text}
    scored_before = metric(server, "qconv_pairs_scored_total")
    with server.client() as c:
        full = c.post("/v1/rerank", json={"model": "tiny", "query": QUERY, "documents": docs}).json()
        assert metric(server, "qconv_pairs_scored_total") - scored_before == 4  # repeats scored once
        assert metric(server, "qconv_pairs_deduplicated_total") >= 2
        by_index = {r["index"]: r["relevance_score"] for r in full["results"]}
        assert by_index[4] == by_index[1] and by_index[5] == by_index[0]
        assert full["usage"]["total_tokens"] > 0

        top = c.post("/rerank", json={"query": QUERY, "documents": docs, "top_n": 2, "return_documents": False}).json()
        assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
        assert all("document" not in r for r in top["results"])

        custom = c.post("/rerank", json={"query": QUERY, "documents": DOCS[:2], "instruction": "Find jokes"}).json()
        assert {r["index"]: r["relevance_score"] for r in custom["results"]} != {i: by_index[i] for i in (0, 1)}

        # the same three pairs in one request each (int8 scores depend on the batch, see qconv_score)
        three = {r["index"]: r["relevance_score"] for r in c.post("/rerank", json={"query": QUERY, "documents": DOCS[:3]}).json()["results"]}
        queries = c.post("/score", json={"queries": [QUERY] * 3, "documents": DOCS[:3]}).json()
        pairwise = c.post("/score", json={"text_1": [QUERY] * 3, "text_2": DOCS[:3]}).json()
        one_query = c.post("/score", json={"text_1": QUERY, "text_2": DOCS[:3]}).json()
        assert [d["score"] for d in queries["data"]] == [d["score"] for d in pairwise["data"]] == [three[i] for i in range(3)]
        assert [d["score"] for d in one_query["data"]] == [three[i] for i in range(3)]
        assert queries["object"] == "list" and queries["data"][0]["object"] == "score"


def test_serving_path_never_imports_torch(server):
    """Torch is unimportable in this process (stub) and no libtorch is mapped into it."""
    with server.client() as c:
        assert c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check sees the libraries that are loaded
    assert "libtorch" not in maps and "torch/lib" not in maps


def test_health_models_metrics_and_page(server):
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok", "models": ["tiny"]}
        c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/rerank" in page.text
    assert metric(server, "qconv_requests_total", endpoint="/v1/rerank", status="200") >= 1
    assert metric(server, "qconv_pairs_scored_total", model="tiny") >= len(DOCS)
    for hist in ("qconv_batch_size", "qconv_queue_duration_seconds", "qconv_inference_duration_seconds"):
        assert metric(server, f"{hist}_count", model="tiny") >= 1
    assert metric(server, "qconv_request_duration_seconds_count", endpoint="/v1/rerank") >= 1
    assert metric(server, "process_resident_memory_bytes") > 0


# --- errors -------------------------------------------------------------------------------------

def _error(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == status and body["error"]["type"] == type_
    return body["error"]["message"]


def test_every_error_has_its_status_and_one_shape(server):
    with server.client() as c:
        assert "valid JSON" in _error(c.post("/v1/rerank", content=b'{"query": "q", "documents": [', headers={"content-type": "application/json"}), 400, "invalid_json")
        _error(c.post("/v1/rerank", content=b"query=q", headers={"content-type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type")
        assert "query" in _error(c.post("/v1/rerank", json={"documents": ["a"]}), 422, "invalid_request")
        assert "query" in _error(c.post("/v1/rerank", json={"query": "", "documents": ["a"]}), 422, "invalid_request")
        assert "documents" in _error(c.post("/v1/rerank", json={"query": "q", "documents": 5}), 422, "invalid_request")
        assert "documents" in _error(c.post("/v1/rerank", json={"query": "q", "documents": []}), 422, "invalid_request")
        _error(c.post("/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": 0}), 422, "invalid_request")
        _error(c.post("/v1/rerank", json=["not", "an", "object"]), 422, "invalid_request")
        assert "limit 64" in _error(c.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 65}), 422, "invalid_request")
        assert "text_1" in _error(c.post("/score", json={"text_1": "q"}), 422, "invalid_request")
        assert "2 queries and 3 documents" in _error(c.post("/score", json={"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}), 422, "invalid_request")
        assert "200000 bytes" in _error(c.post("/v1/rerank", json={"query": "q", "documents": ["x" * 250_000]}), 413, "request_too_large")

        def chunked():  # no Content-Length: the limit counts the bytes as they arrive
            yield b'{"query": "q", "documents": ["'
            for _ in range(30):
                yield b"y" * 10_000
            yield b'"]}'
        _error(c.post("/v1/rerank", content=chunked(), headers={"content-type": "application/json"}), 413, "request_too_large")
        assert "'nope' is not served" in _error(c.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["a"]}), 404, "model_not_found")
        _error(c.get("/no/such/route"), 404, "http_error")
        _error(c.get("/v1/rerank"), 405, "http_error")
        # model management is off unless the operator names directories (tests/test_serve_auth.py turns it on)
        models = c.get("/v1/models").json()
        off = "model management is off on this server (the operator enables /v1/models/load and /unload with --allow-model-dir DIR)"
        assert _error(c.post("/v1/models/load", json={"model": str(server.log.parent)}), 403, "forbidden") == off
        assert _error(c.post("/v1/models/unload", json={"name": "tiny"}), 403, "forbidden") == off
        assert c.get("/v1/models").json() == models
        # the server is still fine
        assert c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:2]}).status_code == 200
    assert metric(server, "qconv_requests_total", endpoint="/v1/rerank", status="413") == 2


def test_full_queue_answers_503_with_retry_after(export, no_torch, tmp_path):
    with serving(str(export), "--max-queue", "6", "--max-batch-size", "1", block_torch=no_torch, log_dir=tmp_path) as s:
        # Long enough that the six pairs are still admitted when the next request arrives, also on a busy
        # CI machine (one LONG_DOC each was answered in full first there, and "one more" got a 200).
        slow = {"query": "q", "documents": [f"{i} {' '.join([LONG_DOC] * 12)}" for i in range(6)]}
        results = {}
        worker = threading.Thread(target=lambda: results.setdefault("slow", s.client().post("/v1/rerank", json=slow)))
        worker.start()
        deadline = time.monotonic() + 20
        while metric(s, "qconv_queue_pairs", model="tiny") < 6:  # the slow request is admitted
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with s.client() as c:
            refused = c.post("/v1/rerank", json={"query": "q", "documents": ["one more"]})
        assert "limit 6" in _error(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "1"
        worker.join(60)
        assert results["slow"].status_code == 200 and len(results["slow"].json()["results"]) == 6
        with s.client() as c:  # capacity is back once the slow request is answered
            assert c.post("/v1/rerank", json={"query": "q", "documents": ["one more"]}).status_code == 200
        assert metric(s, "qconv_rejected_requests_total", reason="queue_full") == 1


def test_a_cancelled_request_stops_costing_compute(export, no_torch, tmp_path):
    """A client that hangs up: its pairs still queued are dropped, not scored."""
    n = 40
    with serving(str(export), "--max-batch-size", "1", block_torch=no_torch, log_dir=tmp_path) as s:
        body = json.dumps({"query": "q", "documents": [f"{i} {LONG_DOC}" for i in range(n)]}).encode()
        port = int(s.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 20
            while metric(s, "qconv_queue_pairs", model="tiny") < n:  # all admitted, the first batches running
                assert time.monotonic() < deadline
                time.sleep(0.02)
        # the client hung up
        deadline = time.monotonic() + 30
        while (metric(s, "qconv_pairs_cancelled_total", model="tiny") + metric(s, "qconv_pairs_scored_total", model="tiny")) < n:
            assert time.monotonic() < deadline, "the abandoned pairs were neither scored nor dropped"
            time.sleep(0.05)
        scored = metric(s, "qconv_pairs_scored_total", model="tiny")
        assert metric(s, "qconv_pairs_cancelled_total", model="tiny") + scored == n
        assert metric(s, "qconv_queue_pairs", model="tiny") == 0
        assert scored < n / 2, f"{scored} of {n} pairs were scored after the client left"


def test_hot_swap_under_load_drops_nothing(export, fp32_only, no_torch, tmp_path):
    """Concurrent clients keep calling model "a" while it is swapped int8 -> fp32 -> int8 and a
    second model comes and goes: every request is answered 200, by the variant served at the time."""
    allow = ["--allow-model-dir", str(export.parent), "--allow-model-dir", str(fp32_only.parent)]
    with serving(str(export), "--name", "a", *allow, block_torch=no_torch, log_dir=tmp_path) as s:
        answers: list[tuple[int, float]] = []
        swapping = True

        async def client(i: int):
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                while swapping:
                    r = await c.post("/v1/rerank", json={"model": "a", "query": QUERY, "documents": DOCS})
                    answers.append((r.status_code, r.json()["results"][0]["relevance_score"] if r.status_code == 200 else r.text))

        async def swaps():
            nonlocal swapping
            async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
                await asyncio.sleep(0.5)
                steps = [("load", {"model": str(fp32_only), "name": "a"}), ("load", {"model": str(export), "name": "b"}),
                         ("unload", {"name": "b"}), ("load", {"model": str(export), "name": "a"}),
                         ("load", {"model": str(fp32_only), "name": "a"})]
                variants = []
                for action, body in steps:
                    r = await c.post(f"/v1/models/{action}", json=body)
                    assert r.status_code == 200, r.text
                    variants.append(r.json().get("variant"))
                    await asyncio.sleep(0.3)
                models = (await c.get("/v1/models")).json()["data"]
            swapping = False
            return variants, models

        async def main():
            results = await asyncio.gather(swaps(), *(client(i) for i in range(8)))
            return results[0]

        with s.client() as c:
            int8_top = c.post("/v1/rerank", json={"model": "a", "query": QUERY, "documents": DOCS}).json()["results"][0]["relevance_score"]
        variants, models = asyncio.run(main())
        assert variants == ["fp32", "int8", None, "int8", "fp32"]
        assert [(m["id"], m["variant"]) for m in models] == [("a", "fp32")]
        with s.client() as c:
            fp32_top = c.post("/v1/rerank", json={"model": "a", "query": QUERY, "documents": DOCS}).json()["results"][0]["relevance_score"]
        statuses = [code for code, _ in answers]
        assert len(answers) >= 16 and statuses.count(200) == len(answers), [a for a in answers if a[0] != 200][:3]
        # int8 scores move a little with their batch companions (dynamic activation scales); fp32's do not
        by_fp32 = [abs(score - fp32_top) <= 1e-5 for _, score in answers]
        assert all(f or abs(score - int8_top) <= 1e-2 for f, (_, score) in zip(by_fp32, answers))
        assert any(by_fp32) and not all(by_fp32)  # both variants answered during the swaps


def test_an_unloaded_model_is_freed(export):
    """After unload (or a swap) nothing keeps the old model, its sessions and its template caches alive:
    per-class caches keyed by the model once did, until 64 other entries pushed it out."""
    import gc
    import weakref

    from qwen_convert.serve.metrics import ServerMetrics
    from qwen_convert.serve.options import ModelSpec, ServeOptions
    from qwen_convert.serve.registry import ModelRegistry

    async def main():
        registry = ModelRegistry(ServeOptions(), ServerMetrics())
        model = registry.preload(ModelSpec(str(export), "a"))
        registry.start()
        scores = await registry.score("a", [Pair(QUERY, d) for d in DOCS[:3]], "an instruction")
        assert model.templates is not None and len(scores.p_yes) == 3
        ref = weakref.ref(model)
        del model
        await registry.unload("a")
        return ref

    ref = asyncio.run(main())
    gc.collect()
    assert ref() is None


def test_sigterm_drains_in_flight_requests(export, no_torch, tmp_path):
    with serving(str(export), "--max-batch-size", "1", block_torch=no_torch, log_dir=tmp_path) as s:
        body = {"query": "q", "documents": [f"{i} {LONG_DOC}" for i in range(6)]}
        results = {}
        worker = threading.Thread(target=lambda: results.setdefault("r", httpx.post(f"{s.url}/v1/rerank", json=body, timeout=60)))
        worker.start()
        deadline = time.monotonic() + 20
        while metric(s, "qconv_queue_pairs", model="tiny") < 6:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        worker.join(60)
        assert results["r"].status_code == 200 and len(results["r"].json()["results"]) == 6
        assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained on
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health", timeout=2)
        assert "Application shutdown complete" in s.log.read_text()


# --- startup --------------------------------------------------------------------------------------

def test_several_models_by_name_and_startup_errors(export, fp32_only, no_torch, tmp_path):
    with serving(str(export), str(fp32_only), "--name", "small", block_torch=no_torch, log_dir=tmp_path) as s, s.client() as c:
        cards = {m["id"]: (m["variant"], m["default"]) for m in c.get("/v1/models").json()["data"]}
        assert cards == {"small": ("int8", True), "tiny-fp32": ("fp32", False)}
        a = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()
        b = c.post("/v1/rerank", json={"model": "tiny-fp32", "query": QUERY, "documents": DOCS}).json()
        assert (a["model"], b["model"]) == ("small", "tiny-fp32") and a["results"] != b["results"]

    bad = subprocess.run([QCONV, "serve", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "is not a directory" in bad.stderr
    variant = subprocess.run([QCONV, "serve", str(fp32_only), "--variant", "q4"], capture_output=True, text=True, timeout=60)
    assert variant.returncode == 1 and "has no q4 variant" in variant.stderr and "present: fp32" in variant.stderr


def test_default_variant_is_the_fastest_that_passed_its_gate(tmp_path):
    """serve picks as `qconv score` does (scoring/choose.py): only variants a verify report passed,
    the speed on this CPU deciding between several (not measured here: one candidate each time)."""
    from qwen_convert.errors import SourceError
    from qwen_convert.scoring.choose import choose_variant

    run = tmp_path / "run"
    export = run / "onnx"
    (export / "onnx").mkdir(parents=True)
    for f in ("model.onnx", "model_quantized.onnx", "model_q4.onnx", "model_fp16.onnx"):
        (export / "onnx" / f).write_bytes(b"")
    report = {"candidates": [{"name": f"onnx/{m}", "path": str(export), "passed": ok}
                             for m, ok in (("fp32", False), ("int8", False), ("q4", True), ("fp16", False))]}
    (run / "verify.json").write_text(json.dumps(report))  # where `qconv run` writes it
    assert choose_variant(export).mode.value == "q4"  # the one that passed its gate
    assert choose_variant(export, provider="CUDAExecutionProvider").mode.value == "q4"
    assert choose_variant(export, "int8").mode.value == "int8"  # asked for: served
    (run / "verify.json").write_text(json.dumps({"candidates": [dict(c, passed=False) for c in report["candidates"]]}))
    with pytest.raises(SourceError, match="no variant .* passed its gate"):
        choose_variant(export)
    (run / "verify.json").unlink()
    (export / "onnx" / "model_quantized.onnx").unlink()
    assert choose_variant(export).mode.value == "fp32"  # no report, no int8: fp32


def test_serve_opens_the_variant_score_chooses(export, tiny_models, tmp_path, monkeypatch):
    """The served variant and its kernels are scoring's: the choice (with its reason) is the one
    scoring.choose makes, and a q4 graph on the CPU runs int8 kernels, as verify checked it."""
    from qwen_convert.scoring.choose import choose_variant
    from qwen_convert.serve.engine import load_model
    from qwen_convert.serve.options import ModelSpec, ServeOptions

    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path))
    options = ServeOptions(providers=("CPUExecutionProvider",))
    model = load_model(ModelSpec(str(export)), options)
    expected = choose_variant(export, cache=tmp_path / "variant-choice.json")
    assert model.engine.variant == expected.mode.value and model.engine.choice.mode is expected.mode
    assert model.engine.choice.reason in ("measured", "cached measurement", "only candidate")
    from qwen_convert.onnx.export import ExportOptions, export_onnx

    q4_export = tmp_path / "q4"
    export_onnx(tiny_models["tied_fp32"], q4_export, ExportOptions(modes=("q4",), verify=False, prefix_graphs=False,
                                                                   quant_method="naive"))
    q4 = load_model(ModelSpec(str(q4_export), variant="q4"), options)
    assert q4.engine.variant == "q4" and "DynamicQuantizeMatMul" in q4.engine.kernels
