"""The RSNA 2023 Abdominal Trauma Detection metric, exactly, and the 2D-VoCo paper's metrics.

Competition score (SPEC section 6, Kaggle's `rsna-trauma-metric`): the mean of six sample-weighted
log losses, one per target group (bowel, extravasation, kidney, liver, spleen) and one for
`any_injury`, derived from the groups by a max rule. This implementation follows the official
code where it is right and fixes its three defects: rows are matched by `patient_id` (the
official code matches by position), inputs are never mutated (it normalises in place), and a
fold with a single class still scores (scikit-learn's `log_loss` refuses it).

Paper metrics (2D-VoCo, section 3): mAP, macro precision and macro recall over the nine
kidney/liver/spleen classes, with decision thresholds chosen by cross-validation on the
training folds (`fit_thresholds`), plus ROC AUC per group as a threshold-free diagnostic.

Every function accepts a pandas or a polars DataFrame (or a mapping of column -> values) with a
`patient_id` column, matches rows by patient id and never writes into its inputs. Every error
is a `ValueError` that names the table, the column and the patient, e.g.
`"predictions: liver_low: patient 10004 (row 3): NaN"`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

PATIENT_ID = "patient_id"
ANY_INJURY = "any_injury"

# Target group -> its columns, in train.csv's (and sample_submission.csv's) order.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "bowel": ("bowel_healthy", "bowel_injury"),
    "extravasation": ("extravasation_healthy", "extravasation_injury"),
    "kidney": ("kidney_healthy", "kidney_low", "kidney_high"),
    "liver": ("liver_healthy", "liver_low", "liver_high"),
    "spleen": ("spleen_healthy", "spleen_low", "spleen_high"),
}
LABEL_COLUMNS: tuple[str, ...] = tuple(itertools.chain.from_iterable(TARGET_GROUPS.values()))
SUBMISSION_COLUMNS: tuple[str, ...] = (PATIENT_ID, *LABEL_COLUMNS)
# The six parts of the score, in the order the official code averages them.
SCORE_PARTS: tuple[str, ...] = (*TARGET_GROUPS, ANY_INJURY)
PAPER_ORGANS: tuple[str, ...] = ("kidney", "liver", "spleen")
# Classes per target, in train.csv's column order (derived from the metric's column groups).
TARGET_CLASSES: dict[str, tuple[str, ...]] = {
    target: tuple(column.removeprefix(f"{target}_") for column in columns)
    for target, columns in TARGET_GROUPS.items()
}
ALL_TARGETS: tuple[str, ...] = tuple(TARGET_CLASSES)
PAPER_TARGETS: tuple[str, ...] = PAPER_ORGANS

# Sample weight by true class (the official `create_training_solution`).
CLASS_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bowel": (1.0, 2.0),
    "extravasation": (1.0, 6.0),
    "kidney": (1.0, 2.0, 4.0),
    "liver": (1.0, 2.0, 4.0),
    "spleen": (1.0, 2.0, 4.0),
    ANY_INJURY: (1.0, 6.0),
}

# scikit-learn's log_loss clipping before 1.2 (`eps=1e-15`); sklearn 1.2-1.4 defaulted to
# eps="auto", i.e. np.finfo(float64).eps ~ 2.2e-16. Only predictions within 1e-15 of 0 or 1
# feel the difference; pass `eps=` to choose.
EPS = 1e-15
# The threshold grid of `fit_thresholds`: 0.05, 0.10, ..., 0.95 for each of t_low and t_high.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))

# A pandas or polars DataFrame, or a mapping of column name -> 1-D values.
Frame = Any
Thresholds = Mapping[str, tuple[float, float] | None]

_MAX_LISTED = 5


# --------------------------------------------------------------------------- reading tables


def _listed(items: Sequence[Any]) -> str:
    """A few items for an error message: '10004, 10005, ... (12 in all)'."""
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}, ... ({len(items)} in all)"


def _column_names(frame: Frame, what: str) -> list[str]:
    if isinstance(frame, Mapping):
        names = [str(name) for name in frame]
    elif hasattr(frame, "columns"):
        names = [str(name) for name in frame.columns]
    else:
        raise ValueError(
            f"{what}: expected a pandas or polars DataFrame (or a mapping of columns), "
            f"not {type(frame).__name__}"
        )
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"{what}: duplicated column names {duplicated}")
    return names


def _column_values(frame: Frame, name: str) -> np.ndarray:
    """One column as a 1-D numpy array (pandas, polars and mappings alike); never written to."""
    column = frame[name]
    if hasattr(column, "to_numpy"):
        return np.asarray(column.to_numpy())
    return np.asarray(column)


def _id_key(value: Any) -> str | None:
    """A patient id as a matching key: 10004, 10004.0 and "10004" all become "10004"."""
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return str(value)


def _patient_ids(frame: Frame, what: str) -> np.ndarray:
    """The `patient_id` column as string keys; null ids and duplicates are errors."""
    if PATIENT_ID not in _column_names(frame, what):
        raise ValueError(f"{what}: missing column {PATIENT_ID!r}")
    raw = _column_values(frame, PATIENT_ID)
    keys = [_id_key(value) for value in raw.tolist()]
    missing = [row for row, key in enumerate(keys) if key is None]
    if missing:
        raise ValueError(f"{what}: {PATIENT_ID}: missing (null/NaN) id in rows {_listed(missing)}")
    ids = np.asarray(keys, dtype=object)
    unique, counts = np.unique(ids.astype(str), return_counts=True)
    repeated = unique[counts > 1].tolist()
    if repeated:
        first = repeated[0]
        rows = np.flatnonzero(ids.astype(str) == first).tolist()
        raise ValueError(
            f"{what}: {PATIENT_ID}: duplicated patients {_listed(repeated)} "
            f"(patient {first} is in rows {_listed(rows)}); one row per patient"
        )
    return ids


def _to_float(value: Any) -> float:
    if value is None or type(value).__name__ == "NAType":
        return math.nan
    return float(value)


def _numeric(raw: np.ndarray, column: str, ids: np.ndarray, what: str) -> np.ndarray:
    """A column as float64 (nulls become NaN); a non-numeric value is an error."""
    if raw.dtype.kind in "biuf":
        return raw.astype(np.float64)
    out = np.empty(len(raw), dtype=np.float64)
    for row, value in enumerate(raw.tolist()):
        try:
            out[row] = _to_float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{what}: {column}: patient {ids[row]} (row {row}): {value!r} is not a number"
            ) from None
    return out


def _check_values(
    values: np.ndarray, column: str, ids: np.ndarray, what: str, upper: float | None = None
) -> None:
    """NaN, inf and negative values (and values above `upper`) are errors naming the patient."""
    problems = (
        (np.isnan(values), "NaN"),
        (np.isinf(values), "infinite"),
        (values < 0, "negative"),
    )
    if upper is not None:
        problems = (*problems, (values > upper, f"above {upper:g}"))
    for mask, kind in problems:
        rows = np.flatnonzero(mask)
        if rows.size:
            row = int(rows[0])
            more = f" (and {rows.size - 1} more rows)" if rows.size > 1 else ""
            shown = "" if kind == "NaN" else f" ({values[row]!r})"
            raise ValueError(
                f"{what}: {column}: patient {ids[row]} (row {row}): {kind}{shown}{more}"
            )


def _read(
    frame: Frame, columns: Sequence[str], what: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(patient id keys, {column: float64 values}) after every check of the values."""
    names = _column_names(frame, what)
    missing = [column for column in columns if column not in names]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}")
    ids = _patient_ids(frame, what)
    if len(ids) == 0:
        raise ValueError(f"{what}: no rows")
    values = {}
    for column in columns:
        values[column] = _numeric(_column_values(frame, column), column, ids, what)
        _check_values(values[column], column, ids, what)
    return ids, values


