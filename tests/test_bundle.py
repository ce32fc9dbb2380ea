"""The bundle builder's pure parts: kernel metadata for the scoring run, and the split of a
large bundle into parts small enough to send one at a time. Building a real bundle is tested
end to end, offline, in tests/test_kaggle_offline.py."""

from __future__ import annotations

from pathlib import Path

from kaggle_utils import bundle
from kaggle_utils.paths import COMPETITION_NAME

MB = 2**20


def fake_wheels(folder: Path, sizes_mb: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    for name, size in sizes_mb.items():
        (folder / f"{name}-1.0-py3-none-any.whl").write_bytes(b"\0" * int(size * MB))


def test_parts_hold_every_wheel_once_and_stay_under_the_limit(tmp_path: Path) -> None:
    sizes = {"opencv": 54, "polars": 51, "a": 20, "b": 18, "c": 9, "d": 5, "e": 0.5}
    wheels = tmp_path / "wheels"
    fake_wheels(wheels, sizes)
    layout = bundle._split_into_parts(wheels, 56)
    assert not list(wheels.glob("*.whl"))  # all moved into parts
    placed = [name for names in layout.values() for name in names]
    assert sorted(placed) == sorted(f"{n}-1.0-py3-none-any.whl" for n in sizes)
    for part in layout:
        total = sum(p.stat().st_size for p in (wheels / part).glob("*.whl"))
        assert total <= 56 * MB, part
    # first-fit decreasing packs 157.5 MB into 3 parts, the fewest 56 MB parts can hold
    assert len(layout) == 3


def test_a_wheel_larger_than_a_part_gets_one_of_its_own(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    fake_wheels(wheels, {"huge": 3, "small": 1})
    layout = bundle._split_into_parts(wheels, 2)
    assert layout == {
        "part-1": ["huge-1.0-py3-none-any.whl"],
        "part-2": ["small-1.0-py3-none-any.whl"],
    }


def test_the_submission_kernel_runs_offline_on_a_gpu_with_its_inputs() -> None:
    kernel = bundle.kernel_metadata("me", "voco2d-bundle", "voco2d-models")
    assert kernel["id"] == "me/voco2d-submission"
    assert kernel["enable_internet"] is False and kernel["enable_gpu"] is True
    assert kernel["competition_sources"] == [COMPETITION_NAME]
    assert kernel["dataset_sources"] == ["me/voco2d-bundle", "me/voco2d-models"]
    assert kernel["code_file"] == "04_submission.ipynb"
    assert (bundle.project_root() / "notebooks" / kernel["code_file"]).is_file()
