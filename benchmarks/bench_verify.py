"""Benchmark `qconv verify` (issue #9): its reference pass, the reference cache, and whole verify runs.

Parts (`--parts`, comma-separated; each row is a fresh process under GNU `time`, peak RSS = %M):

- `reference`: the reference pass alone on the 0.6B shape and 8b-wide, streamed (qwen_convert/scoring/streamed,
  our own per-layer loop over transformers' Qwen3DecoderLayer) vs transformers' whole Qwen3ForCausalLM,
  then cold vs warm cache.
- `onnx`: `qconv verify` of the five ONNX variants of the 0.6B shape (benchmarks/.work/onnx-0.6b-builder),
  the pre-#9 code (commit 346e154^, from a git worktree in benchmarks/.work/pre9) vs today's defaults
  with a fresh cache dir (cold), a cache holding only the reference (warm reference) and the cold
  run's dir again (warm), interleaved over `--rounds`; then, per round, onnxruntime alone on the same
  batches (the floor under the warm-reference row).
- `8b-wide`: `qconv seqcls` of benchmarks/.work/8b-wide, `qconv verify` of it (streamed, cold cache),
  `qconv export-onnx --quantize q4f16 --no-fp32` and `qconv verify` of that (same cache: warm).
- `8b`: the same for the full 8B shape (benchmarks/.work/8b); the q4f16 export is the one the ONNX
  export benchmark leaves in benchmarks/.work/8b-onnx (waited for, up to --wait-until UTC).

Results accumulate in benchmarks/.work/bench_verify.json (one entry per part, with its date), and the
section of BENCHMARKS.md is rewritten from all parts measured so far, so running one part keeps the
others' rows. Each measured process takes the heavy-job lock itself (--lock), so run the script
itself without it (an outer `flock` on the same file deadlocks):

    .venv/bin/python benchmarks/bench_verify.py --parts onnx,8b-wide
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
RESULTS = WORK / "bench_verify.json"
START, END = "<!-- bench_verify:start -->", "<!-- bench_verify:end -->"
sys.path.insert(0, str(HERE))
from report import write_section  # noqa: E402

REFERENCE = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from qwen_convert.scoring.probes import PROBE_PAIRS
from qwen_convert.scoring.batches import encode_batches, length_order, prompt_encoder
from qwen_convert.verify.reference import reference_scores
path, engine, n, max_length, cache = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pairs = list(PROBE_PAIRS[:n])
enc = prompt_encoder(path, None, max_length)
order = length_order(enc, pairs)
batches = {s: encode_batches(enc, [pairs[i] for i in order], 8, s) for s in ("left", "right")}
started = time.perf_counter()
run = reference_scores(path, batches, {s: order for s in batches}, {"n": n}, engine, Path(cache) if cache != "-" else None)
print("RESULT " + json.dumps({"engine": run.engine, "cache": run.cache, "seconds": time.perf_counter() - started,
                              "peak": run.peak_rss, "left0": float(run.scores["left"][0])}))
"""

# The floor under a verify whose reference is cached: onnxruntime alone, in one fresh process, creating
# each variant's session as verify does (onnx_scoring.OnnxScorer) and scoring the batches verify plans.
ORT_ALONE = r"""
import gc, json, sys, time
from pathlib import Path
from qwen_convert.scoring.onnx_scorers import load_onnx_scorers
from qwen_convert.scoring.probes import load_pairs
from qwen_convert.scoring.batches import prompt_encoder
from qwen_convert.verify import VerifyOptions, plan_batches
ref, onnx, pairs_file, max_length = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
pairs = load_pairs(pairs_file)
options = VerifyOptions(pairs=tuple(pairs), max_length=max_length)
batches = [b for side in plan_batches(prompt_encoder(ref, None, max_length), pairs, options)[0].values() for b in side]
out = {}
for scorer in load_onnx_scorers(onnx):
    started = time.perf_counter()
    scorer.session
    made = time.perf_counter()
    for b in batches:
        scorer.score(b)
    out[scorer.name] = {"session": made - started, "runs": time.perf_counter() - made}
    scorer._session = None
    gc.collect()
print("RESULT " + json.dumps(out))
"""

