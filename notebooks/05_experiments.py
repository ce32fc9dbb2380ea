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
# # 05 · The paper's experiments as one batch: Tables 1 and 2, a label-efficiency curve
#
# Each run is a papermill execution of notebook 02 (2D-VoCo pretraining) and/or notebook 03
# (fine-tuning) into its own folder under `experiment_dir`, named by a hash of its parameters:
# one pretraining serves every fine-tuning that uses it, a finished run is skipped, and an
# interrupted one resumes from its checkpoints when this notebook runs again.
#
# The protocol is the paper's: `holdout` (20 %) of the patients are held out, 5-fold CV runs
# on the rest, and every run holds out the same patients (`fold_seed`), so settings compare on
# the same patients; seeds vary the training only. The held-out split is scored for every fold
# model (mean ± std) and for the fold ensemble; comparisons rest on it, because each fold
# picks its best epoch on its own validation patients (the CV figures are optimistic).
#
# Pretraining never sees the held-out patients: every notebook-02 run gets the same `holdout`
# and `fold_seed` and leaves those patients out (its `volumes.parquet` lists what it used).
# `recipes` runs the presets under the authors' settings ("official", the default: what the
# paper's comparison ran), this project's ("project"), or both, each with its own baseline.
#
# Presets: `table1` (the paper's four rows: ImageNet, ImageNet + 2D-VoCo, and both without
# ImageNet, i.e. from scratch and 2D-VoCo from random weights; the ImageNet rows need weights,
# from `weights_file` or found among Kaggle's attached inputs by the backbone's name, and are
# skipped, with the reason in the report, without them; plus 2D-VoCo with `extra_dirs` of
# unlabeled CT), `label_efficiency` (`fractions` of the training
# patients, nested subsets shared by every initialisation), and `grid` (any notebook 03
# parameter, or notebook 02's as `pretrain.<name>`, e.g. `{"pooling": ["max", "attention"]}`).
# `table2` is the paper's Table 2: multi-organ (the whole scan, every head) against
# single-organ (each of `organs` on its own crop from notebook 06's boxes, its head only), from
# scratch and with 2D-VoCo, scored per organ by held-out AUC and its part of the RSNA score.
# `pretrain_params` and `finetune_params` set notebook 02's and 03's parameters for every run,
# `crop_params` those of the single-organ runs on top.

# %% tags=["parameters"]
experiment_dir: str = ""  # the batch's folder; empty: outputs/experiments
data_root: str = ""  # competition folder with train.csv; empty: Kaggle input, else inputs/...
cache_dir = ""  # type: list|str  notebook 01's cache (or caches); "": outputs/cache
presets: list = ["table1", "label_efficiency"]  # and/or "grid", "table2"
recipes: list = ["official"]  # notebooks 02/03 recipes: "official" (the authors'), "project"
backbones: list = ["efficientnetv2_rw_t"]  # timm names; each gets its own pretraining
seeds: list = [0, 1, 2]  # training seeds per setting
fractions: list = [0.05, 0.1, 0.25, 0.5, 1.0]  # label_efficiency: shares of training patients
curve_settings: list = ["random", "voco"]  # label_efficiency inits (+ imagenet, imagenet_voco)
weights_file: str = ""  # ImageNet weights (file or timm/HF folder); empty: found on Kaggle
extra_dirs: list = []  # extra unlabeled CT (NIfTI, DICOM folders) for "2D-VoCo + extra"
pretrain_params: dict = {}  # notebook 02 parameters for every pretraining
finetune_params: dict = {}  # notebook 03 parameters for every fine-tuning
grid: dict = {}  # the grid preset: {parameter: [values]}; "pretrain.<name>" for notebook 02
organs: list = ["liver", "spleen", "kidney"]  # table2: organs with a single-organ run
segmentation_dir: str = ""  # table2: notebook 06's run (organ boxes for the crops)
crop_params: dict = {}  # table2: notebook 03 parameters of the single-organ runs (e.g. shape)
holdout: float = 0.2  # share of patients held out (the paper's protocol)
n_folds: int = 5
fold_seed: int = 0  # the folds and held-out patients, the same for every run
n_bootstrap: int = 2000  # paired bootstrap resamples of the held-out patients
notebooks_dir: str = ""  # where notebooks 02 and 03 are; empty: this project's notebooks/
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
import dataclasses
import json

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from kaggle_utils.cache import preprocess
from kaggle_utils.common import paths
from kaggle_utils.common.config import config_from_parameters, parse_parameter
from kaggle_utils.common.summary import papermill_command, show_outputs
from kaggle_utils.experiments.runner import (
    ExperimentConfig,
    label_efficiency_figure,
    markdown_report,
    plan_experiment,
    run_experiment,
)

