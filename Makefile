# Fresh machine: `make install`, `make test`, `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip
RECIPE  ?= recipes/tiny.toml
OUT     ?= artifacts
SET     ?=
# The output directory of a recipe is named after it: recipes/qwen3-reranker-8b.toml -> artifacts/qwen3-reranker-8b.
NAME    := $(basename $(notdir $(RECIPE)))

.PHONY: install test demo bench bench-onnx artifacts clean js

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

# ~30 min and ~10 GB RAM on 2 cores: exports and scores a real-shaped 0.6B checkpoint.
bench-onnx: install
	$(BIN)/python benchmarks/bench_onnx.py

# ~30 min (~10 GB once, for the traced export kept in benchmarks/.work/): CPU scoring of the graph
# builder's five variants vs the optimum-traced ones and torch bf16, 0.6B shape, batch 8x256, 2 threads.
.PHONY: bench-onnx-speed
bench-onnx-speed: install
	flock /tmp/qconv-heavy.lock $(BIN)/python benchmarks/bench_onnx_speed.py

bench-verify: install
	flock /tmp/qconv-heavy.lock $(BIN)/python benchmarks/bench_verify.py

# `make artifacts RECIPE=recipes/qwen3-reranker-0.6b.toml [SET="source.hub=huggingface ..."]`: what the
# artifacts workflow (.github/workflows/artifacts.yml) runs; exit 1 if a gate fails.
artifacts: install
	$(BIN)/qconv run $(RECIPE) --out $(OUT)/$(NAME) $(foreach kv,$(SET),--set '$(kv)')
	$(BIN)/qconv run --check $(OUT)/$(NAME)

# transformers.js for tests/test_transformersjs.py, exactly as tests/js/package-lock.json pins it (needs node >= 18
# and npm). ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's install script otherwise fetches CUDA binaries from
# nuget.org; its CPU build is in the npm package.
js: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json
	cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	@touch $@

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info .pytest_cache