ENV = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
LOCK: list[str] = []  # ["flock", PATH] from --lock: each measured process takes the heavy-job lock itself


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def measure(args: list[str], ok: tuple[int, ...] = (0,), cwd: Path = ROOT) -> dict:
    """One fresh process: wall time, peak RSS (GNU time %M), exit code, stdout. An exit code outside
    `ok` aborts the benchmark with the child's stderr."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        # GNU time runs inside flock: %e (wall) and %M (peak RSS) leave out the wait for the lock
        p = subprocess.run([*LOCK, "/usr/bin/time", "-f", "%e %M", "-o", t.name, *args], capture_output=True, text=True,
                           cwd=cwd, env=ENV)
        wall, rss = open(t.name).read().split()[-2:]
        wall, rss = float(wall), int(rss) * 1024
    if p.returncode not in ok:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(args)}\n{p.stderr[-3000:]}")
    return {"wall": wall, "rss": rss, "code": p.returncode, "stdout": p.stdout}


def qconv(*args: str, ok: tuple[int, ...] = (0,)) -> dict:
    cmd = [str(ROOT / ".venv/bin/qconv"), *args]
    log(" ".join(cmd))
    r = measure(cmd, ok)
    log(f"  {r['wall']:.1f} s, {mib(r['rss'])}, exit {r['code']}")
    return r


def mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / (1 << 20):,.0f} MiB"


def probe_file(queries: int) -> Path:
    """The first `queries` query groups of verify's built-in probes, without labels: NDCG gains then
    come from the reference's own P(yes) (with random weights the hand labels only measure noise)."""
    sys.path.insert(0, str(ROOT))
    from qwen_convert.scoring.probes import PROBE_PAIRS

    keep: list[str] = []
    for p in PROBE_PAIRS:
        if p.query not in keep:
            keep.append(p.query)
    keep = keep[:queries]
    pairs = [p for p in PROBE_PAIRS if p.query in keep]
    path = WORK / f"probes-{queries}q-unlabeled.jsonl"
    path.write_text("".join(json.dumps({"query": p.query, "document": p.document}, ensure_ascii=False) + "\n"
                            for p in pairs), encoding="utf-8")
    return path


def verify_row(label: str, r: dict) -> dict:
    """A verify run: whole process plus the reference and per-candidate split from --json."""
    report = json.loads(r["stdout"])
    ref = report["reference"]
    return {
        "row": label, "wall": r["wall"], "rss": r["rss"], "code": r["code"],
        # .get: the pre-#9 code's report has no engine, peak or cache fields
        "reference": {"engine": ref.get("engine", "transformers"), "cache": ref.get("cache", "off"), "seconds": ref["seconds"],
                      "peak": ref.get("peak_rss_bytes")},
        "candidates": [{"name": c["name"], "passed": c["passed"], "seconds": c["seconds"], "peak": c.get("peak_rss_bytes"),
                        "engine": c.get("engine", "onnxruntime"), "not_verified": c.get("not_verified"), "cache": c.get("cache", "off"),
                        "max_abs_logit": c["max_abs_logit"], "max_abs_prob": c["max_abs_prob"], "retention": c["retention"],
                        "failures": [{k: f[k] for k in ("check", "value", "tolerance", "detail")} for f in c["failures"]]}
                       for c in report["candidates"]],
        "pairs": report["pairs"]["count"], "max_length": report["max_length"],
        "padding": report.get("padding_rows") or {side: report["pairs"]["count"] for side in report["padding_sides"]},
    }


# --- parts ---------------------------------------------------------------------------------------

