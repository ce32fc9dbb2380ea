"""runtime: the precision every loop runs at, decided in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kaggle_utils import runtime

PACKAGE = Path(__file__).resolve().parents[1] / "kaggle_utils"
CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_capability(monkeypatch: pytest.MonkeyPatch):
    """Pretend the GPU has a given compute capability (no GPU needed)."""

    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        # what a T4 or P100 answers too: emulated bf16 counts as "supported"
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    return set_capability


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((6, 0), "fp16"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")],
    ids=["P100", "V100", "T4", "A100", "H100"],
)
def test_auto_is_bf16_only_where_the_gpu_has_it_natively(
    fake_capability, capability: tuple[int, int], expected: str
) -> None:
    fake_capability(*capability)
    precision = runtime.resolve_precision("auto", CUDA)
    assert precision.name == expected
    assert precision.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[expected]
    assert precision.enabled
    assert precision.uses_grad_scaler == (expected == "fp16")


def test_the_cpu_runs_fp32_and_refuses_fp16() -> None:
    cpu = torch.device("cpu")
    auto = runtime.resolve_precision("auto", cpu)
    assert (auto.name, auto.dtype, auto.enabled, auto.uses_grad_scaler) == (
        "fp32", None, False, False
    )  # fmt: skip
    assert runtime.resolve_precision("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs a GPU"):
        runtime.resolve_precision("fp16", cpu)


def test_an_explicit_choice_overrides_auto(fake_capability, caplog) -> None:
    fake_capability(7, 5)
    assert runtime.resolve_precision("fp32", CUDA).name == "fp32"
    assert runtime.resolve_precision("fp16", CUDA).uses_grad_scaler
    with caplog.at_level("WARNING"):
        forced = runtime.resolve_precision("bf16", CUDA)
    assert forced.name == "bf16" and not forced.uses_grad_scaler
    assert "emulated" in caplog.text
    fake_capability(8, 6)
    assert runtime.resolve_precision("fp16", CUDA).name == "fp16"


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("half", torch.device("cpu"))


def test_autocast_runs_at_the_chosen_dtype_on_the_cpu() -> None:
    layer = torch.nn.Linear(4, 4)
    with runtime.resolve_precision("bf16", torch.device("cpu")).autocast():
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with runtime.resolve_precision("auto", torch.device("cpu")).autocast():
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_no_loop_decides_precision_on_its_own() -> None:
    """`is_bf16_supported` is true for emulated bf16 (T4, P100): only `resolve_precision`
    may choose, and it must not use that test."""
    offenders = [
        p.name
        for p in PACKAGE.glob("*.py")
        if "is_bf16_supported(" in p.read_text() or "GradScaler(" in p.read_text()
    ]
    assert offenders == ["runtime.py"], offenders
    assert "is_bf16_supported(" not in (PACKAGE / "runtime.py").read_text()
