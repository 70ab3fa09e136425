"""The training loop: fit a task stream with any ContinualTransformation.

Per task t: one jit-compiled call per epoch scans over all mini-batches on the
device (so batch size 10 is not bound by Python dispatch); at the task's end the
trainer gathers the evidence once (the inputs of every Dense layer on a fixed-size
sample of task t), calls the jitted ``rule.consolidate``, evaluates tasks 0..t+1
and fills row t of the accuracy matrix (R[t, t+1] is kept for forward transfer).

The trainer knows no method by name: it runs any ContinualTransformation. Joint
training is a data mode (``cumulative=True``: task t trains on the union of tasks
0..t), not a rule.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from clx.core import ContinualTransformation, Evidence
from clx.functional import FunctionalModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns.

    Attributes:
      accuracy_matrix: (T, T) float64 fractions; R[i, j] = accuracy on task j
        after training through task i; NaN where not evaluated (j > i + 1).
      random_baseline: (T,) accuracies of the initial (untrained) params, the b_j of FWT.
      params, rule_state: the final params and rule state.
      wall_seconds: the whole task loop (training, evidence, consolidation,
        evaluation, compilation), data preparation excluded.
      train_seconds: the part spent in the jitted epochs.
      data_seconds: building the tasks' arrays (excluded from wall_seconds).
      losses: (T, epochs) mean training loss per epoch.
    """

    accuracy_matrix: np.ndarray
    random_baseline: np.ndarray
    params: Any
    rule_state: Any
    wall_seconds: float
    train_seconds: float
    data_seconds: float
    losses: np.ndarray


def _loss_and_taps(model: FunctionalModel, factored: bool):
    def loss_fn(params, perturbations, xb, yb, wb, tb):
        logits, inputs = model.apply_recording(params, xb, tb, perturbations if factored else None)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return jnp.sum(ce * wb) / jnp.maximum(jnp.sum(wb), 1.0), inputs

    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)


def make_epoch_fn(model: FunctionalModel, rule: ContinualTransformation, batch_size: int, factored_grads: bool = True):
    """A jitted ``epoch(params, rule_state, x, y, task_ids, key) -> (params, rule_state, mean_loss)``.

    Shuffles the n examples with ``key``, pads the last batch with zero-weight
    examples (every example is seen once; the loss of a batch is the mean over
    its real examples) and scans ``rule.update`` + ``optax.apply_updates`` over
    the ceil(n / batch_size) batches. The rule receives ``task_id`` (int32
    scalar, the task of the batch's first example) as an extra. With ``factored_grads`` the rule receives
    ``layer_inputs`` (N, d) and ``output_grads`` (N, m) per Dense kernel; use it
    only when the loss depends on Dense kernels through the layers alone.

    Shapes: x (n, ...) float32, y (n,) int32, task_ids (n,) int32.
    """
    grad_fn = _loss_and_taps(model, factored_grads)

    def epoch(params, rule_state, x, y, task_ids, key):
        n = x.shape[0]
        nb = math.ceil(n / batch_size)
        pad = nb * batch_size - n
        perm = jax.random.permutation(key, n)
        idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(nb, batch_size)
        w = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)]).reshape(nb, batch_size)
        shapes = model.dense_output_shapes(params, x[:batch_size], task_ids[:batch_size]) if factored_grads else {}
        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

        def step(carry, batch):
            params, rule_state = carry
            bi, bw = batch
            (loss, inputs), (grads, deltas) = grad_fn(params, zeros, x[bi], y[bi], bw, task_ids[bi])
            extra = {"layer_inputs": inputs, "output_grads": deltas} if factored_grads else {}
            updates, rule_state = rule.update(grads, rule_state, params, task_id=task_ids[bi[0]], **extra)
            return (optax.apply_updates(params, updates), rule_state), loss * jnp.sum(bw)

        (params, rule_state), losses = jax.lax.scan(step, (params, rule_state), (idx, w))
        return params, rule_state, jnp.sum(losses) / n

    return jax.jit(epoch, donate_argnums=(0, 1))


def make_eval_fn(model: FunctionalModel, eval_batch_size: int = 1000):
    """A jitted ``accuracy(params, x, y, task_id, num_trained) -> float32 scalar`` over a whole test set.

    Predictions are ``argmax model.apply(params, x, task_id)``, unless the model
    has a ``predict(params, x, task_id, num_trained) -> (batch,) int`` method
    (e.g. a hypernetwork that infers the task for class-IL from the tasks
    trained so far), which is then used instead.
    """
    predict = getattr(model, "predict", None)

    def accuracy(params, x, y, task_id, num_trained):
        n = x.shape[0]
        b = min(eval_batch_size, n)
        nb = math.ceil(n / b)
        pad = nb * b - n
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(nb, b, *x.shape[1:])
        ys = jnp.concatenate([y, jnp.full((pad,), -1, y.dtype)]).reshape(nb, b)

        def body(total, batch):
            xb, yb = batch
            if predict is not None:
                pred = predict(params, xb, task_id, num_trained)
            else:
                pred = jnp.argmax(model.apply(params, xb, task_id), axis=-1)
            return total + jnp.sum(pred == yb), None

        correct, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (xs, ys))
        return correct / n

    return jax.jit(accuracy)


def make_evidence_fn(model: FunctionalModel):
    """A jitted ``representations(params, x, task_id) -> {kernel path: (d, n)}``."""

    def representations(params, x, task_id):
        _, inputs = model.apply_recording(params, x, task_id)
        return {k: v.T for k, v in inputs.items()}

    return jax.jit(representations)


