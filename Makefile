# The two commands of the README:  make demo  (the CPU-scale job)  and  make test  (the test suite).
# Both create the virtual environment (.venv) and fetch the offline dataset when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := data/FashionMNIST/raw/train-images-idx3-ubyte
CKPT   ?= checkpoints/fashion-mnist_cnn
EPOCHS ?= 10

.PHONY: demo test venv data clean-venv

venv: $(STAMP)
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements-dev.txt
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

data: $(FMNIST)
$(FMNIST):
	bash scripts/fetch_fashion_mnist.sh data

# CPU scale: burn-in of the small CNN on real Fashion-MNIST (resumed if interrupted, skipped if done),
# then the online phase under accumulative poisoning with standard training.
demo: $(STAMP) $(FMNIST)
	@if [ -f $(CKPT)/last.pth ]; then resume=--resume; else resume=; fi; \
	$(PY) train_cifar.py --dataset fashion-mnist --arch cnn --epochs $(EPOCHS) --save_freq 5 \
	    --outf $(CKPT) --device cpu $$resume
	PY=$(PY) CKPT=$(CKPT) MODEL=epoch$(EPOCHS).pth DEVICE=cpu OUT=runs/demo_st EXTRA="--overwrite" bash run_st.sh

test: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
