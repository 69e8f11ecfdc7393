"""CPU scoring throughput of the graph builder's variants vs the optimum-traced ones (issue #8).

On the real-shaped random 0.6B checkpoint, batch 8 x 256 tokens, 2 threads (intra_op_num_threads=2):

1. pairs/s of every builder variant (`qconv export-onnx --exporter builder`), of every traced variant
   (`--exporter optimum`, exported once and kept in benchmarks/.work/ for reuse) and of torch bf16.
   Interleaved rounds: each round scores every variant once, each in a fresh process (so it also
   gives session-creation time and peak RSS), in an order rotated per round; medians over rounds,
   and the builder/traced ratio as the median of the per-round ratios (side by side in time);
2. a per-op profile (onnxruntime's enable_profiling, time summed per op type) of the builder's int8
   and q4 graphs and of the traced int8 graph;
3. the op choice for int8 linear layers: one 0.6B layer's seven weight MatMuls as each candidate
   structure (DynamicQuantizeMatMul per weight; one DynamicQuantizeLinear per input shared by
   MatMulIntegerToFloat; q/k/v and gate/up fused into one weight), timed in one process, interleaved.

Writes its own section of BENCHMARKS.md. Heavy (~3 GB per scoring process, ~10 GB once for the
traced export if it is missing):

    flock /tmp/qconv-heavy.lock .venv/bin/python benchmarks/bench_onnx_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_onnx import BATCH, MODES, PROFILE, ROOT, SEQ, THREADS, WORK, ensure_checkpoint, measure, mib  # noqa: E402

START, END = "<!-- bench_onnx_speed:start -->", "<!-- bench_onnx_speed:end -->"
BUILDER, TRACED, SEQCLS = WORK / "onnx-0.6b-builder", WORK / "onnx-0.6b-optimum-all", WORK / "onnx-0.6b-seqcls"
INT8_SPEEDUP_TARGET = 1.3  # builder int8 vs traced int8

# One fresh process: session creation (or torch load) timed apart, one warm-up batch, then at least
# MIN_BATCHES and MIN_SECONDS of timed batches of real template prompts cut to exactly SEQ tokens.
SCORE = r"""
import json, sys, time
kind, path, which, out, min_batches, min_seconds = sys.argv[1:7]
from qwen_convert.reranker import Pair, PromptEncoder, load_tokenizer
enc = PromptEncoder(load_tokenizer(path), max_length=%(seq)d)
doc = " ".join(f"the document talks about topic {i} and more words" for i in range(200))
batch = enc.encode([Pair(f"what is topic {i}?", doc) for i in range(%(batch)d)])
assert batch.input_ids.shape == (%(batch)d, %(seq)d), batch.input_ids.shape
started = time.perf_counter()
if kind == "torch":
    import torch
    torch.set_num_threads(%(threads)d)
    torch.set_num_interop_threads(1)
    from qwen_convert.scoring.registry import load_scorers
    scorer = load_scorers(path, (), which)[0]
else:
    from qwen_convert.scoring.onnx_scorers import load_onnx_scorers
    scorer = load_onnx_scorers(path, [which], threads=%(threads)d)[0]
    scorer.session
load = time.perf_counter() - started
scores = scorer.score(batch)
n, started = 0, time.perf_counter()
while n < int(min_batches) or time.perf_counter() - started < float(min_seconds):
    scorer.score(batch)
    n += 1
seconds = time.perf_counter() - started
json.dump({"batches": n, "seconds": seconds, "pairs_per_s": n * %(batch)d / seconds, "load_seconds": load,
           "scores": [float(s) for s in scores]}, open(out, "w"))
""" % {"seq": SEQ, "batch": BATCH, "threads": THREADS}

# The int8 op choice: one 0.6B layer's weight MatMuls (x: [8, 256, 1024]; q 2048, k/v 1024, o from
# 2048, gate/up 3072, down from 3072), random weights quantized by the same encoder.
OPS = r"""
import json, statistics, sys, time
import numpy as np, onnxruntime as ort
from onnx import TensorProto
from qwen_convert.onnx.precision import MS, PRECISIONS, LinearWeight, quantize_int8
from qwen_convert.onnx.weights import GraphWriter
from qwen_convert.onnx.quantize import QuantizeOptions; from qwen_convert.formats import QuantMode
out, rounds = sys.argv[1], int(sys.argv[2])
B, S, H, Q, KV, I = %(batch)d, %(seq)d, 1024, 2048, 1024, 3072
rng = np.random.default_rng(0)
W = {n: rng.normal(0, .02, s).astype(np.float32) for n, s in
     dict(q=(Q, H), k=(KV, H), v=(KV, H), o=(H, Q), gate=(I, H), up=(I, H), down=(H, I)).items()}