cache_dir = parse_parameter("cache_dir", cache_dir, str | list[str])
root = paths.resolve_data_root(data_root)
caches = preprocess.resolve_cache_dirs(
    cache_dir or paths.resolve_output_dir("", default_name="cache")
)
# the parameters named as ExperimentConfig's fields, and what this cell worked out
config = config_from_parameters(
    ExperimentConfig, globals(),
    experiment_dir=str(paths.resolve_output_dir(experiment_dir, default_name="experiments")),
    data_root=str(root), cache_dir=[str(c) for c in caches],
    segmentation_dir=str(
        segmentation_dir or paths.resolve_output_dir("", default_name="segmentation")
    ),
)  # fmt: skip
if smoke:  # one seed, two folds, two fractions, a tiny backbone, notebooks 02 and 03 smoke
    config = dataclasses.replace(
        config, seeds=config.seeds[:1], n_folds=2, n_bootstrap=50,
        backbones=["test_efficientnet"], fractions=[0.5, 1.0],
        pretrain_params={"smoke": True, **config.pretrain_params},
        finetune_params={"smoke": True, **config.finetune_params},
    )  # fmt: skip

# %% [markdown]
# ## The plan: what will run, what is shared, what is left out

# %%
plan = plan_experiment(config)
print(f"{len(plan.runs)} planned rows, {len(plan.unique_runs())} fine-tuning runs, "
      f"{len(plan.unique_pretrainings())} pretrainings, under {config.experiment_dir}")  # fmt: skip
for reason in plan.skipped:
    print("skipped:", reason)

# %% [markdown]
# ## Run every missing run (finished ones are skipped, interrupted ones resume)

# %%
result = run_experiment(config)
print(f"{len(result.ran)} runs executed in {result.minutes:.1f} min; "
      f"{len(result.failures)} failed")  # fmt: skip
for run, error in result.failures.items():
    print(f"FAILED {run}:\n{error}\n")

# %% [markdown]
# ## The report (also `report.md`, `report.json` and `label_efficiency.png` in the folder)

# %%
display(Markdown(markdown_report(result.report)))
if result.report["presets"].get("label_efficiency", {}).get("rows"):
    label_efficiency_figure(result.report)
    plt.show()
print(json.dumps({"experiment_dir": config.experiment_dir, "failures": len(result.failures)}))
if result.failures:
    raise RuntimeError(
        f"{len(result.failures)} runs failed (listed above and in report.md); the report "
        "covers the others. Fix the cause and run again: finished runs are skipped."
    )

# %% [markdown]
# ## What this batch wrote, and the next step
#
# Each run's folder under `runs/` is a notebook 03 run: notebook 04 predicts the test set with
# the one the report favours.

# %%
experiment_root = Path(config.experiment_dir)
show_outputs(
    experiment_root,
    f"read {experiment_root / 'report.md'}, pick a run, then "
    + papermill_command(
        "04_submission", experiment_root, data_root=data_root or None,
        model_dir=f"{experiment_root / 'runs'}/<run>",
    ),
)  # fmt: skip
