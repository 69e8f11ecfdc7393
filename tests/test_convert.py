"""`qconv seqcls`: parity against an independent causal reference, byte-exact copying, output contract,
refusals and interruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_convert.checkpoint.heads import read_reranker_tokens
from qwen_convert.checkpoint.safetensors_io import read_header
from qwen_convert.cli import app
from qwen_convert.reranker import PromptEncoder, format_prompt, load_tokenizer, open_tokenizer, reranker_tokens
from qwen_convert.scoring.probes import PROBE_PAIRS
from qwen_convert.seqcls.convert import ConvertOptions, convert_to_seqcls

PAIRS = [
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("What is the capital of China?", "Gravity is a force that attracts two bodies towards each other. " * 6),
    ("Explain gravity", "Gravity"),
    ("中国的首都是哪里？", "北京是中华人民共和国的首都，也是全国的政治和文化中心。"),
    ("how much protein should a female eat", "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day."),
]


def _torch():
    import torch

    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="session")
def converted(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """fixture name -> its seq-cls conversion (default options)."""
    root = tmp_path_factory.mktemp("seqcls")
    return {name: convert_to_seqcls(src, root / name).out for name, src in tiny_models.items()}


def reference_logits(src: Path, pairs=PAIRS) -> np.ndarray:
    """Independent of qconv's scoring code: each prompt alone (no padding) through the causal LM,
    full vocabulary logits at the last token, logit(yes) - logit(no)."""
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for q, d in pairs:
            ids = tok(format_prompt(q, d), return_tensors="pt", add_special_tokens=False).input_ids
            logits = model(input_ids=ids).logits[0, -1]
            out.append(float(logits[yes] - logits[no]))
    return np.array(out)


def padded_batch(tok, pairs, side: str):
    torch = _torch()
    rows = [tok(format_prompt(q, d), add_special_tokens=False).input_ids for q, d in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def test_seqcls_logits_match_causal_reference_on_padded_batches(tiny_model, tiny_models, converted):
    torch = _torch()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    name = next(k for k, v in tiny_models.items() if v == tiny_model)
    out = converted[name]
    ref = reference_logits(tiny_model)
    assert np.ptp(ref) > 0.05, "fixture logits too flat for a meaningful parity check"
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.config.num_labels == 1
    for side in ("left", "right"):
        ids, mask = padded_batch(tok, PAIRS, side)
        assert (mask == 0).any(), "batch must actually be padded"
        with torch.inference_mode():
            got = model(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()  # no position_ids
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{name} {side} padding")


def test_cross_encoder_returns_p_yes_by_default(tiny_models, converted):
    import torch
    from sentence_transformers import CrossEncoder

    for name in ("tied_fp32", "untied_bf16_sharded"):
        p_ref = 1 / (1 + np.exp(-reference_logits(tiny_models[name])))
        # fp32 weights load as fp32 either way; the bf16 checkpoint needs dtype=float32 for exact scores
        # (the card says so): transformers 5 loads with dtype="auto", the checkpoint's own dtype.
        model = CrossEncoder(str(converted[name]), device="cpu", model_kwargs={"dtype": torch.float32})
        got = model.predict(PAIRS, batch_size=8, show_progress_bar=False)
        np.testing.assert_allclose(got, p_ref, atol=1e-5, err_msg=name)
        default = CrossEncoder(str(converted[name]), device="cpu")
        got = default.predict(PAIRS, batch_size=8, show_progress_bar=False)
        np.testing.assert_allclose(got, p_ref, atol=1e-5 if name.endswith("fp32") else 2e-2, err_msg=f"{name} default dtype")


def test_template_renders_the_official_prompt(converted):
    import jinja2
    from transformers import AutoTokenizer

    out = converted["tied_fp32"]
    text = (out / "chat_template.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(str(out))
    for q, d in PAIRS:
        messages = [{"role": "query", "content": q}, {"role": "document", "content": d}]
        # Plain jinja2 with and without keep_trailing_newline, and transformers' own renderer (vLLM's path).
        for env in (jinja2.Environment(), jinja2.Environment(keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)):
            tmpl = env.from_string(text)
            assert tmpl.render(messages=messages) == format_prompt(q, d)
            assert tmpl.render(messages=messages, instruction="Find the code") == format_prompt(q, d, "Find the code")
            with_system = [{"role": "system", "content": "Judge medical relevance"}] + messages
            assert tmpl.render(messages=with_system) == format_prompt(q, d, "Judge medical relevance")
        assert tok.apply_chat_template(messages, tokenize=False) == format_prompt(q, d)


def test_output_contract(tiny_models, converted):
    for name, out in converted.items():
        cfg = json.loads((out / "config.json").read_text())
        tokens = reranker_tokens(load_tokenizer(tiny_models[name]))
        assert cfg["architectures"] == ["Qwen3ForSequenceClassification"]
        assert cfg["num_labels"] == 1 and cfg["id2label"] == {"0": "LABEL_0"} and cfg["label2id"] == {"LABEL_0": 0}
        assert cfg["pad_token_id"] == tokens.pad_id
        assert cfg["use_sep_token"] is False
        assert cfg["sentence_transformers"]["activation_fn"] == "torch.nn.modules.activation.Sigmoid"
        for key in ("method", "classifier_from_token", "is_original_qwen3_reranker", "problem_type"):
            assert key not in cfg
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (out / f).read_bytes() == (tiny_models[name] / f).read_bytes()
        card = (out / "README.md").read_text()
        assert f"vllm serve {name} --runner pooling --chat-template {name}/chat_template.jinja" in card
        assert f"yes = {tokens.yes_id}, no = {tokens.no_id}" in card
        assert ("tied embeddings" in card) == name.startswith("tied")
        assert "curl" in card and "CrossEncoder" in card
        assert not (out / "generation_config.json").exists()


def test_light_token_reader_agrees_with_transformers(tiny_models):
    for src in tiny_models.values():
        assert read_reranker_tokens(src) == reranker_tokens(load_tokenizer(src))


def test_scoring_tokenizer_gives_transformers_prompt_ids(tiny_models):
    """verify and score tokenize with tokenizer.json alone (open_tokenizer): every built-in probe, in
    both of its languages, truncated or not, must get the ids of transformers' AutoTokenizer."""
    for src in tiny_models.values():
        fast = open_tokenizer(src)
        assert type(fast).__name__ == "FastTokenizer"
        for max_length in (4096, 160):
            ours, theirs = PromptEncoder(fast, max_length=max_length), PromptEncoder(load_tokenizer(src), max_length=max_length)
            assert ours.tokens == theirs.tokens
            assert ours.batch_ids(PROBE_PAIRS) == [theirs.ids(p) for p in PROBE_PAIRS]
        assert any(theirs.truncated(p) for p in PROBE_PAIRS) and not all(theirs.truncated(p) for p in PROBE_PAIRS)


