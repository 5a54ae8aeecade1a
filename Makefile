# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Dependencies are installed from a lock file with --no-deps so that pip never
# pulls a CUDA build of torch (backpack-for-pytorch declares torchvision, which
# would drag one in; nothing here imports torchvision).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-scaling bench-realsize clean

$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/dev.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/regression_example.py

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check laplace tests examples benchmarks
	$(VENV)/bin/ruff format --check laplace tests examples benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix laplace tests examples benchmarks
	$(VENV)/bin/ruff format laplace tests examples benchmarks

# The benchmarks compare with laplace-torch 0.3 when COMPARE names an interpreter
# that has it (benchmarks/README.md): make bench COMPARE=/tmp/lt/bin/python
BENCH_COMPARE = $(if $(COMPARE),--compare $(COMPARE))

bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_COMPARE)

# cost curves; writes docs/img/scaling_*.png and the tables of docs/scaling.md
bench-scaling: $(STAMP)
	$(PY) benchmarks/scaling.py $(BENCH_COMPARE) --docs

# WideResNet-16-4 and MiniLM-L6 + LoRA; writes the table of benchmarks/README.md
bench-realsize: $(STAMP)
	$(PY) benchmarks/realsize.py $(BENCH_COMPARE) --readme

clean:
	rm -rf $(VENV) build *.egg-info
