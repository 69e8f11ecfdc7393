"""Prefix-shared scoring vs full prompts, q4 kernels vs int8, shape A vs the CPU's int8 peak (issue #20).

    flock /tmp/qconv-heavy.lock .venv/bin/python benchmarks/bench_prefix.py [--rounds 3] [--queries 4] [--torch]

Part `prefix`: realistic rerank requests (official template, default instruction, queries with 20
documents of 60-100 tokens from a fixed generated text set) through `score_documents`, one call per
query (sessions stay open across calls, as in a library user's or a server's process):
  * int8-full        full prompts (--no-share-prefix: length-ordered batches of 8)
  * int8-prefix      prefix-shared, each query's documents in padded batches of 8 on one cache
  * int8-prefix-b1   prefix-shared, one document at a time (what GroupQueryAttention allowed)
  * torch-bf16       (--torch) qconv's seq-cls conversion + AutoModelForSequenceClassification
Part `q4`: shape A (batch 8 x 256 tokens, 3 rows left-padded) through the builder's int8 graph, its
q4 graph at MatMulNBits accuracy_level 0 and 4, and the level-4 file with its 4-bit weights
expanded to int8 at load (scoring/kernels.py, what `qconv score` and verify run on a CPU).
Part `peak`: the CPU's int8 GEMM rate through onnxruntime (MatMulInteger and DynamicQuantizeMatMul,
2048^3, as bench_peers measures it); shape A int8 is reported as a share of it (2 x 440M matmul
weights x 256 tokens = 225 GOP a pair). `--profile` adds onnxruntime's per-op profiles of shape A int8 and of int8-prefix's requests.

Every engine runs in its own process (load excluded, one warm-up request), rounds interleaved,
2 threads, inside a memory cgroup when /sys/fs/cgroup/memory is writable, peak RSS by
/usr/bin/time, the 1-minute load average before each run. The checkpoint is random
(benchmarks/make_checkpoint.py), the tokenizer the package's small one, so prompts have more tokens
than Qwen's tokenizer would give them: the template prefix with a query is ~86 tokens here (~55-65
with Qwen's). Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
CKPT = WORK / "qwen3-reranker-0.6b"
EXPORT = WORK / "prefix-int8"
SEQCLS = WORK / "prefix-seqcls"
PAIRS = WORK / "prefix-pairs.jsonl"
CGROUP = Path("/sys/fs/cgroup/memory/qconv-bench-prefix")
NAME = "bench_prefix"  # its BENCHMARKS.md section, one per CPU kind (report.markers)
THREADS = 2
LEVELS = (0, 4)
GOP_A = 2 * 440e6 * 256  # matmul ops of one 256-token pair of the 0.6B (embedding excluded)

WORDS = ("the of and to in is that for it as with was on are by this be from or have an they which one you were all "
         "we when there can more has been if will their so would about what out up into them some could time these "
         "two may then do first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how too little state "
         "good very make world still own see men work long get here between both life being under never day same "
         "another know while last might us great old year off come since against go came right used take three "
         "energy water system light solar river market protein science history city music health climate data ocean "
         "plant cell river engine signal planet metal carbon theory animal forest island policy").split()
QUERIES = ("what causes the northern lights to appear", "how do vaccines train the immune system",
           "why did the roman empire fall", "which metals conduct electricity best", "how does a heat pump work",
           "what is the tallest mountain in africa", "when were the first cities built", "how do bees find flowers")


def log(msg: str) -> None:
    print(f"[bench_prefix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def py() -> str:
    return sys.executable


def qconv(*args: str) -> None:
    subprocess.run([str(Path(py()).parent / "qconv"), *args], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# --- setup ---------------------------------------------------------------------------------------

def make_pairs(queries: int) -> None:
    """queries x 20 documents of 60-100 tokens (this tokenizer), from a seeded generator."""
    import random

    from qwen_convert.reranker import open_tokenizer

    tok = open_tokenizer(CKPT)
    rng = random.Random(20)
    rows = []
    for q in QUERIES[:queries]:
        for _ in range(20):
            target, words = rng.randint(60, 100), []
            while len(tok.encode(" ".join(words))) < target:
                words.append(rng.choice(WORDS))
            rows.append({"query": q, "document": " ".join(words).capitalize() + "."})
    PAIRS.write_text("".join(json.dumps(r) + "\n" for r in rows))


def setup(args) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    if not (CKPT / "model.safetensors").exists():
        log("writing the 0.6B random checkpoint")
        subprocess.run([py(), str(ROOT / "benchmarks" / "make_checkpoint.py"), "0.6b", str(CKPT)], check=True)
    from report import stale, stamp

    if stale(EXPORT, EXPORT / "onnx" / "prefix" / "model_quantized.onnx"):
        log("exporting int8 (+ its with-past graph) with the builder (missing, or the builder changed)")
        qconv("export-onnx", str(CKPT), str(EXPORT), "--no-fp32", "--quantize", "int8", "--quant-method", "naive", "--no-verify", "--force", "--quiet")
        stamp(EXPORT)
    if args.torch and not (SEQCLS / "config.json").exists():
        log("converting to seq-cls for the torch peer")
        qconv("seqcls", str(CKPT), str(SEQCLS), "--force", "--quiet")
    for level in LEVELS:
        path = WORK / f"q4-level{level}.onnx"
        if not path.exists():
            log(f"building q4 at accuracy_level {level}")
            code = ("import sys; from pathlib import Path; from qwen_convert.checkpoint.files import open_checkpoint; "
                    "from qwen_convert.onnx.build import build_onnx; from qwen_convert.onnx.quantize import QuantizeOptions; "
                    "from qwen_convert.formats import QuantMode; "
                    f"build_onnx(open_checkpoint(Path({str(CKPT)!r})), Path({str(path)!r}), QuantMode.Q4, QuantizeOptions(accuracy_level={level}))")
            subprocess.run([py(), "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    make_pairs(args.queries)


# --- workers (one engine, one process) ------------------------------------------------------------

def worker_score(kind: str) -> dict:
    """Realistic requests through score_documents: one request per query, timed after a warm-up."""
    from qwen_convert.scoring.probes import load_pairs
    from qwen_convert.scoring.score import ScoreOptions, score_documents

    pairs = load_pairs(PAIRS)
    queries: dict[str, list[str]] = {}
    for p in pairs:
        queries.setdefault(p.query, []).append(p.document)
    if kind == "torch-bf16":
        import torch

        torch.set_num_threads(THREADS)
        model, options = SEQCLS, ScoreOptions(dtype="bfloat16", engine="transformers")
    else:
        model = EXPORT
        options = ScoreOptions(variant="int8", share_prefix=kind != "int8-full", batch_size=1 if kind.endswith("-b1") else 8)
    first = next(iter(queries))
    score_documents(model, first, queries[first][:4], options=options)  # load + warm-up
    started, shared = time.perf_counter(), 0
    for q, docs in queries.items():
        shared += score_documents(model, q, docs, options=options).shared_pairs
    seconds = time.perf_counter() - started
    return {"pairs": len(pairs), "seconds": seconds, "pairs_per_s": len(pairs) / seconds, "shared_pairs": shared}


def worker_shape_a(path: str, how: str = "file", profile: str = "") -> dict:
    """Batch 8 x 256 tokens, 3 rows left-padded (to 200), random ids: pairs/s of one graph (how:
    "file" as written, "expand" with its 4-bit weights expanded to int8 at load)."""
    import numpy as np
    import onnxruntime as ort

    from qwen_convert.scoring.kernels import expand_q4, open_expanded
    from qwen_convert.scoring.onnx_scorers import session_options

    opts = session_options(THREADS)  # as qconv opens it (denormals flushed)
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    if how == "expand":
        expansion = expand_q4(Path(path))
        if expansion.model is None:
            raise SystemExit(f"{path}: nothing to expand ({expansion.reason})")
        session = open_expanded(expansion, opts, ["CPUExecutionProvider"])
        del expansion  # onnxruntime holds its own copy of the weights
    else:
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 5000, size=(8, 256), dtype=np.int64)
    mask = np.ones((8, 256), dtype=np.int64)
    mask[:3, :56] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    session.run(["logits"], feeds)
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < 8:
        session.run(["logits"], feeds)
        runs += 1
    seconds = time.perf_counter() - started
    out = {"pairs": 8 * runs, "seconds": seconds, "pairs_per_s": 8 * runs / seconds}
    if profile:
        out["profile"], _ = profile_summary(session.end_profiling())
    return out


def worker_profile_prefix(trace: str) -> dict:
    """int8-prefix's realistic requests with onnxruntime profiling on the with-past graph's session:
    where prefix-shared scoring spends its time (the ops, and the split attention's share)."""
    import onnxruntime as ort

    from qwen_convert.scoring import prefix
    from qwen_convert.scoring.onnx_scorers import session_options

    sessions: list = []

    def profiled(scorer):  # one session for every call, as cpu_session's cache keeps it
        if not sessions:
            opts = session_options(THREADS)
            opts.enable_profiling, opts.profile_file_prefix = True, trace
            sessions.append(ort.InferenceSession(str(scorer.path), opts, providers=["CPUExecutionProvider"]))
        return sessions[0]

    prefix.cpu_session = profiled
    out = worker_score("int8-prefix")
    out["profile"], out["attention"] = profile_summary(sessions[0].end_profiling())
    return out


def profile_summary(trace: str) -> tuple[dict, float]:
    """onnxruntime's profile -> ({op type: share of the node time}, largest first; the share of the
    prefix graph's split attention: nodes named *.split*, its scores, mask, softmax, P.V and layout)."""
    events = json.loads(Path(trace).read_text())
    per_op: dict[str, float] = {}
    attention = 0.0
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0))
            attention += float(e.get("dur", 0)) if ".split" in e["name"] else 0.0
    Path(trace).unlink(missing_ok=True)
    total = sum(per_op.values()) or 1.0
    return {k: round(v / total, 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}, round(attention / total, 4)


def worker_peak() -> dict:
    """The CPU's int8 GEMM rate through onnxruntime at THREADS threads (ops/s), as bench_peers measures it."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m = k = n = 2048
    rng = np.random.default_rng(0)
    b = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    rates = {}
    for op in ("MatMulInteger", "DynamicQuantizeMatMul"):
        if op == "MatMulInteger":
            a, feed = helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k]), rng.integers(0, 256, size=(m, k), dtype=np.uint8)
            node, y, inits = helper.make_node(op, ["a", "b"], ["y"]), TensorProto.INT32, [numpy_helper.from_array(b, "b")]
        else:
            a, feed = helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]), rng.standard_normal((m, k), dtype=np.float32)
            node, y = helper.make_node(op, ["a", "b", "s"], ["y"], domain="com.microsoft"), TensorProto.FLOAT
            inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "s")]
        graph = helper.make_graph([node], "g", [a], [helper.make_tensor_value_info("y", y, [m, n])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        session.run(None, {"a": feed})
        best = float("inf")
        for _ in range(3):
            started, runs = time.perf_counter(), 0
            while runs < 3 or time.perf_counter() - started < 1:
                session.run(None, {"a": feed})
                runs += 1
            best = min(best, (time.perf_counter() - started) / runs)
        rates[op] = 2.0 * m * k * n / best
    return {"peak_ops": max(rates.values()), "rates": rates}


def run_worker(args: list[str]) -> dict:
    """One engine in a fresh process, in the memory cgroup when there is one; adds peak RSS."""
    load = os.getloadavg()[0]
    cmd = [py(), str(Path(__file__).resolve()), "--worker", *args]
    if CGROUP.is_dir():
        cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *cmd]
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(THREADS)})
    if out.returncode:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = int(out.stderr.strip().splitlines()[-1]) / 1024
    result["load"] = load
    return result


# --- the run --------------------------------------------------------------------------------------

def machine() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import machine as describe

    return describe()


def setup_cgroup(limit_gib: int) -> None:
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit_gib << 30))
    except OSError as exc:
        log(f"no memory cgroup ({exc.strerror}): running without one")


def bench(args) -> dict:
    setup(args)
    setup_cgroup(args.memory_gib)
    before = machine()
    log(f"{before['cpu']}, flags {' '.join(before['flags'])}, load {before['load']}")
    engines: list[tuple[str, list[str]]] = []
    if "prefix" in args.parts:
        engines += [(k, ["score", k]) for k in ("int8-full", "int8-prefix", "int8-prefix-b1") + (("torch-bf16",) if args.torch else ())]
    if "q4" in args.parts:
        engines += [("A int8", ["shape-a", str(EXPORT / "onnx" / "model_quantized.onnx")])]
        engines += [(f"A q4 level {lv}", ["shape-a", str(WORK / f"q4-level{lv}.onnx")]) for lv in LEVELS]
        engines += [("A q4 level 4, int8 kernels at load", ["shape-a", str(WORK / "q4-level4.onnx"), "expand"])]
    runs: dict[str, list[dict]] = {name: [] for name, _ in engines}
    for r in range(args.rounds):
        for name, worker in engines:
            result = run_worker(worker)
            runs[name].append(result)
            log(f"round {r + 1} {name}: {result['pairs_per_s']:.2f} pairs/s, {result['peak_rss_mib']:.0f} MiB, load {result['load']:.1f}")
    out = {"machine": before, "load_after": os.getloadavg(), "rounds": args.rounds, "runs": runs, "queries": args.queries}
    if "peak" in args.parts:
        out["peak"] = run_worker(["peak", "-"])
        log(f"int8 peak {out['peak']['peak_ops'] / 1e12:.2f} TOPS ({out['peak']['rates']}), load {out['peak']['load']:.1f}")
    if args.profile:
        out["profile"] = run_worker(["shape-a", str(EXPORT / "onnx" / "model_quantized.onnx"), "file", str(WORK / "profile")])
        out["profile_prefix"] = run_worker(["profile-prefix", str(WORK / "profile-prefix")])
    return out


def median(runs: list[dict], key: str = "pairs_per_s") -> float:
    return statistics.median(r[key] for r in runs)


def _loads(runs: list[dict]) -> str:
    loads = [x["load"] for x in runs if "load" in x]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"


def section(r: dict) -> str:
    m, runs = r["machine"], r["runs"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report import kind_title, markers

    start, end = markers(NAME, m["flags"])
    lines = [start, "## Prefix-shared scoring and q4 vs int8 on CPU (benchmarks/bench_prefix.py, issue #20) — "
             + kind_title(m["flags"]), "",
             f"`make bench-prefix`, {m.get('date', 'date not recorded')}. {m['cpu']}, {m['cpus']} CPUs, flags: {' '.join(m['flags']) or 'none of avx2/avx512/vnni/amx'}; "
             f"{THREADS} threads; median of {r['rounds']} interleaved rounds, each engine in its own process. "
             f"Load average {m['load'][0]:.1f} before, {r['load_after'][0]:.1f} after; the load column is the 1-minute "
             "load before each engine's runs (other jobs shared the CPU: compare ratios within a table, not absolute "
             "numbers across machines).", ""]
    if "int8-full" in runs:
        full = median(runs["int8-full"])
        lines += [f"Realistic requests: {r['queries']} queries x 20 documents of 60-100 tokens, official template, default "
                  "instruction, one `score_documents` call per query (tokenizing included, loading excluded, sessions open "
                  "across calls); random 0.6B, the package's small tokenizer (template + query ~86 tokens, document + suffix ~93).", "",
                  "| engine | pairs/s | vs int8 full prompts | peak RSS MiB | load | rounds (pairs/s) |", "|---|---|---|---|---|---|"]
        for name in [n for n in runs if not n.startswith("A ")]:
            v = median(runs[name])
            lines.append(f"| {name} | {v:.2f} | {v / full:.2f}x | {median(runs[name], 'peak_rss_mib'):.0f} | {_loads(runs[name])} | "
                         f"{', '.join(format(x['pairs_per_s'], '.2f') for x in runs[name])} |")
        lines.append("")
    if "A int8" in runs:
        base = median(runs["A int8"])
        peak = r.get("peak", {}).get("peak_ops")
        lines += ["Shape A (batch 8 x 256 tokens, 3 rows left-padded), the builder's full-prompt graphs:", "",
                  "| graph | pairs/s | vs int8 | % of int8 peak | peak RSS MiB | load |", "|---|---|---|---|---|---|"]
        for name in [n for n in runs if n.startswith("A ")]:
            v = median(runs[name])
            share = f"{100 * v * GOP_A / peak:.1f}%" if peak else "—"
            lines.append(f"| {name[2:]} | {v:.2f} | {v / base:.2f}x | {share} | {median(runs[name], 'peak_rss_mib'):.0f} | {_loads(runs[name])} |")
        lines.append("")
        if peak:
            rates = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in r["peak"]["rates"].items())
            lines += [f"int8 peak through onnxruntime (2048^3 GEMM, {THREADS} threads, load {r['peak']['load']:.1f}): {rates} TOPS; "
                      f"shape A counts 2 x 440M x 256 = {GOP_A / 1e9:.0f} GOP a pair.", ""]
    if r.get("profile"):
        prof = r["profile"]["profile"]
        lines += ["Per-op profile of shape A int8 (onnxruntime profiling, share of node time): "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(prof.items())[:8]) + ".", ""]
    if r.get("profile_prefix"):
        p = r["profile_prefix"]
        lines += [f"Per-op profile of int8-prefix on the realistic requests ({p['pairs_per_s']:.2f} pairs/s profiled; onnxruntime "
                  "profiling of the with-past graph, share of node time): "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(p["profile"].items())[:8])
                  + f". The split attention (scores, mask, softmax, P.V and their transposes, fp32) takes {100 * p['attention']:.0f}%; "
                  "the rest is the int8 linears (DynamicQuantizeMatMul), norms, rotary and activation.", ""]
    lines.append(end)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--parts", default="prefix,q4,peak")
    ap.add_argument("--torch", action="store_true", help="also torch bf16 (bench_peers compares the peers)")
    ap.add_argument("--profile", action="store_true", help="add per-op profiles of shape A int8 and of int8-prefix's requests")
    ap.add_argument("--memory-gib", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.worker:
        kind, rest = args.worker[0], args.worker[1:]
        workers = {"score": worker_score, "peak": lambda *_: worker_peak(), "shape-a": worker_shape_a,
                   "profile-prefix": worker_profile_prefix}
        result = workers[kind](*rest)
        print(json.dumps(result))
        return
    result = bench(args)
    (WORK / "bench_prefix.json").write_text(json.dumps(result, indent=2))
    text = section(result)
    print(text)
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from report import markers, write_section

        write_section(text, *markers(NAME, result["machine"]["flags"]))


if __name__ == "__main__":
    main()
