# Everything runs from a fresh clone: `make demo` (main job) and `make test` (fast suite).
# `make demo` scores the first 1,000 test images (the subset in ../shared, the same table with
# the full CIFAR-10); `make demo ARGS="--bits 4"` passes more arguments to `adderquant reproduce`.
PYTHON ?= python3
ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
KERNELS := $(wildcard src/adderquant/*/csrc/*.c src/adderquant/*/csrc/*.h)

.PHONY: install demo test test-slow lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(KERNELS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/adderquant reproduce --limit 1000 $(ARGS)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/adder_layer.py

clean:
	rm -rf build src/*.egg-info src/adderquant/*/*.so $(VENV)
