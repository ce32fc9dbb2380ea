"""Test DICOMs -> `submission.csv`, offline: the step notebook 04 runs (`predict_test_set`).

Every test series is decoded and preprocessed on the fly with exactly notebook 01's code
(`load_series`, then `prepare_volumes`), while the model works on the previous one; every fold
model of a notebook 03 run predicts it (optionally with a left-right flip as test-time
augmentation), the folds are averaged, the series of a patient aggregated (mean or max), and
the table is checked against `sample_submission.csv` before it is written atomically.

The file is always complete: a patient without series, an empty or undecodable series folder,
or a series the model fails on falls back to the patient's other series, else to the prior
(the mean of the folds' best-constant predictions, SPEC section 7); every fallback is logged
and listed in `SubmissionResult.problems`.

Preprocessing settings (windows, body crop) must be those the models were trained with. They
are looked up, in this order, in:

1. `<model_dir>/preprocess.json`, written by `save_preprocess_settings` (so that they travel
   with the model folder to Kaggle, where notebook 01's cache is not attached);
2. the training cache(s) named by `<model_dir>/config.json` (`cache_dir`), when readable;
3. the default: one soft-tissue window (50/400) with body crop, accepted only if the models
   take one channel.

What a model folder may hold besides notebook 03's files:
    preprocess.json     {"windows": [[level, width], ...], "body_crop": bool}
    calibration.json    blend with the prior and per-column scaling, fitted by notebook 03
                        on the out-of-fold predictions (`calibration.fit_calibration`)

Nothing here reaches for the network: models are rebuilt from `model.json` with random
weights and loaded from `best.pt` with `weights_only=True` (`finetune.load_fold_model`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from kaggle_utils.cache.dicom import (
    NO_DECODER,
    decoder_report,
    load_series,
    series_transfer_syntax,
    syntax_support,
)
from kaggle_utils.cache.preprocess import (
    PREPROCESS_FILE,
    PreprocessConfig,
    SeriesTask,
    cache_provenance,
    cache_settings,
    list_series,
    prepare_volumes,
    resolve_cache_dirs,
    write_model_preprocessing,
)
from kaggle_utils.cache.volume import DEFAULT_WINDOWS
from kaggle_utils.common import paths, runtime
from kaggle_utils.common.backbone import input_normalisation
from kaggle_utils.common.io import atomic_path
from kaggle_utils.common.progress import progress_bar
from kaggle_utils.common.provenance import provenance, same_code
from kaggle_utils.finetune.calibration import Calibration, apply_calibration, read_calibration
from kaggle_utils.finetune.data import (
    AugmentConfig,
    build_transform,
    label_columns,
    slice_indices,
    slice_stack,
)
from kaggle_utils.finetune.importance import SeriesExplanation, explain_input
from kaggle_utils.finetune.model import CNNBiLSTM
from kaggle_utils.finetune.predict import (
    PROBABILITY_COLUMNS,
    aggregate_patients,
    load_fold_model,
    probability_columns,
    volume_probabilities,
)
from kaggle_utils.finetune.report import ensemble_patients
from kaggle_utils.metric import (
    ALL_TARGETS,
    LABEL_COLUMNS,
    PATIENT_ID,
    SCORE_PARTS,
    best_constant_prediction,
    constant_submission,
    rsna_score_parts,
    validate_submission,
)
from kaggle_utils.segmentation.organ_crops import (
    RUN_SEGMENTATION_DIR,
    CropConfig,
    OrganLocator,
    crop_from_rows,
    read_crop_config,
)

logger = logging.getLogger(__name__)

SAMPLE_SUBMISSION = "sample_submission.csv"
SUBMISSION_NAME = "submission.csv"

PROBLEM_SCHEMA = {
    "patient_id": pl.Int64,
    "series_id": pl.Int64,
    "stage": pl.String,  # missing, decode, preprocess, predict, ignored
    "reason": pl.String,
    "fallback": pl.String,  # "other series", "prior" or "not predicted"
}
TIMING_SCHEMA = {
    "patient_id": pl.Int64,
    "series_id": pl.Int64,
    "status": pl.String,  # "ok" or the stage that failed
    "n_slices": pl.Int64,  # decoded slices (0 when decoding failed)
    "decode_s": pl.Float64,
    "preprocess_s": pl.Float64,
    "model_s": pl.Float64,
}
FALLBACK_OTHER = "other series"
FALLBACK_PRIOR = "prior"


# --------------------------------------------------------------------------- results


@dataclass
class SubmissionResult:
    """What `predict_test_set` made, wrote and measured."""

    submission: pl.DataFrame  # sample_submission's columns and patient order
    problems: pl.DataFrame  # PROBLEM_SCHEMA: one row per fallback
    timings: pl.DataFrame  # TIMING_SCHEMA: one row per series
    csv_path: Path
    series: pl.DataFrame = field(default_factory=pl.DataFrame)  # fold-mean per good series
    # every fold model per good series (fold: the model), before calibration
    series_by_model: pl.DataFrame = field(default_factory=pl.DataFrame)
    prior: dict[str, float] = field(default_factory=dict)  # the fallback probabilities
    settings: dict[str, Any] = field(default_factory=dict)  # device, folds, windows, ...
    wall_seconds: float = 0.0  # the whole call, model loading included

    @property
    def prior_patients(self) -> list[int]:
        """The patients that got the prior: none of their series could be used."""
        prior = self.problems.filter(pl.col("fallback") == FALLBACK_PRIOR)
        return sorted(set(prior["patient_id"].to_list()))

    @property
    def prior_share(self) -> float:
        """The share of the submission's patients that got the prior (0 when all worked)."""
        return len(self.prior_patients) / max(self.submission.height, 1)

    def summary(self) -> pl.DataFrame:
        """Mean seconds per study (a patient: all its series) and per series for decoding,
        preprocessing and the model, their total, and the wall clock of the run (less than
        the total when decoding overlaps the model; includes model loading)."""
        per_study = self.timings.group_by("patient_id").agg(
            pl.col("decode_s", "preprocess_s", "model_s").sum()
        )
        n_studies = max(per_study.height, 1)
        n_series = max(self.timings.height, 1)
        rows = []
        for what in ("decode", "preprocess", "model"):
            total = float(self.timings[f"{what}_s"].sum())
            rows.append((what, total / n_studies, total / n_series, total))
        total = sum(r[3] for r in rows)
        rows.append(("total", total / n_studies, total / n_series, total))
        wall = self.wall_seconds
        rows.append(("wall clock", wall / n_studies, wall / n_series, wall))
        return pl.DataFrame(
            rows, schema=["what", "per_study_s", "per_series_s", "sum_s"], orient="row"
        )


@dataclass
class PreparedSeries:
    """One series after decoding and preprocessing, or why it could not be (picklable: it
    comes back from a worker process)."""

    patient_id: int
    series_id: int
    volume: np.ndarray | None  # uint8 (S, H, W) or (S, C, H, W), the first shape asked for
    n_slices: int = 0
    # the other shapes asked for (organ-crop runs read the segmentation's and the crops'
    # source shape)
    others: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    decode_s: float = 0.0
    preprocess_s: float = 0.0
    stage: str | None = None  # the stage that failed, None when it worked
    error: str | None = None


