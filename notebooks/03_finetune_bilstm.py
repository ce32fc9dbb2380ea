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
# # 03 · CNN-BiLSTM fine-tuning with patient-grouped cross-validation
#
# The pretrained 2D encoder (notebook 02) embeds every slice of a cached volume
# (96 × 256 × 256); a bidirectional LSTM reads the slice sequence, pooling over slices feeds one
# head per target (bowel, extravasation: 2 classes; kidney, liver, spleen: 3). The loss is the
# cross-entropy weighted like the competition metric, plus its any-injury term, plus (where
# `image_level_labels.csv` marks them) a per-slice loss for bowel and extravasation. With
# `organ_visibility`, that slice loss also covers kidney, liver and spleen, with soft labels:
# the patient's injury times the organ's area on the slice over its largest (notebook 06's
# organ areas, as the 1st place solution did). `neighbour_slices` feeds each slice with its
# neighbours as extra channels (2.5D); a 2D-VoCo encoder's first convolution is adapted to them.
#
# Folds group patients (a patient's series never straddle folds) and are stratified on injury;
# each fold keeps its best epoch by validation RSNA score and writes out-of-fold predictions.
# The report gives the RSNA score with its six parts and the paper's mAP, macro precision and
# macro recall as mean ± std over folds, beside the best-constant prior on the same folds.
# Finally a calibration (blend of each target with the prior, then per-column scaling) is fitted
# on the out-of-fold predictions and saved for notebook 04; its honest CV score calibrates each
# fold with the other folds only.
#
# `recipe` sets every choice at once: "project" (the default: tuned for the competition
# metric, as above) or "official" (the authors' fine-tuning code: 48 of 96 slices at 192 px,
# efficientnetv2_rw_s, one LSTM layer of 128, max over slices, no any-injury or slice loss,
# flips on all three axes, batch 4, no clipping, AdamW 1.25e-4 with weight decay 1e-5, a
# cosine down to lr / 10 in 5,000 steps and back up, 20 epochs; bowel, kidney, liver and
# spleen heads only, so the extravasation column is the training prior). A parameter given
# explicitly wins; one left as None takes the recipe's value (docs/method.md tables both
# against the paper).
#
# `time_limit_s` ends a session cleanly between epochs (Kaggle's 12 hours); running the notebook
# again with the same `output_dir` resumes where it stopped. On Kaggle a new session starts with
# an empty `/kaggle/working`: attach the stopped run's output and pass it as `resume_from`.

