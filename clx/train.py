"""The training loop: fit a task stream with any ContinualTransformation.

The walk, for every task t of the stream:

    train steps (one jitted lax.scan per epoch) -> evidence on a fixed-size sample
    -> rule.consolidate (jitted; may move the params) -> evaluate tasks 0..t+1
    -> save a checkpoint -> t+1

Three parts, each in one place:

- :func:`_programs` builds every jitted program (train steps, evidence,
  consolidation, accuracy) and decides there how members (seeds, a sweep) are
  batched and how arrays are sharded over a mesh;
- :class:`_TaskData` loads, checks and places the stream's arrays (a task's
  training set, the test sets, the evidence sample);
- :func:`_fit` walks the stream.

The trainer knows no method by name: it runs any ContinualTransformation, and hands
each rule what its ``needs`` declare (``clx.core.NEEDS``): layer taps, the batch, a
gradient function for other data; a rule's ``loss`` term is added to the task loss
before the one backward pass. Joint training is a data mode (``cumulative=True``:
task t trains on the union of tasks 0..t), not a rule.

Randomness comes from named PRNG streams of each seed's key (:func:`shuffle_key`,
:func:`evidence_key`, :func:`step_key`), so no two uses of the key can collide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from clx.core import Batch, ContinualTransformation, Evidence, as_continual, check_like_params, check_needs

log = logging.getLogger(__name__)

#: How fit_members batches its members: "vmap" (one vectorised program), "map"
#: (``jax.lax.map``: the members one after another inside one program), "loop" (the
#: one-member programs called once per member: on a CPU as fast as separate runs), or
#: "auto" (loop on a CPU without a mesh, where XLA:CPU runs batched products no faster
#: than one after another; vmap on GPU/TPU, where they fill the device).
MEMBER_AXES = ("auto", "vmap", "map", "loop")
#: ``fit``'s ``evaluate``: which tasks' test sets are scored after task t.
EVALUATE = ("seen", "current")

#: Default size of each task's fixed test subsample for continual evaluation (``fit``'s ``eval_samples``).
EVAL_SAMPLES = 200

#: Train steps per iteration of the epoch's compiled loop (``lax.scan(..., unroll=)``). At batch 10 the loop's
#: own per-iteration cost is a large part of a step on a CPU; unrolling 4 steps cut GPM's plain PMNIST step from
#: 208 to 126 us on 2 CPU cores (benchmarks/projection_overhead.py), bit for bit the same results.
SCAN_UNROLL = 4
# The logit given to outputs outside the seen classes (``seen_classes_only``): exp() of it is 0 in float32.
_MASKED_LOGIT = -1e30


# --- PRNG streams ----------------------------------------------------------------------------------------------------


def shuffle_key(key: jax.Array, task, epoch) -> jax.Array:
    """The key that shuffles task ``task``'s examples in epoch ``epoch`` (ints or traced int32 scalars)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), task), epoch)


def evidence_key(key: jax.Array, task) -> jax.Array:
    """The key that draws task ``task``'s evidence sample."""
    return jax.random.fold_in(jax.random.fold_in(key, 1), task)


