"""A bounded soak of `qconv serve` on 127.0.0.1 (issue #22): leaks, errors, and what the API key costs.

Two `qconv serve` processes of the trained tiny reranker's int8 export (`qconv export-onnx
qconv:tiny-reranker OUT --quantize int8`, built once into benchmarks/.work/soak-tiny) run side by side:
one without a key, one with `QCONV_API_KEY` in its environment. Each gets a warm-up round, then
`--rounds` rounds of `--requests / --rounds` requests from `--clients` concurrent asyncio+httpx
clients, the rounds interleaved A B B A A B ... so drift in a neighbour's CPU use weighs on both alike.
Requests are mixed: 1 to 16 documents of 3 to 50 words (from the tiny model's eval set), spread
over /rerank, /v1/rerank, /v2/rerank, /score and /v1/score; every answer is checked (status 200,
one score in [0, 1] per document, rerank results sorted). After every keyed round, anonymous and
wrong-key requests must get 401.

After each round (its client closed, the server's sockets settled) the server's VmRSS and open file
descriptors are read from /proc. Targets: 0 errors; RSS at the end within 5% of RSS after warm-up;
no file-descriptor growth; the keyed server's throughput within 2% of the plain one's (requests/s
over all measured rounds). Everything is bounded: fixed request counts, a timeout per request, a
deadline for the whole run (`--max-minutes`).

    nice -n 10 .venv/bin/python benchmarks/bench_soak.py [--requests 20000] [--rounds 10] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from report import write_section  # noqa: E402
from servers import free_port, stop, wait_for_health  # noqa: E402  (the tests' server helpers, one copy)

from qwen_convert.serve.access import Access  # noqa: E402

START, END = "<!-- bench_soak:start -->", "<!-- bench_soak:end -->"
DOCS_MD = ROOT / "docs" / "serving.md"
DOCS_START, DOCS_END = "<!-- soak-bench:start -->", "<!-- soak-bench:end -->"
WORK = HERE / ".work"
EXPORT = WORK / "soak-tiny"
RESULTS = WORK / "bench_soak.json"
EVAL = ROOT / "qwen_convert" / "data" / "tiny-reranker" / "eval.jsonl"
QCONV = str(Path(sys.executable).with_name("qconv"))
ROUTES = ("/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score")
# Documents per request, cycled (mean 3.9), of 3 to 50 words: sizes mixed, but light enough that
# 40,000 requests take minutes on 2 shared cores, and the per-request work (where a key costs) shows.
DOC_COUNTS = (1, 2, 1, 4, 1, 2, 8, 1, 3, 16)
WORDS = (3, 50)
WARMUP = 500
# Then the heaviest request of the mix (16 documents of 50 words) from every client at once, so the
# warm-up reaches the largest batches the soak will run: RSS steps up when a batch of a new peak
# shape arrives (measured: +15.5 MiB over the first 300 such
# requests, then +0.6 MiB over the next 4,000 of the mix), which is a
# high-water mark, not a leak. Growth is measured from after this. Half of them are /score pairs of 16
# different queries: with prefix sharing a one-query request runs on its query's cache, so only those
# reach the full-prompt graph's largest batches (without them a +7 MiB step came after warm-up).
HEAVY_WARMUP = 500
TARGET_RSS, TARGET_KEY_COST = 0.05, 0.02
SIMD = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
        "amx_tile", "amx_int8", "amx_bf16")


# --- the load --------------------------------------------------------------------------------------

def vocabulary() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()]
    queries = list(dict.fromkeys(r["query"] for r in rows))
    words = [w for r in rows for w in r["document"].split()]
    return queries, words


def request(i: int, queries: list[str], words: list[str], heavy: bool = False) -> tuple[str, dict, int]:
    """Request i (deterministic): route, body, number of documents; heavy: the mix's largest."""
    n = max(DOC_COUNTS) if heavy else DOC_COUNTS[i % len(DOC_COUNTS)]
    docs = []
    for j in range(n):
        length = WORDS[1] if heavy else WORDS[0] + (i * 37 + j * 11) % (WORDS[1] - WORDS[0] + 1)
        start = (i * 131 + j * 17) % len(words)
        docs.append(" ".join(words[(start + k) % len(words)] for k in range(length)) + f" #{i}.{j}")
    route = ROUTES[i % len(ROUTES)]
    query = queries[i % len(queries)]
    body = {"query": query, "documents": docs} if "rerank" in route else {"text_1": query, "text_2": docs}
    if heavy and i % 2:  # pairs of 16 different queries: full prompts, in the largest batches that path runs
        route, body = "/score", {"text_1": [queries[(i + j) % len(queries)] for j in range(n)], "text_2": docs}
    return route, body, n