def _raw(info) -> bytes:
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def test_every_tensor_but_the_head_is_copied_byte_for_byte(tiny_models, converted):
    for name, src in tiny_models.items():
        out = converted[name]
        src_files = sorted(p.name for p in src.glob("*.safetensors"))
        out_files = sorted(p.name for p in out.glob("*.safetensors"))
        assert out_files == src_files, "same shard names"
        src_t = {k: v for p in src.glob("*.safetensors") for k, v in read_header(p).tensors.items()}
        out_t = {k: v for p in out.glob("*.safetensors") for k, v in read_header(p).tensors.items()}
        assert set(out_t) == (set(src_t) - {"lm_head.weight"}) | {"score.weight"}
        for k, info in src_t.items():
            if k == "lm_head.weight":
                continue
            assert (out_t[k].dtype, out_t[k].shape) == (info.dtype, info.shape), k
            assert _raw(out_t[k]) == _raw(info), k
        assert out_t["score.weight"].dtype == "F32" and out_t["score.weight"].shape == (1, 64)


def test_sharded_index_is_correct(converted):
    for name in ("tied_bf16_sharded", "untied_bf16_sharded"):
        out = converted[name]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        held = {k: p.name for p in out.glob("*.safetensors") for k in read_header(p).tensors}
        assert index["weight_map"] == held
        sizes = sum(t.nbytes for p in out.glob("*.safetensors") for t in read_header(p).tensors.values())
        assert index["metadata"]["total_size"] == sizes
    assert not (converted["tied_fp32"] / "model.safetensors.index.json").exists()


