"""The RSNA 2023 metric against slow loop references, scikit-learn, analytic values and SPEC
section 6's reference figures; the paper's metrics against hand-computed ones; bad inputs."""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pandas as pd  # requirements-dev.txt: the pandas input is tested, never skipped
import polars as pl
import pytest
from sklearn.metrics import log_loss

from kaggle_utils import metric
from kaggle_utils.metric import (
    CLASS_WEIGHTS,
    EPS,
    LABEL_COLUMNS,
    TARGET_GROUPS,
    best_constant_prediction,
    constant_submission,
    fit_thresholds,
    group_auc,
    organ_metrics,
    prior_prediction,
    rsna_score,
    rsna_score_parts,
    validate_submission,
)

# Written out again on purpose: the references below must not lean on the module's constants.
GROUPS = {
    "bowel": ["bowel_healthy", "bowel_injury"],
    "extravasation": ["extravasation_healthy", "extravasation_injury"],
    "kidney": ["kidney_healthy", "kidney_low", "kidney_high"],
    "liver": ["liver_healthy", "liver_low", "liver_high"],
    "spleen": ["spleen_healthy", "spleen_low", "spleen_high"],
}
WEIGHTS = {
    "bowel": [1, 2],
    "extravasation": [1, 6],
    "kidney": [1, 2, 4],
    "liver": [1, 2, 4],
    "spleen": [1, 2, 4],
}
ALL = [column for columns in GROUPS.values() for column in columns]
PARTS = ["bowel", "extravasation", "kidney", "liver", "spleen", "any_injury"]


def random_labels(n: int, seed: int, injury_rate: float = 0.3) -> pl.DataFrame:
    """One-hot labels with every class present (for n >= ~50), ids 10000, 10001, ..."""
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {"patient_id": np.arange(10000, 10000 + n)}
    for columns in GROUPS.values():
        injured = rng.random(n) < injury_rate
        cls = np.where(injured, rng.integers(1, len(columns), n), 0)
        for index, column in enumerate(columns):
            data[column] = (cls == index).astype(np.int64)
    healthy = np.stack([data[columns[0]] for columns in GROUPS.values()], axis=1)
    data["any_injury"] = (1 - healthy).max(axis=1)
    return pl.DataFrame(data)


def random_predictions(ids: list[int], seed: int, extremes: bool = True) -> pl.DataFrame:
    """Unnormalised positive scores; with `extremes`, exact zeros and perfect rows too, so that
    the clipping matters."""
    rng = np.random.default_rng(seed)
    values = rng.random((len(ids), len(ALL))) * rng.choice([0.5, 1.0, 3.0], (len(ids), 1))
    if extremes:
        values[rng.random(values.shape) < 0.1] = 0.0
        start = 0
        for columns in GROUPS.values():
            block = values[:, start : start + len(columns)]
            block[block.sum(axis=1) == 0, 0] = 1.0
            perfect = rng.random(len(ids)) < 0.1
            block[perfect] = 0.0
            block[perfect, rng.integers(0, len(columns), perfect.sum())] = 1.0
            start += len(columns)
    return pl.DataFrame({"patient_id": ids, **dict(zip(ALL, values.T, strict=True))})


def slow_parts(labels: pl.DataFrame, predictions: pl.DataFrame, eps: float = EPS) -> dict:
    """Per patient: normalise, clip, re-normalise, weight by the true class, accumulate."""
    by_id = {row["patient_id"]: row for row in predictions.to_dicts()}
    sums = {part: [0.0, 0.0] for part in PARTS}
    for label in labels.to_dicts():
        prediction = by_id[label["patient_id"]]
        any_label = any_prediction = 0.0
        for group, columns in GROUPS.items():
            y = [label[c] / sum(label[c] for c in columns) for c in columns]
            p = [prediction[c] / sum(prediction[c] for c in columns) for c in columns]
            any_label = max(any_label, 1 - y[0])
            any_prediction = max(any_prediction, 1 - p[0])
            clipped = [min(max(v, eps), 1 - eps) for v in p]
            clipped = [v / sum(clipped) for v in clipped]
            true_class = y.index(max(y))
            weight = WEIGHTS[group][true_class]
            sums[group][0] += weight * -math.log(clipped[true_class])
            sums[group][1] += weight
        q = min(max(any_prediction, eps), 1 - eps)
        weight = 6 if any_label == 1 else 1
        loss = -math.log(q) if any_label == 1 else -math.log(1 - q)
        sums["any_injury"][0] += weight * loss
        sums["any_injury"][1] += weight
    return {part: total / weight for part, (total, weight) in sums.items()}


