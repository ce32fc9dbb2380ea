"""`read_slice(path)` ("auto") on every DICOM test file pydicom and pydicom-data ship.

dicomsdl is native code: on a kind of file it was never checked on it can read past the file
or the frame buffer, corrupt the heap, segfault or return wrong pixels. This test asserts the
contract of `read_slice` whatever the rule that picks the decoder: for each of those files
(every bit depth, colour, multi-frame, big endian, deflated, JPEG, JPEG-LS, JPEG 2000, RLE,
float pixels, broken headers), "auto" either returns the HU of the pydicom reference (plain
pydicom: `pixel_array` then `apply_modality_lut`, none of this project's code) or raises
`DicomReadError`, and never takes the process down.

Each decode runs in its own child process: a driver process, run with glibc's malloc checks
where they exist (so that a heap overrun aborts instead of passing silently), imports the
decoders once, then forks a child per (file, decoder). The child decodes the file ("auto"
twice, which must agree: a decoder reading past its input returns whatever lies there), saves
the HU, then frees what it can and makes glibc walk its free lists before exiting. The pydicom
reference is computed in a child too, since pydicom's plugins are native code as well.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHILD_TIMEOUT_S = 60.0  # per decode; the largest test file takes about a second
DRIVER_TIMEOUT_S = 900
JOBS = 2
AUTO, REFERENCE = "auto", "pydicom"


# --------------------------------------------------------------------------- driver process


def _child(path: str, decoder: str, out: Path) -> None:
    """Decode `path` with `decoder` ("auto" twice; REFERENCE: plain pydicom), write the
    outcome, then walk the heap."""
    import faulthandler

    from kaggle_utils.cache.dicom import DicomReadError, read_slice

    from conftest import pydicom_reference_hu

    with open(out / "stderr.txt", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    faulthandler.enable()  # a Python traceback in stderr.txt if it dies of a signal
    result: dict[str, object]
    try:
        if decoder == REFERENCE:
            np.save(out / "hu.npy", pydicom_reference_hu(path))
            result = {"outcome": "ok", "decoder": "plain pydicom"}
        else:
            first = read_slice(path, decoder)
            np.save(out / "hu.npy", first.hu)
            result = {"outcome": "ok", "decoder": first.decoder}
            second = read_slice(path, decoder)  # reading past its input gives whatever lies there
            if not np.array_equal(first.hu, second.hu, equal_nan=True):
                result = {"outcome": "nondeterministic", "detail": "two decodes differ"}
    except DicomReadError as error:
        result = {"outcome": "DicomReadError", "detail": str(error).replace(path, "<file>")}
    except Exception as error:
        result = {"outcome": f"raised {type(error).__name__}", "detail": str(error)}
    (out / "result.json").write_text(json.dumps(result))
    _walk_heap()
    os._exit(0)


def _walk_heap() -> None:
    """Free what the decode left and make glibc walk its free lists, so that a heap the
    decoder overran aborts here rather than in some later, unrelated allocation. (A full
    interpreter shutdown frees more, but costs 0.05 s per child.)"""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc only: consolidates every free chunk
    except (AttributeError, OSError):
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _collect(status: int, out: Path) -> dict[str, object]:
    stderr = out / "stderr.txt"
    log = stderr.read_text(errors="replace") if stderr.exists() else ""
    log = log.replace("Fatal Python error", "\nFatal Python error")  # glibc adds no newline
    if os.WIFSIGNALED(status):
        # glibc's message (e.g. "free(): invalid pointer") comes first, then faulthandler's
        # traceback, innermost frame first.
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        message = [line for line in lines if not line.startswith(("Fatal Python", "Current"))]
        frame = next((line for line in lines if line.startswith("File ")), "")
        glibc = message[0] if message and not message[0].startswith("File ") else ""
        detail = "; ".join(filter(None, [glibc, frame]))
        return {"outcome": f"killed by {_signal_name(os.WTERMSIG(status))}", "detail": detail}
    result_file = out / "result.json"
    if os.WEXITSTATUS(status) != 0 or not result_file.exists():
        return {"outcome": f"exit status {os.WEXITSTATUS(status)}", "detail": log[-300:]}
    return json.loads(result_file.read_text())


def drive(files: list[str], work: Path) -> list[dict[str, object]]:
    """Decode every file with "auto" and the pydicom reference, one forked child each."""
    import kaggle_utils.cache.dicom as dicom

    dicom.dicomsdl_available()  # imports dicomsdl once, before the forks
    import conftest  # noqa: F401  the reference, imported once too

    for module in ("pydicom.pixels", "pylibjpeg", "libjpeg", "openjpeg", "rle"):
        try:
            __import__(module)
        except ImportError:
            pass
    tasks = [(i, decoder) for i in range(len(files)) for decoder in (AUTO, REFERENCE)]
    results: dict[tuple[int, str], dict[str, object]] = {}
    running: dict[int, tuple[int, str, Path, float]] = {}
    while tasks or running:
        while tasks and len(running) < JOBS:
            i, decoder = tasks.pop(0)
            out = work / f"{i}-{decoder}"
            out.mkdir()
            pid = os.fork()
            if pid == 0:
                try:
                    _child(files[i], decoder, out)
                finally:
                    os._exit(3)  # only if the child machinery itself failed
            running[pid] = (i, decoder, out, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for child, (i, decoder, _, started) in list(running.items()):
                if now - started > CHILD_TIMEOUT_S:
                    os.kill(child, signal.SIGKILL)
                    os.waitpid(child, 0)
                    del running[child]
                    results[(i, decoder)] = {"outcome": f"timeout after {CHILD_TIMEOUT_S:.0f} s"}
            time.sleep(0.002)
            continue
        i, decoder, out, _ = running.pop(pid)
        results[(i, decoder)] = {**_collect(status, out), "dir": str(out)}
    return [
        {"file": path, AUTO: results[(i, AUTO)], REFERENCE: results[(i, REFERENCE)]}
        for i, path in enumerate(files)
    ]


def _malloc_check_env() -> dict[str, str]:
    """glibc's heap consistency checks for the driver and its children, where they exist:
    libc_malloc_debug (glibc >= 2.34) or MALLOC_CHECK_ (older glibc; ignored elsewhere)."""
    env = {"MALLOC_CHECK_": "3", "LIBC_FATAL_STDERR_": "1"}
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return env
    libc = next((line.split()[-1] for line in maps.splitlines() if "/libc.so.6" in line), None)
    debug = Path(libc).with_name("libc_malloc_debug.so.0") if libc else None
    if debug is not None and debug.exists():
        env["LD_PRELOAD"] = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), str(debug)]))
        env["GLIBC_TUNABLES"] = "glibc.malloc.check=3"
    return env


# --------------------------------------------------------------------------- the test


def _test_files() -> list[str]:
    from pydicom.data import get_testdata_files

    return sorted({f for f in get_testdata_files() if Path(f).is_file()})


def _header(path: str) -> str:
    """The header fields that choose a decoder, for the failure message."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception as error:
        return f"header unreadable ({type(error).__name__})"
    meta = getattr(ds, "file_meta", None)
    fields = {
        "syntax": meta.get("TransferSyntaxUID") if meta is not None else None,
        "bits": "/".join(str(ds.get(k, "-")) for k in ("BitsAllocated", "BitsStored")),
        "signed": ds.get("PixelRepresentation"),
        "spp": ds.get("SamplesPerPixel"),
        "frames": ds.get("NumberOfFrames"),
        "photometric": ds.get("PhotometricInterpretation"),
    }
    return ", ".join(f"{k} {v}" for k, v in fields.items() if v not in (None, ""))


