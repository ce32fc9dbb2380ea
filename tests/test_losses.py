from __future__ import annotations

import math

import pytest
import torch

from kaggle_utils.pretrain.losses import (
    LOG_EPS,
    VoCoLoss,
    inter_loss,
    intra_loss,
    regularization_loss,
    similarity,
)


def slow_similarity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for r in range(q.shape[1]):
            for j in range(k.shape[1]):
                a, c = q[b, r].double(), k[b, j].double()
                denom = max(a.norm().item(), 1e-8) * max(c.norm().item(), 1e-8)
                out[b, r, j] = min(max((a @ c).item() / denom, 0.0), 1.0)
    return out


def slow_intra(logits, labels, form):
    total = 0.0
    for b in range(logits.shape[0]):
        terms = [[-math.log(1 - abs(float(labels[b, r, k] - logits[b, r, k])) + LOG_EPS)
                  for k in range(logits.shape[2])] for r in range(logits.shape[1])]  # fmt: skip
        if form == "paper":
            total += sum(map(sum, terms)) / (logits.shape[1] * logits.shape[2])
            continue
        pos_num = pos_den = neg_num = neg_den = 0.0
        for r in range(logits.shape[1]):
            for k in range(logits.shape[2]):
                y, sim = float(labels[b, r, k]), float(logits[b, r, k])
                pos_num += y * terms[r][k]
                pos_den += y
                if y == 0:
                    neg_num += sim * sim
                    neg_den += 1
        total += pos_num / (pos_den + LOG_EPS) + neg_num / (neg_den + LOG_EPS)
    return total / logits.shape[0]


def slow_reg(bases, form):
    total = 0.0
    for b in range(bases.shape[0]):
        pairs = []
        for i in range(bases.shape[1]):
            for j in range(i + 1, bases.shape[1]):
                cos = torch.nn.functional.cosine_similarity(bases[b, i], bases[b, j], dim=0).item()
                pairs.append(abs(cos) if form == "paper" else max(cos, 0.0) ** 2)
        total += sum(pairs) / len(pairs)
    return total / bases.shape[0]


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(3, 2, 9, generator=g)
    labels[labels < 0.6] = 0.0
    return {
        "q": torch.randn(3, 2, 16, generator=g),
        "k": torch.randn(3, 9, 16, generator=g),
        "labels": labels,
    }


def test_similarity_matches_slow_reference(tensors) -> None:
    torch.testing.assert_close(
        similarity(tensors["q"], tensors["k"]).double(), slow_similarity(tensors["q"], tensors["k"])
    )


@pytest.mark.parametrize("form", ["voco_code", "paper"])
def test_intra_matches_slow_reference(tensors, form: str) -> None:
    logits = similarity(tensors["q"], tensors["k"])
    expected = slow_intra(logits, tensors["labels"], form)
    assert intra_loss(logits, tensors["labels"], form).item() == pytest.approx(expected, rel=1e-5)


def slow_inter(student, teacher, form):
    """2D-VoCo Eq. 2 ("paper"), or the official code's `inter_volume` ("voco_code"): its
    `_contrastive_loss(labels=teacher, logits=student)` for each volume, then the mean."""
    total = 0.0
    for b in range(student.shape[0]):
        pos_num = pos_den = neg_num = neg_den = all_terms = 0.0
        count = 0
        for r in range(student.shape[1]):
            for k in range(student.shape[2]):
                t, s = float(teacher[b, r, k]), float(student[b, r, k])
                term = -math.log(1 - abs(t - s) + LOG_EPS)
                all_terms += term
                count += 1
                pos_num += t * term
                pos_den += t
                if t == 0:
                    neg_num += s * s
                    neg_den += 1
        if form == "paper":
            total += all_terms / count
        else:
            total += pos_num / (pos_den + LOG_EPS) + neg_num / (neg_den + LOG_EPS)
    return total / student.shape[0]


@pytest.mark.parametrize("form", ["voco_code", "paper"])
def test_inter_matches_slow_reference(tensors, form: str) -> None:
    student = similarity(tensors["q"], tensors["k"])
    teacher = similarity(tensors["q"] + 0.5, tensors["k"])
    assert (teacher == 0).any() and (teacher > 0).any()  # both of the code form's terms count
    expected = slow_inter(student, teacher, form)
    assert inter_loss(student, teacher, form).item() == pytest.approx(expected, rel=1e-5)


def test_inter_known_values() -> None:
    teacher = torch.tensor([[[0.5, 0.0, 0.25, 0.0]]])
    for form in ("voco_code", "paper"):  # the student agrees with the teacher: ~0
        assert inter_loss(teacher.clone(), teacher, form).item() == pytest.approx(0.0, abs=2e-6)  # type: ignore[arg-type]
    student = torch.tensor([[[0.5, 0.5, 0.25, 1.0]]])
    # voco_code: the teacher's overlapping pairs agree (0); where the teacher says 0, s^2
    assert inter_loss(student, teacher, "voco_code").item() == pytest.approx(
        (0.25 + 1.0) / 2, rel=1e-5
    )
    paper = (-math.log(0.5 + LOG_EPS) - math.log(LOG_EPS) - 2 * math.log(1 + LOG_EPS)) / 4
    assert inter_loss(student, teacher, "paper").item() == pytest.approx(paper, rel=1e-5)
    with pytest.raises(ValueError, match="inter form"):
        inter_loss(student, teacher, "other")  # type: ignore[arg-type]


@pytest.mark.parametrize("form", ["paper", "voco_code"])
def test_regularization_matches_slow_reference(tensors, form: str) -> None:
    expected = slow_reg(tensors["k"], form)
    assert regularization_loss(tensors["k"], form).item() == pytest.approx(expected, rel=1e-5)


