"""Recipes: one declarative TOML file per model, and the CLI's overrides, as one validated `Recipe`.

A recipe names its source (ModelScope and/or Hugging Face id, or a local/built-in path), what to
build, the quantization settings and the gates the artifacts must pass. `load_recipe` fills every
default for the recipe's kind, so `Recipe.to_toml()` (what `qconv run --dry-run` prints) is the
complete configuration: loading that text back gives an equal `Recipe`, and runs the same.

Every mistake is one `RecipeError` line that names the key: unknown keys with the closest valid one,
wrong types, unknown ONNX modes with the valid list, gates that are not numbers.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from qwen_convert.errors import RecipeError
from qwen_convert.formats import SCORE_DTYPES

KINDS = ("reranker", "causal-lm")
HUBS = ("auto", "modelscope", "huggingface")
CAUSAL_LM_MODES = ("fp32", "q4f16")  # causal-lm's default; any ONNX mode is valid
CAUSAL_EXPORTERS = ("builder", "optimum")  # onnx/causal_lm.py's; builder needs no optional extra
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_PROMPTS = (
    "Expand the search query into related search queries: cheap flights to tokyo",
    "Rewrite the query with synonyms: how to fix a leaking tap",
)


def reranker_modes() -> tuple[str, ...]:
    from qwen_convert.formats import QuantMode  # the one list of ONNX modes, owned by the exporter

    return tuple(m.value for m in QuantMode)


@dataclass(frozen=True)
class Source:
    modelscope: str | None = None  # hub id on ModelScope (tried first when hub = "auto")
    huggingface: str | None = None  # hub id on Hugging Face (or an HF_ENDPOINT mirror)
    path: str | None = None  # local directory or qconv:NAME; wins over the hub ids
    revision: str | None = None  # branch, tag or commit; unset = the hub's default branch
    hub: str = "auto"  # auto | modelscope | huggingface

    @property
    def display(self) -> str:
        return self.path or self.modelscope or self.huggingface or "?"


@dataclass(frozen=True)
class Artifacts:
    seqcls: bool = True  # reranker: one-logit Qwen3ForSequenceClassification (vLLM, TEI, ST)
    score_dtype: str = "float32"  # reranker: storage dtype of score.weight
    onnx: tuple[str, ...] = ()  # ONNX modes; filled per kind by load_recipe
    exporter: str = "builder"  # causal-lm: builder (graph from the safetensors) | optimum (traced; qconv[optimum])


@dataclass(frozen=True)
class Quantization:
    block_size: int = 32  # q4/q4f16: weights per scale
    quantize_embedding: bool = True  # q4/q4f16: 4-bit embedding Gather as well
    per_channel: bool = False  # int8: one scale per output channel
    # int8/q4/q4f16: calibrated (SmoothQuant / AWQ, folded) | naive (round-to-nearest); causal-lm with
    # the optimum exporter: naive only (its default there)
    method: str = "calibrated"
    calibration: str | None = None  # JSONL calibration pairs (as verify.pairs); unset = the built-in probes


@dataclass(frozen=True)
class Gates:
    tol_logit: float = 1e-4  # max |Δlogit| of fp32 artifacts against the torch reference
    tol_fp16: float = 2e-2  # reranker: max |Δlogit| of fp16 artifacts
    min_retention: float = 0.97  # reranker: NDCG@10 retention of quantized artifacts
    # reranker, quantized artifacts: how far P(yes) may move and how well rankings must hold; unset =
    # verify's per-precision defaults (int8 max |ΔP| 0.1, q4/q4f16 0.2, p95 |ΔP| 0.05, mean τ 0.8).
    max_prob_drift: float | None = None
    p95_prob_drift: float | None = None
    min_kendall_tau: float | None = None
    min_token_agreement: float = 0.9  # causal-lm: teacher-forced top-1 agreement of quantized graphs


@dataclass(frozen=True)
class Verification:
    pairs: str | None = None  # reranker: JSONL of {"query","document"[,"label"]}; qconv:NAME/FILE ok
    max_length: int = 8192  # reranker: prompt tokens
    batch_size: int = 8  # reranker: pairs per padded batch
    padding_check: str = "probe"  # reranker: probe | full (qconv verify --padding-check)
    prompts: tuple[str, ...] = ()  # causal-lm: prompts for greedy generation; filled by load_recipe
    max_new_tokens: int = 16  # causal-lm: greedy tokens compared per prompt


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str = "reranker"
    instruction: str | None = None  # reranker: task instruction of the prompt (unset = official default)
    source: Source = field(default_factory=Source)
    artifacts: Artifacts = field(default_factory=Artifacts)
    quantization: Quantization = field(default_factory=Quantization)
    gates: Gates = field(default_factory=Gates)
    verify: Verification = field(default_factory=Verification)

    def to_dict(self) -> dict:
        """Every key that applies to this kind, defaults included; None values dropped (TOML has no null)."""
        data = asdict(self)
        for dotted, kind in KIND_ONLY.items():
            if kind != self.kind:
                _pop(data, dotted)
        return _drop_none(_lists(data))

    def render(self) -> str:
        return self.to_toml().rstrip("\n")  # the CLI's echo adds the final newline back

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    @property
    def onnx_modes(self) -> tuple[str, ...]:
        return self.artifacts.onnx


SECTIONS = {"source": Source, "artifacts": Artifacts, "quantization": Quantization, "gates": Gates, "verify": Verification}
TOP_LEVEL = ("name", "kind", "instruction")
# Keys meaningful for one kind only: loading them into the other kind is an error, and dumps omit them.
KIND_ONLY = {
    "instruction": "reranker",
    "artifacts.seqcls": "reranker",
    "artifacts.score_dtype": "reranker",
    "gates.tol_fp16": "reranker",
    "gates.min_retention": "reranker",
    "gates.max_prob_drift": "reranker",
    "gates.p95_prob_drift": "reranker",
    "gates.min_kendall_tau": "reranker",
    "verify.pairs": "reranker",
    "verify.max_length": "reranker",
    "verify.batch_size": "reranker",
    "verify.padding_check": "reranker",
    "artifacts.exporter": "causal-lm",
    "gates.min_token_agreement": "causal-lm",
    "verify.prompts": "causal-lm",
    "verify.max_new_tokens": "causal-lm",
}
# Expected TOML type per key: str, int, float (ints accepted), bool, or ("list", str).
TYPES: dict[str, Any] = {
    "name": str, "kind": str, "instruction": str,
    "source.modelscope": str, "source.huggingface": str, "source.path": str, "source.revision": str, "source.hub": str,
    "artifacts.seqcls": bool, "artifacts.score_dtype": str, "artifacts.onnx": ("list", str), "artifacts.exporter": str,
    "quantization.block_size": int, "quantization.quantize_embedding": bool, "quantization.per_channel": bool,
    "quantization.method": str, "quantization.calibration": str,
    "gates.tol_logit": float, "gates.tol_fp16": float, "gates.min_retention": float, "gates.min_token_agreement": float,
    "gates.max_prob_drift": float, "gates.p95_prob_drift": float, "gates.min_kendall_tau": float,
    "verify.pairs": str, "verify.max_length": int, "verify.batch_size": int, "verify.padding_check": str,
    "verify.prompts": ("list", str), "verify.max_new_tokens": int,
}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


# --- loading --------------------------------------------------------------------------------------

def load_recipe(spec: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe file (TOML, or JSON as printed by `--dry-run --json`), or a bare model source
    (hub id, local model directory, qconv:NAME) with all defaults; then `KEY=VALUE` overrides."""
    raw, where, base = _read_spec(spec)
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, where=where, base_dir=base)