def normalised(frame: pl.DataFrame, columns: list[str]) -> np.ndarray:
    matrix = frame.select(columns).to_numpy().astype(float)
    return matrix / matrix.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- constants


def test_constants_match_the_competition() -> None:
    assert {g: list(c) for g, c in TARGET_GROUPS.items()} == GROUPS
    assert list(LABEL_COLUMNS) == ALL
    assert {g: [int(w) for w in ws] for g, ws in CLASS_WEIGHTS.items()} == {
        **WEIGHTS,
        "any_injury": [1, 6],
    }


def test_docstring_example() -> None:
    assert doctest.testmod(metric).failed == 0


# --------------------------------------------------------------------------- the RSNA score


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parts_match_slow_reference(seed: int) -> None:
    labels = random_labels(150, seed)
    predictions = random_predictions(labels["patient_id"].to_list()[::-1], seed + 100)
    parts = rsna_score_parts(labels, predictions)
    reference = slow_parts(labels, predictions)
    assert list(parts) == PARTS
    for part in PARTS:
        assert parts[part] == pytest.approx(reference[part], abs=1e-9), part
    assert rsna_score(labels, predictions) == pytest.approx(np.mean(list(reference.values())))


def test_eps_is_a_parameter() -> None:
    labels = random_labels(80, 3)
    predictions = random_predictions(labels["patient_id"].to_list(), 4)
    eps = float(np.finfo(np.float64).eps)
    parts = rsna_score_parts(labels, predictions, eps=eps)
    reference = slow_parts(labels, predictions, eps=eps)
    assert parts == pytest.approx(reference, abs=1e-9)
    assert parts["bowel"] != pytest.approx(rsna_score_parts(labels, predictions)["bowel"])


def test_parts_match_sklearn_log_loss() -> None:
    labels = random_labels(300, 5)
    predictions = random_predictions(labels["patient_id"].to_list(), 6, extremes=False)
    predictions = predictions.with_columns(pl.col(ALL) + 0.05)
    parts = rsna_score_parts(labels, predictions)
    healthy_y, healthy_p = [], []
    for group, columns in GROUPS.items():
        y = normalised(labels, columns).argmax(axis=1)
        p = normalised(predictions, columns)
        assert len(set(y)) == len(columns)
        weights = np.asarray(WEIGHTS[group])[y]
        expected = log_loss(y, p, sample_weight=weights, labels=list(range(len(columns))))
        assert parts[group] == pytest.approx(expected, abs=1e-9), group
        healthy_y.append(y == 0)
        healthy_p.append(p[:, 0])
    any_y = (~np.stack(healthy_y, axis=1)).any(axis=1).astype(int)
    any_p = (1 - np.stack(healthy_p, axis=1)).max(axis=1)
    expected = log_loss(any_y, any_p, sample_weight=np.where(any_y == 1, 6, 1), labels=[0, 1])
    assert parts["any_injury"] == pytest.approx(expected, abs=1e-9)


def test_perfect_predictions_score_only_the_eps() -> None:
    labels = random_labels(100, 7)
    parts = rsna_score_parts(labels, labels.drop("any_injury"))
    for part in PARTS:
        assert 0 < parts[part] < 5 * EPS, part


def test_uniform_predictions_by_hand() -> None:
    labels = random_labels(120, 8)
    uniform = constant_submission(labels["patient_id"].to_list(), dict.fromkeys(ALL, 0.5))
    parts = rsna_score_parts(labels, uniform)
    for group, columns in GROUPS.items():
        assert parts[group] == pytest.approx(math.log(len(columns)), abs=1e-12)
    # any_injury: p = max(1 - 1/2, 1 - 1/3) = 2/3 for everyone
    positives = int(labels["any_injury"].sum())
    negatives = labels.height - positives
    expected = (negatives * math.log(3) + 6 * positives * math.log(3 / 2)) / (
        negatives + 6 * positives
    )
    assert parts["any_injury"] == pytest.approx(expected, abs=1e-12)


