# Two commands do all the set-up on a fresh machine:
#   make demo   start the broker (development defaults) in front of the demo server
#   make test   lint, type-check and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
CONFORMANCE = tests/conformance

.PHONY: demo test bench browser conformance clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The web pages are tested in Debian's Chromium; nothing downloads a browser.
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The MCP conformance suite and the Node 22 it needs (the npm package `node`,
# whose install script npm runs only because package.json allows it), at the
# versions package-lock.json pins. tests/test_conformance.py runs it.
conformance: $(CONFORMANCE)/node_modules/.installed

$(CONFORMANCE)/node_modules/.installed: $(CONFORMANCE)/package.json $(CONFORMANCE)/package-lock.json
	cd $(CONFORMANCE) && npm ci --no-audit --no-fund
	touch $@

demo: $(VENV)/.installed
	$(BIN)/broker check
	$(BIN)/broker serve

test: $(VENV)/.installed browser conformance
	$(BIN)/ruff check broker tests benchmarks
	$(BIN)/ruff format --check broker tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest

# BENCH_ARGS go to the targets benchmark: make bench BENCH_ARGS=--quick
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_calls.py
	$(BIN)/python benchmarks/bench_targets.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .broker-dev .pytest_cache .mypy_cache .ruff_cache \
		$(CONFORMANCE)/node_modules
