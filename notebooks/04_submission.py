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
# # 04 · Test DICOMs → `submission.csv` (offline)
#
# The Kaggle scoring run: no internet, the competition's test DICOMs as input, notebook 03's
# fold models attached as a dataset. Every test series is decoded and preprocessed exactly as
# notebook 01 did for training (same windows, body crop and volume shape), in a background
# thread or worker processes while the model predicts the previous series. Every fold model
# predicts it (optionally also its left-right flip), the folds are averaged, and each patient's
# series are aggregated (mean or max).
#
# The file is always complete and valid: a patient with no series, an empty or unreadable
# series folder, or a series the model fails on falls back to the patient's other series,
# else to the prior (the mean of the folds' best-constant predictions), and every fallback is
# logged and listed below. The table is checked against `sample_submission.csv` (columns,
# patient order, values in [0, 1]) before it is written, atomically.
#
# `model_dir` may list several notebook 03 runs: a whole-scan run and organ-crop runs (the
# paper's single-organ setting, or the crops of the top solutions). With `combine="organ"` (the
# default) a target some crop run covers comes from the crop runs and the whole-scan runs give
# the rest; `combine="mean"` averages every run trained on the target. An organ-crop run
# carries notebook 06's segmentation model in its folder; it locates the organ in every test
# scan and the crop is cut as in training. Where it finds no such organ, the crop is the whole
# scan, and the problems table says so.
#
# The preprocessing settings come from `preprocess.json` in the model folder if there is one
# (`submission.save_preprocess_settings` writes it after notebook 03), else from the training
# cache named in its `config.json`, else the soft-tissue window 50/400 with body crop.

# %% tags=["parameters"]
data_root: str = ""  # competition folder; empty: Kaggle input, else inputs/rsna-2023-...
model_dir = ""  # type: list|str  notebook 03's output_dir, or a list (scan + organ-crop runs)
output_csv: str = ""  # empty: outputs/submission.csv (/kaggle/working/submission.csv on Kaggle)
batch_size: int = 1  # series per forward pass
tta: bool = False  # also predict the left-right flip; only for models trained with flips
aggregation: str = ""  # over a patient's series: "mean" or "max"; empty: the models' setting
device: str = "auto"  # "auto" (GPU if any), "cpu" or "cuda"
workers: int = -1  # decoding processes (-1: one per core; a crash costs one series); 0: inline
precision: str = "auto"  # "auto": bf16 on GPUs with native bf16, fp16 on T4/P100, CPU fp32
combine: str = "organ"  # several runs: a target from its crop runs ("organ"), or all runs ("mean")
max_prior_share: float = 1.0  # fail (after writing) if more patients got the prior; 1: never
explain_patients = 2  # type: list|int  test patients (ids, or the first n) to explain; 0: none
importance_method: str = "auto"  # slice importance: "auto", "attention" or "gradient"
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
import logging

import polars as pl
from IPython.display import display

from kaggle_utils.common import paths
from kaggle_utils.common.config import parse_parameter
from kaggle_utils.common.plots import show_figure
from kaggle_utils.common.summary import show_outputs
from kaggle_utils.submission.inference import (
    explain_test_patients,
    predict_test_set,
    resolve_model_dirs,
    resolve_output_csv,
    score_against_labels,
    score_table,
    startup_report,
)

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
if smoke and workers != 0:
    workers = 1  # one decoding process, started once
root = paths.resolve_data_root(data_root)
run_dirs = resolve_model_dirs(parse_parameter("model_dir", model_dir, str | list[str]))
explain_patients = parse_parameter("explain_patients", explain_patients, int | list[int])
csv_path = resolve_output_csv(output_csv)
print(
    f"test DICOMs: {root / 'test_images'}; models: {', '.join(map(str, run_dirs))}; "
    f"submission: {csv_path}"
)
decoders, warnings = startup_report(root)
print(decoders)
for warning in warnings:  # a broken install shows here, before the long run
    print(f"\n!!! WARNING: {warning}")