def test_row_order_does_not_matter() -> None:
    labels = random_labels(100, 9)
    predictions = random_predictions(labels["patient_id"].to_list(), 10)
    score = rsna_score(labels, predictions)
    shuffled = predictions.sample(fraction=1.0, shuffle=True, seed=1)
    assert shuffled["patient_id"].to_list() != predictions["patient_id"].to_list()
    assert rsna_score(labels, shuffled) == pytest.approx(score, rel=1e-12)
    both = labels.sample(fraction=1.0, shuffle=True, seed=2)
    assert rsna_score(both, shuffled) == pytest.approx(score, rel=1e-12)


def test_ids_match_across_types() -> None:
    labels = random_labels(40, 11)
    predictions = random_predictions(labels["patient_id"].to_list(), 12)
    as_text = predictions.with_columns(pl.col("patient_id").cast(pl.String))
    as_float = predictions.with_columns(pl.col("patient_id").cast(pl.Float64))
    score = rsna_score(labels, predictions)
    assert rsna_score(labels, as_text) == score
    assert rsna_score(labels, as_float) == score


def test_mapping_input_and_no_mutation() -> None:
    labels = random_labels(60, 13)
    predictions = random_predictions(labels["patient_id"].to_list(), 14)
    label_arrays = {c: labels[c].to_numpy().copy() for c in labels.columns}
    prediction_arrays = {c: predictions[c].to_numpy().copy() for c in predictions.columns}
    label_copy = {c: v.copy() for c, v in label_arrays.items()}
    prediction_copy = {c: v.copy() for c, v in prediction_arrays.items()}
    labels_before, predictions_before = labels.clone(), predictions.clone()

    assert rsna_score(label_arrays, prediction_arrays) == rsna_score(labels, predictions)
    organ_metrics(label_arrays, prediction_arrays)
    group_auc(label_arrays, prediction_arrays)
    fit_thresholds(label_arrays, prediction_arrays, grid=[0.2, 0.5])
    best_constant_prediction(label_arrays)
    for column, values in label_arrays.items():
        np.testing.assert_array_equal(values, label_copy[column])
    for column, values in prediction_arrays.items():
        np.testing.assert_array_equal(values, prediction_copy[column])
    assert labels.equals(labels_before) and predictions.equals(predictions_before)


def test_pandas_and_polars_agree_and_pandas_is_not_mutated() -> None:
    labels = random_labels(80, 15)
    predictions = random_predictions(labels["patient_id"].to_list(), 16)
    labels_pd = pd.DataFrame(labels.to_dict(as_series=False))
    predictions_pd = pd.DataFrame(predictions.to_dict(as_series=False)).iloc[::-1]
    labels_copy, predictions_copy = labels_pd.copy(deep=True), predictions_pd.copy(deep=True)
    assert rsna_score_parts(labels_pd, predictions_pd) == pytest.approx(
        rsna_score_parts(labels, predictions), abs=1e-12
    )
    assert rsna_score(labels_pd, predictions) == pytest.approx(rsna_score(labels, predictions))
    assert organ_metrics(labels_pd, predictions_pd)["mAP"] == pytest.approx(
        organ_metrics(labels, predictions)["mAP"]
    )
    # probabilities clipped to [0, 1]; the ids stay as they are (pandas would clip them too)
    probabilities = predictions_pd.columns.drop("patient_id")
    validate_submission(predictions_pd.assign(**predictions_pd[probabilities].clip(upper=1.0)))
    pd.testing.assert_frame_equal(labels_pd, labels_copy)
    pd.testing.assert_frame_equal(predictions_pd, predictions_copy)
    submission = constant_submission([1, 2], dict.fromkeys(ALL, 0.5), frame="pandas")
    assert list(submission.columns) == ["patient_id", *ALL]


def test_single_class_fold_scores() -> None:
    labels = random_labels(50, 17, injury_rate=0.0)
    assert labels["any_injury"].sum() == 0
    predictions = random_predictions(labels["patient_id"].to_list(), 18)
    parts = rsna_score_parts(labels, predictions)
    assert parts == pytest.approx(slow_parts(labels, predictions), abs=1e-9)
    assert all(math.isnan(v) for v in group_auc(labels, predictions).values())
    metrics = organ_metrics(labels, predictions)
    assert len(metrics["skipped"]) == 6 and math.isfinite(metrics["mAP"])
    everyone_injured = random_labels(50, 19, injury_rate=1.0)
    assert math.isfinite(rsna_score(everyone_injured, predictions))


def test_soft_labels_are_normalised_like_predictions() -> None:
    labels = random_labels(60, 20)
    doubled = labels.with_columns(pl.col(ALL) * 2).drop("any_injury")
    predictions = random_predictions(labels["patient_id"].to_list(), 21)
    assert rsna_score(doubled, predictions) == pytest.approx(rsna_score(labels, predictions))


