"""benchmarks/bench_peers.py's report, from a made-up result (no engine runs): skipped engines are named
with their reason, a failed engine shows its error, ratios and shares of the peak are computed from the
medians, and the ops count is the documented formula."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def run(pps: float, **extra) -> dict:
    return {"realistic": {"pairs": 60, "seconds": 60 / pps, "pairs_per_s": pps}, "peak_rss_mib": 1000.0,
            "process_s": 30.0, **extra}


def result(runs: dict, skipped: dict) -> dict:
    return {"machine": {"cpu": "Test CPU", "cpus": "2", "flags": ["amx_int8"], "load": (1.0, 1.0, 1.0),
                        "date": "2026-12-06 20:00 UTC"},
            "load_after": (2.0, 2.0, 2.0), "rounds": 3, "runs": runs, "skipped": skipped,
            "peaks": {"int8 MatMulInteger": 10e12, "bf16 torch.matmul": 5e12}, "queries": 3,
            "lengths": {"realistic": [100, 200], "A": [256] * 5 + [200] * 3, "B": [64] * 32},
            "ops": {"matmul_params": 1_000_000, "attn": 100}, "prefix_tokens": 40, "workloads": ["realistic"]}


def test_pair_ops_is_two_params_per_token_plus_causal_attention(bench):
    ops = {"matmul_params": 1_000_000, "attn": 100}
    assert bench.pair_ops([10, 20], ops) == 2e6 * 30 + 100 * (100 + 400)


def test_report_names_skips_failures_and_the_target_ratio(bench):
    runs = {"qconv-int8-prefix": [run(6.0, shared_pairs=60), run(3.0, shared_pairs=60), run(9.0, shared_pairs=60)],
            "torch-bf16": [run(2.0), run(4.0), run(3.0)],
            "vllm-bf16": [{"error": "RuntimeError: no AMX"}]}
    text = bench.section(result(runs, {"llamacpp-q8_0": "no venv /x/.venv-llamacpp (make llamacpp)"}))
    assert text.startswith("<!-- bench_peers[amx]:start -->\n## CPU peers:") and text.endswith("<!-- bench_peers[amx]:end -->")
    assert text.splitlines()[1].endswith("— AMX int8/bf16 tiles")
    assert "- skipped llamacpp-q8_0: no venv /x/.venv-llamacpp (make llamacpp)" in text
    assert "| vllm-bf16 | failed: RuntimeError: no AMX |" in text
    assert "| torch-bf16 | 3.00 | — | — |" in text
    assert "- not in this run (`--engines`): qconv-int8-full," in text
    # medians 6.0 vs 3.0: 2.00x of the fastest peer that ran
    assert "6.00 vs 3.00 (torch-bf16) = 2.00x | met |" in text
    # share of the int8 peak: 6 pairs/s x mean ops per pair (150 tokens) / 10 TOPS
    per_pair = bench.pair_ops([100, 200], {"matmul_params": 1_000_000, "attn": 100}) / 2
    assert f"| {100 * 6.0 * per_pair / 10e12:.1f}% |" in text


def test_each_cpu_kind_keeps_its_own_section(bench, tmp_path, monkeypatch):
    """A run on another kind of CPU adds its section after the first instead of replacing it; a second
    run on the same kind replaces its own."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as section() does, undone after the test
    import report

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- other:start -->\nO\n<!-- other:end -->\n")
    amx = result({"torch-bf16": [run(2.0)]}, {})
    vnni = result({"torch-bf16": [run(1.0)]}, {})
    vnni["machine"]["flags"] = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    for r in (amx, vnni):
        report.write_section(bench.section(r), *report.markers("bench_peers", r["machine"]["flags"]), md)
    vnni["runs"]["torch-bf16"] = [run(1.5)]
    report.write_section(bench.section(vnni), *report.markers("bench_peers", vnni["machine"]["flags"]), md)
    text = md.read_text()
    kinds = [line for line in text.splitlines() if line.startswith("<!-- bench_peers")]
    assert kinds == ["<!-- bench_peers[amx]:start -->", "<!-- bench_peers[amx]:end -->",
                     "<!-- bench_peers[avx512-vnni]:start -->", "<!-- bench_peers[avx512-vnni]:end -->"]
    assert text.startswith("# Benchmarks\n\n<!-- other:start -->\nO\n<!-- other:end -->\n\n<!-- bench_peers[amx]")
    assert "— AVX-512 VNNI, no AMX" in text and "| torch-bf16 | 2.00 |" in text
    assert "| torch-bf16 | 1.50 |" in text and "| torch-bf16 | 1.00 |" not in text


def test_report_says_when_the_target_was_not_measured(bench):
    text = bench.section(result({"torch-bf16": [run(2.0)]}, {}))
    assert "not measured in this run" in text