@dataclass
class FoldModel:
    """A fold's model on its device, with its model.json and input normalisation."""

    fold: int
    model: CNNBiLSTM
    meta: dict[str, Any]
    mean: Tensor
    std: Tensor


@dataclass
class ModelRun:
    """One notebook 03 run folder as notebook 04 uses it: its fold models, their calibration
    and, for organ-crop models, how to cut their input from a test scan."""

    run_dir: Path
    folds: list[FoldModel]
    predictor: EnsemblePredictor
    calibration: Calibration | None = None
    crop: CropConfig | None = None
    locator: OrganLocator | None = None

    @property
    def input(self) -> str:
        return str(self.folds[0].meta.get("input", "scan"))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.folds[0].meta["targets"])

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The cached shapes this run reads from a test series."""
        if self.crop is None or self.locator is None:
            return [tuple(int(v) for v in self.folds[0].meta["shape"])]
        return [tuple(self.crop.source_shape), self.locator.shape]


# --------------------------------------------------------------------------- paths


def resolve_model_dir(model_dir: str | Path = "") -> Path:
    """The fine-tuning run folder: `model_dir` if given, else outputs/finetune (or
    /kaggle/working/finetune), else on Kaggle the first attached input (dataset, notebook
    output or model, in either mount layout, a few folders deep) that holds
    finished folds (`fold_dirs`).

    Raises:
        FileNotFoundError: the folder has no fold model, or none was found (says where it looked).
    """
    if str(model_dir):
        found = [p for p in paths.find_inputs(model_dir) if p.is_dir()]
        path = next((p for p in found if fold_dirs(p)), Path(model_dir).expanduser())
        if not fold_dirs(path):
            raise FileNotFoundError(
                f"{path}: no finished fold (fold<k>/ with best.pt, model.json and done.json); "
                "give the folder notebook 03 wrote (its output_dir), or the Kaggle dataset "
                "that holds a copy of it"
            )
        return path
    candidates = [
        paths.default_output_root() / "finetune",
        paths.project_root() / "outputs" / "finetune",
    ]
    if paths.on_kaggle():
        candidates += list(_kaggle_input_folders())
    for path in candidates:
        if fold_dirs(path):
            return path
    raise FileNotFoundError(
        "no fine-tuned models found (looked for fold<k>/model.json in "
        f"{', '.join(str(c) for c in candidates[:2])} and, on Kaggle, the attached inputs): "
        "pass model_dir=<notebook 03's output folder>"
    )


def resolve_model_dirs(model_dir: str | Path | Sequence[str | Path] = "") -> list[Path]:
    """One run folder (`resolve_model_dir`) or several: e.g. a whole-scan run and organ-crop
    runs, whose predictions `predict_test_set` combines per target."""
    if isinstance(model_dir, (str, Path)):
        return [resolve_model_dir(model_dir)]
    if not model_dir:
        raise ValueError("model_dir: an empty list; give at least one notebook 03 run folder")
    return [resolve_model_dir(d) for d in model_dir]


def _kaggle_input_folders(max_depth: int = 6, max_children: int = 64) -> Iterator[Path]:
    """Folders under /kaggle/input, breadth first, a few levels deep (model datasets may sit
    at /kaggle/input/<slug>/, /kaggle/input/datasets/<owner>/<slug>/<folder>/ or deeper for
    Kaggle Models). The competition folder, and folders with many subfolders (image trees),
    are not descended into."""
    frontier = [paths.kaggle_input()]
    for _ in range(max_depth):
        deeper: list[Path] = []
        for folder in frontier:
            try:
                children = sorted(c for c in folder.iterdir() if c.is_dir())
            except OSError:
                continue
            if folder != paths.kaggle_input() and len(children) > max_children:
                continue
            for child in children:
                if child.name == paths.COMPETITION_NAME:
                    continue
                yield child
                deeper.append(child)
        frontier = deeper


def resolve_output_csv(output_csv: str | Path = "") -> Path:
    """`output_csv` if given, else /kaggle/working/submission.csv on Kaggle (where the
    competition looks for it), else submission.csv in the default output folder
    (`paths.default_output_root`: outputs/ in the project)."""
    if str(output_csv):
        return Path(output_csv).expanduser()
    return paths.default_output_root() / SUBMISSION_NAME


def fold_dirs(model_dir: Path, finished_only: bool = True) -> list[Path]:
    """`fold<k>/` folders with `best.pt` and `model.json`, in fold order; by default only
    those whose training finished (`done.json`): a fold that notebook 03 stopped at its time
    limit has the best epoch of a run cut short, not a model to submit."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = [
        d
        for d in model_dir.glob("fold*")
        if d.name[4:].isdigit()
        and (d / "best.pt").is_file()
        and (d / "model.json").is_file()
        and (not finished_only or (d / "done.json").is_file())
    ]
    return sorted(found, key=lambda d: int(d.name[4:]))


# --------------------------------------------------------------------------- models


def load_fold_models(model_dir: Path, device: torch.device) -> list[FoldModel]:
    """Every fold model of a run, checked to share what the shared input needs.

    Raises:
        FileNotFoundError: no fold model.
        ValueError: folds that disagree on the volume shape or the number of channels.
    """
    folds = []
    for fold_dir in fold_dirs(model_dir):
        model, meta = load_fold_model(fold_dir, device)
        mean, std = input_normalisation(model.backbone, device)
        folds.append(FoldModel(int(fold_dir.name[4:]), model, meta, mean, std))
    if not folds:
        raise FileNotFoundError(
            f"{model_dir}: no finished fold (fold<k>/ with best.pt, model.json and done.json)"
        )
    unfinished = [d.name for d in fold_dirs(model_dir, finished_only=False)]
    unfinished = [name for name in unfinished if name not in {f"fold{f.fold}" for f in folds}]
    if unfinished:
        logger.warning(
            "%s: %s not finished (no done.json: notebook 03 stopped early?), left out",
            model_dir, ", ".join(unfinished),
        )  # fmt: skip
    first = folds[0].meta
    for fold in folds[1:]:
        for key in ("shape", "in_chans", "input"):
            if fold.meta.get(key, "scan") != first.get(key, "scan"):
                raise ValueError(
                    f"{model_dir}: fold{fold.fold} has {key} {fold.meta.get(key)}, fold"
                    f"{folds[0].fold} {first.get(key)}: the folds of one run must share it"
                )
    return folds


def ensemble_prior(folds: Sequence[FoldModel]) -> dict[str, float]:
    """The fallback probabilities: the mean of the folds' priors (each the best constant of
    its training folds); each group still sums to 1."""
    return {c: float(np.mean([f.meta["prior"][c] for f in folds])) for c in LABEL_COLUMNS}


