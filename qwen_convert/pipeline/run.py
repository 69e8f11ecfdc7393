"""`qconv run RECIPE`: resolve/download -> seq-cls -> ONNX + quantization -> verify -> manifest + REPORT.

Each step writes its outputs atomically (a temporary sibling renamed into place) and, once done,
records in DIR/.qconv-run.json a key (the recipe settings it depends on, the qconv sources and
library versions, chained with the previous step's outputs) and the sha256 of every file it wrote.
A re-run skips a step whose key is unchanged and whose files still hash the same, and redoes it
otherwise; a step after a redone one is redone too unless the redone outputs came out byte-identical.
An interrupted run therefore resumes at the step it was in.

`plan(recipe)` lists the steps of a recipe's kind; each step is a function in STEPS.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qwen_convert.errors import RecipeError
from qwen_convert.fsutil import TMP_MARKER, atomic_output_file, ensure_output_dir, sha256_file
from qwen_convert.progress import NULL, Reporter

from .. import __version__
from .manifest import MANIFEST, ONNX_OUT, REPORT, SEQCLS_DIR, STATE, VERIFY_FILE, Manifest, RunState, check_manifest, file_entries
from .recipe import Recipe, load_recipe
from .report import build_manifest, render_report
from .staging import publish, work_dir

__all__ = ["run_recipe", "resolve_recipe", "check_manifest", "RunResult"]  # check_manifest: `run --check`

# Reference scores of earlier runs (stream/cache.py): a re-run whose verify step is redone, or a
# recipe that adds a variant, reads the reference back instead of recomputing it. Not an artifact.
REFERENCE_CACHE = ".reference-cache"
DEFAULT_ROOT = Path("artifacts")


# --- the state file -----------------------------------------------------------------------------


def _owner(out: Path) -> str | None:
    """Name of the recipe whose artifacts `out` holds (from the state file, else the manifest)."""
    for name, get in ((STATE, lambda d: d.get("recipe")), (MANIFEST, lambda d: (d.get("recipe") or {}).get("name"))):
        path = out / name
        if path.is_file():
            try:
                owner = get(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, AttributeError):
                raise RecipeError(f"{path} is unreadable", f"delete {out} or choose another --out") from None
            if isinstance(owner, str):
                return owner
    return None


def check_owner(out: Path, recipe: Recipe) -> None:
    """Refuse an OUT that is a file, or a non-empty directory not written by a run of this recipe."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output {out} exists and is not a directory", "choose another --out")
    if out.is_dir() and any(out.iterdir()):
        owner = _owner(out)
        if owner is None:
            raise RecipeError(f"output directory {out} is not empty and was not written by `qconv run`",
                              "choose another --out, or empty it")
        if owner != recipe.name:
            raise RecipeError(f"output directory {out} holds the artifacts of recipe {owner!r}, not {recipe.name!r}",
                              f"choose another --out (default: {DEFAULT_ROOT}/{recipe.name}), or delete {out}")


def claim_output(out: Path, recipe: Recipe) -> RunState:
    """Open (or start) the run state of `out`; refuse a directory holding anything else."""
    state = RunState(out / STATE, recipe.name)
    check_owner(out, recipe)
    if out.is_dir() and any(out.iterdir()):
        try:
            steps = json.loads(state.path.read_text(encoding="utf-8")).get("steps", {})
            state.steps = steps if isinstance(steps, dict) else {}
        except (OSError, ValueError):
            state.steps = {}  # no (or an unreadable) step record: every step is redone
    ensure_output_dir(out)  # one OutputError line under a file, read-only or on /proc
    for stale in out.glob(f".*{TMP_MARKER}*"):  # left by a hard kill mid-step
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    # A manifest describes a finished run; until this one finishes there is none.
    (out / MANIFEST).unlink(missing_ok=True)
    (out / REPORT).unlink(missing_ok=True)
    state.save()
    return state