def _check_labels(name: str, y: np.ndarray, num_outputs: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_outputs):
        raise ValueError(
            f"{name}: labels span [{y.min()}, {y.max()}] but the model has {num_outputs} outputs per head; "
            "build the model with the stream's num_outputs."
        )


def fit(
    model: FunctionalModel,
    params,
    rule: ContinualTransformation,
    stream,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    evidence_samples: int = 300,
    cumulative: bool = False,
    factored_grads: bool = True,
    eval_batch_size: int = 1000,
    progress: bool = True,
    desc: str = "",
) -> FitResult:
    """Trains ``params`` on every task of ``stream`` in order with ``rule``.

    Args:
      model: the pure model; ``params`` its params pytree.
      rule: any ContinualTransformation (or ``clx.chain`` of them with optax).
      stream: a ``clx.data.TaskStream`` (``task(t)``, ``num_tasks``, ``num_outputs``,
        ``num_heads``).
      epochs, batch_size: per task.
      seed: shuffling and evidence sampling are deterministic functions of it.
      evidence_samples: size of the fixed sample of each finished task on which
        the Dense layers' inputs are recorded (GPM: 300 on Permuted MNIST).
      cumulative: joint training, task t trains on the union of tasks 0..t (the
        upper bound of the accuracy matrix).
      factored_grads: pass Dense layers' inputs and output gradients to the rule.

    Returns:
      A FitResult.

    Raises:
      ValueError: bad epochs/batch size, labels outside the model's outputs.
      FloatingPointError: the training loss became NaN or infinite (lower the
        learning rate); raised before anything is written.
    """
    if int(epochs) < 1 or int(batch_size) < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}.")
    num_tasks = stream.num_tasks
    epoch_fn = make_epoch_fn(model, rule, int(batch_size), factored_grads)
    eval_fn = make_eval_fn(model, eval_batch_size)
    evidence_fn = make_evidence_fn(model)
    consolidate = jax.jit(rule.consolidate)
    key = jax.random.key(seed)

    data_seconds = 0.0
    t0 = time.perf_counter()
    tests = []
    train_sets: list[tuple[np.ndarray, np.ndarray]] = []  # cumulative (joint) mode only

    def get_task(t):
        nonlocal data_seconds
        s = time.perf_counter()
        task = stream.task(t)
        _check_labels(f"task {t} train", task.y_train, stream.num_outputs)
        _check_labels(f"task {t} test", task.y_test, stream.num_outputs)
        if len(tests) == t:
            tests.append((jnp.asarray(task.x_test), jnp.asarray(task.y_test)))
        data_seconds += time.perf_counter() - s
        return task

    out_dim = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((1, *stream.input_shape), jnp.float32),
                             jnp.zeros((1,), jnp.int32)).shape[-1]
    if out_dim != stream.num_outputs:
        raise ValueError(f"the model has {out_dim} outputs per head but the stream needs {stream.num_outputs}.")

    acc = np.full((num_tasks, num_tasks), np.nan)
    losses = np.full((num_tasks, int(epochs)), np.nan)
    baseline = np.full(num_tasks, np.nan)
    initial = jax.tree.map(jnp.copy, params)  # epochs donate params; b_j needs the untrained ones
    state = rule.init(params)
    train_seconds = 0.0
    task = get_task(0)
    baseline[0] = float(eval_fn(initial, *tests[0], 0, 0))
    for t in range(num_tasks):
        if cumulative:
            train_sets.append((task.x_train, task.y_train))
            xs = np.concatenate([a for a, _ in train_sets])
            ys = np.concatenate([b for _, b in train_sets])
            ids = np.concatenate([np.full(len(b), i, np.int32) for i, (_, b) in enumerate(train_sets)])
        else:
            xs, ys, ids = task.x_train, task.y_train, np.full(len(task.y_train), t, np.int32)
        x, y, ids = jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(ids)
        bar = tqdm(total=int(epochs), desc=f"{desc}task {t + 1}/{num_tasks}", disable=not progress, leave=False)
        for e in range(int(epochs)):
            s = time.perf_counter()
            params, state, loss = epoch_fn(params, state, x, y, ids, jax.random.fold_in(key, t * 1000 + e))
            loss = float(loss)
            train_seconds += time.perf_counter() - s
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} in task {t}, epoch {e}; lower train.lr or check the inputs."
                )
            losses[t, e] = loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        del x, y, ids

        # Evidence on a fixed-size sample of the finished task, then consolidation.
        n = len(task.y_train)
        sample = np.asarray(jax.random.permutation(jax.random.fold_in(key, 10**6 + t), n))[: min(evidence_samples, n)]
        xe = jnp.asarray(task.x_train[sample])
        reps = evidence_fn(params, xe, jnp.int32(t))
        evidence = Evidence(jnp.int32(t), xe, jnp.asarray(task.y_train[sample]), reps, model.apply)
        state = consolidate(state, params, evidence)

        if t + 1 < num_tasks:
            task = get_task(t + 1)
            baseline[t + 1] = float(eval_fn(initial, *tests[t + 1], t + 1, 0))
        for j in range(min(t + 2, num_tasks)):
            acc[t, j] = float(eval_fn(params, *tests[j], j, t + 1))
        log.info("%stask %d/%d done at %.1fs: mean accuracy on tasks 0..%d = %.4f", desc, t + 1, num_tasks,
                 time.perf_counter() - t0 - data_seconds, t, float(np.mean(acc[t, : t + 1])))
    wall = time.perf_counter() - t0 - data_seconds
    return FitResult(acc, baseline, params, state, wall, train_seconds, data_seconds, losses)