def load_model_runs(
    run_dirs: Sequence[Path], device: torch.device, tta: bool = False, precision: str = "auto"
) -> list[ModelRun]:
    """Every run's fold models (`load_fold_models`), calibration and, for an organ-crop run
    (notebook 03's `input` an organ), its crop settings and segmentation model.

    Raises:
        FileNotFoundError: a run without finished folds, or an organ-crop run without
            crop.json or segmentation/ (copy the whole run folder).
        ValueError: an organ-crop run whose crop.json cuts another organ than it trained on.
    """
    runs = []
    for run_dir in run_dirs:
        folds = load_fold_models(Path(run_dir), device)
        run = ModelRun(
            Path(run_dir), folds, EnsemblePredictor(folds, tta, precision),
            read_calibration(run_dir),
        )  # fmt: skip
        if run.input != "scan":
            run.crop = read_crop_config(run_dir)
            run.locator = OrganLocator(Path(run_dir) / RUN_SEGMENTATION_DIR, device)
            if run.crop.organ != run.input:
                raise ValueError(
                    f"{run_dir}: models trained on {run.input} crops, crop.json cuts "
                    f"{run.crop.organ}"
                )
        runs.append(run)
    return runs


def model_input(
    volume: np.ndarray, n_slices: int, transform: Any, neighbours: int = 0
) -> np.ndarray:
    """A uint8 volume (S, H, W) or (S, C, H, W) -> the model's (s, C', h, w) input, exactly as
    `finetune_data.SeriesDataset` evaluates it: evenly spaced slices (with `neighbours` slices
    on either side as channels, 2.5D), then the centre crop of
    `build_transform(image_size, train=False)` applied to all slices as one image."""
    if volume.ndim == 3:
        volume = volume[:, None]
    volume = slice_stack(volume, slice_indices(volume.shape[0], n_slices), neighbours)
    count, channels, height, width = volume.shape
    image = volume.reshape(count * channels, height, width).transpose(1, 2, 0)
    image = transform(image=np.ascontiguousarray(image))["image"]
    stack = image.transpose(2, 0, 1).reshape(count, channels, *image.shape[:2])
    return np.ascontiguousarray(stack)


class EnsemblePredictor:
    """Series volumes -> the 13 probability columns, averaged over folds (and over the
    left-right flip with `tta`), at the `precision` of `runtime.resolve_precision` ("auto":
    bf16 on GPUs that have it natively, fp16 on a T4 or P100, fp32 on the CPU)."""

    def __init__(
        self, folds: Sequence[FoldModel], tta: bool = False, precision: str = "auto"
    ) -> None:
        self.folds = list(folds)
        self.tta = tta
        self.device = folds[0].mean.device
        self._precision = runtime.resolve_precision(precision, self.device)
        sizes = {int(f.meta["image_size"]) for f in self.folds}
        self._transforms = {size: build_transform(size, False, AugmentConfig()) for size in sizes}

    @property
    def precision(self) -> str:
        return self._precision.name

    def predict(self, volumes: Sequence[np.ndarray]) -> dict[str, list[float]]:
        """{column: one probability per volume}, in `PROBABILITY_COLUMNS` order: the mean of
        the fold models."""
        per_model = self.predict_per_model(volumes)
        return {
            c: np.mean([columns[c] for columns in per_model.values()], axis=0).tolist()
            for c in PROBABILITY_COLUMNS
        }

    @torch.inference_mode()
    def predict_per_model(self, volumes: Sequence[np.ndarray]) -> dict[int, dict[str, list[float]]]:
        """{fold: {column: one probability per volume}}, every fold model's prediction."""
        inputs: dict[tuple[int, int, int], Tensor] = {}
        per_model: dict[int, dict[str, list[float]]] = {}
        for fold in self.folds:
            key = (
                int(fold.meta["n_slices"]),
                int(fold.meta["image_size"]),
                int(fold.meta.get("neighbour_slices", 0)),
            )
            if key not in inputs:
                transform = self._transforms[key[1]]
                batch = np.stack([model_input(v, key[0], transform, key[2]) for v in volumes])
                images = torch.from_numpy(batch)
                inputs[key] = images.pin_memory() if self.device.type == "cuda" else images
            images = inputs[key]
            probabilities = self._probabilities(fold, images)
            if self.tta:
                flipped = self._probabilities(fold, images.flip(-1))
                probabilities = {t: (p + flipped[t]) / 2 for t, p in probabilities.items()}
            per_model[fold.fold] = probability_columns(
                probabilities, len(volumes), fold.meta["prior"]
            )
        return per_model

    def _probabilities(self, fold: FoldModel, images: Tensor) -> dict[str, np.ndarray]:
        return volume_probabilities(fold.model, images, fold.mean, fold.std, self._precision)


# --------------------------------------------------------------------------- preprocessing


def save_preprocess_settings(model_dir: Path, config: PreprocessConfig | None = None) -> Path:
    """Write `<model_dir>/preprocess.json` (windows, body crop), from `config` or else from the
    training cache named in the run's config.json, so that the settings travel with the model
    folder to Kaggle. Run it once after notebook 03, while the cache is still there.

    Raises:
        FileNotFoundError: no `config` and the training cache cannot be read.
    """
    model_dir = Path(model_dir)
    cache_dirs = _training_cache_dirs(model_dir)
    if config is None:
        if cache_dirs is None:
            raise FileNotFoundError(f"{model_dir}: config.json names no training cache_dir")
        config = cache_settings(cache_dirs)
    made_by = cache_provenance(cache_dirs) if cache_dirs is not None else None
    return write_model_preprocessing(model_dir, config, made_by)


def preprocess_settings(model_dir: Path, meta: Mapping[str, Any]) -> tuple[PreprocessConfig, str]:
    """The preprocessing of the test series: the models' volume shape with the windows and
    body crop they were trained with, and where those came from (see the module docstring).

    Raises:
        ValueError: the settings found give a number of channels the models do not take.
    """
    shape = tuple(int(v) for v in meta["shape"])
    model_dir = Path(model_dir)
    windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS
    body_crop, source = True, "default (soft tissue 50/400, body crop)"
    cache_dirs = _training_cache_dirs(model_dir, meta)
    if (model_dir / PREPROCESS_FILE).is_file():
        saved = json.loads((model_dir / PREPROCESS_FILE).read_text())
        windows, body_crop = saved["windows"], bool(saved["body_crop"])
        source = str(model_dir / PREPROCESS_FILE)
    elif cache_dirs is not None:
        named = ", ".join(str(d) for d in cache_dirs)
        try:
            cached = cache_settings(cache_dirs)
            windows, body_crop = cached.windows, cached.body_crop
            source = f"training cache {named}"
        except (FileNotFoundError, OSError, KeyError, json.JSONDecodeError) as error:
            logger.info("training cache %s not readable (%s): default windows", named, error)
    config = PreprocessConfig.from_params([shape], windows, body_crop)
    slices_per_input = 2 * int(meta.get("neighbour_slices", 0)) + 1
    if len(config.windows) * slices_per_input != int(meta["in_chans"]):
        raise ValueError(
            f"the models take {meta['in_chans']} channels ({slices_per_input} slice(s) of the "
            f"windows each) but the windows from {source} give {len(config.windows)}: put the "
            f"training windows in {model_dir / PREPROCESS_FILE} "
            '({"windows": [[level, width], ...], "body_crop": true}; save_preprocess_settings '
            "writes it from the training cache)"
        )
    return config, source