def _align(
    reference_ids: np.ndarray,
    other_ids: np.ndarray,
    reference: str = "labels",
    other: str = "predictions",
) -> np.ndarray:
    """Indices that put the `other` rows in the reference rows' order; the two tables must
    hold the same patients."""
    position = {key: row for row, key in enumerate(other_ids.tolist())}
    absent = [key for key in reference_ids.tolist() if key not in position]
    known = set(reference_ids.tolist())
    surplus = [key for key in other_ids.tolist() if key not in known]
    if absent or surplus:
        parts = []
        if absent:
            parts.append(f"patients missing from the {other}: {_listed(absent)}")
        if surplus:
            parts.append(f"patients of the {other} not in the {reference}: {_listed(surplus)}")
        raise ValueError(f"{other} and {reference} differ ({PATIENT_ID}): " + "; ".join(parts))
    return np.asarray([position[key] for key in reference_ids.tolist()], dtype=np.int64)


def _normalised_group(
    values: Mapping[str, np.ndarray], group: str, ids: np.ndarray, what: str
) -> np.ndarray:
    """(n, n_classes) of the group's columns divided by their row sum (a new array)."""
    columns = TARGET_GROUPS[group]
    matrix = np.stack([values[column] for column in columns], axis=1)
    totals = matrix.sum(axis=1, keepdims=True)
    zero = np.flatnonzero(totals[:, 0] <= 0)
    if zero.size:
        row = int(zero[0])
        more = f" (and {zero.size - 1} more rows)" if zero.size > 1 else ""
        raise ValueError(
            f"{what}: {', '.join(columns)}: patient {ids[row]} (row {row}): "
            f"the {group} group sums to 0{more}"
        )
    return matrix / totals