def step_key(key: jax.Array, task, epoch, step) -> jax.Array:
    """The key a rule that needs ``"key"`` receives at batch ``step`` of epoch ``epoch`` of task ``task``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), task), epoch), step)


# --- results and options ---------------------------------------------------------------------------------------------


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
      losses: (T, epochs) mean training loss per epoch (the task loss plus the rule's loss terms).
      resumed_from: the checkpoint position ``{'task', 'epoch', 'step'}`` this
        run resumed from, or None if it started from scratch.
      train_accuracy: (T, epochs) float64 online accuracy per epoch: the fraction of the epoch's
        training examples that the params predicted correctly (argmax of the training forward pass)
        just before the step that learned them. ``train_accuracy[:, 0]`` is the plasticity papers'
        average online accuracy of each task (Dohare et al. 2024; Kumar et al. 2023): how well the
        network learns a task it has not seen, as it sees it.
      task_metrics: ``{name: (T,) float64}`` (``(M, T)`` with members), the values of ``fit``'s
        ``task_metrics`` function on each finished task's evidence sample after ``consolidate``
        (e.g. ``clx.metrics.plasticity_metrics``); None without one.
      eval_curves: with ``eval_every_steps`` (continual evaluation), the accuracy of every seen task
        on its fixed test subsample at each evaluation point: ``{"task": (P,) int64`` the task being
        trained, ``"step": (P,) int64`` optimizer steps done in that task (1-based), ``"global_step":
        (P,) int64`` steps done in the run, ``"accuracy": (P, T)`` float64 fractions (``(M, P, T)``
        with members; NaN for tasks not yet trained), ``"task_steps": (T,)`` steps per task,
        ``"every_steps"``, ``"samples"}``; None without continual evaluation. ``clx.metrics.
        continual_metrics`` turns it into min-ACC, WC-ACC and the stability gap.
    """

    accuracy_matrix: np.ndarray
    random_baseline: np.ndarray
    params: Any
    rule_state: Any
    wall_seconds: float
    train_seconds: float
    data_seconds: float
    losses: np.ndarray
    resumed_from: dict | None = None
    train_accuracy: np.ndarray | None = None
    task_metrics: dict[str, np.ndarray] | None = None
    eval_curves: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """Where and how often ``fit`` checkpoints (see ``clx.checkpoint``).

    Attributes:
      directory: the checkpoint directory; if it holds a checkpoint of the same
        run, ``fit`` resumes from it.
      every_steps: also save every this many optimizer steps inside an epoch
        (0: only at task ends). The epoch's scan then runs this many steps
        per jitted call.
      every_tasks: save at the end of every this many tasks (>= 1) and of the
        last; on a long stream of short tasks (hundreds of tasks of a second
        each) a save per task would take most of the run's time. A resumed
        run repeats the tasks after the last save.
      max_to_keep: recent checkpoints kept (>= 2).
      info: JSON-able facts about the run (method, config) added to the
        fingerprint; a checkpoint whose facts differ is refused.
      async_save: write in the background.
    """

    directory: str
    every_steps: int = 0
    every_tasks: int = 1
    max_to_keep: int = 3
    info: dict = dataclasses.field(default_factory=dict)
    async_save: bool = True

    def __post_init__(self):
        _check_count("checkpoint.every_steps", self.every_steps, 0)
        _check_count("checkpoint.every_tasks", self.every_tasks, 1)
        _check_count("checkpoint.max_to_keep", self.max_to_keep, 2)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Everything about a ``fit`` run but the model, params, rule and stream (see ``fit``)."""

    epochs: int
    batch_size: int
    evidence_samples: int = 300
    cumulative: bool = False
    eval_batch_size: int = 1000
    progress: bool = True
    desc: str = ""
    mesh: Any = None
    checkpoint: CheckpointOptions | None = None
    on_save: Callable[[int, dict], None] | None = None
    member_axis: str = "auto"
    scan_unroll: int = SCAN_UNROLL
    evaluate: str = "seen"
    task_metrics: Callable[..., dict] | None = None
    eval_every_steps: int | None = None
    eval_samples: int = EVAL_SAMPLES
    on_task_end: Callable[[int, dict], None] | None = None
    seen_classes_only: bool = False

    def __post_init__(self):
        for name in ("epochs", "batch_size", "evidence_samples", "eval_batch_size", "eval_samples"):
            _check_count(name, getattr(self, name))
        if self.eval_every_steps is not None:
            _check_count("eval_every_steps", self.eval_every_steps, 1)
        if isinstance(self.checkpoint, str):
            object.__setattr__(self, "checkpoint", CheckpointOptions(self.checkpoint))
        check_member_axis(self.member_axis)
        check_evaluate(self.evaluate)
        if self.task_metrics is not None and not callable(self.task_metrics):
            raise TypeError(
                f"task_metrics must be a function (params, x, y, task_id) -> dict of scalars, "
                f"got {type(self.task_metrics).__name__}."
            )
        _check_count("scan_unroll", self.scan_unroll)


def check_seen_classes_only(value, stream, name: str = "seen_classes_only") -> int:
    """Classes per task k for ``seen_classes_only`` on ``stream`` (0 when ``value`` is false).

    Raises:
      ValueError: ``value`` set on a stream that is not class-IL (``name`` says where it came from).
    """
    if not value:
        return 0
    scenario = getattr(stream, "scenario", None)
    if scenario != "class_il":
        raise ValueError(
            f"{name} masks the outputs of classes not seen yet, which needs a class-IL stream "
            f"(kind 'split_class_il' or 'permuted_class_il'); this stream's scenario is {scenario!r}. "
            f"Drop {name}, or use a class-IL stream."
        )
    return stream.num_outputs // stream.num_tasks


def check_member_axis(value, name: str = "member_axis") -> None:
    """Raises ValueError unless ``value`` is one of :data:`MEMBER_AXES` (``name`` says where it came from)."""
    if value not in MEMBER_AXES:
        raise ValueError(f"{name} must be one of {MEMBER_AXES}, got {value!r}.")


def check_evaluate(value, name: str = "evaluate") -> None:
    """Raises ValueError unless ``value`` is one of :data:`EVALUATE` (``name`` says where it came from)."""
    if value not in EVALUATE:
        raise ValueError(
            f"{name} must be one of {EVALUATE}, got {value!r}: 'seen' scores tasks 0..t+1 after task t (the "
            "accuracy matrix), 'current' only tasks t and t+1 (long streams; ACC, BWT and forgetting are then n/a)."
        )


def _check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError naming ``name`` when it is not an integer >= ``minimum``."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and value >= minimum
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


# --- the pure programs -----------------------------------------------------------------------------------------------


def _task_loss(logits, y, weights):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _train_steps_fn(
    model,
    rule_fn: Callable,
    batch_size: int,
    batch_spec=None,
    unroll: int = SCAN_UNROLL,
    eval_every: int = 0,
    epochs: int = 1,
    eval_batch_size: int = 1000,
    active_k: int = 0,
):
    """Pure ``train_steps(hp, params, rule_state, x, y, task_ids, key_data, task, epoch, start[, probe_x, probe_y],
    *, num_steps)``.

    The epoch's order is ``permutation(shuffle_key(key, task, epoch), n)``; the
    call scans batches ``start .. start + num_steps - 1`` of it (the last batch
    padded with zero-weight examples), ``unroll`` steps per iteration of the
    compiled loop. Returns ``(params, rule_state, sum of per-example losses, number of examples predicted
    correctly)``; the prediction is the argmax of the step's own forward pass, before the step's update
    (online accuracy).

    With ``eval_every`` > 0 (continual evaluation) the call also takes ``probe_x`` (T, n, ...) and ``probe_y``
    (T, n), a fixed test subsample of every task, and after each step that ends a multiple of ``eval_every``
    steps of the task (or the task's last step, ``epochs`` epochs) scores the updated params on the subsample of
    every task trained so far (0..task; a ``lax.cond`` inside the scan: no host round trip), returning besides
    ``(num_steps, T)`` float32 accuracies (0 where not evaluated, NaN for tasks after ``task``) and the
    ``(num_steps,)`` bool mask of the steps evaluated.

    With ``active_k`` > 0 (class-IL, ``seen_classes_only``) the task loss and the online prediction of task
    ``task`` use outputs ``0 .. (task + 1) * active_k - 1`` only; ``batch.logits`` stay unmasked for the rule.
    """
    probe_accuracy = _eval_body(model, eval_batch_size) if eval_every else None

    def train_steps(
        hp, params, rule_state, x, y, task_ids, key_data, task, epoch, start, probe_x=None, probe_y=None, *, num_steps
    ):
        rule = rule_fn(hp)
        taps = "taps" in rule.needs

        def loss_fn(params, perturbations, rule_state, b):
            if taps:
                logits, inputs = model.apply_with_taps(params, b.x, b.task_ids, perturbations)
            else:
                logits, inputs = model.apply(params, b.x, b.task_ids), {}
            scored = logits
            if active_k:  # van de Ven's active classes: only the outputs of the classes seen so far
                seen = jnp.arange(logits.shape[-1]) < (jnp.asarray(task, jnp.int32) + 1) * active_k
                scored = jnp.where(seen, logits, _MASKED_LOGIT)
            loss = _task_loss(scored, b.y, b.weights)
            if rule.loss is not None:
                loss = loss + rule.loss(params, rule_state, b.replace(logits=logits), model.apply)
            return loss, (inputs, logits, scored)

        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        extra_fns = {}
        if "grad_fn" in rule.needs:
            extra_fns["grad_fn"] = lambda p, b: jax.grad(
                lambda q: _task_loss(model.apply(q, b.x, b.task_ids), b.y, b.weights)
            )(p)

        n = x.shape[0]
        nb = math.ceil(n / batch_size)
        pad = nb * batch_size - n
        perm = jax.random.permutation(shuffle_key(jax.random.wrap_key_data(key_data), task, epoch), n)
        idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(nb, batch_size)
        w = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)]).reshape(nb, batch_size)
        if num_steps != nb:
            idx = jax.lax.dynamic_slice_in_dim(idx, start, num_steps)
            w = jax.lax.dynamic_slice_in_dim(w, start, num_steps)
        # a full (padded) batch's shapes, also when batch_size > n (one padded batch per epoch)
        shapes = model.tap_shapes(params, x[idx[0]], task_ids[idx[0]]) if taps else {}
        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

        task_id = jnp.asarray(task, jnp.int32)  # the task being trained (batches of a joint run mix tasks)
        wants_key = "key" in rule.needs
        key = jax.random.wrap_key_data(key_data)

        def probe(p, done):
            """Accuracies of ``p`` on every trained task's subsample when ``done`` steps of the task end a period."""
            T = probe_y.shape[0]

            def seen(p):
                def one(j):
                    return jax.lax.cond(
                        j <= task_id,
                        lambda: probe_accuracy(p, probe_x[j], probe_y[j], j, task_id + 1).astype(jnp.float32),
                        lambda: jnp.float32(jnp.nan),
                    )

                return jax.lax.map(one, jnp.arange(T, dtype=jnp.int32))

            due = (done % eval_every == 0) | (done == epochs * nb)
            return jax.lax.cond(due, seen, lambda p: jnp.zeros((T,), jnp.float32), p), due

        def step(carry, batch):
            params, rule_state = carry
            bi, bw, i = batch
            b = Batch(x[bi], y[bi], task_ids[bi], bw)
            if batch_spec is not None:  # data parallel: each device computes its slice of the batch
                b = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, batch_spec), b)
            extra = dict(extra_fns)
            if wants_key:
                extra["key"] = step_key(key, task, epoch, i)
                b = b.replace(key=extra["key"])
            (loss, (inputs, logits, scored)), (grads, deltas) = grad_fn(params, zeros, rule_state, b)
            if rule.loss is not None:
                # The loss term has read the state (a replay draw: a gather from the buffer); tie the state to the
                # gradients so that those reads are done before update writes the state (an insert). Without it
                # XLA copied the whole buffer every step: ER's step grew with its buffer (5,000: 15x fine-tuning).
                rule_state, grads, deltas = jax.lax.optimization_barrier((rule_state, grads, deltas))
            if taps:
                extra.update(layer_inputs=inputs, output_grads=deltas)
            if "batch" in rule.needs:
                extra["batch"] = b.replace(logits=jax.lax.stop_gradient(logits))
            updates, rule_state = rule.update(grads, rule_state, params, task_id=task_id, **extra)
            check_like_params(rule, updates, params)  # at trace time only
            hit = jnp.sum(bw * (jnp.argmax(jax.lax.stop_gradient(scored), axis=-1) == b.y))
            params = optax.apply_updates(params, updates)
            out = (loss * jnp.sum(bw), hit)
            if eval_every:
                out += probe(params, jnp.asarray(epoch, jnp.int32) * nb + i + 1)
            return (params, rule_state), out

        steps = start + jnp.arange(idx.shape[0], dtype=jnp.int32)
        (params, rule_state), outs = jax.lax.scan(
            step, (params, rule_state), (idx, w, steps), unroll=min(unroll, idx.shape[0])
        )
        return params, rule_state, jnp.sum(outs[0]), jnp.sum(outs[1]), *outs[2:]

    return train_steps


