"""The query-expansion causal LM (issue #21): graph builder vs the optimum path, side by side.

1. export of the real-shaped random Qwen3-0.6B chat model (benchmarks/make_checkpoint.py "0.6b-chat",
   plus a chat template): fp32 + int8 + q4f16 by the builder (main venv, calibrated, the default) and
   by the optimum path (.venv-optimum: trace, then onnxruntime's quantizers), each one fresh process:
   wall time and the process's own peak RSS (wait4);
2. greedy tokens of fp32 and fp16 against torch fp32, on qconv:tiny-chat-lm and on the 0.6B shape
   (the builder's graphs run by decode.py, onnxruntime alone);
3. decode tokens/s of int8 and q4f16, the builder's graphs and optimum's traced ones, in the same
   onnxruntime loop on the same prompts (and their top-1 agreement with torch).

Prints a table and rewrites its section of BENCHMARKS.md. Heavy (~6 GB once, for the optimum trace):

    flock /tmp/qconv-heavy.lock .venv/bin/python benchmarks/bench_causal_lm.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from bench_onnx import WORK, measure, mib  # noqa: E402
from report import write_section  # noqa: E402

START, END = "<!-- bench_causal_lm:start -->", "<!-- bench_causal_lm:end -->"
OPTIMUM_PYTHON = Path(os.environ.get("OPTIMUM_PYTHON", ROOT / ".venv-optimum" / "bin" / "python"))
MODES = ("fp32", "int8", "q4f16")
PROMPTS = ["Expand the search query into three related search queries: cheap flights to tokyo",
           "Rewrite the search query with synonyms: how to fix a leaking tap"]
NEW_TOKENS = 16
PEAK_TARGET, TIME_TARGET = 1.0 * 2**30, 0.5


def checkpoint() -> Path:
    path = WORK / "qwen3-0.6b-chat"
    if not (path / "chat_template.jinja").exists():
        from make_checkpoint import make_checkpoint

        from qwen_convert.onnx.causal_lm import TINY_CHAT_TEMPLATE

        print(f"generating {path} ...", file=sys.stderr)
        make_checkpoint("0.6b-chat", path)
        (path / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE, encoding="utf-8")
    return path


# --- children: one export, or the parity/speed pass --------------------------------------------------

def child_export(src: str, out: str, exporter: str, modes: str, method: str) -> None:
    from qwen_convert.onnx.causal_lm import CausalExportOptions, export_causal_lm

    options = CausalExportOptions(modes=tuple(modes.split(",")), exporter=exporter, force=True, quant_method=method)
    result = export_causal_lm(src, out, options)
    print(json.dumps(result.to_dict()))


def child_parity(src: str, dirs: str) -> None:
    """dirs: JSON {label: [export dir, [modes]]}; torch runs once, every variant is checked against it."""
    from transformers import AutoTokenizer

    from qwen_convert.formats import ONNX_DIR, QuantMode
    from qwen_convert.onnx.causal_verify import CausalGates, _encode, _reference_runs, check_variant

    tok = AutoTokenizer.from_pretrained(src)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    refs, eos = _reference_runs(Path(src), [_encode(tok, p) for p in PROMPTS], NEW_TOKENS, pad, _null())
    rows = {}
    for label, (out, modes) in json.loads(dirs).items():
        for mode in modes:
            c = check_variant(Path(out) / ONNX_DIR / QuantMode(mode).file_name, mode, refs, NEW_TOKENS, eos, CausalGates())
            rows[f"{label}/{mode}"] = {"greedy_identical": c.greedy_identical, "prompts": c.prompts,
                                       "max_abs_logit": c.max_abs_logit, "token_agreement": c.token_agreement,
                                       "decode_tokens_per_s": c.decode_tokens_per_s}
    print(json.dumps(rows))


def _null():
    from qwen_convert.progress import NULL

    return NULL


# --- the benchmark ------------------------------------------------------------------------------------

def export(python: Path, src: Path, out: Path, exporter: str, modes: tuple[str, ...], method: str = "naive") -> dict:
    print(f"  export {src.name} {exporter} {method} {','.join(modes)} ...", file=sys.stderr, flush=True)
    run = measure([str(python), __file__, "--child", "export", str(src), str(out), exporter, ",".join(modes), method])
    result = json.loads(run.stdout.strip().splitlines()[-1])
    row = {"exporter": exporter, "method": method, "modes": list(modes), "seconds": run.seconds, "peak_rss": run.peak_rss,
           "bytes": sum(v["bytes"] for v in result["variants"])}
    print(f"    {row['seconds']:.1f} s, {mib(row['peak_rss'])}", file=sys.stderr, flush=True)
    return row


def parity(src: Path, dirs: dict) -> dict:
    print(f"  parity/speed {src.name} ...", file=sys.stderr, flush=True)
    run = measure([sys.executable, __file__, "--child", "parity", str(src), json.dumps({k: [str(d), m] for k, (d, m) in dirs.items()})])
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench(calibrated: bool) -> dict:
    from qwen_convert.hub.resolve import builtin_path

    src, tiny = checkpoint(), builtin_path("tiny-chat-lm")
    built, traced, built16 = WORK / "causal-builder", WORK / "causal-optimum", WORK / "causal-builder-fp16"
    tiny_out = WORK / "causal-tiny"
    results = {"date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()}
    results["builder"] = export(Path(sys.executable), src, built, "builder", MODES)
    results["optimum"] = export(OPTIMUM_PYTHON, src, traced, "optimum", MODES)
    if calibrated:  # the builder's default method: a calibration pass in torch first (long on a loaded 2-core box)
        results["builder_calibrated"] = export(Path(sys.executable), src, WORK / "causal-calibrated", "builder", MODES, "calibrated")
        shutil.rmtree(WORK / "causal-calibrated", ignore_errors=True)
    results["builder_fp16"] = export(Path(sys.executable), src, built16, "builder", ("fp16",))
    export(Path(sys.executable), tiny, tiny_out, "builder", ("fp32", "fp16"))
    results["tiny"] = parity(tiny, {"builder": (tiny_out, ["fp32", "fp16"])})
    results["shape"] = parity(src, {"builder": (built, list(MODES)), "builder-fp16": (built16, ["fp16"]),
                                    "optimum": (traced, ["int8", "q4f16"])})
    results["load_after"] = os.getloadavg()
    for d in (built, traced, built16, tiny_out):
        shutil.rmtree(d, ignore_errors=True)
    return results


def render(r: dict) -> str:
    b, o = r["builder"], r["optimum"]
    ratio = b["seconds"] / o["seconds"]
    lines = [START, "## Query-expansion causal LM: graph builder vs optimum (`make bench-causal-lm`)", "",
             f"`benchmarks/bench_causal_lm.py`, {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
             f"(load average {r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after), {r['date']}. Random Qwen3-0.6B-shaped "
             "chat model (vocab 151936, tied, bf16; make_checkpoint.py `0.6b-chat`); one fresh process per export, peak RSS = "
             "its own maximum resident set. Both exporters with round-to-nearest int8/q4f16 (the optimum path's only method; "
             "`--calibrated` adds a row for the builder's default SmoothQuant/AWQ, calibration pass in torch included); the "
             "graphs below are these.", "",
             "| exporter | variants | wall | peak RSS | written |", "|---|---|---:|---:|---:|"]
    for row in (b, o, *([r["builder_calibrated"]] if "builder_calibrated" in r else []), r["builder_fp16"]):
        lines.append(f"| {row['exporter']} ({row['method']}) | {', '.join(row['modes'])} | {row['seconds']:.0f} s | {mib(row['peak_rss'])} | "
                     f"{row['bytes'] / 1e9:.2f} GB |")
    lines += ["", f"Greedy generation, {len(PROMPTS)} chat prompts x {NEW_TOKENS} new tokens, onnxruntime alone (decode.py) vs torch fp32; "
              "decode tokens/s = steps after the first token, one prompt at a time, this CPU under the load above.", "",
              "| checkpoint | graph | greedy identical | max abs Δlogit | top-1 agreement | decode tokens/s |",
              "|---|---|---:|---:|---:|---:|"]
    for label, rows in (("tiny-chat-lm", r["tiny"]), ("0.6B shape", r["shape"])):
        for name, c in rows.items():
            lines.append(f"| {label} | {name} | {c['greedy_identical']}/{c['prompts']} | {c['max_abs_logit']:.2e} | "
                         f"{c['token_agreement']:.3f} | {c['decode_tokens_per_s']:.1f} |")
    s = r["shape"]
    fp = [r["tiny"]["builder/fp32"], r["tiny"]["builder/fp16"], s["builder/fp32"], s["builder-fp16/fp16"]]
    identical = all(c["greedy_identical"] == c["prompts"] for c in fp)
    speed = ", ".join(f"{m} {s[f'builder/{m}']['decode_tokens_per_s']:.1f} vs {s[f'optimum/{m}']['decode_tokens_per_s']:.1f}"
                      for m in ("q4f16", "int8"))
    lines += ["", "| target | measured | |", "|---|---|---|",
              f"| 0.6B-shape export peak RSS ≤ 1.0 GB | {mib(b['peak_rss'])} | {'met' if b['peak_rss'] <= PEAK_TARGET else 'missed'} |",
              f"| wall ≤ 0.5× the optimum path's | {b['seconds']:.0f} s vs {o['seconds']:.0f} s = {ratio:.2f}× (optimum peak "
              f"{mib(o['peak_rss'])}) | {'met' if ratio <= TIME_TARGET else 'missed'} |",
              f"| fp32 and fp16 greedy tokens identical to torch fp32, tiny and 0.6B shape | "
              f"{', '.join(str(c['greedy_identical']) + '/' + str(c['prompts']) for c in fp)} | {'met' if identical else 'missed'} |",
              f"| decode tokens/s, builder vs optimum's traced graph | {speed} | measured |", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--render-only", action="store_true", help="re-render BENCHMARKS.md from the last results")
    parser.add_argument("--calibrated", action="store_true", help="also time the builder's calibrated export")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        return child_export(*rest) if kind == "export" else child_parity(*rest)
    saved = WORK / "bench_causal_lm.json"
    if args.render_only:
        results = json.loads(saved.read_text())
    else:
        WORK.mkdir(exist_ok=True)
        results = bench(args.calibrated)
        saved.write_text(json.dumps(results, indent=2) + "\n")
    text = render(results)
    print(text)
    write_section(text, START, END)


if __name__ == "__main__":
    main()
