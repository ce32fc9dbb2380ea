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
# # 06 · Organ segmentation: boxes and per-slice organ areas for every series
#
# Every top RSNA 2023 solution locates the organs first. This notebook trains a small 3D
# U-Net (MONAI) on the competition's `segmentations/` (about 206 training series; 1 liver,
# 2 spleen, 3 left kidney, 4 right kidney, 5 bowel), reports Dice per organ on held-out
# patients, then predicts every cached series (train and test) and writes, per series and
# organ, the bounding box and the organ's area on every slice (`organs.parquet`): what organ
# crops and organ-visibility slice weights are made from.
#
# The masks are aligned to the cached volumes through their NIfTI affine and each series'
# record from notebook 01 (grid, spacing, slice positions), never by guessing axes; a mask
# that does not fit its series is skipped and reported. Runs after notebook 01; resumable
# (prepared masks, a checkpoint every epoch, one file per predicted series).

# %% tags=["parameters"]
data_root: str = ""  # competition folder (its segmentations/); empty: Kaggle input, else inputs/
cache_dir = ""  # type: list|str  notebook 01's cache(s), train and test; "": outputs/cache
output_dir: str = ""  # run folder; empty: outputs/segmentation (/kaggle/working/segmentation)
shape: list = [96, 256, 256]  # the cached (slices, H, W) read
input_shape: list = [96, 128, 128]  # what the U-Net sees (the top solutions: about 128^3)
channels: list = [16, 32, 64, 128]  # U-Net widths, one per level
num_res_units: int = 1  # residual units per U-Net block
epochs: int = 100
batch_size: int = 2
lr: float = 0.001  # AdamW, cosine schedule
weight_decay: float = 0.00001
decay_norm_and_bias: bool = False  # True: norm and bias decayed too (the old behaviour)
holdout: float = 0.2  # share of segmented patients held out for Dice
intensity: float = 0.1  # brightness/contrast augmentation
precision: str = "auto"  # "auto": bf16 on GPUs with native bf16, fp16 on T4/P100, CPU fp32
seed: int = 0
resume: bool = True  # continue from output_dir/checkpoint.pt
predict: bool = True  # organ boxes for every cached series
n_montage: int = 4  # volumes shown with their predicted masks
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
from IPython.display import display

from kaggle_utils.cache.preprocess import load_cached_volume, load_metadata
from kaggle_utils.common import paths
from kaggle_utils.common.config import config_from_parameters, parse_parameter
from kaggle_utils.common.io import write_json_atomic
from kaggle_utils.common.plots import segmentation_curves, segmentation_montage, show_figure
from kaggle_utils.common.summary import papermill_command, show_outputs
from kaggle_utils.segmentation import train as segmentation

if smoke:
    epochs, channels, num_res_units, n_montage = 2, [4, 8], 0, 2
root = paths.resolve_data_root(data_root)
run_dir = paths.resolve_output_dir(output_dir, default_name="segmentation")
cache_dir = parse_parameter("cache_dir", cache_dir, str | list[str])
# the parameters named as SegmentationConfig's fields, and what this cell worked out
config = config_from_parameters(
    segmentation.SegmentationConfig, globals(), data_root=str(root), output_dir=str(run_dir),
    cache_dir=cache_dir or str(paths.resolve_output_dir("", default_name="cache")),
)  # fmt: skip
print(f"{root / segmentation.SEGMENTATIONS_DIR} + {config.cache_dir} -> {run_dir}")

# %% [markdown]
# ## Train (or resume), then predict every cached series

# %%
result = segmentation.run_segmentation(config)
print(
    f"{result.n_train} training and {result.n_holdout} held-out series, {result.epochs_done} epochs"
)
for problem in result.problems:  # masks that did not fit their series: skipped
    print(f"!!! skipped: {problem}")

# %% [markdown]
# ## Held-out Dice per organ
#
# On patients the model never saw, at `input_shape`, from the final epoch's model (no
# selection on the held-out series).

# %%
dice = pl.DataFrame(
    {
        "organ": list(result.dice),
        "dice": [None if v is None else round(v, 3) for v in result.dice.values()],
    }
)
display(dice)
fig = segmentation_curves(run_dir / "log.csv")
show_figure(fig, run_dir / "curves.png")

# %% [markdown]
# ## Predicted masks over a few volumes
#
# Axial slices through each organ's middle and a coronal view (liver and right kidney on the
# image left: the patient's right).

# %%
model = segmentation.load_model(run_dir)
metadata = load_metadata(config.cache_dir).filter(pl.col("status") == "ok")
shown = metadata.head(n_montage).to_dicts()
volumes = {}
for record in shown:
    volume = load_cached_volume(record["cache_dir"], config.shape, record["series_id"])
    volumes[str(record["series_id"])] = segmentation.predict_volume(model, volume, config)
fig = segmentation_montage(volumes)
show_figure(fig, run_dir / "montage.png")

# %% [markdown]
# ## Organ boxes

# %%
if result.organs is not None:
    found = result.organs.group_by("organ").agg(
        pl.col("found").mean().alias("share found"),
        pl.col("voxels").median().alias("median voxels"),
    )
    display(found.sort("organ"))
    print(f"{result.organs['series_id'].n_unique()} series -> {run_dir / 'organs.parquet'}")
summary = {
    "dice": result.dice,
    "n_train": result.n_train,
    "n_holdout": result.n_holdout,
    "epochs": result.epochs_done,
    "problems": result.problems,
}
write_json_atomic(run_dir / "summary.json", summary)

# %% [markdown]
# ## What this run wrote, and the next step
#
# Notebook 03 trains on an organ's crops cut with these boxes (`input` liver, spleen, kidney or
# bowel; `shape` is then the crop's, cut from the cache's `crop_source_shape`), or weighs its
# slice loss by the organs' areas on the whole scan (`organ_visibility`). An organ-crop run
# carries this model in its folder, so notebook 04 crops the test scans the same way.

# %%
show_outputs(
    run_dir,
    [
        papermill_command(
            "03_finetune_bilstm", run_dir.parent, data_root=data_root or None,
            cache_dir=cache_dir or None, segmentation_dir=run_dir, input="kidney",
        ),
        papermill_command(
            "03_finetune_bilstm", run_dir.parent, data_root=data_root or None,
            cache_dir=cache_dir or None, segmentation_dir=run_dir, organ_visibility=True,
        ),
    ],
)  # fmt: skip