def _verdict(entry: dict) -> str | None:
    """Why this file breaks the contract of `read_slice(path)`, or None when it keeps it."""
    auto, reference = entry[AUTO], entry[REFERENCE]
    outcome = auto["outcome"]
    if outcome == "DicomReadError":
        return None
    if outcome != "ok":
        return f"auto: {outcome}: {str(auto.get('detail', ''))[:200]}"
    if reference["outcome"] != "ok":
        return (
            f"auto decoded it ({auto['decoder']}) but the pydicom reference gave "
            f"{reference['outcome']}: {str(reference.get('detail', ''))[:150]}"
        )
    hu = np.load(Path(auto["dir"]) / "hu.npy")
    expected = np.load(Path(reference["dir"]) / "hu.npy")
    if hu.shape != expected.shape:
        return f"auto ({auto['decoder']}) gave {hu.shape}, pydicom {expected.shape}"
    # float32 HU against pydicom's float64: equal up to float32 rounding
    tolerance = np.maximum(0.01, 1e-6 * np.abs(expected))
    if not np.all(np.abs(hu.astype(np.float64) - expected) <= tolerance):
        diff = np.abs(hu.astype(np.float64) - expected.astype(np.float64))
        return (
            f"auto ({auto['decoder']}) HU differ from pydicom's in "
            f"{int(np.count_nonzero(diff))}/{diff.size} pixels, max {np.nanmax(diff):g}"
        )
    return None


