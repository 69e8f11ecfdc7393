# Fresh machine: `make install`, `make test`, `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip
RECIPE  ?= recipes/tiny.toml
OUT     ?= artifacts

.PHONY: install test demo bench artifacts clean

install: $(BIN)/qconv

$(BIN)/qconv: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	@touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/qconv seqcls qconv:tiny-reranker $(OUT)/demo-seqcls --force
	$(BIN)/qconv verify qconv:tiny-reranker $(OUT)/demo-seqcls

bench: install
	$(BIN)/python benchmarks/bench_seqcls.py

artifacts: install
	$(BIN)/qconv run $(RECIPE) --out $(OUT)

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info .pytest_cache