def part_reference(a) -> dict:
    py = str(ROOT / ".venv/bin/python")
    rows = []
    cache = tempfile.mkdtemp(prefix="bench-verify-cache-")
    for spec in a.checkpoints.split(";"):
        name, engines = spec.split(":")
        ckpt = WORK / name
        if not ckpt.is_dir():
            log(f"skip {name}: {ckpt} missing")
            continue
        runs = [(e, "-", "off") for e in engines.split(",")]
        runs += [(engines.split(",")[-1], cache, state) for state in ("cold", "warm")]
        for engine, where, state in runs:
            r = measure([py, "-c", REFERENCE, str(ckpt), engine, str(a.ref_pairs), str(a.ref_max_length), where])
            res = json.loads(next(x for x in r["stdout"].splitlines() if x.startswith("RESULT "))[7:])
            cache_state = state if state == "off" else f"{state} ({res['cache']})"
            rows.append({"checkpoint": name, "engine": res["engine"], "cache": cache_state, "wall": r["wall"],
                         "seconds": res["seconds"], "rss": r["rss"]})
            log(f"{name} {engine} {cache_state}: {r['wall']:.1f} s, {mib(r['rss'])}")
    shutil.rmtree(cache, ignore_errors=True)
    return {"rows": rows, "pairs": a.ref_pairs, "max_length": a.ref_max_length}


# "Today's path" when #9 was filed: the commit before its streamed reference and score cache landed
# (346e154). Its code runs from a git worktree on the same venv, same files, same flags.
PRE9 = "346e154^"


def pre9_checkout() -> Path:
    where = WORK / "pre9"
    if not (where / "qwen_convert").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(where), PRE9], cwd=ROOT, check=True, capture_output=True)
    return where


def part_onnx(a) -> dict:
    """Per round, interleaved: the pre-#9 code; today's default with a fresh cache (cold); with a cache
    that holds only the reference's scores (warm reference: new variants of a model already verified);
    and the cold run's cache again (warm: a re-verify, every score cached)."""
    ref, onnx = WORK / "qwen3-reranker-0.6b", WORK / "onnx-0.6b-builder"
    for d in (ref / "config.json", onnx / "onnx" / "model_q4f16.onnx"):
        if not d.exists():
            raise SystemExit(f"{d} missing: run benchmarks/bench_onnx.py (or make_checkpoint.py 0.6b) first")
    pairs = probe_file(a.queries)
    common = ["verify", str(ref), str(onnx), "--pairs", str(pairs), "--max-length", str(a.max_length), "--json", "-q"]
    old = pre9_checkout()
    labels = ["before #9 (commit 346e154^, its defaults)", "now, cold cache (defaults, fresh --cache-dir)",
              "now, warm reference (cache holds the reference only)", "now, warm (the cold run's --cache-dir again)"]
    rounds: list[list[dict]] = []
    floors: list[dict] = []
    for k in range(a.rounds):
        log(f"round {k + 1}/{a.rounds}")
        cold, ref_only = (Path(tempfile.mkdtemp(prefix="bench-verify-cache-")) for _ in range(2))
        # python -c puts the working directory first on sys.path: run the old code from its own checkout
        r = measure([str(ROOT / ".venv/bin/python"), "-c", "from qwen_convert.cli import app; app()", *common], (0, 1, 3), cwd=old)
        log(f"  before #9: {r['wall']:.1f} s")
        first = qconv(*common, "--cache-dir", str(cold), ok=(0, 1, 3))
        row = [verify_row(labels[0], r), verify_row(labels[1], first)]
        shutil.copy(json.loads(first["stdout"])["reference"]["cache_path"], ref_only)
        row.append(verify_row(labels[2], qconv(*common, "--cache-dir", str(ref_only), ok=(0, 1, 3))))
        row.append(verify_row(labels[3], qconv(*common, "--cache-dir", str(cold), ok=(0, 1, 3))))
        rounds.append(row)
        r = measure([str(ROOT / ".venv/bin/python"), "-c", ORT_ALONE, str(ref), str(onnx), str(pairs), str(a.max_length)])
        split = json.loads(next(x for x in r["stdout"].splitlines() if x.startswith("RESULT "))[7:])
        floors.append({"wall": r["wall"], "rss": r["rss"], "variants": split})
        log(f"  onnxruntime alone: {r['wall']:.1f} s (sessions {sum(v['session'] for v in split.values()):.1f} s, "
            f"run() {sum(v['runs'] for v in split.values()):.1f} s)")
        for d in (cold, ref_only):
            shutil.rmtree(d, ignore_errors=True)
    return {"rounds": rounds, "floors": floors, "queries": a.queries, "tokens": planned_tokens(ref, pairs, a.max_length)}