def _contract_failures(files: list[str], work: Path) -> list[str]:
    """Run the driver on `files`; one line per file that breaks the contract, and why."""
    if not hasattr(os, "fork"):
        pytest.skip("the driver forks a child per decode (POSIX only)")
    (work / "files.json").write_text(json.dumps(files))
    result = subprocess.run(
        [sys.executable, __file__, str(work)],
        capture_output=True,
        text=True,
        timeout=DRIVER_TIMEOUT_S,
        env={**os.environ, **_malloc_check_env()},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, f"the driver process failed:\n{result.stderr[-3000:]}"
    entries = json.loads((work / "results.json").read_text())
    assert [entry["file"] for entry in entries] == files
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    failures = []
    for entry in entries:
        why = _verdict(entry)
        if why is not None:
            name = os.path.relpath(entry["file"], root)
            failures.append(f"{name} [{_header(entry['file'])}]\n    {why}")
    return failures


@pytest.mark.slow
def test_auto_decoder_never_crashes_and_matches_pydicom_or_raises(tmp_path: Path) -> None:
    files = _test_files()
    if len(files) < 100:
        pytest.skip(f"only {len(files)} pydicom test files: is pydicom-data installed?")
    started = time.monotonic()
    failures = _contract_failures(files, tmp_path)
    assert not failures, (
        f"{len(failures)} of {len(files)} pydicom test files break read_slice(path) "
        f"(neither pydicom's HU nor DicomReadError; {time.monotonic() - started:.0f} s):\n"
        + "\n".join(failures)
    )


def _double(name: str) -> Callable[[Any], None]:
    def edit(ds: Any) -> None:
        setattr(ds, name, 2 * int(getattr(ds, name)))

    return edit


def _eight_bit(ds: Any) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0


# Real files whose header was edited to disagree with the pixel data it describes (a corrupt
# or hand-edited export). A decoder trusting the header reads past the pixel data (native
# syntaxes), fills a frame of the wrong size (JPEG 2000, JPEG lossless) or writes 16-bit
# samples into an 8-bit buffer (RLE, JPEG 2000, JPEG lossless: a heap overrun). pydicom
# raises on most of them; "auto" must raise too, or agree with it.
LYING_HEADERS: dict[str, tuple[str, Callable[[Any], None]]] = {
    "explicit_rows_x2": ("CT_small.dcm", _double("Rows")),
    "explicit_columns_x2": ("CT_small.dcm", _double("Columns")),
    "implicit_rows_x2": ("MR_small_implicit.dcm", _double("Rows")),
    "rle_rows_x2": ("MR_small_RLE.dcm", _double("Rows")),
    "rle_8_bit_header": ("MR_small_RLE.dcm", _eight_bit),
    "j2k_rows_x2": ("693_J2KR.dcm", _double("Rows")),
    "j2k_8_bit_header": ("693_J2KR.dcm", _eight_bit),
    "jpeg_lossless_rows_x2": ("JPEG-LL.dcm", _double("Rows")),
    "jpeg_lossless_8_bit_header": ("JPEG-LL.dcm", _eight_bit),
    "jpeg_ls_rows_x2": ("MR_small_jpeg_ls_lossless.dcm", _double("Rows")),
    "jpeg_ls_8_bit_header": ("MR_small_jpeg_ls_lossless.dcm", _eight_bit),
}


def test_auto_decoder_survives_headers_that_disagree_with_the_pixel_data(tmp_path: Path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    files = []
    for name, (source, edit) in LYING_HEADERS.items():
        path = get_testdata_file(source)
        if path is None:
            pytest.skip(f"pydicom test file {source} not installed")
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(tmp_path / f"{name}.dcm")
        files.append(str(tmp_path / f"{name}.dcm"))
    work = tmp_path / "work"
    work.mkdir()
    failures = _contract_failures(files, work)
    assert not failures, (
        f"{len(failures)} of {len(files)} files with a header that disagrees with their pixel "
        f"data break read_slice(path) (neither pydicom's HU nor DicomReadError):\n"
        + "\n".join(failures)
    )


if __name__ == "__main__":  # the driver: python tests/test_dicom_robustness.py WORK_DIR
    work_dir = Path(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    entries = drive(json.loads((work_dir / "files.json").read_text()), work_dir)
    (work_dir / "results.json").write_text(json.dumps(entries))