def _eval_body(model, eval_batch_size: int, batch_spec=None):
    predict = getattr(model, "predict", None)

    def accuracy(params, x, y, task_id, num_trained):
        n = x.shape[0]
        b = min(eval_batch_size, n)
        nb = math.ceil(n / b)
        pad = nb * b - n
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(nb, b, *x.shape[1:])
        ys = jnp.concatenate([y, jnp.full((pad,), -1, y.dtype)]).reshape(nb, b)
        spec = batch_spec if batch_spec is not None and b % batch_spec.mesh.shape["data"] == 0 else None

        def body(total, batch):
            xb, yb = batch
            if spec is not None:
                xb, yb = jax.lax.with_sharding_constraint(xb, spec), jax.lax.with_sharding_constraint(yb, spec)
            if predict is not None:
                pred = predict(params, xb, task_id, num_trained)
            else:
                pred = jnp.argmax(model.apply(params, xb, task_id), axis=-1)
            return total + jnp.sum(pred == yb), None

        correct, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (xs, ys))
        return correct / n

    return accuracy


def _evidence_body(model, wants_representations: bool):
    def representations(params, x, task_id):
        if not wants_representations:
            return {}
        _, inputs = model.apply_with_taps(params, x, task_id)
        return {k: v.T for k, v in inputs.items()}

    return representations


def _looped(jitted: Callable, in_axes: tuple) -> Callable:
    """A jitted one-member program called once per member (the arguments whose ``in_axes`` entry is 0 are
    sliced along their leading member axis), its outputs stacked along a new leading member axis."""

    def run(*args):
        num = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0)
        outs = [
            jitted(*(jax.tree.map(lambda v: v[i], a) if ax == 0 else a for a, ax in zip(args, in_axes)))
            for i in range(num)
        ]
        return jax.tree.map(lambda *v: jnp.stack(v), *outs)

    return run


def _over_members(f: Callable, in_axes: tuple, how: str) -> Callable:
    """``f`` over a leading member axis of the arguments whose ``in_axes`` entry is 0.

    ``how="vmap"``: ``jax.vmap`` (one vectorised program); ``"map"``:
    ``jax.lax.map`` (the members one after another inside the same program).
    """
    if how == "vmap":
        return jax.vmap(f, in_axes=in_axes)

    def mapped(*args):
        def one(member_args):
            it = iter(member_args)
            return f(*(next(it) if ax == 0 else a for a, ax in zip(args, in_axes)))

        return jax.lax.map(one, tuple(a for a, ax in zip(args, in_axes) if ax == 0))

    return mapped


class _Programs(NamedTuple):
    train_steps: Callable[[int], Callable]  # num_steps -> jitted train_steps
    evidence: Callable
    consolidate: Callable
    accuracy: Callable
    task_metrics: Callable | None


def _programs(
    model, rule_fn: Callable, needs: frozenset, opts: FitOptions, members: str | None, shardings, active_k: int = 0
) -> _Programs:
    """Every jitted program of a run: member batching (``members``: None, "vmap",
    "map" or "loop") and out-shardings under a mesh (``shardings``: None or (params,
    state, replicated, batch spec)) are decided here and nowhere else."""
    p_shard, s_shard, rep, batch_spec = shardings or (None, None, None, None)
    if members == "loop" and shardings is not None:
        raise ValueError("member_axis='loop' runs one member at a time and takes no mesh; use 'vmap' or 'map'.")

    def program(f, in_axes, out_shardings=None, **kw):
        if members == "loop":
            return _looped(jax.jit(f, **kw), in_axes)
        if members is not None:
            f = _over_members(f, in_axes, members)
        return jax.jit(f, **kw) if shardings is None else jax.jit(f, out_shardings=out_shardings, **kw)

    every = int(opts.eval_every_steps or 0)
    steps_body = _train_steps_fn(
        model,
        rule_fn,
        opts.batch_size,
        batch_spec,
        int(opts.scan_unroll),
        every,
        opts.epochs,
        opts.eval_batch_size,
        active_k,
    )

    @functools.cache
    def train_steps(num_steps: int):
        f = functools.partial(steps_body, num_steps=num_steps)
        axes = (0, 0, 0, None, None, None, 0, None, None, None) + ((None, None) if every else ())
        outs = (p_shard, s_shard, rep, rep) + ((rep, rep) if every else ())
        return program(f, axes, outs, donate_argnums=(1, 2))

    evidence = program(_evidence_body(model, "representations" in needs), (0, 0, None), rep)

    def consolidate_body(hp, state, params, task_id, x, y, reps):
        ev = Evidence(task_id, x, y, reps, model.apply, getattr(model, "apply_with_taps", None))
        moves, state = rule_fn(hp).consolidate(state, params, ev)
        return (params if moves is None else optax.apply_updates(params, moves)), state

    consolidate = program(consolidate_body, (0, 0, 0, None, 0, 0, 0), (p_shard, s_shard))
    accuracy = program(_eval_body(model, opts.eval_batch_size, batch_spec), (0, None, None, None, None))
    task_metrics = None
    if opts.task_metrics is not None:
        task_metrics = program(opts.task_metrics, (0, 0, 0, None), rep)
    return _Programs(train_steps, evidence, consolidate, accuracy, task_metrics)


def _check_representations(reps: dict, t: int) -> None:
    """Refuses NaN/inf representations before ``consolidate`` (GPM's subspaces would silently get rank 0):
    one small device-to-host transfer per task."""
    if not reps:
        return
    finite = jax.device_get({k: jnp.isfinite(v).all() for k, v in reps.items()})
    bad = sorted(k for k, ok in finite.items() if not ok)
    if bad:
        raise FloatingPointError(
            f"the representations of task {t}'s evidence sample hold NaN or inf in layers {bad}; the params "
            "diverged (lower train.lr) or the model overflows on these inputs."
        )


def _check_task_ids(model, params, sample_x, num_tasks: int) -> None:
    """Raises if the model refuses the stream's largest task id (``num_tasks - 1``, a concrete constant, so the
    model's own check runs while ``eval_shape`` traces it: no compute). Every task id the trainer hands the
    model inside its jitted programs comes from the stream, in ``0..num_tasks - 1``."""
    last = np.full((1,), num_tasks - 1, np.int32)
    try:
        jax.eval_shape(lambda p, x: model.apply(p, x, last), params, sample_x)
    except ValueError as e:
        raise ValueError(
            f"the stream has {num_tasks} tasks (ids 0..{num_tasks - 1}) but the model refuses task id "
            f"{num_tasks - 1}: {e}"
        ) from e