def preprocessing_warnings(runs: Sequence[ModelRun], source: str) -> list[str]:
    """Why the preprocessing notebook 04 applies may not be the one the models were trained
    on: no record of it at all (the default window is a guess), preprocess.json and the
    training cache disagreeing, or training volumes made by other code than this (the cache's
    provenance against this package's commit)."""
    found = []
    if source.startswith("default"):
        found.append(
            "no preprocess.json beside the models and no readable training cache: the default "
            "soft-tissue window 50/400 with body crop is applied. If the models were trained "
            "otherwise, every prediction is off: write the training settings with "
            "save_preprocess_settings(<model_dir>) where the cache is, and attach that folder"
        )
    here = provenance()
    for run in runs:
        saved_file = run.run_dir / PREPROCESS_FILE
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
        cache_dirs = _training_cache_dirs(run.run_dir, run.folds[0].meta)
        if saved and cache_dirs is not None:
            try:
                cached = cache_settings(cache_dirs)
            except (FileNotFoundError, OSError, KeyError, ValueError, json.JSONDecodeError):
                cached = None
            kept = ([list(w) for w in saved["windows"]], bool(saved["body_crop"]))
            if cached is not None and kept != ([list(w) for w in cached.windows], cached.body_crop):
                found.append(
                    f"{saved_file} says windows {kept[0]}, body crop {kept[1]}, but the training "
                    f"cache {cache_dirs[0]} was made with {[list(w) for w in cached.windows]}, "
                    f"{cached.body_crop}: preprocess.json's are applied"
                )
        made_by = saved.get("cache_made_by")
        if same_code(made_by) is False:
            found.append(
                f"the training volumes of {run.run_dir.name} were made by {made_by['package']} "
                f"at commit {made_by['git_commit'][:12]}, this is {here['package']} at "
                f"{here['git_commit'][:12]}: if decoding or resampling changed in between, the "
                "test volumes are not made as the training ones were"
            )
    return found


def shared_preprocessing(runs: Sequence[ModelRun]) -> tuple[PreprocessConfig, str]:
    """The preprocessing of the test series for every run: the windows and body crop they
    share (`preprocess_settings` of each), every cached shape any of them reads (the first
    run's first), and where the settings came from.

    Raises:
        ValueError: runs trained with different windows or body crop.
    """
    found = [preprocess_settings(run.run_dir, run.folds[0].meta) for run in runs]
    first, source = found[0]
    for run, (config, _) in zip(runs[1:], found[1:], strict=True):
        if (config.windows, config.body_crop) != (first.windows, first.body_crop):
            raise ValueError(
                f"{run.run_dir} was trained with windows {config.windows}, body crop "
                f"{config.body_crop}; {runs[0].run_dir} with {first.windows}, "
                f"{first.body_crop}: the runs of one submission must share the preprocessing"
            )
    shapes: list[tuple[int, ...]] = []
    for run in runs:
        shapes += [s for s in run.shapes if s not in shapes]
    return dataclasses.replace(first, shapes=tuple(shapes)), source  # type: ignore[arg-type]


def _training_cache_dirs(
    model_dir: Path, meta: Mapping[str, Any] | None = None
) -> list[Path] | None:
    """notebook 03's cache folder(s), from config.json (else from model.json's settings): a
    folder or a list of them (or glob patterns); None when they are not all there (on Kaggle
    the training cache is usually not attached to the scoring run)."""
    config_file = Path(model_dir) / "config.json"
    settings: Mapping[str, Any] = {}
    if config_file.is_file():
        settings = json.loads(config_file.read_text())
    elif meta is not None:
        settings = meta.get("settings", {})
    try:
        return resolve_cache_dirs(settings.get("cache_dir") or "")
    except (FileNotFoundError, ValueError):
        return None


def prepare_series(task: SeriesTask, config: PreprocessConfig) -> PreparedSeries:
    """Decode and preprocess one series as notebook 01 does; never raises for bad data (the
    failure comes back as `stage` and `error`, so that one series never stops a run)."""
    prepared = PreparedSeries(task.patient_id, task.series_id, None)
    start = time.perf_counter()
    try:
        series = load_series(task.series_dir, reuse_memory=True)  # only the volume is kept
    except Exception as error:  # reported by the caller, see docstring
        prepared.decode_s = time.perf_counter() - start
        prepared.stage, prepared.error = "decode", f"{type(error).__name__}: {error}"
        return prepared
    prepared.decode_s = time.perf_counter() - start
    prepared.n_slices = int(series.hu.shape[0])
    start = time.perf_counter()
    try:
        volumes, _ = prepare_volumes(series, config)
        prepared.volume = volumes[config.shapes[0]]
        prepared.others = {tuple(s): volumes[s] for s in config.shapes[1:]}
    except Exception as error:  # reported by the caller, see docstring
        prepared.stage, prepared.error = "preprocess", f"{type(error).__name__}: {error}"
    prepared.preprocess_s = time.perf_counter() - start
    return prepared


def prefetched_series(
    tasks: Sequence[SeriesTask], config: PreprocessConfig, workers: int = -1
) -> Iterator[PreparedSeries]:
    """`prepare_series` of every task, in order, the next ones prepared while the caller works
    on the current one: in `workers` child processes (-1: one per CPU core), or in this thread
    (`workers` 0, for debugging: a crash in native code then takes the caller down with it).

    At most `workers + 1` series are in flight, so memory stays bounded. A worker process that
    dies (a crash in native code, out of memory) costs only its series: that one is retried
    alone, recorded as failed if it kills its process again, and the others go on in a fresh
    pool.
    """
    workers = resolve_workers(workers)
    if workers == 0:
        for task in tasks:
            yield prepare_series(task, config)
        return
    remaining = iter(tasks)
    executor = _executor(workers)
    pending: deque[tuple[SeriesTask, Any]] = deque(
        (t, executor.submit(prepare_series, t, config)) for t in islice(remaining, workers + 1)
    )
    try:
        while pending:
            task, future = pending.popleft()
            try:
                prepared = future.result()
            except BrokenProcessPool:
                executor.shutdown(wait=False, cancel_futures=True)
                prepared = _prepare_isolated(task, config)
                executor = _executor(workers)
                pending = deque((t, executor.submit(prepare_series, t, config)) for t, _ in pending)
            upcoming = next(remaining, None)
            if upcoming is not None:
                pending.append((upcoming, executor.submit(prepare_series, upcoming, config)))
            yield prepared
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def resolve_workers(workers: int) -> int:
    """Decoding processes for `workers`: -1 is one per CPU core this process may use.

    Raises:
        ValueError: below -1.
    """
    if workers < -1:
        raise ValueError(
            f"workers must be -1 (one per core), 0 (this thread) or more, not {workers}"
        )
    if workers == -1:
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    return workers