# --- steps ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    recipe: Recipe
    out: Path
    reporter: Reporter
    done: dict[str, dict]  # records of the steps completed (or skipped as intact) in this run
    previous: dict[str, dict]  # records of the last run into this directory
    published: Path | None = None  # where `out` ends up: OUT, when the run works in a staging sibling


@dataclass(frozen=True)
class Outcome:
    outputs: tuple[str, ...]  # files/directories written under out (relative)
    result: dict


def _source_files(root: Path, previous: dict[str, dict]) -> list[dict]:
    """sha256 of every source file; a file whose size and mtime match the last run keeps its hash."""
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # hub-cache bookkeeping (.qconv, .mdl, .msc ...) is not the model
        st = p.stat()
        old = previous.get(rel.as_posix())
        same = old and old["bytes"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns
        files.append({"path": rel.as_posix(), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "sha256": old["sha256"] if same else sha256_file(p)})
    return files


def step_resolve(ctx: Context) -> Outcome:
    from qwen_convert.errors import DownloadError
    from qwen_convert.hub.resolve import resolve_model

    s = ctx.recipe.source
    if s.path:
        attempts = [(s.path, None)]
    else:
        order = ("modelscope", "huggingface") if s.hub == "auto" else (s.hub,)
        attempts = [(getattr(s, hub), hub) for hub in order if getattr(s, hub)]
        if s.hub == "auto" and len({model_id for model_id, _ in attempts}) == 1:
            # One id for both hubs: the downloader's own order (ModelScope first, QCONV_SOURCE honoured).
            attempts = [(attempts[0][0], None)]
    errors = []
    for model_id, hub in attempts:
        try:
            resolved = resolve_model(model_id, source=hub, revision=s.revision, reporter=ctx.reporter)
            break
        except DownloadError as exc:
            errors.append(str(exc))
    else:
        raise DownloadError("; ".join(errors), "check the recipe's [source] ids and your network")
    previous = {f["path"]: f for f in (ctx.previous.get("resolve") or {}).get("result", {}).get("files", [])}
    files = _source_files(Path(resolved.path), previous)
    return Outcome((), {"hub": resolved.source, "id": resolved.model_id or model_id, "revision": resolved.revision,
                        "commit": resolved.commit, "path": str(Path(resolved.path).resolve()), "files": files})


def _source_path(ctx: Context) -> Path:
    return Path(ctx.done["resolve"]["result"]["path"])


def step_seqcls(ctx: Context) -> Outcome:
    from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls

    options = ConvertOptions(score_dtype=ctx.recipe.artifacts.score_dtype, force=True)
    result = convert_to_seqcls(_source_path(ctx), ctx.out / SEQCLS_DIR, options, reporter=ctx.reporter)
    return Outcome((SEQCLS_DIR,), {"tensors": result.tensors, "weight_bytes": result.weight_bytes})


def _quantized(recipe: Recipe) -> tuple[str, ...]:
    return tuple(m for m in recipe.artifacts.onnx if m != "fp32")


def step_onnx(ctx: Context) -> Outcome:
    from qwen_convert.errors import ExportError
    from qwen_convert.onnx.export import ExportOptions, export_onnx

    r = ctx.recipe
    # Export from our own fp32-head seq-cls output when there is one (no second conversion);
    # a bf16/fp16 head would cost the fp32 graph its parity, so then from the causal source.
    use_seqcls = r.artifacts.seqcls and r.artifacts.score_dtype == "float32"
    src = ctx.out / SEQCLS_DIR if use_seqcls else _source_path(ctx)
    q = r.quantization
    # Only the listed variants are written: the builder makes each from the checkpoint, so a recipe
    # without fp32 (4B, 8B: ~16 and ~30 GB) never writes that graph; verify gates every variant
    # against the causal reference, not against fp32.
    # "auto" (onnx/auto.py): every candidate exported and verified here, the smallest that passes
    # chosen; the verify step and the manifest then see the chosen mode in its place.
    auto = "auto" in r.artifacts.onnx
    options = ExportOptions(modes=_quantized(r), fp32="fp32" in r.artifacts.onnx, block_size=q.block_size,
                            quantize_embedding=q.quantize_embedding, per_channel=q.per_channel, verify=auto, force=True,
                            quant_method=q.method, calibration_file=_pairs_file(q.calibration),
                            reference=str(_source_path(ctx)) if auto else None, pairs_file=_pairs_file(r.verify.pairs),
                            verify_options=_verify_options(ctx) if auto else None)
    result = export_onnx(src, ctx.out / ONNX_OUT, options, reporter=ctx.reporter)
    if result.auto is not None and result.auto.chosen is None:
        raise ExportError("artifacts.onnx auto: no candidate variant passed its gates",
                          f"see {ONNX_OUT}/quantize_config.json's auto for each candidate's failed checks")
    extra = {"auto": result.auto.to_dict()} if result.auto is not None else {}
    return Outcome((ONNX_OUT,), {"variants": [v.to_dict() for v in result.variants], **extra})


def _pairs_file(value: str | None) -> Path | None:
    if value is None:
        return None
    if value.startswith("qconv:"):
        from qwen_convert.hub.resolve import builtin_path

        name, _, rel = value[len("qconv:"):].partition("/")
        return builtin_path(name) / rel
    return Path(value)


def step_verify(ctx: Context) -> Outcome:
    from qwen_convert.onnx.auto import resolve_auto
    from qwen_convert.verify import verify

    r = ctx.recipe
    candidates = []
    if r.artifacts.seqcls:
        candidates.append(ctx.out / SEQCLS_DIR)
    if r.artifacts.onnx:
        candidates.append(ctx.out / ONNX_OUT)
    options = replace(_verify_options(ctx), variants=resolve_auto(r.artifacts.onnx, ctx.done.get("onnx")))
    report = verify(_source_path(ctx), candidates, options, reporter=ctx.reporter)
    _write_json(ctx.out / VERIFY_FILE, _published_paths(report.to_dict(), ctx))
    return Outcome((VERIFY_FILE,), {"passed": report.passed})


def _verify_options(ctx: Context):
    """verify's options from the recipe ([gates], [verify], the instruction): the verify step's, and
    the onnx step's when it verifies every candidate to pick one (artifacts.onnx = ["auto"])."""
    from qwen_convert.verify import VerifyOptions

    r = ctx.recipe
    return VerifyOptions(
        pairs_file=_pairs_file(r.verify.pairs), tol_logit=r.gates.tol_logit, tol_fp16=r.gates.tol_fp16,
        min_retention=r.gates.min_retention, max_prob_drift=r.gates.max_prob_drift, p95_prob_drift=r.gates.p95_prob_drift,
        min_kendall_tau=r.gates.min_kendall_tau, instruction=r.instruction, max_length=r.verify.max_length,
        batch_size=r.verify.batch_size, padding_check=r.verify.padding_check, cache_dir=ctx.out / REFERENCE_CACHE,
    )


def step_causal_onnx(ctx: Context) -> Outcome:
    from qwen_convert.onnx.causal_lm import CausalExportOptions, export_causal_lm

    r, q = ctx.recipe, ctx.recipe.quantization
    options = CausalExportOptions(modes=r.artifacts.onnx, block_size=q.block_size, quantize_embedding=q.quantize_embedding,
                                  per_channel=q.per_channel, force=True, exporter=r.artifacts.exporter,
                                  quant_method=q.method, calibration_file=_pairs_file(q.calibration))
    result = export_causal_lm(_source_path(ctx), ctx.out / ONNX_OUT, options, reporter=ctx.reporter)
    return Outcome((ONNX_OUT,), {"variants": [v.to_dict() for v in result.variants], "exporter": r.artifacts.exporter})


def _check_causal_source(recipe: Recipe) -> None:
    """Not Qwen3, no chat template (a reranker), a shape the builder refuses: one error, nothing written."""
    from qwen_convert.hub.resolve import resolve_model
    from qwen_convert.onnx.causal_lm import check_causal_source

    check_causal_source(Path(resolve_model(recipe.source.path).path), recipe.artifacts.exporter)


def step_causal_verify(ctx: Context) -> Outcome:
    from qwen_convert.onnx.causal_verify import CausalGates, verify_causal_lm

    r = ctx.recipe
    gates = CausalGates(tol_logit=r.gates.tol_logit, min_token_agreement=r.gates.min_token_agreement)
    report = verify_causal_lm(_source_path(ctx), ctx.out / ONNX_OUT, r.verify.prompts, r.verify.max_new_tokens,
                              r.artifacts.onnx, gates, reporter=ctx.reporter)
    _write_json(ctx.out / VERIFY_FILE, _published_paths(report.to_dict(), ctx))
    return Outcome((VERIFY_FILE,), {"passed": report.passed})


def _published_paths(data, ctx: Context):
    """`data` with the staging directory's paths (verify names every candidate and cache file) as
    they will read once the run is swapped into OUT."""
    if ctx.published is None or ctx.published == ctx.out:
        return data
    old, new = str(ctx.out), str(ctx.published)
    if isinstance(data, dict):
        return {k: _published_paths(v, ctx) for k, v in data.items()}
    if isinstance(data, list):
        return [_published_paths(v, ctx) for v in data]
    if isinstance(data, str) and (data == old or data.startswith(old + "/")):
        return new + data[len(old):]
    return data


def _write_json(path: Path, data: dict) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


STEPS: dict[str, Callable[[Context], Outcome]] = {
    "resolve": step_resolve,
    "seqcls": step_seqcls,
    "onnx": step_onnx,
    "verify": step_verify,
    "causal-onnx": step_causal_onnx,
    "causal-verify": step_causal_verify,
}


def plan(recipe: Recipe) -> list[str]:
    if recipe.kind == "causal-lm":
        return ["resolve", "causal-onnx", "causal-verify"]
    steps = ["resolve"]
    if recipe.artifacts.seqcls:
        steps.append("seqcls")
    if recipe.artifacts.onnx:
        steps.append("onnx")
    return steps + ["verify"]


def step_config(recipe: Recipe, step: str) -> dict:
    """The recipe settings a step's outputs depend on (its key); changing others does not redo it."""
    r = recipe.to_dict()
    if step == "resolve":
        return {"source": r["source"]}
    if step in ("seqcls",):
        return {"artifacts": {"score_dtype": recipe.artifacts.score_dtype}}
    if step in ("onnx", "causal-onnx"):
        return {"artifacts": {"onnx": r["artifacts"]["onnx"], "seqcls": recipe.artifacts.seqcls,
                              "score_dtype": recipe.artifacts.score_dtype, "exporter": recipe.artifacts.exporter},
                "quantization": r["quantization"]}
    return {k: r.get(k) for k in ("instruction", "gates", "verify")}


@functools.cache
def code_fingerprint() -> str:
    """The qconv sources and the library versions: a fix in a quantizer must not reuse old outputs."""
    import hashlib

    from qwen_convert.versions import library_versions

    h = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode())
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):  # subpackages (stream/, onnx/ ...) compute outputs too
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _step_key(recipe: Recipe, step: str, upstream: str) -> str:
    from .recipe import fingerprint

    return fingerprint({"step": step, "qconv": __version__, "code": code_fingerprint(),
                        "config": step_config(recipe, step), "upstream": upstream})


