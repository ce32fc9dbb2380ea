# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · 2D-VoCo self-supervised pretraining
#
# Organs sit in consistent places, so where a random crop lies relative to a grid of base
# crops is a label-free target. For each cached volume (32 × 192 × 192) the encoder embeds a
# 3 × 3 grid of 64 × 64 base crops and a few random crops of the same size; the cosine
# between a random crop and base *i* is trained towards their overlap (intra loss), the same
# similarities across two volumes follow the EMA teacher's (inter loss), and the bases are
# pushed apart (regularisation). The student's backbone is exported for fine-tuning
# (notebook 03).
#
# `recipe` sets every choice at once: "project" (the default, this project's) or "official"
# (the authors' code: ImageNet init, AMSGrad, weight decay on every parameter). A parameter
# given explicitly wins; one left as None takes the recipe's value (docs/method.md tables
# every setting: paper, official code, both recipes). With `holdout` and `data_root`, the
# patients notebook 03 holds out with the same `holdout` and `fold_seed` are left out of
# pretraining, so a comparison on them is fair; `volumes.parquet` lists what was used.
#
# Runs resume exactly from `output_dir/checkpoint.pt`; `launch="torchrun"` uses every GPU.
# `time_limit_s` ends a session cleanly; on Kaggle the next session starts with an empty
# `/kaggle/working`, so attach the stopped run's output and pass it as `resume_from`.

# %% tags=["parameters"]
recipe: str = "project"  # "project" (this project's) or "official" (the authors' code); below
cache_dir = ""  # type: list|str  notebook 01's cache, or a list of caches/globs; "": outputs/cache
volume_shape: list = [32, 192, 192]  # cached (slices, H, W) to pretrain on
extra_dirs: list = []  # folders of extra unlabeled CT (NIfTI files, DICOM series), e.g. FLARE23
output_dir: str = ""  # run folder; empty: outputs/pretrain (/kaggle/working/pretrain)
# None takes the recipe's value (project / official); docs/method.md tables them all
data_root: str = ""  # competition folder with train.csv: only needed with holdout
holdout: float = 0.0  # notebook 03's held-out share: those patients are left out of pretraining
fold_seed: int = -1  # notebook 03's fold_seed (-1: seed); with holdout, the same patients
exclude_patients: list = []  # more patients to leave out (e.g. a fixed test list)
backbone: str = None  # timm name; None: efficientnetv2_rw_t (the paper) / _rw_s (the code)
init: str = None  # "imagenet", "auto" (ImageNet where found) or "random"; None: auto / imagenet
weights_file: str = ""  # ImageNet weights: file or timm/HF folder; empty: found on Kaggle inputs
grid: int = 3  # base crops per side
crop_size: int = 64  # base and random crop size in pixels
n_random: int = 2  # random crops per volume and step
label_mode: str = "area"  # position labels: "area" (VoCo's code) or "iou" (2D-VoCo paper)
slice_mode: str = "average"  # "average" (embedding over a crop's slices) or "per_slice"
projector_input: str = "flatten"  # "flatten" (feature map, official code) or "pooled"
hidden_dim: int = 2048  # projector hidden width
feature_dropout: float = 0.2  # on the student's features (official code); 0: teacher lags only
feature_dropout_at: str = "slice"  # "slice" (each slice, before the mean: official) or "mean"
teacher_head: str = "trained"  # "trained" (its own projector: official) or "ema" (all EMA)
projector_norm: str = "crops"  # projector BatchNorm over "crops" (official) or "features"
out_dim: int = 2048  # projector output width
momentum: float = 0.9  # teacher EMA momentum
momentum_end: float = 0.0  # cosine ramp of the momentum to this value; 0 keeps it constant
intra_form: str = "voco_code"  # "voco_code" or "paper"
inter_form: str = "voco_code"  # "voco_code" (official code, teacher-weighted) or "paper"
reg_form: str = None  # "paper" or "voco_code"; None: paper / voco_code
intra_weight: float = 1.0  # loss weights
inter_weight: float = 1.0
reg_weight: float = 1.0
steps: int = 250000  # optimizer steps (the official code's; a GPU run, see README)
batch_size: int = 4  # volumes per step and process
grad_accum: int = 1  # micro-batches per optimizer step
lr: float = 1e-4  # AdamW learning rate (warmup + cosine)
weight_decay: float = 1e-2
decay_norm_and_bias: bool = None  # True: norm and bias decayed too; None: False / True
amsgrad: bool = None  # AdamW's AMSGrad; None: False / True
warmup_steps: int = 5000
min_lr_factor: float = None  # the cosine's floor as a share of lr; None: 0.01 / 0
grad_clip: float = None  # max gradient norm (0: off); None: 1 / 0
grad_checkpointing: bool = False  # recompute activations in backward: less memory, slower
precision: str = "auto"  # "auto": bf16 on GPUs with native bf16, fp16 on T4/P100, CPU fp32
flip_prob: float = 0.0  # augmentation: flips move organs, off by default
rot90_prob: float = 0.0
intensity: float = None  # intensity scale/shift jitter; None: 0.1 / 0
num_workers: int = 2  # data loader processes
checkpoint_every: int = 200  # steps between checkpoints
probe_every: int = 200  # steps between position probes
n_probe_volumes: int = 8  # volumes held out for the probe
seed: int = 0
resume: bool = True  # continue from output_dir/checkpoint.pt when it exists
resume_from: str = ""  # an earlier run folder (Kaggle: /kaggle/input/...), copied in to resume
time_limit_s: float = 0.0  # stop cleanly after this long (Kaggle sessions); 0 for no limit
launch: str = "inprocess"  # "inprocess" or "torchrun" (one process per GPU)
nproc_per_node: int = 0  # torchrun processes; 0 for one per GPU
install_from: str = ""  # set-up: Kaggle bundle folder(s) or Colab pip spec; empty: found
smoke: bool = False  # tiny, fast settings for tests

