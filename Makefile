# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# Each creates (or reuses) .venv and installs what it needs. The venv sees system site-packages, so a
# CUDA build of torch that is already installed is reused; without CUDA, the CPU torch 2.13.0 goes first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

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

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
