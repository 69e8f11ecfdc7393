"""`qconv` command line. Thin: parse options, call one library function, print its result.

Results go to stdout (a table, or JSON with --json); progress and logs go to stderr.
Every QconvError becomes one `error: ...` line on stderr and exit code 1 (QCONV_DEBUG=1 shows the
traceback). Heavy libraries are imported inside the commands so `qconv --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="qconv",
    help="Convert Qwen3-Reranker models to seq-cls and ONNX artifacts, and prove the scores did not change.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

# --- shared option types ------------------------------------------------------------------------
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists and is not empty.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output on stderr.")]
SrcArg = Annotated[str, typer.Argument(help="Local model directory, hub id (e.g. Qwen/Qwen3-Reranker-0.6B), or qconv:tiny-reranker.")]
OutArg = Annotated[Path, typer.Argument(help="Output directory (written atomically).")]
InstructionOpt = Annotated[Optional[str], typer.Option("--instruction", help="Task instruction for the prompt template.")]
MaxLenOpt = Annotated[int, typer.Option("--max-length", help="Truncate prompts to this many tokens (only the query/document body is cut).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Most pairs per padded batch (pairs go in order of length; a batch ends early before a prompt that would pad it past 1.25x its tokens).")]
PairsOpt = Annotated[Optional[Path], typer.Option("--pairs", help='JSONL file, one {"query": ..., "document": ..., "label": optional graded relevance} per line.')]


class Engine(str, Enum):
    auto = "auto"
    transformers = "transformers"
    streamed = "streamed"


class PaddingCheck(str, Enum):
    probe = "probe"
    full = "full"


EngineOpt = Annotated[Engine, typer.Option("--engine", help="Torch models: transformers (whole model in memory), streamed (one layer at a time, fp32), or auto (streamed when the model would not fit).")]


class ScoreDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Source(str, Enum):
    auto = "auto"
    modelscope = "modelscope"
    huggingface = "huggingface"


NOT_VERIFIED_EXIT = 3  # verify: no gate failed, but a candidate could not be checked here


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def handles_errors(fn):
    """Turn QconvError into one stderr line + exit 1; Ctrl-C into exit 130. QCONV_DEBUG=1 re-raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import QconvError

        try:
            return fn(*args, **kwargs)
        except QconvError as exc:
            if os.environ.get("QCONV_DEBUG"):
                raise
            _fail(str(exc))
        except KeyboardInterrupt:
            if os.environ.get("QCONV_DEBUG"):
                raise
            typer.echo("error: interrupted; nothing was written", err=True)
            raise typer.Exit(130)
        except ModuleNotFoundError as exc:
            install = INSTALLS.get((exc.name or "").split(".")[0])
            if install is None or os.environ.get("QCONV_DEBUG"):
                raise
            _fail(f"this command needs {exc.name}, which is not installed ({install})")
        except Exception as exc:
            library = _failing_library(exc)
            if library is None or os.environ.get("QCONV_DEBUG"):
                raise  # not a library's failure: a bug in qconv, whose traceback is the report
            from .errors import first_line

            _fail(f"{library} failed: {first_line(exc)} (QCONV_DEBUG=1 shows the traceback)")

    return wrapper


# Libraries whose failures (a model onnxruntime rejects, torch out of memory, a tokenizer panic) the
# commands report as one line when no step wrapped them with the variant's name (scoring/base.py).
LIBRARIES = ("onnxruntime", "torch", "tokenizers", "transformers", "safetensors", "onnx", "optimum")


def _failing_library(exc: BaseException) -> str | None:
    """The library the exception was raised in: its type's package, else the innermost frame's."""
    import traceback

    root = type(exc).__module__.split(".")[0]
    if root in LIBRARIES:
        return root
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    parts = Path(frames[-1].filename).parts
    return next((lib for lib in LIBRARIES if lib in parts and "site-packages" in parts), None)


