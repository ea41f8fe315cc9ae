# neumo: `make demo` runs the whole pipeline here; `make test` runs the tests. Both set up .venv.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
REGISTRY ?= ghcr.io/neumo-project
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
PYTEST_ARGS ?=

.PHONY: venv demo test compile clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=python3"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip check
	touch $@

venv: $(VENV)/.installed

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) pipelines/full.py --local --preset demo --workdir work/demo

test: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest $(PYTEST_ARGS)

compile: venv
	$(PY) pipelines/full.py --compile neumo-full.yaml --registry $(REGISTRY) --image-tag $(TAG)

clean:
	rm -rf work neumo-full.yaml .pytest_cache