def check(route: str, status: int, body: dict, n: int) -> str | None:
    if status != 200:
        return f"{status}: {str(body)[:200]}"
    if "rerank" in route:
        scores = [r["relevance_score"] for r in body.get("results", [])]
        if sorted(r["index"] for r in body["results"]) != list(range(n)) or scores != sorted(scores, reverse=True):
            return f"rerank answer does not fit the request: {str(body)[:200]}"
    else:
        scores = [d["score"] for d in body.get("data", [])]
        if [d["index"] for d in body["data"]] != list(range(n)):
            return f"score answer does not fit the request: {str(body)[:200]}"
    if not all(0.0 <= s <= 1.0 for s in scores):
        return f"a score outside [0, 1]: {scores}"
    return None


async def load_round(url: str, first: int, count: int, clients: int, headers: dict, vocab, heavy: bool = False) -> dict:
    import httpx

    latencies, errors, pairs = [], [], 0
    next_index = first

    async def client(http: httpx.AsyncClient):
        nonlocal next_index, pairs
        while next_index < first + count:
            i, next_index = next_index, next_index + 1
            route, body, n = request(i, *vocab, heavy=heavy)
            t = time.perf_counter()
            try:
                r = await http.post(f"{url}{route}", json=body, headers=headers)
                problem = check(route, r.status_code, r.json(), n)
            except Exception as exc:  # a soak counts every failure, whatever it is
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                errors.append(problem)
                continue
            latencies.append(time.perf_counter() - t)
            pairs += n

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60), limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"requests": count, "errors": len(errors), "error_samples": errors[:3], "pairs": pairs, "seconds": wall,
            "latencies": latencies}


async def refused(url: str) -> int:
    """Anonymous and wrong-key requests to the keyed server: how many were NOT answered 401."""
    import httpx

    wrong = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(60)) as http:
        for i, headers in enumerate([{}, {"Authorization": "Bearer wrong"}] * 10):
            route, body, _ = request(i, ["q"], ["w"])
            r = await http.post(f"{url}{route}", json=body, headers=headers)
            wrong += r.status_code != 401
    return wrong


# --- the servers -----------------------------------------------------------------------------------

def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (a neighbour's load stretches wall time, not this)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_cost_us(calls: int = 200_000) -> dict[str, float]:
    """The access check alone, in this process: microseconds per request, without and with a key."""
    key = secrets.token_urlsafe(32).encode()
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"authorization", b"Bearer " + key)]
    out = {}
    for name, access in (("plain", Access()), ("keyed", Access(api_key=key))):
        t = time.perf_counter()
        for _ in range(calls):
            access.check_request("/v1/rerank", headers)  # what the middleware calls
        out[name] = (time.perf_counter() - t) / calls * 1e6
    return out