# %% [markdown]
# ## Set-up
#
# Makes `kaggle_utils` importable wherever this runs. On Kaggle: from the attached bundle
# dataset (`make kaggle-bundle`), with `pip install --no-index` (never the network, so it
# works in the offline scoring run). On Colab: from a clone of the repository under
# `/content`, or from `install_from` (a pip spec). Locally: nothing (`make install` did it).

# %%
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path


def install_kaggle_utils(install_from: str = "") -> str:
    """Install this project's package where the platform needs it; say what was done."""
    package, wheel = "kaggle-utils-voco2d", "kaggle_utils_voco2d-*.whl"
    try:
        return f"{package} {importlib.metadata.version(package)} is installed"
    except importlib.metadata.PackageNotFoundError:
        pass
    root = Path(os.environ.get("KAGGLE_UTILS_FAKE_ROOT") or "/")  # tests fake "/"
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):  # Kaggle first: its image also looks like Colab
        inputs = root / "kaggle" / "input"
        layouts = ("*", "*/*", "*/*/*", "*/*/*/*")  # /kaggle/input/<slug>, datasets/<owner>/<slug>
        found = {w.parent for layout in layouts for w in inputs.glob(f"{layout}/wheels/{wheel}")}
        folders = [p for p in install_from.split(",") if p] or sorted(map(str, found))
        if not folders:
            raise FileNotFoundError(
                f"no {wheel} under {inputs}: attach the bundle dataset that "
                "`make kaggle-bundle` writes (README: Kaggle), or pass install_from=<its folder>"
            )
        import json

        here, running = "{}.{}".format(*sys.version_info[:2]), platform.python_version()
        for folder in folders:  # the bundle's manifest says which Pythons it has wheels for
            manifest = Path(folder).parent / "manifest.json"
            pythons = json.loads(manifest.read_text())["pythons"] if manifest.is_file() else []
            if pythons and here not in pythons:
                raise RuntimeError(
                    f"the bundle in {Path(folder).parent} has wheels for Python "
                    f"{', '.join(pythons)}, but this kernel runs Python {running} (Kaggle's "
                    f"image moved on): rebuild it with `make kaggle-bundle BUNDLE_ARGS='--python "
                    f"{here}'` and upload it as a new version (README: Kaggle)"
                )
        links = [arg for folder in folders for arg in ("--find-links", folder)]
        try:
            subprocess.check_call([*pip, "--no-index", *links, package])
        except subprocess.CalledProcessError as error:
            raise RuntimeError(
                f"pip could not install {package} offline from {', '.join(folders)} (its message "
                "is above): a package the bundle left out as preinstalled is missing from this "
                "image, or has another version. Rebuild the bundle (README: Kaggle)"
            ) from error
        how = f"offline from {', '.join(folders)}"
    elif os.environ.get("COLAB_RELEASE_TAG") or "google.colab" in sys.modules:
        clones = sorted((root / "content").glob("*/kaggle_utils/__init__.py"))
        spec = install_from or (str(clones[0].parents[1]) if clones else "")
        if not spec:
            raise FileNotFoundError(
                "clone the repository first (!git clone <its URL> /content/voco2d), or set "
                "install_from='git+<its URL>' in the first cell (README: Colab)"
            )
        subprocess.check_call([*pip, spec])
        how = f"from {spec}"
        if not (root / "content" / "drive" / "MyDrive").is_dir():
            how += "; Drive is not mounted, so outputs go to /content and end with the session"
    else:
        return f"{package} is not installed: run `make install` (or pip install -e <checkout>)"
    importlib.invalidate_caches()
    return f"{package} {importlib.metadata.version(package)} installed {how}"


print(install_kaggle_utils(install_from))

# %%
import json

import numpy as np

