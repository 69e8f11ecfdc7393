"""Who may call `qconv serve` (issue #22): the API key, model management, and what errors reveal.

Real `qconv serve` processes on 127.0.0.1 (torch blocked, as in test_serve.py), called over HTTP; the
policy's pieces (key comparison, Bearer parsing, path redaction, start-up checks) also as functions.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from servers import QCONV, export, fp32_only, no_torch, serving  # noqa: F401

from qwen_convert.serve import access as access_mod
from qwen_convert.serve.access import AccessError, bearer, key_matches, redact, resolve_access
from qwen_convert.serve.options import AccessOptions

KEY = "k3y-for-tests_0123456789abcdef"
ADMIN = "adm1n-for-tests_fedcba9876543210"
QUERY = "what does a reranker do"
DOCS = ["A reranker scores how well a document answers a query.", "Bananas are yellow.", "Cats sleep a lot."]
OUTSIDE = ("this server does not load models from that path (models load only from the directories the operator "
           "allowed with --allow-model-dir)")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == status and body["error"]["type"] == type_
    return body["error"]["message"]


def offline_scores(model: Path, docs: list[str]) -> dict[str, float]:
    """`qconv score`'s library function, prefix-shared as the server scores one query's documents."""
    from qwen_convert.scoring.score import ScoreOptions, score_documents

    result = score_documents(model, QUERY, docs, options=ScoreOptions(variant="int8", batch_size=64, max_length=2048))
    assert result.shared_pairs == len(docs)
    return {d.document: d.p_yes for d in result.queries[0].documents}


# int8: the server runs the template prefix apart from the query (it keeps the template's cache), `qconv
# score` runs them in one piece, and int8 scales each run's activations: tests/test_serve.py, PREFIX_TOLERANCE.
INT8_PREFIX_TOLERANCE = 1.5e-2


def metric_with_key(url: str, name: str, key: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return sum(s.value for f in text_string_to_metric_families(r.text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def allowed(export, tmp_path_factory) -> Path:
    """A directory models may be loaded from: a copy of the export and a link to it (both inside), and a
    link that leads out."""
    root = tmp_path_factory.mktemp("allowed")
    shutil.copytree(export, root / "copy")
    (root / "inside").symlink_to(root / "copy", target_is_directory=True)
    (root / "escape").symlink_to(export.parent, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def keyed(export, allowed, no_torch, tmp_path_factory):
    """The key from the environment (as the container passes it), management on inside `allowed`."""
    with serving(str(export), "--allow-model-dir", str(allowed), env={"QCONV_API_KEY": KEY}, block_torch=no_torch,
                 log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


# --- the key ---------------------------------------------------------------------------------------

def test_anonymous_and_wrong_keys_get_401_and_change_nothing(keyed):
    with keyed.client(headers=auth(KEY)) as c:
        models = c.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    scored_before = metric_with_key(keyed.url, "qconv_pairs_scored_total", KEY, model="tiny")
    with keyed.client() as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok", "models": ["tiny"]}  # open: load balancers call it
        page = anonymous.get("/")
        assert page.status_code == 200 and "apikey" in page.text and "Authorization" in page.text
        assert page.headers["x-frame-options"] == "DENY"
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/rerank", {"query": QUERY, "documents": DOCS}),
                                   ("POST", "/rerank", {"query": QUERY, "documents": DOCS}),
                                   ("POST", "/v1/score", {"text_1": QUERY, "text_2": DOCS}),
                                   ("POST", "/v1/models/unload", {"name": "tiny"}),
                                   ("POST", "/v1/models/load", {"model": "/etc"}), ("GET", "/metrics", None),
                                   ("GET", "/no/such/route", None)]:
            for headers, header_value, message in [
                    ({}, "Bearer", "this server needs an API key: send Authorization: Bearer KEY"),
                    (auth("wrong-key"), 'Bearer error="invalid_token"', "invalid API key"),
                    (auth(KEY + "x"), 'Bearer error="invalid_token"', "invalid API key"),
                    ({"Authorization": f"Basic {KEY}"}, "Bearer", "this server needs an API key: send Authorization: Bearer KEY")]:
                r = anonymous.request(method, path, json=body, headers=headers)
                assert error(r, 401, "unauthorized") == message, (method, path)
                assert r.headers["www-authenticate"] == header_value
    with keyed.client(headers=auth(KEY)) as c:
        assert c.get("/v1/models").json() == models  # the anonymous unload and load changed nothing
    # nothing was scored for them, and the refusals are counted
    assert metric_with_key(keyed.url, "qconv_pairs_scored_total", KEY, model="tiny") == scored_before
    assert metric_with_key(keyed.url, "qconv_requests_total", KEY, endpoint="/v1/rerank", status="401") == 4
    assert metric_with_key(keyed.url, "qconv_requests_total", KEY, endpoint="/v1/models/unload", status="401") == 4


def test_the_right_key_gets_the_scores(keyed, export):
    want = offline_scores(export, DOCS)
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
            r = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers={"Authorization": f"{scheme} {KEY}"})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert sorted(x["index"] for x in results) == [0, 1, 2]
            for x in results:
                assert abs(x["relevance_score"] - want[DOCS[x["index"]]]) <= INT8_PREFIX_TOLERANCE
            served = {x["index"]: x["relevance_score"] for x in results}
        scored = c.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS}, headers=auth(KEY)).json()
        assert [d["score"] for d in scored["data"]] == [served[i] for i in range(len(DOCS))]  # the same path and cache
    assert max(want.values()) - min(want.values()) > 0.1  # the scores tell the documents apart


def test_the_key_from_the_environment_is_not_in_argv(keyed):
    cmdline = Path(f"/proc/{keyed.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"serve" == a for a in cmdline)  # it is the server's argv
    assert not [a for a in cmdline if KEY.encode() in a]
    assert f"QCONV_API_KEY={KEY}".encode() in Path(f"/proc/{keyed.proc.pid}/environ").read_bytes().split(b"\0")
    assert KEY not in keyed.log.read_text()  # nor in its log


# --- model management ------------------------------------------------------------------------------

def test_management_loads_only_from_the_allowed_directories(keyed, allowed, export):
    with keyed.client(headers=auth(KEY)) as c:
        before = c.get("/v1/models").json()
        refused = [str(export),  # exists, outside
                   str(export.parent / "nothing-here"),  # does not exist, outside
                   str(allowed / "escape" / export.name),  # a symlink inside that leads out
                   str(allowed / ".." / export.parent.name / export.name),  # .. out of the directory
                   "/etc", "/", "relative/path", "~", str(allowed) + "/../../../../etc/passwd"]
        for path in refused:
            r = c.post("/v1/models/load", json={"model": path, "name": "x"})
            assert error(r, 403, "forbidden") == OUTSIDE, path  # one message, whatever exists there
        assert c.get("/v1/models").json() == before

        # inside (through a symlink that stays inside): loaded, served under the name as sent, same scores
        card = c.post("/v1/models/load", json={"model": str(allowed / "inside")})
        assert card.status_code == 200, card.text
        assert (card.json()["id"], card.json()["variant"]) == ("inside", "int8")
        a = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()["results"]
        b = c.post("/v1/rerank", json={"model": "inside", "query": QUERY, "documents": DOCS}).json()["results"]
        assert a == b

        # a failure inside names the path as the client sent it (a link), never the one it resolves to
        sent = str(allowed / "inside")
        message = error(c.post("/v1/models/load", json={"model": sent, "variant": "q4"}), 400, "invalid_model")
        assert message == f"{sent} has no q4 variant (model_q4.onnx) (present: fp32, int8)"
        message = error(c.post("/v1/models/load", json={"model": str(allowed / "missing")}), 400, "invalid_model")
        assert message.startswith(f"{allowed / 'missing'} is not a directory")
        assert error(c.post("/v1/models/load", json={"model": "inside"}), 403, "forbidden") == OUTSIDE  # cwd-relative

        unloaded = c.post("/v1/models/unload", json={"name": "inside"})
        assert unloaded.status_code == 200 and unloaded.json() == before
    log = keyed.log.read_text()
    assert "refused a model load outside the allowed directories: '/etc'" in log  # the operator sees the attempts


def test_admin_key_from_a_file_guards_management(export, allowed, no_torch, tmp_path):
    (tmp_path / "api").write_text(KEY + "\n")
    (tmp_path / "admin").write_text(ADMIN)
    with serving(str(export), "--allow-model-dir", str(allowed), "--api-key-file", str(tmp_path / "api"),
                 "--admin-key-file", str(tmp_path / "admin"), block_torch=no_torch, log_dir=tmp_path) as s, s.client() as c:
        load = {"model": str(allowed / "inside"), "name": "second"}
        r = c.post("/v1/models/load", json=load, headers=auth(KEY))
        assert error(r, 403, "forbidden") == "this route needs the admin key"
        assert r.headers["www-authenticate"] == 'Bearer error="insufficient_scope"'
        assert error(c.post("/v1/models/unload", json={"name": "tiny"}, headers=auth(KEY)), 403, "forbidden") == "this route needs the admin key"
        assert error(c.post("/v1/models/load", json=load), 401, "unauthorized").startswith("this server needs an API key")
        assert [m["id"] for m in c.get("/v1/models", headers=auth(KEY)).json()["data"]] == ["tiny"]
        assert c.post("/v1/models/load", json=load, headers=auth(ADMIN)).json()["id"] == "second"
        # the admin key works everywhere, the API key everywhere else
        for key in (KEY, ADMIN):
            r = c.post("/v1/rerank", json={"model": "second", "query": QUERY, "documents": DOCS}, headers=auth(key))
            assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert [m["id"] for m in c.get("/v1/models", headers=auth(KEY)).json()["data"]] == ["tiny", "second"]
        assert error(c.get("/metrics"), 401, "unauthorized")


def test_public_metrics_is_the_only_other_open_route(export, no_torch, tmp_path):
    with serving(str(export), "--public-metrics", env={"QCONV_API_KEY": KEY}, block_torch=no_torch, log_dir=tmp_path) as s, s.client() as c:
        assert c.get("/metrics").status_code == 200 and "qconv_requests_total" in c.get("/metrics").text
        error(c.get("/v1/models"), 401, "unauthorized")
        off = error(c.post("/v1/models/load", json={"model": "/etc"}, headers=auth(KEY)), 403, "forbidden")
        assert off.startswith("model management is off on this server")


# --- start-up ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, env, message", [
    (["--api-key-file", "/no/such/key"], {}, "error: cannot read the API key from /no/such/key: No such file or directory"),
    (["--api-key", "two words"], {}, "error: the API key holds a character a Bearer token cannot carry (' ')"),
    (["--api-key-file", "{empty}"], {}, "error: the API key is empty"),
    (["--api-key-file", "{key}"], {"QCONV_API_KEY": KEY}, "error: the API key is given twice"),
    ([], {"QCONV_API_KEY": ""}, "error: QCONV_API_KEY is set but empty"),
    (["--admin-key", ADMIN], {}, "error: an admin key guards model management, which is off"),
    (["--allow-model-dir", "/no/such/dir"], {}, "error: --allow-model-dir /no/such/dir is not a directory"),
    (["--allow-model-dir", "/"], {}, "error: --allow-model-dir / would let clients load from anywhere"),
    (["--allow-model-dir", "{tmp}", "--admin-key", KEY], {"QCONV_API_KEY": KEY}, "error: the admin key is the API key"),
])
def test_bad_access_options_fail_start_up_in_one_line(args, env, message, export, tmp_path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "key").write_text(KEY)
    args = [a.format(empty=tmp_path / "empty", key=tmp_path / "key", tmp=tmp_path) for a in args]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QCONV_")} | env
    r = subprocess.run([QCONV, "serve", str(export), "--port", "1", *args], capture_output=True, text=True, timeout=60, env=environ)
    assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert KEY not in r.stderr and ADMIN not in r.stderr


def test_an_open_server_on_another_address_is_warned_about(caplog):
    from qwen_convert.serve.access import Access
    from qwen_convert.serve.server import _warn_if_open

    with caplog.at_level("WARNING", logger="qconv.serve"):
        _warn_if_open(Access(api_key=KEY.encode()), "0.0.0.0")
        assert caplog.messages == []
        _warn_if_open(Access(model_dirs=(Path("/models"),)), "0.0.0.0")
    assert caplog.messages == [
        "serving 0.0.0.0 without an API key: anyone who reaches the port can score (set QCONV_API_KEY)",
        "model management is on without a key: anyone who reaches the port can load models from the allowed "
        "directories and unload any (set QCONV_API_KEY or QCONV_ADMIN_KEY)"]


def test_help_never_shows_the_key():
    environ = dict(os.environ, QCONV_API_KEY=KEY, QCONV_ADMIN_KEY=ADMIN)
    r = subprocess.run([QCONV, "serve", "--help"], capture_output=True, text=True, timeout=60, env=environ)
    assert r.returncode == 0 and "QCONV_API_KEY" in r.stdout and "--allow-model-dir" in r.stdout
    assert KEY not in r.stdout and ADMIN not in r.stdout


# --- the pieces -------------------------------------------------------------------------------------

def test_keys_are_compared_in_constant_time(monkeypatch):
    seen = []
    real = access_mod.hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(access_mod.hmac, "compare_digest", spy)
    assert key_matches(b"secret", b"secret")
    assert not key_matches(b"secret", b"secreT")
    assert not key_matches(b"s", b"secret-of-another-length")
    assert not key_matches(None, b"secret") and not key_matches(b"secret", None)
    # every comparison went through compare_digest on equal-length digests: no early exit, no length leak
    assert seen == [(32, 32)] * 3


def test_a_request_hashes_only_the_credential_it_sends(monkeypatch):
    """The keys' digests are computed once, when the policy is built: a keyed request costs one SHA-256
    (of what it sends), a public route or a server without a key none, and not even a header scan."""
    from qwen_convert.serve.access import Access

    hashed = []
    real = access_mod.hashlib.sha256
    monkeypatch.setattr(access_mod.hashlib, "sha256", lambda data: hashed.append(data) or real(data))
    keyed, admin = Access(api_key=b"k1"), Access(api_key=b"k1", admin_key=b"a1", model_dirs=(Path("/m"),))
    assert hashed == [b"k1", b"k1", b"a1"]
    hashed.clear()
    headers = [(b"host", b"x"), (b"authorization", b"Bearer k1")]
    for _ in range(5):
        assert keyed.check_request("/v1/rerank", headers) is None
    assert hashed == [b"k1"] * 5
    assert keyed.check_request("/v1/rerank", [(b"authorization", b"Bearer k2")]).status == 401
    assert admin.check_request("/v1/models/load", headers).status == 403  # the API key on an admin route
    assert admin.check_request("/v1/models/load", [(b"authorization", b"Bearer a1")]) is None
    hashed.clear()

    class NoScan(list):
        def __iter__(self):
            raise AssertionError("the headers were read")

    assert keyed.check_request("/health", NoScan()) is None and Access().check_request("/v1/rerank", NoScan()) is None
    assert hashed == []


def test_bearer_credentials_are_parsed_strictly():
    assert bearer([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer([(b"Authorization", b"bearer   abc  ")]) == b"abc"
    assert bearer([(b"authorization", b"Basic abc")]) is None
    assert bearer([(b"authorization", b"Bearer")]) is None
    assert bearer([(b"authorization", b"abc")]) is None
    assert bearer([(b"x-api-key", b"abc")]) is None and bearer([]) is None


def test_redaction_keeps_what_the_client_sent_and_hides_the_rest():
    message = "/real/models/m/onnx has no q4 variant; see /srv/secret/log.txt or http://host/x (fp32/int8)"
    assert redact(message, {"/real/models/m": "/models/m"}) == \
        "/models/m/onnx has no q4 variant; see <path> or http://host/x (fp32/int8)"
    assert redact("cannot load /a/b: No such file", None) == "cannot load <path>: No such file"
    assert redact("/real/x is not a directory", {"/real/x": "rel/x"}) == "rel/x is not a directory"


@pytest.mark.parametrize("path", ["full prompts", "prefix-shared"])
def test_internal_errors_answer_an_id_not_the_exception(path, export, tmp_path, caplog):
    """An engine failure whose text holds a host path, in the full-prompt graph or the with-past graph
    that scores a query's documents on their shared prefix: the client gets an id, the log the path."""
    from qwen_convert.serve.app import build_app
    from qwen_convert.serve.metrics import ServerMetrics
    from qwen_convert.serve.options import ModelSpec, ServeOptions
    from qwen_convert.serve.registry import ModelRegistry

    options = ServeOptions()
    metrics = ServerMetrics()
    registry = ModelRegistry(options, metrics)
    model = registry.preload(ModelSpec(str(export)))
    secret = f"{export}/onnx/model_quantized.onnx"

    def broken(*args):
        raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : cannot read {secret}")

    if path == "full prompts":
        model.engine.score = broken
        model.prefix = None  # (as --no-share-prefix)
    else:
        model.prefix.score_suffix = model.prefix.start_suffixes = broken
    app = build_app(registry, metrics, options, resolve_access(AccessOptions(api_key=KEY)))

    async def call():
        registry.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test") as c:
                return await c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers=auth(KEY))
        finally:
            await registry.close()

    with caplog.at_level("ERROR", logger="qconv.serve"):
        r = asyncio.run(call())
    message = error(r, 500, "internal_error")
    assert message.startswith("internal error ") and message.endswith("(the server's log has the details)")
    incident = message.split()[2]
    assert len(incident) == 12 and str(export) not in r.text
    assert any(incident in rec.getMessage() and secret in rec.getMessage() for rec in caplog.records)


