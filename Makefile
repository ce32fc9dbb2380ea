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
# Small CPU settings for the demo: 120 train and 40 test synthetic patients at 128 px,
# 16x96x96 volumes for pretraining, 32x96x96 for fine-tuning, a tiny timm backbone. The
# notebooks' defaults are the paper's settings.
DEMO_SYNTHETIC ?= --train-patients 120 --test-patients 40 --image-size 128 --min-slices 40 \
	--max-slices 56 --workers $(WORKERS)
DEMO_SHAPES ?= [[16, 96, 96], [32, 96, 96]]
# Notebook 02's and 03's demo settings as YAML mappings, shared with `make experiments`.
DEMO_BACKBONE ?= test_efficientnet
DEMO_PRETRAIN_PARAMS ?= {volume_shape: [16, 96, 96], crop_size: 32, hidden_dim: 256, \
	out_dim: 256, steps: 150, batch_size: 8, lr: 0.001, warmup_steps: 10, probe_every: 50, \
	checkpoint_every: 50, n_probe_volumes: 8, num_workers: 0}
# 12 slices, 40 epochs and a slice loss weight of 0.3 (docs/demo-data.md; trials in CHANGELOG.md):
# 16 slices for 30 epochs left the kidney at CV AUC 0.68, 20 epochs left kidney and spleen at chance.
DEMO_FINETUNE_PARAMS ?= {shape: [32, 96, 96], hidden_size: 64, num_layers: 1, pooling: max, \
	n_slices: 12, image_size: 96, epochs: 40, batch_size: 8, lr: 0.001, affine_prob: 0.5, \
	brightness_contrast_prob: 0, coarse_dropout_prob: 0, slice_loss_weight: 0.3, num_workers: 0}
# Notebook 06 on the demo: the fine-tuning cache seen at 32x64x64, a 4-level U-Net, 30 epochs
# (held-out Dice >= 0.83 for liver, spleen and kidneys: README, Notebook 06).
DEMO_SEGMENT_PARAMS ?= {shape: [32, 96, 96], input_shape: [32, 64, 64], \
	channels: [8, 16, 32, 64], epochs: 30, batch_size: 2, lr: 0.002}
DEMO_PRETRAIN ?= -y "$(DEMO_PRETRAIN_PARAMS)" -p backbone $(DEMO_BACKBONE)
DEMO_FINETUNE ?= -y "$(DEMO_FINETUNE_PARAMS)" -p backbone $(DEMO_BACKBONE) -p init voco -p n_folds 3
PAPERMILL := $(PY) -m papermill --log-output --progress-bar

# Notebook 01 on the demo's training series into $(1)/cache (what is cached already is skipped).
demo_cache = $(PAPERMILL) notebooks/01_dicom_preprocess.ipynb $(1)/notebooks/01_dicom_preprocess.ipynb \
	-p data_root $(DEMO_DATA) -p split train -p output_dir $(1)/cache -p workers $(WORKERS) \
	-y 'shapes: $(DEMO_SHAPES)'

.PHONY: help install demo demo-data demo-organs test test-fast test-kaggle-versions \
	test-lowest-versions lint format \
	notebooks benchmark clean-demo kaggle-bundle gpu-bundle gpu-check experiments experiments-table2

help:
	@echo "make demo       whole pipeline on the synthetic demo data (outputs/demo/)"
	@echo "make demo-organs  after make demo: organ boxes (06), a kidney-crop run (03), 04 on both"
	@echo "make test       lint + the test suite (what CI runs)"
	@echo "make test-fast  the test suite without slow end-to-end runs"
	@echo "make test-kaggle-versions  the fast suite + offline notebook 04 on Kaggle's versions"
	@echo "make test-lowest-versions  the fast suite at pyproject.toml's lower bounds"
	@echo "make experiments  notebook 05's reduced grid on the demo data (outputs/experiments/)"
	@echo "make experiments-table2  the paper's Table 2 (multi- vs single-organ) on the demo data"
	@echo "make benchmark  decoding speed, notebook 01 per core and memory at scale, 2D vs 3D VoCo step"
	@echo "make format     ruff format + fix; make notebooks: re-pair .py -> .ipynb"
	@echo "make kaggle-bundle  dist/kaggle-bundle/: the offline install (both Pythons) + a kernel per step"
	@echo "make gpu-check  the short CUDA check (on a GPU machine with a gpu-bundle, see README)"

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_PACKAGES)
	$(PY) -m pip install -r requirements-dev.txt -e .
	touch $@

