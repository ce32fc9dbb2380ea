"""Notebook 01's whole-series processing: slices per second per core and peak memory per worker.

    python benchmarks/preprocess.py [--slices 200,400,600] [--long 1727] [--size 512]
                                    [--syntaxes rle,uncompressed] [--stage-slices N] [--quick]

Builds, in a temporary folder, series of real anatomy (`ct_series.py`: the real CT of
`tests/data/real-ct` repeated along z, else a synthetic phantom) with `--slices` slices of
`--size` x `--size` each, once per transfer syntax: RLE Lossless (every competition file) and
uncompressed explicit VR little endian for comparison. Stored values are 12 bits in a 16-bit
container with RescaleIntercept -1024, alternately unsigned (PixelRepresentation 0) and signed
(PixelRepresentation 1) from one series to the next, as in the competition. `--long N` adds one
RLE series of N slices (1,727 is about the longest of the competition) for the memory check.

Each series is then processed by `kaggle_utils.cache.preprocess.process_series` (decode, HU, body
crop, resample to every shape of the default `PreprocessConfig`, i.e. 32x192x192 and
96x256x256, window, atomic `.npy` writes and the record), one after the other in one fresh
interpreter per syntax, smallest first, with one torch thread, as one worker of notebook 01's
pool runs them (after one short warm-up series: a worker's first-call costs are paid once in
hundreds of series; its reusable volume buffer still grows with each larger series here,
which is the pool's worst case). The long series runs in a fresh interpreter of its own. So:

- slices per second per core: slices / wall seconds of `process_series`, summed over the
  `--slices` series of a syntax (the interpreter's start-up and imports are not counted; the
  files are in the page cache, so disk reads are not either);
- peak RSS per worker: the child's `ru_maxrss` after each series (imports included; the RSS
  after the imports, `baseline_rss_mb`, is reported beside it). The headline figure is the
  long series' when `--long` is given, else the largest series'.

Finally a per-stage breakdown of one RLE series (`--stage-slices`, by default the largest of
`--slices`), in a fresh interpreter too: the public functions called in the order
`process_series` calls them (`load_series`, `body_bbox`, `crop_and_resample` for every shape,
`window_volume` per shape, then `save_npy_atomic` per shape), with wall time, share
of the total and minor page faults of each; then, for scale, `load_series`'s work in pieces:
`read_slice` of every file into one reused slice (decode and HU without the volume), which
and dicomsdl's bare decode into one reused buffer (the floor).

Run to run, whole-series times vary by about +-30 % on the 2-core machine (most of the time
goes to first touches of freshly allocated memory, whose cost depends on what ran before);
`slices_per_cpu_second` is reported beside the wall-clock rate.

`--quick` is a smoke run of a few seconds (one 40-slice 256x256 series per syntax). Progress
goes to stderr; the last line on stdout is JSON with every figure, `slices_per_second_per_core`
(RLE, whole pipeline) and `peak_rss_mb_per_worker` at its top level.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The parent writes the series (pydicom, via ct_series) and starts the children; the children
# import only what a worker of notebook 01 imports, so that their memory is a worker's.


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """This process' peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- children


def worker_setup() -> None:
    """What notebook 01's pool initializer does (one torch thread), then the whole pipeline
    once on a short 512x512 RLE series: a pool worker processes hundreds of series, so the
    one-off costs of a fresh interpreter (the decoders' and scipy's first calls, torch's
    set-up) are not charged to the series measured."""
    import torch
    from ct_series import SYNTAXES, write_series

    from kaggle_utils.cache.preprocess import PreprocessConfig, SeriesTask, process_series

    torch.set_num_threads(1)
    yy, xx = np.mgrid[:512, :512]  # the real size: some first-call costs grow with it
    body = np.where((yy - 256) ** 2 + (xx - 256) ** 2 < 200**2, 40.0, -1000.0)
    with tempfile.TemporaryDirectory() as tmp:
        series_dir = Path(tmp) / "1" / "2"
        write_series(series_dir, np.stack([body] * 4), 8, SYNTAXES["rle"])
        process_series(SeriesTask(1, 2, series_dir), Path(tmp) / "cache", PreprocessConfig())