def _drop_patient(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("patient_id") != 10003)


def _extra_patient(frame: pl.DataFrame) -> pl.DataFrame:
    return pl.concat(
        [frame, frame.tail(1).with_columns(pl.lit(99999, dtype=pl.Int64).alias("patient_id"))]
    )


def _set(column: str, patient: int, value: float):
    def change(frame: pl.DataFrame) -> pl.DataFrame:
        hit = pl.col("patient_id") == patient
        return frame.with_columns(pl.when(hit).then(value).otherwise(pl.col(column)).alias(column))

    return change


def _zero_group(frame: pl.DataFrame) -> pl.DataFrame:
    for column in GROUPS["spleen"]:
        frame = _set(column, 10005, 0.0)(frame)
    return frame


BAD_PREDICTIONS = {
    "missing column": (
        lambda f: f.drop("liver_low"),
        r"predictions: missing columns \['liver_low'\]",
    ),
    "missing patient": (_drop_patient, r"patients missing from the predictions: 10003"),
    "extra patient": (_extra_patient, r"predictions not in the labels: 99999"),
    "duplicated patient": (
        lambda f: pl.concat([f, f.filter(pl.col("patient_id") == 10003)]),
        r"duplicated patients 10003",
    ),
    "NaN": (_set("liver_low", 10004, math.nan), r"liver_low: patient 10004 \(row 4\): NaN"),
    "inf": (
        _set("kidney_high", 10002, math.inf),
        r"kidney_high: patient 10002 \(row 2\): infinite",
    ),
    "negative": (
        _set("bowel_injury", 10001, -0.1),
        r"bowel_injury: patient 10001 \(row 1\): negative",
    ),
    "group sums to 0": (
        _zero_group,
        r"spleen_healthy, spleen_low, spleen_high: patient 10005 \(row 5\): "
        r"the spleen group sums to 0",
    ),
    "null id": (
        lambda f: f.with_columns(
            pl.when(pl.col("patient_id") == 10006)
            .then(None)
            .otherwise(pl.col("patient_id"))
            .alias("patient_id")
        ),
        r"patient_id: missing \(null/NaN\) id in rows 6",
    ),
    "not a number": (
        lambda f: f.with_columns(pl.col("bowel_injury").cast(pl.String).replace("0.5", "x")),
        r"bowel_injury: patient 10000 \(row 0\): 'x' is not a number",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PREDICTIONS))
def test_bad_predictions_name_column_and_patient(case: str) -> None:
    labels = random_labels(20, 22)
    predictions = constant_submission(labels["patient_id"].to_list(), dict.fromkeys(ALL, 0.5))
    change, message = BAD_PREDICTIONS[case]
    with pytest.raises(ValueError, match=message):
        rsna_score(labels, change(predictions))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("kidney_low", 10004, math.nan), r"labels: kidney_low: patient 10004 \(row 4\): NaN"),
        (lambda f: f.drop("spleen_high"), r"labels: missing columns \['spleen_high'\]"),
        (_set("any_injury", 10003, 0.5), r"labels: any_injury: patient 10003 \(row 3\)"),
        (_zero_group, r"labels: spleen_healthy, spleen_low, spleen_high: patient 10005"),
    ],
)
def test_bad_labels_name_column_and_patient(change, message: str) -> None:
    labels = random_labels(20, 23)
    predictions = random_predictions(labels["patient_id"].to_list(), 24)
    with pytest.raises(ValueError, match=message):
        rsna_score(change(labels), predictions)


# --------------------------------------------------------------------------- SPEC section 6


SPEC_COUNTS = {  # SPEC section 2 prevalences x 3,147 patients, rounded
    "bowel_injury": 63,  # 2.0 %
    "extravasation_injury": 201,  # 6.4 %
    "kidney_low": 116,  # 3.7 %
    "kidney_high": 66,  # 2.1 %
    "liver_low": 258,  # 8.2 %
    "liver_high": 63,  # 2.0 %
    "spleen_low": 198,  # 6.3 %
    "spleen_high": 154,  # 4.9 %
}
SPEC_PATIENTS, SPEC_ANY_INJURY = 3147, 856  # any injury 27.2 %


