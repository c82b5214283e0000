# Two commands on a fresh machine with only Python >= 3.11:
#   make demo   -- the main job on embedded (simulated) data
#   make test   -- the test suite
# Each creates .venv and installs what is missing; a second run installs nothing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cellvi-installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/bootstrap.sh
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cellvi.demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output .pytest_cache