def test_known_values() -> None:
    labels = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    perfect = labels.clone()
    assert intra_loss(perfect, labels, "paper").item() == pytest.approx(0.0, abs=2e-6)
    worst = torch.tensor([[[0.0, 1.0, 1.0, 1.0]]])
    assert intra_loss(worst, labels, "paper").item() == pytest.approx(-math.log(LOG_EPS), rel=1e-6)
    # voco_code: -log(eps) for the missed positive, plus 1^2 on each of the 3 negatives
    assert intra_loss(worst, labels, "voco_code").item() == pytest.approx(
        -math.log(LOG_EPS) + 1.0, rel=1e-5
    )
    orthogonal = torch.eye(4)[None]
    assert regularization_loss(orthogonal, "paper").item() == 0.0
    identical = torch.ones(1, 3, 5)
    assert regularization_loss(identical, "paper").item() == pytest.approx(1.0)
    assert regularization_loss(identical, "voco_code").item() == pytest.approx(1.0)
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert regularization_loss(opposite, "paper").item() == pytest.approx(1.0)
    assert regularization_loss(opposite, "voco_code").item() == 0.0


def test_every_log_stays_finite_on_degenerate_inputs() -> None:
    loss = VoCoLoss()
    ones_random, ones_bases = torch.ones(2, 2, 8), torch.ones(2, 9, 8)
    cases = [
        (ones_random, ones_bases, torch.zeros(2, 2, 9)),  # identical crops: cos = 1, y = 0
        (ones_random, -ones_bases, torch.ones(2, 2, 9)),  # cos = -1, y = 1
        (torch.zeros(2, 2, 8), torch.zeros(2, 9, 8), torch.rand(2, 2, 9)),  # zero vectors
    ]
    for rand, bases, labels in cases:
        rand, bases = rand.clone().requires_grad_(True), bases.clone().requires_grad_(True)
        parts = loss(rand, bases, rand.detach(), bases.detach(), labels)
        assert all(math.isfinite(v) for v in parts.as_floats().values())
        parts.total.backward()
        assert torch.isfinite(rand.grad).all() and torch.isfinite(bases.grad).all()


def test_voco_code_regularization_detaches_the_second_base() -> None:
    bases = torch.tensor([[[1.0, 0.2], [0.8, 0.6]]], requires_grad=True)
    regularization_loss(bases, "voco_code").backward()
    assert bases.grad[0, 0].abs().sum() > 0 and bases.grad[0, 1].abs().sum() == 0
    paper = bases.detach().clone().requires_grad_(True)
    regularization_loss(paper, "paper").backward()
    assert paper.grad[0, 1].abs().sum() > 0


def test_vocoloss_combines_parts_with_weights_and_pairs_volumes(tensors) -> None:
    q, k, labels = tensors["q"], tensors["k"], tensors["labels"]
    tq, tk = q + 0.1, k - 0.1
    parts = VoCoLoss(2.0, 3.0, 0.5)(q, k, tq, tk, labels)
    intra = intra_loss(similarity(q, tk), labels, "voco_code")
    pair_logits = (similarity(q, k.roll(-1, 0)), similarity(tq, tk.roll(-1, 0)))
    inter = inter_loss(*pair_logits, "voco_code")
    reg = regularization_loss(k, "paper")
    torch.testing.assert_close(parts.intra, intra)
    torch.testing.assert_close(parts.inter, inter)
    torch.testing.assert_close(parts.total, 2 * intra + 3 * inter + 0.5 * reg)
    paper = VoCoLoss(inter_form="paper")(q, k, tq, tk, labels)
    torch.testing.assert_close(paper.inter, inter_loss(*pair_logits, "paper"))
    assert not torch.allclose(paper.inter, parts.inter)
    single = VoCoLoss()(q[:1], k[:1], tq[:1], tk[:1], labels[:1])
    assert single.inter.item() == 0.0  # one volume: no pair
    with pytest.raises(ValueError, match="weights"):
        VoCoLoss(intra_weight=-1)
    with pytest.raises(ValueError, match="form"):
        VoCoLoss(intra_form="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inter 'other'"):
        VoCoLoss(inter_form="other")  # type: ignore[arg-type]


@pytest.mark.parametrize("inter_form", ["voco_code", "paper"])
def test_the_teacher_side_learns_only_through_the_intra_loss(tensors, inter_form: str) -> None:
    """The inter loss's teacher similarities are targets (the official `pred1.detach()`) and the
    regularisation is the student's; only the intra loss reaches the teacher's bases, where a
    trained teacher head (the official code's) learns. An EMA teacher runs without gradient."""
    q, k = tensors["q"].requires_grad_(True), tensors["k"].requires_grad_(True)
    tq, tk = (t.clone().requires_grad_(True) for t in (q.detach(), k.detach()))
    parts = VoCoLoss(inter_form=inter_form)(q, k, tq, tk, tensors["labels"])  # type: ignore[arg-type]
    (parts.inter + parts.reg).backward(retain_graph=True)
    assert tq.grad is None and tk.grad is None
    assert q.grad is not None and k.grad is not None
    parts.intra.backward()
    assert tq.grad is None and tk.grad is not None and tk.grad.abs().sum() > 0


def test_voco_code_inter_takes_no_gradient_through_its_teacher_weights() -> None:
    # The teacher's similarities are the labels (weights and mask) of the code form: detached
    # even when the caller hands in a tensor with a graph.
    student = torch.tensor([[[0.2, 0.6, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.4, 0.5, 0.0]]], requires_grad=True)
    inter_loss(student, teacher, "voco_code").backward()
    assert teacher.grad is None and student.grad is not None