def _read_groups(
    frame: Frame, groups: Sequence[str], what: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ids, {group: row-normalised (n, n_classes) matrix})."""
    columns = [column for group in groups for column in TARGET_GROUPS[group]]
    ids, values = _read(frame, columns, what)
    return ids, {group: _normalised_group(values, group, ids, what) for group in groups}


def _any_injury(healthy: Iterable[np.ndarray]) -> np.ndarray:
    """max over groups of (1 - normalised healthy): the official any_injury rule."""
    return np.max(1.0 - np.stack(list(healthy), axis=1), axis=1)


def _labels(
    frame: Frame, groups: Sequence[str] = tuple(TARGET_GROUPS)
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels read and normalised like predictions; the all-group read derives any_injury and
    checks it against an `any_injury` column when the table has one."""
    ids, matrices = _read_groups(frame, groups, "labels")
    if len(groups) == len(TARGET_GROUPS):
        derived = _any_injury(matrices[group][:, 0] for group in TARGET_GROUPS)
        if ANY_INJURY in _column_names(frame, "labels"):
            given = _numeric(_column_values(frame, ANY_INJURY), ANY_INJURY, ids, "labels")
            wrong = np.flatnonzero(~(np.abs(given - derived) <= 1e-9))
            if wrong.size:
                row = int(wrong[0])
                raise ValueError(
                    f"labels: {ANY_INJURY}: patient {ids[row]} (row {row}): {given[row]!r}, "
                    f"but max(1 - *_healthy) is {derived[row]!r} "
                    f"({wrong.size} rows disagree); fix the table or drop the column"
                )
        matrices[ANY_INJURY] = derived
    return ids, matrices


