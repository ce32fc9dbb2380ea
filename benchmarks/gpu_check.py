"""`make gpu-check`: one short, prepared run on a CUDA machine that has no network.

Installs kaggle_utils from a bundle (`make gpu-bundle`: wheels of what that machine lacks, for
its Python) with `pip install --no-index`, then runs the steps asked for (`--steps`, all by
default):
- device: what `device="auto"` and `precision="auto"` pick on this GPU, and torch's compiled
  architectures (`runtime.pick_device`, `runtime.resolve_precision`);
- shapes: the real shapes at fp16 and bf16 (`benchmarks/gpu_shapes.py`: one fine-tuning step
  at 96 x 256 x 256, one pretraining step at 32 x 192 x 192, one test patient), with the
  projected GPU hours of a full run;
- notebooks: tiny synthetic demo data through notebooks 01 to 04 with papermill on the GPU at
  every precision the GPU allows (fp16 always; bf16 only where the GPU has it natively,
  compute capability >= 8), notebooks 02 and 03 under torchrun with one process (NCCL), 03
  without augmentation (the GPU bundle leaves albumentations out), and notebook 01's GPU
  resampling against its CPU reference;
- cost: the cost benchmark's CUDA path (2D-VoCo against 3D VoCo,
  `torch.cuda.max_memory_allocated`; 3D only when MONAI is installed).
Every step has a time-out within one budget (8 minutes by default); the JSON report is
rewritten after every step, so a run cut short still leaves what it measured.

`--cpu` runs the same on a machine without a GPU (fp32, torchrun over gloo): a rehearsal of
the script itself, not a measurement.

A bundle split into `wheels/part-<k>/` (`make gpu-bundle`: the machine this project borrows
is sent at most 64 MiB per call) is installed one part per call with `--install-part
<folder>` (`pip install --no-deps --target .gpu-site`, a folder git ignores, so it stays on
the machine between calls), then the check runs with `.gpu-site` on the path. Part 1 holds
everything kaggle_utils needs without its `notebooks` extra, so `--steps device shapes` can
run in the same call as its install, and the notebooks in the call that brings part 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kaggle-utils-voco2d"
TINY = ["--train-patients", "12", "--test-patients", "4", "--image-size", "96",
        "--min-slices", "16", "--max-slices", "20"]  # fmt: skip
SHAPE = [12, 96, 96]
SITE = ROOT / ".gpu-site"  # wheels installed part by part (--install-part)
STEPS = ("device", "shapes", "notebooks", "cost")
# What the device and precision choices print (a step of its own: a child process).
DEVICE_CHOICE = """
import json, torch
from kaggle_utils.common import runtime
device = runtime.pick_device("auto")
print(json.dumps({"auto_device": str(device), "auto_precision":
    runtime.resolve_precision("auto", device).name, "arch_list": torch.cuda.get_arch_list(),
    "unsupported": runtime.gpu_unsupported_reason(0) if torch.cuda.is_available() else "no GPU"}))
"""
# Two notebook 01 caches of the same series must hold volumes at most 1 level apart.
COMPARE_CACHES = """
import sys; from pathlib import Path; import numpy as np
cpu, gpu = Path(sys.argv[1]), Path(sys.argv[2]); worst, n = 0, 0
for a in sorted(cpu.glob("*x*x*/*.npy")):
    b = gpu / a.relative_to(cpu)
    worst = max(worst, int(np.abs(np.load(a).astype(int) - np.load(b).astype(int)).max())); n += 1
