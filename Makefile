# Two commands do all the set-up on a fresh machine:
#   make demo   - build .venv if needed, then run the main job on the built-in world (local Ray, CPU)
#   make test   - build .venv if needed, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU-only machine gets the CPU torch wheel; a GPU node lets pip pick the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS ?= test

.PHONY: setup demo test test-fast clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),)
	$(PY) -m pip install -q "torch==2.13.0"
endif
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

demo: setup
	$(PY) -m pipelines.demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
