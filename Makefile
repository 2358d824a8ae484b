# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# Each creates (or reuses) .venv and installs what it needs. The venv sees system site-packages, so a
# CUDA build of torch that is already installed is reused; without CUDA, the CPU torch 2.13.0 goes first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu-versions bench lint clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pruning demo

test: $(STAMP)
	$(PY) -m pytest -q

# The suite again under the GPU machine's torch 2.11, triton 3.6 and transformers 5.17 (GPU_NOTES.md), so that
# the kernels are lowered for sm_80/sm_90 by the triton that runs them there and the torch and HF glue meets
# the versions it runs with. torch 2.11.0 here is the CUDA build (the one the GPU machine has); it imports and
# runs on a CPU-only machine. numpy<2.4: triton 3.6's CPU interpreter cannot run loops under newer numpy
# (wanda_kernels/_runtime.py).
COMPAT_VENV ?= .venv-gpu-versions
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 'numpy<2.4'

test-gpu-versions:
	test -x $(COMPAT_PY) || $(PYTHON) -m venv --system-site-packages $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q -e '.[dev,eval]' $(COMPAT_PINS)
	$(COMPAT_PY) -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
	$(COMPAT_PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(COMPAT_VENV) *.egg-info .pytest_cache