def test_access_options_never_print_a_key():
    options = AccessOptions(api_key=KEY, admin_key=ADMIN, model_dirs=("/tmp",))
    assert KEY not in repr(options) and ADMIN not in repr(options)
    resolved = resolve_access(options)
    assert KEY not in repr(resolved) and ADMIN not in repr(resolved)
    with pytest.raises(AccessError):
        resolve_access(AccessOptions(api_key=KEY, admin_key=KEY, model_dirs=("/tmp",)))
    assert resolved.management and resolved.model_dirs == (Path("/tmp").resolve(),)


# --- a client that holds the key: qconv verify against the keyed server ----------------------------

def test_verify_sends_the_key_from_the_environment(keyed):
    """`qconv verify REF URL` sends QCONV_API_KEY as a Bearer key; without it, one line that names the fix."""
    cmd = [QCONV, "verify", "qconv:tiny-reranker", keyed.url, "--precision", "int8", "--json", "--quiet", "--no-cache"]
    env = {k: v for k, v in os.environ.items() if k != "QCONV_API_KEY"}
    without = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert without.returncode == 1 and "Traceback" not in without.stderr
    assert without.stderr.strip().count("\n") == 0 and "HTTP 401: it needs an API key" in without.stderr
    assert "QCONV_API_KEY" in without.stderr
    wrong = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "QCONV_API_KEY": "wrong"})
    assert wrong.returncode == 1 and "the API key was refused" in wrong.stderr
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "QCONV_API_KEY": KEY})
    report = json.loads(ok.stdout)
    assert ok.returncode == 0, report["candidates"][0]["failures"]
    [server] = report["candidates"]
    assert server["engine"] == "server" and server["precision"] == "int8" and server["max_abs_prob"] < 0.1