def int8(g, name, w):
    q, s = quantize_int8(w, False)
    return g.initializer(name + ".q", q), g.initializer(name + ".s", s), g.initializer(name + ".z", np.zeros((), np.int8))

def dqmm(g, x, names, ws):
    return [g.node("DynamicQuantizeMatMul", [x, *int8(g, n, w)], domain=MS, name=n)[0] for n, w in zip(names, ws)]

def mmitf(g, x, names, ws):
    a, a_s, a_z = g.node("DynamicQuantizeLinear", [x], 3, name=g.unique("dql"))
    outs = []
    for n, w in zip(names, ws):
        q, s, z = int8(g, n, w)
        outs.append(g.node("MatMulIntegerToFloat", [a, q, a_s, s, a_z, z], domain=MS, name=n)[0])
    return outs

def nbits8(block):
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits
    def make(g, x, names, ws):
        outs = []
        for n, w in zip(names, ws):
            rows, k = w.shape
            packed = np.zeros((rows, k // block, block), np.uint8)
            scales = np.zeros((rows, k // block), np.float32)
            zp = np.zeros((rows, k // block), np.uint8)
            quantize_matmul_8bits(packed, np.ascontiguousarray(w.T), scales, zp, block, rows, k, True)
            outs.append(g.node("MatMulNBits", [x, g.initializer(n + ".q", packed), g.initializer(n + ".s", scales)],
                               domain=MS, name=n, K=k, N=rows, bits=8, block_size=block, accuracy_level=4)[0])
        return outs
    return make

def precision(mode):
    return lambda g, x, names, ws: [PRECISIONS[mode].linear(g, n, x, [LinearWeight.of(n, w)], QuantizeOptions())
                                    for n, w in zip(names, ws)]

CANDIDATES = {"int8 DynamicQuantizeMatMul per weight": (dqmm, False),
              "int8 DynamicQuantizeLinear shared + MatMulIntegerToFloat": (mmitf, False),
              "int8 DynamicQuantizeMatMul, q/k/v and gate/up fused": (dqmm, True),
              "int8 DynamicQuantizeLinear + MatMulIntegerToFloat, fused": (mmitf, True),
              "int8 MatMulNBits bits=8 block 128 (accuracy_level 4), fused": (nbits8(128), True),
              "q4 MatMulNBits per weight": (precision(QuantMode.Q4), False),
              "q4 MatMulNBits, fused": (precision(QuantMode.Q4), True)}

def build(make, fused):
    g = GraphWriter()
    x = g.input("x", TensorProto.FLOAT, [B, S, H])
    outs = []
    for group in (["q", "k", "v"], ["gate", "up"]):
        ws = [np.concatenate([W[n] for n in group])] if fused else [W[n] for n in group]
        outs += make(g, x, ["".join(group)] if fused else group, ws)
    for n, width in (("o", Q), ("down", I)):
        outs += make(g, g.input("x_" + n, TensorProto.FLOAT, [B, S, width]), [n], [W[n]])
    for o in outs:
        g.output(o, TensorProto.FLOAT, [B, S, "n"])
    return g.model().SerializeToString()

feeds = {"x": rng.normal(0, 1, (B, S, H)).astype(np.float32), "x_o": rng.normal(0, 1, (B, S, Q)).astype(np.float32),
         "x_down": rng.normal(0, 1, (B, S, I)).astype(np.float32)}
opts = ort.SessionOptions()
opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = %(threads)d, 1, 3
sessions = {k: ort.InferenceSession(build(*v), opts, providers=["CPUExecutionProvider"]) for k, v in CANDIDATES.items()}
times = {k: [] for k in sessions}
for s in sessions.values():
    s.run(None, feeds)
for r in range(rounds):
    for k, s in list(sessions.items())[r %% len(sessions):] + list(sessions.items())[:r %% len(sessions)]:
        started = time.perf_counter()
        s.run(None, feeds)
        times[k].append(time.perf_counter() - started)
json.dump(times, open(out, "w"))
""" % {"seq": SEQ, "batch": BATCH, "threads": THREADS}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def qconv() -> str:
    return str(Path(sys.executable).with_name("qconv"))


def exports(ckpt: Path, reuse: bool) -> dict:
    """The builder's five variants (re-made unless `reuse`: streaming makes them cheap) and the
    traced five (made once, kept: ~15 min and ~10 GB). Sizes from `export-onnx --json`."""
    made = {}
    for out, exporter, keep in ((TRACED, "optimum", True), (BUILDER, "builder", reuse)):
        report = out.with_name(out.name + ".json")
        if not (keep and report.is_file() and (out / "onnx").is_dir()):
            log(f"export: qconv export-onnx --exporter {exporter} --quantize all ...")
            run = measure([qconv(), "export-onnx", str(ckpt), str(out), "--exporter", exporter, "--quantize", "all",
                           "--no-verify", "--force", "-q", "--json"])
            report.write_text(run.stdout)
        made[exporter] = {v["mode"]: v["bytes"] for v in json.loads(report.read_text())["variants"]}
    if not (SEQCLS / "config.json").is_file():
        log("seq-cls conversion (the torch bf16 baseline) ...")
        measure([qconv(), "seqcls", str(ckpt), str(SEQCLS), "--force", "-q"])
    return made


def scoring(rounds: int, min_batches: int, min_seconds: float, modes=MODES) -> dict[str, list[dict]]:
    runs = [("torch", SEQCLS, "bfloat16", "torch bf16")]
    runs += [("onnx", d, m, f"{label} {m}") for m in modes for d, label in ((BUILDER, "builder"), (TRACED, "traced"))]
    results: dict[str, list[dict]] = {label: [] for *_, label in runs}
    out = WORK / "speed-score.json"
    for r in range(rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]  # rotate: no variant always runs first or last
        for kind, path, which, label in order:
            log(f"round {r + 1}/{rounds}: {label} ...")
            run = measure([sys.executable, "-c", SCORE, kind, str(path), which, str(out), str(min_batches), str(min_seconds)])
            results[label].append({**json.loads(out.read_text()), "peak_rss": run.peak_rss})
    out.unlink(missing_ok=True)
    return results


def profile(label: str, root: Path, mode: str) -> dict[str, float]:
    from qwen_convert.formats import QuantMode

    log(f"profile: {label} ...")
    out = WORK / "speed-profile.json"
    measure([sys.executable, "-c", PROFILE, str(root), str(root / "onnx" / QuantMode(mode).file_name), str(out)])
    by_op = json.loads(out.read_text())
    out.unlink()
    for f in WORK.glob("speed-profile.json.trace*"):
        f.unlink()
    return by_op


def op_choice(rounds: int) -> dict[str, float]:
    log("op choice: one layer's linears, each candidate structure ...")
    out = WORK / "speed-ops.json"
    measure([sys.executable, "-c", OPS, str(out), str(rounds)])
    times = json.loads(out.read_text())
    out.unlink()
    return times


def bench(args) -> dict:
    ckpt = ensure_checkpoint()
    r: dict = {"checkpoint": str(ckpt.relative_to(ROOT)), "sizes": exports(ckpt, args.reuse)}
    modes = [m for m in MODES if m in args.modes.split(",")]
    r["ops"] = op_choice(args.op_rounds) if args.op_rounds else {}
    r["scoring"] = scoring(args.rounds, args.min_batches, args.min_seconds, modes)
    r["profiles"] = {label: profile(label, root, mode) for label, root, mode in
                     (("builder int8", BUILDER, "int8"), ("traced int8", TRACED, "int8"), ("builder q4", BUILDER, "q4"))
                     if mode in modes}
    r["load_average"] = os.getloadavg()
    return r


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in runs)


def ratio(r: dict, mode: str) -> float:
    """Median over rounds of builder/traced pairs/s measured in the same round."""
    b, t = r["scoring"][f"builder {mode}"], r["scoring"][f"traced {mode}"]
    return statistics.median(x["pairs_per_s"] / y["pairs_per_s"] for x, y in zip(b, t))


def profile_table(by_op: dict[str, float], top: int = 10) -> str:
    total = sum(by_op.values()) or 1
    rows = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"| {op} | {us / 1e3:,.0f} ms | {us / total:.0%} |" for op, us in rows)


def section(r: dict) -> str:
    s = r["scoring"]
    bf16 = median_of(s["torch bf16"], "pairs_per_s")
    rounds = len(s["torch bf16"])
    rows = [f"| torch bf16 (seq-cls, transformers) | — | {bf16:.2f} | — | 1.00× | "
            f"{median_of(s['torch bf16'], 'load_seconds'):.1f} s | — | {mib(max(x['peak_rss'] for x in s['torch bf16']))} |"]
    verdicts = []
    for m in [m for m in MODES if f"builder {m}" in s]:  # (--modes measures a subset)
        b, t = s[f"builder {m}"], s[f"traced {m}"]
        q = ratio(r, m)
        pb, pt = median_of(b, "pairs_per_s"), median_of(t, "pairs_per_s")
        rows.append(f"| {m} | {mib(r['sizes']['builder'][m])} / {mib(r['sizes']['optimum'][m])} | {pb:.2f} | {pt:.2f} | "
                    f"{pb / bf16:.2f}× | {median_of(b, 'load_seconds'):.1f} s / {median_of(t, 'load_seconds'):.1f} s | "
                    f"**{q:.2f}×** | {mib(max(x['peak_rss'] for x in b))} / {mib(max(x['peak_rss'] for x in t))} |")
        verdicts.append((m, q))
    int8 = dict(verdicts).get("int8", float("nan"))
    slower = [f"{m} ({q:.2f}×)" for m, q in verdicts if q < 1.0]
    ops = {k: (min(v), statistics.median(v)) for k, v in r["ops"].items()}  # best (least contended), median
    fastest = min((b for b, _ in ops.values()), default=1.0)
    op_rows = "\n".join(f"| {k} | {b * 1e3:,.0f} ms | {m * 1e3:,.0f} ms | {b / fastest:.2f}× |" for k, (b, m) in ops.items()) \
        or "| (not measured in this run: --op-rounds 0) | | | |"
    profiles = "\n\n".join(f"{label}:\n\n| op | time | share |\n|---|---|---|\n{profile_table(p)}"
                           for label, p in r["profiles"].items())
    load = r["load_average"]
    return f"""{START}
## ONNX scoring speed: graph builder vs optimum-traced graphs (benchmarks/bench_onnx_speed.py)

Checkpoint: `{r['checkpoint']}` (Qwen3-Reranker-0.6B shape, random bf16 weights). CPU scoring, batch
{BATCH} × {SEQ} tokens, {THREADS} threads (`intra_op_num_threads={THREADS}`), {platform.machine()},
{os.cpu_count()} cores, shared with other jobs (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
at the end). {rounds} interleaved rounds; each round scores every variant once in a fresh process,
order rotated per round; medians over rounds. "builder / traced" is the median of the per-round
ratios (each pair measured minutes apart at most). Session creation = `InferenceSession(...)`
(graph optimizations included), or the torch load.

| variant | size builder / traced | builder pairs/s | traced pairs/s | builder vs torch bf16 | session creation builder / traced | builder / traced | peak RSS builder / traced |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

### Targets

- builder int8 ≥ {INT8_SPEEDUP_TARGET}× the traced int8 graph: **{int8:.2f}× — {'met' if int8 >= INT8_SPEEDUP_TARGET else 'MISSED'}**.
- no builder variant slower than its traced twin: **{'met' if not slower else 'MISSED: ' + ', '.join(slower)}**.

### Where the time goes (onnxruntime profile, 2 batches, time per op type)

{profiles}

### int8 linear layers: which op structure (one 0.6B layer's seven weight MatMuls, {r.get('op_rounds', '')} interleaved runs in one process; best = least contended)

| structure | best time per layer | median | best vs fastest |
|---|---|---|---|
{op_rows}
{END}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-batches", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--op-rounds", type=int, default=7, help="0: skip the op-structure benchmark")
    parser.add_argument("--modes", default=",".join(MODES), help="variants to score, comma-separated (default: all)")
    parser.add_argument("--reuse", action="store_true", help="keep an existing builder export (default: re-export)")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--from-json", action="store_true", help="re-render the last run's results, measure nothing")
    args = parser.parse_args()
    saved = WORK / "bench_onnx_speed.json"
    if args.from_json:
        results = json.loads(saved.read_text())
    else:
        started = time.perf_counter()
        results = bench(args)
        results["op_rounds"], results["seconds"] = args.op_rounds, time.perf_counter() - started
        saved.write_text(json.dumps(results, indent=2))
    text = section(results)
    print(text)
    if not args.no_write:
        from report import write_section

        write_section(text, START, END)
        print("updated BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