# %% [markdown]
# ## Predict every test patient and write the submission

# %%
result = predict_test_set(
    root, run_dirs, csv_path, batch_size=batch_size, tta=tta, aggregation=aggregation or None,
    device=device, workers=workers, precision=precision, max_prior_share=max_prior_share,
    combine=combine,
)  # fmt: skip
settings = result.settings
print(
    f"{result.submission.height} patients -> {result.csv_path}; folds {settings['folds']} on "
    f"{settings['device']} ({settings['precision']}), {settings['aggregation']} over series, "
    f"tta {settings['tta']}; preprocessing: {settings['preprocessing_from']}"
)
for warning in settings["preprocessing_warnings"]:
    print(f"\n!!! WARNING: {warning}")
if result.prior_patients:
    print(
        f"\n!!! {len(result.prior_patients)} of {result.submission.height} patients "
        f"({100 * result.prior_share:.1f} %) got the prior: see the table below"
    )

# %% [markdown]
# ## What fell back
#
# One row per series that could not be used (or patient without any series): the stage that
# failed (missing, decode, preprocess, predict), why, and what the patient got instead: its
# other series, or the prior when none was left.

# %%
print(f"{result.problems.height} problems")
if result.problems.height:
    display(result.problems)

# %% [markdown]
# ## Time per study
#
# Seconds per study (a patient: all its series) and per series, for decoding the DICOMs,
# preprocessing (body crop, resampling, windowing) and the models. Decoding overlaps the model,
# so the wall clock per study is less than the sum when both take time; it also counts loading
# the models. Kaggle gives a fixed GPU budget for about 1,100 hidden test patients: multiply.

# %%
display(result.summary())
display(result.timings.head(10))

# %% [markdown]
# ## Score, where the test labels are known
#
# The demo data ships `test_labels.csv`; the real competition does not (this cell then does
# nothing). The prior scored on the same patients is the bar the model has to clear.

# %%
labels_csv = root / "test_labels.csv"
test_labels = pl.read_csv(labels_csv) if labels_csv.is_file() else None
if test_labels is not None:
    scores = score_against_labels(result.submission, labels_csv, result.prior)
    print(f"RSNA score on {scores['n_patients']} labelled test patients (lower is better)")
    display(score_table(scores))
else:
    print(f"no {labels_csv.name} beside the data: nothing to score against")

# %% [markdown]
# ## Which slices drove the prediction
#
# For a few test patients, each slice's importance for the target the model thought most likely
# injured (`kaggle_utils/finetune/importance.py`: the attention pooling's weight, or
# |gradient x input| with max or mean pooling), from the first run's first fold model: the most
# important slices and the importance over the scan (with the patient's true class where the
# test labels are known). Pass patient ids in `explain_patients` to see others.

# %%
figures = []
if explain_patients:
    from kaggle_utils.common.plots import importance_strip
    from kaggle_utils.finetune.importance import most_likely_injury

    try:
        explanations = explain_test_patients(
            root, run_dirs, explain_patients, importance_method, device, workers
        )
    except Exception as error:  # the submission is written: an explanation must not fail it
        print(f"!!! slice importance failed ({type(error).__name__}: {error}); submission kept")
        explanations = []
    for explanation in explanations:
        target = most_likely_injury(explanation)
        fig = importance_strip(explanation, target, labels=test_labels)
        name = f"importance_{explanation.patient_id}_{explanation.series_id}.png"
        show_figure(fig, csv_path.parent / name)
        figures.append(csv_path.parent / name)
else:
    print("explain_patients: none")

# %% [markdown]
# ## The submission

# %%
display(pl.read_csv(result.csv_path).head(10))

# %% [markdown]
# ## What this notebook wrote, and the next step

# %%
show_outputs(
    csv_path.parent,
    f"submit {result.csv_path} (on Kaggle: submit this notebook; its output "
    f"{result.csv_path.name} is what is scored)",
    files=[result.csv_path, *figures],
)
