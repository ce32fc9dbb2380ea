"""Every case of the DICOM corpus (tests/dicom_corpus.py: real CT slices in every transfer
syntax, pixel format, rescale, ordering clue and multi-frame layout) decodes through
`load_series`, with either reader, to plain pydicom's HU in the canonical orientation, and
notebook 04 predicts every one of them with the model.

`load_series` runs in a child process (dicomsdl is native code: a crash must fail one test,
not kill the run); the reference is plain pydicom in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import papermill
import polars as pl
import pytest

from kaggle_utils.cache.dicom import series_transfer_syntax
from kaggle_utils.metric import validate_submission

from dicom_corpus import SPACING_MM, Case, read_cases, reference_volume, write_corpus
from submission_checks import assert_no_notebook_warnings, notebook_output_lines

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE_HU = 1.0
READERS = ("auto", "pydicom")
CORPUS_CASES = [
    "explicit_le_signed_16", "implicit_le_unsigned_12", "explicit_big_endian",
    "deflated_explicit_le", "rle_lossless", "jpeg_lossless_sv1", "jpeg_lossless_process14",
    "jpeg_ls_lossless", "jpeg_ls_fragmented", "jpeg_2000_lossless", "htj2k_lossless",
    "eight_bit_unsigned", "sixteen_bit_unsigned", "signed_12_bit",
    "slope_and_fractional_intercept", "pixel_padding_value", "monochrome1",
    "icon_image_sequence", "icon_image_sequence_rle", "no_position_slice_location",
    "no_position_no_location", "enhanced_ct_frames_ascending",
    "legacy_enhanced_ct_frames_descending", "archive_folder_with_non_images",
]  # fmt: skip

# What "auto" must decode with dicomsdl (the fast path): the verified syntaxes and pixel
# formats, an icon sequence before the pixel data included; the rest goes to pydicom.
DICOMSDL_CASES = {
    "explicit_le_signed_16", "implicit_le_unsigned_12", "rle_lossless", "jpeg_lossless_sv1",
    "jpeg_ls_lossless", "jpeg_ls_fragmented", "jpeg_2000_lossless", "sixteen_bit_unsigned",
    "signed_12_bit", "slope_and_fractional_intercept", "pixel_padding_value", "monochrome1",
    "icon_image_sequence", "icon_image_sequence_rle", "no_position_slice_location",
    "no_position_no_location", "archive_folder_with_non_images",
}  # fmt: skip

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from kaggle_utils.cache.dicom import load_series

    corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
    for case in json.loads((corpus / "cases.json").read_text()):
        for reader in ("auto", "pydicom"):
            key = f"{case}-{reader}"
            print(key, flush=True)  # the last line names the case if the process dies
            try:
                series = load_series(corpus / case, decoder=reader)
            except Exception as error:
                (out / f"{key}.json").write_text(json.dumps({"error": repr(error)}))
                continue
            np.save(out / f"{key}.npy", series.hu)
            z = None if series.z_positions is None else series.z_positions.tolist()
            (out / f"{key}.json").write_text(json.dumps({
                "ordered_by": series.ordered_by, "z": z, "spacing": series.spacing,
                "decoder": series.decoder, "skipped": [[s.name, s.reason] for s in series.skipped],
            }))
    """
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom-corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def decoded(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case through `load_series` with each reader, in one child process."""
    out = tmp_path_factory.mktemp("decoded")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    last = result.stdout.strip().splitlines()[-1:] or ["(none)"]
    assert result.returncode == 0, (
        f"the decoding process died (exit {result.returncode}) on {last[0]}:\n"
        f"{result.stderr[-2000:]}"
    )
    return out


def test_the_corpus_has_every_case(corpus: Path) -> None:
    assert list(read_cases(corpus)) == CORPUS_CASES


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", CORPUS_CASES)
def test_each_case_decodes_to_pydicoms_hu_feet_to_head(
    corpus: Path, decoded: Path, name: str, reader: str
) -> None:
    case: Case = read_cases(corpus)[name]
    outcome = json.loads((decoded / f"{name}-{reader}.json").read_text())
    assert "error" not in outcome, outcome.get("error")
    expected = reference_volume(corpus / name, case)
    hu = np.load(decoded / f"{name}-{reader}.npy")
    assert hu.shape == expected.shape
    error = float(np.abs(hu - expected).max())
    assert error <= TOLERANCE_HU, f"{error:g} HU from pydicom's"
    assert outcome["ordered_by"] == case.ordered_by
    if case.ordered_by != "instance_number":
        np.testing.assert_allclose(outcome["z"], sorted(case.z.values()), atol=1e-4)
        assert outcome["spacing"] == pytest.approx(SPACING_MM)
    skipped = {file: reason for file, reason in outcome["skipped"]}
    assert set(skipped) == set(case.skip)
    for file, word in case.skip.items():
        assert word in skipped[file], skipped[file]
    expected_decoder = "dicomsdl" if reader == "auto" and name in DICOMSDL_CASES else "pydicom"
    assert outcome["decoder"] == expected_decoder


def test_a_folder_mixing_an_enhanced_file_and_single_slices(corpus: Path, tmp_path: Path) -> None:
    """Single-frame slices before and after a multi-frame file: one volume by position, the
    slices at a frame's position dropped as duplicates."""
    from kaggle_utils.cache.dicom import load_series

    folder = tmp_path / "mixed"
    folder.mkdir()
    singles = sorted((corpus / "explicit_le_signed_16").iterdir())
    (folder / "1.dcm").write_bytes(singles[0].read_bytes())
    (folder / "2.dcm").write_bytes(
        (corpus / "enhanced_ct_frames_ascending" / "enhanced.dcm").read_bytes()
    )
    (folder / "3.dcm").write_bytes(singles[1].read_bytes())
    series = load_series(folder)
    case = read_cases(corpus)["enhanced_ct_frames_ascending"]
    expected = reference_volume(corpus / "enhanced_ct_frames_ascending", case)
    assert series.hu.shape == expected.shape
    assert float(np.abs(series.hu - expected).max()) <= TOLERANCE_HU
    assert len(series.skipped) == 2 and all("duplicate" in s.reason for s in series.skipped)


def test_the_preflight_reads_an_archive_folders_syntax(corpus: Path) -> None:
    """IM000001-style names beside a DICOMDIR and a dose report: the syntax of the images."""
    assert series_transfer_syntax(corpus / "archive_folder_with_non_images") == (
        "1.2.840.10008.1.2.5"
    )
    assert series_transfer_syntax(corpus / "htj2k_lossless") == "1.2.840.10008.1.2.4.201"


@pytest.mark.slow
def test_notebook_04_predicts_every_corpus_series_with_the_model(
    corpus: Path, tiny_competition: Path, model_dir: Path, tmp_path: Path
) -> None:
    """The corpus as a test set, one patient per case: with `max_prior_share=0` the notebook
    fails if any patient gets the prior, and no decoder warning may be printed."""
    data = tmp_path / "corpus-competition"
    patients = {}
    for index, name in enumerate(CORPUS_CASES):
        patient_id, series_id = 90000 + index, 1000 + index
        series_dir = data / "test_images" / str(patient_id) / str(series_id)
        series_dir.parent.mkdir(parents=True)
        series_dir.symlink_to(corpus / name, target_is_directory=True)
        patients[patient_id] = name
    sample = pl.read_csv(tiny_competition / "sample_submission.csv")
    rows = sample.head(1).drop("patient_id")
    pl.concat([pl.DataFrame({"patient_id": list(patients)}).join(rows, how="cross")]).write_csv(
        data / "sample_submission.csv"
    )
    output_csv = tmp_path / "submission.csv"
    executed = tmp_path / "executed_04_submission.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "04_submission.ipynb"), str(executed),
        parameters={
            "data_root": str(data), "model_dir": str(model_dir), "output_csv": str(output_csv),
            "max_prior_share": 0.0, "explain_patients": 0, "smoke": True,
        },
        kernel_name="python3", cwd=str(ROOT), progress_bar=False,
    )  # fmt: skip
    submission = pl.read_csv(output_csv)
    validate_submission(submission, pl.read_csv(data / "sample_submission.csv"))
    assert sorted(submission["patient_id"].to_list()) == sorted(patients)
    assert_no_notebook_warnings(executed)
    assert "NO DECODER" not in "\n".join(notebook_output_lines(executed))
