# The index of what can be run. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed into the venv before requirements.txt, which leaves torch unpinned so Kaggle and
# Colab keep their own build. On this project's CPU machines pip takes this pair from the local
# disk; override elsewhere, e.g. `make TORCH_PACKAGES="torch torchvision" test`.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
DEMO_DATA ?= inputs/demo-rsna
DEMO_OUT ?= outputs/demo
WORKERS ?= 2
PAPERMILL := $(PY) -m papermill --log-output --progress-bar

.PHONY: help install demo demo-data test test-fast lint format notebooks benchmark clean-demo

help:
	@echo "make demo       whole pipeline on the synthetic demo data (outputs/demo/)"
	@echo "make test       lint + the test suite (what CI runs)"
	@echo "make test-fast  the test suite without slow end-to-end runs"
	@echo "make benchmark  decoding speed against plain pydicom (numbers for the README)"
	@echo "make format     ruff format + fix; make notebooks: re-pair .py -> .ipynb"

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_PACKAGES)
	$(PY) -m pip install -r requirements-dev.txt -e .
	touch $@

demo-data: install
	$(PY) -m kaggle_utils.synthetic $(DEMO_DATA)

demo: demo-data
	mkdir -p $(DEMO_OUT)/notebooks
	$(PAPERMILL) notebooks/01_dicom_preprocess.ipynb $(DEMO_OUT)/notebooks/01_dicom_preprocess.ipynb \
		-p data_root $(DEMO_DATA) -p split train -p output_dir $(DEMO_OUT)/cache -p workers $(WORKERS)
	@echo "demo: cached volumes and montages in $(DEMO_OUT)/cache, executed notebook in $(DEMO_OUT)/notebooks"

test: install lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

notebooks: install
	$(PY) -m jupytext --sync notebooks/*.py

benchmark: install
	$(PY) benchmarks/decode.py

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_OUT)
