"""What the notebooks show: notebook 03's learning curves, the importance strip with the true
class, and the closing cell of every notebook (what it wrote, the next command)."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path
from types import SimpleNamespace

import jupytext
import matplotlib
import numpy as np
import polars as pl
import pytest
import yaml

from kaggle_utils.common.plots import cross_validation_curves, importance_strip, true_class
from kaggle_utils.common.summary import (
    list_outputs,
    papermill_command,
    show_outputs,
)
from kaggle_utils.finetune.train import EPOCH_COLUMNS

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- learning curves


def _write_log(path: Path, valid_rsna: list[float | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(EPOCH_COLUMNS))
        writer.writeheader()
        for epoch, score in enumerate(valid_rsna):
            writer.writerow(
                {"epoch": epoch, "train_loss": 1.0 - 0.1 * epoch, "valid_loss": 0.9,
                 "valid_rsna": score, "lr": 1e-4, "seconds": 2.0}
            )  # fmt: skip


def test_cross_validation_curves_draw_each_fold_and_mark_its_best_epoch(tmp_path: Path) -> None:
    _write_log(tmp_path / "fold0" / "log.csv", [0.9, 0.7, 0.8])  # best: epoch 1
    _write_log(tmp_path / "fold1" / "log.csv", [0.9, 0.8, 0.6, 0.6])  # best: epoch 2 (first)
    _write_log(tmp_path / "fold2" / "log.csv", ["", ""])  # no validation score yet
    _write_log(tmp_path / "fold3" / "log.csv", [0.5])
    (tmp_path / "fold4").mkdir()  # a fold without a log yet: not drawn
    fig = cross_validation_curves(tmp_path)
    assert len(fig.axes) == 4, "one axes per fold with a log, no empty ones"
    for ax, best in zip(fig.axes, (1, 2, None, 0), strict=True):
        labels = [line.get_label() for line in ax.get_lines()]
        for curve in ("train loss", "valid loss", "valid RSNA"):
            assert labels.count(curve) == 1, (ax.get_title(), labels)
        marks = [line for line in ax.get_lines() if line.get_label() == "best epoch"]
        if best is None:
            assert not marks
            continue
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [best, best], ax.get_title()
        assert f"best epoch {best}" in ax.get_title()
    only = cross_validation_curves(tmp_path, folds=[1])
    assert len(only.axes) == 1 and only.axes[0].get_title().startswith("fold 1")
    with pytest.raises(ValueError, match=r"no fold<k>/log\.csv"):
        cross_validation_curves(tmp_path / "empty")


# --------------------------------------------------------------------------- importance strip


def _explanation(patient_id: int = 7) -> SimpleNamespace:
    return SimpleNamespace(
        patient_id=patient_id, series_id=70, slices=np.arange(8),
        images=np.zeros((8, 16, 16), dtype=np.uint8),
        importance={"liver": np.full(8, 1 / 8)},
        probabilities={"liver": np.array([0.5, 0.3, 0.2])}, marked={},
    )  # fmt: skip


LABELS = pl.DataFrame(
    {"patient_id": [7, 8], "liver_healthy": [0, 1], "liver_low": [1, 0], "liver_high": [0, 0]}
)


def test_importance_strip_shows_the_true_class_when_known() -> None:
    assert true_class(LABELS, 7, "liver") == "low" and true_class(LABELS, 8, "liver") == "healthy"
    assert true_class(LABELS, 9, "liver") is None

    def title(**kwargs: object) -> str:
        return importance_strip(_explanation(), "liver", n_top=3, **kwargs).axes[-1].get_title()

    assert title() == "patient 7, liver: p(injury) 0.50"
    assert title(labels=LABELS) == "patient 7, liver: p(injury) 0.50, true: low"
    assert title(labels=LABELS.filter(pl.col("patient_id") == 8)).endswith("true: not labelled")


# ------------------------------------------------------------ the closing cell: listing, next


def test_list_outputs_is_sorted_relative_and_leaves_out_temporary_files(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("x" * 1500)
    (tmp_path / ".report.json.123.tmp").write_text("half")  # the atomic writer's
    (tmp_path / "a.png").write_bytes(b"p" * 10)
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "log.csv").write_text("epoch\n")
    (tmp_path / "96x256x256").mkdir()
    for index in range(30):  # a cache's volumes: one line
        (tmp_path / "96x256x256" / f"{index}.npy").write_bytes(b"v" * 100)
    (tmp_path / "96x256x256" / ".5.npy.9.tmp").write_bytes(b"v")
    entries = list_outputs(tmp_path)
    assert [(e.path, e.size, e.n_files) for e in entries] == [
        ("96x256x256/", 3000, 30), ("a.png", 10, 1), ("fold0/log.csv", 6, 1),
        ("report.json", 1500, 1),
    ]  # fmt: skip
    chosen = list_outputs(tmp_path, files=[tmp_path / "report.json", "a.png", "missing.csv"])
    assert [e.path for e in chosen] == ["a.png", "report.json"]
    assert list_outputs(tmp_path / "not-there") == []


def test_show_outputs_prints_the_listing_and_the_next_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "encoder.pt").write_bytes(b"w" * 2_500_000)
    show_outputs(tmp_path, ["first command", "second command"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{tmp_path}: 1 files, 2.5 MB"
    assert printed[1].split() == ["encoder.pt", "2.5", "MB"]
    assert printed[-3:] == ["next: first command", "", "or: second command"]


def test_papermill_command_passes_lists_with_y_and_leaves_out_none() -> None:
    command = papermill_command(
        "03_finetune_bilstm", Path("out dir"), encoder_file=Path("runs/a b/encoder.pt"),
        cache_dir=["c/0", "c/1"], shape=(16, 64, 64), resume=False, epochs=3, data_root=None,
    )  # fmt: skip
    words = shlex.split(command)
    assert words[:3] == [
        "papermill", "notebooks/03_finetune_bilstm.ipynb", "out dir/03_finetune_bilstm.ipynb"
    ]  # fmt: skip
    given, rest = {}, words[3:]
    while rest:  # -p name value, or -y 'name: value'
        if rest[0] == "-p":
            given[rest[1]], rest = rest[2], rest[3:]
        else:
            assert rest[0] == "-y"
            given |= yaml.safe_load(rest[1])
            rest = rest[2:]
    assert given == {
        "encoder_file": "runs/a b/encoder.pt", "cache_dir": ["c/0", "c/1"],
        "shape": [16, 64, 64], "resume": "False", "epochs": "3",
    }  # fmt: skip
    assert "-y 'cache_dir: [c/0, c/1]'" in command and "-p resume False" in command


def test_every_notebook_ends_by_listing_its_outputs_and_the_next_step() -> None:
    for notebook in sorted((ROOT / "notebooks").glob("*.py")):
        cells = [c.source for c in jupytext.read(notebook).cells if c.cell_type == "code"]
        assert "show_outputs(" in cells[-1], notebook.name
        if notebook.name != "04_submission.py":  # 04's next step is to submit its csv
            assert "papermill_command(" in cells[-1], notebook.name


def test_show_figure_saves_the_png_and_closes_the_figure(tmp_path: Path) -> None:
    """Outside a notebook kernel (here) it shows nothing; the file is a full PNG either way."""
    import matplotlib.pyplot as plt

    from kaggle_utils.common.plots import show_figure

    fig, ax = plt.subplots()
    ax.imshow(np.random.default_rng(0).random((64, 64)))
    show_figure(fig, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