@pytest.fixture(scope="module")
def spec_labels() -> pl.DataFrame:
    """Training labels with exactly SPEC section 2's prevalences: the 1,119 injuries are dealt
    in turn to patients 0..855 (cyclically), so that their union is exactly 856 patients and
    the low and high classes of one organ never share a patient."""
    data = {column: np.zeros(SPEC_PATIENTS, dtype=np.int64) for column in ALL}
    cursor = 0
    for columns in GROUPS.values():
        for column in columns[1:]:
            rows = (cursor + np.arange(SPEC_COUNTS[column])) % SPEC_ANY_INJURY
            data[column][rows] = 1
            cursor += SPEC_COUNTS[column]
        data[columns[0]] = 1 - sum(data[column] for column in columns[1:])
    healthy = np.stack([data[columns[0]] for columns in GROUPS.values()], axis=1)
    ids = np.arange(10000, 10000 + SPEC_PATIENTS)
    return pl.DataFrame({"patient_id": ids, **data, "any_injury": (1 - healthy).max(axis=1)})


def test_spec_labels_have_the_spec_prevalences(spec_labels: pl.DataFrame) -> None:
    assert spec_labels.height == SPEC_PATIENTS
    assert int(spec_labels["any_injury"].sum()) == SPEC_ANY_INJURY
    for column, count in SPEC_COUNTS.items():
        assert int(spec_labels[column].sum()) == count
    for columns in GROUPS.values():
        assert (spec_labels.select(columns).sum_horizontal() == 1).all()


def _spec_score(labels: pl.DataFrame, values: dict[str, float]) -> float:
    return rsna_score(labels, constant_submission(labels["patient_id"].to_list(), values))


def test_spec_reference_figures(spec_labels: pl.DataFrame) -> None:
    half_third = {c: 0.5 if len(g) == 2 else 1 / 3 for g in GROUPS.values() for c in g}
    assert _spec_score(spec_labels, half_third) == pytest.approx(0.8836, abs=0.002)
    assert _spec_score(spec_labels, prior_prediction(spec_labels)) == pytest.approx(
        0.7861, abs=0.002
    )
    assert _spec_score(spec_labels, best_constant_prediction(spec_labels)) == pytest.approx(
        0.5794, abs=0.002
    )


def test_per_group_best_constant_is_not_the_spec_figure(spec_labels: pl.DataFrame) -> None:
    """p_c ∝ prevalence_c * w_c per group, any_injury left to the max rule, scores 0.608: the
    0.5794 of SPEC section 6 needs the any_injury part optimised jointly."""
    per_group = best_constant_prediction(spec_labels, joint=False)
    for group, columns in GROUPS.items():
        prevalence = spec_labels.select(columns).mean().to_numpy()[0]
        expected = prevalence * np.asarray(WEIGHTS[group])
        expected /= expected.sum()
        np.testing.assert_allclose([per_group[c] for c in columns], expected, atol=1e-12)
    assert _spec_score(spec_labels, per_group) == pytest.approx(0.6083, abs=0.001)


def test_best_constant_is_a_minimum(spec_labels: pl.DataFrame) -> None:
    best = best_constant_prediction(spec_labels)
    best_score = _spec_score(spec_labels, best)
    rng = np.random.default_rng(25)
    for _ in range(12):
        nudged = {c: v * math.exp(rng.normal(0, 0.05)) for c, v in best.items()}
        assert _spec_score(spec_labels, nudged) > best_score
    for columns in GROUPS.values():
        assert sum(best[c] for c in columns) == pytest.approx(1.0)
    # the extravasation group carries the any_injury prediction up to the tie point
    any_optimum = 6 * SPEC_ANY_INJURY / (6 * SPEC_ANY_INJURY + SPEC_PATIENTS - SPEC_ANY_INJURY)
    extravasation = 6 * 201 / (6 * 201 + SPEC_PATIENTS - 201)
    assert best["extravasation_injury"] == pytest.approx((any_optimum + extravasation) / 2)


def test_prior_and_constant_submission() -> None:
    labels = random_labels(40, 26)
    prior = prior_prediction(labels)
    assert list(prior) == ALL
    for column in ALL:
        assert prior[column] == pytest.approx(labels[column].mean())
    submission = constant_submission([3, 1, 2], prior)
    assert submission.columns == ["patient_id", *ALL]
    assert submission["patient_id"].to_list() == [3, 1, 2]
    validate_submission(submission)
    with pytest.raises(ValueError, match=r"missing columns \['bowel_healthy'\]"):
        constant_submission([1], {c: v for c, v in prior.items() if c != "bowel_healthy"})
    with pytest.raises(ValueError, match="liver_low: nan is not a probability"):
        constant_submission([1], {**prior, "liver_low": math.nan})


