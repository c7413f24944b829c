# Two commands do all the set-up on a fresh machine (Python 3.11 + pip):
#   make quickstart   create .venv if missing, train autoencoder -> CLIP -> LDM on `shapes`, sample a grid
#   make test         create .venv if missing, install Chromium if missing (the eval report's browser test; as
#                     root with apt-get, else it stops and says how), run the test suite (all but the `heavy`
#                     marker; `make test-heavy` runs those)
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .venv-tools
VENV := .venv
PY := $(VENV)/bin/python
QS := outputs/quickstart
QS_ARGS ?=  # e.g. make quickstart QS=outputs/qs43 QS_ARGS="--seed 43" (a replicate)

.PHONY: quickstart test test-heavy env browser clean-quickstart

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(TOOLS)/bin/uv
	$(TOOLS)/bin/uv sync --frozen --extra test --python $(PYTHON)
	touch $@

env: $(VENV)/.synced

# Chromium for tests/eval/test_report_browser.py: Debian's `chromium` package, installed non-interactively
# (CI runs as root with no stdin); without root (or passwordless sudo) a missing browser stops `make test`
# with the command to run, and LDMKIT_REQUIRE_BROWSER=1 makes the test fail rather than skip.
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "make test: the eval report's browser test needs Chromium, which is not installed, and installing it" \
	  "needs root. Run: sudo apt-get install -y chromium (Debian/Ubuntu; elsewhere your system's chromium" \
	  "package), then make test again." >&2; exit 1; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "make test: Chromium is not installed and there is no" \
	  "apt-get here; install chromium with this system's package manager, then make test again." >&2; exit 1; fi; \
	echo "make test: installing Chromium (apt-get install chromium) for the eval report's browser test"; \
	$$sudo env $(APT_INSTALL) chromium </dev/null || { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null \
	  && $$sudo env $(APT_INSTALL) chromium </dev/null; } || { echo "make test: installing Chromium failed" \
	  "(apt-get output above)." >&2; exit 1; }; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { echo "make test:" \
	  "apt-get installed chromium but no chromium command is on PATH." >&2; exit 1; }

test: env browser
	LDMKIT_REQUIRE_BROWSER=1 $(PY) -m pytest -q -m "not heavy"

test-heavy: env
	$(PY) -m pytest -q -m heavy

quickstart: env
	$(PY) -m ldmkit.cli.quickstart --out $(QS) $(QS_ARGS)

clean-quickstart:
	rm -rf $(QS)
