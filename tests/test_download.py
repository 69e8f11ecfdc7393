"""Downloads through the real `modelscope` and `huggingface_hub` clients, from local hub servers.

Nothing here is mocked: tests/hubserver.py runs HTTP servers on 127.0.0.1 that speak the two hubs'
APIs, the clients are pointed at them through their own endpoint settings, and every other host
is refused at name resolution so a stray request fails at once instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hubserver import MODEL, HubRepo, HubServer, hubs, local_network_only, repo, source_model  # noqa: F401
from typer.testing import CliRunner

from qwen_convert.checkpoint.files import open_checkpoint
from qwen_convert.cli import app
from qwen_convert.errors import DownloadError
from qwen_convert.hub.download import DownloadOptions, download_model, map_revision, select_files, source_order
from qwen_convert.hub.hubs import RemoteFile
from qwen_convert.hub.resolve import resolve_model


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _same_bytes(path: Path, source_model: Path) -> None:
    for f in source_model.iterdir():
        if f.is_file():
            assert (path / f.name).read_bytes() == f.read_bytes(), f.name


def test_source_order_revision_mapping_and_selection(monkeypatch):
    monkeypatch.delenv("QCONV_SOURCE", raising=False)
    assert source_order(None) == ("modelscope", "huggingface")
    assert source_order("hf") == ("huggingface",)
    monkeypatch.setenv("QCONV_SOURCE", "huggingface")
    assert source_order(None) == ("huggingface",)
    assert source_order("modelscope") == ("modelscope",)
    with pytest.raises(DownloadError, match="unknown source"):
        source_order("github")
    assert map_revision("modelscope", "main") == "master"
    assert map_revision("huggingface", "master") == "main"
    assert map_revision("huggingface", None) == "main"
    assert map_revision("modelscope", "v1.0") == "v1.0"
    listing = [RemoteFile(n) for n in ("config.json", "model.safetensors", "pytorch_model.bin", "optimizer.pt",
                                      "tokenizer.json", "chat_template.jinja", "README.md", "onnx/model.onnx", "LICENSE")]
    assert sorted(f.name for f in select_files(listing)) == ["README.md", "chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"]
    with pytest.raises(DownloadError, match="only pickle weights"):
        select_files([RemoteFile("config.json"), RemoteFile("pytorch_model.bin")])


def test_modelscope_serves_first(hubs, source_model):
    result = download_model(MODEL)
    assert (result.source, result.revision, result.endpoint) == ("modelscope", "master", hubs.ms.url)
    assert hubs.hf.requests == []
    _same_bytes(result.path, source_model)
    assert (result.path / "README.md").is_file()
    assert not (result.path / "pytorch_model.bin").exists()
    assert "pytorch_model.bin" not in hubs.ms.file_requests()
    assert result.path.is_relative_to(hubs.tmp / "ms-cache")
    open_checkpoint(result.path)


@pytest.mark.parametrize("failure", ["404", "500", "down"])
def test_modelscope_failure_falls_back_to_huggingface(hubs, source_model, failure):
    if failure == "down":
        hubs.point_ms_at(f"http://127.0.0.1:{_closed_port()}")
    else:
        hubs.ms.status = int(failure)
    result = download_model(MODEL)
    assert result.source == "huggingface"
    assert result.revision == "main" and result.commit == hubs.hf.repos[MODEL].commit
    assert [a.source for a in result.failed] == ["modelscope"]
    expected = {"404": "not found", "500": "HTTP 500", "down": "cannot connect"}[failure]
    assert expected in result.failed[0].error
    _same_bytes(result.path, source_model)
    assert result.path.is_relative_to(hubs.tmp / "hf-home" / "hub")


def test_hung_sources_time_out_and_move_on(hubs, source_model):
    import modelscope_hub._legacy_api

    hubs.monkeypatch.setattr(modelscope_hub._legacy_api, "REPO_TREE_PAGE_TIMEOUT_SECONDS", 1)
    hubs.monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    hubs.ms.stall = 2.5
    result = download_model(MODEL)
    assert result.source == "huggingface" and "timed out" in result.failed[0].error
    hubs.hf.stall = 2.5
    with pytest.raises(DownloadError, match="modelscope: timed out.*huggingface: timed out"):
        download_model("Qwen/Other", DownloadOptions())


def test_both_sources_fail_with_one_error_naming_both(hubs):
    hubs.ms.status = 500
    hubs.hf.status = 503
    with pytest.raises(DownloadError) as err:
        download_model(MODEL)
    text = str(err.value)
    assert "modelscope: HTTP 500" in text and "huggingface: HTTP 503" in text
    assert "HF_ENDPOINT" in text  # the hint says what to try next


def test_malformed_id_is_refused_before_any_request(hubs):
    with pytest.raises(DownloadError, match="not a hub id"):
        download_model("not-a-hub-id")
    assert hubs.ms.requests == [] and hubs.hf.requests == []


def test_unknown_model_is_not_found_on_either(hubs):
    with pytest.raises(DownloadError, match="modelscope: not found.*huggingface: not found"):
        download_model("Qwen/No-Such-Model")


def test_huggingface_through_a_mirror_endpoint(hubs, repo, source_model):
    with HubServer("huggingface", {MODEL: repo}, prefix="/hf-mirror") as mirror:
        hubs.point_hf_at(mirror.url)
        hubs.ms.status = 404
        result = download_model(MODEL)
        assert result.source == "huggingface" and result.endpoint == mirror.url
        assert mirror.requests and all(r.path.startswith("/hf-mirror/") for r in mirror.requests)
    assert hubs.hf.requests == []
    _same_bytes(result.path, source_model)


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_corrupted_file_is_named_removed_and_repaired_by_a_rerun(hubs, source_model, source):
    server = hubs.hf if source == "huggingface" else hubs.ms
    shard = "model-00002-of-00003.safetensors" if (source_model / "model-00003-of-00003.safetensors").exists() else None
    shard = shard or sorted(p.name for p in source_model.glob("*.safetensors"))[0]
    good = (source_model / shard).read_bytes()
    bad = bytearray(good)
    bad[-10:] = bytes(10)  # same size, different tensor bytes: only a hash can tell
    if bad == bytearray(good):
        bad[-1] ^= 0xFF
    server.corrupt[shard] = bytes(bad)
    with pytest.raises(DownloadError) as err:
        download_model(MODEL, DownloadOptions(source=source))
    assert shard in str(err.value)
    cache = hubs.tmp / ("hf-home" if source == "huggingface" else "ms-cache")
    assert not any(p.read_bytes() == bytes(bad) for p in cache.rglob(shard) if p.is_file()), "corrupt copy was kept"

    server.corrupt.clear()
    result = download_model(MODEL, DownloadOptions(source=source))
    _same_bytes(result.path, source_model)


def test_broken_safetensors_header_is_caught_when_the_hub_gives_no_hash(hubs, source_model):
    shard = sorted(p.name for p in source_model.glob("*.safetensors"))[0]
    good = (source_model / shard).read_bytes()
    hubs.ms.hide_sha = True
    hubs.ms.corrupt[shard] = (10**9).to_bytes(8, "little") + good[8:]  # same size, absurd header length
    with pytest.raises(DownloadError, match=f"{shard} failed the integrity check: .*header"):
        download_model(MODEL, DownloadOptions(source="modelscope"))
    hubs.ms.corrupt.clear()
    _same_bytes(download_model(MODEL, DownloadOptions(source="modelscope")).path, source_model)


def test_index_naming_a_missing_shard_is_refused(hubs, repo):
    name = "model.safetensors.index.json"
    index = json.loads(repo.files[name])
    index["weight_map"]["model.extra.weight"] = "model-00009-of-00009.safetensors"
    hubs.hf.repos[MODEL] = HubRepo({**repo.files, name: json.dumps(index).encode()})
    with pytest.raises(DownloadError, match="model-00009-of-00009.safetensors"):
        download_model(MODEL, DownloadOptions(source="huggingface"))


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_transfer_cut_mid_file_then_rerun_completes(hubs, source_model, source):
    import huggingface_hub
    import huggingface_hub.constants
    import modelscope_hub._download

    # Both clients write in 1-10 MiB chunks; shrink them so a cut in a 200 KB shard leaves a partial file.
    hubs.monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    hubs.monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    server = hubs.hf if source == "huggingface" else hubs.ms
    shard = sorted(p.name for p in source_model.glob("*.safetensors"))[0]
    server.cut.add(shard)
    with pytest.raises(DownloadError, match=shard if source == "modelscope" else "cut off"):
        download_model(MODEL, DownloadOptions(source=source))
    failed_run = len(server.requests)
    partial_files = list((hubs.tmp / "hf-home").rglob("*.incomplete"))
    server.cut.clear()
    result = download_model(MODEL, DownloadOptions(source=source))
    _same_bytes(result.path, source_model)

    def ranged(requests):
        return [r for r in requests if r.path.endswith(shard) and ("Range" in r.headers or "range" in r.headers)]

    if source == "huggingface" and int(huggingface_hub.__version__.split(".")[0]) >= 1:
        # huggingface_hub >= 1.0 resumes with Range requests inside the call (each retry asks for the
        # rest of the file) and deletes the partial file when it gives up, so the re-run starts over.
        assert len(ranged(server.requests[:failed_run])) >= 2, "the cut transfer should be resumed with Range requests"
        assert partial_files == []
    else:
        assert ranged(server.requests[failed_run:]), "the re-run should resume the partial file with a Range request"


def test_pickle_only_repository_is_refused_without_fetching_it(hubs, source_model):
    files = {n: (source_model / n).read_bytes() for n in ("config.json", "tokenizer.json", "tokenizer_config.json")}
    files["pytorch_model.bin"] = b"\x80\x04pickle would run code"
    files["training_args.pt"] = b"\x80\x04"
    pickle_repo = HubRepo(files)
    hubs.ms.repos["Qwen/Pickle-Only"] = pickle_repo
    hubs.hf.repos["Qwen/Pickle-Only"] = pickle_repo
    with pytest.raises(DownloadError) as err:
        download_model("Qwen/Pickle-Only")
    text = str(err.value)
    assert text.count("only pickle weights") == 2 and "pytorch_model.bin" in text
    assert "ships model.safetensors" in text and "HF_ENDPOINT" not in text
    for server in (hubs.ms, hubs.hf):
        assert not [n for n in server.file_requests() if n.endswith((".bin", ".pt"))]
        assert server.requests, "each hub was asked for the listing"


def test_offline_without_cache_says_so_and_stays_offline(hubs):
    with pytest.raises(DownloadError) as err:
        download_model(MODEL, DownloadOptions(offline=True))
    text = str(err.value)
    assert "offline" in text and "not in the local cache" in text and "--offline" in text
    assert hubs.ms.requests == [] and hubs.hf.requests == []


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_uses_the_cache(hubs, source_model, how):
    online = download_model(MODEL, DownloadOptions(source="huggingface"))
    hubs.ms.stop()
    hubs.hf.stop()
    count = len(hubs.hf.requests)
    if how == "env":
        hubs.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = download_model(MODEL, DownloadOptions(offline=how == "flag"))
    assert result.offline and result.source == "huggingface" and result.path == online.path
    assert result.commit == online.commit
    assert len(hubs.hf.requests) == count and hubs.ms.requests == []
    _same_bytes(result.path, source_model)


def test_cache_damaged_on_disk_is_caught_offline_and_repaired_online(hubs, source_model):
    online = download_model(MODEL, DownloadOptions(source="huggingface"))
    shard = sorted(p.name for p in source_model.glob("*.safetensors"))[-1]
    blob = (online.path / shard).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match=f"{shard} failed the integrity check.*changed on disk"):
        download_model(MODEL, DownloadOptions(offline=True, source="huggingface"))
    assert not blob.exists()
    repaired = download_model(MODEL, DownloadOptions(source="huggingface"))
    _same_bytes(repaired.path, source_model)


def test_local_path_never_touches_the_network(hubs, source_model):
    resolved = resolve_model(str(source_model))
    assert resolved.source == "local" and resolved.path == source_model
    assert hubs.ms.requests == [] and hubs.hf.requests == []


def test_hub_id_through_resolve_model_and_revision_mapping(hubs, source_model):
    resolved = resolve_model(MODEL, source="modelscope", revision="main")
    assert (resolved.source, resolved.revision) == ("modelscope", "master")
    assert any("Revision=master" in r.path for r in hubs.ms.requests)
    resolved = resolve_model(MODEL, source="huggingface", revision="master")
    assert (resolved.source, resolved.revision) == ("huggingface", "main")
    assert resolved.commit == hubs.hf.repos[MODEL].commit and resolved.to_dict()["commit"] == resolved.commit
    assert any("/revision/main" in r.path for r in hubs.hf.requests)


def test_qconv_source_env_var_sets_the_default(hubs):
    hubs.monkeypatch.setenv("QCONV_SOURCE", "huggingface")
    assert download_model(MODEL).source == "huggingface"
    assert hubs.ms.requests == []


def test_concurrent_downloads_of_one_model_do_not_corrupt_each_other(hubs, source_model):
    """Two processes and two threads at once on the same caches: all four end with intact files."""
    hubs.ms.delay = hubs.hf.delay = 0.05
    env = {**os.environ, "QCONV_SOURCE": "huggingface"}
    cmd = [sys.executable, "-m", "qwen_convert.cli", "download", MODEL, "--json", "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results, errors = [], []

    def run(source):
        try:
            results.append(download_model(MODEL, DownloadOptions(source=source)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in ("modelscope", "modelscope")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    outs = [p.communicate(timeout=120) for p in procs]
    assert not errors, errors
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        data = json.loads(out)
        assert data["source"] == "huggingface"
        _same_bytes(Path(data["path"]), source_model)
    for r in results:
        _same_bytes(r.path, source_model)


class RecordingReporter:
    def __init__(self):
        self.tasks: list[list] = []  # [description, total, advanced]
        self.logs: list[str] = []
        self.lock = threading.Lock()

    def task(self, description, total=None):
        entry = [description, total, 0]
        self.tasks.append(entry)
        lock = self.lock

        class Task:
            def advance(self, n=1):
                with lock:
                    entry[2] += n

        return Task()

    def log(self, message):
        self.logs.append(message)


@pytest.mark.parametrize("source", ["modelscope", "huggingface"])
def test_progress_goes_through_the_reporter_not_the_clients_bars(hubs, capfd, source):
    rep = RecordingReporter()
    result = download_model(MODEL, DownloadOptions(source=source), reporter=rep)
    assert rep.tasks and all(total == advanced for _, total, advanced in rep.tasks), rep.tasks
    assert sum(advanced for _, _, advanced in rep.tasks) == result.total_bytes
    assert any("fetching" in line for line in rep.logs)
    out, err = capfd.readouterr()
    assert out == "" and "it/s" not in err and "B/s" not in err and "%|" not in err


def test_cli_download_json_fields(hubs, source_model, tmp_path):
    out = tmp_path / "copy"
    res = CliRunner().invoke(app, ["download", MODEL, "--json", "--quiet", "--local-dir", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) >= {"model_id", "path", "source", "revision", "commit", "endpoint", "files", "total_bytes", "offline", "failed_sources"}
    assert data["model_id"] == MODEL and data["source"] == "modelscope" and data["revision"] == "master"
    assert data["path"] == str(out) and data["endpoint"] == hubs.ms.url and data["offline"] is False
    assert "config.json" in data["files"] and data["total_bytes"] > 0
    _same_bytes(out, source_model)

    hubs.ms.status = 404
    hubs.hf.status = 404
    res = CliRunner().invoke(app, ["download", "Qwen/Gone", "--source", "huggingface"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: could not download Qwen/Gone - huggingface: not found")


def test_cli_seqcls_from_a_hub_id(hubs, source_model, tmp_path):
    pytest.importorskip("qwen_convert.seqcls.convert")
    out = tmp_path / "seqcls"
    res = CliRunner().invoke(app, ["seqcls", MODEL, str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForSequenceClassification"]
    assert any("FilePath=model-" in r.path for r in hubs.ms.requests)