print(f"{n} volumes, largest difference {worst} level(s)"); sys.exit(0 if n and worst <= 1 else 1)
"""


class Check:
    """Runs the steps within one time budget and keeps the report on disk."""

    def __init__(self, output: Path, budget_s: float) -> None:
        self.output = output
        self.deadline = time.monotonic() + budget_s
        self.report: dict[str, Any] = {"steps": {}, "budget_s": budget_s}
        output.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, command: list[str]) -> bool:
        """Run one step within what is left of the budget; a step whose stdout ends in a JSON
        line (the cost benchmark) has that line recorded as its result."""
        remaining = self.deadline - time.monotonic()
        if remaining < 5:
            self.report["steps"][name] = {"status": "skipped: out of time"}
            self.save()
            return False
        print(f"--- {name}: {' '.join(command[:6])} ...", flush=True)
        started = time.monotonic()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=remaining, cwd=ROOT
            )
            status = "ok" if done.returncode == 0 else f"failed ({done.returncode})"
            stdout, tail = done.stdout, (done.stdout + done.stderr)[-3000:]
        except subprocess.TimeoutExpired as expired:
            status, stdout, tail = "timed out", "", str(expired.stdout or "")[-3000:]
        entry: dict[str, Any] = {"status": status, "seconds": round(time.monotonic() - started, 1)}
        last_line = (stdout.strip().splitlines() or [""])[-1]
        if status != "ok":
            entry["tail"] = tail
        elif last_line.startswith("{"):
            entry["result"] = json.loads(last_line)
        self.report["steps"][name] = entry
        print(f"    {status} in {entry['seconds']} s", flush=True)
        self.save()
        return status == "ok"

    def save(self) -> None:
        path = self.output / "report.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=1))
        os.replace(tmp, path)


def papermill(notebook: str, out: Path, parameters: dict[str, Any], tag: str = "") -> list[str]:
    executed = out / "notebooks" / f"{notebook}{'_' + tag if tag else ''}.ipynb"
    command = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{notebook}.ipynb"),
               str(executed), "--no-progress-bar"]  # fmt: skip
    for key, value in parameters.items():
        command += ["-y", json.dumps({key: value})]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "dist" / "gpu-bundle" / "dataset")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--cpu", action="store_true", help="rehearse without a GPU (fp32)")
    parser.add_argument(
        "--install-part", type=Path, help="only install this folder of wheels into .gpu-site"
    )
    args = parser.parse_args()
    if args.install_part:
        wheels = sorted(str(p) for p in args.install_part.glob("*.whl"))
        if not wheels:
            sys.exit(f"{args.install_part}: no wheels")
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        subprocess.run([*pip, "--target", str(SITE), "--upgrade", *wheels], check=True)
        print(f"installed {len(wheels)} wheels from {args.install_part} into {SITE}")
        return
    if SITE.is_dir():  # parts installed by earlier calls: for this process and its children
        sys.path.insert(0, str(SITE))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p
        )
    out = args.output.resolve()
    check = Check(out, args.budget_s)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)

    if importlib.util.find_spec("kaggle_utils") is None:
        wheels = args.bundle / "wheels"
        if any(wheels.glob("part-*")):
            sys.exit(f"{wheels} is split in parts: install each with --install-part first")
        check.run("install", [sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                              "--find-links", str(wheels), f"{PACKAGE}[notebooks]"])  # fmt: skip
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        check.report["error"] = "no CUDA device: this check is for a GPU machine (--cpu rehearses)"
        check.save()
        sys.exit(check.report["error"])
    precisions = ["fp32"]
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        precisions = ["fp16", "bf16"] if major >= 8 else ["fp16"]
        check.report["gpu"] = {
            "name": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}",
            "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        }  # fmt: skip
    check.report |= {"torch": torch.__version__, "precisions": precisions}

    if "device" in args.steps:
        check.run("device", [sys.executable, "-c", DEVICE_CHOICE])
    if "shapes" in args.steps:
        shapes = [sys.executable, str(ROOT / "benchmarks" / "gpu_shapes.py")]
        check.run("shapes", shapes + (["--rehearse"] if not cuda else []))
    if "notebooks" in args.steps:
        run_notebooks(check, out, cuda, precisions)
    if "cost" in args.steps:
        cost = [sys.executable, str(ROOT / "benchmarks" / "pretrain_cost.py"), "--repeats", "2"]
        if importlib.util.find_spec("monai") is None or not cuda:  # 3D on a CPU takes minutes
            cost.append("--skip-3d")
        check.run("pretrain_cost", cost)
    failed = [n for n, s in check.report["steps"].items() if s["status"] != "ok"]
    check.report["ok"] = not failed
    check.save()
    print(json.dumps({"ok": not failed, "failed": failed, "report": str(out / "report.json")}))
    sys.exit(1 if failed else 0)


def run_notebooks(check: Check, out: Path, cuda: bool, precisions: list[str]) -> None:
    """Notebooks 01 to 04 on tiny demo data, at each precision."""
    data = out / "data"
    check.run("data", [sys.executable, "-m", "kaggle_utils.demo", str(data), *TINY])
    check.run("01", papermill("01_dicom_preprocess", out, {
        "data_root": str(data), "output_dir": str(out / "cache"), "shapes": [SHAPE],
        "workers": 2,
    }))  # fmt: skip
    if cuda:  # the GPU resampling option against the CPU reference, on the same series
        check.run("01_resample_cuda", papermill("01_dicom_preprocess", out, {
            "data_root": str(data), "output_dir": str(out / "cache-cuda"), "shapes": [SHAPE],
            "workers": 2, "resample_device": "cuda",
        }, "cuda"))  # fmt: skip
        caches = [str(out / "cache"), str(out / "cache-cuda")]
        check.run("resample_cuda_matches_cpu", [sys.executable, "-c", COMPARE_CACHES, *caches])
    for precision in precisions:
        run = out / precision
        check.run(f"02_{precision}", papermill("02_voco2d_pretrain", out, {
            "cache_dir": str(out / "cache"), "output_dir": str(run / "pretrain"),
            "volume_shape": SHAPE, "crop_size": 32, "backbone": "test_efficientnet",
            "hidden_dim": 256, "out_dim": 256, "steps": 20, "batch_size": 4, "warmup_steps": 2,
            "probe_every": 10, "checkpoint_every": 10, "n_probe_volumes": 2, "num_workers": 2,
            "launch": "torchrun", "nproc_per_node": 1, "precision": precision,
        }, precision))  # fmt: skip
        check.run(f"03_{precision}", papermill("03_finetune_bilstm", out, {
            "data_root": str(data), "cache_dir": str(out / "cache"),
            "output_dir": str(run / "finetune"), "shape": SHAPE, "backbone": "test_efficientnet",
            "init": "voco", "encoder_file": str(run / "pretrain" / "encoder.pt"),
            "hidden_size": 32, "num_layers": 1, "n_slices": 8, "image_size": 96, "epochs": 2,
            "batch_size": 4, "n_folds": 2, "num_workers": 2, "launch": "torchrun",
            "nproc_per_node": 1, "precision": precision, "affine_prob": 0.0,
            "brightness_contrast_prob": 0.0, "coarse_dropout_prob": 0.0,
        }, precision))  # fmt: skip
        check.run(f"04_{precision}", papermill("04_submission", out, {
            "data_root": str(data), "model_dir": str(run / "finetune"),
            "output_csv": str(run / "submission.csv"), "precision": precision, "workers": 2,
        }, precision))  # fmt: skip


if __name__ == "__main__":
    main()
