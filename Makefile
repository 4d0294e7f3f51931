# Two commands do all the set-up on a fresh machine:
#   make demo   start the broker (development defaults) in front of the demo server
#   make test   lint, type-check and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test bench browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The web pages are tested in Debian's Chromium; nothing downloads a browser.
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

demo: $(VENV)/.installed
	$(BIN)/broker check
	$(BIN)/broker serve

test: $(VENV)/.installed browser
	$(BIN)/ruff check broker tests benchmarks
	$(BIN)/ruff format --check broker tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_calls.py

clean:
	rm -rf $(VENV) .broker-dev .pytest_cache .mypy_cache .ruff_cache
