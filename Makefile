# Two commands on a fresh machine: `make bench` (the report) and `make test` (the tests).
# Each creates .venv when it is missing. `make gpu-check` runs on the GPU machine from the checkout
# as it lies (no registry there): PYTHONPATH=., the CUDA extension built in place with ninja.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test bench validate gpu-wheels gpu-check clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	AUDIOMAE_BUILD_CUDA=0 $(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m audiomae bench --out bench-out

validate: $(STAMP)
	$(PY) -m audiomae validate

# The GPU machine has no registry and lacks soundfile (the training benchmark's audio I/O):
# `make gpu-wheels` fetches its wheels here into .whl/ (git-ignored; carry it), and gpu-check
# installs whatever lies in .whl/ into a private folder first.
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl soundfile cffi pycparser

gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then \
	  python3 -m pip install -q --no-index --no-deps --no-compile --target .whl/site .whl/*.whl; fi
	PYTHONPATH=.:.whl/site python3 benches/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info bench-out