def stack_cost(blocks: int = 200, per_block: int = 300) -> dict:
    """The key's cost through the whole HTTP stack (middleware, routing, a JSON answer), in-process: GET
    /v1/models of an app without and with a key, both sent the same header, in alternating blocks.
    The lightest authenticated route, so the key's share is largest here; on a scoring route it is less."""
    import httpx

    from qwen_convert.serve.app import build_app
    from qwen_convert.serve.metrics import ServerMetrics
    from qwen_convert.serve.options import ServeOptions
    from qwen_convert.serve.registry import ModelRegistry

    key = secrets.token_urlsafe(32)
    headers = {"Authorization": f"Bearer {key}"}
    apps = {}
    for name, access in (("plain", Access()), ("keyed", Access(api_key=key.encode()))):
        metrics = ServerMetrics()
        apps[name] = build_app(ModelRegistry(ServeOptions(), metrics), metrics, ServeOptions(), access)

    async def block(app) -> float:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://soak") as c:
            t = time.perf_counter()
            for _ in range(per_block):
                r = await c.get("/v1/models", headers=headers)
                assert r.status_code == 200, r.text
            return (time.perf_counter() - t) / per_block * 1e6

    async def main() -> dict[str, list[float]]:
        times = {"plain": [], "keyed": []}
        for b in range(blocks):
            for name in (("plain", "keyed") if b % 2 == 0 else ("keyed", "plain")):
                times[name].append(await block(apps[name]))
        return times

    times = asyncio.run(main())
    costs = [k / p - 1 for p, k in zip(times["plain"], times["keyed"])]
    return {"plain_us": statistics.mean(times["plain"]), "keyed_us": statistics.mean(times["keyed"]),
            "cost": statistics.mean(times["keyed"]) / statistics.mean(times["plain"]) - 1,
            "cost_median": statistics.median(costs), "cost_stderr": statistics.stdev(costs) / len(costs) ** 0.5,
            "blocks": blocks, "per_block": per_block}


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled(pid: int, seconds: float = 5.0) -> tuple[int, int]:
    """(RSS bytes, open fds) once the fd count has stopped moving (closed connections take a moment)."""
    deadline, last, stable_since = time.monotonic() + seconds, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = fds(pid)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 0.5:
            break
        time.sleep(0.1)
    return proc_status(pid, "VmRSS") * 1024, fds(pid)


class Served:
    def __init__(self, name: str, key: str | None, threads: int):
        self.name, self.key = name, key
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = WORK / f"bench-soak-{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("QCONV_")}
        if key:
            env["QCONV_API_KEY"] = key
        argv = [QCONV, "serve", str(EXPORT), "--name", "tiny", "--variant", "int8", "--host", "127.0.0.1",
                "--port", str(port), "--threads", str(threads)]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.rounds: list[dict] = []
        self.samples: list[tuple[int, int]] = []  # (RSS, fds) after warm-up, then after every round

    def up(self) -> None:
        try:
            wait_for_health(self.proc, self.url, self.log, f"qconv serve ({self.name})", 120, poll=0.5)
        except AssertionError as exc:
            self.proc.kill()
            raise SystemExit(str(exc)) from None


# --- the run ---------------------------------------------------------------------------------------

def ensure_export() -> None:
    if (EXPORT / "onnx" / "model_quantized.onnx").exists():
        return
    print(f"exporting {EXPORT} (int8) ...", file=sys.stderr, flush=True)
    subprocess.run([QCONV, "export-onnx", "qconv:tiny-reranker", str(EXPORT), "--quantize", "int8", "--quiet"], check=True)


def order(rounds: int) -> list[int]:
    """0 = plain, 1 = keyed: A B B A A B B A ... (each A B B A cancels a linear drift in the machine's speed)."""
    return [(0, 1, 1, 0)[r % 4] for r in range(2 * rounds)]


