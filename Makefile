# Two commands on a fresh machine: `make bench` (the report) and `make test` (the tests).
# Each creates .venv when it is missing. `make gpu-check` runs on the GPU machine from the checkout
# as it lies (no registry there): PYTHONPATH=., the CUDA extension built in place with ninja.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test bench validate gpu-check clean

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

gpu-check:
	PYTHONPATH=. python3 benches/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info bench-out