def _paired(
    labels: Frame, predictions: Frame, groups: Sequence[str] = tuple(TARGET_GROUPS)
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Normalised label and prediction matrices per group, prediction rows in label order."""
    label_ids, y = _labels(labels, groups)
    prediction_ids, p = _read_groups(predictions, groups, "predictions")
    order = _align(label_ids, prediction_ids)
    p = {group: matrix[order] for group, matrix in p.items()}
    if ANY_INJURY in y:
        p[ANY_INJURY] = _any_injury(p[group][:, 0] for group in TARGET_GROUPS)
    return y, p


# --------------------------------------------------------------------------- the RSNA score


def _clipped(p: np.ndarray, eps: float) -> np.ndarray:
    """scikit-learn's log_loss as of 2023: clip to [eps, 1 - eps] (a new array)."""
    return np.clip(p, eps, 1.0 - eps)


def _binary_columns(p: np.ndarray) -> np.ndarray:
    """A 1-D probability of the positive class as the two columns [1 - p, p]."""
    return np.stack([1.0 - p, p], axis=1)


def _weighted_log_loss(y: np.ndarray, p: np.ndarray, class_weights: Sequence[float]) -> float:
    """sum_i w_i CE_i / sum_i w_i, w_i = sum_c y_ic w_c, CE_i = -sum_c y_ic log q_ic, where
    q is the (already clipped) p with its rows re-normalised; y and p are (n, n_classes)."""
    q = p / p.sum(axis=1, keepdims=True)
    weights = y @ np.asarray(class_weights, dtype=np.float64)
    cross_entropy = -(y * np.log(q)).sum(axis=1)
    return float(np.sum(weights * cross_entropy) / np.sum(weights))


def _parts(y: Mapping[str, np.ndarray], p: Mapping[str, np.ndarray], eps: float) -> dict:
    """The six losses from normalised label and prediction matrices.

    As scikit-learn 1.2's log_loss: a group's (n, k) prediction is clipped, then re-normalised;
    any_injury's 1-D prediction is clipped first and only then given its complement column
    (so 1 - p is not clipped again), then re-normalised.
    """
    parts = {
        group: _weighted_log_loss(y[group], _clipped(p[group], eps), CLASS_WEIGHTS[group])
        for group in TARGET_GROUPS
    }
    parts[ANY_INJURY] = _weighted_log_loss(
        _binary_columns(y[ANY_INJURY]),
        _binary_columns(_clipped(p[ANY_INJURY], eps)),
        CLASS_WEIGHTS[ANY_INJURY],
    )
    return parts


def rsna_score_parts(labels: Frame, predictions: Frame, *, eps: float = EPS) -> dict[str, float]:
    """The six weighted log losses of the competition metric, keyed by `SCORE_PARTS`.

    Per group, both tables are divided by their row sums; sample weights are those of the true
    class (`CLASS_WEIGHTS`); the loss is sum(w * CE) / sum(w) with predictions clipped to
    [eps, 1 - eps] and re-normalised. any_injury's prediction and label are
    max over groups of (1 - normalised healthy), scored as a binary log loss with weights 1/6.

    Args:
        labels: train.csv's columns (`patient_id`, the 13 one-hot columns, optionally
            `any_injury`, which must then agree with the groups).
        predictions: `patient_id` and the 13 probability columns (any positive scale: each
            group is normalised).
        eps: the clipping constant (1e-15, scikit-learn < 1.2; 2.2e-16 for 1.2-1.4's "auto").

    Raises:
        ValueError: a missing column, a missing, extra or duplicated patient, a NaN, infinite
            or negative value, or a group summing to 0 in some row (the message names the
            column and the patient).
    """
    y, p = _paired(labels, predictions)
    return _parts(y, p, eps)


def rsna_score(labels: Frame, predictions: Frame, *, eps: float = EPS) -> float:
    """The RSNA 2023 competition score: the mean of `rsna_score_parts` (lower is better).

    >>> healthy = {c: float(c.endswith("healthy")) for c in LABEL_COLUMNS}
    >>> labels = constant_submission([1, 2], healthy)
    >>> uniform = constant_submission([2, 1], dict.fromkeys(LABEL_COLUMNS, 1.0))
    >>> round(rsna_score(labels, uniform), 4)  # (2 log 2 + 3 log 3 + log 3) / 6
    0.9635
    """
    return float(np.mean(list(rsna_score_parts(labels, predictions, eps=eps).values())))


def patient_loss_terms(
    labels: Frame, predictions: Frame, *, eps: float = EPS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each patient's share of the score, for resampling patients (bootstrap): (ids,
    weighted losses w_i CE_i, weights w_i), the last two (n, 6) in `SCORE_PARTS` order, so
    that for any multiset of rows R, mean_part(sum_R w CE / sum_R w) is the RSNA score of the
    patients R. Rows follow `labels`."""
    ids, _ = _labels(labels)
    y, p = _paired(labels, predictions)
    pairs = {
        group: (y[group], _clipped(p[group], eps), CLASS_WEIGHTS[group]) for group in TARGET_GROUPS
    }
    pairs[ANY_INJURY] = (
        _binary_columns(y[ANY_INJURY]),
        _binary_columns(_clipped(p[ANY_INJURY], eps)),
        CLASS_WEIGHTS[ANY_INJURY],
    )
    losses, weights = [], []
    for part in SCORE_PARTS:
        truth, probabilities, class_weights = pairs[part]
        q = probabilities / probabilities.sum(axis=1, keepdims=True)
        w = truth @ np.asarray(class_weights, dtype=np.float64)
        weights.append(w)
        losses.append(w * -(truth * np.log(q)).sum(axis=1))
    return ids, np.stack(losses, axis=1), np.stack(weights, axis=1)


def score_from_terms(losses: np.ndarray, weights: np.ndarray) -> float:
    """The RSNA score of the rows of `patient_loss_terms` (any subset or resample of them)."""
    return float(np.mean(losses.sum(axis=0) / weights.sum(axis=0)))


class ScoreOfVariants:
    """`rsna_score(labels, predictions)` for many variants of one prediction table (the same
    patients in the same row order, other values), without re-reading and re-aligning the
    tables for each: a calibration search scores hundreds of them.

    `score(values)` takes {column: float64 array in the predictions' row order} for the 13
    columns and gives what `rsna_score` gives on a table of those values (the same operations
    in the same order: equal to the last bits); the values are not checked again.
    """

    def __init__(self, labels: Frame, predictions: Frame, *, eps: float = EPS) -> None:
        label_ids, self.y = _labels(labels)
        self.ids, self.values = _read(predictions, LABEL_COLUMNS, "predictions")
        self.order = _align(label_ids, self.ids)
        self.eps = eps

    def score(self, values: Mapping[str, np.ndarray]) -> float:
        p = {
            group: _normalised_group(values, group, self.ids, "predictions")[self.order]
            for group in TARGET_GROUPS
        }
        p[ANY_INJURY] = _any_injury(p[group][:, 0] for group in TARGET_GROUPS)
        return float(np.mean(list(_parts(self.y, p, self.eps).values())))


# --------------------------------------------------------------------------- constant submissions


def prior_prediction(labels: Frame) -> dict[str, float]:
    """The training prior: each of the 13 columns' mean over patients (labels normalised per
    group). SPEC section 6 scores it 0.7861 on the training labels."""
    _, y = _labels(labels)
    return {
        column: float(y[group][:, index].mean())
        for group, columns in TARGET_GROUPS.items()
        for index, column in enumerate(columns)
    }


def _weighted_masses(y: np.ndarray, class_weights: Sequence[float]) -> np.ndarray:
    """m_c = sum_i w_i y_ic: the weight each class carries in the group's loss (n_c * w_c for
    one-hot labels)."""
    weights = y @ np.asarray(class_weights, dtype=np.float64)
    return (weights[:, None] * y).sum(axis=0)


def _binary_cross_entropy(u: float, a: float) -> float:
    """-(1 - u) log(1 - a) - u log(a), with 0 log 0 = 0."""
    total = 0.0
    if u < 1.0:
        total -= (1.0 - u) * math.log(max(1.0 - a, EPS))
    if u > 0.0:
        total -= u * math.log(max(a, EPS))
    return total


def best_constant_prediction(labels: Frame, *, joint: bool = True) -> dict[str, float]:
    """The constant submission with the lowest RSNA score on `labels` (the fallback for a
    series that cannot be predicted, SPEC section 7).

    Per group alone, the minimiser of sum_c m_c (-log p_c) is p_c = m_c / sum(m), with
    m_c = sum_i w_i y_ic the weighted class mass: the class prevalence reweighted by the class
    weights, p_c ∝ prevalence_c * w_c. With `joint=False` that is the answer, and the
    any_injury part is not optimised: its prediction follows from the groups by the max rule.

    The any_injury loss wants a much larger "injured" probability (about 0.69 on the training
    labels) than any group does, and it can only get it through the max rule. `joint=True`
    (default) minimises the whole score: some set T of groups shares the injured probability
    a = max over groups, the others keep their own optimum. Each part is a weighted binary
    cross-entropy in (1 - p_healthy) once the injured classes keep their proportions, so for
    a given T the optimum is a = mean of the optimal injured probabilities of T and of
    any_injury; every T is tried and the best feasible one kept. This is the reading that
    reproduces SPEC section 6's 0.5794 ("best constant"); the per-group answer scores 0.608.
    """
    _, y = _labels(labels)
    masses = {group: _weighted_masses(y[group], CLASS_WEIGHTS[group]) for group in TARGET_GROUPS}
    any_masses = _weighted_masses(_binary_columns(y[ANY_INJURY]), CLASS_WEIGHTS[ANY_INJURY])
    injured = {group: 1.0 - m[0] / m.sum() for group, m in masses.items()}
    tied: tuple[str, ...] = ()
    level = 0.0
    if joint:
        any_optimum = float(any_masses[1] / any_masses.sum())
        best_cost = math.inf
        groups = tuple(TARGET_GROUPS)
        for size in range(1, len(groups) + 1):
            for subset in itertools.combinations(groups, size):
                a = (any_optimum + sum(injured[group] for group in subset)) / (size + 1)
                others = [group for group in groups if group not in subset]
                if any(injured[group] > a for group in others):
                    continue
                cost = _binary_cross_entropy(any_optimum, a) + sum(
                    _binary_cross_entropy(injured[group], a) for group in subset
                )
                cost += sum(_binary_cross_entropy(injured[g], injured[g]) for g in others)
                if cost < best_cost:
                    best_cost, tied, level = cost, subset, a
    prediction = {}
    for group, columns in TARGET_GROUPS.items():
        m = masses[group]
        p = m / m.sum()
        if group in tied:
            injured_mass = m[1:].sum()
            split = (
                m[1:] / injured_mass if injured_mass > 0 else np.full(len(m) - 1, 1 / (len(m) - 1))
            )
            p = np.concatenate([[1.0 - level], level * split])
        prediction.update({column: float(value) for column, value in zip(columns, p, strict=True)})
    return prediction


def constant_submission(
    patient_ids: Iterable[Any],
    values: Mapping[str, float],
    *,
    frame: Literal["polars", "pandas"] = "polars",
) -> Any:
    """A submission with the same 13 `values` for every patient, columns in sample order.

    `values` maps every column of `LABEL_COLUMNS` to a probability (e.g. the output of
    `best_constant_prediction`). Returns a polars DataFrame, or a pandas one with
    `frame="pandas"` (pandas must then be installed).

    Raises:
        ValueError: a missing or unknown column, a negative or non-finite value.
    """
    missing = [column for column in LABEL_COLUMNS if column not in values]
    unknown = [column for column in values if column not in LABEL_COLUMNS]
    if missing or unknown:
        raise ValueError(f"constant_submission: missing columns {missing}, unknown {unknown}")
    for column in LABEL_COLUMNS:
        value = float(values[column])
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"constant_submission: {column}: {value!r} is not a probability")
    ids = list(patient_ids)
    data = {PATIENT_ID: ids, **{c: [float(values[c])] * len(ids) for c in LABEL_COLUMNS}}
    if frame == "polars":
        import polars as pl

        return pl.DataFrame(data)
    if frame == "pandas":
        import pandas as pd

        return pd.DataFrame(data)
    raise ValueError(f"frame must be 'polars' or 'pandas', not {frame!r}")


# --------------------------------------------------------------------------- submission checks


def validate_submission(df: Frame, sample_submission: Frame | None = None) -> None:
    """Check a submission before it is written (notebook 04): raise on anything Kaggle would
    reject or silently mis-score.

    Columns: exactly the sample's columns in its order (without a sample: `patient_id` then
    the 13 columns of train.csv). Rows: one per patient, no null id; with a sample, the same
    patients in the same order. Values: finite, in [0, 1], no target group summing to 0.

    Raises:
        ValueError: the first problem found, naming the columns or the patient and row.
    """
    what = "submission"
    names = _column_names(df, what)
    if sample_submission is not None:
        expected = _column_names(sample_submission, "sample submission")
    else:
        expected = list(SUBMISSION_COLUMNS)
    missing = [name for name in expected if name not in names]
    extra = [name for name in names if name not in expected]
    if missing or extra:
        raise ValueError(f"{what}: missing columns {missing}, unexpected columns {extra}")
    if names != expected:
        first = next(i for i, (a, b) in enumerate(zip(names, expected, strict=True)) if a != b)
        raise ValueError(
            f"{what}: columns out of order: column {first} is {names[first]!r}, expected "
            f"{expected[first]!r} (order: {expected})"
        )
    ids = _patient_ids(df, what)
    if len(ids) == 0:
        raise ValueError(f"{what}: no rows")
    if sample_submission is not None:
        sample_ids = _patient_ids(sample_submission, "sample submission")
        _align(sample_ids, ids, "sample submission", what)
        moved = np.flatnonzero(sample_ids != ids)
        if moved.size:
            row = int(moved[0])
            raise ValueError(
                f"{what}: {PATIENT_ID}: row {row} is patient {ids[row]}, the sample has "
                f"{sample_ids[row]} there ({moved.size} rows differ); keep the sample's order"
            )
    values = {}
    for column in names:
        if column == PATIENT_ID:
            continue
        values[column] = _numeric(_column_values(df, column), column, ids, what)
        _check_values(values[column], column, ids, what, upper=1.0)
    for group, columns in TARGET_GROUPS.items():
        if all(column in values for column in columns):
            _normalised_group(values, group, ids, what)


# --------------------------------------------------------------------------- paper metrics


def _decisions(p: np.ndarray, thresholds: tuple[float, float] | None) -> np.ndarray:
    """Hard classes 0/1/2 from normalised (n, 3) probabilities: argmax when `thresholds` is
    None, else "high" if p_high >= t_high, "low" if p_low >= t_low, "healthy" otherwise."""
    if thresholds is None:
        return np.argmax(p, axis=1)
    t_low, t_high = thresholds
    return np.where(p[:, 2] >= t_high, 2, np.where(p[:, 1] >= t_low, 1, 0))


def _precision_recall(truth: np.ndarray, decided: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, 2) one-vs-rest precision and recall; 0/0 counts as 0 (zero_division=0)."""
    confusion = np.bincount(truth * n_classes + decided, minlength=n_classes * n_classes)
    confusion = confusion.reshape(n_classes, n_classes)
    hits = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros(n_classes), where=actual > 0)
    return np.stack([precision, recall], axis=1)