def _executor(workers: int) -> Executor:
    """A process pool checked to start and to import this module: "spawn" workers cannot start
    from a script without an `if __name__ == "__main__":` guard and would fail every series;
    such a caller gets one background thread instead (no crash isolation, said loudly)."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pool.submit(_worker_ready).result()
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        logger.warning(
            "worker processes cannot start (a script without an `if __name__ == "
            '"__main__":` guard?): decoding in one background thread instead, where a '
            "crash in a decoder would end the run"
        )
        return ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    return pool


def _worker_ready() -> int:
    """A no-op that a worker can only run once it has imported this module."""
    return os.getpid()


def _prepare_isolated(task: SeriesTask, config: PreprocessConfig) -> PreparedSeries:
    """A series whose worker died, retried alone in a fresh process."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(prepare_series, task, config).result()
        except BrokenProcessPool:
            return PreparedSeries(
                task.patient_id, task.series_id, None, stage="decode",
                error="the worker process died while decoding this series (a crash in native "
                "code, or out of memory)",
            )  # fmt: skip


# --------------------------------------------------------------------------- the submission


def read_sample_submission(data_root: Path) -> pl.DataFrame:
    """`sample_submission.csv`: its columns and patient order are the submission's contract.

    Raises:
        FileNotFoundError: it is missing.
        ValueError: it does not have exactly `patient_id` and the 13 probability columns.
    """
    path = Path(data_root) / SAMPLE_SUBMISSION
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data_root must be the competition folder")
    sample = pl.read_csv(path)
    expected = {PATIENT_ID, *LABEL_COLUMNS}
    if set(sample.columns) != expected:
        missing = sorted(expected - set(sample.columns))
        extra = sorted(set(sample.columns) - expected)
        raise ValueError(f"{path}: missing columns {missing}, unknown columns {extra}")
    return sample


def write_submission(submission: pl.DataFrame, sample: pl.DataFrame, path: Path) -> Path:
    """Validate (`metric.validate_submission`) and only then write, to a temporary sibling
    renamed into place: a refused table leaves no file, a killed run never half a file."""
    validate_submission(submission, sample)
    path = Path(path)
    with atomic_path(path) as tmp:
        submission.write_csv(tmp)
    return path


class PriorShareError(RuntimeError):
    """Too many patients got the prior (a broken install or data problem, not a model one).
    The submission was still written; the error stops the run so that it is noticed."""


PREFLIGHT_SCHEMA = {
    "transfer_syntax": pl.String,
    "n_series": pl.Int64,
    "n_patients": pl.Int64,
    "readers": pl.String,  # SyntaxSupport.readers: "dicomsdl then pydicom (...)", "NO DECODER"
}


NO_IMAGE_FILE = "no image file"  # the preflight's row for series without a readable header


def decoding_preflight(data_root: str | Path = "", split: str = "test") -> pl.DataFrame:
    """Before a long run: the transfer syntax of every series (one header read each) and
    what will decode it here. A syntax with reader "NO DECODER" means those series fail and
    their patients get the prior, unless the patient has another series: fix the install
    (the bundle's wheels) before the scoring run. Series with no readable first file count
    under NO_IMAGE_FILE (a data problem, not an install one)."""
    root = paths.resolve_data_root(data_root)
    try:
        tasks = list_series(root, split)
    except FileNotFoundError:
        tasks = []
    by_syntax: dict[str, list[SeriesTask]] = {}
    for task in tasks:
        syntax = series_transfer_syntax(task.series_dir) or NO_IMAGE_FILE
        by_syntax.setdefault(syntax, []).append(task)
    rows = []
    for syntax, members in sorted(by_syntax.items(), key=lambda kv: -len(kv[1])):
        readers = "nothing to read" if syntax == NO_IMAGE_FILE else syntax_support(syntax).readers
        rows.append(
            {"transfer_syntax": syntax, "n_series": len(members),
             "n_patients": len({t.patient_id for t in members}), "readers": readers}
        )  # fmt: skip
    return pl.DataFrame(rows, schema=PREFLIGHT_SCHEMA)


def startup_report(data_root: str | Path = "") -> tuple[str, list[str]]:
    """What notebook 04 prints first: the installed decoders and the test set's transfer
    syntaxes with what reads each, and the warnings (a missing decoder; series no decoder
    here can read, whose patients will get the prior unless they have another series)."""
    text, problems = decoder_report()
    preflight = decoding_preflight(data_root)
    lines = [text, "test series by transfer syntax:"]
    for row in preflight.to_dicts():
        lines.append(
            f"  {_syntax_name(row['transfer_syntax'])}: {row['n_series']} series of "
            f"{row['n_patients']} patients, read by {row['readers']}"
        )
        if row["transfer_syntax"] == NO_IMAGE_FILE:
            problems.append(
                f"{row['n_series']} test series of {row['n_patients']} patients have no DICOM "
                "image file (a missing or empty folder, or no file with a DICOM header among "
                "the first ones): those patients get the prior unless another of their series "
                "works. Check the data folder."
            )
        elif row["readers"] == NO_DECODER:
            problems.append(
                f"{row['n_series']} test series of {row['n_patients']} patients "
                f"({row['transfer_syntax']}) cannot be decoded here: those patients get the "
                "prior unless another of their series works. "
                "Fix the install (the bundle's wheels) before the scoring run."
            )
    return "\n".join(lines), problems


def _syntax_name(uid: str) -> str:
    """ "1.2.840.10008.1.2.5 (RLE Lossless)", or the text as it is when it is not a known UID."""
    from pydicom.uid import UID

    name = UID(uid).name if uid[:1].isdigit() else uid
    return uid if name == uid else f"{uid} ({name})"