def test_score_head_is_yes_minus_no_in_fp32_and_dtype_option(tiny_models, tmp_path):
    torch = _torch()
    from safetensors.torch import load_file

    src = tiny_models["untied_bf16_sharded"]
    tokens = read_reranker_tokens(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    head = load_file(src / index["weight_map"]["lm_head.weight"])["lm_head.weight"].float()
    expected = (head[tokens.yes_id] - head[tokens.no_id]).unsqueeze(0)
    r = CliRunner().invoke(app, ["seqcls", str(src), str(tmp_path / "bf"), "--score-dtype", "bfloat16", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["score_dtype"] == "bfloat16"
    out = tmp_path / "bf"
    got = {k: v for p in out.glob("*.safetensors") for k, v in load_file(p).items()}["score.weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected.to(torch.bfloat16))
    fp32 = convert_to_seqcls(src, tmp_path / "fp", ConvertOptions(score_dtype="float32")).out
    got32 = {k: v for p in fp32.glob("*.safetensors") for k, v in load_file(p).items()}["score.weight"]
    assert got32.dtype == torch.float32 and torch.equal(got32, expected)


# --- refusals ---------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bad_inputs(tiny_models, converted, tmp_path):
    """(name, SRC, extra args, expected message fragment)."""
    good = tiny_models["tied_fp32"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    cases = [("missing", tmp_path / "nope", [], "does not exist")]
    f = tmp_path / "afile"
    f.write_text("x")
    cases.append(("file", f, [], "is not a directory"))
    d = tmp_path / "noconfig"
    d.mkdir()
    cases.append(("no config", d, [], "has no config.json"))
    llama = _copy(good, tmp_path / "llama")
    cfg = json.loads((llama / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (llama / "config.json").write_text(json.dumps(cfg))
    cases.append(("llama", llama, [], "is a LlamaForCausalLM model, not Qwen3"))
    cases.append(("seqcls", converted["tied_fp32"], [], "already a sequence-classification model"))
    badtok = _copy(good, tmp_path / "badtok")
    tj = json.loads((badtok / "tokenizer.json").read_text())
    tj["model"]["merges"] = [m for m in tj["model"]["merges"] if m != ["y", "es"]]  # "yes" now splits in two
    (badtok / "tokenizer.json").write_text(json.dumps(tj))
    cases.append(("tokenizer", badtok, [], 'does not encode "yes" as one real token'))
    pkl = _copy(good, tmp_path / "pickle")
    (pkl / "model.safetensors").rename(pkl / "pytorch_model.bin")
    cases.append(("pickle", pkl, [], "only pickle weights (pytorch_model.bin)"))
    trunc = _copy(good, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 1000])
    cases.append(("truncated", trunc, [], "model.safetensors: file is truncated"))
    corrupt = _copy(good, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(data[:8] + b"\xff" * 40 + data[48:])
    cases.append(("corrupt", corrupt, [], "corrupt safetensors header"))
    shard = _copy(tiny_models["untied_bf16_sharded"], tmp_path / "shard")
    (shard / "model-00002-of-00003.safetensors").unlink()
    cases.append(("missing shard", shard, [], "names shard model-00002-of-00003.safetensors, which is missing"))
    return cases


def test_bad_inputs_fail_with_one_line_and_leave_nothing(tiny_models, converted, tmp_path):
    runner = CliRunner()
    for name, src, extra, fragment in _bad_inputs(tiny_models, converted, tmp_path / "in"):
        out = tmp_path / "out" / name.replace(" ", "_")
        r = runner.invoke(app, ["seqcls", str(src), str(out), "--quiet", *extra])
        err = r.stderr.strip()
        assert r.exit_code == 1, (name, r.output)
        assert err.startswith("error: ") and fragment in err, (name, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in r.output, (name, err)
        assert "(" in err and err.endswith(")"), f"{name}: message lacks a hint: {err}"
        assert not out.exists(), name
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_output_dir_refusals(tiny_models, tmp_path):
    runner = CliRunner()
    src = str(tiny_models["tied_fp32"])
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["seqcls", src, str(out), "--quiet"])
    assert r.exit_code == 1 and "is not empty" in r.stderr and "--force" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = runner.invoke(app, ["seqcls", src, str(out), "--quiet", "--force"])
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root ignores permission bits; sysfs refuses new entries even to root.
        target = ro / "out" if not os.access(ro, os.W_OK) else Path("/sys/qconv-test-out")
        r = runner.invoke(app, ["seqcls", src, str(target), "--quiet"])
        assert r.exit_code == 1 and "cannot write to" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
        assert not target.exists()
    finally:
        ro.chmod(0o700)
    r = runner.invoke(app, ["seqcls", src, src, "--quiet", "--force"])
    assert r.exit_code == 1 and "is the source directory" in r.stderr


class _Interrupt:
    """A reporter that raises KeyboardInterrupt once some bytes have been written."""

    def __init__(self):
        self.seen = 0

    def task(self, description, total=None):
        outer = self

        class _T:
            def advance(self, n=1):
                outer.seen += n
                if outer.seen > 1000:
                    raise KeyboardInterrupt

        return _T()

    def log(self, message):
        pass


def test_keyboard_interrupt_mid_copy_leaves_no_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_to_seqcls(tiny_models["untied_bf16_sharded"], out, reporter=_Interrupt())
    assert list(tmp_path.iterdir()) == []


SLOW_CHILD = r"""
import signal, sys, time
# Ctrl-C as a shell delivers it, whatever the test runner left to its children: an ignored or blocked
# SIGINT is inherited through fork and exec (in the full suite the child never saw the signal).
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
from qwen_convert.seqcls.convert import convert_to_seqcls
class R:
    def task(self, d, total=None):
        class T:
            def advance(self, n=1):
                print("copying", flush=True)
                time.sleep(60)
        return T()
    def log(self, m): pass
convert_to_seqcls(sys.argv[1], sys.argv[2], reporter=R())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_process_leaves_no_output(tiny_models, tmp_path, sig):
    out = tmp_path / "out"
    # The child's stderr goes to a file, not a pipe nobody reads: a pipe that fills blocks the child's
    # exit (it failed twice under heavy load with a pipe), and the file says why on a timeout.
    log = tmp_path.parent / f"{tmp_path.name}.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(tiny_models["tied_fp32"]), str(out)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout.readline().strip() == "copying"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.qconv-tmp-")], "copy had started"
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the child did not exit 60 s after signal {sig}; its stderr:\n{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    if sig == signal.SIGINT:
        assert list(tmp_path.iterdir()) == [], "Ctrl-C cleans its temporary directory"
    # After a hard kill the next run removes the stale temporary sibling.
    convert_to_seqcls(tiny_models["tied_fp32"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
