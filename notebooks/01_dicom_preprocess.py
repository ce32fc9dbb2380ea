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
# # 01 · DICOM series → cached, windowed volumes
#
# Every CT series of the competition is decoded once to Hounsfield units (dicomsdl, with
# pydicom as fallback and reference), ordered by slice position, cropped to the body in-plane,
# resampled to fixed shapes and windowed to uint8. The cache feeds pretraining (notebook 02,
# `32x192x192`) and fine-tuning (notebook 03, `96x256x256`).
#
# The run is resumable: series already cached with the same settings are skipped, files are
# written atomically, and a broken file or series is reported, never fatal.
#
# The full training set's default cache is about 35 GB, more than Kaggle keeps of a notebook's
# output (about 20 GB). `num_shards` splits the series by patient into balanced shards, and
# `shard_index` picks the one this run caches: on Kaggle, `make kaggle-bundle` writes one kernel
# per shard (`voco2d-cache-<k>`, its shard set in the first cell), and notebooks 02-04 read all
# of them (`cache_dir` takes a list or a glob pattern such as `voco2d-cache-*/cache`, found in
# either of Kaggle's mount layouts). Before decoding, the run prints what it will write and
# stops if that does not fit, saying how many shards would.

# %% tags=["parameters"]
data_root: str = ""  # competition folder; empty: Kaggle input, else inputs/rsna-2023-...
split: str = "train"  # "train" or "test": which <split>_images/ folder to decode
output_dir: str = ""  # cache folder; empty: outputs/cache (/kaggle/working/cache on Kaggle)
shard_index: int = 0  # the shard this run caches, 0..num_shards-1 (on Kaggle: one kernel each)
num_shards: int = 1  # split the series by patient into this many shards (Kaggle keeps ~20 GB)
shapes: list = [[32, 192, 192], [96, 256, 256]]  # (slices, H, W) per cache: pretrain, finetune
windows: list = [[50, 400]]  # [level, width] in HU, one per channel; or "liver", "bone", "wide"
body_crop: bool = True  # crop each series in-plane to the body before resampling
workers: int = 2  # decoding processes; 0 runs in this process (easier to debug)
resample_device: str = "cpu"  # "cuda": resample on the GPU (same volumes; CPU is the reference)
limit: int = 0  # decode only the first N series; 0 for all
overwrite: bool = False  # re-decode series that are already cached
n_montage: int = 4  # how many volumes to show in the montage
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

from kaggle_utils.cache import preprocess
from kaggle_utils.cache.dicom import decoder_report
from kaggle_utils.cache.volume import parse_windows
from kaggle_utils.common import paths
from kaggle_utils.common.config import config_from_parameters, parse_parameter
from kaggle_utils.common.plots import show_figure, volume_montage
from kaggle_utils.common.summary import papermill_command, show_outputs

if smoke:
    shapes, limit = [[8, 32, 32]], limit or 3
root = paths.resolve_data_root(data_root)
cache_dir = paths.resolve_output_dir(output_dir, default_name="cache")
# the parameters named as PreprocessConfig's fields; windows may be names ("liver")
windows = parse_windows(parse_parameter("windows", windows, list[str | list[float]]))
config = config_from_parameters(preprocess.PreprocessConfig, globals(), windows=windows)
listed = preprocess.list_series(root, split)
tasks = preprocess.shard_tasks(listed, shard_index, num_shards)
if limit:
    tasks = tasks[:limit]
todo = preprocess.pending_tasks(tasks, cache_dir, config, overwrite)
shard = f"shard {shard_index} of 0..{num_shards - 1}: " if num_shards > 1 else ""
print(f"{shard}{len(tasks)} of {len(listed)} series from {root / f'{split}_images'} -> {cache_dir}")
print(f"shapes {[preprocess.shape_name(s) for s in config.shapes]}, windows {config.windows}")
decoders, decoder_warnings = decoder_report()
print(decoders)
for warning in decoder_warnings:  # slower decoding, or series that will fail
    print(f"!!! WARNING: {warning}")
print(
    preprocess.check_cache_space(
        len(todo), len(tasks), len(listed), config, cache_dir, kaggle=paths.on_kaggle()
    )
)

# %% [markdown]
# ## Decode, crop, resample, window, cache

# %%
# `todo` (above) is already what is left to do: overwrite=True skips checking the cache again
metadata = preprocess.preprocess_dataset(todo, cache_dir, config, workers=workers, overwrite=True)
this_run = metadata.filter(pl.col("series_id").is_in([t.series_id for t in tasks]))
n_ok = this_run.filter(pl.col("status") == "ok").height
print(f"{n_ok}/{this_run.height} series cached; table: {cache_dir / preprocess.METADATA_FILE}")
display(
    this_run.select(
        "patient_id",
        "series_id",
        "status",
        "n_slices",
        "spacing_z",
        "n_skipped",
        "decoder",
        "seconds",
    ).head(10)
)

# %% [markdown]
# ## What went wrong
#
# Failed series get no volume (notebook 04 falls back to the prior for them); skipped files
# are single slices left out of an otherwise good series (truncated, unreadable, or a size or
# orientation unlike the rest of the series).

# %%
failed, skipped = preprocess.problems_report(this_run)
print(f"{failed.height} failed series, {skipped.height} skipped files")
if failed.height:
    display(failed)
if skipped.height:
    display(skipped)
# Series brought to the common layout (flipped, transposed), tilted, with duplicates or gaps:
# all handled, listed so that the unusual ones can be looked at.
unusual = preprocess.geometry_report(this_run)
print(f"{unusual.height} series with an unusual geometry (handled)")
if unusual.height:
    display(unusual)

# %% [markdown]
# ## A look at the volumes
#
# Axial slices at a quarter, half and three quarters of the scan, and the coronal slice through
# the middle (superior at the top) of the first few cached series, at each cached shape.

# %%
good = this_run.filter(pl.col("status") == "ok").head(n_montage).to_dicts()
for shape in config.shapes:
    if not good:
        break
    volumes = {
        f"{r['series_id']}": preprocess.load_cached_volume(cache_dir, shape, r["series_id"])
        for r in good
    }
    aspects = {f"{r['series_id']}": preprocess.coronal_aspect(r, shape) for r in good}
    fig = volume_montage(volumes, coronal_aspects=aspects)
    fig.suptitle(f"{preprocess.shape_name(shape)} ({split})", y=1.01)
    show_figure(fig, cache_dir / f"montage_{split}_{preprocess.shape_name(shape)}.png")

# %% [markdown]
# ## What this run wrote, and the next step
#
# Notebook 02 pretrains on this cache (at its first shape); with several shards, give it all
# of them (a list, or a pattern such as `voco2d-cache-*/cache`).

# %%
show_outputs(
    cache_dir,
    papermill_command(
        "02_voco2d_pretrain", cache_dir.parent, cache_dir=cache_dir,
        volume_shape=list(config.shapes[0]),
    ),
)  # fmt: skip
