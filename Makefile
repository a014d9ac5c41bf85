# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN ?= runs/demo/sasrec

.PHONY: install demo test lint redis clean

# torch is pinned to the CPU build (a bare `torch` pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,serve,dev]'
	touch $@

install: $(STAMP)

redis:
	bash scripts/ensure_redis.sh

# Main job (grows with the project): train SASRec on the embedded Scientific-mm dataset and
# evaluate it with full ranking on the test split.
demo: install
	$(BIN)/bbqrec data stats
	$(BIN)/bbqrec train-sasrec --out $(DEMO_RUN) --config training/configs/sasrec.json
	$(BIN)/bbqrec evaluate --run $(DEMO_RUN) --split test

test: install redis
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