def child_process(series_dirs: list[Path], cache_dir: Path) -> list[dict[str, Any]]:
    """Series through `process_series` one after another, as one pool worker does them, each
    timed, with this process' peak memory so far."""
    from kaggle_utils.cache.preprocess import PreprocessConfig, SeriesTask, process_series

    worker_setup()
    baseline_rss, baseline_peak = current_rss_mb(), peak_rss_mb()
    results = []
    for series_dir in series_dirs:
        faults, cpu = minor_faults(), cpu_seconds()
        start = time.perf_counter()
        record = process_series(
            SeriesTask(1, int(series_dir.name), series_dir), cache_dir, PreprocessConfig()
        )
        seconds = time.perf_counter() - start
        results.append(
            {
                "status": record["status"],
                "error": record["error"],
                "slices": record["n_slices"],
                "decoder": record["decoder"],
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu_seconds() - cpu, 3),
                "slices_per_s": round(record["n_slices"] / seconds, 1) if seconds > 0 else None,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "baseline_rss_mb": None if baseline_rss is None else round(baseline_rss, 1),
                "baseline_peak_rss_mb": round(baseline_peak, 1),
                "minor_faults": minor_faults() - faults,
            }
        )
    return results


def child_stages(series_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The stages of `process_series`, one public function at a time, then `load_series`'s
    parts (each file's `read_slice`, dicomsdl's bare decode)."""
    from kaggle_utils.cache.dicom import load_series, read_slice
    from kaggle_utils.cache.preprocess import (
        PreprocessConfig,
        cache_path,
        shape_name,
    )
    from kaggle_utils.cache.volume import body_bbox, crop_and_resample, window_volume
    from kaggle_utils.common.io import save_npy_atomic

    worker_setup()
    config = PreprocessConfig()
    rows: list[dict[str, Any]] = []

    def stage(name: str, call: Callable[..., Any], *call_args: Any, part_of: str = "") -> Any:
        faults = minor_faults()
        start = time.perf_counter()
        result = call(*call_args)
        row = {"stage": name, "ms": round((time.perf_counter() - start) * 1000, 1)}
        row["minor_faults"] = minor_faults() - faults
        row["rss_mb"] = None if (rss := current_rss_mb()) is None else round(rss, 1)
        if part_of:
            row["part_of"] = part_of
        rows.append(row)
        return result

    series = stage("load_series", load_series, series_dir)
    n_slices, height, width = series.hu.shape
    box = (0, height, 0, width)
    if config.body_crop:
        box = stage("body_bbox", body_bbox, series.hu)
    resampled = stage(
        "crop_and_resample (all shapes)", crop_and_resample, series.hu, box, config.shapes
    )
    volumes = {}
    for shape in config.shapes:
        volumes[shape] = stage(
            f"window {shape_name(shape)}", window_volume, resampled[shape], config.windows
        )
    del resampled
    for shape, volume in volumes.items():
        path = cache_path(cache_dir, shape, int(series_dir.name))
        stage(f"np.save {shape_name(shape)}", save_npy_atomic, path, volume)
    pipeline_ms = sum(row["ms"] for row in rows)
    for row in rows:
        row["percent"] = round(100 * row["ms"] / pipeline_ms, 1)
    peak_pipeline = peak_rss_mb()
    del series, volumes

    def read_all(files: list[Path]) -> None:
        """Decode and HU of every file into one reused slice (load_series without its volume)."""
        out = np.empty((height, width), np.float32)
        for file in files:
            read_slice(file, out=out)

    def bare_decode(files: list[Path]) -> None:
        """File read + dicomsdl's decode of the stored values into one reused buffer."""
        import dicomsdl

        buffer = None
        for file in files:
            data = file.read_bytes()  # must outlive `dataset` (copy_data=False)
            dataset = dicomsdl.open_memory(data, copy_data=False)
            info = dataset.getPixelDataInfo()
            if buffer is None:
                buffer = np.empty((info["Rows"], info["Cols"]), np.dtype(info["dtype"]))
            dataset.copyFrameData(0, buffer)

    files = sorted(p for p in series_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    stage("read_slice x n", read_all, files, part_of="load_series")
    if importlib.util.find_spec("dicomsdl") is not None:
        stage("dicomsdl decode only", bare_decode, files, part_of="load_series")
    return {
        "slices": int(n_slices),
        "size": [int(height), int(width)],
        "body_bbox": [int(v) for v in box],
        "pipeline_ms": round(pipeline_ms, 1),
        "slices_per_s": round(n_slices / (pipeline_ms / 1000), 1),
        "peak_rss_mb": round(peak_pipeline, 1),
        "stages": rows,
    }


# --------------------------------------------------------------------------- parent


def run_child(mode: str, series: str | Path, cache_dir: Path) -> Any:
    """A child interpreter for one series, or several joined by os.pathsep ("process"); its
    last stdout line is its JSON result (a list of them for "process")."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode]
    command += [str(series), str(cache_dir)]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if completed.returncode < 0 else "failed"
        return {"status": "failed", "error": f"child {reason}: exit status {completed.returncode}"}
    return json.loads(lines[-1])


def parse_counts(text: str) -> list[int]:
    counts = [int(v) for v in text.split(",") if v.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"slice counts are positive ints, not {text!r}")
    return counts


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if r.get("status") == "ok"]
    slices, seconds = sum(r["slices"] for r in ok), sum(r["seconds"] for r in ok)
    cpu = sum(r["cpu_seconds"] for r in ok)
    return {
        "slices_per_second_per_core": round(slices / seconds, 1) if seconds else None,
        # less sensitive to other work on the machine than the wall-clock figure
        "slices_per_cpu_second": round(slices / cpu, 1) if cpu else None,
        "slices": slices,
        "seconds": round(seconds, 2),
        "peak_rss_mb": max((r["peak_rss_mb"] for r in ok), default=None),
        "series": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=parse_counts, default=[200, 400, 600])
    parser.add_argument("--long", type=int, default=0, help="slices of one extra RLE series")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--syntaxes", default="rle,uncompressed", help="of: rle, uncompressed")
    parser.add_argument("--stage-slices", type=int, default=0, help="0: the largest of --slices")
    parser.add_argument("--quick", action="store_true", help="40 slices of 256x256, no long one")
    parser.add_argument(
        "--child", nargs=3, metavar=("MODE", "SERIES", "CACHE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        mode, series_dirs, cache_dir = args.child
        if mode == "process":
            dirs = [Path(d) for d in series_dirs.split(os.pathsep)]
            print(json.dumps(child_process(dirs, Path(cache_dir))))
        else:
            print(json.dumps(child_stages(Path(series_dirs), Path(cache_dir))))
        return
    if args.quick:
        args.slices, args.size, args.long = [40], 256, 0
    from ct_series import SYNTAXES, source_slices, write_series

    from kaggle_utils.cache.preprocess import PreprocessConfig, shape_name

    syntaxes = [s.strip() for s in args.syntaxes.split(",") if s.strip()]
    if unknown := set(syntaxes) - set(SYNTAXES):
        parser.error(f"unknown syntax(es) {sorted(unknown)}; use {', '.join(SYNTAXES)}")
    hu, source = source_slices()
    if hu.shape[1] % args.size or hu.shape[2] % args.size:
        parser.error(f"--size must divide the source's {hu.shape[1]}x{hu.shape[2]}")
    hu = np.ascontiguousarray(hu[:, :: hu.shape[1] // args.size, :: hu.shape[2] // args.size])
    stage_slices = args.stage_slices or max(args.slices)

    # (syntax, slices, signed, role); signedness alternates from one series to the next.
    plan = [(syntax, n, "throughput") for syntax in syntaxes for n in args.slices]
    if args.long:
        plan.append(("rle", args.long, "long"))
    plan = [(syntax, n, k % 2 == 1, role) for k, (syntax, n, role) in enumerate(plan)]
    results: dict[str, Any] = {
        "source": source,
        "size": args.size,
        "shapes": [list(shape) for shape in PreprocessConfig().shapes],
        "load_avg_before": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        dirs = []
        for index, (syntax, n, signed, _role) in enumerate(plan):
            folder = root / "series" / str(100 + index)
            log(f"writing {syntax} series of {n} slices ({'signed' if signed else 'unsigned'})")
            write_series(folder, hu, n, SYNTAXES[syntax], signed=signed)
            dirs.append(folder)
        # The stage breakdown reads an RLE series of `stage_slices` slices: one of the plan's
        # if there is one (processing leaves it as it was), else one more.
        reusable = [
            folder
            for (syntax, n, _, role), folder in zip(plan, dirs, strict=True)
            if (syntax, n, role) == ("rle", stage_slices, "throughput")
        ]
        if reusable:
            stage_dir = reusable[0]
        else:
            stage_dir = root / "series" / "99"
            log(f"writing rle series of {stage_slices} slices for the stage breakdown")
            write_series(stage_dir, hu, stage_slices, SYNTAXES["rle"])
        results["write_seconds"] = round(time.perf_counter() - start, 1)

        # One worker per syntax takes its series one after another, as notebook 01's pool
        # does (a worker's first series pays for its fresh memory, later ones reuse it); the
        # long series gets a fresh worker of its own, so its peak is its own.
        per_series: list[tuple[tuple[str, int, bool, str], dict[str, Any]]] = []
        groups = [[k for k, item in enumerate(plan) if item[0] == s and item[3] == "throughput"]
                  for s in syntaxes]  # fmt: skip
        groups += [[k] for k, item in enumerate(plan) if item[3] == "long"]
        for group in groups:
            names = ", ".join(f"{plan[k][0]} {plan[k][1]}" for k in group)
            log(f"processing {names} slices in a fresh worker ...")
            joined = os.pathsep.join(str(dirs[k]) for k in group)
            results_of = run_child("process", joined, root / "cache")
            if isinstance(results_of, dict):  # the child failed: its error for each series
                results_of = [results_of] * len(group)
            for k, result in zip(group, results_of, strict=True):
                result = dict(result, syntax=plan[k][0], signed=plan[k][2])
                per_series.append((plan[k], result))
                log(f"  {json.dumps(result)}")
        per_series.sort(key=lambda entry: plan.index(entry[0]))
        log(f"stage breakdown of an rle series of {stage_slices} slices ...")
        stages = run_child("stages", stage_dir, root / "cache")

    for syntax in syntaxes:
        rows = [r for (s, _, _, role), r in per_series if s == syntax and role == "throughput"]
        results[syntax] = summarize(rows)
    long = [r for (_, _, _, role), r in per_series if role == "long"]
    if long:
        results["long"] = long[0]
    headline = results.get("rle") or results[syntaxes[0]]
    results["slices_per_second_per_core"] = headline["slices_per_second_per_core"]
    peak_source = (
        long[0]
        if long
        else max(
            (r for _, r in per_series if r.get("status") == "ok"),
            key=lambda r: r["slices"],
            default={},
        )
    )
    results["peak_rss_mb_per_worker"] = peak_source.get("peak_rss_mb")
    results["peak_rss_series_slices"] = peak_source.get("slices")
    results["stages"] = stages
    results["load_avg_after"] = round(os.getloadavg()[0], 2)

    shapes = " + ".join(shape_name(shape) for shape in PreprocessConfig().shapes)
    print(f"source: {source}, {args.size}x{args.size}; shapes {shapes}")
    print(
        f"{'syntax':<13} {'slices':>6} {'signed':>6} {'seconds':>8} {'slices/s':>9} {'peak MB':>8}"
    )
    for (syntax, n, signed, role), r in per_series:
        label = syntax + (" (long)" if role == "long" else "")
        if r.get("status") != "ok":
            print(f"{label:<13} {n:>6} {signed!s:>6}  {r.get('error')}")
            continue
        print(
            f"{label:<13} {n:>6} {signed!s:>6} {r['seconds']:>8.2f} {r['slices_per_s']:>9.1f} "
            f"{r['peak_rss_mb']:>8.0f}"
        )
    for syntax in syntaxes:
        summary = results[syntax]
        print(
            f"{syntax}: {summary['slices_per_second_per_core']} slices/s per core "
            f"({summary['slices_per_cpu_second']} per CPU second)"
        )
    if stages.get("stages"):
        print(f"stages of one rle series of {stages['slices']} slices:")
        for row in stages["stages"]:
            share = f"{row['percent']:>5.1f} %" if "percent" in row else f"(in {row['part_of']})"
            faults = row["minor_faults"]
            print(f"  {row['stage']:<24} {row['ms']:>9.1f} ms {share:>16} {faults:>9} page faults")
    print(json.dumps(results))
    if any(r.get("status") != "ok" for _, r in per_series) or "stages" not in stages:
        sys.exit(1)


if __name__ == "__main__":
    main()
