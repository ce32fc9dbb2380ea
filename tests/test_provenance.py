"""Provenance: every artifact's JSON says which code made it, and notebook 04 warns when the
preprocessing it will apply may not be the one the models were trained on."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from kaggle_utils.cache.preprocess import RECORDS_DIR
from kaggle_utils.common import provenance
from kaggle_utils.finetune.calibration import Calibration
from kaggle_utils.metric import LABEL_COLUMNS
from kaggle_utils.submission.inference import (
    PREPROCESS_FILE,
    load_model_runs,
    preprocessing_warnings,
    shared_preprocessing,
)

ROOT = Path(__file__).resolve().parents[1]
COMMIT = re.compile(r"[0-9a-f]{40}(-dirty)?")


def test_this_code_knows_its_commit_in_a_checkout_and_from_a_bundle_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert COMMIT.fullmatch(provenance.git_commit(ROOT))
    # installed from the bundle's wheel: no .git around, the commit written into the wheel
    monkeypatch.setattr(provenance, "BUILD_COMMIT", tmp_path / "BUILD_COMMIT")
    assert provenance.git_commit(tmp_path) == "unknown"
    (tmp_path / "BUILD_COMMIT").write_text("0123abc\n")
    assert provenance.git_commit(tmp_path) == "0123abc"


def test_every_artifact_records_what_made_it(
    train_cache: Path, model_dir: Path, tmp_path: Path
) -> None:
    here = provenance.provenance()
    assert set(here) == {"package", "git_commit", "python", "torch", "timm"}
    assert here["package"].startswith("kaggle-utils-voco2d ")
    record = json.loads(next((train_cache / RECORDS_DIR).glob("*.json")).read_text())
    model = json.loads((model_dir / "fold0" / "model.json").read_text())
    preprocess = json.loads((model_dir / PREPROCESS_FILE).read_text())
    assert record["provenance"] == model["provenance"] == preprocess["provenance"] == here
    assert preprocess["cache_made_by"] == record["provenance"]  # what made the training cache
    calibration = Calibration(
        prior=dict.fromkeys(LABEL_COLUMNS, 0.3),
        model_weight={"bowel": 0.5},
        factors={"bowel_injury": 1.5},
    )
    calibration.to_json(tmp_path / "calibration.json")
    assert json.loads((tmp_path / "calibration.json").read_text())["provenance"] == here
    assert Calibration.from_json(tmp_path / "calibration.json") == calibration


@pytest.fixture
def moved_models(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "models"))


def warnings_for(folder: Path) -> list[str]:
    runs = load_model_runs([folder], torch.device("cpu"))
    _, source = shared_preprocessing(runs)
    return preprocessing_warnings(runs, source)


def test_models_preprocessed_as_notebook_04_will_get_no_warning(moved_models: Path) -> None:
    assert warnings_for(moved_models) == []


def test_a_training_cache_made_by_other_code_is_named(moved_models: Path) -> None:
    saved = json.loads((moved_models / PREPROCESS_FILE).read_text())
    saved["cache_made_by"] = saved["cache_made_by"] | {"git_commit": "f" * 40}
    (moved_models / PREPROCESS_FILE).write_text(json.dumps(saved))
    (warning,) = warnings_for(moved_models)
    assert "commit ffffffffffff" in warning and "not made as the training ones" in warning
    saved["cache_made_by"] = None  # a cache older than provenance: nothing to compare
    (moved_models / PREPROCESS_FILE).write_text(json.dumps(saved))
    assert warnings_for(moved_models) == []


def test_preprocess_json_and_the_training_cache_disagreeing_is_named(moved_models: Path) -> None:
    saved = json.loads((moved_models / PREPROCESS_FILE).read_text())
    saved["body_crop"] = not saved["body_crop"]
    (moved_models / PREPROCESS_FILE).write_text(json.dumps(saved))
    (warning,) = warnings_for(moved_models)
    assert "preprocess.json's are applied" in warning and "training cache" in warning


def test_no_record_of_the_preprocessing_at_all_is_named(moved_models: Path) -> None:
    (moved_models / PREPROCESS_FILE).unlink()
    config = json.loads((moved_models / "config.json").read_text())
    config["cache_dir"] = str(moved_models / "no-such-cache")  # not attached on Kaggle
    (moved_models / "config.json").write_text(json.dumps(config))
    for fold in moved_models.glob("fold*/"):
        meta = json.loads((fold / "model.json").read_text())
        meta["settings"]["cache_dir"] = config["cache_dir"]
        (fold / "model.json").write_text(json.dumps(meta))
    (warning,) = warnings_for(moved_models)
    assert "default soft-tissue window" in warning and "save_preprocess_settings" in warning