def _macro_f1(truth: np.ndarray, decided: np.ndarray, n_classes: int) -> float:
    pr = _precision_recall(truth, decided, n_classes)
    denominator = pr.sum(axis=1)
    f1 = np.divide(
        2 * pr[:, 0] * pr[:, 1], denominator, out=np.zeros(n_classes), where=denominator > 0
    )
    return float(f1.mean())


def _check_organs(organs: Sequence[str]) -> tuple[str, ...]:
    organs = tuple(organs)
    wrong = [organ for organ in organs if len(TARGET_GROUPS.get(organ, ())) != 3]
    if wrong or not organs:
        raise ValueError(f"organs must be a non-empty subset of {PAPER_ORGANS}, not {organs}")
    return organs


def organ_metrics(
    labels: Frame,
    predictions: Frame,
    thresholds: Thresholds | None = None,
    organs: Sequence[str] = PAPER_ORGANS,
) -> dict[str, Any]:
    """The 2D-VoCo paper's metrics (Table 1): mAP, macro precision and macro recall over the
    three classes of each organ (3 organs x 3 classes = 9 class columns).

    mAP is the mean over class columns of scikit-learn's `average_precision_score` (one class
    against the rest, scored by its normalised probability); a class with no positive example
    has no AP and is left out of the mean and listed in `skipped`. Precision and recall are
    those of the hard decisions (`thresholds[organ] = (t_low, t_high)`: "high" if
    p_high >= t_high, else "low" if p_low >= t_low, else "healthy"; argmax for an organ that
    is absent or None, and for all when `thresholds` is None), averaged over the same nine
    classes with 0 for a zero division (sklearn's `zero_division=0`), so a class nobody has
    counts as recall 0. The paper reports these x100, thresholds fitted on the training folds.

    Returns:
        {"mAP", "macro_precision", "macro_recall", "macro_f1": floats (fractions, not %);
        "per_class": {column: {"ap", "precision", "recall", "f1", "support"}}; "skipped":
        class columns without a positive example; "thresholds": those used per organ}.
    """
    organs = _check_organs(organs)
    thresholds = dict(thresholds or {})
    y, p = _paired(labels, predictions, organs)
    per_class: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    used = {}
    for organ in organs:
        used[organ] = thresholds.get(organ)
        truth = np.argmax(y[organ], axis=1)
        decided = _decisions(p[organ], used[organ])
        pr = _precision_recall(truth, decided, 3)
        for index, column in enumerate(TARGET_GROUPS[organ]):
            positive = truth == index
            precision, recall = (float(v) for v in pr[index])
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            ap = math.nan
            if positive.any():
                ap = float(average_precision_score(positive, p[organ][:, index]))
            else:
                skipped.append(column)
            per_class[column] = {
                "ap": ap,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": int(positive.sum()),
            }
    aps = [entry["ap"] for entry in per_class.values() if not math.isnan(entry["ap"])]
    return {
        "mAP": float(np.mean(aps)) if aps else math.nan,
        "macro_precision": float(np.mean([entry["precision"] for entry in per_class.values()])),
        "macro_recall": float(np.mean([entry["recall"] for entry in per_class.values()])),
        "macro_f1": float(np.mean([entry["f1"] for entry in per_class.values()])),
        "per_class": per_class,
        "skipped": skipped,
        "thresholds": used,
    }


