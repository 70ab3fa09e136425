"""Continual-learning metrics computed from an accuracy matrix (numpy only).

The accuracy matrix ``R`` is a ``(T, T)`` float array of fractions in ``[0, 1]``:
``R[i, j]`` is the accuracy on task ``j`` after training through task ``i``. Entries
that were not evaluated are NaN. The clx trainer evaluates, after task ``i``, the seen
tasks ``0..i`` and the next task ``i + 1`` (so ``R[i - 1, i]``, the accuracy on a task
before training on it, exists for forward transfer); the other entries above the
diagonal are NaN.

Every function validates its input and raises ``ValueError`` with the offending shape or
entry: ``R`` must be square and 2-D, hold fractions (not percent), and have every entry
its formula needs. Results are python floats.

References:
  * Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
    (ACC, BWT, FWT).
  * Chaudhry, Dokania, Ajanthan & Torr, "Riemannian Walk for Incremental Learning:
    Understanding Forgetting and Intransigence", ECCV 2018 (forgetting measure).
  * Riemer, Cases, Ajemian, Liu, Rish, Tu & Tesauro, "Learning to Learn without
    Forgetting by Maximizing Transfer and Minimizing Interference", ICLR 2019
    (learning accuracy).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "acc",
    "bwt",
    "fwt",
    "forgetting",
    "learning_accuracy",
    "summarize",
]

# ---------------------------------------------------------------------------------------
# validation helpers


def _as_matrix(R: Any) -> np.ndarray:
    """Returns R as a float64 ``(T, T)`` array of fractions, or raises ValueError."""
    try:
        arr = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"accuracy matrix R must be a (T, T) array of floats: {e}") from e
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"accuracy matrix R must be a non-empty square 2-D (T, T) array; got shape {arr.shape}")
    bad = ~np.isnan(arr) & ((arr < 0.0) | (arr > 1.0))
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise ValueError(
            f"accuracy matrix entries must lie in [0, 1] (accuracies are fractions, not "
            f"percent); got R[{i}, {j}] = {float(arr[i, j])!r}"
            + (" — divide by 100?" if 1.0 < arr[i, j] <= 100.0 else "")
        )
    return arr


def _require(R: np.ndarray, entries, why: str) -> None:
    """Raises ValueError naming the first NaN among ``entries`` (iterable of (i, j))."""
    for i, j in entries:
        if np.isnan(R[i, j]):
            raise ValueError(f"accuracy matrix entry R[{i}, {j}] is NaN (not evaluated) but {why} needs it")


def _require_last_row(R: np.ndarray, why: str) -> None:
    T = R.shape[0]
    _require(R, ((T - 1, j) for j in range(T)), why)


def _require_diagonal(R: np.ndarray, why: str) -> None:
    _require(R, ((j, j) for j in range(R.shape[0])), why)


def _as_baseline(b: Any, T: int) -> np.ndarray:
    try:
        arr = np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"baseline accuracies b must be a (T,) array of floats: {e}") from e
    if arr.shape != (T,):
        raise ValueError(f"baseline accuracies b must have shape (T,) = ({T},) to match R; got shape {arr.shape}")
    bad = ~np.isnan(arr) & ((arr < 0.0) | (arr > 1.0))
    if bad.any():
        j = int(np.argwhere(bad)[0, 0])
        raise ValueError(
            f"baseline accuracies must lie in [0, 1] (accuracies are fractions, not "
            f"percent); got b[{j}] = {float(arr[j])!r}"
        )
    # b[0] is never used (FWT starts at task 1), so only b[1:] must be present.
    for j in range(1, T):
        if np.isnan(arr[j]):
            raise ValueError(f"baseline accuracy b[{j}] is NaN but fwt needs it")
    return arr


# ---------------------------------------------------------------------------------------
# metrics


def acc(R: Any) -> float:
    """Average accuracy after the last task.

    ``ACC = (1/T) * sum_{j=0}^{T-1} R[T-1, j]``

    (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning",
    "average accuracy".)

    Args:
        R: ``(T, T)`` accuracy matrix, fractions in ``[0, 1]``, NaN where not evaluated.

    Returns:
        ACC as a python float in ``[0, 1]``.

    Raises:
        ValueError: if ``R`` is not a non-empty square 2-D array, has a value outside
            ``[0, 1]``, or has a NaN in its last row.
    """
    R = _as_matrix(R)
    _require_last_row(R, "acc")
    return float(np.mean(R[-1, :]))


def bwt(R: Any) -> float:
    """Backward transfer: how training later tasks changed accuracy on earlier ones.

    ``BWT = (1/(T-1)) * sum_{j=0}^{T-2} (R[T-1, j] - R[j, j])``

    Negative values mean forgetting. (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory
    for Continual Learning".)

    Args:
        R: ``(T, T)`` accuracy matrix, fractions in ``[0, 1]``, NaN where not evaluated.

    Returns:
        BWT as a python float in ``[-1, 1]``; NaN when ``T == 1`` (no earlier task).

    Raises:
        ValueError: if ``R`` is not a non-empty square 2-D array, has a value outside
            ``[0, 1]``, or has a NaN in its last row or on its diagonal.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    _require_last_row(R, "bwt")
    _require_diagonal(R, "bwt")
    if T == 1:
        return math.nan
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def fwt(R: Any, b: Any) -> float:
    """Forward transfer: accuracy on a task before training on it, above chance.

    ``FWT = (1/(T-1)) * sum_{j=1}^{T-1} (R[j-1, j] - b[j])``

    (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning".)

    Args:
        R: ``(T, T)`` accuracy matrix, fractions in ``[0, 1]``, NaN where not evaluated;
            the superdiagonal ``R[j-1, j]`` must be present.
        b: ``(T,)`` accuracies of the randomly initialised model on each task (fractions);
            ``b[0]`` is not used and may be NaN.

    Returns:
        FWT as a python float in ``[-1, 1]``; NaN when ``T == 1``.

    Raises:
        ValueError: if ``R`` is malformed (see ``acc``), a superdiagonal entry
            ``R[j-1, j]`` is NaN, or ``b`` has the wrong shape, a value outside ``[0, 1]``,
            or a NaN in ``b[1:]``.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    b = _as_baseline(b, T)
    _require(R, ((j - 1, j) for j in range(1, T)), "fwt")
    if T == 1:
        return math.nan
    return float(np.mean(np.diag(R, k=1) - b[1:]))


def forgetting(R: Any) -> float:
    """Average forgetting: the drop from each task's best accuracy to its final one.

    ``f_j = max_{j <= i < T-1} R[i, j] - R[T-1, j]`` and
    ``F = (1/(T-1)) * sum_{j=0}^{T-2} f_j``

    (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", the forgetting
    measure.) The maximum runs over the rows after task ``j`` was trained (``i >= j``):
    the entry ``R[j-1, j]`` that the trainer records for forward transfer is the accuracy
    before training on task ``j``, not knowledge that can be forgotten. NaN entries in
    ``R[j:T-1, j]`` (skipped evaluations) are ignored.

    Args:
        R: ``(T, T)`` accuracy matrix, fractions in ``[0, 1]``, NaN where not evaluated.

    Returns:
        Forgetting as a python float in ``[-1, 1]`` (usually ``>= 0``; negative only if a
        task's final accuracy beats every earlier evaluation); NaN when ``T == 1``.

    Raises:
        ValueError: if ``R`` is malformed (see ``acc``), has a NaN in its last row, or a
            task ``j < T-1`` has no evaluation at all in rows ``j..T-2``.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    _require_last_row(R, "forgetting")
    if T == 1:
        return math.nan
    fs = []
    for j in range(T - 1):
        col = R[j : T - 1, j]
        if np.isnan(col).all():
            raise ValueError(
                f"forgetting needs at least one evaluation of task {j} before the last task, "
                f"but R[{j}:{T - 1}, {j}] is all NaN"
            )
        fs.append(np.nanmax(col) - R[T - 1, j])
    return float(np.mean(fs))


def learning_accuracy(R: Any) -> float:
    """Learning accuracy: mean accuracy on each task right after training on it.

    ``LA = (1/T) * sum_{j=0}^{T-1} R[j, j]``

    (Riemer et al. 2019, "Learning to Learn without Forgetting by Maximizing Transfer and
    Minimizing Interference".)

    Args:
        R: ``(T, T)`` accuracy matrix, fractions in ``[0, 1]``, NaN where not evaluated.

    Returns:
        Learning accuracy as a python float in ``[0, 1]``.

    Raises:
        ValueError: if ``R`` is malformed (see ``acc``) or has a NaN on its diagonal.
    """
    R = _as_matrix(R)
    _require_diagonal(R, "learning_accuracy")
    return float(np.mean(np.diag(R)))


def summarize(R: Any, b: Any = None) -> dict[str, float]:
    """All metrics of an accuracy matrix in one dict.

    Args:
        R: ``(T, T)`` accuracy matrix, fractions in ``[0, 1]``, NaN where not evaluated.
        b: optional ``(T,)`` accuracies of the randomly initialised model (for FWT).

    Returns:
        ``{"acc", "bwt", "fwt", "forgetting", "learning_accuracy"}`` -> python float.
        ``bwt``, ``fwt`` and ``forgetting`` are NaN when ``T == 1``; ``fwt`` is NaN when
        ``b`` is None.

    Raises:
        ValueError: as the individual metrics do (missing required entries, values outside
            ``[0, 1]``, malformed shapes).
    """
    R = _as_matrix(R)
    return {
        "acc": acc(R),
        "bwt": bwt(R),
        "fwt": math.nan if b is None else fwt(R, b),
        "forgetting": forgetting(R),
        "learning_accuracy": learning_accuracy(R),
    }
