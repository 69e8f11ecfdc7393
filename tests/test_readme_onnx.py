"""README.md's ONNX section against the code it describes: its commands parse to the ExportOptions
they claim, its variants table names the files the exporter writes (and transformers.js looks for),
its sizes agree with the graphs' parameter counts, and "which recipes make which" is what the
recipe files say. No model is built: the exports themselves are tested in test_export_onnx.py."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen_convert.cli import app
from qwen_convert.formats import QuantMode
from qwen_convert.onnx import export as export_module
from qwen_convert.onnx.export import ExportOptions
from qwen_convert.pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DTYPES_JS = ROOT / "tests" / "js" / "node_modules" / "@huggingface" / "transformers" / "src" / "utils" / "dtypes.js"
MODES = tuple(m.value for m in QuantMode)
runner = CliRunner()


def _section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## ONNX export (`qconv export-onnx`)")
    return text[start:text.index("\n## ", start + 1)]


def _commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", _section(), re.S).group(1)
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.startswith("qconv export-onnx")]


def _bullet(title: str) -> str:
    """The text of the README bullet `- **title**...`, lines joined."""
    section = _section()
    start = section.index(f"- **{title}")
    end = section.find("\n- **", start + 1)
    return " ".join(section[start:end if end != -1 else None].split())


def _table() -> dict[str, list[str]]:
    rows = [ln.strip() for ln in _section().splitlines() if ln.strip().startswith("| ") and "`model" in ln]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return {c[0]: c[1:] for c in cells}


@dataclass
class _Result:
    passed: bool = True

    def to_dict(self) -> dict:
        return {}

    def render(self) -> str:
        return "ok"


def _options(monkeypatch, command: str) -> ExportOptions:
    """What `qconv export-onnx` hands the library for a README line (the export itself not run)."""
    seen: list[ExportOptions] = []
    monkeypatch.setattr(export_module, "export_onnx", lambda src, out, options, reporter=None: seen.append(options) or _Result())
    argv = shlex.split(command)
    assert argv[:2] == ["qconv", "export-onnx"]
    result = runner.invoke(app, argv[1:])
    assert result.exit_code == 0, (command, result.output)
    (options,) = seen
    return options


def test_readme_commands_parse_to_the_options_they_describe(monkeypatch):
    commands = _commands()
    assert len(commands) == 4, commands
    tiny_all, seqcls, big, traced = (_options(monkeypatch, c) for c in commands)
    assert (tiny_all.exporter, tiny_all.fp32, tiny_all.modes, tiny_all.verify) == ("builder", True, ("all",), True)
    assert seqcls.reference == "Qwen/Qwen3-Reranker-0.6B" and seqcls.modes == ("q4f16",)
    # The big-model line writes no fp32 graph and exactly the 4B/8B recipes' variants.
    assert big.fp32 is False and big.modes == load_recipe(RECIPES / "qwen3-reranker-8b.toml").artifacts.onnx
    assert traced.exporter == "optimum" and traced.modes == ("all",)


def test_readme_names_the_default_exporter():
    text = _bullet("Exporter.")
    default = re.search(r"`--exporter (\w+)` \(the default", text).group(1)
    assert default == ExportOptions().exporter == "builder"
    result = runner.invoke(app, ["export-onnx", "--help"])
    assert result.exit_code == 0
    for flag in ("--exporter", "--no-fp32", "--keep-embedding", "--per-channel", "--block-size"):
        assert flag in _section() and flag in result.output, flag


def test_variant_table_names_the_exporters_files():
    table = _table()
    assert tuple(table) == MODES
    for mode, (file, _dtype, what, *_sizes) in table.items():
        assert file == f"`{QuantMode(mode).file_name}`", mode
    assert "DynamicQuantizeMatMul" in table["int8"][2] and "MatMulNBits" in table["q4"][2]


def test_variant_table_dtypes_are_transformersjs_own_file_suffixes():
    """The dtype column, looked up in transformers.js' DEFAULT_DTYPE_SUFFIX_MAPPING, gives the file column."""
    if not DTYPES_JS.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but transformers.js is not installed (run `make js`)")
        pytest.skip("transformers.js not installed (`make js`)")
    mapping = re.search(r"DEFAULT_DTYPE_SUFFIX_MAPPING = Object\.freeze\(\{(.*?)\}\)", DTYPES_JS.read_text(), re.S).group(1)
    suffix = dict(re.findall(r"\[DATA_TYPES\.(\w+)\]:\s*'([^']*)'", mapping))
    for mode, (file, dtype, *_rest) in _table().items():
        assert file == f"`model{suffix[dtype]}.onnx`", (mode, dtype)


# The published configs (hidden, intermediate, layers, heads, kv heads, head_dim); vocab 151669.
# The graph holds the embedding, the layers and one score row: no lm_head, tied or not.
SHAPES = {"0.6B": (1024, 3072, 28, 16, 8, 128), "4B": (2560, 9728, 36, 32, 8, 128), "8B": (4096, 12288, 36, 32, 8, 128)}
VOCAB = 151669
# Bytes per parameter of each encoding (q4: half a byte plus one scale per 32-weight block).
BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "q4": 0.5 + 4 / 32, "q4f16": 0.5 + 2 / 32}


def _graph_params(hidden, intermediate, layers, heads, kv_heads, head_dim) -> int:
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    return VOCAB * hidden + layers * (attention + 3 * hidden * intermediate)


def test_variant_sizes_follow_from_the_parameter_counts():
    """The table's figures (0.6B measured) within 5% of parameters x bytes per parameter."""
    table = _table()
    for col, size in enumerate(SHAPES):
        params = _graph_params(*SHAPES[size])
        for mode, cells in table.items():
            shown = float(re.fullmatch(r"~?([\d.]+) GB", cells[3 + col]).group(1))
            expected = params * BYTES[mode] / 1e9
            assert abs(shown - expected) <= 0.05 * expected, (size, mode, shown, round(expected, 2))


def test_which_recipes_make_which_is_what_the_recipe_files_say():
    text = _bullet("Which recipes make which.")
    claimed: dict[str, tuple[str, ...]] = {}
    for sentence in re.split(r"(?<=\.) (?=`recipes/|The )", text):
        names = re.findall(r"`recipes/([\w.-]+)\.toml`", sentence.split(":")[0])
        listed = sentence.split(":", 1)[1]
        modes = MODES if "all five" in listed else tuple(m for m in MODES if re.search(rf"\b{m}\b", listed.split(",  ")[0].split(" the ")[0]))
        if "query-expansion recipes" in sentence:
            names = [p.stem for p in RECIPES.glob("*query-expansion.toml")]
        for name in names:
            claimed[name] = modes
    assert set(claimed) == {p.stem for p in RECIPES.glob("*.toml")}, claimed
    for name, modes in claimed.items():
        assert load_recipe(RECIPES / f"{name}.toml").artifacts.onnx == modes, name