def fit_thresholds(
    labels: Frame,
    predictions: Frame,
    organs: Sequence[str] = PAPER_ORGANS,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> dict[str, tuple[float, float] | None]:
    """Decision thresholds (t_low, t_high) per organ maximising that organ's macro F1, by grid
    search over `grid` x `grid` (0.05, 0.10, ..., 0.95 each).

    The paper chooses its thresholds by 5-fold cross-validation on the training set: fit on
    the out-of-fold predictions of the training folds and apply them (`organ_metrics(...,
    thresholds=...)`) to the held-out fold, never to the rows they were fitted on, or the
    precision/recall are optimistic. An organ for which every grid point does worse than
    argmax on these rows gets None (keep argmax; `organ_metrics` reads None as argmax), so the
    result is never worse than argmax here. Ties go to the first grid point (smallest t_low,
    then smallest t_high).
    """
    organs = _check_organs(organs)
    grid_values = np.asarray(grid, dtype=np.float64)
    if grid_values.ndim != 1 or grid_values.size == 0:
        raise ValueError("grid must be a non-empty sequence of thresholds")
    y, p = _paired(labels, predictions, organs)
    fitted: dict[str, tuple[float, float] | None] = {}
    for organ in organs:
        truth = np.argmax(y[organ], axis=1)
        best_score = _macro_f1(truth, _decisions(p[organ], None), 3)
        best: tuple[float, float] | None = None
        for t_low in grid_values:
            for t_high in grid_values:
                pair = (float(t_low), float(t_high))
                score = _macro_f1(truth, _decisions(p[organ], pair), 3)
                if score > best_score or (best is None and score == best_score):
                    best_score, best = score, pair
        fitted[organ] = best
    return fitted


def group_auc(labels: Frame, predictions: Frame) -> dict[str, float]:
    """ROC AUC of "injured" for each group and any_injury: the score is 1 - normalised
    p_healthy (any_injury: the max rule of the metric), the truth 1 - normalised healthy label
    > 0.5. NaN where the rows hold a single class (a fold with no injury), never an error.
    """
    y, p = _paired(labels, predictions)
    aucs = {}
    for part in SCORE_PARTS:
        if part == ANY_INJURY:
            truth, score = y[part] > 0.5, p[part]
        else:
            truth, score = 1.0 - y[part][:, 0] > 0.5, 1.0 - p[part][:, 0]
        single = truth.all() or not truth.any()
        aucs[part] = math.nan if single else float(roc_auc_score(truth, score))
    return aucs
