"""Export wall time and peak RSS: the graph builder (qwen_convert/onnx) vs the optimum path (issue #8).

Every row is one fresh `qconv export-onnx ... --no-verify --json` process; peak RSS is the child's
own ru_maxrss (wait4), wall time is measured here. Two targets:

  small (default, ~15 min): the real-shaped random 0.6B, all five variants, builder / optimum /
         builder again (side by side in one run; the builder figure is the median of its two runs),
         then the 8b-wide checkpoint (8B widths, 4 layers, untied), all five variants, builder.
  8b     (`make bench-8b`, ~30 min, 16.4 GB checkpoint + ~14 GB of outputs): the full 8B-shaped
         random checkpoint, q4f16 and int8 (--no-fp32), one process each. The q4f16 export is kept
         in benchmarks/.work/8b-onnx (bench_verify verifies it; 8b-onnx.json marks it complete),
         the int8 one is deleted once measured.

Results accumulate in benchmarks/.work/bench_export.json, so each target re-renders the whole
section of BENCHMARKS.md.

    flock /tmp/qconv-heavy.lock .venv/bin/python benchmarks/bench_export.py [--target small|8b]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_onnx import WORK, measure, mib  # noqa: E402
from report import write_section  # noqa: E402

START, END = "<!-- bench_export:start -->", "<!-- bench_export:end -->"
RESULTS = WORK / "bench_export.json"
ALL = ["--quantize", "all"]
PEAK_TARGET = 1.5 * 2**30  # five variants on the 0.6B
FLAT_TARGET = 1.25  # 8b-wide peak / 0.6B peak
TIME_TARGET = 0.5  # builder / optimum wall time, five variants


def checkpoint(shape: str, name: str) -> Path:
    path = WORK / name
    if not (path / "config.json").exists():
        from make_checkpoint import make_checkpoint

        print(f"generating {path} ...", file=sys.stderr)
        make_checkpoint(shape, path)
    return path


def export(src: Path, out: Path, args: list[str], keep: bool = False) -> dict:
    qconv = str(Path(sys.executable).with_name("qconv"))
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {src.name} {' '.join(args)} ...", file=sys.stderr, flush=True)
    run = measure([qconv, "export-onnx", str(src), str(out), *args, "--no-verify", "--json", "--force"])
    result = json.loads(run.stdout)
    row = {"source": src.name, "args": " ".join(args), "seconds": run.seconds, "peak_rss": run.peak_rss,
           "bytes": sum(v["bytes"] for v in result["variants"]), "variants": [v["mode"] for v in result["variants"]],
           "exporter": result["settings"]["exporter"], "date": time.strftime("%Y-%m-%d")}
    print(f"    {row['seconds']:.1f} s, {mib(row['peak_rss'])}", file=sys.stderr, flush=True)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def bench_small() -> dict:
    small, wide = checkpoint("0.6b", "qwen3-reranker-0.6b"), checkpoint("8b-wide", "8b-wide")
    out = WORK / "export-bench"
    builder = [export(small, out, ALL)]
    optimum = export(small, out, [*ALL, "--exporter", "optimum"])
    builder.append(export(small, out, ALL))
    return {"small_builder": builder, "small_optimum": optimum, "wide_builder": export(wide, out, ALL)}


def bench_8b() -> dict:
    src = checkpoint("8b", "8b")
    kept = WORK / "8b-onnx"
    (WORK / "8b-onnx.json").unlink(missing_ok=True)
    q4f16 = export(src, kept, ["--quantize", "q4f16", "--no-fp32"], keep=True)
    (WORK / "8b-onnx.json").write_text(json.dumps(q4f16, indent=2) + "\n")
    int8 = export(src, WORK / "8b-onnx-int8", ["--quantize", "int8", "--no-fp32"])
    return {"full_8b": [q4f16, int8]}


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(r: dict) -> str:
    lines = [START, "## Export: graph builder vs optimum (`make bench-export`, `make bench-8b`)", "",
             f"`benchmarks/bench_export.py`, {platform.machine()} {platform.processor() or ''}, 2 cores; one fresh "
             "`qconv export-onnx --no-verify` process a row, peak RSS = the process's own maximum resident set.", "",
             "| checkpoint | exporter | variants | wall | peak RSS | written | measured |", "|---|---|---|---:|---:|---:|---|"]
    rows = [*r.get("small_builder", [])[:1], r.get("small_optimum"), *r.get("small_builder", [])[1:],
            r.get("wide_builder"), *r.get("full_8b", [])]
    for row in filter(None, rows):
        lines.append(f"| {row['source']} | {row['exporter']} | {', '.join(row['variants'])} | {row['seconds']:.0f} s | "
                     f"{mib(row['peak_rss'])} | {row['bytes'] / 1e9:.2f} GB | {row['date']} |")
    lines += ["", "| target | measured | |", "|---|---|---|"]
    if "small_builder" in r:
        b = r["small_builder"]
        peak = max(x["peak_rss"] for x in b)
        wall = statistics.median(x["seconds"] for x in b)
        lines.append(f"| five variants on the 0.6B, peak RSS ≤ 1.5 GB | {mib(peak)} | {verdict(peak <= PEAK_TARGET)} |")
        if r.get("small_optimum"):
            o = r["small_optimum"]
            ratio = wall / o["seconds"]
            lines.append(f"| five-variant wall time ≤ 0.5× optimum's | {wall:.0f} s vs {o['seconds']:.0f} s = {ratio:.2f}× "
                         f"(optimum peak {mib(o['peak_rss'])}) | {verdict(ratio <= TIME_TARGET)} |")
        if r.get("wide_builder"):
            w = r["wide_builder"]
            flat = w["peak_rss"] / peak
            lines.append(f"| 8b-wide five variants within +25% of the 0.6B peak | {mib(w['peak_rss'])} = {flat:.2f}× | "
                         f"{verdict(flat <= FLAT_TARGET)} |")
    if r.get("full_8b"):
        done = ", ".join(f"{x['variants'][-1]} {x['seconds'] / 60:.1f} min / {mib(x['peak_rss'])}" for x in r["full_8b"])
        lines.append(f"| full 8B-shaped q4f16 + int8 export completes on this 24 GiB machine | {done} | met |")
    lines += ["", "The builder reads each weight in 16 MB row chunks and writes MatMul's B = Wᵀ transposed in place, so its "
              "peak does not grow with the model; the optimum path traces an fp32 torch model and each onnxruntime "
              "quantizer then loads the whole fp32 graph.", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["small", "8b"], default="small")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--from-json", action="store_true", help="re-render the stored results, measure nothing")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.from_json:
        results.update(bench_small() if args.target == "small" else bench_8b())
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    text = render(results)
    print(text)
    if not args.no_write:
        write_section(text, START, END)


if __name__ == "__main__":
    main()
