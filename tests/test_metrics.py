"""Tests for clx.metrics: hand-computed values, edge cases, validation, properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clx import metrics

nan = math.nan

# Trainer layout: after task i, tasks 0..i and i+1 are evaluated; R[0, 2] was not.
R3 = [
    [0.90, 0.10, nan],
    [0.80, 0.95, 0.20],
    [0.70, 0.85, 0.99],
]
B3 = [0.10, 0.12, 0.09]

# By hand:
# acc        = (0.70 + 0.85 + 0.99) / 3                    = 2.54 / 3 = 0.846666...
# bwt        = ((0.70 - 0.90) + (0.85 - 0.95)) / 2         = (-0.20 - 0.10) / 2 = -0.15
# fwt        = ((R[0,1] - b1) + (R[1,2] - b2)) / 2
#            = ((0.10 - 0.12) + (0.20 - 0.09)) / 2         = (-0.02 + 0.11) / 2 = 0.045
# forgetting: f0 = max(0.90, 0.80) - 0.70 = 0.20; f1 = max(0.95) - 0.85 = 0.10
#            = (0.20 + 0.10) / 2                           = 0.15
# learning   = (0.90 + 0.95 + 0.99) / 3                    = 2.84 / 3 = 0.946666...
EXPECTED3 = {
    "acc": 2.54 / 3,
    "bwt": -0.15,
    "fwt": 0.045,
    "forgetting": 0.15,
    "learning_accuracy": 2.84 / 3,
}


def test_each_metric_on_hand_computed_matrix():
    assert metrics.acc(R3) == pytest.approx(0.8466666666666667, abs=1e-12)
    assert metrics.bwt(R3) == pytest.approx(-0.15, abs=1e-12)
    assert metrics.fwt(R3, B3) == pytest.approx(0.045, abs=1e-12)
    assert metrics.forgetting(R3) == pytest.approx(0.15, abs=1e-12)
    assert metrics.learning_accuracy(R3) == pytest.approx(0.9466666666666667, abs=1e-12)


def test_summarize_matches_hand_computed_values_and_returns_python_floats():
    out = metrics.summarize(np.array(R3), np.array(B3))
    assert set(out) == set(EXPECTED3)
    for key, want in EXPECTED3.items():
        assert type(out[key]) is float, key
        assert out[key] == pytest.approx(want, abs=1e-12), key


def test_summarize_without_baseline_gives_nan_fwt_only():
    out = metrics.summarize(R3)
    assert math.isnan(out["fwt"])
    for key in ("acc", "bwt", "forgetting", "learning_accuracy"):
        assert out[key] == pytest.approx(EXPECTED3[key], abs=1e-12)


def test_single_task():
    R = [[0.8]]
    assert metrics.acc(R) == pytest.approx(0.8)
    assert metrics.learning_accuracy(R) == pytest.approx(0.8)
    assert math.isnan(metrics.bwt(R))
    assert math.isnan(metrics.fwt(R, [0.1]))
    assert math.isnan(metrics.forgetting(R))
    out = metrics.summarize(R, [0.1])
    assert out["acc"] == pytest.approx(0.8)
    assert out["learning_accuracy"] == pytest.approx(0.8)
    assert all(math.isnan(out[k]) for k in ("bwt", "fwt", "forgetting"))


def test_forgetting_ignores_the_pre_training_superdiagonal_entry():
    # R[0, 1] = 0.9 is the accuracy on task 1 *before* training on it: not forgettable.
    # f0 = 0.5 - 0.5 = 0; f1 = max(R[1, 1]) - R[2, 1] = 0.6 - 0.6 = 0 (not 0.9 - 0.6).
    R = [
        [0.5, 0.9, nan],
        [0.5, 0.6, 0.3],
        [0.5, 0.6, 0.8],
    ]
    assert metrics.forgetting(R) == pytest.approx(0.0, abs=1e-12)


def test_forgetting_ignores_skipped_evaluations():
    # R[1, 0] and R[2, 1] were not evaluated.
    # f0 = max(0.9, nan, 0.95) - 0.6 = 0.35; f1 = max(0.8, nan) - 0.7 = 0.1;
    # f2 = max(0.9) - 0.85 = 0.05;  mean = (0.35 + 0.1 + 0.05) / 3 = 0.5 / 3.
    R = [
        [0.90, 0.20, nan, nan],
        [nan, 0.80, 0.30, nan],
        [0.95, nan, 0.90, 0.25],
        [0.60, 0.70, 0.85, 0.97],
    ]
    assert metrics.forgetting(R) == pytest.approx(0.5 / 3, abs=1e-12)


def test_forgetting_can_be_negative_when_final_accuracy_is_best():
    # f0 = 0.5 - 0.7 = -0.2 (backward transfer improved task 0).
    assert metrics.forgetting([[0.5, 0.1], [0.7, 0.9]]) == pytest.approx(-0.2)


def test_forgetting_rejects_task_never_evaluated_before_the_end():
    R = [
        [0.9, 0.1, nan],
        [0.8, nan, 0.2],
        [0.7, 0.8, 0.9],
    ]
    with pytest.raises(ValueError, match=r"task 1 .*R\[1:2, 1\] is all NaN"):
        metrics.forgetting(R)


# ---------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "bad, shape",
    [
        (np.zeros((2, 3)), r"\(2, 3\)"),
        (np.zeros(3), r"\(3,\)"),
        (np.zeros((2, 2, 2)), r"\(2, 2, 2\)"),
        (np.zeros((0, 0)), r"\(0, 0\)"),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        metrics.acc,
        metrics.bwt,
        metrics.forgetting,
        metrics.learning_accuracy,
        metrics.summarize,
        lambda R: metrics.fwt(R, [0.1, 0.1]),
    ],
)
def test_non_square_matrix_raises_with_shape(fn, bad, shape):
    with pytest.raises(ValueError, match=shape):
        fn(bad)


def test_nan_in_last_row_raises_naming_the_entry():
    R = np.array(R3)
    R[2, 1] = nan
    for fn in (metrics.acc, metrics.bwt, metrics.forgetting, metrics.summarize):
        with pytest.raises(ValueError, match=r"R\[2, 1\] is NaN"):
            fn(R)


def test_nan_on_diagonal_raises_naming_the_entry():
    R = np.array(R3)
    R[1, 1] = nan
    for fn in (metrics.bwt, metrics.learning_accuracy):
        with pytest.raises(ValueError, match=r"R\[1, 1\] is NaN"):
            fn(R)


def test_nan_superdiagonal_raises_for_fwt_naming_the_entry():
    R = np.array(R3)
    R[1, 2] = nan
    with pytest.raises(ValueError, match=r"R\[1, 2\] is NaN.*fwt"):
        metrics.fwt(R, B3)
    # The other metrics do not need that entry.
    assert metrics.acc(R) == pytest.approx(EXPECTED3["acc"])
    assert math.isnan(metrics.summarize(R)["fwt"])


@pytest.mark.parametrize("value", [95.0, 1.0001, -0.01, math.inf])
def test_values_outside_unit_interval_raise(value):
    R = np.array(R3)
    R[1, 0] = value
    with pytest.raises(ValueError, match=r"fractions, not percent.*R\[1, 0\]"):
        metrics.summarize(R)


def test_percent_matrix_raises():
    with pytest.raises(ValueError, match="fractions, not percent"):
        metrics.acc(100 * np.array(R3))


def test_baseline_validation():
    with pytest.raises(ValueError, match=r"shape \(T,\) = \(3,\).*got shape \(2,\)"):
        metrics.fwt(R3, [0.1, 0.1])
    with pytest.raises(ValueError, match=r"shape \(T,\) = \(3,\).*got shape \(1, 3\)"):
        metrics.summarize(R3, [B3])
    with pytest.raises(ValueError, match=r"fractions, not percent.*b\[2\]"):
        metrics.fwt(R3, [0.1, 0.12, 9.0])
    with pytest.raises(ValueError, match=r"b\[1\] is NaN"):
        metrics.fwt(R3, [0.1, nan, 0.09])
    # b[0] is never used, so it may be missing.
    assert metrics.fwt(R3, [nan, 0.12, 0.09]) == pytest.approx(0.045)


# ---------------------------------------------------------------------------------------
# properties

_frac = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def _trainer_matrix(draw, no_forgetting):
    """A (T, T) matrix in the trainer's layout: lower triangle, diagonal, superdiagonal.

    With ``no_forgetting`` every column stays at its diagonal value from the diagonal down;
    otherwise only the last row equals the diagonal and the rows between are arbitrary.
    """
    T = draw(st.integers(min_value=1, max_value=6))
    diag = draw(st.lists(_frac, min_size=T, max_size=T))
    R = np.full((T, T), nan)
    for j in range(T):
        R[j, j] = diag[j]
        if j + 1 < T:
            R[j, j + 1] = draw(_frac)
        for i in range(j + 1, T):
            R[i, j] = diag[j] if (no_forgetting or i == T - 1) else draw(_frac)
    return R


@settings(max_examples=60, deadline=None)
@given(_trainer_matrix(no_forgetting=True))
def test_no_forgetting_gives_zero_bwt_and_forgetting(R):
    T = R.shape[0]
    out = metrics.summarize(R)
    assert out["acc"] == out["learning_accuracy"]
    if T == 1:
        assert math.isnan(out["bwt"]) and math.isnan(out["forgetting"])
    else:
        assert out["bwt"] == 0.0
        assert out["forgetting"] == 0.0


@settings(max_examples=60, deadline=None)
@given(_trainer_matrix(no_forgetting=False))
def test_last_row_equal_to_diagonal_gives_zero_bwt_and_acc_equal_learning_accuracy(R):
    T = R.shape[0]
    assert metrics.acc(R) == metrics.learning_accuracy(R)
    if T > 1:
        assert metrics.bwt(R) == 0.0
        # The max in f_j includes i = j, whose value equals the final accuracy.
        assert metrics.forgetting(R) >= 0.0


@settings(max_examples=60, deadline=None)
@given(_trainer_matrix(no_forgetting=False), st.data())
def test_forgetting_bounds_backward_transfer(R, data):
    # Perturb the last row; since the max in f_j includes R[j, j], forgetting >= -bwt.
    T = R.shape[0]
    R[T - 1, :] = data.draw(st.lists(_frac, min_size=T, max_size=T))
    if T > 1:
        assert metrics.forgetting(R) >= -metrics.bwt(R) - 1e-12
