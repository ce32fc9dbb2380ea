"""Notebooks: every .py has its .ipynb twin with the same cells and no outputs, and each
notebook runs headless through papermill on tiny data."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import jupytext
import numpy as np
import papermill
import polars as pl
import pytest

from kaggle_utils.cache.preprocess import list_series, load_metadata
from kaggle_utils.demo.summary import demo_summary, markdown
from kaggle_utils.finetune.train import FinetuneConfig, run_cross_validation
from kaggle_utils.submission.inference import predict_test_set

from submission_checks import assert_no_notebook_warnings, assert_same_submission

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def test_there_are_notebooks() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_dicom_preprocess.py", "02_voco2d_pretrain.py", "03_finetune_bilstm.py",
        "04_submission.py", "05_experiments.py", "06_organ_segmentation.py",
    ]  # fmt: skip


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_agrees_has_parameters_and_no_outputs(source: Path) -> None:
    twin = source.with_suffix(".ipynb")
    assert twin.is_file(), f"{twin.name} missing: run `make notebooks`"
    py_nb, ipynb_nb = jupytext.read(source), jupytext.read(twin)

    def cells(nb: object) -> list[tuple[str, str]]:
        return [(c.cell_type, c.source.strip()) for c in nb.cells]  # type: ignore[attr-defined]

    assert cells(py_nb) == cells(ipynb_nb), f"{source.name} and {twin.name} differ: make notebooks"
    raw = json.loads(twin.read_text())
    assert all(not c.get("outputs") for c in raw["cells"] if c["cell_type"] == "code")
    assert raw["metadata"]["kernelspec"]["name"] == "python3"
    first_code = next(c for c in raw["cells"] if c["cell_type"] == "code")
    assert "parameters" in first_code["metadata"].get("tags", [])
    assert "smoke" in "".join(first_code["source"])


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(source: Path) -> None:
    """`papermill --help-notebook` (`inspect_notebook`) reads the parameters cell line by line:
    a line it cannot parse (a second `=` in a comment) drops that parameter from the help and
    logs a warning on every run."""
    twin = source.with_suffix(".ipynb")
    cell = next(c for c in jupytext.read(twin).cells if c.cell_type == "code")
    assigned = {
        target.id
        for node in ast.parse(cell.source).body
        for target in (
            node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        )
        if isinstance(target, ast.Name)
    }
    assert assigned - set(papermill.inspect_notebook(str(twin))) == set()


def run_notebook(name: str, out_dir: Path, **parameters: object) -> Path:
    output = out_dir / "notebooks" / f"{name}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(ROOT / "notebooks" / f"{name}.ipynb"),
        str(output),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(ROOT),
        progress_bar=False,
    )
    return output


@pytest.mark.slow
def test_notebook_01_preprocesses_a_tiny_dataset(tiny_competition: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_notebook(
        "01_dicom_preprocess", tmp_path, data_root=str(tiny_competition), output_dir=str(cache),
        split="train", workers=0, smoke=True,
    )  # fmt: skip
    metadata = pl.read_parquet(cache / "metadata.parquet")
    assert metadata.height == 3  # smoke limits the run to three series
    for series_id in metadata["series_id"]:
        volume = np.load(cache / "8x32x32" / f"{series_id}.npy")
        assert volume.shape == (8, 32, 32) and volume.dtype == np.uint8
    assert (cache / "montage_train_8x32x32.png").stat().st_size > 1000


@pytest.mark.slow
def test_notebooks_01_to_04_chain_on_a_tiny_dataset(tiny_competition: Path, tmp_path: Path) -> None:
    cache, run, finetune = tmp_path / "cache", tmp_path / "pretrain", tmp_path / "finetune"
    run_notebook(
        "01_dicom_preprocess", tmp_path, data_root=str(tiny_competition), output_dir=str(cache),
        workers=0, smoke=True, limit=20,
    )  # fmt: skip
    run_notebook(
        "02_voco2d_pretrain", tmp_path, cache_dir=str(cache), output_dir=str(run),
        volume_shape=[8, 32, 32], smoke=True,
    )  # fmt: skip
    for name in ("encoder.pt", "encoder.json", "log.csv", "curves.png", "crop_layout.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["probe_after"]["same"] is not None
    run_notebook(
        "03_finetune_bilstm", tmp_path, data_root=str(tiny_competition), cache_dir=str(cache),
        output_dir=str(finetune), shape=[8, 32, 32], backbone="test_efficientnet", init="voco",
        encoder_file=str(run / "encoder.pt"), image_size=32, smoke=True,
    )  # fmt: skip
    report = json.loads((finetune / "report.json").read_text())
    assert set(report["folds"]) == {"0", "1"}
    assert report["summary"]["rsna_score"]["mean"] > 0
    assert report["calibrated"]["summary"]["rsna_score"]["n"] == 2  # cross-fitted, both folds
    for name in ("confusion_matrices.png", "precision_recall.png", "oof_patient.parquet",
                 "calibration.json", "importance.json", "importance_0.png",
                 "learning_curves.png"):  # fmt: skip
        assert (finetune / name).is_file(), name
    executed = run_notebook(
        "04_submission", tmp_path, data_root=str(tiny_competition), model_dir=str(finetune),
        output_csv=str(tmp_path / "submission.csv"), max_prior_share=0, smoke=True,
    )  # fmt: skip
    assert list(tmp_path.glob("importance_*_*.png"))  # two test patients explained
    # Notebook 03's calibration hands these one-epoch heads back to its prior (every model
    # weight 0 on this data), so the values alone cannot tell a decoded series from a failed
    # one: every test series must reach the models, here and in the notebook (which fails on
    # the first patient that gets the prior), and the files must agree.
    direct = predict_test_set(
        tiny_competition, finetune, tmp_path / "direct" / "submission.csv", workers=0,
        max_prior_share=0, progress=False,
    )  # fmt: skip
    assert direct.problems.height == 0
    assert direct.series.height == len(list_series(tiny_competition, "test"))
    assert direct.settings["calibration"] is not None  # notebook 03's calibration.json
    assert_same_submission(
        tmp_path / "submission.csv", direct, tiny_competition / "sample_submission.csv"
    )
    assert_no_notebook_warnings(executed)
    assert f"next: submit {tmp_path / 'submission.csv'}" in executed.read_text()
    summary = demo_summary(tmp_path, tiny_competition)
    assert set(summary) == {"minutes", "pretrain", "cv", "test"}
    assert all(v is not None and v > 0 for v in summary["minutes"].values())
    assert summary["test"]["n_patients"] == 3 and summary["test"]["model"] > 0
    assert "calibrated on the other folds" in markdown(summary)
    assert set(summary["cv"]["auc"]) == {
        "bowel", "extravasation", "kidney", "liver", "spleen", "any_injury"
    }  # fmt: skip
    assert "AUC per target" in markdown(summary)
    assert summary["cv"]["calibrated"]["mean"] > 0


@pytest.mark.slow
def test_notebooks_01_and_03_within_kaggles_disk_and_time_limits(
    tiny_competition: Path, tmp_path: Path
) -> None:
    # Notebook 01 in two shards (two Kaggle datasets), read back as one cache by a pattern.
    for index in range(2):
        run_notebook(
            "01_dicom_preprocess", tmp_path, data_root=str(tiny_competition),
            output_dir=str(tmp_path / f"voco2d-cache-{index}"), shard_index=index, num_shards=2,
            workers=0, smoke=True, limit=20,
        )  # fmt: skip
    caches = str(tmp_path / "voco2d-cache-*")
    assert load_metadata(caches).height == len(list_series(tiny_competition, "train"))
    # The previous session finished fold 0; this one copies it in, then runs out of time.
    previous = tmp_path / "input" / "finetune"
    run_cross_validation(
        FinetuneConfig(
            data_root=str(tiny_competition), cache_dir=caches, output_dir=str(previous),
            shape=[8, 32, 32], backbone="test_efficientnet", init="random", hidden_size=16,
            num_layers=1, image_size=32, epochs=1, n_folds=2, folds_to_run=[0], num_workers=0,
        ),
        progress=False,
    )  # fmt: skip
    working = tmp_path / "working" / "finetune"
    executed = run_notebook(
        "03_finetune_bilstm", tmp_path, data_root=str(tiny_competition), cache_dir=[caches],
        output_dir=str(working), resume_from=str(previous), time_limit_s=1e-9,
        shape=[8, 32, 32], backbone="test_efficientnet", init="random", image_size=32,
        smoke=True,
    )  # fmt: skip
    assert (working / "fold0" / "done.json").is_file()  # copied from the previous session
    assert not (working / "fold1" / "last.pt").exists()  # stopped before fold 1's first epoch
    assert not (working / "report.json").exists() and not (working / "calibration.json").exists()
    text = executed.read_text()
    assert "copied" in text and "stopped at its time limit" in text and "Skipped" in text
    config = json.loads((working / "config.json").read_text())
    assert config["cache_dir"] == [str(tmp_path / f"voco2d-cache-{i}") for i in range(2)]


@pytest.mark.slow
def test_notebook_05_runs_a_small_batch_resumes_and_reports(
    tiny_competition: Path, train_cache: Path, tmp_path: Path
) -> None:
    experiment = tmp_path / "experiment"
    parameters = {
        "data_root": str(tiny_competition), "cache_dir": str(train_cache),
        "experiment_dir": str(experiment), "smoke": True,
        "extra_dirs": [str(tiny_competition / "test_images")],
        "pretrain_params": {"volume_shape": [8, 32, 32]},
        "finetune_params": {"shape": [8, 32, 32], "image_size": 32},
    }  # fmt: skip
    run_notebook("05_experiments", tmp_path, **parameters)
    report = json.loads((experiment / "report.json").read_text())
    table1 = {row["label"] for row in report["presets"]["table1"]["rows"]}
    assert table1 == {"from scratch", "2D-VoCo", "2D-VoCo + extra unlabeled"}
    curve = report["presets"]["label_efficiency"]["rows"]
    assert {(r["label"], r["fraction"]) for r in curve} == {
        (label, f) for label in ("from scratch", "2D-VoCo") for f in (0.5, 1.0)
    }
    assert all(r["n_models"] == 2 and r["holdout"]["rsna_score"]["n"] == 2 for r in curve)
    assert not report["failures"] and not report["missing"]
    assert len(list((experiment / "pretrain").iterdir())) == 2
    assert len(list((experiment / "runs").iterdir())) == 5  # the curve's 100 % runs are table1's
    for name in ("report.md", "label_efficiency.png", "plan.json", "experiment.json"):
        assert (experiment / name).is_file(), name
    # no held-out patient reached pretraining: what each pretraining used against what each
    # fine-tuning held out
    held_out = set()
    for folds in experiment.glob("runs/*/folds.csv"):
        held_out |= set(pl.read_csv(folds).filter(pl.col("fold") == -1)["patient_id"])
    assert held_out
    for volumes_file in experiment.glob("pretrain/*/volumes.parquet"):
        volumes = pl.read_parquet(volumes_file)
        used = set(volumes["patient_id"].drop_nulls())
        assert used and not used & held_out, volumes_file
        assert set(volumes["role"]) <= {"train", "probe"}
    assert len(list(experiment.glob("pretrain/*/volumes.parquet"))) == 2
    # a second run finds everything done and only rewrites the report
    before = {p: p.stat().st_mtime for p in experiment.glob("runs/*/report.json")}
    output = run_notebook("05_experiments", tmp_path / "again", **parameters)
    assert {p: p.stat().st_mtime for p in experiment.glob("runs/*/report.json")} == before
    assert "0 runs executed" in output.read_text()


def test_importing_the_backbone_in_a_kernel_prints_no_tqdm_widget_warning(tmp_path: Path) -> None:
    """timm pulls in tqdm.auto; in a kernel without ipywidgets (papermill, Kaggle's scoring run)
    that printed "IProgress not found" into every notebook that builds a model."""
    notebook = jupytext.reads("# %%\nimport kaggle_utils.common.backbone\n", fmt="py:percent")
    source, executed = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    jupytext.write(notebook, source)
    papermill.execute_notebook(
        str(source), str(executed), kernel_name="python3", progress_bar=False
    )
    outputs = json.loads(executed.read_text())["cells"][0]["outputs"]
    assert not [o for o in outputs if "IProgress" in json.dumps(o)], outputs
