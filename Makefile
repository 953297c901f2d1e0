# Two entry points for people: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/lw-embed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/lw-embed
	$(BIN)/python examples/demo.py

test: $(BIN)/lw-embed
	$(BIN)/ruff check lw_embed tests bench entrypoints examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/lw-embed
	$(BIN)/ruff check lw_embed tests bench entrypoints examples
	$(BIN)/mypy

bench: $(BIN)/lw-embed
	$(BIN)/python bench/tracer_overhead.py
	$(BIN)/python bench/pipeline_bench.py
	$(BIN)/python bench/ingest_bench.py

clean:
	rm -rf $(VENV) demo-out