def _intact(out: Path, step: str, record: dict) -> bool:
    if step == "resolve":
        result = record.get("result") or {}
        root = Path(result.get("path", ""))
        for f in result.get("files", []):
            p = root / f["path"]
            if not p.is_file():
                return False
            st = p.stat()
            if st.st_size != f["bytes"] or st.st_mtime_ns != f["mtime_ns"]:
                return False
        return bool(result.get("files"))
    outputs = record.get("outputs") or {}
    for top in record.get("roots", []):
        if set(_files_under(out, top)) != {p for p in outputs if p == top or p.startswith(top + "/")}:
            return False  # a file appeared or disappeared under this step's outputs
    for rel, entry in outputs.items():
        p = out / rel
        if not p.is_file() or p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            return False
    return bool(outputs)


def _files_under(out: Path, rel: str) -> list[str]:
    target = out / rel
    if target.is_file():
        return [rel]
    return [p.relative_to(out).as_posix() for p in target.rglob("*") if p.is_file()]


def _digest(record: dict) -> str:
    """What the next step's key chains on: this step's key and the hashes of what it produced."""
    from .recipe import fingerprint

    files = [(f["path"], f["sha256"]) for f in record["result"].get("files", [])]
    return fingerprint({"key": record["key"], "outputs": record["outputs"], "source_files": files})


