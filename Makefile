# Two commands matter: `make demo` (the main job) and `make test` (install, build, run the suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export MAX_JOBS ?= 2
# Short CI settings are passed through DEMO_ARGS; DATA points at a directory of Fashion-MNIST IDX files.
DATA ?= /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=
TOY_ARGS ?=

.PHONY: install build test demo demo-toy bench-cpu clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

$(VENV)/.built: $(VENV)/.installed setup.py $(wildcard csrc/*.cpp csrc/*.h) $(wildcard */__init__.py)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q -m "not gpu and not interp" tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m interp tests; rc=$$?; [ $$rc -eq 0 -o $$rc -eq 5 ]

# The main job: Fashion-MNIST -> drift-prep shards -> DALI loader -> demo preset on CPU -> samples + metrics.
demo: build
	$(PY) -m drift.demo --data $(DATA) --out outputs/demo $(DEMO_ARGS)

# The 2-D toy of the paper's Figs. 3-4 (about two minutes on 2 cores).
demo-toy: build
	$(VENV)/bin/drift-toy --out outputs/toy $(TOY_ARGS)

# CPU benchmark figures recorded in benchmarks/RESULTS.md.
bench-cpu: build
	$(PY) benchmarks/bench_field.py
	$(PY) benchmarks/bench_loader.py

clean:
	rm -rf build *.egg-info drift/_C*.so $(VENV)/.built
