"""Benchmark verify's reference pass: the streamed forward (qwen_convert/stream, our own per-layer
loop over transformers' Qwen3DecoderLayer) against transformers' whole-model Qwen3ForCausalLM, and
the reference cache (cold vs warm).

Each row is a fresh process under GNU `time` (peak RSS, %M); wall time is measured here. Engines
alternate within a repeat. Writes its own section of BENCHMARKS.md.

    flock /tmp/qconv-heavy.lock .venv/bin/python benchmarks/bench_verify.py [--pairs 8] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
START, END = "<!-- bench_verify:start -->", "<!-- bench_verify:end -->"
sys.path.insert(0, str(HERE))
from report import write_section  # noqa: E402

REFERENCE = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from qwen_convert.probes import PROBE_PAIRS
from qwen_convert.scoring import encode_batches, length_order, prompt_encoder
from qwen_convert.stream.reference import reference_scores
path, engine, n, max_length, cache = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pairs = list(PROBE_PAIRS[:n])
enc = prompt_encoder(path, None, max_length)
order = length_order(enc, pairs)
batches = {s: encode_batches(enc, [pairs[i] for i in order], 8, s) for s in ("left", "right")}
started = time.perf_counter()
run = reference_scores(path, batches, order, {"n": n}, engine, Path(cache) if cache != "-" else None)
print("RESULT " + json.dumps({"engine": run.engine, "cache": run.cache, "seconds": time.perf_counter() - started,
                              "peak": run.peak_rss, "left0": float(run.scores["left"][0])}))
"""


def measure(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        started = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", t.name, *args], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - started
        if p.returncode:
            raise SystemExit(f"failed: {' '.join(args)}\n{p.stderr[-2000:]}")
        rss = int(open(t.name).read().split()[-1]) * 1024
    result = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, "wall": wall, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--checkpoints", default="qwen3-reranker-0.6b:transformers,streamed;8b-wide:streamed")
    a = ap.parse_args()
    py = str(ROOT / ".venv/bin/python")
    rows = []
    cache = tempfile.mkdtemp(prefix="bench-verify-cache-")
    for spec in a.checkpoints.split(";"):
        name, engines = spec.split(":")
        ckpt = WORK / name
        if not ckpt.is_dir():
            print(f"skip {name}: {ckpt} missing", file=sys.stderr)
            continue
        for engine in engines.split(","):
            r = measure([py, "-c", REFERENCE, str(ckpt), engine, str(a.pairs), str(a.max_length), "-"])
            rows.append((name, engine, "off", r))
            print(name, engine, r, file=sys.stderr)
        engine = engines.split(",")[-1]
        for state in ("cold", "warm"):
            r = measure([py, "-c", REFERENCE, str(ckpt), engine, str(a.pairs), str(a.max_length), cache])
            rows.append((name, engine, f"{state} ({r['cache']})", r))
            print(name, engine, state, r, file=sys.stderr)
    mib = lambda b: f"{b / (1 << 20):,.0f} MiB"  # noqa: E731
    lines = [START, "## verify's reference pass (benchmarks/bench_verify.py)", "",
             f"{a.pairs} built-in probe pairs, max length {a.max_length}, batch 8, both padding sides; one run per row,",
             f"a fresh process each, peak RSS from GNU time. Machine: {platform.machine()}, {os.cpu_count()} cores, shared "
             f"(load average {os.getloadavg()[0]:.1f} at the end). `streamed` = qconv's own per-layer loop over transformers'",
             "Qwen3DecoderLayer (accelerate's offload was not measured: its hooks move whole modules, and the 151669-row",
             "embedding and head would still be loaded whole).", "",
             "| checkpoint | engine | cache | wall | in-process | peak RSS |", "|---|---|---|---|---|---|"]
    for name, engine, cache_state, r in rows:
        lines.append(f"| {name} | {engine} | {cache_state} | {r['wall']:.1f} s | {r['seconds']:.1f} s | {mib(r['rss'])} |")
    lines += ["", END]
    text = "\n".join(lines)
    print(text)
    write_section(text, START, END)


if __name__ == "__main__":
    main()