def _read_spec(spec: str | Path) -> tuple[dict, str, Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        text = _read_text(path)
        if path.suffix == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path} is not valid JSON: {exc}", "fix the syntax at that line") from exc
        else:
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise RecipeError(f"{path} is not valid TOML: {exc}", "fix the syntax at that line") from exc
        if not isinstance(raw, dict):
            raise RecipeError(f"{path} does not hold a table of settings", "see recipes/*.toml for the format")
        return raw, str(path), path.resolve().parent
    text = str(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return {"name": _slug(path.resolve().name), "source": {"path": str(path.resolve())}}, text, Path.cwd()
    if text.startswith("qconv:"):
        return {"name": _slug(text.split(":", 1)[1]), "source": {"path": text}}, text, Path.cwd()
    from qwen_convert.hub.download import HUB_ID

    if HUB_ID.match(text) and not path.suffix == ".toml":
        return {"name": _slug(text.split("/")[-1]), "source": {"modelscope": text, "huggingface": text}}, text, Path.cwd()
    raise RecipeError(f"recipe {text} does not exist", "pass a recipe file (recipes/*.toml), a hub id, a model directory or qconv:NAME")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}", "pass a readable UTF-8 TOML file") from exc


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower()
    return slug or "model"


def apply_override(raw: dict, item: str) -> None:
    """`section.key=VALUE` into `raw`. VALUE is read as a TOML value (1e-3, true, ["fp32","q4"]);
    anything that is not valid TOML is taken as a plain string (so revision=v1.0 works)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {item!r} is not KEY=VALUE", "e.g. --set gates.tol_logit=1e-3")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    if key not in TYPES:
        _unknown(key, list(TYPES), "--set")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {part} is not a table in this recipe", "fix the recipe file")
    node[parts[-1]] = parsed


def _unknown(key: str, valid: list[str], where: str) -> None:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    raise RecipeError(f"{where}: unknown key {key!r}", hint)


def _check_type(dotted: str, value: Any, where: str) -> Any:
    expected = TYPES[dotted]
    if isinstance(expected, tuple):
        if not isinstance(value, list) or not all(isinstance(v, expected[1]) for v in value):
            raise RecipeError(f"{where}: {dotted} must be a list of strings, got {_show(value)}", f'e.g. {dotted} = ["fp32"]')
        return tuple(value)
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise RecipeError(f"{where}: {dotted} must be a finite number, got {value}", "use a positive number")
        if ok:
            return float(value)
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, expected):
        return value
    raise RecipeError(f"{where}: {dotted} must be {TYPE_NAMES[expected]}, got {_show(value)}", "see recipes/*.toml for examples")


def _show(value: Any) -> str:
    kind = {str: "string", bool: "boolean", int: "integer", float: "number", list: "list", dict: "table"}.get(type(value), type(value).__name__)
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, dict) else "{...}"
    return f"{kind} {text[:60]}"


def recipe_from_dict(raw: dict, where: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a parsed recipe and fill the defaults of its kind."""
    flat: dict[str, Any] = {}
    valid = list(TYPES)
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {key} must be a table ([{key}]), got {_show(value)}", "see recipes/*.toml")
            for sub, subvalue in value.items():
                dotted = f"{key}.{sub}"
                if dotted not in TYPES:
                    _unknown(dotted, valid, where)
                flat[dotted] = _check_type(dotted, subvalue, where)
        elif key in TOP_LEVEL:
            flat[key] = _check_type(key, value, where)
        else:
            _unknown(key, valid, where)

    kind = flat.get("kind", "reranker")
    if kind not in KINDS:
        raise RecipeError(f"{where}: unknown kind {kind!r}", f"valid kinds: {', '.join(KINDS)}")
    for dotted in flat:
        if KIND_ONLY.get(dotted, kind) != kind:
            raise RecipeError(f"{where}: {dotted} does not apply to a {kind} recipe", f"remove it (it is a {KIND_ONLY[dotted]} setting)")
    if "name" not in flat:
        raise RecipeError(f"{where}: missing name", 'add e.g. name = "qwen3-reranker-0.6b"')
    if not NAME_RE.match(flat["name"]):
        raise RecipeError(f"{where}: name {flat['name']!r} must be letters, digits, '.', '_' or '-'", "it names the output directory")

    sections = {}
    for section, cls in SECTIONS.items():
        values = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(section + ".")}
        sections[section] = cls(**values)
    recipe = Recipe(name=flat["name"], kind=kind, instruction=flat.get("instruction"), **sections)
    recipe = _fill_kind_defaults(recipe, {k for k in flat})
    recipe = _resolve_paths(recipe, base_dir)
    _check_values(recipe, where)
    return recipe


def _fill_kind_defaults(recipe: Recipe, given: set[str]) -> Recipe:
    artifacts, gates, verify, quantization = recipe.artifacts, recipe.gates, recipe.verify, recipe.quantization
    instruction = recipe.instruction
    if recipe.kind == "reranker":
        from qwen_convert.reranker import DEFAULT_INSTRUCTION

        instruction = instruction if instruction is not None else DEFAULT_INSTRUCTION
        if "artifacts.onnx" not in given:
            artifacts = replace(artifacts, onnx=reranker_modes())
    else:
        artifacts = replace(artifacts, seqcls=False, onnx=artifacts.onnx if "artifacts.onnx" in given else CAUSAL_LM_MODES)
        if "gates.tol_logit" not in given:
            # fp32 ONNX against eager torch over a whole vocabulary: 1.7e-6 measured on the tiny LM;
            # a 28-layer model accumulates more over 150k logits, hence 1e-3 rather than 1e-4.
            gates = replace(gates, tol_logit=1e-3)
        if "verify.prompts" not in given:
            verify = replace(verify, prompts=DEFAULT_PROMPTS)
        if artifacts.exporter == "optimum" and "quantization.method" not in given:
            quantization = replace(quantization, method="naive")
    return replace(recipe, instruction=instruction, artifacts=artifacts, gates=gates, verify=verify, quantization=quantization)


def _resolve_paths(recipe: Recipe, base_dir: Path | None) -> Recipe:
    """Relative local paths are relative to the recipe file; stored absolute so a dumped recipe
    works from anywhere. qconv:NAME references stay as they are (they are location-free)."""
    def absolute(value: str | None) -> str | None:
        if value is None or value.startswith("qconv:") or base_dir is None:
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base_dir / p).resolve())

    source = replace(recipe.source, path=absolute(recipe.source.path))
    verify = replace(recipe.verify, pairs=absolute(recipe.verify.pairs))
    quantization = replace(recipe.quantization, calibration=absolute(recipe.quantization.calibration))
    return replace(recipe, source=source, verify=verify, quantization=quantization)


def _check_values(r: Recipe, where: str) -> None:
    s = r.source
    if not (s.path or s.modelscope or s.huggingface):
        raise RecipeError(f"{where}: [source] names no model", "set source.modelscope / source.huggingface (hub ids) or source.path")
    if s.hub not in HUBS:
        raise RecipeError(f"{where}: unknown source.hub {s.hub!r}", f"valid: {', '.join(HUBS)}")
    if s.hub == "modelscope" and not (s.modelscope or s.path):
        raise RecipeError(f"{where}: source.hub is modelscope but source.modelscope is unset", "set source.modelscope")
    if s.hub == "huggingface" and not (s.huggingface or s.path):
        raise RecipeError(f"{where}: source.hub is huggingface but source.huggingface is unset", "set source.huggingface")
    if r.artifacts.score_dtype not in SCORE_DTYPES:
        raise RecipeError(f"{where}: unknown artifacts.score_dtype {r.artifacts.score_dtype!r}", f"valid: {', '.join(SCORE_DTYPES)}")
    # A reranker may name "auto": the smallest variant that passes its gates (onnx/auto.py).
    valid_modes = (*reranker_modes(), "auto") if r.kind == "reranker" else reranker_modes()
    for mode in r.artifacts.onnx:
        if mode not in valid_modes:
            raise RecipeError(f"{where}: unknown ONNX mode {mode!r} in artifacts.onnx", f"valid for {r.kind}: {', '.join(valid_modes)}")
    if len(set(r.artifacts.onnx)) != len(r.artifacts.onnx):
        raise RecipeError(f"{where}: artifacts.onnx lists a mode twice", "list each mode once")
    # Variants built straight from the checkpoint (qwen_convert/onnx) are each gated against the torch
    # reference, so none needs the fp32 graph (the 8B's is ~30 GB). The optimum exporter traces fp32
    # and quantizes that graph.
    if r.kind == "causal-lm" and r.artifacts.exporter not in CAUSAL_EXPORTERS:
        raise RecipeError(f"{where}: unknown artifacts.exporter {r.artifacts.exporter!r}", f"valid: {', '.join(CAUSAL_EXPORTERS)}")
    optimum = r.kind == "causal-lm" and r.artifacts.exporter == "optimum"
    if optimum and r.artifacts.onnx and "fp32" not in r.artifacts.onnx:
        raise RecipeError(f"{where}: artifacts.onnx needs fp32 with artifacts.exporter = \"optimum\"",
                          "its variants are derived from the traced fp32 graph; add \"fp32\"")
    if optimum and r.quantization.method != "naive":
        raise RecipeError(f"{where}: quantization.method {r.quantization.method!r} needs artifacts.exporter = \"builder\"",
                          "set quantization.method = \"naive\" (onnxruntime's quantizers) or drop artifacts.exporter")
    if r.kind == "reranker" and not (r.artifacts.seqcls or r.artifacts.onnx):
        raise RecipeError(f"{where}: nothing to build", "set artifacts.seqcls = true or list artifacts.onnx modes")
    if r.kind == "causal-lm" and not r.artifacts.onnx:
        raise RecipeError(f"{where}: nothing to build", 'list artifacts.onnx modes, e.g. ["fp32", "q4f16"]')
    from qwen_convert.onnx.calibration import METHODS

    if r.quantization.method not in METHODS:
        raise RecipeError(f"{where}: unknown quantization.method {r.quantization.method!r}", f"valid: {', '.join(METHODS)}")
    if r.quantization.calibration is not None and r.quantization.method == "naive":
        raise RecipeError(f"{where}: quantization.calibration is set but quantization.method is naive", "drop one of them")
    b = r.quantization.block_size
    if b < 16 or b & (b - 1):
        raise RecipeError(f"{where}: quantization.block_size must be a power of two >= 16, got {b}", "use 32 (default), 64 or 128")
    g = r.gates
    for name in ("tol_logit", "tol_fp16"):
        if getattr(g, name) <= 0:
            raise RecipeError(f"{where}: gates.{name} must be > 0, got {getattr(g, name)}", "a tolerance is a positive |Δlogit|")
    for name in ("min_retention", "min_token_agreement", "max_prob_drift", "p95_prob_drift", "min_kendall_tau"):
        if getattr(g, name) is not None and not 0 <= getattr(g, name) <= 1:
            raise RecipeError(f"{where}: gates.{name} must be between 0 and 1, got {getattr(g, name)}", "it is a fraction")
    v = r.verify
    if v.max_length < 64 or v.batch_size < 1 or v.max_new_tokens < 1:
        raise RecipeError(f"{where}: verify.max_length >= 64, verify.batch_size >= 1 and verify.max_new_tokens >= 1 are required", "fix [verify]")
    from qwen_convert.verify import PADDING_CHECKS

    if v.padding_check not in PADDING_CHECKS:
        raise RecipeError(f"{where}: verify.padding_check must be probe or full, got {v.padding_check!r}", "fix [verify]")
    if r.kind == "causal-lm" and not v.prompts:
        raise RecipeError(f"{where}: verify.prompts is empty", "give at least one prompt")


# --- dumping ------------------------------------------------------------------------------------

def _lists(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _lists(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_lists(v) for v in data]
    return data


def _drop_none(data: dict) -> dict:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in data.items() if v is not None}


def _pop(data: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        data = data[p]
    data.pop(last, None)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict) -> str:
    """TOML for a one-level recipe dict (scalars first, then one [table] per section)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def fingerprint(data: Any) -> str:
    """sha256 of the canonical JSON of `data`: the key under which a step's result is reused."""
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
