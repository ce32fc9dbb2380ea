"""The paper's experiments as one batch: a grid of papermill runs of notebooks 02 (2D-VoCo
pretraining) and 03 (fine-tuning) under one experiment folder, and one report. Notebook 05
calls `run_experiment(config)`.

Presets (`ExperimentConfig.presets`):
    table1            fine-tuning from scratch / ImageNet (when `weights_file` is given) /
                      2D-VoCo / 2D-VoCo with extra unlabeled volumes (when `extra_dirs` is
                      given), per backbone and seed; the baseline is "from scratch"
    label_efficiency  the same initialisations on `fractions` of the training patients (the
                      same nested subsets for every initialisation); baseline: from scratch
                      at the same fraction
    grid              every combination of `grid` (notebook 03 parameters; "pretrain.<name>"
                      for notebook 02's), per backbone and seed; baseline: the first one
    table2            the paper's Table 2: multi-organ (one whole-scan run, every head) against
                      single-organ (one run per organ of `organs` on that organ's crop, its
                      head only: notebook 03's `input`), from scratch and with 2D-VoCo; each
                      organ scored by held-out AUC and its part of the RSNA score. Needs
                      notebook 06's `segmentation_dir`; `crop_params` set notebook 03's
                      parameters of the single-organ runs (e.g. a smaller `shape`)

Every run holds out the same patients (`holdout`, `fold_seed`), so settings are compared on
the same folds and held-out patients; seeds vary the training only.

What `experiment_dir` holds:
    experiment.json               the settings
    plan.json                     every planned run: preset, setting, factors, parameters
    pretrain/<key>/               one notebook-02 run, shared by every run that uses it
    runs/<key>/                   one notebook-03 run (params.json beside its outputs)
    minutes.json                  wall-clock minutes per run
    report.md, report.json        the tables, the paired differences, what was skipped
    label_efficiency.png          the curve, when that preset ran

A run's folder is named by a hash of its parameters: a run that two presets share runs once,
a finished one is skipped on the next call, and an interrupted one resumes (notebooks 02 and
03 resume from their checkpoints in the same folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.common import paths
from kaggle_utils.common.config import JsonConfig
from kaggle_utils.common.io import save_figure_atomic, write_text_atomic
from kaggle_utils.common.progress import progress_bar
from kaggle_utils.finetune.report import CV_OPTIMISM_NOTE
from kaggle_utils.metric import SCORE_PARTS, patient_loss_terms

PRESETS = ("table1", "label_efficiency", "grid", "table2")
TABLE2_SETTINGS = ("random", "voco")  # from scratch, 2D-VoCo
# Initialisations of the fine-tuned backbone: the paper's Table 1 rows (ImageNet, ImageNet +
# 2D-VoCo, and both without ImageNet), and 2D-VoCo with extra unlabeled CT.
SETTINGS: dict[str, str] = {
    "random": "from scratch",
    "imagenet": "ImageNet",
    "voco": "2D-VoCo",
    "imagenet_voco": "ImageNet + 2D-VoCo",
    "voco_extra": "2D-VoCo + extra unlabeled",
}
IMAGENET_SETTINGS = ("imagenet", "imagenet_voco")  # need ImageNet weights
VOCO_SETTINGS = ("voco", "imagenet_voco", "voco_extra")  # need a pretraining
RECIPES = ("official", "project")
PRETRAIN_PREFIX = "pretrain."
METRICS = (
    "rsna_score",
    *(f"loss_{part}" for part in SCORE_PARTS),
    "mAP",
    "macro_precision",
    "macro_recall",
)
PRETRAIN_NOTEBOOK = "02_voco2d_pretrain.ipynb"
FINETUNE_NOTEBOOK = "03_finetune_bilstm.ipynb"
# papermill.execute_notebook's signature: (input, output, parameters) -> None
Executor = Callable[[Path, Path, dict[str, Any]], None]


@dataclass
class ExperimentConfig(JsonConfig):
    """Every choice of an experiment batch (notebook 05's parameters)."""

    experiment_dir: str = "outputs/experiments"
    data_root: str = ""  # competition folder with train.csv
    cache_dir: str | list[str] = ""  # notebook 01's cache(s), for notebooks 02 and 03
    presets: list[str] = field(default_factory=lambda: ["table1", "label_efficiency"])
    # notebooks 02 and 03's recipes, each a full set of rows: "official" (the authors' code,
    # what the paper's comparison ran) and/or "project"
    recipes: list[str] = field(default_factory=lambda: ["official"])
    backbones: list[str] = field(default_factory=lambda: ["efficientnetv2_rw_t"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1.0])
    # initialisations of the label-efficiency curve ("imagenet" needs weights_file)
    curve_settings: list[str] = field(default_factory=lambda: ["random", "voco"])
    # ImageNet weights (file or timm / Hugging Face folder) for the ImageNet rows; "": found
    # among Kaggle's attached inputs by each backbone's name, else those rows are skipped
    weights_file: str = ""
    extra_dirs: list[str] = field(default_factory=list)  # extra unlabeled CT for notebook 02
    pretrain_params: dict[str, Any] = field(default_factory=dict)  # notebook 02, every run
    finetune_params: dict[str, Any] = field(default_factory=dict)  # notebook 03, every run
    grid: dict[str, list[Any]] = field(default_factory=dict)  # for the "grid" preset
    # table2: the organs with a single-organ run, notebook 06's run, and notebook 03
    # parameters of the single-organ runs (over finetune_params)
    organs: list[str] = field(default_factory=lambda: ["liver", "spleen", "kidney"])
    segmentation_dir: str = ""
    crop_params: dict[str, Any] = field(default_factory=dict)
    holdout: float = 0.2  # the paper's share of held-out patients
    n_folds: int = 5
    fold_seed: int = 0  # the same folds and held-out patients for every run
    n_bootstrap: int = 2000  # resamples of the held-out patients for paired differences
    notebooks_dir: str = ""  # where notebooks 02 and 03 are; "": the project's notebooks/

    def __post_init__(self) -> None:
        unknown = sorted(set(self.presets) - set(PRESETS))
        if unknown or not self.presets:
            raise ValueError(f"presets must be a non-empty subset of {PRESETS}, not {unknown}")
        if "grid" in self.presets and not self.grid:
            raise ValueError("the grid preset needs grid={parameter: [values, ...]}")
        if "table2" in self.presets:
            if not self.segmentation_dir:
                raise ValueError(
                    "the table2 preset needs segmentation_dir (notebook 06's run) for the "
                    "organ crops"
                )
            unknown = sorted(set(self.organs) - {"liver", "spleen", "kidney", "bowel"})
            if unknown or not self.organs:
                raise ValueError(
                    f"organs must be a non-empty subset of liver, spleen, kidney, bowel, not "
                    f"{unknown or self.organs}"
                )
        bad = [f for f in self.fractions if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], not {bad}")
        unknown = sorted(set(self.curve_settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"curve_settings must be among {tuple(SETTINGS)}, not {unknown}")
        unknown = sorted(set(self.recipes) - set(RECIPES))
        if unknown or not self.recipes:
            raise ValueError(f"recipes must be a non-empty subset of {RECIPES}, not {unknown}")
        if not self.seeds or not self.backbones:
            raise ValueError("seeds and backbones must not be empty")
        reserved = {"output_dir", "data_root", "cache_dir", "encoder_file", "backbone"}
        given = set(self.finetune_params) | set(self.pretrain_params) | set(self.crop_params)
        clashes = sorted(reserved & given)
        if clashes:
            raise ValueError(
                f"{clashes} are set by the experiment itself (backbones, paths), not by *_params"
            )


@dataclass
class PlannedRun:
    """One fine-tuning run of the plan, with the pretraining it needs (if any)."""

    preset: str
    setting: str  # a SETTINGS key, or "grid" for user grid points
    label: str  # the table's row name
    backbone: str
    fraction: float
    seed: int
    run_key: str
    finetune: dict[str, Any]  # notebook 03's parameters (output paths filled at run time)
    pretrain_key: str | None = None
    pretrain: dict[str, Any] | None = None  # notebook 02's parameters
    organ: str = ""  # table2's single-organ runs: the organ whose crop it trains on
    recipe: str = "official"  # notebooks 02 and 03's recipe


@dataclass
class Plan:
    runs: list[PlannedRun]
    skipped: list[str]  # settings left out, with the reason

    def unique_runs(self) -> dict[str, PlannedRun]:
        return {run.run_key: run for run in self.runs}

    def unique_pretrainings(self) -> dict[str, dict[str, Any]]:
        return {r.pretrain_key: r.pretrain for r in self.runs if r.pretrain_key and r.pretrain}


def _key(prefix: str, identity: Mapping[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}-{digest[:10]}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)[:60]


def _pretraining(
    config: ExperimentConfig,
    backbone: str,
    setting: str,
    recipe: str,
    weights: str,
    overrides: Mapping[str, Any],
) -> tuple[str, dict[str, Any]]:
    """Notebook 02's parameters: ImageNet init only for "imagenet_voco"; the experiment's
    held-out patients left out (the same `holdout` and `fold_seed` as every notebook 03)."""
    imagenet = setting == "imagenet_voco"
    params: dict[str, Any] = {
        "backbone": backbone, "recipe": recipe, "init": "imagenet" if imagenet else "random",
        "weights_file": weights if imagenet else "", "data_root": config.data_root,
        "holdout": config.holdout, "fold_seed": config.fold_seed,
        "extra_dirs": list(config.extra_dirs) if setting == "voco_extra" else [],
    }  # fmt: skip
    params |= dict(config.pretrain_params) | dict(overrides)
    name = _slug(f"{backbone}-{recipe}{'-imagenet' if imagenet else ''}")
    name += "-extra" if setting == "voco_extra" else ""
    return _key(name, params), params


def _finetuning(
    config: ExperimentConfig,
    setting: str,
    backbone: str,
    fraction: float,
    seed: int,
    recipe: str,
    weights: str,
    overrides: Mapping[str, Any],
    pretrain_key: str | None,
) -> tuple[str, dict[str, Any]]:
    init = {"random": "random", "imagenet": "imagenet"}.get(setting, "voco")
    params: dict[str, Any] = {
        "backbone": backbone, "recipe": recipe, "init": init, "seed": seed,
        "fold_seed": config.fold_seed, "holdout": config.holdout, "n_folds": config.n_folds,
        "train_fraction": fraction, "weights_file": weights if init == "imagenet" else "",
    }  # fmt: skip
    params |= dict(config.finetune_params) | dict(overrides)
    if params["init"] == "voco" and pretrain_key is None:
        raise ValueError(f"{setting}: init 'voco' needs a pretraining")
    identity = params | {"pretrain": pretrain_key if params["init"] == "voco" else None}
    name = _slug(f"{setting}-{backbone}-{recipe}-f{fraction:g}-s{seed}")
    return _key(name, identity), params


def find_imagenet_weights(config: ExperimentConfig, backbone: str) -> str:
    """`weights_file`, or the backbone's weights among the attached inputs; "" if none."""
    from kaggle_utils.common.backbone import resolve_weights

    return resolve_weights(config.weights_file, backbone, "auto")


def plan_experiment(config: ExperimentConfig) -> Plan:
    """Every run the presets ask for; settings that cannot run here are skipped with a
    reason (ImageNet rows without weights, extra data without `extra_dirs`)."""
    runs: list[PlannedRun] = []
    skipped: list[str] = []
    several = len(config.recipes) > 1
    available: dict[str, list[str]] = {}  # backbone -> its settings
    weights: dict[str, str] = {}
    for backbone in config.backbones:
        weights[backbone] = find_imagenet_weights(config, backbone)
        available[backbone] = list(SETTINGS)
        if not weights[backbone]:
            available[backbone] = [s for s in SETTINGS if s not in IMAGENET_SETTINGS]
            skipped.append(
                f"ImageNet and ImageNet + 2D-VoCo for {backbone}: no ImageNet weights (pass "
                f"weights_file, or attach timm's {backbone} weights; nothing is downloaded)"
            )
        if not config.extra_dirs:
            available[backbone].remove("voco_extra")
    if not config.extra_dirs:
        skipped.append("2D-VoCo + extra unlabeled: no extra_dirs given")

    def add(
        preset: str, setting: str, label: str, backbone: str, fraction: float, seed: int,
        recipe: str, finetune_overrides: Mapping[str, Any],
        pretrain_overrides: Mapping[str, Any], organ: str = "",
    ) -> None:  # fmt: skip
        pretrain_key, pretrain = None, None
        uses_voco = finetune_overrides.get("init", config.finetune_params.get("init", "voco"))
        if setting in VOCO_SETTINGS or (setting == "grid" and uses_voco == "voco"):
            pretrain_key, pretrain = _pretraining(
                config, backbone, setting, recipe, weights[backbone], pretrain_overrides
            )
        run_key, finetune = _finetuning(
            config, setting, backbone, fraction, seed, recipe, weights[backbone],
            finetune_overrides, pretrain_key,
        )  # fmt: skip
        label += f" [{recipe}]" if several else ""
        runs.append(PlannedRun(preset, setting, label, backbone, fraction, seed, run_key,
                               finetune, pretrain_key, pretrain, organ, recipe))  # fmt: skip

    for preset in config.presets:
        for recipe, backbone, seed in itertools.product(
            config.recipes, config.backbones, config.seeds
        ):
            if preset == "table1":
                for setting in available[backbone]:
                    add(preset, setting, SETTINGS[setting], backbone, 1.0, seed, recipe, {}, {})
            elif preset == "table2":
                crop = {
                    "segmentation_dir": config.segmentation_dir,
                    "crop_source_shape": config.finetune_params.get("shape", [96, 256, 256]),
                } | dict(config.crop_params)
                for setting in TABLE2_SETTINGS:
                    name = SETTINGS[setting]
                    add(preset, setting, f"multi-organ, {name}", backbone, 1.0, seed, recipe,
                        {}, {})  # fmt: skip
                    for organ in config.organs:
                        overrides = crop | {"input": organ, "targets": [organ]}
                        label = f"single-organ, {name}"
                        add(preset, setting, label, backbone, 1.0, seed, recipe, overrides, {},
                            organ)  # fmt: skip
            elif preset == "label_efficiency":
                for setting in config.curve_settings:
                    if setting not in available[backbone]:
                        continue
                    for fraction in sorted(config.fractions):
                        add(preset, setting, SETTINGS[setting], backbone, fraction, seed, recipe,
                            {}, {})  # fmt: skip
            else:
                names = list(config.grid)
                for values in itertools.product(*(config.grid[n] for n in names)):
                    point = dict(zip(names, values, strict=True))
                    label = ", ".join(f"{n}={v}" for n, v in point.items())
                    finetune = {n: v for n, v in point.items() if not n.startswith(PRETRAIN_PREFIX)}
                    pretrain = {
                        n[len(PRETRAIN_PREFIX) :]: v
                        for n, v in point.items()
                        if n.startswith(PRETRAIN_PREFIX)
                    }
                    fraction = float(finetune.get("train_fraction", 1.0))
                    add(preset, "grid", label, backbone, fraction, seed, recipe, finetune,
                        pretrain)  # fmt: skip
    return Plan(runs, skipped)


# --------------------------------------------------------------------------- running


def papermill_executor(
    input_path: Path, output_path: Path, parameters: dict[str, Any]
) -> None:  # pragma: no cover - exercised by the slow notebook test
    import papermill

    papermill.execute_notebook(
        str(input_path), str(output_path), parameters=parameters, progress_bar=False
    )


def pretraining_finished(run_dir: Path) -> bool:
    from kaggle_utils.pretrain.train import read_result

    try:
        return read_result(run_dir).finished
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return False


def finetuning_finished(run_dir: Path) -> bool:
    """Every fold trained and notebook 03's report written (it is written last)."""
    from kaggle_utils.finetune.train import read_cv_result

    if not (run_dir / "report.json").is_file():
        return False
    try:
        return read_cv_result(run_dir).finished
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return False


@dataclass
class ExperimentResult:
    experiment_dir: Path
    plan: Plan
    report: dict[str, Any]
    failures: dict[str, str]  # run folder -> error
    ran: list[str]  # folders run (or resumed) in this call; the others were already done
    minutes: float


def run_experiment(
    config: ExperimentConfig, executor: Executor | None = None, progress: bool = True
) -> ExperimentResult:
    """Run what the plan still lacks (pretrainings first, each once), then write the report.

    A failed run is recorded and the others go on; the report covers what finished and
    lists the failures (re-running retries them)."""
    started = time.monotonic()
    executor = executor or papermill_executor
    root = Path(config.experiment_dir)
    root.mkdir(parents=True, exist_ok=True)
    config.to_json(root / "experiment.json")
    plan = plan_experiment(config)
    write_text_atomic(root / "plan.json", json.dumps(_plan_json(plan), indent=1))
    notebooks = Path(config.notebooks_dir) if config.notebooks_dir else paths.project_root()
    if not config.notebooks_dir:
        notebooks = notebooks / "notebooks"
    shared = {"cache_dir": config.cache_dir}
    failures: dict[str, str] = {}
    ran: list[str] = []

    timings_file = root / "minutes.json"
    minutes = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    jobs: list[tuple[str, Path, dict[str, Any]]] = []  # pretrainings first
    for key, params in plan.unique_pretrainings().items():
        out = root / "pretrain" / key
        jobs.append((PRETRAIN_NOTEBOOK, out, shared | params | {"output_dir": str(out)}))
    for key, run in plan.unique_runs().items():
        out = root / "runs" / key
        params = {"data_root": config.data_root} | shared | run.finetune
        params["output_dir"] = str(out)
        if run.organ:  # the crop caches, shared by the runs on the same organ and shape
            params["crops_dir"] = str(root / "crops")
        if run.pretrain_key and params.get("init") == "voco":
            params["encoder_file"] = str(root / "pretrain" / run.pretrain_key / "encoder.pt")
        jobs.append((FINETUNE_NOTEBOOK, out, params))

    bar = progress_bar(jobs, desc="experiment runs", unit="run", disable=not progress)
    for notebook, out, params in bar:
        finished = pretraining_finished if notebook == PRETRAIN_NOTEBOOK else finetuning_finished
        if finished(out):
            continue
        needs = params.get("encoder_file")
        if needs and not pretraining_finished(Path(needs).parent):
            failures[str(out)] = f"its pretraining {Path(needs).parent.name} did not finish"
            continue
        bar.set_postfix_str(out.name)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "params.json", json.dumps(params, indent=1))
        run_started = time.monotonic()
        try:
            executor(notebooks / notebook, out / notebook, params)
        except Exception as error:  # one failed run must not end the batch
            failures[str(out)] = f"{type(error).__name__}: {str(error)[-2000:]}"
            continue
        finally:
            # wall-clock minutes of this call (a resumed run adds its sessions up)
            spent = (time.monotonic() - run_started) / 60
            minutes[out.name] = round(minutes.get(out.name, 0.0) + spent, 2)
            write_text_atomic(timings_file, json.dumps(minutes, indent=1))
        ran.append(str(out))
        if not finished(out):
            failures[str(out)] = "the notebook ended before the run finished (time limit?)"
    bar.close()

    report = experiment_report(config, plan, failures, minutes)
    report["minutes"] = {
        "pretrain": {k: minutes.get(k) for k in plan.unique_pretrainings()},
        "runs": {k: minutes.get(k) for k in plan.unique_runs()},
        "total_this_call": round((time.monotonic() - started) / 60, 2),
    }
    write_report(report, root)
    return ExperimentResult(root, plan, report, failures, ran, (time.monotonic() - started) / 60)


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {"runs": [dataclasses.asdict(r) for r in plan.runs], "skipped": plan.skipped}


# --------------------------------------------------------------------------- the report


@dataclass
class RunResult:
    """A finished run's held-out predictions and metrics."""

    run: PlannedRun
    holdout_folds: pl.DataFrame  # fold (the model), patient_id, 13 columns
    report: dict[str, Any]  # notebook 03's report.json


def load_results(root: Path, plan: Plan) -> list[RunResult]:
    results = []
    for run in plan.runs:
        run_dir = root / "runs" / run.run_key
        predictions = run_dir / "holdout_folds_patient.parquet"
        if not (finetuning_finished(run_dir) and predictions.is_file()):
            continue
        report = json.loads((run_dir / "report.json").read_text())
        results.append(RunResult(run, pl.read_parquet(predictions), report))
    return results


def _group_key(run: PlannedRun) -> tuple[str, str, float, str]:
    """Runs compared with each other: same preset, backbone, label fraction and recipe."""
    return run.preset, run.backbone, run.fraction, run.recipe


def _baseline_label(runs: Sequence[PlannedRun]) -> str:
    """From scratch (the grid: its first point), in the group's recipe."""
    if runs[0].preset != "grid":
        return next((r.label for r in runs if r.setting == "random"), SETTINGS["random"])
    return runs[0].label


def _run_minutes(
    runs: Sequence[RunResult], minutes: Mapping[str, float] | None
) -> dict[str, float | None]:
    """Wall-clock minutes of a row: fine-tuning (mean over its seeds) and the pretraining
    it used (shared with the other rows of its kind)."""

    def mean(keys: set[str]) -> float | None:
        spent = [minutes[k] for k in keys if minutes and minutes.get(k) is not None]
        return round(sum(spent) / len(spent), 2) if spent else None

    return {
        "finetune": mean({r.run.run_key for r in runs}),
        "pretrain": mean({r.run.pretrain_key for r in runs if r.run.pretrain_key}),
    }


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if not finite.size:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def _model_terms(
    labels: pl.DataFrame, results: Sequence[RunResult], patients: Sequence[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(losses, weights) per fold model of these runs, rows in `patients` order."""
    truth = labels.filter(pl.col("patient_id").is_in(list(patients))).sort("patient_id")
    terms = []
    for result in results:
        for _, model in result.holdout_folds.group_by("fold", maintain_order=True):
            _, losses, weights = patient_loss_terms(truth, model.drop("fold"))
            terms.append((losses, weights))
    return terms


def paired_bootstrap(
    setting_terms: Sequence[tuple[np.ndarray, np.ndarray]],
    baseline_terms: Sequence[tuple[np.ndarray, np.ndarray]],
    n_bootstrap: int,
    seed: int = 0,
) -> dict[str, float]:
    """Mean RSNA score of the setting's models minus the baseline's, on the same held-out
    patients, and its spread when the patients are resampled with replacement (the same
    resample for both sides, so that what the patients share cancels). Negative: the setting
    is better (the score is a loss)."""

    def mean_scores(terms: Sequence[tuple[np.ndarray, np.ndarray]], counts: np.ndarray):
        per_model = [
            np.mean((counts @ losses) / (counts @ weights), axis=1) for losses, weights in terms
        ]
        return np.mean(per_model, axis=0)

    n = setting_terms[0][0].shape[0]
    full = np.ones((1, n))
    difference = float(mean_scores(setting_terms, full)[0] - mean_scores(baseline_terms, full)[0])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(float)
    # a resample without any positive of some part gives 0/0: drop it, as it defines no score
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = mean_scores(setting_terms, counts) - mean_scores(baseline_terms, counts)
    draws = draws[np.isfinite(draws)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "difference": difference,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_better": float(np.mean(draws < 0)),
        "n_bootstrap": int(draws.size),
    }


def experiment_report(
    config: ExperimentConfig,
    plan: Plan,
    failures: Mapping[str, str] | None = None,
    minutes: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per preset, one row per (setting, backbone, fraction): held-out metrics of the fold
    models (mean +- std over seeds x folds), the fold ensembles' score, the CV score, and the
    paired bootstrap difference against the baseline of the same group."""
    from kaggle_utils.finetune.train import read_labels

    root = Path(config.experiment_dir)
    labels = read_labels(config.data_root)
    results = load_results(root, plan)
    report: dict[str, Any] = {
        "presets": {},
        "skipped": plan.skipped,
        "failures": dict(failures or {}),
        "missing": sorted({r.run_key for r in plan.runs} - {r.run.run_key for r in results}),
        "notes": [CV_OPTIMISM_NOTE],
    }
    holdout_patients: set[tuple[int, ...]] = {
        tuple(sorted(r.holdout_folds["patient_id"].unique().to_list())) for r in results
    }
    if len(holdout_patients) > 1:
        report["notes"].append(
            "Runs hold out different patients (different folds settings): no paired "
            "differences are computed."
        )
    for preset in config.presets:
        if preset == "table2":
            report["presets"][preset] = {"rows": table2_rows(results, config.organs)}
            continue
        rows = []
        in_preset = [r for r in results if r.run.preset == preset]
        groups: dict[tuple[str, str, float, str], list[RunResult]] = {}
        for result in in_preset:
            groups.setdefault(_group_key(result.run), []).append(result)
        for key, members in sorted(groups.items(), key=lambda g: g[0]):
            _, backbone, fraction, recipe = key
            planned = [r for r in plan.runs if r.preset == preset and _group_key(r) == key]
            baseline = _baseline_label(planned)
            by_label: dict[str, list[RunResult]] = {}
            for result in members:
                by_label.setdefault(result.run.label, []).append(result)
            patients = sorted(members[0].holdout_folds["patient_id"].unique().to_list())
            baseline_terms = None
            if baseline in by_label and len(holdout_patients) == 1:
                baseline_terms = _model_terms(labels, by_label[baseline], patients)
            for label in [p.label for p in planned if p.label in by_label]:
                if any(row["label"] == label and row["backbone"] == backbone
                       and row["fraction"] == fraction for row in rows):  # fmt: skip
                    continue
                runs = by_label[label]
                row = _row(label, backbone, fraction, runs, label == baseline)
                row["recipe"] = recipe
                row["minutes"] = _run_minutes(runs, minutes)
                if baseline_terms is not None and label != baseline:
                    seeds = {r.run.seed for r in by_label[baseline]}
                    paired = [r for r in runs if r.run.seed in seeds]
                    if paired:
                        row["vs_baseline"] = paired_bootstrap(
                            _model_terms(labels, paired, patients),
                            baseline_terms,
                            config.n_bootstrap,
                        )
                rows.append(row)
        report["presets"][preset] = {"rows": rows}
    return report


def table2_rows(results: Sequence[RunResult], organs: Sequence[str]) -> list[dict[str, Any]]:
    """The paper's Table 2: per setting (multi- or single-organ, scratch or 2D-VoCo) and
    backbone, each organ's held-out AUC (any injury against healthy) and part of the RSNA
    score, mean +- std over the fold models of every seed: for multi-organ from the
    whole-scan runs, for single-organ from that organ's crop runs."""
    rows = []
    table2 = [r for r in results if r.run.preset == "table2"]
    keys = sorted({(r.run.label, r.run.backbone) for r in table2}, key=lambda k: (k[1], k[0]))
    for label, backbone in keys:
        runs = [r for r in table2 if (r.run.label, r.run.backbone) == (label, backbone)]
        row: dict[str, Any] = {
            "label": label, "backbone": backbone, "organs": {},
            "prior_rsna": float(runs[0].report["holdout_prior"]["rsna_score"]),
        }  # fmt: skip
        for organ in organs:
            mine = [r for r in runs if r.run.organ in ("", organ)]
            per_model = [m for r in mine for m in r.report["holdout_folds"].values()]
            row["organs"][organ] = {
                "auc": _mean_std([m.get(f"auc_{organ}", math.nan) for m in per_model]),
                "loss": _mean_std([m.get(f"loss_{organ}", math.nan) for m in per_model]),
                "prior_loss": float(mine[0].report["holdout_prior"].get(f"loss_{organ}", math.nan))
                if mine
                else math.nan,
                "n_models": len(per_model),
            }
        rows.append(row)
    return rows


def _table2_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    organs = list(rows[0]["organs"])
    header = (
        "| setting | backbone | "
        + " | ".join(f"{o} AUC" for o in organs)
        + " | "
        + " | ".join(f"{o} loss" for o in organs)
        + " |"
    )
    lines = [header, "|---" * (2 + 2 * len(organs)) + "|"]
    for row in rows:
        cells = [row["label"], row["backbone"]]
        cells += [_fmt(row["organs"][o]["auc"], 3) for o in organs]
        cells += [_fmt(row["organs"][o]["loss"], 3) for o in organs]
        lines.append("| " + " | ".join(cells) + " |")
    priors = ", ".join(f"{o} {rows[0]['organs'][o]['prior_loss']:.3f}" for o in organs)
    lines += [
        "",
        "Held-out AUC of each organ's injury (low or high against healthy; 0.5: chance) and "
        "its part of the RSNA score (a loss), mean ± std over the fold models. Multi-organ: "
        "one whole-scan run with every head; single-organ: one run per organ on its crop "
        f"(notebook 06's boxes), its head only. Best-constant prior loss: {priors}.",
        "",
    ]
    return lines


def _row(
    label: str, backbone: str, fraction: float, runs: Sequence[RunResult], baseline: bool
) -> dict[str, Any]:
    per_model = [m for r in runs for m in r.report["holdout_folds"].values()]
    row: dict[str, Any] = {
        "label": label,
        "backbone": backbone,
        "fraction": fraction,
        "baseline": baseline,
        "seeds": sorted(r.run.seed for r in runs),
        "n_models": len(per_model),
        "holdout": {k: _mean_std([m[k] for m in per_model]) for k in METRICS},
        "holdout_auc": {
            k: _mean_std([m[k] for m in per_model]) for k in per_model[0] if k.startswith("auc_")
        },
        "ensemble_rsna": _mean_std([r.report["holdout"]["rsna_score"] for r in runs]),
        "cv_rsna": _mean_std([m["rsna_score"] for r in runs for m in r.report["folds"].values()]),
        "prior_rsna": float(runs[0].report["holdout_prior"]["rsna_score"]),
    }
    calibrated = [r.report.get("calibrated", {}).get("holdout") for r in runs]
    if all(calibrated):
        row["calibrated_ensemble_rsna"] = _mean_std([c["rsna_score"] for c in calibrated])
    return row


def _fmt(stat: Mapping[str, float], digits: int = 4) -> str:
    if not stat.get("n"):
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _fmt_minutes(minutes: Mapping[str, float | None] | None) -> str:
    if not minutes or minutes.get("finetune") is None:
        return "–"
    pretrain = minutes.get("pretrain")
    return f"{minutes['finetune']:.1f}" + (f" + {pretrain:.1f}" if pretrain is not None else "")


def _fmt_difference(row: Mapping[str, Any]) -> str:
    if row["baseline"]:
        return "baseline"
    paired = row.get("vs_baseline")
    if not paired:
        return "–"
    return (
        f"{paired['difference']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}]"
        f" p(better) {paired['p_better']:.2f}"
    )


def markdown_report(report: Mapping[str, Any]) -> str:
    lines = ["# Experiment report", ""]
    for preset, table in report["presets"].items():
        lines += [f"## {preset}", ""]
        if not table["rows"]:
            lines += ["No finished runs.", ""]
            continue
        if preset == "table2":
            lines += _table2_markdown(table["rows"])
            continue
        header = (
            "| setting | backbone | labels | models | RSNA held-out (fold models) "
            "| Δ vs baseline [95 % CI] | RSNA held-out (fold ensemble) | RSNA CV (optimistic) "
            "| " + " | ".join(SCORE_PARTS) + " | mAP | macro precision | macro recall "
            "| minutes (fine-tune + pretrain) |"
        )
        lines += [header, "|---" * (12 + len(SCORE_PARTS)) + "|"]
        for row in table["rows"]:
            held = row["holdout"]
            cells = [
                row["label"], row["backbone"], f"{100 * row['fraction']:g} %",
                str(row["n_models"]), _fmt(held["rsna_score"]), _fmt_difference(row),
                _fmt(row["ensemble_rsna"]), _fmt(row["cv_rsna"]),
                *(_fmt(held[f"loss_{part}"], 3) for part in SCORE_PARTS),
                _fmt(held["mAP"], 3), _fmt(held["macro_precision"], 3),
                _fmt(held["macro_recall"], 3), _fmt_minutes(row.get("minutes")),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        prior = table["rows"][0]["prior_rsna"]
        lines += ["", f"Best-constant prior on the held-out patients: RSNA {prior:.4f}.", ""]
    lines += [
        "RSNA scores are losses (lower is better). Held-out: the patients no run trained on "
        "or chose an epoch on; 'fold models' is the mean ± std over every fold model of every "
        "seed. Δ: the setting's mean held-out score minus the baseline's over the same seeds "
        "and folds; the interval and p(better) (the share of resamples in which the setting "
        "scores lower) come from a paired bootstrap over held-out patients. Seeds vary the "
        "training, not the patients, so the interval does not include retraining on other "
        "patients.",
        "",
    ]
    lines += [f"*{note}*" for note in report["notes"]]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(report["skipped"]) + "."]
    if report["failures"]:
        lines += ["", "Failed runs (re-run to retry):"]
        lines += [f"- `{run}`: {error.splitlines()[-1] if error else ''}"
                  for run, error in report["failures"].items()]  # fmt: skip
    if "minutes" in report:
        minutes = report["minutes"]
        spent = [m for g in ("pretrain", "runs") for m in minutes[g].values() if m is not None]
        lines += [
            "",
            f"Run time: {sum(spent):.1f} min over {len(spent)} runs "
            f"({minutes['total_this_call']:.1f} min in the last call).",
        ]
    if report["missing"]:
        lines += ["", f"Runs not finished yet: {len(report['missing'])}."]
    return "\n".join(lines) + "\n"


def label_efficiency_figure(report: Mapping[str, Any]) -> Any:
    """Held-out RSNA score (fold models, mean ± std) and mAP against the share of labels."""
    import matplotlib.pyplot as plt

    rows = report["presets"].get("label_efficiency", {}).get("rows", [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault((row["label"], row["backbone"]), []).append(row)
    for (label, backbone), points in lines.items():
        points = sorted(points, key=lambda r: r["fraction"])
        x = [100 * p["fraction"] for p in points]
        name = label if len({b for _, b in lines}) == 1 else f"{label} ({backbone})"
        for ax, key in zip(axes, ("rsna_score", "mAP"), strict=True):
            y = [p["holdout"][key]["mean"] for p in points]
            err = [p["holdout"][key]["std"] for p in points]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    if rows:
        axes[0].axhline(rows[0]["prior_rsna"], color="grey", ls="--", label="best-constant prior")
    for ax, title in zip(axes, ("RSNA score, held-out (lower is better)", "mAP, held-out"),
                         strict=True):  # fmt: skip
        ax.set_xscale("log")
        # the fractions run, as plain percentages (not the log axis' 3x10^1 minor labels)
        percents = sorted({100 * r["fraction"] for r in rows})
        ax.set_xticks(percents, [f"{p:g}" for p in percents])
        ax.minorticks_off()
        ax.set_xlabel("training patients with labels (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def write_report(report: Mapping[str, Any], root: Path) -> None:
    write_text_atomic(root / "report.json", json.dumps(report, indent=1))
    write_text_atomic(root / "report.md", markdown_report(report))
    if report["presets"].get("label_efficiency", {}).get("rows"):
        import matplotlib.pyplot as plt

        fig = label_efficiency_figure(report)
        save_figure_atomic(fig, root / "label_efficiency.png", dpi=100)
        plt.close(fig)