# --- the run ----------------------------------------------------------------------------------------

@dataclass
class RunResult:
    recipe: Recipe
    out: Path
    manifest: Manifest
    report: str  # REPORT.md

    @property
    def passed(self) -> bool:
        return self.manifest.passed

    @property
    def timings(self) -> dict[str, dict]:
        return self.manifest.timings

    def to_dict(self) -> dict:
        return {"out": str(self.out), **self.manifest.to_dict()}

    def render(self) -> str:
        return self.report


def resolve_recipe(spec: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """The fully resolved recipe (`--dry-run`): every default filled, overrides applied."""
    return load_recipe(spec, overrides)


def default_out(recipe: Recipe) -> Path:
    return DEFAULT_ROOT / recipe.name


def run_recipe(spec: str | Path | Recipe, out: Path | None = None, overrides: tuple[str, ...] | list[str] = (),
               reporter: Reporter = NULL) -> RunResult:
    """Run every step of the recipe into `out`, skipping those whose outputs are intact."""
    recipe = spec if isinstance(spec, Recipe) else load_recipe(spec, overrides)
    published = Path(out) if out is not None else default_out(recipe)
    if recipe.kind == "causal-lm" and recipe.artifacts.exporter == "optimum":  # before OUT is claimed: a missing extra leaves nothing behind
        from ..extras import require_optimum

        require_optimum(f"recipe {recipe.name} (kind causal-lm, artifacts.exporter optimum)")
    if recipe.kind == "causal-lm" and recipe.source.path:  # a local source is checked before OUT exists too
        _check_causal_source(recipe)
    check_owner(published, recipe)
    out = work_dir(published)  # a staging sibling when `published` holds a finished run (staging.py)
    state = claim_output(out, recipe)
    previous = dict(state.steps)
    state.steps = {}
    steps = plan(recipe)
    for name, record in previous.items():
        if name not in steps:  # e.g. seqcls switched off since the last run: its outputs must go
            for root in record.get("roots", []):
                target = out / root
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    timings: dict[str, dict] = {}
    upstream = ""
    for i, step in enumerate(steps, 1):
        key = _step_key(recipe, step, upstream)
        record = previous.get(step)
        if record and record.get("key") == key and _intact(out, step, record):
            reporter.log(f"[{i}/{len(steps)}] {step}: outputs intact, skipped")
            timings[step] = {"seconds": record["seconds"], "skipped": True}
        else:
            reporter.log(f"[{i}/{len(steps)}] {step}")
            started = time.perf_counter()
            outcome = STEPS[step](Context(recipe, out, reporter, state.steps, previous, published))
            seconds = round(time.perf_counter() - started, 3)
            outputs = {e.path: {"bytes": e.bytes, "sha256": e.sha256} for rel in outcome.outputs for e in file_entries(out, rel)}
            record = {"key": key, "seconds": seconds, "roots": list(outcome.outputs), "outputs": outputs, "result": outcome.result}
            timings[step] = {"seconds": seconds, "skipped": False}
        state.steps[step] = record
        state.save()
        upstream = _digest(record)
    manifest = build_manifest(recipe, out, state, timings)
    report = render_report(manifest)
    with atomic_output_file(out / REPORT) as tmp:
        tmp.write_text(report, encoding="utf-8")
    manifest.write(out)  # last: a manifest says the run is finished (staging.py relies on it)
    publish(out, published)
    return RunResult(recipe, published, manifest, report)


# --- manifest and report -------------------------------------------------------------------------------
