"""Fine-tuning the CNN-BiLSTM with patient-grouped cross-validation: notebook 03 calls
`run_cross_validation(config)`; `torchrun -m kaggle_utils.finetune.train --config ...` runs the same
on several GPUs.

What a run writes to `output_dir`:
    config.json, folds.csv                       the settings and the patient folds
    fold<k>/best.pt, fold<k>/model.json          the best epoch's weights and how to rebuild it
    fold<k>/last.pt                              the resume point (every epoch, atomically)
    fold<k>/log.csv                              one row per epoch
    fold<k>/done.json                            the fold finished (skipped on re-runs)
    preprocess.json                              windows and body crop of the training cache
    oof_series.parquet, oof_patient.parquet      out-of-fold probabilities of the best epochs
    holdout_folds_patient.parquet                every fold model on the held-out patients
    holdout_patient.parquet                      their ensemble (the mean over fold models)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from kaggle_utils.cache.preprocess import (
    cache_provenance,
    cache_settings,
    resolve_cache_dirs,
    write_model_preprocessing,
)
from kaggle_utils.common import runtime
from kaggle_utils.common.backbone import (
    enable_grad_checkpointing,
    input_normalisation,
    resolve_weights,
)
from kaggle_utils.common.config import JsonConfig
from kaggle_utils.common.engine import (
    OptimizerStep,
    ResumableSampler,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
    warmup_cosine,
)
from kaggle_utils.common.io import (
    append_csv,
    save_torch_atomic,
    truncate_csv,
    write_parquet_atomic,
    write_text_atomic,
)
from kaggle_utils.common.progress import interactive, progress_bar
from kaggle_utils.common.provenance import provenance
from kaggle_utils.finetune.data import (
    SLICE_TARGETS,
    VISIBILITY_TARGETS,
    AugmentConfig,
    SeriesDataset,
    make_folds,
    organ_visibility_labels,
    series_table,
    training_subset,
)
from kaggle_utils.finetune.losses import (
    LOSS_NORMALISATIONS,
    expected_weights,
    slice_loss,
    weighted_loss,
)
from kaggle_utils.finetune.model import CNNBiLSTM, build_classifier
from kaggle_utils.finetune.predict import (
    PROBABILITY_COLUMNS,
    aggregate_patients,
    normalised_input,
    predict_holdout,
    predict_series,
    series_log_loss,
)
from kaggle_utils.finetune.recipe import RECIPES
from kaggle_utils.finetune.report import ensemble_patients, training_prior
from kaggle_utils.metric import ALL_TARGETS, CLASS_WEIGHTS, rsna_score
from kaggle_utils.segmentation.organ_crops import bundle_segmentation
from kaggle_utils.segmentation.train import TARGET_ORGANS, organ_table

EPOCH_COLUMNS = ("epoch", "train_loss", "valid_loss", "valid_rsna", "lr", "seconds")


@dataclass
class FinetuneConfig(JsonConfig):
    """Every choice of a fine-tuning run (notebook 03's parameters). The defaults are this
    project's recipe; `FinetuneConfig.from_recipe("official")` is the authors' code
    (`finetune.recipe`)."""

    RECIPES: ClassVar[Mapping[str, Mapping[str, Any]]] = RECIPES

    # "project" (these defaults) or "official" (the authors' code); the recipe a config was
    # made from (`from_recipe`, or a notebook's `recipe` parameter)
    recipe: str = "project"
    data_root: str = ""  # competition folder with train.csv (labels)
    # notebook 01's cache, or a list of caches (its shards), each possibly a glob pattern
    cache_dir: str | list[str] = ""
    output_dir: str = "outputs/finetune"
    shape: list[int] = field(default_factory=lambda: [96, 256, 256])  # cached volume shape
    # what the model sees: "scan" (the whole scan, the paper's multi-organ setting) or an
    # organ ("liver", "spleen", "kidney", "bowel": its crop, `organ_crops`, with that organ's
    # head only: the paper's single-organ setting); `cache_dir` is then the crop cache
    input: str = "scan"
    backbone: str = "efficientnetv2_rw_t"
    init: str = "voco"  # "voco" (notebook 02's encoder), "imagenet" (local file) or "random"
    encoder_file: str = ""  # notebook 02's encoder.pt
    # ImageNet weights for init="imagenet": a file or a timm / Hugging Face model folder; ""
    # looks among Kaggle's attached inputs for the backbone's (nothing is downloaded)
    weights_file: str = ""
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2
    pooling: str = "attention"  # over slices: "max", "mean" or "attention"
    global_pool: str = "avg"  # within a slice (timm): "avg", "max" or "avgmax"
    n_slices: int = 0  # slices fed to the model: 0 for all, else evenly sampled (jittered)
    image_size: int = 256  # crop size (random crop in training, centre crop otherwise)
    epochs: int = 10
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    backbone_lr_factor: float = 1.0  # backbone lr = lr * factor
    weight_decay: float = 1e-2
    # True: norm scales and shifts and biases are decayed too (every loop here did, before);
    # default: weights only, as timm's param_groups_weight_decay
    decay_norm_and_bias: bool = False
    warmup_epochs: float = 0.5
    min_lr_factor: float = 0.01  # the cosine's floor, as a share of lr
    # the cosine's half-period in optimizer steps, after which it rises again (PyTorch's
    # CosineAnnealingLR with T_max: the official code's 5,000); 0 = one cosine over the run
    lr_cycle_steps: int = 0
    freeze_epochs: int = 0  # keep the backbone frozen for the first epochs
    grad_clip: float = 1.0
    # recompute the backbone's activations in the backward pass (timm's
    # set_grad_checkpointing): less memory, slower. This recipe's batch of 2 x 96 x 256 x 256
    # took 15.4 GB at fp16 on the H200, a T4's whole memory (docs/benchmarks.md)
    grad_checkpointing: bool = False
    any_injury_weight: float = 1.0  # weight of the auxiliary any_injury loss (0 to turn off)
    # How each weighted cross-entropy is divided: "expected" (by the batch size times the
    # training rows' mean weight: the loss is the metric in expectation) or "batch" (by the
    # batch's summed weights, torch's weight= mean: biased towards the rare classes' side at
    # small batches; the behaviour before issue 11)
    loss_normalisation: str = "expected"
    # weight of the per-slice bowel/extravasation loss from image_level_labels.csv (0: off;
    # also off when the file is missing or neither target is trained)
    slice_loss_weight: float = 1.0
    # also train the slice head on kidney, liver and spleen with soft labels: the patient's
    # injury x the organ's area on the slice (notebook 06's `organs.parquet` in
    # `segmentation_dir`; 1st place's organ visibility); whole-scan input only
    organ_visibility: bool = False
    segmentation_dir: str = ""
    # 2.5D: each slice fed with this many neighbours on either side as extra channels (1: three
    # adjacent slices); a 2D-VoCo encoder's first convolution is adapted (timm's rule)
    neighbour_slices: int = 0
    hflip_prob: float = 0.0
    vflip_prob: float = 0.0
    zflip_prob: float = 0.0  # the slice order reversed
    affine_prob: float = 0.5
    brightness_contrast_prob: float = 0.5
    coarse_dropout_prob: float = 0.3
    n_folds: int = 5
    folds_to_run: list[int] = field(default_factory=list)  # empty: all folds
    holdout: float = 0.0  # share of patients held out as a test split (the paper: 0.2)
    # the folds' and holdout's seed; -1: `seed`. Fixed across the runs of an experiment, so
    # that seeds vary the training and every setting is scored on the same patients
    fold_seed: int = -1
    # share of the training patients used (label efficiency): nested, stratified subsets,
    # the same for every run with the same folds (`finetune_data.training_subset`)
    train_fraction: float = 1.0
    aggregation: str = "mean"  # per patient over its series: "mean" or "max"
    precision: str = "auto"  # see runtime.resolve_precision: "auto", "bf16", "fp16", "fp32"
    num_workers: int = 2
    seed: int = 0
    resume: bool = True
    # stop cleanly before an epoch that would end past this many seconds (Kaggle's 12-hour
    # sessions; the next session resumes); 0 = no limit
    time_limit_s: float = 0.0

    def __post_init__(self) -> None:
        if self.recipe not in self.RECIPES:
            raise ValueError(f"recipe must be one of {tuple(self.RECIPES)}, not {self.recipe!r}")
        if self.lr_cycle_steps < 0:
            raise ValueError(f"lr_cycle_steps must be >= 0, not {self.lr_cycle_steps}")
        if self.init not in ("voco", "imagenet", "random"):
            raise ValueError(f"init must be 'voco', 'imagenet' or 'random', not {self.init!r}")
        if self.aggregation not in ("mean", "max"):
            raise ValueError(f"aggregation must be 'mean' or 'max', not {self.aggregation!r}")
        if self.precision not in runtime.PRECISIONS:
            raise ValueError(
                f"precision must be one of {runtime.PRECISIONS}, not {self.precision!r}"
            )
        if self.loss_normalisation not in LOSS_NORMALISATIONS:
            raise ValueError(
                f"loss_normalisation must be one of {LOSS_NORMALISATIONS}, not "
                f"{self.loss_normalisation!r}"
            )
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], not {self.train_fraction}")
        unknown = set(self.targets) - set(ALL_TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {ALL_TARGETS}")
        if self.neighbour_slices < 0:
            raise ValueError(f"neighbour_slices must be >= 0, not {self.neighbour_slices}")
        if self.organ_visibility and self.input != "scan":
            raise ValueError(
                "organ_visibility weights the slices of whole scans (input 'scan'); an organ "
                "crop shows its organ on nearly every slice"
            )
        if self.organ_visibility and not self.segmentation_dir:
            raise ValueError("organ_visibility needs segmentation_dir (notebook 06's run folder)")
        if self.input != "scan":
            if self.input not in TARGET_ORGANS:
                raise ValueError(
                    f"input must be 'scan' or an organ of {tuple(TARGET_ORGANS)}, not "
                    f"{self.input!r}"
                )
            if list(self.targets) != [self.input]:
                raise ValueError(
                    f"input {self.input!r} (an organ crop) trains that organ's head only: "
                    f"targets must be [{self.input!r}], not {list(self.targets)}"
                )


@dataclass
class CVResult:
    output_dir: Path
    folds: pl.DataFrame  # patient_id, fold (-1: holdout), train_order
    oof_series: pl.DataFrame  # fold, patient_id, series_id, 13 probability columns
    oof_patient: pl.DataFrame  # fold, patient_id, 13 probability columns
    # every fold model on the held-out patients (fold: the model); None without a holdout
    holdout_folds: pl.DataFrame | None
    fold_scores: dict[int, float]  # best validation RSNA score per finished fold
    finished: bool  # False when time_limit_s stopped the run; the OOF tables hold done folds
    folds_pending: list[int]  # folds still to train (or finish) when it stopped


@dataclass
class SessionClock:
    """When a session must stop: before an epoch that would end past `time_limit_s` seconds
    after `started`, an epoch estimated as the mean of those timed so far in this session
    (the first one always starts unless the time is already up). 0 = no limit."""

    time_limit_s: float
    started: float
    epoch_seconds: list[float] = field(default_factory=list)

    def room_for_epoch(self) -> bool:
        if self.time_limit_s <= 0:
            return True
        estimate = float(np.mean(self.epoch_seconds)) if self.epoch_seconds else 0.0
        return time.monotonic() - self.started + estimate <= self.time_limit_s


def stopped_message(result: CVResult) -> str:
    """What an unfinished run (stopped at time_limit_s) means and how to continue it."""
    done = ", ".join(str(k) for k in result.fold_scores) or "none"
    pending = ", ".join(str(k) for k in result.folds_pending)
    return (
        f"The run stopped at its time limit (time_limit_s): folds done: {done}; still to train: "
        f"{pending}. The report, the calibration and the plots need every fold, so they are "
        f"skipped. To continue, run this notebook again with the same output_dir "
        f"({result.output_dir}) and resume=True; on Kaggle, where a new session starts with an "
        "empty /kaggle/working, save this version, attach its output as a dataset and pass "
        f"resume_from=/kaggle/input/<that dataset>/{result.output_dir.name} (output_dir as "
        "before): it is copied in and the run resumes."
    )


def launch_torchrun(config: FinetuneConfig, nproc_per_node: int = 0) -> CVResult:
    """`run_cross_validation(config)` under torchrun (one process per GPU by default)."""
    runtime.run_torchrun(
        "kaggle_utils.finetune.train", config, Path(config.output_dir), nproc_per_node
    )
    return read_cv_result(Path(config.output_dir))


def read_cv_result(output_dir: Path) -> CVResult:
    """A run's result, from its files (finished or stopped at its time limit)."""
    output_dir = Path(output_dir)
    config = FinetuneConfig.from_json(output_dir / "config.json")
    fold_ids = config.folds_to_run or list(range(config.n_folds))
    scores = {}
    for fold in fold_ids:
        done_file = output_dir / f"fold{fold}" / "done.json"
        if done_file.is_file():
            scores[fold] = float(json.loads(done_file.read_text())["best_score"])
    pending = [k for k in fold_ids if k not in scores]
    oof_series = _fold_oof(output_dir, list(scores))
    holdout_file = output_dir / "holdout_folds_patient.parquet"
    return CVResult(
        output_dir=output_dir,
        folds=pl.read_csv(output_dir / "folds.csv"),
        oof_series=oof_series,
        oof_patient=aggregate_patients(oof_series, config.aggregation, by_fold=True),
        holdout_folds=(
            pl.read_parquet(holdout_file) if not pending and holdout_file.is_file() else None
        ),
        fold_scores=scores,
        finished=not pending,
        folds_pending=pending,
    )


def _fold_oof(output_dir: Path, fold_ids: Sequence[int]) -> pl.DataFrame:
    """The best epochs' out-of-fold series predictions of these folds, one table."""
    frames = [pl.read_parquet(output_dir / f"fold{k}" / "oof_series.parquet") for k in fold_ids]
    if frames:
        return pl.concat(frames)
    schema = {"fold": pl.Int32, "patient_id": pl.Int64, "series_id": pl.Int64}
    return pl.DataFrame(schema=schema | {c: pl.Float64 for c in PROBABILITY_COLUMNS})


def read_labels(data_root: str | Path) -> pl.DataFrame:
    path = Path(data_root) / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data_root must be the competition folder")
    return pl.read_csv(path)


IMAGE_LABELS_FILE = "image_level_labels.csv"


def slice_targets(config: FinetuneConfig) -> tuple[str, ...]:
    """The targets trained with slice-level labels in this run (possibly none): bowel and
    extravasation from image_level_labels.csv, kidney, liver and spleen with
    `organ_visibility`."""
    if config.slice_loss_weight <= 0:
        return ()
    found: list[str] = []
    if (Path(config.data_root) / IMAGE_LABELS_FILE).is_file():
        found += [t for t in SLICE_TARGETS if t in config.targets]
    if config.organ_visibility:
        found += [t for t in VISIBILITY_TARGETS if t in config.targets]
    return tuple(found)


def run_cross_validation(config: FinetuneConfig, progress: bool = True) -> CVResult:
    """Train every fold not done yet (resuming an interrupted one), then gather out-of-fold
    and holdout predictions. Works alone or under torchrun (DDP).

    With `config.time_limit_s`, stops cleanly between epochs (every rank at the same one),
    before one that would not end in time; the result then says `finished=False` and the
    next call resumes from `fold<k>/last.pt`."""
    clock = SessionClock(config.time_limit_s, time.monotonic())
    distributed = runtime.init_distributed()
    rank = dist.get_rank() if distributed else 0
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labels = read_labels(config.data_root)
    folds = _load_or_make_folds(labels, config, output_dir, rank, distributed)
    image_labels = None
    if set(slice_targets(config)) & set(SLICE_TARGETS):
        image_labels = pl.read_csv(Path(config.data_root) / IMAGE_LABELS_FILE)
    table = series_table(labels, config.cache_dir, config.shape, image_labels=image_labels).join(
        folds, on="patient_id"
    )
    if config.organ_visibility:
        visibility = organ_visibility_labels(
            organ_table(config.segmentation_dir), labels, config.shape[0]
        )
        table = table.join(visibility, on="series_id", how="left")
    if rank == 0:
        config.to_json(output_dir / "config.json")
        # The windows and body crop travel with the model folder (notebook 04 on Kaggle has
        # the models but not the training cache).
        write_model_preprocessing(
            output_dir, cache_settings(config.cache_dir), cache_provenance(config.cache_dir)
        )
        if config.input != "scan":  # notebook 04 cuts the same crops from the test scans
            crop_cache = resolve_cache_dirs(config.cache_dir)[0]
            if not bundle_segmentation(output_dir, crop_cache, config.segmentation_dir or None):
                print(
                    f"note: no segmentation model in segmentation_dir "
                    f"({config.segmentation_dir or 'not given'}) copied into {output_dir}: "
                    "notebook 04 needs one to crop the test scans"
                )

    fold_ids = config.folds_to_run or list(range(config.n_folds))
    scores: dict[int, float] = {}
    for fold in fold_ids:
        # validation folds and the holdout keep every patient; only training is subset
        subset = training_subset(folds, config.train_fraction, fold)["patient_id"].to_list()
        train_rows = table.filter(pl.col("patient_id").is_in(subset))
        valid_rows = table.filter(pl.col("fold") == fold)
        score = train_fold(config, fold, train_rows, valid_rows, labels, progress, clock)
        if score is None:  # the time limit: the folds left wait for the next session
            break
        scores[fold] = score
    pending = [k for k in fold_ids if k not in scores]
    if distributed:
        dist.barrier()
    oof_series = _fold_oof(output_dir, list(scores))
    oof_patient = aggregate_patients(oof_series, config.aggregation, by_fold=True)
    holdout_folds = None
    holdout_rows = table.filter(pl.col("fold") == -1)
    if not pending and holdout_rows.height and rank == 0:
        holdout_folds = predict_holdout(config, holdout_rows, fold_ids)
        write_parquet_atomic(holdout_folds, output_dir / "holdout_folds_patient.parquet")
        write_parquet_atomic(
            ensemble_patients(holdout_folds), output_dir / "holdout_patient.parquet"
        )
    if not pending and rank == 0:
        write_parquet_atomic(oof_series, output_dir / "oof_series.parquet")
        write_parquet_atomic(oof_patient, output_dir / "oof_patient.parquet")
    if pending and rank == 0 and progress:
        print(f"time limit: stopped with folds {pending} still to train; re-run to resume")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return CVResult(
        output_dir, folds, oof_series, oof_patient, holdout_folds, scores, not pending, pending
    )


def train_fold(
    config: FinetuneConfig,
    fold: int,
    train_rows: pl.DataFrame,
    valid_rows: pl.DataFrame,
    labels: pl.DataFrame,
    progress: bool = True,
    clock: SessionClock | None = None,
) -> float | None:
    """Train one fold (or resume it); keep the epoch with the best validation RSNA score.

    Returns that score, or None when `clock` stopped the session before the fold's last
    epoch (its `last.pt` is the resume point). A fold with a `done.json` is not trained again.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = runtime.device_for(distributed)
    fold_dir = Path(config.output_dir) / f"fold{fold}"
    done_file = fold_dir / "done.json"
    if config.resume and done_file.is_file():
        return float(json.loads(done_file.read_text())["best_score"])
    if rank == 0:
        fold_dir.mkdir(parents=True, exist_ok=True)
    if train_rows.height == 0 or valid_rows.height == 0:
        raise ValueError(f"fold {fold}: {train_rows.height} training and {valid_rows.height} "
                         "validation series; use fewer folds or more data")  # fmt: skip
    runtime.seed_everything(config.seed + 1000 * fold + rank)

    in_chans = _in_chans(train_rows) * (2 * config.neighbour_slices + 1)
    model = _build_model(config, in_chans).to(device)
    trained_model: nn.Module = model
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        # find_unused_parameters: the backbone is frozen (no gradient) in the first epochs
        trained_model = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=config.freeze_epochs > 0
        )
    mean, std = input_normalisation(model.backbone, device)
    augment = AugmentConfig(
        hflip_prob=config.hflip_prob, vflip_prob=config.vflip_prob, zflip_prob=config.zflip_prob,
        affine_prob=config.affine_prob, brightness_contrast_prob=config.brightness_contrast_prob,
        coarse_dropout_prob=config.coarse_dropout_prob,
    )  # fmt: skip
    train_set = SeriesDataset(
        train_rows, config.targets, config.n_slices, config.image_size, True, augment,
        config.seed + fold, model.slice_targets, config.neighbour_slices,
    )  # fmt: skip
    sampler = ResumableSampler(len(train_set), config.seed + fold, rank, world)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    backbone_lr = config.lr * config.backbone_lr_factor
    head = [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [
        *parameter_groups(
            model.backbone.named_parameters(), config.weight_decay, config.decay_norm_and_bias,
            lr=backbone_lr,
        ),
        *parameter_groups(head, config.weight_decay, config.decay_norm_and_bias),
    ]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, warmup, total_steps, config.min_lr_factor, config.lr_cycle_steps
        ),
    )
    precision = runtime.resolve_precision(config.precision, device)
    step = OptimizerStep(
        optimizer, scheduler, precision, config.grad_accum, config.grad_clip,
        clip_parameters=model.parameters(), ddp_model=trained_model if distributed else None,
    )  # fmt: skip
    class_weights = {t: torch.tensor(CLASS_WEIGHTS[t], device=device) for t in config.targets}
    normalisers = None
    if config.loss_normalisation == "expected":
        normalisers = expected_weights(train_rows)
    prior = training_prior(
        labels.join(train_rows.select("patient_id").unique(), on="patient_id", how="semi")
    )

    model.start_at_prior(prior)
    epoch, best_score = 0, math.inf
    last_file = fold_dir / "last.pt"
    if config.resume and last_file.is_file():
        resumed = load_checkpoint(last_file, {"model": model}, step, device)
        epoch, best_score = int(resumed["epoch"]), float(resumed["best_score"])
    if rank == 0:
        truncate_csv(fold_dir / "log.csv", epoch, EPOCH_COLUMNS, key="epoch")
        _model_json(config, in_chans, fold_dir / "model.json", prior)

    started = time.monotonic()
    # in a log the epoch lines below are the progress; a bar redrawn under each would double it
    bar = progress_bar(
        total=config.epochs, initial=epoch, desc=f"fold {fold}", unit="epoch",
        disable=not progress or rank != 0 or not interactive(),
    )  # fmt: skip
    while epoch < config.epochs:
        stop = clock is not None and not clock.room_for_epoch()
        if distributed:
            stop = runtime.agree(stop, device)  # every rank stops before the same epoch
        if stop:
            bar.close()
            return None
        epoch_started = time.monotonic()
        model.set_backbone_trainable(epoch >= config.freeze_epochs)
        train_set.set_epoch(epoch)
        sampler.set_position(epoch, 0)
        loader = DataLoader(
            train_set, batch_size=config.batch_size, sampler=sampler,
            num_workers=config.num_workers, pin_memory=device.type == "cuda",
        )  # fmt: skip
        trained_model.train()
        model.set_backbone_trainable(epoch >= config.freeze_epochs)
        losses: list[float] = []
        for micro, batch in enumerate(loader):
            last_micro = step.is_last(micro, len(loader))
            with step.sync(last_micro):
                with precision.autocast():
                    # through DDP's wrapper when there is one: it only calls forward
                    logits, slice_logits = trained_model(
                        normalised_input(batch["image"], mean, std), with_slices=True
                    )
                loss = weighted_loss(
                    logits, batch["labels"].to(device), batch["any_injury"].to(device),
                    class_weights, config.any_injury_weight, normalisers,
                )  # fmt: skip
                if slice_logits is not None:
                    slice_labels = batch["slice_labels"].to(device)
                    loss = loss + config.slice_loss_weight * slice_loss(slice_logits, slice_labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"fold {fold} epoch {epoch + 1} batch {micro + 1}: non-finite loss; "
                        f"resume from {last_file} with a lower lr"
                    )
                step.backward(loss)
            if last_micro:
                step.step()
            losses.append(float(loss.detach()))
        epoch += 1
        train_loss = float(np.mean(losses)) if losses else float("nan")
        if distributed:
            train_loss = runtime.mean_over_ranks({"loss": train_loss}, device)["loss"]
        if rank == 0:
            series_probs = predict_series(model, valid_rows, config, device, fold, prior)
            patient_probs = aggregate_patients(series_probs, config.aggregation)
            valid_labels = labels.join(
                patient_probs.select("patient_id"), on="patient_id", how="semi"
            )
            score = rsna_score(valid_labels, patient_probs.drop("fold", strict=False))
            valid_loss = series_log_loss(valid_rows, series_probs, config.targets)
            if score < best_score:
                best_score = score
                save_torch_atomic(model.state_dict(), fold_dir / "best.pt")
                write_parquet_atomic(series_probs, fold_dir / "oof_series.parquet")
            append_csv(
                fold_dir / "log.csv",
                {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss,
                 "valid_rsna": score, "lr": scheduler.get_last_lr()[-1],
                 "seconds": round(time.monotonic() - started, 2)},
                EPOCH_COLUMNS,
            )  # fmt: skip
            if progress:
                bar.write(
                    f"fold {fold} epoch {epoch}: train {train_loss:.4f} valid rsna {score:.4f}"
                )
            bar.update()
            save_checkpoint(
                last_file, {"model": model}, step, {"epoch": epoch, "best_score": best_score}
            )
        if distributed:
            dist.barrier()
        if clock is not None:
            clock.epoch_seconds.append(time.monotonic() - epoch_started)
    bar.close()
    if rank == 0:
        write_text_atomic(
            done_file, json.dumps({"best_score": best_score, "epochs": config.epochs})
        )
    return best_score


def _in_chans(rows: pl.DataFrame) -> int:
    volume = np.load(rows["path"][0], mmap_mode="r")
    return 1 if volume.ndim == 3 else int(volume.shape[1])


def _build_model(config: FinetuneConfig, in_chans: int) -> CNNBiLSTM:
    weights = resolve_weights(config.weights_file, config.backbone, config.init)
    model = build_classifier(
        config.backbone, in_chans, config.init,  # type: ignore[arg-type]
        encoder_file=config.encoder_file or None, weights_file=weights or None,
        targets=config.targets, hidden_size=config.hidden_size, num_layers=config.num_layers,
        dropout=config.dropout, pooling=config.pooling,  # type: ignore[arg-type]
        global_pool=config.global_pool, slice_targets=slice_targets(config),
    )  # fmt: skip
    if config.grad_checkpointing:
        enable_grad_checkpointing(model.backbone)
    return model


def _model_json(config: FinetuneConfig, in_chans: int, path: Path, prior: dict[str, float]) -> None:
    meta = {
        "input": config.input,
        "backbone": config.backbone,
        "in_chans": in_chans,
        "targets": list(config.targets),
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "dropout": config.dropout,
        "pooling": config.pooling,
        "global_pool": config.global_pool,
        "slice_targets": list(slice_targets(config)),
        "neighbour_slices": config.neighbour_slices,
        "n_slices": config.n_slices,
        "image_size": config.image_size,
        "shape": list(config.shape),
        "aggregation": config.aggregation,
        "prior": prior,
        "settings": dataclasses.asdict(config),
        "provenance": provenance(),
    }
    write_text_atomic(path, json.dumps(meta, indent=1))


def _load_or_make_folds(
    labels: pl.DataFrame, config: FinetuneConfig, output_dir: Path, rank: int, distributed: bool
) -> pl.DataFrame:
    """The run's folds: read back on resume so that a re-run never reshuffles patients."""
    path = output_dir / "folds.csv"
    if rank == 0 and not (config.resume and path.is_file()):
        seed = config.seed if config.fold_seed < 0 else config.fold_seed
        folds = make_folds(labels, config.n_folds, seed, config.holdout)
        write_text_atomic(path, folds.write_csv())
    if distributed:
        dist.barrier()
    return pl.read_csv(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="CNN-BiLSTM cross-validation (single process or torchrun)"
    )
    parser.add_argument("--config", required=True, help="a config.json written by FinetuneConfig")
    args = parser.parse_args()
    result = run_cross_validation(FinetuneConfig.from_json(args.config))
    print(json.dumps({"fold_scores": result.fold_scores}))


if __name__ == "__main__":
    main()