demo-data: install
	$(PY) -m kaggle_utils.demo $(DEMO_DATA) $(DEMO_SYNTHETIC)

demo: demo-data
	mkdir -p $(DEMO_OUT)/notebooks
	$(call demo_cache,$(DEMO_OUT))
	$(PAPERMILL) notebooks/02_voco2d_pretrain.ipynb $(DEMO_OUT)/notebooks/02_voco2d_pretrain.ipynb \
		-p cache_dir $(DEMO_OUT)/cache -p output_dir $(DEMO_OUT)/pretrain $(DEMO_PRETRAIN)
	$(PAPERMILL) notebooks/03_finetune_bilstm.ipynb $(DEMO_OUT)/notebooks/03_finetune_bilstm.ipynb \
		-p data_root $(DEMO_DATA) -p cache_dir $(DEMO_OUT)/cache -p output_dir $(DEMO_OUT)/finetune \
		-p encoder_file $(DEMO_OUT)/pretrain/encoder.pt $(DEMO_FINETUNE)
	$(PAPERMILL) notebooks/04_submission.ipynb $(DEMO_OUT)/notebooks/04_submission.ipynb \
		-p data_root $(DEMO_DATA) -p model_dir $(DEMO_OUT)/finetune -p output_csv $(DEMO_OUT)/submission.csv
	$(PY) -m kaggle_utils.demo.summary $(DEMO_OUT) $(DEMO_DATA)

# The organs on the demo, after `make demo` (its cache, encoder and whole-scan models): notebook
# 06's boxes, a kidney-crop run of notebook 03 (16x64x64 crops of the 32x96x96 cache, the
# demo's recipe otherwise), and notebook 04 on both runs: the kidney from the crop run, the rest
# from the whole scan (combine="organ"; docs/segmentation.md).
DEMO_CROP_PARAMS ?= {shape: [16, 64, 64], image_size: 64, crop_source_shape: [32, 96, 96]}
demo-organs: demo-data
	mkdir -p $(DEMO_OUT)/notebooks
	$(call demo_cache,$(DEMO_OUT))
	$(PAPERMILL) notebooks/06_organ_segmentation.ipynb $(DEMO_OUT)/notebooks/06_organ_segmentation.ipynb \
		-p data_root $(DEMO_DATA) -p cache_dir $(DEMO_OUT)/cache -p output_dir $(DEMO_OUT)/segmentation \
		-y "$(DEMO_SEGMENT_PARAMS)"
	$(PAPERMILL) notebooks/03_finetune_bilstm.ipynb $(DEMO_OUT)/notebooks/03_finetune_kidney.ipynb \
		-p data_root $(DEMO_DATA) -p cache_dir $(DEMO_OUT)/cache -p output_dir $(DEMO_OUT)/finetune-kidney \
		-p encoder_file $(DEMO_OUT)/pretrain/encoder.pt $(DEMO_FINETUNE) -y "$(DEMO_CROP_PARAMS)" \
		-p input kidney -p segmentation_dir $(DEMO_OUT)/segmentation -p crops_dir $(DEMO_OUT)/crops
	$(PAPERMILL) notebooks/04_submission.ipynb $(DEMO_OUT)/notebooks/04_submission_organs.ipynb \
		-p data_root $(DEMO_DATA) -y "model_dir: [$(DEMO_OUT)/finetune, $(DEMO_OUT)/finetune-kidney]" \
		-p output_csv $(DEMO_OUT)/submission_organs.csv

