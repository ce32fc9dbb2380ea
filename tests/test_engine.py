"""The one training engine (kaggle_utils/common/engine.py) against slow, obvious references:
parameter groups, the accumulated optimizer step, and the checkpoint round trip."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kaggle_utils.common import runtime
from kaggle_utils.common.engine import (
    OptimizerStep,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
    warmup_cosine,
)
from kaggle_utils.common.progress import LOG_REFRESH_SECONDS, progress_bar

CPU_FP32 = runtime.Precision("fp32", "cpu")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 3)
        self.lstm = nn.LSTM(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.conv(x)).mean(dim=(2, 3))
        return self.lstm(self.head(features)[None])[0][0].sum(dim=1)


def test_norm_and_bias_parameters_are_not_decayed_by_default() -> None:
    model = Tiny()
    groups = parameter_groups(model.named_parameters(), 0.05, lr=0.1)
    by_id = {id(p): name for name, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {"conv.weight", "head.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0"}
    assert kept == {
        "conv.bias", "norm.weight", "norm.bias", "head.bias", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
    }  # fmt: skip
    assert all(g["lr"] == 0.1 for g in groups)
    everything = parameter_groups(model.named_parameters(), 0.05, decay_norm_and_bias=True)
    assert len(everything) == 1 and everything[0]["weight_decay"] == 0.05
    assert [id(p) for p in everything[0]["params"]] == [id(p) for p in model.parameters()]


def test_a_norm_scale_without_gradient_keeps_its_value_under_adamw() -> None:
    """What the exemption is for: AdamW shrinks a decayed parameter even with zero gradient."""
    for decay_norm_and_bias, expected_shrink in ((False, False), (True, True)):
        model = Tiny()
        model.norm.weight.data.fill_(1.0)
        groups = parameter_groups(model.named_parameters(), 0.5, decay_norm_and_bias)
        optimizer = torch.optim.AdamW(groups, lr=0.1)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        shrunk = bool((model.norm.weight < 1.0).all())
        assert shrunk == expected_shrink


def _reference_update(
    model: nn.Module, batches: list[torch.Tensor], lr: float, clip: float
) -> dict[str, torch.Tensor]:
    """Slow and obvious: the mean loss over all micro-batches, one SGD step, clipped by hand."""
    model.zero_grad()
    total = sum(model(x).pow(2).mean() for x in batches) / len(batches)
    total.backward()  # type: ignore[union-attr]
    grads = [p.grad for p in model.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))  # type: ignore[misc, operator]
    scale = min(1.0, clip / (float(norm) + 1e-6)) if clip > 0 else 1.0
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * scale * p.grad  # type: ignore[operator]
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("clip", [0.0, 0.01], ids=["no-clip", "clipped"])
def test_accumulated_step_equals_one_step_on_the_mean_loss(clip: float) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 1, 6, 6) for _ in range(3)]
    reference_model, model = Tiny(), Tiny()
    model.load_state_dict(reference_model.state_dict())
    model.eval(), reference_model.eval()  # batch norm statistics out of the comparison
    expected = _reference_update(reference_model, batches, lr=0.05, clip=clip)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = OptimizerStep(optimizer, scheduler, CPU_FP32, grad_accum=3, grad_clip=clip)
    closed = []
    for micro, x in enumerate(batches):
        last = step.is_last(micro)
        closed.append(last)
        with step.sync(last):
            step.backward(model(x).pow(2).mean())
        if last:
            step.step()
    assert closed == [False, False, True]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # ready for the next step
    assert scheduler.last_epoch == 1
    assert step.is_last(1, n_batches=2)  # an epoch's last micro-batch closes a step too


def test_checkpoint_round_trip_restores_everything_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Tiny()
    optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters(), 0.01), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    step = OptimizerStep(optimizer, scheduler, CPU_FP32)
    step.backward(model(torch.randn(2, 1, 6, 6)).sum())
    step.step()
    generator = np.random.default_rng(7)
    generator.random(5)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": model}, step, {"epoch": 3, "best": 0.5}, generator)
    expected_next = (torch.rand(3), generator.random(3))
    assert not list(tmp_path.glob(".*.tmp"))  # written through a renamed temporary file

    fresh = Tiny()
    fresh_optimizer = torch.optim.AdamW(parameter_groups(fresh.named_parameters(), 0.01), lr=0.01)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda s: 1.0)
    fresh_step = OptimizerStep(fresh_optimizer, fresh_scheduler, CPU_FP32)
    fresh_generator = np.random.default_rng(99)
    state = load_checkpoint(path, {"model": fresh}, fresh_step, numpy_rng=fresh_generator)
    assert state == {"epoch": 3, "best": 0.5}
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key])
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 1
    assert torch.equal(torch.rand(3), expected_next[0])  # global torch RNG restored
    assert np.array_equal(fresh_generator.random(3), expected_next[1])  # the loop's generator


def test_a_checkpoint_in_the_old_layout_is_refused_with_what_to_do(tmp_path: Path) -> None:
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "last.pt")
    step = OptimizerStep(optimizer, scheduler, CPU_FP32)
    with pytest.raises(ValueError, match=r"older layout.*resume=False"):
        load_checkpoint(tmp_path / "last.pt", {"model": model}, step)


def test_progress_bars_refresh_rarely_when_the_output_is_a_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = io.StringIO()  # not a terminal, like papermill's captured stderr
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(range(3), file=log)
    assert bar.mininterval == LOG_REFRESH_SECONDS
    bar.close()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    live = progress_bar(range(3), file=log)
    assert live.mininterval < 1.0
    live.close()


def test_a_cosine_cycle_follows_torch_cosine_annealing_past_its_period() -> None:
    """`lr_cycle_steps` (the official fine-tuning's CosineAnnealingLR, T_max 5,000, eta_min
    lr / 10) goes down in T_max steps and back up in as many: PyTorch's own scheduler is the
    reference, over three half-periods."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.25e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1.25e-5)
    for step in range(31):
        factor = warmup_cosine(step, 0, 1_000, min_factor=0.1, cycle_steps=10)
        assert 1.25e-4 * factor == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6), step
        optimizer.step()
        reference.step()
    assert warmup_cosine(10, 0, 1_000, 0.1, 10) == pytest.approx(0.1)
    assert warmup_cosine(20, 0, 1_000, 0.1, 10) == pytest.approx(1.0)
    # without a cycle: one cosine over the run, as before
    assert warmup_cosine(1_000, 0, 1_000, 0.1) == pytest.approx(0.1)
