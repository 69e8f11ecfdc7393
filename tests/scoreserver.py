"""A small reranking server on 127.0.0.1 for `qconv verify URL` tests: real scores, switchable faults.

It serves a `qconv seqcls` directory the way a deployment would, independently of qconv's own
prompt code: the prompt is the directory's chat_template.jinja rendered by transformers'
apply_chat_template (as sentence-transformers and vLLM render it), scored by
AutoModelForSequenceClassification. Routes: /rerank and /v1/rerank (vLLM/Cohere shape), /score and
/v1/score (vLLM, text_1/text_2 or queries/documents), /tei/rerank (TEI shape, under a prefix so that
/rerank stays vLLM's).

Modes (ScoreServer.mode, switchable between requests):
  correct      the right prompt, fp32
  no-template  query + document without the template (vLLM started without --chat-template)
  ignore-instruction  the request's `instruction` is dropped (the template's default applies)
  constant     0.5 for everything (a zero head)
  fp16         P rounded through float16 (a server computing in reduced precision)
  logits       raw logits instead of P(yes)
  http500      HTTP 500 with a JSON error
  nonjson      HTTP 200 with an HTML page
  slow         sleeps `slow_seconds` before answering
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODES = ("correct", "no-template", "ignore-instruction", "constant", "fp16", "logits", "http500", "nonjson", "slow")


class _Model:
    def __init__(self, path: Path):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.template = (Path(path) / "chat_template.jinja").read_text(encoding="utf-8")
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def logits(self, query: str, documents: list[str], instruction: str | None, template: bool) -> list[float]:
        import torch

        out = []
        for doc in documents:
            if template:
                messages = [{"role": "query", "content": query}, {"role": "document", "content": doc}]
                kwargs = {"instruction": instruction} if instruction is not None else {}
                text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False, **kwargs)
            else:
                text = query + doc
            ids = self.tokenizer(text, return_tensors="pt")
            with self.lock, torch.inference_mode():
                out.append(float(self.model(**ids).logits[0, 0]))
        return out


class ScoreServer:
    """`with ScoreServer(seqcls_dir) as server: server.url ...`; set `server.mode` to a MODES entry."""

    def __init__(self, model_dir: Path, mode: str = "correct", slow_seconds: float = 5.0):
        self.model = _Model(Path(model_dir))
        self.mode = mode
        self.slow_seconds = slow_seconds
        self.requests = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def scores(self, query: str, documents: list[str], instruction: str | None) -> list[float]:
        import numpy as np

        mode = self.mode
        if mode == "constant":
            return [0.5] * len(documents)
        if mode == "ignore-instruction":
            instruction = None
        logits = self.model.logits(query, documents, instruction, template=mode != "no-template")
        if mode == "logits":
            return logits
        p = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
        if mode == "fp16":
            # fp16 activations move P by ~1e-3 on these models: round the logit to fp16 and add that much.
            p = 1.0 / (1.0 + np.exp(-(np.asarray(logits, dtype=np.float16).astype(np.float64) + 5e-3)))
        return [float(np.float32(v)) for v in p]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj):
                self._send(status, json.dumps(obj).encode())

            def do_GET(self):
                if self.path == "/health":
                    return self._send(200, b"")
                self._json(404, {"detail": "Not Found"})

            def do_POST(self):
                server.requests += 1
                length = int(self.headers.get("Content-Length", 0))
                try:
                    req = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self._json(400, {"error": "bad json"})
                mode = server.mode
                if mode == "slow":
                    time.sleep(server.slow_seconds)
                if mode == "http500":
                    return self._json(500, {"error": {"message": "EngineCore died", "type": "InternalServerError"}})
                if mode == "nonjson":
                    return self._send(200, b"<!doctype html><html><body>It works!</body></html>", "text/html")
                route = {"/rerank": "rerank", "/v1/rerank": "rerank", "/score": "score", "/v1/score": "score",
                         "/tei/rerank": "tei"}.get(self.path.split("?")[0])
                if route is None:
                    return self._json(404, {"detail": "Not Found"})
                instruction = req.get("instruction")
                if route == "rerank":
                    if "query" not in req or "documents" not in req:
                        return self._json(422, {"detail": "query and documents are required"})
                    docs = req["documents"]
                    scores = server.scores(req["query"], docs, instruction)
                    results = sorted(({"index": i, "document": {"text": d}, "relevance_score": s}
                                      for i, (d, s) in enumerate(zip(docs, scores))), key=lambda r: -r["relevance_score"])
                    return self._json(200, {"id": "rerank-1", "model": "test", "results": results})
                if route == "score":
                    query, docs = req.get("text_1", req.get("queries")), req.get("text_2", req.get("documents"))
                    if not isinstance(query, str) or docs is None:
                        return self._json(422, {"detail": "text_1 and text_2 are required"})
                    docs = docs if isinstance(docs, list) else [docs]
                    scores = server.scores(query, docs, instruction)
                    return self._json(200, {"object": "list", "data": [{"index": i, "object": "score", "score": s}
                                                                         for i, s in enumerate(scores)]})
                docs = req.get("texts")
                if docs is None:
                    return self._json(422, {"error": "texts is required"})
                scores = server.scores(req["query"], docs, None)
                return self._json(200, [{"index": i, "score": s} for i, s in enumerate(scores)])

        return Handler