# %% tags=["parameters"]
recipe: str = "project"  # "project" (this project's) or "official" (the authors' code); below
# None takes the recipe's value, shown as project / official (docs/method.md tables them)
data_root: str = ""  # competition folder with train.csv; empty: Kaggle input, else inputs/...
cache_dir = ""  # type: list|str  notebook 01's cache, or a list of caches/globs; "": outputs/cache
output_dir: str = ""  # run folder; empty: outputs/finetune (/kaggle/working/finetune)
shape: list = [96, 256, 256]  # cached (slices, H, W) volumes to train on (or the organ crops')
input: str = "scan"  # "scan" (whole scan), or an organ's crop: liver, spleen, kidney, bowel
segmentation_dir: str = ""  # notebook 06's run (organ input, organ_visibility); empty: outputs/...
organ_visibility: bool = False  # slice loss also on kidney/liver/spleen: injury x organ area
neighbour_slices: int = 0  # 2.5D: neighbours on either side as channels (1: 3 adjacent slices)
crop_source_shape: list = [96, 256, 256]  # the cached shape organ crops are cut from
crop_margin: float = 0.1  # added on each side of an organ's box, as a share of its size
crops_dir: str = ""  # where organ-crop caches are made; empty: outputs/crops
backbone: str = None  # timm name, notebook 02's for "voco"; None: efficientnetv2_rw_t / _rw_s
init: str = "voco"  # "voco" (notebook 02's encoder), "imagenet" (local file) or "random"
encoder_file: str = ""  # notebook 02's encoder.pt; empty: outputs/pretrain/encoder.pt
weights_file: str = ""  # ImageNet weights (file or timm/HF folder); empty: found on Kaggle
targets: list = None  # None: all five / all but extravasation (never trained officially)
hidden_size: int = None  # LSTM hidden size per direction; None: 256 / 128
num_layers: int = None  # LSTM layers; None: 2 / 1
dropout: float = None  # before the heads; None: 0.2 / 0
pooling: str = None  # over slices: "attention", "max" or "mean"; None: attention / max
global_pool: str = "avg"  # within a slice: "avg", "max" or "avgmax"
n_slices: int = None  # slices per volume: 0 for all, else evenly sampled; None: 0 / 48
image_size: int = None  # random crop in training, centre crop otherwise; None: 256 / 192
epochs: int = None  # None: 10 / 20
batch_size: int = None  # volumes per step; None: 2 / 4
grad_accum: int = 1  # micro-batches per optimizer step
lr: float = None  # AdamW, warmup then cosine; None: 1e-4 / 1.25e-4
backbone_lr_factor: float = 1.0  # backbone learning rate relative to lr
weight_decay: float = None  # None: 1e-2 / 1e-5
decay_norm_and_bias: bool = None  # True: norm and bias decayed too; None: False / True
freeze_epochs: int = 0  # epochs with the backbone frozen
grad_clip: float = None  # max gradient norm (0: off); None: 1 / 0
warmup_epochs: float = None  # linear warmup; None: 0.5 / 0
min_lr_factor: float = None  # the cosine's floor as a share of lr; None: 0.01 / 0.1
lr_cycle_steps: int = None  # cosine half-period in steps, then back up (0: the run); None: 0 / 5000
grad_checkpointing: bool = False  # recompute activations in backward: less memory, slower
any_injury_weight: float = None  # the any-injury loss term (0: off); None: 1 / 0
loss_normalisation: str = "expected"  # "expected": the metric in expectation; "batch": old
slice_loss_weight: float = None  # per-slice bowel/extravasation loss; None: 1 / 0
hflip_prob: float = None  # augmentation, the same for every slice; None: 0 / 0.5
vflip_prob: float = None  # None: 0 / 0.5
zflip_prob: float = None  # slice order reversed; None: 0 / 0.5
affine_prob: float = None  # None: 0.5 / 0.1
brightness_contrast_prob: float = None  # None: 0.5 / 0.05
coarse_dropout_prob: float = None  # None: 0.3 / 0.1
n_folds: int = 5
folds_to_run: list = []  # e.g. [0] for a quick look; empty for all folds
holdout: float = 0.0  # share of patients held out as a test split (the paper: 0.2)
fold_seed: int = -1  # seed of the folds and holdout; -1: seed (experiments fix it across runs)
train_fraction: float = 1.0  # share of training patients used (nested subsets; label efficiency)
aggregation: str = "mean"  # per patient over its series: "mean" or "max"
precision: str = "auto"  # "auto": bf16 on GPUs with native bf16, fp16 on T4/P100, CPU fp32
num_workers: int = 2  # data loader processes
seed: int = 0
resume: bool = True  # skip finished folds, resume an interrupted one
resume_from: str = ""  # an earlier run folder (Kaggle: /kaggle/input/...), copied in to resume
time_limit_s: float = 0.0  # stop cleanly between epochs after about this long; 0 for no limit
launch: str = "inprocess"  # "inprocess" or "torchrun" (one process per GPU)
importance_method: str = "auto"  # slice importance: "auto", "attention" or "gradient"
explain_patients: int = 4  # validation patients shown with their most important slices
importance_series: int = 200  # validation series (per fold) the slice ranking is measured on
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
import polars as pl
from IPython.display import Markdown, display

