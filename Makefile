# The two commands of the README:  make demo  (the CPU-scale job)  and  make test  (the test suite; make test-fast
# skips the slow tests).
# Both create the virtual environment (.venv) and fetch the offline dataset when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := data/FashionMNIST/raw/train-images-idx3-ubyte

.PHONY: demo full test test-fast venv data clean-venv

venv: $(STAMP)
$(STAMP): pyproject.toml requirements.txt requirements-dev.txt requirements-ray.txt requirements-flower.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements-dev.txt  # the project itself (pip install -e .[dev]): torch and torchvision together
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

data: $(FMNIST)
$(FMNIST):
	bash scripts/fetch_fashion_mnist.sh data

# The CPU-scale reproduction (under 20 minutes on 2 cores): 5 burn-ins x 2 seeds of the rows the papers' claims
# need, the claims with 95 % intervals, the per-row table, and the check against the published runs (docs/results/cpu).
demo: $(STAMP) $(FMNIST)
	$(PY) reproduce.py --preset cpu

# Every row of the table on the same replicates (reuses demo's burn-ins; about 20 more minutes).
full: $(STAMP) $(FMNIST)
	$(PY) reproduce.py --preset cpu_full

test: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q tests

# The quick subset for iterating: everything but the tests marked slow (subprocesses, drivers, torchrun, Ray).
test-fast: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