# --------------------------------------------------------------------------- validate_submission


@pytest.fixture
def sample() -> pl.DataFrame:
    return constant_submission([30, 10, 20], dict.fromkeys(ALL, 0.5))


def test_valid_submission_passes(sample: pl.DataFrame) -> None:
    submission = random_predictions([30, 10, 20], 27).with_columns(pl.col(ALL).clip(0, 1))
    validate_submission(submission, sample)
    validate_submission(submission)


BAD_SUBMISSIONS = {
    "missing column": (lambda f: f.drop("kidney_low"), r"missing columns \['kidney_low'\]"),
    "extra column": (
        lambda f: f.with_columns(pl.lit(0.1).alias("any_injury")),
        r"unexpected columns \['any_injury'\]",
    ),
    "misordered columns": (
        lambda f: f.select(["patient_id", "bowel_injury", "bowel_healthy", *ALL[2:]]),
        r"columns out of order: column 1 is 'bowel_injury', expected 'bowel_healthy'",
    ),
    "duplicated patient": (
        lambda f: pl.concat([f, f.head(1)]),
        r"duplicated patients 30 \(patient 30 is in rows 0, 3\)",
    ),
    "missing patient": (lambda f: f.head(2), r"patients missing from the submission: 20"),
    "extra patient": (
        lambda f: pl.concat(
            [f, f.head(1).with_columns(pl.lit(40, dtype=pl.Int64).alias("patient_id"))]
        ),
        r"patients of the submission not in the sample submission: 40",
    ),
    "misordered patients": (
        lambda f: f.sort("patient_id"),
        r"row 0 is patient 10, the sample has 30 there",
    ),
    "NaN": (_set("liver_high", 10, math.nan), r"liver_high: patient 10 \(row 1\): NaN"),
    "inf": (_set("liver_high", 20, -math.inf), r"liver_high: patient 20 \(row 2\): infinite"),
    "negative": (_set("spleen_low", 30, -0.5), r"spleen_low: patient 30 \(row 0\): negative"),
    "above one": (_set("spleen_low", 30, 1.5), r"spleen_low: patient 30 \(row 0\): above 1"),
    "group sums to 0": (
        lambda f: _set("bowel_injury", 20, 0.0)(_set("bowel_healthy", 20, 0.0)(f)),
        r"bowel_healthy, bowel_injury: patient 20 \(row 2\): the bowel group sums to 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SUBMISSIONS))
def test_bad_submissions_are_refused(sample: pl.DataFrame, case: str) -> None:
    change, message = BAD_SUBMISSIONS[case]
    with pytest.raises(ValueError, match=message):
        validate_submission(change(sample), sample)


def test_bad_submission_without_sample(sample: pl.DataFrame) -> None:
    validate_submission(sample.head(2))
    with pytest.raises(ValueError, match="columns out of order"):
        validate_submission(sample.select(["patient_id", *ALL[::-1]]))


# --------------------------------------------------------------------------- paper metrics


def slow_average_precision(truth: list[bool], scores: list[float]) -> float:
    """sum over distinct thresholds t (descending) of (R_t - R_previous) * P_t."""
    positives = sum(truth)
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = [t for t, s in zip(truth, scores, strict=True) if s >= threshold]
        recall = sum(chosen) / positives
        total += (recall - previous_recall) * sum(chosen) / len(chosen)
        previous_recall = recall
    return total


def slow_auc(truth: list[bool], scores: list[float]) -> float:
    pairs = [
        1.0 if sp > sn else 0.5 if sp == sn else 0.0
        for tp, sp in zip(truth, scores, strict=True)
        if tp
        for tn, sn in zip(truth, scores, strict=True)
        if not tn
    ]
    return sum(pairs) / len(pairs)


def slow_decision(p: list[float], thresholds: tuple[float, float] | None) -> int:
    if thresholds is None:
        return max(range(3), key=lambda c: (p[c], -c))
    if p[2] >= thresholds[1]:
        return 2
    return 1 if p[1] >= thresholds[0] else 0


def slow_organ_metrics(labels: pl.DataFrame, predictions: pl.DataFrame, thresholds=None) -> dict:
    by_id = {row["patient_id"]: row for row in predictions.to_dicts()}
    aps, precisions, recalls = [], [], []
    for organ in ("kidney", "liver", "spleen"):
        columns = GROUPS[organ]
        truth, probabilities = [], []
        for row in labels.to_dicts():
            truth.append([row[c] for c in columns].index(1))
            scores = [by_id[row["patient_id"]][c] for c in columns]
            probabilities.append([s / sum(scores) for s in scores])
        threshold = (thresholds or {}).get(organ)
        decided = [slow_decision(p, threshold) for p in probabilities]
        for c in range(3):
            hits = sum(1 for t, d in zip(truth, decided, strict=True) if t == c and d == c)
            predicted = decided.count(c)
            actual = truth.count(c)
            precisions.append(hits / predicted if predicted else 0.0)
            recalls.append(hits / actual if actual else 0.0)
            if actual:
                aps.append(
                    slow_average_precision([t == c for t in truth], [p[c] for p in probabilities])
                )
    return {
        "mAP": np.mean(aps),
        "macro_precision": np.mean(precisions),
        "macro_recall": np.mean(recalls),
    }


@pytest.mark.parametrize("thresholds", [None, {"kidney": (0.3, 0.2), "liver": (0.25, 0.4)}])
def test_organ_metrics_match_slow_reference(thresholds) -> None:
    labels = random_labels(120, 28)
    predictions = random_predictions(labels["patient_id"].to_list()[::-1], 29, extremes=False)
    predictions = predictions.with_columns(pl.col(ALL).round(1) + 0.01)  # ties in the scores
    result = organ_metrics(labels, predictions, thresholds)
    reference = slow_organ_metrics(labels, predictions, thresholds)
    for key in ("mAP", "macro_precision", "macro_recall"):
        assert result[key] == pytest.approx(reference[key], abs=1e-12), key
    assert result["skipped"] == []
    assert len(result["per_class"]) == 9


def test_organ_metrics_tiny_example_by_hand() -> None:
    # kidney truth: healthy, healthy, low, high;  p = (healthy, low, high)
    labels = pl.DataFrame(
        {
            "patient_id": [1, 2, 3, 4],
            "kidney_healthy": [1, 1, 0, 0],
            "kidney_low": [0, 0, 1, 0],
            "kidney_high": [0, 0, 0, 1],
        }
    )
    predictions = pl.DataFrame(
        {
            "patient_id": [4, 3, 2, 1],
            "kidney_healthy": [0.6, 0.65, 0.5, 0.9],
            "kidney_low": [0.1, 0.25, 0.35, 0.05],
            "kidney_high": [0.3, 0.1, 0.15, 0.05],
        }
    )
    # argmax: everyone healthy -> precision (2/4, 0, 0), recall (1, 0, 0)
    argmax = organ_metrics(labels, predictions, organs=["kidney"])
    assert argmax["macro_precision"] == pytest.approx(0.5 / 3)
    assert argmax["macro_recall"] == pytest.approx(1 / 3)
    # t_low 0.2, t_high 0.25: patient 4 high (0.3), 3 low (0.25), 2 low (0.35), 1 healthy
    # precision (1, 1/2, 1), recall (1/2, 1, 1)
    fitted = organ_metrics(labels, predictions, {"kidney": (0.2, 0.25)}, organs=["kidney"])
    assert fitted["macro_precision"] == pytest.approx(2.5 / 3)
    assert fitted["macro_recall"] == pytest.approx(2.5 / 3)
    assert fitted["thresholds"] == {"kidney": (0.2, 0.25)}
    # AP by hand, scores in descending order. healthy: 0.9 (+), 0.65, 0.6, 0.5 (+): recall
    # steps of 1/2 at precisions 1 and 2/4 -> 3/4; low: 0.35, 0.25 (+) -> 1/2; high: 0.3 (+) -> 1
    assert fitted["per_class"]["kidney_healthy"]["ap"] == pytest.approx(3 / 4)
    assert fitted["mAP"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert fitted["per_class"]["kidney_high"]["support"] == 1


def test_organ_metrics_skip_a_class_without_positives() -> None:
    labels = random_labels(80, 30).with_columns(
        pl.col("kidney_healthy") + pl.col("kidney_high"), pl.lit(0).alias("kidney_high")
    )
    predictions = random_predictions(labels["patient_id"].to_list(), 31)
    result = organ_metrics(labels, predictions)
    assert result["skipped"] == ["kidney_high"]
    aps = [v["ap"] for k, v in result["per_class"].items() if k != "kidney_high"]
    assert result["mAP"] == pytest.approx(np.mean(aps))
    assert result["per_class"]["kidney_high"]["recall"] == 0.0


def _macro_f1(labels: pl.DataFrame, predictions: pl.DataFrame, thresholds) -> float:
    return organ_metrics(labels, predictions, thresholds)["macro_f1"]


@pytest.mark.parametrize("seed", [32, 33])
def test_fit_thresholds_beat_argmax_on_the_fitting_rows(seed: int) -> None:
    labels = random_labels(200, seed, injury_rate=0.15)
    predictions = random_predictions(labels["patient_id"].to_list(), seed + 1, extremes=False)
    fitted = fit_thresholds(labels, predictions)
    assert set(fitted) == {"kidney", "liver", "spleen"}
    for organ, pair in fitted.items():
        single = organ_metrics(labels, predictions, {organ: pair}, organs=[organ])["macro_f1"]
        assert single >= organ_metrics(labels, predictions, organs=[organ])["macro_f1"]
        assert pair is None or pair in itertools.product(metric.THRESHOLD_GRID, repeat=2)
    assert _macro_f1(labels, predictions, fitted) >= _macro_f1(labels, predictions, None)


def test_fit_thresholds_find_rare_classes() -> None:
    """Injured classes predicted with small but informative probabilities: argmax never says
    "injured", thresholds do."""
    labels = random_labels(300, 34, injury_rate=0.2)
    rng = np.random.default_rng(35)
    data = {"patient_id": labels["patient_id"].to_list()}
    for columns in GROUPS.values():
        truth = labels.select(columns).to_numpy()
        scores = 0.05 + 0.25 * truth + 0.05 * rng.random(truth.shape)
        scores[:, 0] = 1.0
        data.update(zip(columns, scores.T, strict=True))
    predictions = pl.DataFrame(data)
    fitted = fit_thresholds(labels, predictions)
    assert all(pair is not None for pair in fitted.values())
    assert organ_metrics(labels, predictions, fitted)["macro_f1"] == pytest.approx(1.0)
    assert organ_metrics(labels, predictions)["macro_recall"] == pytest.approx(1 / 3)


def test_group_auc_matches_slow_reference() -> None:
    labels = random_labels(90, 36)
    predictions = random_predictions(labels["patient_id"].to_list(), 37)
    predictions = predictions.with_columns(pl.col(ALL).round(1) + 0.01)
    aucs = group_auc(labels, predictions)
    assert list(aucs) == PARTS
    any_score = np.zeros(labels.height)
    for group, columns in GROUPS.items():
        injured = (labels[columns[0]] == 0).to_list()
        score = 1 - normalised(predictions, columns)[:, 0]
        any_score = np.maximum(any_score, score)
        assert aucs[group] == pytest.approx(slow_auc(injured, score.tolist()), abs=1e-12)
    any_truth = (labels["any_injury"] == 1).to_list()
    assert aucs["any_injury"] == pytest.approx(slow_auc(any_truth, any_score.tolist()), abs=1e-12)


def test_score_of_variants_is_rsna_score_of_each_calibrated_table() -> None:
    """The calibration search scores arrays (`ScoreOfVariants`, `_calibrated_values`): each
    score is `rsna_score` of the table `apply_calibration` writes, to the last bits (polars
    versions round some of its sums differently), shuffled patient order and unnormalised
    predictions included."""
    from kaggle_utils.finetune.calibration import Calibration, _calibrated_values, apply_calibration
    from kaggle_utils.metric import ScoreOfVariants, prior_prediction

    labels = random_labels(60, 21)
    predictions = random_predictions(labels["patient_id"].shuffle(seed=3).to_list(), 22)
    scorer = ScoreOfVariants(labels, predictions)
    assert scorer.score(scorer.values) == rsna_score(labels, predictions)
    rng = np.random.default_rng(5)
    for _ in range(20):
        calibration = Calibration(
            prior=prior_prediction(labels),
            model_weight={t: float(rng.choice([0.0, 0.3, 1.0])) for t in GROUPS},
            factors={c: float(rng.uniform(0.5, 2.0)) for c in ALL if rng.random() < 0.5},
        )
        expected = rsna_score(labels, apply_calibration(predictions, calibration))
        actual = scorer.score(_calibrated_values(scorer.values, calibration))
        assert actual == pytest.approx(expected, rel=1e-13, abs=0)  # polars' own rounding