def run(args) -> dict:
    ensure_export()
    vocab = vocabulary()
    per_round = args.requests // args.rounds
    deadline = time.monotonic() + args.max_minutes * 60
    # --control: the second server has no key either (an A/A run: what two identical servers differ by here)
    second = None if args.control else secrets.token_urlsafe(32)
    servers = [Served("plain", None, args.threads), Served("keyed", second, args.threads)]
    unrefused = 0
    try:
        for s in servers:
            s.up()
        for s in servers:  # warm-up: first batches, every route, then the largest batches
            for heavy, count in ((False, WARMUP), (True, HEAVY_WARMUP)):
                warm = asyncio.run(load_round(s.url, 0, count, args.clients, s.headers, vocab, heavy))
                if warm["errors"]:
                    raise SystemExit(f"{s.name} warm-up failed: {warm['error_samples']}\n{s.log.read_text()[-3000:]}")
                s.samples.append(settled(s.proc.pid))
            print(f"  warm-up {s.name}: RSS {s.samples[0][0] / 2**20:.1f} MiB after the mix, {s.samples[1][0] / 2**20:.1f} MiB "
                  "after the largest requests", file=sys.stderr, flush=True)
        index = WARMUP
        for r, which in enumerate(order(args.rounds)):
            if time.monotonic() > deadline:
                raise SystemExit(f"--max-minutes {args.max_minutes} passed after {r} of {2 * args.rounds} rounds")
            s = servers[which]
            cpu0 = cpu_seconds(s.proc.pid)
            result = asyncio.run(load_round(s.url, index + (r // 2) * per_round, per_round, args.clients, s.headers, vocab))
            result["cpu_seconds"] = cpu_seconds(s.proc.pid) - cpu0
            s.rounds.append(result)
            s.samples.append(settled(s.proc.pid))
            if s.key:
                unrefused += asyncio.run(refused(s.url))
            rate = result["requests"] / result["seconds"]
            print(f"  round {r + 1:2d}/{2 * args.rounds} {s.name:5s}: {rate:6.1f} req/s, {result['errors']} errors, "
                  f"RSS {s.samples[-1][0] / 2**20:.1f} MiB, {s.samples[-1][1]} fds", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            stop(s.proc, 30)
    return summarize(args, servers, unrefused)


def summarize(args, servers: list[Served], unrefused: int) -> dict:
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu(), "cores": os.cpu_count(), "machine": platform.machine(),
           "clients": args.clients, "rounds": args.rounds, "threads": args.threads, "warmup": WARMUP,
           "heavy_warmup": HEAVY_WARMUP,
           "unrefused": unrefused, "servers": {}}
    for s in servers:
        lat = sorted(x for r in s.rounds for x in r["latencies"])
        q = statistics.quantiles(lat, n=100, method="inclusive")
        seconds = sum(r["seconds"] for r in s.rounds)
        light, (rss0, fd0) = s.samples[0][0], s.samples[1]
        s.samples = s.samples[1:]
        out["servers"][s.name] = {
            "requests": sum(r["requests"] for r in s.rounds), "errors": sum(r["errors"] for r in s.rounds),
            "error_samples": [e for r in s.rounds for e in r["error_samples"]][:3],
            "pairs": sum(r["pairs"] for r in s.rounds), "seconds": seconds,
            "req_per_s": sum(r["requests"] for r in s.rounds) / seconds, "pairs_per_s": sum(r["pairs"] for r in s.rounds) / seconds,
            "round_req_per_s": [r["requests"] / r["seconds"] for r in s.rounds],
            "cpu_ms_per_request": sum(r["cpu_seconds"] for r in s.rounds) / sum(r["requests"] for r in s.rounds) * 1000,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "rss_after_light_warmup": light, "rss_after_warmup": rss0, "rss_end": s.samples[-1][0], "rss_max": max(x for x, _ in s.samples),
            "rss_growth": s.samples[-1][0] / rss0 - 1, "rss_growth_max": max(x for x, _ in s.samples) / rss0 - 1, "rss_samples": [x for x, _ in s.samples],
            "fds_after_warmup": fd0, "fds_end": s.samples[-1][1], "fd_samples": [f for _, f in s.samples],
        }
    plain, keyed = out["servers"]["plain"], out["servers"]["keyed"]
    out["key_cost"] = 1 - keyed["req_per_s"] / plain["req_per_s"]
    pairs = zip(plain["round_req_per_s"], keyed["round_req_per_s"])
    costs = [1 - k / p for p, k in pairs]
    out["key_cost_round_median"] = statistics.median(costs)
    out["key_cost_round_stdev"] = statistics.stdev(costs) if len(costs) > 1 else 0.0
    out["key_cost_round_quartiles"] = quartiles(costs)
    out["key_cpu_cost"] = keyed["cpu_ms_per_request"] / plain["cpu_ms_per_request"] - 1
    cpu_costs = [k["cpu_seconds"] / k["requests"] / (p["cpu_seconds"] / p["requests"]) - 1
                 for p, k in zip(servers[0].rounds, servers[1].rounds)]
    out["key_cpu_cost_round_median"] = statistics.median(cpu_costs)
    out["key_cpu_cost_round_quartiles"] = quartiles(cpu_costs)
    out["check_us"] = check_cost_us()
    out["stack"] = stack_cost()
    return out


def quartiles(xs: list[float]) -> list[float]:
    """First and third quartile (the spread a median is reported with)."""
    if len(xs) < 2:
        return [xs[0], xs[0]] if xs else [0.0, 0.0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def cpu() -> dict:
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = info.get("flags", "").split()
    return {"model": info.get("model name", platform.processor() or platform.machine()),
            "simd": [f for f in SIMD if f in flags], "flags": flags}


# --- the report ------------------------------------------------------------------------------------

def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def spread(r: dict, key: str) -> str:
    lo, hi = r.get(key) or [float("nan")] * 2
    return f"{lo * 100:+.2f}% to {hi * 100:+.2f}%"


def render(r: dict) -> str:
    plain, keyed = r["servers"]["plain"], r["servers"]["keyed"]
    lines = [START, "## Serving soak: leaks, errors and the API key's cost (`make bench-soak`)", "",
             f"`benchmarks/bench_soak.py`, {r['date']}, {r['cpu']['model']} ({r['machine']}, {r['cores']} cores shared "
             f"with other jobs; SIMD: {' '.join(r['cpu']['simd']) or 'none listed'}). The trained tiny reranker's int8 "
             f"export, two `qconv serve` processes on 127.0.0.1 (`--threads {r['threads']}`), one with `QCONV_API_KEY`; "
             f"each gets {r['warmup']:,} warm-up requests of the mix and {r['heavy_warmup']} of its largest (16 documents "
             f"of {WORDS[1]} words, half as /score pairs of 16 different queries, so the largest batches of the prefix-shared and the full-prompt path have run), then {r['rounds']} rounds of "
             f"{plain['requests'] // r['rounds']:,} requests from {r['clients']} concurrent asyncio+httpx clients, the rounds "
             f"of the two servers interleaved A B B A. Requests are mixed: 1 to 16 documents (mean {statistics.mean(DOC_COUNTS):.1f}) "
             f"of {WORDS[0]} to {WORDS[1]} words "
             "over /rerank, /v1/rerank, /v2/rerank, /score and /v1/score; every answer is checked. RSS and open file "
             "descriptors are read from /proc after warm-up and after every round (its client closed). Latency is the "
             "client's, per request, with the client on the same 2 cores." + (f" {r['note']}" if r.get("note") else ""), "",
             "| server | requests | errors | req/s | pairs/s | p50 | p99 | RSS after warm-up → end (max) | growth end (max) | fds after warm-up → end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in (("no key", plain), ("`QCONV_API_KEY`", keyed)):
        lines.append(f"| {name} | {x['requests']:,} | {x['errors']} | {x['req_per_s']:.1f} | {x['pairs_per_s']:.0f} | "
                     f"{x['p50_ms']:.0f} ms | {x['p99_ms']:.0f} ms | {mib(x['rss_after_warmup'])} → {mib(x['rss_end'])} "
                     f"({mib(x['rss_max'])}) | {x['rss_growth'] * 100:+.2f}% ({x['rss_growth_max'] * 100:+.2f}%) | {x['fds_after_warmup']} → {x['fds_end']} |")
    rounds = " ".join(f"{p:.0f}/{k:.0f}" for p, k in zip(plain["round_req_per_s"], keyed["round_req_per_s"]))
    worst_rss = max(plain["rss_growth_max"], keyed["rss_growth_max"])
    fd_growth = max(plain["fds_end"] - plain["fds_after_warmup"], keyed["fds_end"] - keyed["fds_after_warmup"])
    check = r["check_us"]
    lines += ["", f"Per round, req/s without/with the key: {rounds}. Round pairs differ by "
              f"{r['key_cost_round_stdev'] * 100:.1f}% (standard deviation of the per-pair cost) on this shared machine, "
              "so the wall-clock comparison carries that noise divided by the square root of the rounds; the server's "
              "own CPU time per request does not (a neighbour stretches wall time, not CPU time): "
              f"{plain['cpu_ms_per_request']:.2f} ms without the key, {keyed['cpu_ms_per_request']:.2f} ms with it "
              f"({r['key_cpu_cost'] * 100:+.2f}%). The check itself, timed alone in-process: {check['plain']:.2f} µs per "
              f"request without a key, {check['keyed']:.2f} µs with one (Bearer parsing and one SHA-256 digest: the key's own is computed once at start-up), "
              f"{(check['keyed'] - check['plain']) / (plain['cpu_ms_per_request'] * 1000) * 100:.3f}% of a request's CPU time. "
              + (f"Through the whole HTTP stack, in-process (GET /v1/models of an app without and with a key, the same "
                 f"header sent to both, {r['stack']['blocks']} alternating blocks of {r['stack']['per_block']}): "
                 f"{r['stack']['plain_us']:.0f} µs vs {r['stack']['keyed_us']:.0f} µs per request, "
                 f"{r['stack']['cost'] * 100:+.2f}% (standard error {r['stack']['cost_stderr'] * 100:.2f}%; the same "
                 "measurement with two apps without a key, an A/A control run once by hand, gave -0.15% ± 0.83%): "
                 "the lightest authenticated route, where a few µs weigh most. "
                 if r.get("stack") else "") +
              "RSS steps up while batches of a new peak shape arrive, then stays flat: after the mixed warm-up it was "
              f"{mib(plain['rss_after_light_warmup'])} / {mib(keyed['rss_after_light_warmup'])}, after the largest requests "
              f"{mib(plain['rss_after_warmup'])} / {mib(keyed['rss_after_warmup'])}; a high-water mark bounded by "
              "`--max-batch-tokens` and `--max-batch-size`, not a leak (growth after it is the table's). "
              f"With the key, {r['unrefused']} of {20 * r['rounds']} anonymous or wrong-key requests sent between rounds "
              "got anything but 401.", "",
              "| target | measured | |", "|---|---|---|",
              f"| ≥ 20,000 requests per server, 0 errors | {plain['requests']:,} + {keyed['requests']:,}, "
              f"{plain['errors'] + keyed['errors']} errors | {verdict(min(plain['requests'], keyed['requests']) >= 20000 and plain['errors'] + keyed['errors'] == 0)} |",
              f"| RSS growth after warm-up ≤ 5% (at its highest) | {plain['rss_growth_max'] * 100:+.2f}% / "
              f"{keyed['rss_growth_max'] * 100:+.2f}% | "
              f"{verdict(worst_rss <= TARGET_RSS)} |",
              f"| no file-descriptor growth | {fd_growth:+d} | {verdict(fd_growth <= 0)} |",
              f"| the key costs ≤ 2% throughput (median of {r['rounds']} round pairs) | {r['key_cost_round_median'] * 100:+.2f}% "
              f"(quartiles {spread(r, 'key_cost_round_quartiles')}; over all rounds {r['key_cost'] * 100:+.2f}%); server CPU "
              f"time per request {r.get('key_cpu_cost_round_median', r['key_cpu_cost']) * 100:+.2f}% (quartiles "
              f"{spread(r, 'key_cpu_cost_round_quartiles')}) | {verdict(r['key_cost_round_median'] <= TARGET_KEY_COST)} |",
              *([f"| (diagnostic) the key's cost through the HTTP stack alone, in-process, lightest route | "
                 f"{r['stack']['cost'] * 100:+.2f}% ± {r['stack']['cost_stderr'] * 100:.2f}% "
                 f"({r['stack']['keyed_us'] - r['stack']['plain_us']:.0f} µs per request) | measured |"] if r.get("stack") else []),
              f"| anonymous and wrong keys refused under load | {r['unrefused']} not 401 | {verdict(r['unrefused'] == 0)} |",
              END]
    return "\n".join(lines)


def render_docs(r: dict) -> str:
    plain, keyed = r["servers"]["plain"], r["servers"]["keyed"]
    return "\n".join([
        DOCS_START,
        f"Soak (`make bench-soak`, {r['date']}, BENCHMARKS.md has the details): {plain['requests']:,} mixed requests "
        f"to each of two servers of the tiny int8 export, without and with `QCONV_API_KEY`: "
        f"{plain['errors'] + keyed['errors']} errors, RSS growth after warm-up {plain['rss_growth'] * 100:+.2f}% / "
        f"{keyed['rss_growth'] * 100:+.2f}%, open file descriptors {plain['fds_after_warmup']} → {plain['fds_end']} / "
        f"{keyed['fds_after_warmup']} → {keyed['fds_end']}, p50 {plain['p50_ms']:.0f} / {keyed['p50_ms']:.0f} ms and p99 "
        f"{plain['p99_ms']:.0f} / {keyed['p99_ms']:.0f} ms at {r['clients']} clients; the key cost "
        f"{r['key_cost_round_median'] * 100:+.2f}% of throughput (median of {r['rounds']} interleaved round pairs, quartiles "
        f"{spread(r, 'key_cost_round_quartiles')}; target ≤ 2%) and {r.get('key_cpu_cost_round_median', r['key_cpu_cost']) * 100:+.2f}% "
        f"of the server's CPU time per request; the check itself takes "
        f"{r['check_us']['keyed'] - r['check_us']['plain']:.1f} µs per request.",
        DOCS_END])


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its servers (finally)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="measured requests per server (after warm-up)")
    ap.add_argument("--rounds", type=int, default=40, help="rounds per server, interleaved with the other's (more rounds: a tighter median of the key's cost)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="each server's onnxruntime threads (the client needs a core)")
    ap.add_argument("--max-minutes", type=float, default=40, help="stop (and fail) after this long")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--control", action="store_true",
                    help="A/A: the second server without a key too (implies --no-write; its 'key cost' is the noise floor)")
    ap.add_argument("--render", action="store_true", help="only rewrite the sections from the saved results")
    ap.add_argument("--measure-stack", action="store_true",
                    help="with --render: (re)measure the in-process stack cost into the saved results")
    args = ap.parse_args()
    args.no_write = args.no_write or args.control
    if args.render:
        r = json.loads(RESULTS.read_text())
        if args.measure_stack:
            r["stack"] = stack_cost()
            if not args.no_write:
                RESULTS.write_text(json.dumps(r, indent=2) + "\n")
    else:
        WORK.mkdir(parents=True, exist_ok=True)
        r = run(args)
        if args.control:
            RESULTS.with_name("bench_soak_control.json").write_text(json.dumps(r, indent=2) + "\n")
    text = render(r)
    if not args.no_write:
        if not args.render:
            RESULTS.write_text(json.dumps(r, indent=2) + "\n")
        write_section(text, START, END)
        if DOCS_MD.exists() and DOCS_START in DOCS_MD.read_text():
            write_section(render_docs(r), DOCS_START, DOCS_END, DOCS_MD)
    print(text)


if __name__ == "__main__":
    main()