# --- the data of a run -----------------------------------------------------------------------------------------------


def _check_inputs(name: str, x) -> None:
    """Refuses NaN/inf inputs (on the host, once per array): they would train to a NaN loss or, in a test set,
    silently give a meaningless accuracy, and in the evidence a rank-0 subspace."""
    x = np.asarray(x)
    if not x.size:
        raise ValueError(f"{name}: the set is empty; every task needs training and test examples.")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        raise ValueError(
            f"{name}: {bad.size} of {len(x)} inputs hold NaN or inf (first at index {bad[0]}); clean the data "
            "(clx.data sources are finite)."
        )


def _check_labels(name: str, y: np.ndarray, num_outputs: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_outputs):
        raise ValueError(
            f"{name}: labels span [{y.min()}, {y.max()}] but the model has {num_outputs} outputs per head; "
            "build the model with the stream's num_outputs."
        )


# Placed test sets are kept for reuse while together they take at most this many bytes; beyond it the
# oldest-placed ones are dropped (a 500-task Permuted-MNIST stream has 15.7 GB of test sets).
_TEST_CACHE_BYTES = 1 << 30


class _TaskData:
    """The stream's arrays as the walk needs them: checked, placed, test sets cached.

    ``train(t)`` is task t's training set (the union of tasks 0..t when
    ``cumulative``) with per-example task ids, on the devices; ``test(t)`` the
    test set of task t (cached while all cached sets take at most ``_TEST_CACHE_BYTES``,
    the oldest dropped first; a dropped set is rebuilt, identical, when asked again);
    ``evidence_sample(t, seeds)`` the fixed-size sample of task t's training set for
    each seed. ``seconds`` adds up the time spent building arrays (left out of the
    run's wall time).
    """

    def __init__(self, stream, place: Callable, place_evidence: Callable, cumulative: bool):
        self.stream, self.place, self.place_evidence, self.cumulative = stream, place, place_evidence, cumulative
        self.seconds = 0.0
        self._tests: dict[int, tuple] = {}  # insertion order = placement order (the eviction order)
        self._test_bytes = 0  # of the placed sets in self._tests
        self._task: tuple[int, Any] | None = None
        self._checked: set[int] = set()

    def check_ahead(self) -> None:
        """Checks, before any training, what can be checked cheaply: the stream's source inputs (if it has a
        ``source``) and every task's test set (if it has ``test_set``; the sets are cached for evaluation)."""
        src = getattr(self.stream, "source", None)
        for split in ("x_train", "x_test"):
            if isinstance(getattr(src, split, None), np.ndarray):
                self._timed(_check_inputs, f"the stream's source {split}", getattr(src, split))
        if hasattr(self.stream, "test_set"):
            for t in range(self.stream.num_tasks):
                x, y = self._timed(self._test_arrays, t)
                if self._test_bytes + x.nbytes + y.nbytes <= _TEST_CACHE_BYTES:  # placed now while they fit,
                    self._timed(self._cache_test, t, x, y)  # the others when evaluated

    def _timed(self, fn, *args):
        s = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - s
        return out

    def _load(self, t):
        if self._task is None or self._task[0] != t:
            task = self.stream.task(t)
            if t not in self._checked:  # cumulative runs reload tasks 0..t: check each once
                _check_inputs(f"task {t} train", task.x_train)
                _check_labels(f"task {t} train", task.y_train, self.stream.num_outputs)
                _check_labels(f"task {t} test", task.y_test, self.stream.num_outputs)
                self._checked.add(t)
            self._task = (t, task)
        return self._task[1]

    def train(self, t: int):
        def build():
            tasks = range(t + 1) if self.cumulative else (t,)
            parts = [(self._load(i), i) for i in tasks]
            xs = np.concatenate([p.x_train for p, _ in parts]) if len(parts) > 1 else parts[0][0].x_train
            ys = np.concatenate([p.y_train for p, _ in parts]) if len(parts) > 1 else parts[0][0].y_train
            ids = np.concatenate([np.full(len(p.y_train), i, np.int32) for p, i in parts])
            self._load(t)  # keep task t loaded for its evidence sample
            return self.place(xs), self.place(ys), self.place(ids)

        return self._timed(build)

    def _test_arrays(self, t: int):
        """Task t's test set on the host, checked."""
        if hasattr(self.stream, "test_set"):
            x, y = self.stream.test_set(t)
        else:
            task = self._load(t)
            x, y = task.x_test, task.y_test
        _check_inputs(f"task {t} test", x)
        _check_labels(f"task {t} test", y, self.stream.num_outputs)
        return x, y

    def _cache_test(self, t: int, x, y):
        """Places task t's test set and caches it, dropping the oldest-placed sets beyond the byte budget."""
        placed = self.place(x), self.place(y)
        size = sum(a.nbytes for a in placed)
        while self._tests and self._test_bytes + size > _TEST_CACHE_BYTES:
            self._test_bytes -= sum(a.nbytes for a in self._tests.pop(next(iter(self._tests))))
        self._tests[t] = placed
        self._test_bytes += size
        return placed

    def test(self, t: int):
        if t not in self._tests:
            return self._timed(lambda: self._cache_test(t, *self._test_arrays(t)))
        return self._tests[t]

    def probe(self, samples: int):
        """Every task's fixed test subsample for continual evaluation: ``(x (T, n, ...), y (T, n))``, placed.

        Task t's subsample is the first n of ``numpy.random.default_rng((7, t)).permutation`` of its test set, with
        n = min(``samples``, the smallest test set): the same for every seed, member and method of a run, so their
        curves compare point for point.
        """

        tests = [self.test(t) for t in range(self.stream.num_tasks)]  # timed (and cached) there

        def build():
            xs, ys = [], []
            sets = [tuple(np.asarray(jax.device_get(a)) for a in test) for test in tests]
            n = min(samples, *(len(y) for _, y in sets))
            for t, (x, y) in enumerate(sets):
                pick = np.random.default_rng((7, t)).permutation(len(y))[:n]
                xs.append(x[pick])
                ys.append(y[pick])
            return self.place(np.stack(xs)), self.place(np.stack(ys))

        return self._timed(build)

    def evidence_sample(self, t: int, seeds: Sequence[int], samples: int, members: bool):
        def build():
            task = self._load(t)
            n = len(task.y_train)
            picks = [
                np.asarray(jax.random.permutation(evidence_key(jax.random.key(int(s)), t), n))[: min(samples, n)]
                for s in seeds
            ]
            if members:
                xe, ye = np.stack([task.x_train[i] for i in picks]), np.stack([task.y_train[i] for i in picks])
            else:
                xe, ye = task.x_train[picks[0]], task.y_train[picks[0]]
            return self.place_evidence(xe), self.place(ye)

        return self._timed(build)


# --- the walk --------------------------------------------------------------------------------------------------------