def predict_test_set(
    data_root: str | Path = "",
    model_dir: str | Path | Sequence[str | Path] = "",
    output_csv: str | Path = "",
    *,
    batch_size: int = 1,
    tta: bool = False,
    aggregation: str | None = None,
    device: str | torch.device = "auto",
    workers: int = -1,
    precision: str = "auto",
    max_prior_share: float = 1.0,
    combine: str = "organ",
    progress: bool = True,
) -> SubmissionResult:
    """Predict every patient of `sample_submission.csv` from its test DICOMs and write the
    submission (see the module docstring for the whole story).

    Args:
        data_root: the competition folder ("": Kaggle's input, else inputs/...); read only.
        model_dir: notebook 03's run folder ("": see `resolve_model_dir`), or a list of
            them: e.g. a whole-scan run and organ-crop runs (`input` an organ), combined per
            target by `combine_runs`. An organ-crop run's segmentation model (in its folder)
            locates the organ in every test scan; where it finds none, the crop is the whole
            scan (recorded as a problem with fallback "whole scan").
        output_csv: where to write ("": /kaggle/working/submission.csv on Kaggle, else
            outputs/submission.csv).
        batch_size: series per forward pass (all volumes share the models' shape).
        tta: also predict the left-right flipped volume and average (helps only models
            trained with flips: notebook 03's `hflip_prob`, off by default).
        aggregation: "mean" or "max" over a patient's series; None: the models' setting.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        workers: decoding processes (-1: one per CPU core), so that a decoder crash costs one
            series, never the run; 0 decodes in this thread (debugging only).
        precision: "auto" (bf16 on GPUs with native bf16, fp16 on older ones, fp32 on the
            CPU), or "bf16", "fp16", "fp32" (`runtime.resolve_precision`).
        max_prior_share: fail (after writing the file) when more than this share of the
            patients got the prior; 1.0 never fails (the scoring run), e.g. 0.05 in an
            interactive run catches a broken install before the scoring run does.
        combine: with several runs, each target from the mean of the organ-crop runs
            trained on it where there are any, the whole-scan runs giving only the others
            and the rows the crop runs lack ("organ", the default: on the demo the kidney
            crop alone scored 0.050 on its part against 0.333 averaged with the whole scan,
            docs/submission.md), or of every run trained on it ("mean").
        progress: show a progress bar over series.

    Raises:
        FileNotFoundError: no sample submission or no fold model.
        ValueError: bad arguments, or a submission that fails validation (nothing written).
        PriorShareError: more than `max_prior_share` of the patients got the prior (the
            valid file is written first).
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, not {combine!r}")
    if not 0.0 <= max_prior_share <= 1.0:
        raise ValueError(f"max_prior_share must be in [0, 1], not {max_prior_share}")
    root = paths.resolve_data_root(data_root)
    run_dirs = resolve_model_dirs(model_dir)
    csv_path = resolve_output_csv(output_csv)
    sample = read_sample_submission(root)
    torch_device = runtime.pick_device(device)
    runs = load_model_runs(run_dirs, torch_device, tta, precision)
    folds = [fold for run in runs for fold in run.folds]
    how = aggregation or folds[0].meta.get("aggregation", "mean")
    if how not in ("mean", "max"):
        raise ValueError(f"aggregation must be 'mean' or 'max', not {how!r}")
    if tta and not all(f.meta.get("settings", {}).get("hflip_prob", 0) > 0 for f in folds):
        logger.warning("tta: the models were trained without left-right flips (hflip_prob 0)")
    config, source = shared_preprocessing(runs)
    prior = ensemble_prior(folds)
    settings = {
        "data_root": str(root), "model_dir": ", ".join(str(d) for d in run_dirs),
        "folds": [f.fold for f in runs[0].folds],
        "runs": [
            {"model_dir": str(r.run_dir), "input": r.input, "targets": list(r.targets),
             "folds": [f.fold for f in r.folds]}
            for r in runs
        ],
        "device": str(torch_device), "precision": runs[0].predictor.precision, "tta": tta,
        "aggregation": how, "combine": combine, "batch_size": batch_size,
        "workers": resolve_workers(workers),
        "shape": list(config.shapes[0]), "windows": [list(w) for w in config.windows],
        "body_crop": config.body_crop, "preprocessing_from": source,
        "preprocessing_warnings": preprocessing_warnings(runs, source),
        "calibration": (
            dataclasses.asdict(runs[0].calibration) if runs[0].calibration else None
        ),
    }  # fmt: skip
    logger.info("submission settings: %s", settings)
    for warning in settings["preprocessing_warnings"]:
        logger.warning("preprocessing: %s", warning)

    tasks, problems = _test_series(root, sample)
    series_rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    batch: list[PreparedSeries] = []
    bar = progress_bar(total=len(tasks), desc="test series", unit="series", disable=not progress)
    for prepared in prefetched_series(tasks, config, workers):
        if prepared.stage is None:
            batch.append(prepared)
        else:
            _record_failure(prepared, problems, timings)
        if len(batch) == batch_size:
            _predict_batch(runs, batch, series_rows, problems, timings)
            batch = []
        bar.update()
    if batch:
        _predict_batch(runs, batch, series_rows, problems, timings)
    bar.close()

    series_by_model = pl.DataFrame(
        series_rows,
        schema={"run": pl.Int64, "fold": pl.Int64, "patient_id": pl.Int64, "series_id": pl.Int64}
        | dict.fromkeys(PROBABILITY_COLUMNS, pl.Float64),
    )
    run_patients, run_series = [], []
    for index, run in enumerate(runs):
        rows = series_by_model.filter(pl.col("run") == index).drop("run")
        # Per fold model first: the calibration was fitted on single models' out-of-fold
        # predictions, so it is applied to each model's before the ensemble averages them.
        per_model = aggregate_patients(rows, how, by_fold=True)
        if run.calibration is not None:
            per_model = apply_calibration(per_model, run.calibration)
        run_patients.append(ensemble_patients(per_model))
        run_series.append(
            rows.group_by(["patient_id", "series_id"], maintain_order=True).agg(
                pl.col(c).mean() for c in PROBABILITY_COLUMNS
            )
        )
    trained = [run.targets for run in runs]
    given, fallback = trained, None
    if combine == "organ":
        given, fallback = organ_run_targets(trained, [run.input for run in runs]), trained
    patients = combine_runs(run_patients, given, ["patient_id"], fallback)
    series = combine_runs(run_series, given, ["patient_id", "series_id"], fallback)
    submission = _assemble(sample, patients, prior)
    problem_table = _with_fallbacks(problems, set(patients["patient_id"].to_list()))
    write_submission(submission, sample, csv_path)
    logger.info(
        "%s: %d patients, %d from the prior; %d series predicted, %d problems",
        csv_path, submission.height, submission.height - patients.height, series.height,
        problem_table.height,
    )  # fmt: skip
    result = SubmissionResult(
        submission=submission,
        problems=problem_table,
        timings=pl.DataFrame(timings, schema=TIMING_SCHEMA).sort("patient_id", "series_id"),
        csv_path=csv_path,
        series=series,
        series_by_model=series_by_model,
        prior=prior,
        settings=settings,
        wall_seconds=time.perf_counter() - started,
    )
    if result.prior_share > 0:
        logger.warning(
            "%d of %d patients (%.1f %%) got the prior: see the problems table",
            len(result.prior_patients), submission.height, 100 * result.prior_share,
        )  # fmt: skip
    if result.prior_share > max_prior_share:
        raise PriorShareError(
            f"{len(result.prior_patients)} of {submission.height} patients "
            f"({100 * result.prior_share:.1f} %) got the prior, more than max_prior_share "
            f"{max_prior_share:g}. {csv_path} was written and is valid, but check the install "
            "(decoders at the top of the notebook) and the problems: "
            f"{_problem_summary(problem_table)}"
        )
    return result


def _problem_summary(problems: pl.DataFrame, limit: int = 3) -> str:
    """The most common failure reasons, for an error message."""
    if problems.height == 0:
        return "none recorded"
    counts = problems.group_by("stage", "reason").len().sort("len", descending=True).head(limit)
    return "; ".join(f"{r['len']} x {r['stage']}: {r['reason']}" for r in counts.to_dicts())


def _test_series(root: Path, sample: pl.DataFrame) -> tuple[list[SeriesTask], list[dict[str, Any]]]:
    """The series of the sample's patients (folders plus test_series_meta.csv rows), and a
    problem for every sample patient without any series and every series of a patient the
    sample does not have."""
    problems: list[dict[str, Any]] = []
    try:
        found = list_series(root, "test")
    except FileNotFoundError as error:
        logger.warning("no test series at all: %s", error)
        found = []
    wanted = [int(p) for p in sample[PATIENT_ID].to_list()]
    wanted_set = set(wanted)
    tasks = [t for t in found if t.patient_id in wanted_set]
    for task in found:
        if task.patient_id not in wanted_set:
            reason = "patient not in sample_submission.csv"
            logger.warning(
                "patient %d series %d: ignored, %s", task.patient_id, task.series_id, reason
            )
            problems.append(_problem(task.patient_id, task.series_id, "ignored", reason))
    with_series = {t.patient_id for t in tasks}
    for patient in wanted:
        if patient not in with_series:
            reason = "no series folder in test_images/ and no row in test_series_meta.csv"
            logger.warning("patient %d series -: %s", patient, reason)
            problems.append(_problem(patient, None, "missing", reason))
    return tasks, problems


def _problem(patient_id: int, series_id: int | None, stage: str, reason: str) -> dict[str, Any]:
    return {"patient_id": patient_id, "series_id": series_id, "stage": stage, "reason": reason}


def _record_failure(
    prepared: PreparedSeries, problems: list[dict[str, Any]], timings: list[dict[str, Any]]
) -> None:
    logger.warning(
        "patient %d series %d: %s failed: %s",
        prepared.patient_id, prepared.series_id, prepared.stage, prepared.error,
    )  # fmt: skip
    problems.append(
        _problem(prepared.patient_id, prepared.series_id, str(prepared.stage), str(prepared.error))
    )
    timings.append(_timing(prepared, str(prepared.stage), 0.0))


def _timing(prepared: PreparedSeries, status: str, model_s: float) -> dict[str, Any]:
    return {
        "patient_id": prepared.patient_id, "series_id": prepared.series_id, "status": status,
        "n_slices": prepared.n_slices, "decode_s": prepared.decode_s,
        "preprocess_s": prepared.preprocess_s, "model_s": model_s,
    }  # fmt: skip


def _predict_batch(
    runs: Sequence[ModelRun],
    batch: list[PreparedSeries],
    series_rows: list[dict[str, Any]],
    problems: list[dict[str, Any]],
    timings: list[dict[str, Any]],
) -> None:
    """Predict a batch with every run; if it fails, each series alone, so that one bad series
    costs only itself (recorded at stage "predict")."""
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []  # kept only if the batch works (a retry repeats them)
    try:
        locations: list[dict[str, list[dict[str, Any]]]] = [{} for _ in batch]
        for run_index, run in enumerate(runs):
            inputs = [
                run_input(run, prepared, located, notes)
                for prepared, located in zip(batch, locations, strict=True)
            ]
            per_model = run.predictor.predict_per_model(inputs)
            for index, prepared in enumerate(batch):
                for fold, columns in per_model.items():
                    rows.append(
                        {"run": run_index, "fold": fold, "patient_id": prepared.patient_id,
                         "series_id": prepared.series_id}
                        | {c: values[index] for c, values in columns.items()}
                    )  # fmt: skip
    except Exception as error:  # retried per series below
        if len(batch) > 1:
            logger.info("a batch of %d series failed (%s): one by one", len(batch), error)
            for prepared in batch:
                _predict_batch(runs, [prepared], series_rows, problems, timings)
            return
        _empty_cuda_cache()
        prepared = batch[0]
        prepared.stage, prepared.error = "predict", f"{type(error).__name__}: {error}"
        _record_failure(prepared, problems, timings)
        return
    series_rows.extend(rows)
    for note in notes:
        logger.warning(
            "patient %d series %d: %s", note["patient_id"], note["series_id"], note["reason"]
        )
    problems.extend(notes)
    seconds = (time.perf_counter() - start) / len(batch)
    for prepared in batch:
        timings.append(_timing(prepared, "ok", seconds))


FALLBACK_WHOLE_SCAN = "whole scan"


def run_input(
    run: ModelRun,
    prepared: PreparedSeries,
    located: dict[str, list[dict[str, Any]]],
    notes: list[dict[str, Any]],
) -> np.ndarray:
    """The volume a run's models read from a prepared test series: the scan at the run's
    shape, or for an organ-crop run the organ's crop, located by the run's segmentation model
    (once per series and model: `located` keeps the organ rows by model). Where the organ is
    not found, or the segmentation fails, the crop is the whole scan, noted in `notes`."""
    if run.crop is None or run.locator is None:
        return _volume_at(prepared, run.shapes[0])
    if run.locator.key not in located:
        try:
            located[run.locator.key] = run.locator.locate(
                _volume_at(prepared, run.locator.shape), prepared.series_id, prepared.patient_id
            )
        except Exception as error:  # the crop falls back to the whole scan, noted below
            located[run.locator.key] = []
            notes.append(
                _problem(prepared.patient_id, prepared.series_id, "segment",
                         f"segmentation failed ({type(error).__name__}: {error})")
                | {"fallback": FALLBACK_WHOLE_SCAN}
            )  # fmt: skip
    volume = _volume_at(prepared, run.crop.source_shape)
    crop, reason = crop_from_rows(volume, located[run.locator.key], run.crop)
    if reason is not None and located[run.locator.key]:
        notes.append(
            _problem(prepared.patient_id, prepared.series_id, "segment", reason)
            | {"fallback": FALLBACK_WHOLE_SCAN}
        )
    return crop


def _volume_at(prepared: PreparedSeries, shape: Sequence[int]) -> np.ndarray:
    shape = tuple(int(v) for v in shape)
    assert prepared.volume is not None
    if shape in prepared.others:
        return prepared.others[shape]
    return prepared.volume


COMBINE_RULES = ("mean", "organ")


def organ_run_targets(
    run_targets: Sequence[Sequence[str]], run_inputs: Sequence[str]
) -> list[tuple[str, ...]]:
    """The targets each run gives under the "organ" rule: a target some organ-crop run was
    trained on is dropped from the whole-scan runs, so that `combine_runs` takes it from the
    crop runs alone."""
    cropped = {t for targets, kind in zip(run_targets, run_inputs, strict=True)
               if kind != "scan" for t in targets}  # fmt: skip
    return [
        tuple(targets) if kind != "scan" else tuple(t for t in targets if t not in cropped)
        for targets, kind in zip(run_targets, run_inputs, strict=True)
    ]


def combine_runs(
    tables: Sequence[pl.DataFrame],
    run_targets: Sequence[Sequence[str]],
    keys: Sequence[str],
    fallback_targets: Sequence[Sequence[str]] | None = None,
) -> pl.DataFrame:
    """Several runs' probability tables (rows named by `keys`) -> one: each target's columns
    are the mean over the runs `run_targets` gives it to (e.g. a liver-crop run and a
    whole-scan run for liver) that have the row, else over the runs `fallback_targets` gives
    it to (the runs trained on it, under the "organ" rule), else over all runs (their
    prior-filled columns)."""
    keys = list(keys)
    stacked = pl.concat(
        [t.select(*keys, *PROBABILITY_COLUMNS).with_columns(pl.lit(i).alias("_run"))
         for i, t in enumerate(tables)]
    )  # fmt: skip
    combined = stacked.group_by(keys).agg(pl.col(c).mean() for c in PROBABILITY_COLUMNS)
    for target in ALL_TARGETS:
        columns = label_columns(target)
        tiers = [run_targets] + ([fallback_targets] if fallback_targets is not None else [])
        found = []  # most preferred first
        for tier in tiers:
            runs = [i for i, targets in enumerate(tier) if target in targets]
            if runs and len(runs) < len(tables) and runs not in found:
                found.append(runs)
        for tier_index, runs in enumerate(found):
            means = (
                stacked.filter(pl.col("_run").is_in(runs))
                .group_by(keys)
                .agg(pl.col(c).mean().alias(f"_{tier_index}_{c}") for c in columns)
            )
            combined = combined.join(means, on=keys, how="left")
        combined = combined.with_columns(
            pl.coalesce(*[f"_{k}_{c}" for k in range(len(found))], c).alias(c) for c in columns
        ).drop(f"_{k}_{c}" for k in range(len(found)) for c in columns)
    return combined.select(*keys, *PROBABILITY_COLUMNS).sort(keys)


def _empty_cuda_cache() -> None:
    """After a failure on the GPU (often out of memory), give the cached blocks back."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _assemble(
    sample: pl.DataFrame, patients: pl.DataFrame, prior: Mapping[str, float]
) -> pl.DataFrame:
    """The sample's patients in its order and its columns; the prior where no series worked."""
    order = sample.select(PATIENT_ID).with_row_index("_row")
    predicted = patients.select(PATIENT_ID, *LABEL_COLUMNS).with_columns(
        pl.col(PATIENT_ID).cast(sample.schema[PATIENT_ID])
    )
    joined = order.join(predicted, on=PATIENT_ID, how="left").sort("_row")
    filled = joined.with_columns(pl.col(c).fill_null(float(prior[c])) for c in LABEL_COLUMNS)
    return filled.select(sample.columns)