from kaggle_utils.cache import preprocess
from kaggle_utils.common import paths, runtime
from kaggle_utils.common.backbone import describe_weights, resolve_weights
from kaggle_utils.common.config import config_from_parameters, parse_parameter
from kaggle_utils.common.io import write_json_atomic
from kaggle_utils.common.plots import (
    confusion_matrices,
    cross_validation_curves,
    importance_strip,
    precision_recall_curves,
    show_figure,
)
from kaggle_utils.common.summary import papermill_command, show_outputs
from kaggle_utils.finetune.calibration import CALIBRATION_FILE, calibrate_cross_validation
from kaggle_utils.finetune.data import SLICE_TARGETS, series_table
from kaggle_utils.finetune.importance import explain_series, marked_slice_ranking, pick_examples
from kaggle_utils.finetune.predict import load_fold_model
from kaggle_utils.finetune.report import HEADLINE, cross_validation_report, markdown_table
from kaggle_utils.finetune.train import (
    FinetuneConfig,
    launch_torchrun,
    read_labels,
    run_cross_validation,
    stopped_message,
)
from kaggle_utils.segmentation.organ_crops import organ_crop_cache

if smoke:
    epochs, batch_size, n_folds, num_workers, hidden_size, num_layers = 1, 2, 2, 0, 16, 1
root = paths.resolve_data_root(data_root)
cache_dir = parse_parameter("cache_dir", cache_dir, str | list[str])
caches = preprocess.resolve_cache_dirs(
    cache_dir or paths.resolve_output_dir("", default_name="cache")
)
run_dir = paths.resolve_output_dir(output_dir, default_name="finetune")
segmentation_run = segmentation_dir or paths.resolve_output_dir("", "segmentation")
if input != "scan":  # the paper's single-organ setting: the organ's crops, its head only
    targets = [input]
    crop_root = crops_dir or paths.resolve_output_dir("", "crops")
    shape = parse_parameter("shape", shape, list[int])
    source_shape = parse_parameter("crop_source_shape", crop_source_shape, list[int])
    caches = [
        organ_crop_cache(
            input, segmentation_run, caches, crop_root, source_shape, shape, crop_margin
        )
    ]
    print(f"{input} crops ({preprocess.shape_name(shape)}) from {segmentation_run}: {caches[0]}")
if resume_from:
    runtime.copy_previous_run(resume_from, run_dir)
if init == "voco" and not encoder_file:
    encoder_file = str(paths.resolve_output_dir("", default_name="pretrain") / "encoder.pt")
# the parameters named as FinetuneConfig's fields, and what this cell worked out
config = config_from_parameters(
    FinetuneConfig, globals(), data_root=str(root), cache_dir=[str(c) for c in caches],
    output_dir=str(run_dir),
    segmentation_dir=str(segmentation_run) if input != "scan" or organ_visibility else "",
)  # fmt: skip
config.weights_file = resolve_weights(config.weights_file, config.backbone, config.init)
print(f"recipe {config.recipe}; init {config.init}; targets {config.targets}")
if config.init == "imagenet":
    print(describe_weights(config.weights_file))
print(f"labels: {root / 'train.csv'}; volumes: {config.cache_dir}; run folder: {run_dir}")

# %% [markdown]
# ## Train every fold (finished folds are skipped, an interrupted one resumes)

# %%
if launch == "torchrun":
    result = launch_torchrun(config, nproc_per_node)
else:
    result = run_cross_validation(config)
print(
    "best validation RSNA score per fold:", {k: round(v, 4) for k, v in result.fold_scores.items()}
)
if not result.finished:
    print(stopped_message(result))
SKIPPED = "Skipped: the run stopped at its time limit; re-run to finish it (see above)."

# %% [markdown]
# ## Learning curves
#
# Per fold, the training and validation loss and the validation RSNA score (the competition's
# weighted log loss: lower is better) per epoch. The dotted line and the star mark the epoch
# the fold kept, its lowest validation RSNA score: that model is scored below and predicts in
# notebook 04.

# %%
if result.finished:
    fig = cross_validation_curves(run_dir, sorted(result.fold_scores))
    show_figure(fig, run_dir / "learning_curves.png")
else:
    print(SKIPPED)

# %% [markdown]
# ## Report: the model against the best-constant prior on the same folds
#
# Thresholds for the paper's precision and recall are fitted on the other folds' out-of-fold
# predictions, never on the fold being scored.

