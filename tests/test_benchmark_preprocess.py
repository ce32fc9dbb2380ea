"""benchmarks/preprocess.py runs end to end (`--quick`) and ends with its JSON summary.

Slow: several interpreters that each import torch, 7 to 13 s on the 2-core machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "preprocess.py"


@pytest.mark.slow
def test_quick_run_reports_throughput_and_peak_memory() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["slices_per_second_per_core"] > 0
    assert result["peak_rss_mb_per_worker"] > 0
    for syntax in ("rle", "uncompressed"):
        assert result[syntax]["slices_per_second_per_core"] > 0
        assert all(series["status"] == "ok" for series in result[syntax]["series"])
    stages = {row["stage"] for row in result["stages"]["stages"]}
    assert {"load_series", "body_bbox", "crop_and_resample (all shapes)"} <= stages
    assert {"read_slice x n", "dicomsdl decode only"} <= stages
    assert any(stage.startswith("window ") for stage in stages)
