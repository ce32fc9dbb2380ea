"""Decoding speed: `read_hu` against the plain pydicom decode, and notebook 01's throughput.

    python benchmarks/decode.py [--slices 100] [--series 6] [--repeats 3]

Builds, in a temporary folder, 512x512 CT series in two transfer syntaxes (uncompressed
explicit VR little endian and RLE Lossless, the syntax of the visible test files) from real
anatomy (`tests/data/real-ct`; `ct_series.py`).
Then:

1. per slice: the baseline `pydicom.dcmread` + `pixel_array` + rescale (with the pylibjpeg
   plugins of requirements.txt installed, as users run it) against `read_hu`; for reference
   also pydicom restricted to its own decoders and dicomsdl's bare decode. Best of `--repeats`
   passes over the same files, slices per second and the ratio read_hu / baseline;
2. whole series: `preprocess_dataset` (decode, body crop, resample to 32x192x192 and
   96x256x256, window, write) over `--series` series with 2 worker processes, slices per second
   including the pool start-up.

The last line is JSON with every figure, for scripts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from ct_series import SYNTAXES, source_slices, write_series

from kaggle_utils.cache.dicom import read_hu
from kaggle_utils.cache.preprocess import PreprocessConfig, list_series, preprocess_dataset


def pydicom_baseline(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def pydicom_own_decoders(path: Path) -> np.ndarray:
    """The same with pydicom's built-in decoders only (no pylibjpeg plugins)."""
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(path)
    stored = pixel_array(ds, decoding_plugin="pydicom")
    return stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def dicomsdl_bare(path: Path) -> np.ndarray:
    import dicomsdl

    return dicomsdl.open(str(path)).pixelData(storedvalue=True)


def slices_per_second(read: Callable[[Path], np.ndarray], paths: list[Path], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            read(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=100, help="slices per benchmark series")
    parser.add_argument("--series", type=int, default=8, help="series for the throughput run")
    parser.add_argument("--repeats", type=int, default=3, help="passes per decoder (best kept)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the throughput run")
    args = parser.parse_args()

    hu, source = source_slices()
    results: dict[str, object] = {"source": source, "slices": args.slices}
    print(f"source: {source}, {hu.shape[1]}x{hu.shape[2]}, {args.slices} slices per series")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        header = (
            "syntax",
            "pydicom/s",
            "read_hu/s",
            "ratio",
            "own-decoder/s",
            "ratio",
            "dicomsdl/s",
        )
        print("{:<13} {:>10} {:>10} {:>6} {:>14} {:>6} {:>11}".format(*header))
        for name, syntax in SYNTAXES.items():
            paths = write_series(root / name, hu, args.slices, syntax)
            np.testing.assert_array_equal(read_hu(paths[0]), pydicom_baseline(paths[0]))
            baseline = slices_per_second(pydicom_baseline, paths, args.repeats)
            ours = slices_per_second(read_hu, paths, args.repeats)
            own = slices_per_second(pydicom_own_decoders, paths, args.repeats)
            bare = slices_per_second(dicomsdl_bare, paths, args.repeats)
            ratio, own_ratio = ours / baseline, ours / own
            print(
                f"{name:<13} {baseline:>10.0f} {ours:>10.0f} {ratio:>5.1f}x {own:>14.0f} "
                f"{own_ratio:>5.1f}x {bare:>11.0f}"
            )
            results[name] = {
                "pydicom_slices_per_s": round(baseline, 1),
                "read_hu_slices_per_s": round(ours, 1),
                "ratio": round(ratio, 2),
                "pydicom_own_decoders_slices_per_s": round(own, 1),
                "ratio_vs_own_decoders": round(own_ratio, 2),
                "dicomsdl_bare_slices_per_s": round(bare, 1),
            }

        competition = root / "competition"
        for index in range(args.series):
            syntax = list(SYNTAXES.values())[index % len(SYNTAXES)]
            write_series(
                competition / "train_images" / "1" / str(100 + index), hu, args.slices, syntax
            )
        tasks = list_series(competition, "train")
        start = time.perf_counter()
        metadata = preprocess_dataset(
            tasks, root / "cache", PreprocessConfig(), workers=args.workers, progress=False
        )
        seconds = time.perf_counter() - start
        total = int(metadata["n_slices"].sum())
        rate = total / seconds
        print(
            f"notebook 01 processing: {total} slices in {len(tasks)} series, {args.workers} "
            f"workers: {seconds:.1f} s, {rate:.0f} slices/s (shapes 32x192x192 + 96x256x256)"
        )
        results["pipeline"] = {
            "workers": args.workers,
            "series": len(tasks),
            "slices": total,
            "seconds": round(seconds, 2),
            "slices_per_s": round(rate, 1),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