# A missing optional dependency -> how to install it (the core install is torch-free).
INSTALLS = {
    **dict.fromkeys(("torch", "transformers", "onnx_ir", "huggingface_hub", "modelscope", "sentence_transformers"),
                    "pip install 'qconv[convert]'"),
    "optimum": "pip install 'qconv[optimum]'",
    **dict.fromkeys(("fastapi", "uvicorn", "prometheus_client", "starlette"), "pip install 'qconv[serve]'"),
    **dict.fromkeys(("onnx", "onnxruntime"), "pip install 'qconv[serve]' to serve, 'qconv[convert]' to convert"),
}


def emit(result, as_json: bool) -> None:
    """Print a result dataclass: `to_dict()` as JSON, or its `render()` text for people."""
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(result.render())


def _reporter(quiet: bool):
    from .progress import RichReporter

    return RichReporter(quiet=quiet)


# --- commands -----------------------------------------------------------------------------------

@app.command()
@handles_errors
def seqcls(
    src: SrcArg,
    out: OutArg,
    score_dtype: Annotated[ScoreDtype, typer.Option("--score-dtype", help="Storage dtype of the score head (fp32 keeps parity at ~1e-6).")] = ScoreDtype.float32,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a causal Qwen3-Reranker into a one-logit Qwen3ForSequenceClassification (streaming)."""
    from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls

    with _reporter(quiet) as rep:
        result = convert_to_seqcls(src, out, ConvertOptions(score_dtype=score_dtype.value, force=force), reporter=rep)
    emit(result, as_json)


@app.command()
@handles_errors
def inspect(model: SrcArg, as_json: JsonOpt = False) -> None:
    """Describe a model: architecture, size, dtype, head tying, yes/no/pad ids, files."""
    from .inspect import inspect_model

    emit(inspect_model(model), as_json)


@app.command()
@handles_errors
def score(
    model: SrcArg,
    query: Annotated[Optional[str], typer.Option("--query", help="The query.")] = None,
    doc: Annotated[Optional[list[str]], typer.Option("--doc", help="A document (repeat for several).")] = None,
    pairs: PairsOpt = None,
    instruction: InstructionOpt = None,
    max_length: MaxLenOpt = 8192,
    batch_size: BatchOpt = 8,
    variant: Annotated[Optional[str], typer.Option("--variant", help="ONNX exports: which graph (fp32, fp16, int8, q4, q4f16; default: the fastest that passed its gate, measured once on this machine; unverified exports: int8 or fp32).")] = None,
    dtype: Annotated[ScoreDtype, typer.Option("--dtype", help="Torch models: compute dtype.")] = ScoreDtype.float32,
    engine: EngineOpt = Engine.auto,
    share_prefix: Annotated[bool, typer.Option("--share-prefix/--no-share-prefix", help="ONNX exports with onnx/prefix/ graphs: run each query's shared prompt prefix once.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Score and rank documents for a query with a causal reranker, a seq-cls model or an ONNX export."""
    from qwen_convert.scoring.score import ScoreOptions, score_documents

    options = ScoreOptions(instruction=instruction, max_length=max_length, batch_size=batch_size, variant=variant,
                           dtype=dtype.value, engine=engine.value, share_prefix=share_prefix)
    emit(score_documents(model, query=query, documents=doc or [], pairs_file=pairs, options=options), as_json)


@app.command()
@handles_errors
def verify(
    reference: Annotated[str, typer.Argument(help="The original causal reranker (directory or hub id).")],
    candidates: Annotated[list[str], typer.Argument(help="Seq-cls or ONNX output directories, or base URLs of running servers (http://127.0.0.1:8000).")],
    pairs: PairsOpt = None,
    variant: Annotated[Optional[list[str]], typer.Option("--variant", help="Only these ONNX variants (fp32, fp16, int8, q4, q4f16).")] = None,
    tol_logit: Annotated[Optional[float], typer.Option("--tol-logit", help="Max |Δlogit| for fp32 candidates (default 1e-4).")] = None,
    tol_fp16: Annotated[Optional[float], typer.Option("--tol-fp16", help="Max |Δlogit| for fp16 candidates (default 2e-2).")] = None,
    min_retention: Annotated[Optional[float], typer.Option("--min-retention", help="Min NDCG@10 retention for quantized candidates (default 0.97).")] = None,
    max_prob_drift: Annotated[Optional[float], typer.Option("--max-prob-drift", help="Max |ΔP(yes)| for quantized candidates (default: int8 0.1, q4/q4f16 0.2).")] = None,
    p95_prob_drift: Annotated[Optional[float], typer.Option("--p95-prob-drift", help="Max 95th percentile of |ΔP(yes)| for quantized candidates (default 0.05).")] = None,
    min_kendall_tau: Annotated[Optional[float], typer.Option("--min-kendall-tau", help="Min mean per-query Kendall τ with the reference's ranking, quantized candidates (default 0.8).")] = None,
    instruction: InstructionOpt = None,
    max_length: MaxLenOpt = 8192,
    batch_size: BatchOpt = 8,
    engine: EngineOpt = Engine.auto,
    padding_check: Annotated[PaddingCheck, typer.Option("--padding-check", help="probe: every pair padded on the left, and the two shortest prompts in one right-padded batch, padded to twice the shortest; full: every pair on both sides (about 1.9x the tokens on the built-in probes).")] = PaddingCheck.probe,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Score cache of the reference and the candidates (default: $QCONV_CACHE_DIR, else ~/.cache/qconv/reference).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Score the reference and every candidate again; read and write no cache.")] = False,
    memory_limit: Annotated[Optional[str], typer.Option("--memory-limit", help="Memory a model may use, e.g. 12G (default: what the machine and its cgroup have left).")] = None,
    api: Annotated[str, typer.Option("--api", help="Server candidates: auto, rerank, v1/rerank, score, v1/score or tei.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="Server candidates: what the server computes in (fp32, fp16, bf16, int8, q4, q4f16); picks the gate.")] = "fp32",
    timeout: Annotated[float, typer.Option("--timeout", help="Server candidates: seconds per request.")] = 60.0,
    model: Annotated[Optional[str], typer.Option("--model", help="Server candidates: the served model name, for servers that require one.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="QCONV_API_KEY", show_default=False, help="Server candidates: sent as Authorization: Bearer KEY (prefer the QCONV_API_KEY variable: an argument shows in ps).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check candidates against the causal reference on padded batches (a causal-LM export: greedy
    generation and logits against torch, run with onnxruntime alone).

    Exit 0: every candidate passed; 1: a gate failed (or the reference depends on padding);
    3: nothing failed, but a candidate was not verified (it would not fit in memory)."""
    from qwen_convert.onnx.causal_verify import is_causal_export, verify_causal_export

    if len(candidates) == 1 and is_causal_export(candidates[0]):  # a query-expansion export (kind causal-lm)
        with _reporter(quiet) as rep:
            report = verify_causal_export(reference, candidates[0], tuple(variant or ()), tol_logit, reporter=rep)
        emit(report, as_json)
        if not report.passed:
            raise typer.Exit(1)
        return
    from qwen_convert.scoring.memory import parse_size
    from qwen_convert.scoring.remote import ServerOptions, is_server_url, parse_api
    from qwen_convert.verify import VerifyOptions
    from qwen_convert.verify import verify as run_verify
    from qwen_convert.verify.cache import default_cache_dir

    options = VerifyOptions(
        pairs_file=pairs, variants=tuple(variant or ()), tol_logit=tol_logit, tol_fp16=tol_fp16,
        min_retention=min_retention, max_prob_drift=max_prob_drift, p95_prob_drift=p95_prob_drift,
        min_kendall_tau=min_kendall_tau, instruction=instruction, max_length=max_length, batch_size=batch_size,
        engine=engine.value, padding_check=padding_check.value, cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
        memory_limit=parse_size(memory_limit) if memory_limit else None,
        server=ServerOptions(api=parse_api(api).value, precision=precision, timeout=timeout, model=model, api_key=api_key),
    )
    with _reporter(quiet) as rep:
        report = run_verify(reference, [c if is_server_url(c) else Path(c) for c in candidates], options, reporter=rep)
    emit(report, as_json)
    if not report.passed:
        raise typer.Exit(1 if report.failed else NOT_VERIFIED_EXIT)


@app.command("export-onnx")
@handles_errors
def export_onnx(
    src: SrcArg,
    out: OutArg,
    quantize: Annotated[Optional[list[str]], typer.Option("--quantize", help="Extra variants: fp16, int8, q4, q4f16 (repeat, or 'all'); 'auto': export each, verify, pick the smallest that passes its gates.")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="q4 block size.")] = 32,
    quantize_embedding: Annotated[bool, typer.Option("--quantize-embedding/--keep-embedding", help="q4: quantize the embedding Gather too.")] = True,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="int8: per-channel weight scales.")] = False,
    fp32: Annotated[bool, typer.Option("--fp32/--no-fp32", help="Also write the fp32 graph (4x the bf16 weights on disk).")] = True,
    exporter: Annotated[str, typer.Option("--exporter", help="builder: stream the graph from the safetensors (flat memory); optimum: trace a torch model (cross-check, several times the fp32 weights in RAM).")] = "builder",
    quant_method: Annotated[Optional[str], typer.Option("--quant-method", help="int8/q4/q4f16: calibrated (SmoothQuant / AWQ scales folded into the weights; the builder's default) or naive (round-to-nearest).")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Calibration pairs (JSONL, as --pairs); default: the built-in probes.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the parity check of what was written.")] = False,
    prefix_graphs: Annotated[bool, typer.Option("--prefix-graphs/--no-prefix-graphs", help="Builder: also write onnx/prefix/ (each variant with a key/value cache, for prefix-shared scoring; doubles the disk).")] = True,
    reference: Annotated[Optional[str], typer.Option("--reference", help="The original causal reranker to verify against (default: SRC; required when SRC is already seq-cls).")] = None,
    pairs: PairsOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a one-logit ONNX graph (+ fp16/int8/q4/q4f16 variants) and verify it."""
    from qwen_convert.onnx.export import ExportOptions
    from qwen_convert.onnx.export import export_onnx as run_export

    options = ExportOptions(
        modes=tuple(quantize or ()), block_size=block_size, quantize_embedding=quantize_embedding,
        per_channel=per_channel, fp32=fp32, exporter=exporter, verify=not no_verify, reference=reference,
        pairs_file=pairs, force=force, quant_method=quant_method, calibration_file=calibration, prefix_graphs=prefix_graphs,
    )
    with _reporter(quiet) as rep:
        result = run_export(src, out, options, reporter=rep)
    emit(result, as_json)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
@handles_errors
def download(
    model_id: Annotated[str, typer.Argument(help="Hub id, e.g. Qwen/Qwen3-Reranker-0.6B.")],
    source: Annotated[Optional[Source], typer.Option("--source", help="auto tries ModelScope, then Hugging Face (env QCONV_SOURCE).")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit.")] = None,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Also place the files here.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Use caches only (also HF_HUB_OFFLINE=1).")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a reranker (ModelScope first, then Hugging Face / HF_ENDPOINT) and check its integrity."""
    from qwen_convert.hub.download import DownloadOptions, download_model

    options = DownloadOptions(source=source.value if source else None, revision=revision, local_dir=local_dir, offline=offline)
    with _reporter(quiet) as rep:
        result = download_model(model_id, options, reporter=rep)
    emit(result, as_json)


@app.command()
@handles_errors
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file (recipes/*.toml, or --dry-run output), a model (hub id, directory, qconv:NAME) with default settings, or with --check an output directory.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default: artifacts/<recipe name>).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key, e.g. --set gates.tol_logit=1e-3 --set 'artifacts.onnx=[\"fp32\",\"q4\"]' (repeat).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the fully resolved recipe (TOML; JSON with --json) and stop.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Validate DIR/manifest.json against the files on disk.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe: resolve/download, seq-cls, ONNX + quantize, verify, manifest.json + REPORT.md; exit 1 if a gate fails."""
    from qwen_convert.pipeline import run as pipeline

    if check:
        result = pipeline.check_manifest(Path(recipe))
    else:
        resolved = pipeline.resolve_recipe(recipe, overrides=set_ or ())
        if dry_run:
            result = resolved
        else:
            try:
                with _reporter(quiet) as rep:
                    result = pipeline.run_recipe(resolved, out=out, reporter=rep)
            except KeyboardInterrupt:
                if os.environ.get("QCONV_DEBUG"):
                    raise
                typer.echo("error: interrupted; the steps that finished are kept (run the same command again to resume)", err=True)
                raise typer.Exit(130)
    emit(result, as_json)
    if not getattr(result, "passed", True):
        raise typer.Exit(1)


@app.command()
@handles_errors
def serve(
    models: Annotated[list[str], typer.Argument(metavar="MODEL", help="ONNX export directories (qconv export-onnx OUT, or a qconv run output), or seq-cls directories.")],
    name: Annotated[Optional[list[str]], typer.Option("--name", help="Served name of each MODEL, in order (default: the directory name).")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant", help="ONNX variant (fp32, fp16, int8, q4, q4f16; default: the fastest that passed its gate, else int8, else fp32).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to bind.")] = 8000,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate prompts to this many tokens (the template is kept).")] = 2048,
    max_batch_tokens: Annotated[int, typer.Option("--max-batch-tokens", help="Padded tokens per inference batch.")] = 8192,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Pairs per inference batch.")] = 32,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="How long a pair may wait for others to fill its batch.")] = 2.0,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Pairs queued per model before requests get 503.")] = 4096,
    max_documents: Annotated[int, typer.Option("--max-documents", help="Documents (or pairs) per request.")] = 1000,
    max_request_bytes: Annotated[int, typer.Option("--max-request-bytes", help="Largest request body.")] = 4 * 2**20,
    threads: Annotated[Optional[int], typer.Option("--threads", help="onnxruntime intra-op threads (default: all cores).")] = None,
    share_prefix: Annotated[bool, typer.Option("--share-prefix/--no-share-prefix", help="ONNX exports with onnx/prefix/ graphs, on CPU: run each request's shared prompt prefix once, its documents on top of it.")] = True,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (stderr).")] = False,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="QCONV_API_KEY", show_envvar=True, help="Require Authorization: Bearer KEY on every route but /health and /. Prefer the environment variable or --api-key-file: a command-line argument shows in ps.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option("--api-key-file", envvar="QCONV_API_KEY_FILE", show_envvar=True, help="Read the API key from this file (e.g. a container secret).")] = None,
    allow_model_dir: Annotated[Optional[list[str]], typer.Option("--allow-model-dir", help="Enable POST /v1/models/load and /unload, loading only from inside this directory (repeat for several). Off by default.")] = None,
    admin_key: Annotated[Optional[str], typer.Option("--admin-key", envvar="QCONV_ADMIN_KEY", show_envvar=True, help="The only key /v1/models/load and /unload accept (it works on every route).")] = None,
    admin_key_file: Annotated[Optional[Path], typer.Option("--admin-key-file", envvar="QCONV_ADMIN_KEY_FILE", show_envvar=True, help="Read the admin key from this file.")] = None,
    public_metrics: Annotated[bool, typer.Option("--public-metrics", help="Serve /metrics without the API key (for a scraper that cannot send one).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Serve rerankers over HTTP: /rerank, /v1/rerank, /v2/rerank, /score, /metrics, a try-it page at /."""
    from qwen_convert.serve.options import AccessOptions, ModelSpec, ServeOptions
    from qwen_convert.serve.server import serve as run_server

    names = list(name or [])
    if len(names) > len(models):
        _fail(f"{len(names)} --name values for {len(models)} models; give at most one --name per MODEL")
    specs = [ModelSpec(m, names[i] if i < len(names) else None, variant) for i, m in enumerate(models)]
    options = ServeOptions(host=host, port=port, max_length=max_length, max_batch_tokens=max_batch_tokens,
                           max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                           max_documents=max_documents, max_request_bytes=max_request_bytes, threads=threads,
                           share_prefix=share_prefix, access=AccessOptions(api_key=api_key, api_key_file=api_key_file, admin_key=admin_key,
                                                admin_key_file=admin_key_file, model_dirs=tuple(allow_model_dir or ()),
                                                public_metrics=public_metrics))
    emit(run_server(specs, options, access_log=access_log), as_json)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
