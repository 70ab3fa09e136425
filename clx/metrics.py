"""Continual-learning metrics computed from an accuracy matrix (numpy only).

The accuracy matrix ``R`` is a ``(T, T)`` float array of fractions in ``[0, 1]``:
``R[i, j]`` is the accuracy on task ``j`` after training through task ``i``. Entries
that were not evaluated are NaN. The clx trainer evaluates, after task ``i``, the seen
tasks ``0..i`` and the next task ``i + 1`` (so ``R[i - 1, i]``, the accuracy on a task
before training on it, exists for forward transfer); the other entries above the
diagonal are NaN.

The plasticity diagnostics at the end of the file (``dormant_fraction`` ...
``plasticity_metrics``) are jax functions of a network's features and params,
jit-able and vmappable; ``clx.train.fit(..., task_metrics=)`` records them at
every task end.

Every accuracy-matrix function validates its input and raises ``ValueError`` with the offending shape or
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
  * De Lange, van de Ven & Tuytelaars, "Continual evaluation for lifelong learning:
    Identifying the stability gap", ICLR 2023 (min-ACC, WC-ACC; ``continual_metrics``).
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
    # continual evaluation (curves over training steps)
    "continual_metrics",
    # plasticity diagnostics (jax, jit-able)
    "dormant_fraction",
    "effective_rank",
    "stable_rank",
    "approximate_rank",
    "weight_norm",
    "gradient_norm",
    "plasticity_metrics",
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


def continual_metrics(accuracy: Any, task: Any) -> dict[str, Any]:
    """min-ACC, WC-ACC and the stability gap from continual-evaluation curves.

    De Lange, van de Ven & Tuytelaars 2023, "Continual evaluation for lifelong learning:
    Identifying the stability gap" (Sec. 3). With e_i the last evaluation point of task i's
    training and a(n, i) the accuracy on task i at point n (0-based tasks, k >= 1):

    * min-ACC_k = 1/k * sum_{i<k} min_{e_i < n <= e_k} a(n, i): the average over the previous
      tasks of the worst accuracy each had after it was learned, up to the end of task k;
    * WC-ACC_k = 1/(k+1) * a(e_k, k) + (1 - 1/(k+1)) * min-ACC_k (WC-ACC_0 = a(e_0, 0)): the
      worst-case accuracy, trading the current task's final accuracy against min-ACC;
    * stability_gap_i = a(e_i, i) - min_{e_i < n <= e_{i+1}} a(n, i): how far task i falls while
      the next task is learned (the paper shows the gap as curves; this per-task drop, in
      accuracy points as fractions, is clx's summary of it). NaN for the last task.

    Args:
      accuracy: ``(P, T)`` fractions, ``accuracy[n, j]`` the accuracy on task j at evaluation
        point n (NaN for tasks not yet trained), as ``FitResult.eval_curves["accuracy"]``.
      task: ``(P,)`` ints, the task trained at each point, non-decreasing, every task 0..K-1
        present (K <= T: a run stopped early gives its first K tasks).

    Returns:
      ``{"min_acc": float (min-ACC of the last task, NaN when K == 1), "wc_acc": float
      (WC-ACC of the last task), "min_acc_per_task": (K,) float64 (NaN at task 0),
      "wc_acc_per_task": (K,), "stability_gap": (K,) (NaN at the last task),
      "stability_gap_mean": float}``.

    Raises:
      ValueError: shapes that do not match, tasks decreasing or with a gap, values outside
        [0, 1] (percent?), or a NaN where a trained task must have been scored.
    """
    a = np.asarray(accuracy, np.float64)
    task = np.asarray(task)
    if a.ndim != 2 or task.shape != (a.shape[0],):
        raise ValueError(
            f"continual_metrics needs accuracy (P, T) and task (P,); got shapes {a.shape} and {task.shape}."
        )
    if not len(task):
        raise ValueError("continual_metrics: no evaluation points; run fit with eval_every_steps >= 1.")
    if (
        not np.issubdtype(task.dtype, np.integer)
        or task[0] != 0
        or np.any(np.diff(task) < 0)
        or np.any(np.diff(task) > 1)
    ):
        raise ValueError(
            "continual_metrics: task must be non-decreasing integers from 0 without gaps (as fit records them); "
            f"got {task.tolist()[:20]}..."
        )
    K = int(task[-1]) + 1
    if K > a.shape[1]:
        raise ValueError(f"continual_metrics: points of task {K - 1} but accuracy has only {a.shape[1]} tasks.")
    if np.any((a < 0) | (a > 1)):
        raise ValueError("continual_metrics: accuracies must be fractions in [0, 1] (not percent).")
    for j in range(K):
        if np.isnan(a[task >= j, j]).any():
            raise ValueError(f"continual_metrics: task {j} is missing a score at a point after it was trained.")
    end = np.array([np.flatnonzero(task == i)[-1] for i in range(K)])

    def worst(i, k):  # min of a(n, i) over e_i < n <= e_k
        return float(np.min(a[end[i] + 1 : end[k] + 1, i]))

    min_acc = np.full(K, np.nan)
    wc_acc = np.full(K, np.nan)
    gap = np.full(K, np.nan)
    for k in range(K):
        final = a[end[k], k]
        if k == 0:
            wc_acc[k] = final
        else:
            min_acc[k] = np.mean([worst(i, k) for i in range(k)])
            wc_acc[k] = final / (k + 1) + (1 - 1 / (k + 1)) * min_acc[k]
        if k + 1 < K:
            gap[k] = final - worst(k, k + 1)
    return {
        "min_acc": float(min_acc[-1]),
        "wc_acc": float(wc_acc[-1]),
        "min_acc_per_task": min_acc,
        "wc_acc_per_task": wc_acc,
        "stability_gap": gap,
        "stability_gap_mean": float(np.nanmean(gap)) if K > 1 else math.nan,
    }


# ---------------------------------------------------------------------------------------
# Plasticity diagnostics (jax; jit-able, vmappable, no host round trips)
# ---------------------------------------------------------------------------------------
#
# References:
#   * Sokar, Agarwal, Castro & Evci, "The Dormant Neuron Phenomenon in Deep Reinforcement
#     Learning", ICML 2023 (ReDo's tau-dormant score, Def. 3.1).
#   * Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
#   * Rudelson & Vershynin 2007 (stable rank ||A||_F^2 / ||A||_2^2).
#   * Kumar, Agarwal, Ghosh & Levine, "Implicit Under-Parameterization ...", ICLR 2021 (srank_delta),
#     the "stable rank" of Dohare et al., "Loss of plasticity in deep continual learning", Nature 2024.

_EPS = 1e-9  # ReDo's official code divides by (layer mean + 1e-9); also guards 0/0 in the ranks below


def _as_features(features, who: str):
    import jax.numpy as jnp

    f = jnp.asarray(features)
    if f.ndim != 2:
        raise ValueError(f"{who}: features must be a 2-D (num_examples, num_units) array, got shape {f.shape}.")
    return f.astype(jnp.float32)


def dormant_fraction(features, tau: float = 0.0):
    """The fraction of a layer's units that are tau-dormant (ReDo, Sokar et al. 2023, Def. 3.1).

    Unit i's score is ``s_i = E_x|h_i(x)| / ((1/H) sum_k E_x|h_k(x)|)`` (its mean absolute
    activation over the examples, over the layer's mean of the same); it is dormant when
    ``s_i <= tau``. As the official code (``google/dopamine`` ``labs/redo``), the layer mean
    gets ``+ 1e-9``, so a layer of all-zero units is all dormant for every tau >= 0.

    Args:
      features: ``(N, H)`` float, the layer's post-activation features on N examples.
      tau: ``>= 0`` (the official code's default 0.0 counts only exactly silent units; the
        paper's text uses 0.025 / 0.1). May be a traced scalar.

    Returns:
      float32 scalar in [0, 1].

    Raises:
      ValueError: features not 2-D; a concrete negative tau.
    """
    import jax.numpy as jnp

    from clx.plasticity import dormant_scores  # the score ReDo recycles by (one copy)

    f = _as_features(features, "dormant_fraction")
    if isinstance(tau, (int, float)) and not tau >= 0:
        raise ValueError(f"dormant_fraction: tau must be >= 0, got {tau!r}; use 0.0 (exactly dead units) or 0.025.")
    return jnp.mean((dormant_scores(f) <= tau).astype(jnp.float32))


def _singular_values(features, who):
    import jax.numpy as jnp

    return jnp.linalg.svd(_as_features(features, who), compute_uv=False)


def effective_rank(features):
    """Effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p_k = s_k / sum_j s_j``, H the entropy.

    ``s`` are the singular values of the ``(N, H)`` feature matrix (0 log 0 = 0). A rank-1
    matrix gives 1, a matrix with ``d`` equal nonzero singular values gives ``d``; the
    all-zero matrix gives 1 (by the 1e-9 guard). Same as ``compute_effective_rank`` of the
    loss-of-plasticity code (Dohare et al. 2024, ``lop/utils/miscellaneous.py``).

    Returns: float32 scalar in [1, min(N, H)]. Raises: ValueError if features are not 2-D.
    """
    import jax.numpy as jnp

    s = _singular_values(features, "effective_rank")
    p = s / (jnp.sum(s) + _EPS)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(h)


def stable_rank(features):
    """Stable rank ``sum_k s_k^2 / max_k s_k^2 = ||F||_F^2 / ||F||_2^2`` of the ``(N, H)`` features.

    Note: the loss-of-plasticity code and Dohare et al. (2024) call "stable rank" a different
    quantity, Kumar et al. (2021)'s ``srank_0.01``: the smallest k whose top-k singular values
    hold 99 % of their sum; that one is :func:`approximate_rank`.

    Returns: float32 scalar in [1, min(N, H)] (0 for the zero matrix). Raises: ValueError if not 2-D.
    """
    import jax.numpy as jnp

    s = _singular_values(features, "stable_rank")
    return jnp.sum(s**2) / (jnp.max(s) ** 2 + _EPS)


def approximate_rank(features, prop: float = 0.99):
    """The loss-of-plasticity code's "stable rank" (``compute_approximate_rank``; Kumar et al. 2021's
    srank_delta with delta = 1 - prop): the smallest k with ``sum_{i<=k} s_i >= prop * sum_i s_i``
    (s sorted descending). Returns an int32 scalar. Raises: ValueError if features are not 2-D."""
    import jax.numpy as jnp

    s = _singular_values(features, "approximate_rank")  # descending
    c = jnp.cumsum(s) / (jnp.sum(s) + _EPS)
    return jnp.sum(c < prop).astype(jnp.int32) + 1


def weight_norm(params):
    """The global L2 norm ``sqrt(sum over every leaf of sum(w^2))`` of a params pytree (float32 scalar)."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree.leaves(params)
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(a, jnp.float32))) for a in leaves))