def planned_tokens(ref: Path, pairs_file: Path, max_length: int) -> dict:
    """Padded tokens each model scores: the pre-#9 plan (batches of 8 in length order, every pair on
    both sides) and today's (verify.plan_batches: batches cut at long prompts, then the padding probe)."""
    sys.path.insert(0, str(ROOT))
    from qwen_convert.scoring.batches import encode_batches, length_order, prompt_encoder
    from qwen_convert.scoring.probes import load_pairs
    from qwen_convert.verify import VerifyOptions, plan_batches

    pairs = load_pairs(pairs_file)
    encoder = prompt_encoder(ref, None, max_length)
    order = length_order(encoder, pairs)
    before = 2 * sum(b.input_ids.size for b in encode_batches(encoder, [pairs[i] for i in order], 8, "left"))
    batches = plan_batches(encoder, pairs, VerifyOptions(pairs=tuple(pairs), max_length=max_length))[0]
    return {"before": int(before), "now": int(sum(b.input_ids.size for side in batches.values() for b in side)),
            "real": int(sum(len(encoder.ids(p)) for p in pairs))}


def wide_or_full(a, name: str, onnx_from_lead: bool) -> dict:
    ckpt, seqcls, onnx = WORK / name, WORK / f"{name}-seqcls", WORK / f"{name}-onnx"
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"{ckpt} missing: benchmarks/make_checkpoint.py {name} {ckpt}")
    queries = a.queries_8b if name == "8b" else a.queries
    max_length = a.max_length_8b if name == "8b" else a.max_length
    pairs = probe_file(queries)
    cache = Path(tempfile.mkdtemp(prefix="bench-verify-cache-"))
    # --engine streamed: what `auto` picks where the fp32 model does not fit (a 16 GB runner; the 8B
    # anywhere here); forced so the 8b-wide, which would fit in 24 GiB, measures the same engine.
    common = ["--pairs", str(pairs), "--max-length", str(max_length), "--engine", "streamed", "--cache-dir", str(cache),
              "--json", "-q"]
    rows = []
    try:
        r = qconv("seqcls", str(ckpt), str(seqcls), "--force", "-q", "--json")
        rows.append({"row": "qconv seqcls", "wall": r["wall"], "rss": r["rss"], "code": r["code"]})
        rows.append(verify_row("verify seq-cls (cold cache)", qconv("verify", str(ckpt), str(seqcls), *common, ok=(0, 1, 3))))
    finally:
        shutil.rmtree(seqcls, ignore_errors=True)  # 4 GB (8b-wide) / 16 GB (8b) of disk
    q4f16 = onnx / "onnx" / "model_q4f16.onnx"
    if onnx_from_lead:
        # the ONNX export benchmark (bench_export.py) writes 8b-onnx.json next to the output dir once
        # the export is complete
        done = onnx.with_name(onnx.name + ".json")
        deadline = dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(a.wait_until), dt.timezone.utc)
        while not (q4f16.exists() and done.exists()) and dt.datetime.now(dt.timezone.utc) < deadline:
            time.sleep(60)
        if not (q4f16.exists() and done.exists()):
            log(f"{q4f16} (and its .json) not there by {a.wait_until} UTC: q4f16 verify skipped")
            return {"rows": rows, "pairs": str(pairs.name), "skipped": f"q4f16 export not there by {a.wait_until} UTC"}
        e = json.loads(done.read_text())
        rows.append({"row": f"qconv export-onnx {e['args']} (bench_export.py, {e['date']})", "wall": e["seconds"],
                     "rss": e["peak_rss"], "code": 0})
    else:
        r = qconv("export-onnx", str(ckpt), str(onnx), "--quantize", "q4f16", "--no-fp32", "--no-verify", "--force",
                  "-q", "--json")
        rows.append({"row": "qconv export-onnx --quantize q4f16 --no-fp32 --no-verify", "wall": r["wall"], "rss": r["rss"],
                     "code": r["code"]})
    try:
        rows.append(verify_row("verify q4f16 (warm cache)", qconv("verify", str(ckpt), str(onnx), "--variant", "q4f16",
                                                                  *common, ok=(0, 1, 3))))
    finally:
        if not onnx_from_lead:
            shutil.rmtree(onnx, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return {"rows": rows}


PARTS = {
    "reference": part_reference,
    "onnx": part_onnx,
    "8b-wide": lambda a: wide_or_full(a, "8b-wide", onnx_from_lead=False),
    "8b": lambda a: wide_or_full(a, "8b", onnx_from_lead=not a.export_8b),
}


# --- report --------------------------------------------------------------------------------------

def _cands(row: dict) -> str:
    return ", ".join(f"{c['name'].split('/')[-1]} " + (f"cached ({c['seconds']:.2f} s)" if c.get("cache") == "hit" else f"{c['seconds']:.0f} s")
                     + ("" if c["passed"] else " (FAILED)" if not c["not_verified"] else " (not verified)")
                     for c in row["candidates"])


def _outcome(c: dict) -> str:
    """passed / not verified: why / FAILED: the gate(s) and the measured values (from verify's --json)."""
    if c["passed"]:
        return "passed" + (f" (max abs Δlogit {c['max_abs_logit']:.1e})" if c.get("max_abs_logit") is not None else "")
    if c["not_verified"]:
        return f"not verified: {c['not_verified']}"
    if "failures" not in c:
        return "FAILED (gate not recorded in this run)"
    return "FAILED: " + "; ".join(f["detail"] for f in c["failures"])


def _peak(row: dict) -> int:
    """The process's peak: verify resets the kernel's high-water mark (/proc/self/clear_refs) before each
    step to measure it alone, and that also resets what GNU time reads at exit (ru_maxrss), so %M
    alone is only the peak since the last step began."""
    steps = [row["reference"]["peak"], *(c["peak"] for c in row["candidates"])]
    return max([row["rss"], *(p for p in steps if p)])


def _ref(row: dict) -> str:
    r = row["reference"]
    if r["cache"] == "hit":
        return f"{r['engine']}, cache hit"
    return f"{r['engine']}, cache {r['cache']}: {r['seconds']:.0f} s, {mib(r['peak'])}"


def _median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def _total(floor: dict, key: str) -> float:
    """Seconds of `key` (session / runs) over the variants of one onnxruntime-alone run."""
    return sum(v[key] for v in floor["variants"].values())


def _padding(row: dict) -> str:
    return " + ".join(f"{n} {side}-padded" for side, n in row.get("padding", {}).items())


def _verdict(value: float, target: float, unit: str = "×") -> str:
    return f"{value:.3f}{unit} (target ≤ {target}{unit}: {'met' if value <= target else 'missed'})"


def _ratio(value: float) -> str:
    """Two decimals, three under 0.01 (a re-verify from the cache is ~0.003x: not 0.00x)."""
    return f"{value:.2f}" if value >= 0.01 else f"{value:.3f}"


# Each part's subsection of BENCHMARKS.md, by the start of its heading: a part with no stored result
# (benchmarks/.work is per machine) keeps the subsection already in BENCHMARKS.md.
HEADINGS = {"reference": "### Reference pass alone", "onnx": "### `qconv verify` of the five ONNX variants",
            "8b-wide": "### 8b-wide", "8b": "### full 8B shape"}


def _blocks(text: str) -> dict[str, str]:
    """part -> its '### ' subsection (heading to the next one) in `text`."""
    out: dict[str, str] = {}
    chunks = text.split("\n### ")
    for chunk in chunks[1:]:
        block = "### " + chunk.split(END)[0].rstrip("\n")
        for part, heading in HEADINGS.items():
            if block.startswith(heading):
                out[part] = block
    return out


def render(results: dict) -> str:
    new = _render(results)
    old_text = (ROOT / "BENCHMARKS.md").read_text()
    old = _blocks(old_text[old_text.index(START):old_text.index(END) + len(END)]) if START in old_text and END in old_text else {}
    fresh = _blocks(new)
    head = new.split("\n### ")[0].split(END)[0].rstrip("\n")
    kept = [fresh.get(part) or old.get(part) for part in HEADINGS]
    return "\n\n".join([head, *(b for b in kept if b), END])


def _render(results: dict) -> str:
    lines = [START, "## verify (benchmarks/bench_verify.py)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, 24 GiB, shared with other jobs (heavy runs serialized by a lock). "
             "Every row is a fresh process; wall and peak RSS from GNU time (%e, %M, inside the lock: waiting for it is not counted), the reference and "
             "candidate split from `qconv verify --json` (their peaks are the process's while that step ran). "
             "A verify row's peak RSS is the largest of GNU time's and those per-step peaks: verify resets the "
             "kernel's high-water mark before each step, which also resets what GNU time reads at exit. "
             "Probe sets: the first query groups of the built-in probes, without labels (NDCG gains from the "
             "reference's own P(yes)), batch 8; both padding sides in full before the padding probe (each ONNX row says what it scored).", ""]
    p = results.get("reference")
    if p:
        lines += [f"### Reference pass alone ({p['date']}; {p['pairs']} built-in probe pairs, max length {p['max_length']})", "",
                  "`streamed` = qconv's own per-layer loop over transformers' Qwen3DecoderLayer (accelerate's offload was "
                  "not measured: its hooks move whole modules, and the 151669-row embedding and head would still be loaded whole).", "",
                  "| checkpoint | engine | cache | wall | in-process | peak RSS |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['checkpoint']} | {r['engine']} | {r['cache']} | {r['wall']:.1f} s | {r['seconds']:.1f} s | {mib(r['rss'])} |"
                  for r in p["rows"]]
        lines += [""] + ([p["note"], ""] if p.get("note") else [])
        by = {(r["checkpoint"], r["engine"], r["cache"]): r for r in p["rows"]}
        t, s = (by.get(("qwen3-reranker-0.6b", e, "off")) for e in ("transformers", "streamed"))
        wide = by.get(("8b-wide", "streamed", "off"))
        verdicts = []
        if t and s:
            verdicts.append(f"streamed wall vs transformers' on 0.6B {_verdict(s['wall'] / t['wall'], 1.2)}")
        if wide:
            verdicts.append(f"streamed reference peak RSS on 8b-wide {mib(wide['rss'])} (target ≤ 2 GB: "
                            f"{'met' if wide['rss'] <= 2e9 else 'missed'})")
        if verdicts:
            lines += ["Targets: " + "; ".join(verdicts) + ".", ""]
    p = results.get("onnx")
    if p and "rounds" in p:
        rounds = p["rounds"]
        r0 = rounds[0][0]
        cold = rounds[0][1]
        lines += [f"### `qconv verify` of the five ONNX variants of the 0.6B shape ({p['date']})", "",
                  f"benchmarks/.work/onnx-0.6b-builder (fp32, fp16, int8, q4, q4f16) against benchmarks/.work/qwen3-reranker-0.6b; "
                  f"{r0['pairs']} pairs ({p['queries']} queries), max length {r0['max_length']}, batch 8. {len(rounds)} round(s), "
                  "each running the four rows in this order; wall = median over rounds, × before = median of each round's ratio "
                  "to that round's pre-#9 run. The pre-#9 row is the code of commit 346e154^ (before the streamed reference "
                  "and the cache), run from a git worktree on the same venv and files: it scores every pair on both padding "
                  f"sides ({_padding(r0)}); today's default scores {_padding(cold)} (`--padding-check probe`).", "",
                  "| verify | wall | × before | peak RSS | reference | candidates (scoring time) |", "|---|---|---|---|---|---|"]
        for i, r in enumerate(rounds[-1]):
            walls = [rd[i]["wall"] for rd in rounds]
            ratio = _median([rd[i]["wall"] / rd[0]["wall"] for rd in rounds])
            lines.append(f"| {r['row']} | {_median(walls):.0f} s" + (f" ({', '.join(f'{w:.0f}' for w in walls)})" if len(walls) > 1 else "")
                         + f" | {_ratio(ratio)} | {mib(_peak(r))} | {_ref(r)} | {_cands(r)} |")
        ratio = [_median([rd[i]["wall"] / rd[0]["wall"] for rd in rounds]) for i in range(4)]
        cand = sum(c["seconds"] for c in r0["candidates"])
        tok = p.get("tokens")
        lines += ["", f"Targets: cold cache {_verdict(ratio[1], 0.5)}; warm cache: a re-verify {_verdict(ratio[3], 0.3)}, "
                  f"new variants with the reference cached {_verdict(ratio[2], 0.3)}. Before #9 the reference took "
                  f"{r0['reference']['seconds']:.0f} s of {r0['wall']:.0f} s and the five candidates' onnxruntime scoring "
                  f"{cand:.0f} s: the streamed engine and the cache remove only the reference's share, and the plan of "
                  "batches the tokens each model scores" + (f" ({tok['before']:,} padded tokens before #9, {tok['now']:,} now, for "
                  f"{tok['real']:,} real tokens on the first side)" if tok else "") + "; the rest is the same onnxruntime "
                  "kernels on 2 cores. A warm cache "
                  "holds each candidate's scores too (keyed by its files' names, sizes and mtimes, the token ids and "
                  "onnxruntime's version), so a re-verify of unchanged variants creates no session; the gates are re-applied "
                  "to the stored numbers.", ""]
        floors = p.get("floors")
        if floors and len(floors) == len(rounds):
            both = [_total(f, "session") + _total(f, "runs") for f in floors]
            both_ratio = _median([b / rd[0]["wall"] for b, rd in zip(both, rounds)])
            run_ratio = _median([_total(f, "runs") / rd[0]["wall"] for f, rd in zip(floors, rounds)])
            above = _median([rd[2]["wall"] - b for b, rd in zip(both, rounds)])
            per = ", ".join(f"{name.split('/')[-1]} {_median([f['variants'][name]['session'] for f in floors]):.1f} + "
                            f"{_median([f['variants'][name]['runs'] for f in floors]):.1f} s" for name in floors[0]["variants"])
            lines += [f"Floor of the warm-reference row, measured in each round after the verify rows: onnxruntime alone in a "
                      f"fresh process, creating the five sessions as verify does and scoring the batches verify plans, took "
                      f"{_median(both):.0f} s = {both_ratio:.2f}× before (session + run() calls: {per}); the run() calls alone "
                      f"{run_ratio:.2f}×. The warm-reference verify spends {above:.0f} s more than that (interpreter, imports, "
                      "tokenizer, cache keys, gates): a ratio under "
                      f"{both_ratio:.2f}× needs faster onnxruntime kernels on these graphs or fewer tokens, not less verify.", ""]
        if p.get("note"):
            lines += [p["note"], ""]
    for name, title in (("8b-wide", "8b-wide (hidden 4096, intermediate 12288, 32/8 heads, 4 layers, untied, 4 GB bf16)"),
                        ("8b", "full 8B shape (36 layers, untied, 16.4 GB bf16)")):
        p = results.get(name)
        if not p:
            continue
        v = next((r for r in p["rows"] if r.get("reference")), None)
        lines += [f"### {title} ({p['date']})", ""]
        if v:
            lines += [f"{v['pairs']} pairs, max length {v['max_length']}, `--engine streamed` (what `auto` picks where "
                      "the fp32 model does not fit); the seq-cls verify fills a fresh cache, the q4f16 verify reads it.", ""]
        lines += ["| step | wall | peak RSS | reference | candidate |", "|---|---|---|---|---|"]
        for r in p["rows"]:
            if r.get("reference"):
                c = r["candidates"][0] if r["candidates"] else None
                cand = "n/a" if c is None else (f"{c['name']} ({c['engine']}): {c['seconds']:.0f} s, {mib(c['peak'])}, "
                                                 f"{_outcome(c)}")
                lines.append(f"| {r['row']} | {r['wall']:.0f} s | {mib(_peak(r))} | {_ref(r)} | {cand} |")
            else:
                lines.append(f"| {r['row']} | {r['wall']:.0f} s | {mib(r['rss'])} | | |")
        target = 2e9 if name == "8b-wide" else 3e9
        if v and v["reference"]["peak"]:
            lines += ["", f"Target: reference pass peak RSS ≤ {target / 1e9:.0f} GB: {mib(v['reference']['peak'])} "
                      f"({'met' if v['reference']['peak'] <= target else 'missed'})."]
        if any(c.get("failures") for r in p["rows"] for c in r.get("candidates", [])):
            lines += ["", "A FAILED gate here is verify's verdict, not a fault of the run (exit 1, as documented): "
                      "the checkpoint's weights are random, so its scores spread little and 4-bit noise "
                      "(|Δlogit| ≈ 2 on 8b-wide's widths) reorders the few documents per query; the figures measured "
                      "are the time and memory of checking it."]
        if p.get("skipped"):
            lines += ["", f"Not measured: {p['skipped']}."]
        if p.get("note"):
            lines += ["", p["note"]]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="reference,onnx,8b-wide", help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--queries", type=int, default=3, help="onnx / 8b-wide: built-in probe query groups (4 pairs each)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="onnx: interleaved rounds of the four verify rows")
    ap.add_argument("--queries-8b", type=int, default=1, help="8b: query groups (the 36-layer pass on 2 cores is slow)")
    ap.add_argument("--max-length-8b", type=int, default=256)
    ap.add_argument("--wait-until", default="14:15", help="8b: wait for the q4f16 export until this UTC time")
    ap.add_argument("--export-8b", action="store_true", help="8b: export the q4f16 here (timed) instead of waiting for bench_export's")
    ap.add_argument("--ref-pairs", type=int, default=8)
    ap.add_argument("--ref-max-length", type=int, default=256)
    ap.add_argument("--checkpoints", default="qwen3-reranker-0.6b:transformers,streamed;8b-wide:streamed")
    ap.add_argument("--render-only", action="store_true", help="rewrite the section from the stored results")
    ap.add_argument("--lock", default="/tmp/qconv-heavy.lock", help="heavy-job lock each measured process takes ('' = none)")
    a = ap.parse_args()
    LOCK[:] = ["flock", a.lock] if a.lock else []
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for part in ([] if a.render_only else a.parts.split(",")):
        log(f"part {part}")
        results[part] = {**PARTS[part](a), "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
                         "load": os.getloadavg()[0]}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
        write_section(render(results), START, END)
    text = render(results)
    print(text)
    write_section(text, START, END)


if __name__ == "__main__":
    main()
