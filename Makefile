# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint audit redis clean

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

# Main job: train on the embedded Scientific-mm dataset (SASRec -> tokenizer -> generative model,
# quick profile) unless a bundle exists, export it, serve it with an embedded Redis.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: install redis
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy deploy/docker/requirements.py deploy/loadtest scripts/audit_deps.py
	$(BIN)/hadolint --config deploy/docker/hadolint.yaml Dockerfile

# Known vulnerabilities in the installed dependencies, from the package index's advisories (its
# JSON API; .ci/run runs it after the tests); see docs/RELIABILITY.md.
audit: install
	$(PY) scripts/audit_deps.py --json .cache/audit.json

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