def gradient_norm(grads):
    """The global L2 norm of a gradient pytree (as ``optax.global_norm``; float32 scalar)."""
    return weight_norm(grads)


def plasticity_metrics(model, params, x, y, task_id, *, tau: float = 0.0) -> dict:
    """Every plasticity diagnostic of a network on one sample, as a flat dict of float32 scalars.

    The hidden features of layer l are the inputs of layer l + 1, read from
    ``model.apply_with_taps`` (a ``clx.core.TappedModel``: ``clx.FunctionalModel``); the first
    tapped layer's input (the data) is skipped, and so is every tap with more rows than
    examples (a Conv layer's im2col patches are not per-unit features). Keys:

    - ``"dormant_fraction/<layer>"``, ``"effective_rank/<layer>"``, ``"stable_rank/<layer>"``
      for each hidden layer, named by the params path of the layer that produces the
      features (``layers/0`` for the input of ``layers/1/kernel``);
    - ``"dormant_fraction"``: over all hidden units of the network together (ReDo's count);
      ``"effective_rank"``, ``"stable_rank"``: the mean over the hidden layers;
    - ``"weight_norm"``; ``"gradient_norm"``: of the mean cross-entropy of ``(x, y)``;
    - ``"accuracy"``: on ``(x, y)``.

    Args:
      model: a TappedModel; params its params.
      x: ``(N, ...)`` float32 inputs, y: ``(N,)`` int labels, task_id: int scalar or (N,).
      tau: ReDo's dormancy threshold (>= 0).

    Jit-able (``jax.jit(functools.partial(plasticity_metrics, model))``) and vmappable over params.

    Raises:
      ValueError: the model has no ``apply_with_taps`` (names the fix); a negative tau.
    """
    import jax
    import jax.numpy as jnp
    import optax

    if not hasattr(model, "apply_with_taps"):
        raise ValueError(
            f"plasticity_metrics needs a model with layer taps (clx.core.TappedModel: apply_with_taps), got "
            f"{type(model).__name__}; build it with clx.FunctionalModel."
        )
    if isinstance(tau, (int, float)) and not tau >= 0:
        raise ValueError(f"plasticity_metrics: tau must be >= 0, got {tau!r}.")
    logits, inputs = model.apply_with_taps(params, x, task_id)
    n = x.shape[0]
    keys = list(inputs)
    out, hidden = {}, []
    for prev, key in zip(keys[:-1], keys[1:]):
        f = inputs[key]
        if f.shape[0] != n:  # a Conv's patches
            continue
        name = prev[: -len("/kernel")] if prev.endswith("/kernel") else prev
        out[f"dormant_fraction/{name}"] = dormant_fraction(f, tau)
        out[f"effective_rank/{name}"] = effective_rank(f)
        out[f"stable_rank/{name}"] = stable_rank(f)
        hidden.append(f)
    if hidden:
        from clx.plasticity import dormant_scores

        mean_abs = jnp.concatenate([dormant_scores(f) for f in hidden])
        out["dormant_fraction"] = jnp.mean((mean_abs <= tau).astype(jnp.float32))
        out["effective_rank"] = jnp.mean(jnp.stack([out[k] for k in out if k.startswith("effective_rank/")]))
        out["stable_rank"] = jnp.mean(jnp.stack([out[k] for k in out if k.startswith("stable_rank/")]))
    out["weight_norm"] = weight_norm(params)

    def loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x, task_id), y))

    out["gradient_norm"] = gradient_norm(jax.grad(loss)(params))
    out["accuracy"] = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return out