from kaggle_utils.cache import preprocess
from kaggle_utils.common import paths, runtime
from kaggle_utils.common.backbone import describe_weights, resolve_weights
from kaggle_utils.common.config import config_from_parameters, parse_parameter
from kaggle_utils.common.io import write_json_atomic
from kaggle_utils.common.plots import crop_layout, pretraining_curves, show_figure
from kaggle_utils.common.summary import papermill_command, show_outputs
from kaggle_utils.finetune.data import holdout_patients
from kaggle_utils.finetune.train import read_labels
from kaggle_utils.pretrain.crops import sample_voco_crops
from kaggle_utils.pretrain.data import exclude_patient_volumes, load_volume, volume_files
from kaggle_utils.pretrain.train import (
    PretrainConfig,
    launch_torchrun,
    pretrain,
    pretraining_volume_dirs,
)

shape = parse_parameter("volume_shape", volume_shape, tuple[int, int, int])
if smoke:
    backbone, hidden_dim, out_dim, steps, batch_size = "test_efficientnet", 64, 64, 3, 2
    probe_every, checkpoint_every, warmup_steps, num_workers, n_probe_volumes = 3, 3, 1, 0, 2
    crop_size = min(shape[1:]) // grid
cache_dir = parse_parameter("cache_dir", cache_dir, str | list[str])
caches = preprocess.resolve_cache_dirs(
    cache_dir or paths.resolve_output_dir("", default_name="cache")
)
run_dir = paths.resolve_output_dir(output_dir, default_name="pretrain")
if resume_from:
    runtime.copy_previous_run(resume_from, run_dir)
extra_dirs = parse_parameter("extra_dirs", extra_dirs, list[str])
volume_dirs, extras = pretraining_volume_dirs(caches, shape, extra_dirs, run_dir / "extra_cache")
for extra in extras:
    if extra.status != "ok":
        print(f"extra source skipped: {extra.source}: {extra.error}")
# Notebook 03's held-out test patients (same holdout and fold seed) never reach pretraining,
# so every initialisation compared on them has seen them equally: never.
left_out = set(parse_parameter("exclude_patients", exclude_patients, list[int]))
if holdout > 0:
    held_out = holdout_patients(
        read_labels(paths.resolve_data_root(data_root)),
        holdout,
        seed if fold_seed < 0 else fold_seed,
    )
    print(f"{len(held_out)} held-out patients (holdout {holdout}) left out of pretraining")
    left_out |= set(held_out)
# the parameters named as PretrainConfig's fields, and what this cell worked out
config = config_from_parameters(
    PretrainConfig, globals(), volume_dirs=volume_dirs, output_dir=str(run_dir),
    momentum_end=momentum_end or None,  # 0: a constant momentum
    exclude_patients=sorted(left_out),
)  # fmt: skip
config.weights_file = resolve_weights(config.weights_file, config.backbone, config.init)
print(f"recipe {config.recipe}; {describe_weights(config.weights_file)}")
files, _ = exclude_patient_volumes(volume_files([Path(d) for d in volume_dirs]), sorted(left_out))
print(f"{len(files)} volumes from {volume_dirs} ({sum(e.status == 'ok' for e in extras)} extra)")
print(f"run folder: {run_dir}")

# %% [markdown]
# ## The pretext task on one slice
#
# The base grid (blue, numbered) and the random crops; each random crop's label is its
# overlap with every base (`label_mode`), which the similarities are trained to reproduce.

# %%
example = load_volume(files[0])
crops = sample_voco_crops(
    example.shape[-2:], config.grid, config.n_random, np.random.default_rng(config.seed),
    config.label_mode, config.crop_size,
)  # fmt: skip
fig = crop_layout(
    example[example.shape[0] // 2, 0], crops.base_boxes, crops.random_boxes, crops.labels
)
show_figure(fig, run_dir / "crop_layout.png")

# %% [markdown]
# ## Train (or resume)

# %%
result = launch_torchrun(config, nproc_per_node) if launch == "torchrun" else pretrain(config)
print(f"steps done: {result.steps_done} (finished: {result.finished})")
print(f"encoder: {result.encoder_file}")

# %% [markdown]
# ## What pretraining learned
#
# Loss parts per step, and the position probe on held-out volumes: how often the base most
# similar to a random crop is the one it overlaps most, against the crop's own volume (pixel
# overlap alone helps there, so an untrained encoder already scores above chance) and against
# another volume's bases (only anatomical position can tell). Chance is 1 / grid².

# %%
fig = pretraining_curves(run_dir / "log.csv", chance=result.chance)
show_figure(fig, run_dir / "curves.png")
summary = {
    "steps": result.steps_done,
    "probe_before": result.initial_probe,
    "probe_after": result.probe,
    "chance": round(result.chance, 4),
}
print(json.dumps(summary, indent=1))
write_json_atomic(run_dir / "summary.json", summary)

# %% [markdown]
# ## What this run wrote, and the next step
#
# Notebook 03 fine-tunes from `encoder.pt`, with the same backbone, on the same cache (at its
# fine-tuning shape).

# %%
show_outputs(
    run_dir,
    papermill_command(
        "03_finetune_bilstm", run_dir.parent, encoder_file=result.encoder_file,
        backbone=config.backbone, cache_dir=cache_dir or None,
    ),
)  # fmt: skip
