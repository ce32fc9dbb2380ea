"""runtime: the precision every loop runs at, decided in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kaggle_utils.common import runtime

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
        for p in PACKAGE.rglob("*.py")
        if "is_bf16_supported(" in p.read_text() or "GradScaler(" in p.read_text()
    ]
    assert offenders == ["runtime.py"], offenders
    assert "is_bf16_supported(" not in (PACKAGE / "common" / "runtime.py").read_text()


# --------------------------------------------------------------------------- the device

# torch.cuda.get_arch_list() of a cu128 torch as Kaggle's 2.10: sm_70 to sm_120 (the range
# Kaggle's docker-python gave when the P100 stopped working, 2026-07)
KAGGLE_TORCH_ARCHES = [
    *("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"),
    "compute_120",
]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend there is one GPU of a given name and compute capability, under a torch
    compiled for `arches` (no GPU needed: nothing here launches a kernel)."""

    def install(name: str, major: int, minor: int, arches: list[str]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arches))
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        runtime._warn_once.cache_clear()  # each test sees its own warning

    return install


@pytest.mark.parametrize(
    ("gpu", "capability", "device", "precision"),
    [
        ("Tesla T4", (7, 5), "cuda", "fp16"),  # Kaggle's default GPU (x2)
        ("NVIDIA L4", (8, 9), "cuda", "bf16"),  # no sm_89 cubin: sm_86's runs on 8.9
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", (12, 0), "cuda", "bf16"),
        ("NVIDIA H100 80GB HBM3", (9, 0), "cuda", "bf16"),
        ("Tesla P100-PCIE-16GB", (6, 0), "cpu", "fp32"),  # no sm_60 kernels: the CPU
    ],
    ids=["T4", "L4", "RTX-Pro-6000", "H100", "P100"],
)
def test_auto_picks_a_device_torch_has_kernels_for_and_its_precision(
    fake_gpu, gpu: str, capability: tuple[int, int], device: str, precision: str, capsys
) -> None:
    fake_gpu(gpu, *capability, KAGGLE_TORCH_ARCHES)
    picked = runtime.pick_device("auto")
    assert picked.type == device
    assert runtime.resolve_precision("auto", picked).name == precision
    assert runtime.device_for(distributed=False).type == device  # the training loops' choice
    warned = capsys.readouterr().err
    if device == "cpu":
        assert "!!!" in warned and gpu in warned and "sm_70" in warned and "GPU T4 x2" in warned
    else:
        assert warned == ""


def test_asking_for_a_gpu_torch_cannot_use_is_an_error_not_a_crash_later(fake_gpu) -> None:
    fake_gpu("Tesla P100-PCIE-16GB", 6, 0, KAGGLE_TORCH_ARCHES)
    with pytest.raises(ValueError, match=r"P100.*6\.0.*not supported.*use 'auto'"):
        runtime.pick_device("cuda")
    from kaggle_utils.cache.volume import check_resample_device

    with pytest.raises(ValueError, match="not supported"):
        check_resample_device("cuda")


@pytest.mark.parametrize(
    ("arches", "capability", "usable"),
    [
        (["sm_80"], (8, 6), True),  # a cubin runs on a later minor of its major
        (["sm_86"], (8, 0), False),  # ... not an earlier one
        (["sm_90"], (10, 0), False),  # nor another major
        (["compute_90"], (12, 0), True),  # PTX is compiled for any later GPU
        (["compute_90"], (8, 9), False),
        (["sm_90a"], (9, 0), True),  # arch-specific: that GPU only
        (["sm_90a"], (9, 1), False),
        ([], (7, 5), False),
    ],
)
def test_the_compiled_architectures_decide_what_runs(
    fake_gpu, arches: list[str], capability: tuple[int, int], usable: bool
) -> None:
    fake_gpu("some GPU", *capability, arches)
    assert (runtime.gpu_unsupported_reason(0) == "") is usable