def fit(
    model,
    params,
    rule: ContinualTransformation,
    stream,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    evidence_samples: int = 300,
    cumulative: bool = False,
    eval_batch_size: int = 1000,
    progress: bool = True,
    desc: str = "",
    mesh=None,
    checkpoint: CheckpointOptions | str | None = None,
    on_save: Callable[[int, dict], None] | None = None,
    evaluate: str = "seen",
    task_metrics: Callable[..., dict] | None = None,
    eval_every_steps: int | None = None,
    eval_samples: int = EVAL_SAMPLES,
    on_task_end: Callable[[int, dict], None] | None = None,
    seen_classes_only: bool = False,
) -> FitResult:
    """Trains ``params`` on every task of ``stream`` in order with ``rule``.

    Args:
      model: a ``clx.core.Model`` (``clx.FunctionalModel``, ``clx.HyperModel``, ...);
        ``params`` its params pytree. Rules that declare ``"taps"`` or
        ``"representations"`` need a ``clx.core.TappedModel``.
      rule: any ContinualTransformation (or ``clx.chain`` of them with optax), or a
        plain optax transform (trained as ``clx.chain(rule)``).
      stream: a ``clx.data.TaskStream`` (``task(t)``, ``num_tasks``, ``num_outputs``,
        ``input_shape``; ``test_set(t)`` if it has one).
      epochs, batch_size: per task.
      seed: shuffling and evidence sampling are deterministic functions of it.
      evidence_samples: size of the fixed sample of each finished task that the
        evidence holds (GPM: 300 on Permuted MNIST).
      cumulative: joint training, task t trains on the union of tasks 0..t (the
        upper bound of the accuracy matrix).
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (``clx.sharding.make_mesh``)
        for data-parallel training: each step's batch is split over ``"data"``,
        params are replicated (or split over a ``"model"`` axis when large, see
        ``clx.sharding.param_shardings``), the rule state is replicated, and the
        evidence is gathered to every device before ``consolidate`` (so a
        subspace basis equals the 1-device one up to float rounding). None: the
        default device, exactly as before.
      checkpoint: a ``CheckpointOptions`` (or a directory: task-end checkpoints
        only). If the directory holds a checkpoint of this run, training resumes
        from it and gives the uninterrupted run's results.
      on_save: ``on_save(checkpoint_number, position)`` after each save starts
        (tests use it to kill the process mid-run).
      evaluate: ``"seen"`` (default): after task t, score tasks 0..t+1 (the whole
        accuracy matrix, O(T^2) evaluations); ``"current"``: only tasks t and t+1
        (the diagonal, for learning accuracy, and R[t, t+1] for FWT; O(T)), for the
        long streams of the plasticity papers, where ACC, BWT and forgetting are
        then undefined (their entries stay NaN).
      task_metrics: optional ``task_metrics(params, x, y, task_id) -> {name: scalar}``,
        jit-able (vmapped over members), called on each finished task's evidence
        sample (``evidence_samples`` examples) after ``consolidate``, e.g.
        ``functools.partial(clx.metrics.plasticity_metrics, model)``; the values
        land in ``FitResult.task_metrics`` and in the checkpoints.
      eval_every_steps: continual evaluation (De Lange, van de Ven & Tuytelaars 2023, "Continual
        evaluation for lifelong learning: Identifying the stability gap"): every this many
        optimizer steps of a task, and at its last step, score the params on a fixed subsample
        of the test set of every task trained so far, inside the jitted epoch (``lax.cond`` in
        the scan, no host round trip); the curves land in ``FitResult.eval_curves`` and the
        checkpoints' metadata. None (default): off, the programs are exactly those without it.
      eval_samples: the size n of each task's subsample (the first n of a fixed permutation of
        its test set, the same for every seed; capped by the smallest test set). Memory: the
        subsamples of all T tasks stay on the device, T x n inputs. Cost: each evaluation point
        is a forward pass over n x (tasks seen) inputs; the default 200 at ``eval_every_steps``
        100 added 9.5 % to GPM's Permuted-MNIST training time on 2 CPU cores (1,000: 53 %).
      on_task_end: ``on_task_end(t, info)`` after task t is evaluated and saved, for logs written
        as the run goes (the experiment script's TensorBoard files). ``info`` holds host arrays
        (a leading member axis with ``fit_members``): ``"accuracy"`` (T,) row t of the accuracy
        matrix, ``"losses"`` and ``"train_accuracy"`` (epochs,) of task t, ``"task_metrics"``
        {name: scalar}, ``"eval_curves"`` (task t's continual-evaluation points: ``"global_step"``
        (P_t,), ``"accuracy"`` (P_t, T)) or None, ``"wall_seconds"``; and ``"rule_state"``, the
        rule state on the device (read only what you need).

    Returns:
      A FitResult.

    Raises:
      ValueError: epochs, batch_size, evidence_samples, eval_batch_size or eval_samples
        not an integer >= 1; eval_every_steps neither None nor an integer >= 1; labels outside the
        model's outputs; NaN/inf or empty
        inputs (names the task and split; the source and every test set are
        checked before training, a custom stream's training sets when their
        task starts); a model that refuses the stream's task ids (a multi-head
        model with fewer heads than tasks); a batch size not divisible by the
        mesh's data axis; a rule whose needs the model cannot meet (names the
        rule); seen_classes_only on a stream that is not class-IL; at the first
        step's trace, a rule whose updates are not shaped like the params (names
        the parameter and both shapes).
      TypeError: ``rule`` is neither an optax nor a clx transformation (a plain
        optax transform is wrapped with ``clx.as_continual``).
      clx.checkpoint.CheckpointMismatchError: the checkpoint directory holds a
        checkpoint of a different run (says what differs).
      FloatingPointError: the training loss, or the representations of a
        task's evidence sample, became NaN or infinite (lower the learning
        rate); raised before anything is written.
    """
    opts = FitOptions(
        epochs,
        batch_size,
        evidence_samples,
        cumulative,
        eval_batch_size,
        progress,
        desc,
        mesh,
        checkpoint,
        on_save,
        evaluate=evaluate,
        task_metrics=task_metrics,
        eval_every_steps=eval_every_steps,
        eval_samples=eval_samples,
        on_task_end=on_task_end,
        seen_classes_only=seen_classes_only,
    )
    rule = as_continual(rule, who="fit")
    return _fit(model, [params], lambda hp: rule, None, stream, [seed], opts)