test: install lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# The fast suite and the offline notebook-04 test on Kaggle's package versions
# (constraints-kaggle.txt; this machine's torch linked in): .venv-kaggle/.
KAGGLE_VENV ?= .venv-kaggle
$(KAGGLE_VENV)/.installed: constraints-kaggle.txt requirements.txt requirements-dev.txt pyproject.toml | install
	$(PY) tests/kaggle_image.py $(KAGGLE_VENV) -- -r requirements-dev.txt -e .
	touch $@

test-kaggle-versions: $(KAGGLE_VENV)/.installed
	$(KAGGLE_VENV)/bin/python -m pytest -m "not slow" tests/
	$(KAGGLE_VENV)/bin/python -m pytest tests/test_kaggle_offline.py

# The fast suite at the lowest versions pyproject.toml allows (uv's lowest-direct resolution;
# this machine's torch): the lower bounds are what the code needs, not guesses. .venv-lowest/.
LOWEST_VENV ?= .venv-lowest
$(LOWEST_VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml | install
	$(PY) tests/kaggle_image.py --lowest $(LOWEST_VENV) -- -r requirements-dev.txt -e .
	touch $@

test-lowest-versions: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -m pytest -m "not slow" tests/

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

notebooks: install
	$(PY) -m jupytext --sync notebooks/*.py

# `make experiments`: notebook 05's reduced grid on the demo data, 2 CPU cores
# (docs/experiments.md). Its own cache and folder; a second call skips finished runs and resumes.
# The authors' recipe (EXPERIMENT_RECIPES: [official, project] adds this project's rows); the
# fine-tuning parameters are only the demo's CPU sizes, so each recipe sets everything else.
EXPERIMENT_OUT ?= outputs/experiments
EXPERIMENT_RECIPES ?= [official]
EXPERIMENT_FINETUNE_PARAMS ?= {shape: [32, 96, 96], n_slices: 12, image_size: 96, epochs: 40, \
	batch_size: 8, lr: 0.001, num_workers: 0}
EXPERIMENT_GRID ?= -y "presets: [table1, label_efficiency]" -y "backbones: [$(DEMO_BACKBONE)]" \
	-y "seeds: [0]" -y "fractions: [0.25, 1.0]" -p n_folds 3 -y "recipes: $(EXPERIMENT_RECIPES)" \
	-y "extra_dirs: [$(DEMO_DATA)/test_images]"
experiments: demo-data
	mkdir -p $(EXPERIMENT_OUT)/notebooks
	$(call demo_cache,$(EXPERIMENT_OUT))
	$(PAPERMILL) notebooks/05_experiments.ipynb $(EXPERIMENT_OUT)/notebooks/05_experiments.ipynb \
		-p data_root $(DEMO_DATA) -p cache_dir $(EXPERIMENT_OUT)/cache -p experiment_dir $(EXPERIMENT_OUT) \
		$(EXPERIMENT_GRID) -y 'pretrain_params: $(DEMO_PRETRAIN_PARAMS)' \
		-y 'finetune_params: $(EXPERIMENT_FINETUNE_PARAMS)'

# `make experiments-table2`: the paper's Table 2 on the demo data (docs/experiments.md): notebook
# 06's organ boxes, then multi- vs single-organ runs (liver, spleen, kidney crops of 16x64x64
# cut from the 32x96x96 cache), from scratch and with 2D-VoCo. Same folder as `make experiments`.
TABLE2_GRID ?= -y "presets: [table2]" -y "backbones: [$(DEMO_BACKBONE)]" -y "seeds: [0]" \
	-p n_folds 3 -y "organs: [liver, spleen, kidney]" \
	-y "crop_params: {shape: [16, 64, 64], image_size: 64}"
experiments-table2: demo-data
	mkdir -p $(EXPERIMENT_OUT)/notebooks
	$(call demo_cache,$(EXPERIMENT_OUT))
	$(PAPERMILL) notebooks/06_organ_segmentation.ipynb $(EXPERIMENT_OUT)/notebooks/06_organ_segmentation.ipynb \
		-p data_root $(DEMO_DATA) -p cache_dir $(EXPERIMENT_OUT)/cache \
		-p output_dir $(EXPERIMENT_OUT)/segmentation -y "$(DEMO_SEGMENT_PARAMS)"
	$(PAPERMILL) notebooks/05_experiments.ipynb $(EXPERIMENT_OUT)/notebooks/05_experiments_table2.ipynb \
		-p data_root $(DEMO_DATA) -p cache_dir $(EXPERIMENT_OUT)/cache -p experiment_dir $(EXPERIMENT_OUT) \
		-p segmentation_dir $(EXPERIMENT_OUT)/segmentation $(TABLE2_GRID) \
		-y 'pretrain_params: $(DEMO_PRETRAIN_PARAMS)' -y 'finetune_params: $(DEMO_FINETUNE_PARAMS)'

benchmark: install
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/preprocess.py --long 1727
	$(PY) benchmarks/pretrain_cost.py --bare

# The offline install for Kaggle and a kernel per step (README: Kaggle): dist/kaggle-bundle/.
# BUNDLE_ARGS e.g. --kaggle-user <you>, --shards 3, --python 3.14 (repeatable; default 3.12
# and 3.13), --not-preinstalled <names>.
BUNDLE_ARGS ?=
kaggle-bundle: install
	$(PY) -m kaggle_utils.bundle --output dist/kaggle-bundle $(BUNDLE_ARGS)

# A bundle for the CUDA machine this project borrows (no network; Python 3.12 with torch, timm,
# numpy, scipy, pandas, scikit-learn, matplotlib and tqdm): what `make gpu-check` installs
# there. Versions as Kaggle's; albumentations (and its 54 MB of OpenCV) left out: the check
# trains without augmentation, and inference never needs it.
GPU_PREINSTALLED ?= torch,torchvision,timm,numpy,scipy,pandas,scikit-learn,matplotlib,tqdm,pillow,packaging,pyyaml,typing-extensions,filelock,fsspec,jinja2,networkx,sympy,safetensors,huggingface-hub,requests,joblib,threadpoolctl,python-dateutil,six,pytz,tzdata,contourpy,cycler,fonttools,kiwisolver,pyparsing,markupsafe,mpmath,hf-xet,certifi,charset-normalizer,idna,urllib3
gpu-bundle: install
	$(PY) -m kaggle_utils.bundle --output dist/gpu-bundle --python 3.12 --no-kernels \
		--preinstalled $(GPU_PREINSTALLED) --exclude albumentations --extras notebooks --split-mb 56

# On the GPU machine: install dist/gpu-bundle offline, then the device choice, the real shapes
# (benchmarks/gpu_shapes.py), notebooks 01-04 on tiny demo data (fp16 and bf16 where the GPU has
# them, torchrun over NCCL) and the cost benchmark's CUDA path; one JSON report in
# $(GPU_CHECK_OUT)/report.json. Where each transfer is capped (64 MiB), send one part per call:
# `python3 benchmarks/gpu_check.py --install-part <part-1> && python3 benchmarks/gpu_check.py
# --steps device shapes`, then part 2 with `--steps notebooks cost` (docs/kaggle-and-colab.md).
GPU_CHECK_OUT ?= outputs/gpu-check
gpu-check:
	for part in dist/gpu-bundle/dataset/wheels/part-*; do \
		python3 benchmarks/gpu_check.py --install-part $$part || exit 1; done
	python3 benchmarks/gpu_check.py --output $(GPU_CHECK_OUT)

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_OUT)
