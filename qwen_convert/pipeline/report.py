"""What a run built, from its step records: manifest.json's artifacts and metrics, and REPORT.md."""

from __future__ import annotations

import json
from pathlib import Path

from .manifest import ONNX_OUT, SEQCLS_DIR, VERIFY_FILE, Artifact, FileEntry, Manifest, Metric, RunState
from .recipe import Recipe


def _entries(record: dict, prefix: str) -> list[FileEntry]:
    return [FileEntry(p, e["bytes"], e["sha256"]) for p, e in sorted(record["outputs"].items())
            if p == prefix or p.startswith(prefix + "/")]


def _artifacts(recipe: Recipe, steps: dict[str, dict]) -> list[Artifact]:
    from qwen_convert.formats import QuantMode
    from qwen_convert.onnx.auto import resolve_auto
    from qwen_convert.scoring.kernels import ACTIVATIONS_SUFFIX

    arts: list[Artifact] = []
    if "seqcls" in steps:
        arts.append(Artifact("seqcls", "seqcls", {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[recipe.artifacts.score_dtype],
                             SEQCLS_DIR, tuple(_entries(steps["seqcls"], SEQCLS_DIR))))
    onnx_step = steps.get("onnx") or steps.get("causal-onnx")
    if onnx_step:
        kind = "onnx" if recipe.kind == "reranker" else "causal-lm-onnx"
        claimed: set[str] = set()
        for mode in resolve_auto(recipe.artifacts.onnx, onnx_step):  # auto: the mode the onnx step chose
            main = f"{ONNX_OUT}/{ONNX_OUT}/{QuantMode(mode).file_name}"
            # The graph, its external data, and q4's activation record (what qconv's CPU kernels smooth with).
            own = (main, main + "_data", main.removesuffix(".onnx") + ACTIVATIONS_SUFFIX)
            files = [e for e in _entries(onnx_step, ONNX_OUT) if e.path in own]
            claimed.update(e.path for e in files)
            arts.append(Artifact(f"onnx/{mode}", kind, mode, main, tuple(files)))
        support = tuple(e for e in _entries(onnx_step, ONNX_OUT) if e.path not in claimed)
        arts.append(Artifact("onnx/support", kind + "-support", None, ONNX_OUT, support))
    verify_step = steps.get("verify") or steps.get("causal-verify")
    if verify_step:
        arts.append(Artifact("verify", "report", None, VERIFY_FILE, tuple(_entries(verify_step, VERIFY_FILE))))
    return arts


def _reranker_metrics(report: dict) -> tuple[list[Metric], list[str]]:
    metrics, failures = [], []
    ref = report["reference"]
    if ref.get("max_padding_delta") is not None:
        metrics.append(Metric("reference", "padding_delta", ref["max_padding_delta"], f"<= {ref['padding_tolerance']:g}", ref["padding_invariant"]))
        if not ref["padding_invariant"]:
            failures.append(f"reference: logits depend on the padding side by {ref['max_padding_delta']:.2e}")
    for c in report["candidates"]:
        gate = c.get("gate") or {}
        failed = {f["check"] for f in c["failures"]}
        name = c["name"]

        def add(metric: str, value, limit, op: str, check: str) -> None:
            gated = limit is not None
            metrics.append(Metric(name, metric, value, f"{op} {limit:g}" if gated else None,
                                  (check not in failed) if gated else None))

        add("max_abs_logit", c["max_abs_logit"], gate.get("max_abs_logit"), "<=", "max_abs_logit")
        add("max_abs_prob", c["max_abs_prob"], gate.get("max_abs_prob"), "<=", "max_abs_prob")
        add("p95_abs_prob", c.get("p95_abs_prob"), gate.get("p95_abs_prob"), "<=", "p95_abs_prob")
        add("ndcg", c["ndcg"], None, "", "")
        add("retention", c["retention"], gate.get("min_retention"), ">=", "retention")
        add("mean_kendall_tau", c["ranking"]["mean_kendall_tau"], gate.get("min_mean_kendall_tau"), ">=", "kendall_tau")
        add("min_kendall_tau", c["ranking"]["min_kendall_tau"], None, "", "")
        for side in (s for s in c.get("per_side", {}).values() if "padding_delta" in s):  # a padding probe side
            add("padding_delta", side["padding_delta"], side.get("padding_limit"), "<=", "padding")
        failures += [f"{name}: {f['detail']}" for f in c["failures"]]
    return metrics, failures


def _causal_metrics(report: dict) -> tuple[list[Metric], list[str]]:
    metrics = [Metric(c["name"], x["name"], x["value"], x["gate"], x["passed"]) for c in report["candidates"] for x in c["checks"]]
    return metrics, [f for c in report["candidates"] for f in c["failures"]]


def build_manifest(recipe: Recipe, out: Path, state: RunState, timings: dict[str, dict]) -> Manifest:
    steps = state.steps
    source = steps["resolve"]["result"]
    verify_step = "verify" if recipe.kind == "reranker" else "causal-verify"
    report = json.loads((out / VERIFY_FILE).read_text(encoding="utf-8")) if verify_step in steps else None
    if report is None:
        metrics, failures = [], ["verify: did not run"]
    elif recipe.kind == "reranker":
        metrics, failures = _reranker_metrics(report)
    else:
        metrics, failures = _causal_metrics(report)
    return Manifest(
        recipe=recipe.to_dict(),
        source={"hub": source["hub"], "id": source["id"], "revision": source["revision"], "commit": source.get("commit"),
                "path": source["path"],
                "files": [{k: f[k] for k in ("path", "bytes", "sha256")} for f in source["files"]]},
        artifacts=_artifacts(recipe, steps), metrics=metrics, failures=failures,
        timings={**timings, "total": {"seconds": round(sum(t["seconds"] for t in timings.values() if not t["skipped"]), 3)}},
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _num(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and (abs(value) < 1e-2 and value != 0):
        return f"{value:.2e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(metric: Metric) -> str:
    text = _num(metric.value)
    return f"**{text}**" if metric.passed is False else text


def render_report(m: Manifest) -> str:
    """REPORT.md: one row per artifact (size, every metric, pass/fail), then the failed gates by name."""
    r, s = m.recipe, m.source
    libs = m.tool["libraries"]
    # optimum-onnx is an optional extra (qconv[optimum]): named only where it is installed.
    versions = ", ".join(f"{n} {libs[n]}" for n in ("torch", "transformers", "onnxruntime", "optimum-onnx") if libs.get(n))
    lines = [
        f"# qconv run: {r['name']} — {'PASSED' if m.passed else 'FAILED'}",
        "",
        f"- kind: {r['kind']}",
        f"- source: {s['id']} ({s['hub']}{', revision ' + s['revision'] if s.get('revision') else ''}), {len(s['files'])} files",
        f"- qconv {m.tool['version']}; {versions}",
        "",
    ]
    by_artifact: dict[str, dict[str, Metric]] = {}
    for x in m.metrics:
        by_artifact.setdefault(x.artifact, {})[x.name] = x
    columns = list(dict.fromkeys(x.name for x in m.metrics))
    header = ["artifact", "mode", "size"] + columns + ["gate", "result"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sizes = {a.name: a for a in m.artifacts}
    for name in [n for n in by_artifact if n not in sizes] + [a.name for a in m.artifacts]:
        metrics = by_artifact.get(name, {})
        art = sizes.get(name)
        gated = [x for x in metrics.values() if x.passed is not None]
        gate = ", ".join(f"{x.name} {x.gate}" for x in gated)
        result = "" if not gated else ("PASS" if all(x.passed for x in gated) else "**FAIL**")
        cells = [_cell(metrics[c]) if c in metrics else "" for c in columns]
        lines.append("| " + " | ".join([name, (art.mode or "") if art else "", _size(art.bytes) if art else ""] + cells + [gate, result]) + " |")
    lines += ["", "## Failed gates", ""]
    lines += [f"- {f}" for f in m.failures] or ["none: every gate passed"]
    lines += ["", "## Files", "", "| artifact | path | sha256 |", "|---|---|---|"]
    lines += [f"| {a.name} | `{a.path}` | `{(a.sha256 or '')[:16]}` |" for a in m.artifacts]
    lines += ["", "## Timings", "", "| step | seconds | |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.2f} | {'skipped: outputs intact' if v.get('skipped') else ''} |" for k, v in m.timings.items()]
    return "\n".join(lines) + "\n"