def fit_members(
    model,
    params: Sequence[Any],
    rule_fn: Callable[[jax.Array], ContinualTransformation],
    hparams,
    stream,
    *,
    seeds: Sequence[int],
    member_axis: str = "auto",
    **options,
) -> FitResult:
    """Trains M independent members (seeds x hyperparameter values) with one set of compiled programs.

    Member m starts from ``params[m]``, shuffles and samples evidence with
    ``seeds[m]`` (as ``fit(..., seed=seeds[m])`` would) and uses the rule
    ``rule_fn(hparams[m])``; all members see the same task stream. Every jitted
    program (the epoch scan, evidence, consolidation, evaluation) runs over the
    member axis (vmap, map) or once per member (loop). ``rule_fn`` is called
    with a traced float32 scalar inside jit (build the rule from it, e.g.
    ``clx.gpm(lambda t: hp)`` or ``optax.sgd(hp)``), once per member with a
    concrete value for ``init`` (the first member's rule also gives the run its ``needs``).
    With (M, K) ``hparams`` (a grid of K hyperparameters, e.g. EWC's lambda x the
    learning rate) ``rule_fn`` gets member m's K values: a traced float32 (K,) array
    inside jit, a tuple of K floats outside; index it (``hp[0]``, ``hp[1]``).

    Args:
      params: a sequence of M params pytrees of identical structure and shapes.
      rule_fn: hyperparameter -> ContinualTransformation.
      hparams: (M,) or (M, K) floats (anything, if ``rule_fn`` ignores it).
      seeds: (M,) ints.
      member_axis: "vmap" (one vectorised program: wins on a GPU, 1.88x one seed
        for 8 seeds on an H100), "map" (``jax.lax.map``: the members one after
        another in one program), "loop" (the one-member programs called once
        per member, compiled once; no mesh), or "auto" (loop on a CPU without a
        mesh, where XLA:CPU runs neither vmapped nor lax.map-ed members faster
        than one after another: 8 seeds of GPM's PMNIST step took 13.8x / 11.6x
        one seed vmapped / lax.map-ed against 7.7x one after another on 2 cores;
        vmap elsewhere).
      options: the keyword arguments of ``fit`` (``epochs``, ``batch_size``, ...).

    Returns:
      A FitResult whose arrays have a leading member axis: accuracy_matrix
      (M, T, T), random_baseline (M, T), losses and train_accuracy (M, T, epochs), task_metrics
      {name: (M, T)}; params and rule_state stacked.

    Raises:
      ValueError: as ``fit``; M = 0, params / hparams / seeds of different
        lengths, non-finite hparams or hparams of more than 2 dims, an unknown member_axis,
        scan_unroll < 1.
      TypeError: as ``fit``, for what ``rule_fn`` returns.
    """
    if not len(params) or len(params) != len(seeds) or len(np.atleast_1d(hparams)) != len(seeds):
        raise ValueError(
            f"fit_members needs M >= 1 members with one params pytree, hyperparameter and seed each; "
            f"got {len(params)} params, {len(np.atleast_1d(hparams))} hparams, {len(seeds)} seeds."
        )
    opts = FitOptions(member_axis=member_axis, **options)
    if not np.all(np.isfinite(np.asarray(hparams, np.float64))):
        raise ValueError(f"fit_members: hparams must be finite, got {np.asarray(hparams, np.float64).tolist()}.")
    hparams = np.asarray(hparams, np.float32)
    if hparams.ndim not in (1, 2):
        raise ValueError(f"fit_members: hparams must be (M,) or (M, K), got shape {hparams.shape}.")
    user_fn = rule_fn
    rule_fn = lambda hp: as_continual(user_fn(hp), who="fit_members' rule_fn")  # noqa: E731
    return _fit(model, list(params), rule_fn, hparams, stream, list(seeds), opts)


def _concrete_hparam(h):
    """One member's hyperparameters for ``rule_fn`` outside jit: a float, or a tuple of K floats."""
    return float(h) if np.ndim(h) == 0 else tuple(float(v) for v in h)


def _lapack_single_threaded():
    """On a CPU backend, scipy's OpenBLAS (which jaxlib's LAPACK kernels call: the SVD of GPM's bases and of the
    plasticity metrics, eigh, ...) runs one thread for the duration of a run, the caller's setting restored after.

    Its threads contend with XLA's own for the cores: on 2 cores under load, the SVD of a 300 x 100 feature
    matrix took 164 ms with OpenBLAS's 2 threads against 0.9 ms with one (784 x 300: 34 against 11 ms), and
    a 500-task Permuted-MNIST run spent most of its time there."""
    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    import scipy.linalg  # noqa: F401 -- loads the OpenBLAS that jaxlib's LAPACK calls, so the limit reaches it
    import threadpoolctl

    return threadpoolctl.threadpool_limits(1, user_api="blas")


def _fit(model, params_list, rule_fn, hparams, stream, seeds, opts: FitOptions) -> FitResult:
    with _lapack_single_threaded():
        return _fit_run(model, params_list, rule_fn, hparams, stream, seeds, opts)