def _with_fallbacks(problems: list[dict[str, Any]], predicted: set[int]) -> pl.DataFrame:
    """Each problem with what its patient got instead; one log line per prior fallback."""
    rows = []
    for problem in problems:
        if "fallback" in problem:  # said when it was recorded (an organ crop's whole scan)
            rows.append(problem)
            continue
        if problem["stage"] == "ignored":
            fallback = "not predicted"
        elif problem["patient_id"] in predicted:
            fallback = FALLBACK_OTHER
        else:
            fallback = FALLBACK_PRIOR
        rows.append(problem | {"fallback": fallback})
    for patient in sorted({r["patient_id"] for r in rows if r["fallback"] == FALLBACK_PRIOR}):
        logger.warning("patient %d: no usable series, the prior is used", patient)
    return pl.DataFrame(rows, schema=PROBLEM_SCHEMA)


# --------------------------------------------------------------------------- explaining


def explain_test_patients(
    data_root: str | Path,
    model_dir: str | Path | Sequence[str | Path],
    patients: Sequence[int] | int,
    method: str = "auto",
    device: str | torch.device = "auto",
    workers: int = -1,
) -> list[SeriesExplanation]:
    """Which slices drove the prediction for these test patients (ids, or the first n of
    sample_submission.csv): every series of theirs is
    decoded and preprocessed as `predict_test_set` does, and the first run's first fold model
    gives each target's slice importance (`importance.explain_input`) on the input it reads
    (the whole scan, or its organ crop). Series that cannot be read are skipped, with a warning.
    Decoding runs in `workers` processes as in `predict_test_set`, so that a decoder crash
    costs the series, not the caller.
    """
    root = paths.resolve_data_root(data_root)
    runs = load_model_runs(resolve_model_dirs(model_dir)[:1], runtime.pick_device(device))
    run, fold = runs[0], runs[0].folds[0]
    config, _ = shared_preprocessing(runs)
    n_slices, image_size = int(fold.meta["n_slices"]), int(fold.meta["image_size"])
    neighbours = int(fold.meta.get("neighbour_slices", 0))
    transform = build_transform(image_size, False, AugmentConfig())
    if isinstance(patients, int):
        patients = read_sample_submission(root)[PATIENT_ID].head(patients).to_list()
    wanted = {int(p) for p in patients}
    explanations = []
    tasks = [t for t in list_series(root, "test") if t.patient_id in wanted]
    for prepared in prefetched_series(tasks, config, workers):
        if prepared.stage is not None:
            logger.warning(
                "series %d: %s failed, not explained", prepared.series_id, prepared.stage
            )
            continue
        volume = run_input(run, prepared, {}, [])
        images = torch.from_numpy(model_input(volume, n_slices, transform, neighbours))
        seen = slice_indices(volume.shape[0], n_slices)
        explanation = explain_input(
            fold.model, images, prepared.patient_id, prepared.series_id, seen, neighbours, method
        )
        explanations.append(explanation)
    return explanations