def test_tile_peak_is_measured_where_the_cpu_has_the_instructions(bench, monkeypatch):
    """benchmarks/peak.c compiles and reports a plausible registers-only rate for each instruction set the
    CPU has (the ceiling bench_peers divides by); nothing for flags the CPU lacks."""
    import shutil

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from report import machine

    flags = set(machine()["flags"])
    wanted = {"amx_int8": "int8 AMX tiles (TDPBUSD)", "amx_bf16": "bf16 AMX tiles (TDPBF16PS)",
              "avx512_vnni": "int8 AVX-512 VNNI (VPDPBUSD)", "avx512_bf16": "bf16 AVX-512 BF16 (VDPBF16PS)"}
    if not (shutil.which("cc") or shutil.which("gcc")) or not flags & set(wanted):
        pytest.skip("no C compiler, or a CPU without AMX and AVX-512 VNNI")
    peaks = bench.tile_peaks(flags, seconds=0.05)
    assert set(peaks) == {name for flag, name in wanted.items() if flag in flags}, peaks
    # per thread and GHz: AMX int8 reaches ~1,000 ops/cycle, VNNI 64-256; anything under 10 GOP/s is broken
    assert all(10e9 < v < 1e15 for v in peaks.values()), peaks
    assert bench.tile_peaks(set()) == {}


def test_avx512_peaks_run_from_registers():
    """The AVX-512 loops of peak.c compile to twelve register-to-register instructions each: with its
    accumulators in memory (an array GCC kept on the stack) every VPDPBUSD waited on a store and reload, and
    the 'ceiling' came out at half what onnxruntime's own GEMM reached on a Zen 5."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    asm = subprocess.run([cc, "-O2", "-pthread", "-S", "-o", "-", str(SCRIPT.parent / "peak.c")],
                         capture_output=True, text=True, check=True).stdout
    for op in ("vpdpbusd", "vdpbf16ps"):
        lines = [line for line in asm.splitlines() if line.strip().startswith(op)]
        assert len(lines) == 12, (op, lines)
        assert not any("(" in line for line in lines), lines  # no memory operand


def test_every_shape_batch_is_new_to_a_prefix_cache(bench, monkeypatch):
    """Shapes A and B send each batch with first tokens no earlier batch had (vLLM's prefix cache served
    the repeated rows: 44.9 pairs/s of cache hits where its compute gives 7.6), the rest of each row as made."""
    monkeypatch.setenv("SHAPE_SECONDS", "0")
    rows = [[7, 8, 9, 10]] * 3 + [[11, 12, 13, 14]] * 5
    seen = []
    out = bench.shapes({"A": rows}, ["A"], lambda batch: seen.append(batch))
    assert len(seen) == 3 and out["A"]["pairs"] == 2 * len(rows)  # the warm-up batch, then two timed
    firsts = [r[0] for batch in seen for r in batch]
    assert len(set(firsts)) == len(firsts)
    assert all(len(batch) == len(rows) and [r[1:] for r in batch] == [r[1:] for r in rows] for batch in seen)
    assert all(100 <= t < 140_100 for t in firsts)


def test_report_holds_q4_and_serve_to_their_targets(bench):
    runs = {"qconv-int8-prefix": [run(5.0)], "qconv-int8-full": [run(4.0)], "qconv-q4-prefix": [run(2.0)],
            "qconv-q4-full": [run(3.0)], "qconv-serve-int8": [run(4.0)], "torch-bf16": [run(1.0)]}
    text = bench.section(result(runs, {}))
    assert "| q4 ≥ 0.5x int8 on CPU, realistic (qconv-q4-full vs qconv-int8-full) | 3.00 vs 4.00 = 0.75x | met |" in text
    assert "| q4 ≥ 0.5x int8 on CPU, realistic (qconv-q4-prefix vs qconv-int8-prefix) | 2.00 vs 5.00 = 0.40x | **missed** |" in text
    assert "| `qconv serve` ≥ 0.9x offline (qconv-serve-int8 vs qconv-int8-prefix), realistic | 4.00 vs 5.00 = 0.80x | **missed** |" in text


def test_report_says_when_the_registers_only_peak_was_disturbed(bench):
    """A VNNI ceiling measured below onnxruntime's own GEMM (the cores were shared while peak.c ran)
    is named in the notes, and the shares use the higher figure."""
    r = result({"qconv-int8-prefix": [run(6.0, shared_pairs=60)]}, {})
    r["peaks"] = {"int8 AVX-512 VNNI (VPDPBUSD)": 0.47e12, "int8 onnxruntime MatMulInteger 2048^3": 0.77e12,
                  "bf16 AVX-512 BF16 (VDPBF16PS)": 0.46e12, "bf16 torch.matmul 2048^3": 0.40e12}
    text = bench.section(r)
    assert ("- registers-only peak disturbed (the cores were shared while it ran): int8 AVX-512 VNNI (VPDPBUSD) 0.47 TOPS "
            "measured below int8 onnxruntime MatMulInteger 2048^3 0.77; the shares use the higher figure") in text
    per_pair = bench.pair_ops([100, 200], {"matmul_params": 1_000_000, "attn": 100}) / 2
    assert f"| {100 * 6.0 * per_pair / 0.77e12:.1f}% |" in text
    r["peaks"]["int8 AVX-512 VNNI (VPDPBUSD)"] = 0.93e12
    assert "disturbed" not in bench.section(r)