def _fit_run(model, params_list, rule_fn, hparams, stream, seeds, opts: FitOptions) -> FitResult:
    from clx import checkpoint as ckpt_lib
    from clx import sharding as shd

    mesh = opts.mesh
    if mesh is not None:
        shd.check_batch_size(opts.batch_size, mesh)
    members = None
    if hparams is not None:
        members = (
            opts.member_axis
            if opts.member_axis != "auto"
            else ("loop" if jax.default_backend() == "cpu" and mesh is None else "vmap")
        )
    M, T = len(seeds), stream.num_tasks
    lead = (M,) if members else ()
    sample_x = jax.ShapeDtypeStruct((1, *stream.input_shape), jnp.float32)
    out_dim = jax.eval_shape(model.apply, params_list[0], sample_x, jnp.zeros((1,), jnp.int32)).shape[-1]
    _check_task_ids(model, params_list[0], sample_x, T)
    if out_dim != stream.num_outputs:
        raise ValueError(f"the model has {out_dim} outputs per head but the stream needs {stream.num_outputs}.")
    rule0 = rule_fn(None if members is None else _concrete_hparam(hparams[0]))
    needs_taps = {"taps", "representations"} & set(rule0.needs)
    check_needs(
        rule0,
        model,
        jax.eval_shape(lambda p: model.tap_shapes(p, sample_x, jnp.zeros((1,), jnp.int32)), params_list[0])
        if needs_taps and hasattr(model, "tap_shapes")
        else None,
    )

    # --- initial state, placed ---
    if members:
        params = jax.tree.map(lambda *a: jnp.stack(a), *params_list)
        state = jax.tree.map(
            lambda *a: jnp.stack(a), *[rule_fn(_concrete_hparam(h)).init(p) for h, p in zip(hparams, params_list)]
        )
        key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])
        hp = np.asarray(hparams, np.float32)
    else:
        params = jax.tree.map(jnp.copy, params_list[0])  # the train steps donate it; the caller's stays usable
        state = rule0.init(params)
        key_data = np.asarray(jax.random.key_data(jax.random.key(int(seeds[0]))))
        hp = np.zeros((), np.float32)
    shardings = None
    place, place_evidence = jnp.asarray, jnp.asarray
    if mesh is not None:
        rep = shd.replicated(mesh)
        p_shard, s_shard = shd.param_shardings(params, mesh), jax.tree.map(lambda _: rep, state)
        shardings = (p_shard, s_shard, rep, shd.batch_sharding(mesh))
        params, state = shd.put_tree(params, p_shard), shd.put_tree(state, s_shard)
        place = lambda a: shd.put(a, rep)  # noqa: E731 -- every host holds the (small) task arrays
        # The evidence sample is split over the data axis when it divides evenly; the representation matrices
        # computed from it are gathered (the evidence program's out_shardings) before consolidate.
        ev_spec = NamedSharding(mesh, P(None, shd.DATA) if members else P(shd.DATA))
        place_evidence = lambda a: shd.put(  # noqa: E731
            a, ev_spec if a.shape[1 if members else 0] % shd.data_size(mesh) == 0 else rep
        )
    key_data, hp = place(key_data), place(hp)
    programs = _programs(
        model, rule_fn, rule0.needs, opts, members, shardings, check_seen_classes_only(opts.seen_classes_only, stream)
    )
    data = _TaskData(stream, place, place_evidence, opts.cumulative)
    data.check_ahead()

    acc = np.full((*lead, T, T), np.nan)
    losses = np.full((*lead, T, opts.epochs), np.nan)
    train_acc = np.full((*lead, T, opts.epochs), np.nan)
    baseline = np.full((*lead, T), np.nan)
    initial = jax.tree.map(jnp.copy, params)  # train steps donate params; b_j needs the untrained ones
    metric_names = ()
    if opts.task_metrics is not None:
        one = jax.tree.map(lambda a: a[0], params) if members else params
        shapes = jax.eval_shape(
            opts.task_metrics,
            one,
            jax.ShapeDtypeStruct((1, *stream.input_shape), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
            jnp.int32(0),
        )
        if not isinstance(shapes, dict) or any(getattr(v, "shape", None) != () for v in shapes.values()):
            raise ValueError(
                "task_metrics must return a dict of scalars {name: float32 ()}, got "
                f"{jax.tree.map(lambda v: getattr(v, 'shape', v), shapes)}."
            )
        metric_names = tuple(sorted(shapes))
    metrics = {k: np.full((*lead, T), np.nan) for k in metric_names}
    every_eval = int(opts.eval_every_steps or 0)
    # continual evaluation: one entry per evaluation point, and the steps each task has (for global steps)
    curves: dict[str, list] = {"task": [], "step": [], "accuracy": [], "task_steps": []}
    probe = data.probe(opts.eval_samples) if every_eval else ()
    loss_partial = np.zeros(lead)
    hits_partial = np.zeros(lead)

    # --- checkpoint / resume ---
    ck = opts.checkpoint
    every = int(ck.every_steps) if ck is not None else 0
    ckpt, pos, resumed_from, prior_wall, prior_train = None, {"task": 0, "epoch": 0, "step": 0}, None, 0.0, 0.0
    if ck is not None:
        fingerprint = {
            "arrays": {"params": ckpt_lib.describe(params), "rule_state": ckpt_lib.describe(state)},
            "num_tasks": T,
            "stream": repr(stream),
            "epochs": opts.epochs,
            "batch_size": opts.batch_size,
            "seeds": [int(s) for s in seeds],
            "members": bool(members),
            "hparams": [float(h) for h in np.ravel(hparams if hparams is not None else np.zeros(1))],
            "evidence_samples": int(opts.evidence_samples),
            "cumulative": bool(opts.cumulative),
            "every_steps": every,
            **({"seen_classes_only": True} if opts.seen_classes_only else {}),
            "info": dict(ck.info),
            **({"eval_every_steps": every_eval, "eval_samples": int(opts.eval_samples)} if every_eval else {}),
        }
        ckpt = ckpt_lib.Checkpointer(ck.directory, fingerprint, max_to_keep=ck.max_to_keep, async_save=ck.async_save)

    def ckpt_tree():
        return {
            "params": params,
            "rule_state": state,
            "key_data": key_data,
            "accuracy_matrix": acc,
            "random_baseline": baseline,
            "losses": losses,
            "loss_partial": loss_partial,
            "train_accuracy": train_acc,
            "hits_partial": hits_partial,
            **({"task_metrics": metrics} if metrics else {}),
        }

    if ckpt is not None:
        restored = ckpt.restore(ckpt_tree())
        if restored is not None:
            tree, meta = restored
            params, state = tree["params"], tree["rule_state"]
            acc, baseline, losses = (
                np.asarray(tree[k], np.float64) for k in ("accuracy_matrix", "random_baseline", "losses")
            )
            loss_partial = np.asarray(tree["loss_partial"], np.float64).reshape(lead)
            train_acc = np.asarray(tree["train_accuracy"], np.float64)
            hits_partial = np.asarray(tree["hits_partial"], np.float64).reshape(lead)
            metrics = {k: np.asarray(v, np.float64) for k, v in tree.get("task_metrics", {}).items()}
            pos = {k: int(meta["position"][k]) for k in ("task", "epoch", "step")}
            if every_eval:
                curves = {k: list(v) for k, v in meta["eval_curves"].items()}
            resumed_from = dict(pos)
            prior_wall, prior_train = float(meta.get("wall_seconds", 0.0)), float(meta.get("train_seconds", 0.0))
            if jax.process_index() == 0:
                print(
                    f"clx: {opts.desc}resuming from {ckpt.directory} at task {pos['task']}, epoch {pos['epoch']}, "
                    f"step {pos['step']}",
                    file=sys.stderr,
                    flush=True,
                )

    t0 = time.perf_counter()
    train_seconds = 0.0

    def host(a):
        return np.asarray(jax.device_get(a), np.float64)

    def save(position):
        if ckpt is None:
            return
        meta = {
            "position": position,
            "wall_seconds": prior_wall + time.perf_counter() - t0 - data.seconds,
            "train_seconds": prior_train + train_seconds,
            **({"eval_curves": curves} if every_eval else {}),
        }
        n = ckpt.save(ckpt_tree(), meta)
        if opts.on_save is not None:
            opts.on_save(n, dict(position))

    def wall():
        return prior_wall + time.perf_counter() - t0 - data.seconds

    try:
        if pos == {"task": 0, "epoch": 0, "step": 0}:
            baseline[..., 0] = host(programs.accuracy(initial, *data.test(0), 0, 0))
        for t in range(pos["task"], T):
            # train steps
            x, y, ids = data.train(t)
            n = int(y.shape[0])
            nb = math.ceil(n / opts.batch_size)
            if every_eval and len(curves["task_steps"]) == t:
                curves["task_steps"].append(opts.epochs * nb)
            first_epoch = pos["epoch"] if t == pos["task"] else 0
            bar = tqdm(
                total=opts.epochs,
                initial=first_epoch,
                desc=f"{opts.desc}task {t + 1}/{T}",
                disable=not opts.progress,
                leave=False,
            )
            for e in range(first_epoch, opts.epochs):
                step = pos["step"] if t == pos["task"] and e == first_epoch else 0
                if step == 0:
                    loss_partial, hits_partial = np.zeros(lead), np.zeros(lead)
                while step < nb:
                    k = nb - step if every == 0 else min(every, nb - step)
                    s = time.perf_counter()
                    params, state, loss_sum, hits, *evals = programs.train_steps(k)(
                        hp, params, state, x, y, ids, key_data, np.int32(t), np.int32(e), np.int32(step), *probe
                    )
                    loss_sum = host(loss_sum)
                    if evals:
                        accs, due = (np.asarray(a) for a in jax.device_get(evals))
                        due = due.reshape(-1, k)[0]  # the same steps for every member
                        for i in np.flatnonzero(due):
                            curves["task"].append(t)
                            curves["step"].append(e * nb + step + int(i) + 1)
                            curves["accuracy"].append(np.asarray(accs[..., i, :], np.float64).tolist())
                    train_seconds += time.perf_counter() - s
                    if not np.all(np.isfinite(loss_sum)):
                        raise FloatingPointError(
                            f"training loss became {loss_sum} in task {t}, epoch {e}; "
                            "lower train.lr or check the inputs."
                        )
                    loss_partial = loss_partial + loss_sum
                    hits_partial = hits_partial + host(hits)
                    step += k
                    if every and not (step == nb and e == opts.epochs - 1):  # the task-end save follows that one
                        save({"task": t, "epoch": e, "step": step})  # step == nb: epoch e done, its loss not stored
                losses[..., t, e] = loss_partial / n
                train_acc[..., t, e] = hits_partial / n
                loss_partial, hits_partial = np.zeros(lead), np.zeros(lead)
                bar.update(1)
                bar.set_postfix(loss=f"{float(np.mean(losses[..., t, e])):.4f}")
            bar.close()
            del x, y, ids

            # evidence -> consolidate
            xe, ye = data.evidence_sample(t, seeds, opts.evidence_samples, bool(members))
            reps = programs.evidence(params, xe, np.int32(t))
            _check_representations(reps, t)
            params, state = programs.consolidate(hp, state, params, np.int32(t), xe, ye, reps)

            if programs.task_metrics is not None:
                values = jax.device_get(programs.task_metrics(params, xe, ye, np.int32(t)))
                for k in metric_names:
                    metrics[k][..., t] = np.asarray(values[k], np.float64)

            # evaluate tasks 0..t+1 (R[t, t+1] and b_{t+1} give forward transfer), or only t and t+1
            if t + 1 < T:
                baseline[..., t + 1] = host(programs.accuracy(initial, *data.test(t + 1), t + 1, 0))
            for j in range(0 if opts.evaluate == "seen" else t, min(t + 2, T)):
                acc[..., t, j] = host(programs.accuracy(params, *data.test(j), j, t + 1))
            log.info(
                "%stask %d/%d done at %.1fs: mean accuracy on tasks 0..%d = %.4f",
                opts.desc,
                t + 1,
                T,
                wall(),
                t,
                float(np.nanmean(acc[..., t, : t + 1])),
            )

            # save
            pos = {"task": t + 1, "epoch": 0, "step": 0}
            if ck is not None and ((t + 1) % ck.every_tasks == 0 or t + 1 == T):
                save(dict(pos))
            if opts.on_task_end is not None:
                opts.on_task_end(t, _task_info(t, acc, losses, train_acc, metrics, curves, state, wall(), members))
    finally:  # a failing run (NaN loss, KeyboardInterrupt) still finishes the saves it started
        if ckpt is not None:
            ckpt.close()
    return FitResult(
        acc,
        baseline,
        params,
        state,
        wall(),
        prior_train + train_seconds,
        data.seconds,
        losses,
        resumed_from,
        train_acc,
        metrics if opts.task_metrics is not None else None,
        _eval_curves(curves, every_eval, int(opts.eval_samples), bool(members)) if every_eval else None,
    )


def _task_info(t, acc, losses, train_acc, metrics, curves, state, wall_seconds, members) -> dict:
    """What ``on_task_end`` receives after task t (see ``fit``)."""
    points = None
    if curves["task"]:
        c = _eval_curves(curves, 0, 0, bool(members))
        sel = c["task"] == t
        points = {"global_step": c["global_step"][sel], "accuracy": c["accuracy"][..., sel, :]}
    return {
        "accuracy": acc[..., t, :],
        "losses": losses[..., t, :],
        "train_accuracy": train_acc[..., t, :],
        "task_metrics": {k: v[..., t] for k, v in metrics.items()},
        "eval_curves": points,
        "rule_state": state,
        "wall_seconds": wall_seconds,
    }


def _eval_curves(curves: dict, every: int, samples: int, members: bool) -> dict:
    """The continual-evaluation lists gathered by ``_fit`` as FitResult.eval_curves' arrays."""
    task = np.asarray(curves["task"], np.int64)
    step = np.asarray(curves["step"], np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(curves["task_steps"], np.int64))])
    acc = np.asarray(curves["accuracy"], np.float64)
    if members and acc.ndim == 3:  # gathered point by point as (M, T): members first
        acc = np.moveaxis(acc, 0, 1)
    return {
        "task": task,
        "step": step,
        "global_step": offsets[task] + step if len(task) else step,
        "accuracy": acc,
        "task_steps": np.asarray(curves["task_steps"], np.int64),
        "every_steps": every,
        "samples": samples,
    }