# --------------------------------------------------------------------------- scoring


def score_against_labels(
    submission: pl.DataFrame,
    labels_csv: str | Path,
    prior: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The RSNA score and its six parts of a submission against labels (the demo's
    `test_labels.csv`, or a holdout), beside those of the prior on the same patients.

    `prior`: the fallback probabilities (`SubmissionResult.prior`); None uses the labels' own
    best constant, an oracle no constant can beat there.

    Returns {"n_patients": n, "submission": {"rsna_score", <part>: ...}, "prior": {...}}.

    Raises:
        ValueError: the labels and the submission share no patient.
    """
    labels = pl.read_csv(labels_csv)
    truth = labels.join(submission.select(PATIENT_ID), on=PATIENT_ID, how="semi")
    if truth.height == 0:
        raise ValueError(f"{labels_csv}: no patient of the submission has a label")
    predictions = submission.join(truth.select(PATIENT_ID), on=PATIENT_ID, how="semi")
    values = dict(prior) if prior is not None else best_constant_prediction(truth)
    constant = constant_submission(truth[PATIENT_ID].to_list(), values)
    return {
        "n_patients": truth.height,
        "submission": _scored(truth, predictions),
        "prior": _scored(truth, constant),
    }


def _scored(truth: pl.DataFrame, predictions: pl.DataFrame) -> dict[str, float]:
    parts = rsna_score_parts(truth, predictions)
    return {"rsna_score": float(np.mean(list(parts.values())))} | {
        part: float(parts[part]) for part in SCORE_PARTS
    }


def score_table(scores: Mapping[str, Any]) -> pl.DataFrame:
    """`score_against_labels`' result as a table: one row for the submission, one for the
    prior, columns the score and its six parts (lower is better)."""
    return pl.DataFrame([{"prediction": name} | scores[name] for name in ("submission", "prior")])
