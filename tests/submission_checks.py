"""What the tests that run notebook 04 end to end check its output with, so that a wrong answer
fails them: a file that is the prior for every patient (every series failed to decode), or a
broken decoder install that still writes a valid file.

Those tests run the notebook with `max_prior_share=0` (it raises `PriorShareError` as soon as one
patient gets the prior), then compare its submission.csv with `predict_test_set` called directly
on the same inputs (`assert_same_submission`), and fail on any `!!! WARNING` line in its output
(`assert_no_notebook_warnings`): the decoder preflight's, and the preprocessing warnings that
notebook 04 prints the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.metric import LABEL_COLUMNS, PATIENT_ID, validate_submission
from kaggle_utils.submission.inference import SubmissionResult

# How notebook 04 prints each warning of the decoder preflight (`submission.startup_report`) and
# of the preprocessing: print(f"\n!!! WARNING: {warning}").
WARNING_PREFIX = "!!! WARNING"
# The line `startup_report` prints before the test series' transfer syntaxes: the preflight ran.
PREFLIGHT_HEADER = "test series by transfer syntax:"
# The notebook and the direct call run the same code on the same files and device (fp32 on the
# CPU): they agree far closer than this.
ATOL = 1e-5


def notebook_output_lines(executed: Path) -> list[str]:
    """Every line an executed notebook printed or displayed (streams, results, errors)."""
    notebook = json.loads(Path(executed).read_text())
    texts: list[str] = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                texts.append("".join(output["text"]))
            elif output["output_type"] == "error":
                texts.extend(output["traceback"])
            else:
                texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts).splitlines()


def assert_no_notebook_warnings(executed: Path) -> None:
    """The executed notebook 04 ran its decoder preflight and printed no `!!! WARNING` line.

    Also checks that the notebook still prints its warnings with that prefix, so that a
    renamed prefix fails here instead of letting every warning through unseen."""
    notebook = json.loads(Path(executed).read_text())
    source = "\n".join("".join(cell["source"]) for cell in notebook["cells"])
    assert f"{WARNING_PREFIX}: {{warning}}" in source, (
        f"notebook 04 no longer prints its warnings as '{WARNING_PREFIX}: ...': update "
        "tests/submission_checks.py"
    )
    lines = notebook_output_lines(executed)
    assert any(PREFLIGHT_HEADER in line for line in lines), "the decoder preflight did not run"
    warnings = [line for line in lines if line.lstrip().startswith(WARNING_PREFIX)]
    assert not warnings, "notebook 04 warned:\n" + "\n".join(warnings)


def assert_same_submission(
    csv_path: Path, direct: SubmissionResult, sample_csv: Path, atol: float = ATOL
) -> None:
    """The notebook's submission.csv is valid and is, to `atol`, what `predict_test_set` gave
    when called directly on the same inputs; that call gave no patient the prior."""
    sample = pl.read_csv(sample_csv)
    written = pl.read_csv(csv_path)
    validate_submission(written, sample)
    assert Path(csv_path).resolve() != Path(direct.csv_path).resolve(), "the same file twice"
    assert direct.prior_patients == [], f"the direct call gave the prior: {direct.problems}"
    assert written.columns == sample.columns
    assert written[PATIENT_ID].to_list() == sample[PATIENT_ID].to_list()
    assert written[PATIENT_ID].to_list() == direct.submission[PATIENT_ID].to_list()
    np.testing.assert_allclose(
        written.select(LABEL_COLUMNS).to_numpy(),
        direct.submission.select(LABEL_COLUMNS).to_numpy(),
        rtol=0,
        atol=atol,
    )


def differs_from_the_prior(submission: pl.DataFrame, prior: dict[str, float]) -> list[int]:
    """The patients whose row is not the prior (more than 1e-4 off in some column)."""
    values = submission.select(LABEL_COLUMNS).to_numpy()
    constant = np.array([prior[c] for c in LABEL_COLUMNS])
    far = np.abs(values - constant).max(axis=1) > 1e-4
    return [int(p) for p, off in zip(submission[PATIENT_ID].to_list(), far, strict=True) if off]