# --- single programs, for notebooks, tests and benchmarks ------------------------------------------------------------


def make_train_steps_fn(model, rule, batch_size: int, *, member_axis: str | None = None) -> Callable[[int], Callable]:
    """The trainer's own jitted train-steps programs (``fit`` runs exactly these).

    Args:
      model, batch_size: as in ``fit``.
      rule: a ContinualTransformation; with ``member_axis``, a function
        hyperparameter -> rule (as ``fit_members``' ``rule_fn``).
      member_axis: None (one member), "vmap", "map" or "loop" (see ``fit_members``).

    Returns:
      ``programs(num_steps)`` -> jitted ``train_steps(hp, params, rule_state, x, y, task_ids, key_data, task,
      epoch, start) -> (params, rule_state, loss sum)``: ``num_steps`` batches of the epoch's order
      ``permutation(shuffle_key(key, task, epoch), n)`` from batch ``start``; params and rule state donated.
      With ``member_axis``, ``hp`` (M,), ``params``, ``rule_state`` and ``key_data`` (M, 2) carry a leading
      member axis; without, ``hp`` is ignored.

    Raises:
      ValueError: an unknown ``member_axis``; ``batch_size`` not an integer >= 1.
      TypeError: ``rule`` (or what ``rule(hp)`` returns) is not an optax or clx transformation.
    """
    if member_axis not in (None, "vmap", "map", "loop"):
        raise ValueError(f"member_axis must be None, 'vmap', 'map' or 'loop', got {member_axis!r}.")
    _check_count("batch_size", batch_size)
    if member_axis:
        rule_fn = lambda hp: as_continual(rule(hp), who="make_train_steps_fn's rule")  # noqa: E731
    else:
        rule = as_continual(rule, who="make_train_steps_fn")
        rule_fn = lambda hp: rule  # noqa: E731
    needs = rule_fn(0.0).needs
    programs = _programs(model, rule_fn, needs, FitOptions(1, batch_size), member_axis, None).train_steps

    def train_steps(num_steps: int):
        run = programs(num_steps)  # also returns the online-accuracy count, which this public form drops
        return jax.jit(lambda *args: run(*args)[:3], donate_argnums=(1, 2))

    return train_steps


def make_epoch_fn(model, rule: ContinualTransformation, batch_size: int):
    """A jitted ``epoch(params, rule_state, x, y, task_ids, key) -> (params, rule_state, mean_loss)``.

    The trainer's own epoch program (``fit`` runs the same scan) for task 0,
    epoch 0 of ``key``: shuffles the n examples, pads the last batch with
    zero-weight examples (every example is seen once; the loss of a batch is the
    mean over its real examples) and scans the rule's step over the
    ceil(n / batch_size) batches, handing the rule what its ``needs`` declare.
    The params and rule state passed in are donated.

    Shapes: x (n, ...) float32, y (n,) int32, task_ids (n,) int32.

    Raises:
      ValueError: ``batch_size`` is not an integer >= 1.
      TypeError: ``rule`` is not an optax or clx transformation.
    """
    _check_count("batch_size", batch_size)
    rule = as_continual(rule, who="make_epoch_fn")
    body = _train_steps_fn(model, lambda hp: rule, batch_size)

    def epoch(params, rule_state, x, y, task_ids, key):
        n = x.shape[0]
        params, rule_state, total, _ = body(
            None,
            params,
            rule_state,
            x,
            y,
            task_ids,
            jax.random.key_data(key),
            0,
            0,
            0,
            num_steps=math.ceil(n / batch_size),
        )
        return params, rule_state, total / n

    return jax.jit(epoch, donate_argnums=(0, 1))


def make_eval_fn(model, eval_batch_size: int = 1000):
    """A jitted ``accuracy(params, x, y, task_id, num_trained) -> float32 scalar`` over a whole test set.

    Predictions are ``argmax model.apply(params, x, task_id)``, unless the model
    has a ``predict(params, x, task_id, num_trained) -> (batch,) int`` method
    (e.g. a hypernetwork that infers the task for class-IL from the tasks
    trained so far), which is then used instead.

    Raises:
      ValueError: ``eval_batch_size`` is not an integer >= 1.
    """
    _check_count("eval_batch_size", eval_batch_size)
    return jax.jit(_eval_body(model, eval_batch_size))


def make_evidence_fn(model):
    """A jitted ``representations(params, x, task_id) -> {kernel path: (d, n)}`` (a TappedModel's Dense inputs)."""
    return jax.jit(_evidence_body(model, True))
