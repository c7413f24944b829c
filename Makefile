# Two commands do all the set-up on a fresh machine (Python 3.11 + pip):
#   make quickstart   create .venv if missing, train autoencoder -> CLIP -> LDM on `shapes`, sample a grid
#   make test         create .venv if missing, run the test suite (all but the `heavy` marker; `make test-heavy` runs those)
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .venv-tools
VENV := .venv
PY := $(VENV)/bin/python
QS := outputs/quickstart

.PHONY: quickstart test test-heavy env clean-quickstart

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv sync --frozen --extra test --python $(PYTHON)
	touch $@

env: $(VENV)/.synced

test: env
	$(PY) -m pytest -q -m "not heavy"

test-heavy: env
	$(PY) -m pytest -q -m heavy

quickstart: env
	$(PY) -m ldmkit.cli.quickstart --out $(QS)

clean-quickstart:
	rm -rf $(QS)