# %%
labels = read_labels(root)
if result.finished:
    report = cross_validation_report(labels, result.oof_patient, result.folds, result.holdout_folds)
    display(Markdown(markdown_table(report, HEADLINE)))
    display(Markdown(markdown_table(report)))
else:
    print(SKIPPED)

# %% [markdown]
# ## Calibration fitted on the out-of-fold predictions
#
# Per target, a blend weight with the best-constant prior (a head that learned nothing useful
# goes back to the prior) and per-column factors, both chosen to lower the RSNA score. The
# table scores each fold calibrated by a calibration fitted on the *other* folds; notebook 04
# applies the one fitted on all folds (`calibration.json`).

# %%
if result.finished:
    calibration, calibrated = calibrate_cross_validation(
        labels, result.oof_patient, result.folds, result.holdout_folds
    )
    calibration.to_json(run_dir / CALIBRATION_FILE)
    report["calibrated"] = calibrated
    write_json_atomic(run_dir / "report.json", report)
    print("blend weight of the model per target:", calibration.model_weight)
    display(Markdown(markdown_table(calibrated, HEADLINE)))
else:
    print(SKIPPED)

# %%
if result.finished:
    oof = result.oof_patient.drop("fold")
    fig = confusion_matrices(labels, oof)
    show_figure(fig, run_dir / "confusion_matrices.png")
    fig = precision_recall_curves(labels, oof)
    show_figure(fig, run_dir / "precision_recall.png")
else:
    print(SKIPPED)

# %% [markdown]
# ## Which slices drove the predictions
#
# Per target, each slice's importance for the prediction (`kaggle_utils/finetune/importance.py`):
# the attention pooling's weight, or with max or mean pooling |gradient x input| of the target's
# injury log-odds on each slice's feature. Each fold model explains its own validation
# series. Where `image_level_labels.csv` marks the slices that show a bowel injury or
# extravasation, the measure is how much higher those rank: the AUC of importance against
# the marks (0.5: chance) and their mean rank (0: the most important slice). Below, the most
# important slices of a few injured and healthy patients, with the importance over the scan
# (marked slices shaded).

# %%
if result.finished and (explain_patients or importance_series):
    image_labels_file = root / "image_level_labels.csv"
    image_labels = pl.read_csv(image_labels_file) if image_labels_file.is_file() else None
    table = series_table(labels, config.cache_dir, config.shape, image_labels=image_labels)
    table = table.join(result.folds, on="patient_id")
    explanations = []
    for fold in sorted(result.fold_scores):
        model, _ = load_fold_model(run_dir / f"fold{fold}")
        rows = table.filter(pl.col("fold") == fold).head(max(importance_series, 1))
        explanations += explain_series(
            model, rows, config.n_slices, config.image_size, importance_method,
            neighbours=config.neighbour_slices,
        )  # fmt: skip
    ranking = {t: marked_slice_ranking(explanations, t) for t in SLICE_TARGETS}
    write_json_atomic(run_dir / "importance.json", ranking)
    display(pl.DataFrame([{"target": t, **v} for t, v in ranking.items()]))
    injured = set(labels.filter(pl.col("any_injury") == 1)["patient_id"])
    for number, (explanation, target) in enumerate(
        pick_examples(explanations, injured, explain_patients)
    ):
        fig = importance_strip(explanation, target, labels=labels)  # with the true class
        show_figure(fig, run_dir / f"importance_{number}.png")
else:
    print(SKIPPED if not result.finished else "importance: off")

# %% [markdown]
# ## What this run wrote, and the next step
#
# Notebook 04 predicts the test set with these fold models and `calibration.json`. An
# organ-crop run joins a whole-scan run there: `-y 'model_dir: [<scan run>, <this run>]'`.

# %%
show_outputs(
    run_dir,
    papermill_command(
        "04_submission", run_dir.parent, data_root=data_root or None, model_dir=run_dir
    )
    if result.finished
    else "run this notebook again with the same output_dir: it resumes (see above)",
)
