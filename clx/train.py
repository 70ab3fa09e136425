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
import functools
import logging
import math
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
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
      resumed_from: the checkpoint position ``{'task', 'epoch', 'step'}`` this
        run resumed from, or None if it started from scratch.
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


def _loss_and_taps(model: FunctionalModel, factored: bool):
    def loss_fn(params, perturbations, xb, yb, wb, tb):
        logits, inputs = model.apply_recording(params, xb, tb, perturbations if factored else None)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return jnp.sum(ce * wb) / jnp.maximum(jnp.sum(wb), 1.0), inputs

    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)


def make_epoch_fn(model: FunctionalModel, rule: ContinualTransformation, batch_size: int, factored_grads: bool = True):
    """A jitted ``epoch(params, rule_state, x, y, task_ids, key) -> (params, rule_state, mean_loss)``.

    The trainer's own epoch program (``fit`` runs the same scan): shuffles the n
    examples with ``fold_in(key, 0)``, pads the last batch with zero-weight
    examples (every example is seen once; the loss of a batch is the mean over
    its real examples) and scans ``rule.update`` + ``optax.apply_updates`` over
    the ceil(n / batch_size) batches. The rule receives ``task_id`` (int32
    scalar, the task of the batch's first example) as an extra. With
    ``factored_grads`` the rule also receives ``layer_inputs`` (N, d) and
    ``output_grads`` (N, m) per Dense kernel; use it only when the loss depends
    on Dense kernels through the layers alone. The params and rule state passed
    in are donated.

    Shapes: x (n, ...) float32, y (n,) int32, task_ids (n,) int32.
    """
    chunk = _chunk_fn(model, lambda hp: rule, batch_size, factored_grads)

    def epoch(params, rule_state, x, y, task_ids, key):
        n = x.shape[0]
        params, rule_state, total = chunk(None, params, rule_state, x, y, task_ids, jax.random.key_data(key), 0, 0,
                                          num_steps=math.ceil(n / batch_size))
        return params, rule_state, total / n

    return jax.jit(epoch, donate_argnums=(0, 1))


def make_eval_fn(model: FunctionalModel, eval_batch_size: int = 1000):
    """A jitted ``accuracy(params, x, y, task_id, num_trained) -> float32 scalar`` over a whole test set.

    Predictions are ``argmax model.apply(params, x, task_id)``, unless the model
    has a ``predict(params, x, task_id, num_trained) -> (batch,) int`` method
    (e.g. a hypernetwork that infers the task for class-IL from the tasks
    trained so far), which is then used instead.
    """
    return jax.jit(_eval_body(model, eval_batch_size))


def _evidence_body(model):
    def representations(params, x, task_id):
        _, inputs = model.apply_recording(params, x, task_id)
        return {k: v.T for k, v in inputs.items()}

    return representations


def make_evidence_fn(model: FunctionalModel):
    """A jitted ``representations(params, x, task_id) -> {kernel path: (d, n)}``."""
    return jax.jit(_evidence_body(model))


def _check_labels(name: str, y: np.ndarray, num_outputs: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_outputs):
        raise ValueError(
            f"{name}: labels span [{y.min()}, {y.max()}] but the model has {num_outputs} outputs per head; "
            "build the model with the stream's num_outputs."
        )


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """Where and how often ``fit`` checkpoints (see ``clx.checkpoint``).

    Attributes:
      directory: the checkpoint directory; if it holds a checkpoint of the same
        run, ``fit`` resumes from it.
      every_steps: also save every this many optimizer steps inside an epoch
        (0: only at each task end). The epoch's scan then runs in chunks of this
        many steps (one jitted call per chunk).
      max_to_keep: recent checkpoints kept (>= 2).
      info: JSON-able facts about the run (method, config) added to the
        fingerprint; a checkpoint whose facts differ is refused.
      async_save: write in the background.
    """

    directory: str
    every_steps: int = 0
    max_to_keep: int = 3
    info: dict = dataclasses.field(default_factory=dict)
    async_save: bool = True


def _chunk_fn(model, rule_fn: Callable, batch_size: int, factored_grads: bool, batch_spec=None):
    """Pure ``chunk(hp, params, rule_state, x, y, task_ids, key_data, fold, start, *, num_steps)``.

    The epoch's shuffle is ``permutation(fold_in(wrap_key_data(key_data), fold), n)``
    (the same as ``make_epoch_fn`` with key ``fold_in(key, fold)``); the chunk
    scans batches ``start .. start + num_steps - 1`` of it. Returns
    ``(params, rule_state, sum of per-example losses)``.
    """
    grad_fn = _loss_and_taps(model, factored_grads)

    def chunk(hp, params, rule_state, x, y, task_ids, key_data, fold, start, *, num_steps):
        rule = rule_fn(hp)
        n = x.shape[0]
        nb = math.ceil(n / batch_size)
        pad = nb * batch_size - n
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), fold)
        perm = jax.random.permutation(key, n)
        idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(nb, batch_size)
        w = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)]).reshape(nb, batch_size)
        if num_steps != nb:
            idx = jax.lax.dynamic_slice_in_dim(idx, start, num_steps)
            w = jax.lax.dynamic_slice_in_dim(w, start, num_steps)
        shapes = model.dense_output_shapes(params, x[:batch_size], task_ids[:batch_size]) if factored_grads else {}
        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

        def step(carry, batch):
            params, rule_state = carry
            bi, bw = batch
            xb, yb, tb = x[bi], y[bi], task_ids[bi]
            if batch_spec is not None:  # data parallel: each device computes its slice of the batch
                xb, yb, tb, bw = (jax.lax.with_sharding_constraint(a, batch_spec) for a in (xb, yb, tb, bw))
            (loss, inputs), (grads, deltas) = grad_fn(params, zeros, xb, yb, bw, tb)
            extra = {"layer_inputs": inputs, "output_grads": deltas} if factored_grads else {}
            updates, rule_state = rule.update(grads, rule_state, params, task_id=task_ids[bi[0]], **extra)
            return (optax.apply_updates(params, updates), rule_state), loss * jnp.sum(bw)

        (params, rule_state), losses = jax.lax.scan(step, (params, rule_state), (idx, w))
        return params, rule_state, jnp.sum(losses)

    return chunk


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
    mesh=None,
    checkpoint: CheckpointOptions | str | None = None,
    on_save: Callable[[int, dict], None] | None = None,
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

    Returns:
      A FitResult.

    Raises:
      ValueError: bad epochs/batch size, labels outside the model's outputs, a
        batch size not divisible by the mesh's data axis.
      clx.checkpoint.CheckpointMismatchError: the checkpoint directory holds a
        checkpoint of a different run (says what differs).
      FloatingPointError: the training loss became NaN or infinite (lower the
        learning rate); raised before anything is written.
    """
    return _fit(model, [params], lambda hp: rule, None, stream, seeds=[seed], members=False, epochs=epochs,
                batch_size=batch_size, evidence_samples=evidence_samples, cumulative=cumulative,
                factored_grads=factored_grads, eval_batch_size=eval_batch_size, progress=progress, desc=desc,
                mesh=mesh, checkpoint=checkpoint, on_save=on_save)


def fit_members(
    model,
    params: Sequence[Any],
    rule_fn: Callable[[jax.Array], ContinualTransformation],
    hparams,
    stream,
    *,
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    evidence_samples: int = 300,
    cumulative: bool = False,
    factored_grads: bool = True,
    eval_batch_size: int = 1000,
    progress: bool = True,
    desc: str = "",
    mesh=None,
    checkpoint: CheckpointOptions | str | None = None,
    on_save: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Trains M independent members (seeds x hyperparameter values) as one vmapped program.

    Member m starts from ``params[m]``, shuffles and samples evidence with
    ``seeds[m]`` (as ``fit(..., seed=seeds[m])`` would) and uses the rule
    ``rule_fn(hparams[m])``; all members see the same task stream. Every
    jitted function (the epoch scan, evidence, consolidation, evaluation) is
    ``jax.vmap``-ed over the member axis, so M members cost one dispatch per
    epoch. ``rule_fn`` is called with a traced float32 scalar inside jit (build
    the rule from it, e.g. ``clx.gpm(lambda t: hp)`` or ``optax.sgd(hp)``) and
    once per member with a concrete value for ``init``.

    Args:
      params: a sequence of M params pytrees of identical structure and shapes.
      rule_fn: hyperparameter -> ContinualTransformation.
      hparams: (M,) floats (anything, if ``rule_fn`` ignores it).
      seeds: (M,) ints.
      other arguments: as in ``fit``.

    Returns:
      A FitResult whose arrays have a leading member axis: accuracy_matrix
      (M, T, T), random_baseline (M, T), losses (M, T, epochs); params and
      rule_state stacked.

    Raises:
      ValueError: as ``fit``; M = 0, or params / hparams / seeds of different lengths.
    """
    if not len(params) or len(params) != len(seeds) or len(np.atleast_1d(hparams)) != len(seeds):
        raise ValueError(f"fit_members needs M >= 1 members with one params pytree, hyperparameter and seed each; "
                         f"got {len(params)} params, {len(np.atleast_1d(hparams))} hparams, {len(seeds)} seeds.")
    return _fit(model, list(params), rule_fn, np.asarray(hparams, np.float32).reshape(-1), stream, seeds=list(seeds),
                members=True, epochs=epochs, batch_size=batch_size, evidence_samples=evidence_samples,
                cumulative=cumulative, factored_grads=factored_grads, eval_batch_size=eval_batch_size,
                progress=progress, desc=desc, mesh=mesh, checkpoint=checkpoint, on_save=on_save)


def _fit(model, params_list, rule_fn, hparams, stream, *, seeds, members, epochs, batch_size, evidence_samples,
         cumulative, factored_grads, eval_batch_size, progress, desc, mesh, checkpoint, on_save) -> FitResult:
    from clx import checkpoint as ckpt_lib
    from clx import sharding as shd

    if int(epochs) < 1 or int(batch_size) < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}.")
    epochs, batch_size = int(epochs), int(batch_size)
    if isinstance(checkpoint, str):
        checkpoint = CheckpointOptions(checkpoint)
    if checkpoint is not None and int(checkpoint.every_steps) < 0:
        raise ValueError(f"checkpoint.every_steps must be >= 0 (0: task ends only), got {checkpoint.every_steps}.")
    if mesh is not None:
        shd.check_batch_size(batch_size, mesh)
    num_tasks = stream.num_tasks
    M = len(seeds)
    if hparams is None:
        hparams = np.zeros((M,), np.float32)

    out_dim = jax.eval_shape(model.apply, params_list[0], jax.ShapeDtypeStruct((1, *stream.input_shape), jnp.float32),
                             jnp.zeros((1,), jnp.int32)).shape[-1]
    if out_dim != stream.num_outputs:
        raise ValueError(f"the model has {out_dim} outputs per head but the stream needs {stream.num_outputs}.")

    # --- placement -------------------------------------------------------------------------------------------------
    if members:
        params = jax.tree.map(lambda *a: jnp.stack(a), *params_list)
        state = jax.tree.map(lambda *a: jnp.stack(a), *[rule_fn(float(h)).init(p) for h, p in zip(hparams, params_list)])
        key_data = np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])
        hp = np.asarray(hparams, np.float32)
    else:
        params = params_list[0]
        state = rule_fn(None).init(params)
        key_data = np.asarray(jax.random.key_data(jax.random.key(int(seeds[0]))))
        hp = np.zeros((), np.float32)
    if mesh is not None:
        rep = shd.replicated(mesh)
        batch_spec = shd.batch_sharding(mesh)
        p_shard = shd.param_shardings(params, mesh)
        s_shard = jax.tree.map(lambda _: rep, state)
        params, state = shd.put_tree(params, p_shard), shd.put_tree(state, s_shard)
        place = lambda a: shd.put(a, rep)  # noqa: E731 -- every host holds the (small) task arrays
        ev_spec = NamedSharding(mesh, P(None, shd.DATA) if members else P(shd.DATA))
        # The evidence sample is split over the data axis when it divides evenly; the representation matrices
        # computed from it are gathered (evidence_fn's out_shardings) before consolidate.
        place_evidence = lambda a: shd.put(  # noqa: E731
            a, ev_spec if a.shape[1 if members else 0] % shd.data_size(mesh) == 0 else rep)
    else:
        rep = batch_spec = p_shard = s_shard = None
        place = jnp.asarray
        place_evidence = jnp.asarray
    key_data = place(key_data)
    hp = place(hp)

    # --- jitted programs ---------------------------------------------------------------------------------------------
    chunk = _chunk_fn(model, rule_fn, batch_size, factored_grads, batch_spec)
    chunk_in_axes = (0, 0, 0, None, None, None, 0, None, None)
    chunk_cache: dict[int, Callable] = {}

    def chunk_fn(num_steps):
        if num_steps not in chunk_cache:
            f = functools.partial(chunk, num_steps=num_steps)
            if members:
                f = jax.vmap(f, in_axes=chunk_in_axes)
            kw = {} if mesh is None else {"out_shardings": (p_shard, s_shard, rep)}
            chunk_cache[num_steps] = jax.jit(f, donate_argnums=(1, 2), **kw)
        return chunk_cache[num_steps]

    eval_body = _eval_body(model, eval_batch_size, batch_spec)
    if members:
        eval_body = jax.vmap(eval_body, in_axes=(0, None, None, None, None))
    eval_fn = jax.jit(eval_body)

    evidence_body = _evidence_body(model)
    if members:
        evidence_body = jax.vmap(evidence_body, in_axes=(0, 0, None))
    # Under a mesh the representation matrices are gathered to every device (out_shardings=replicated), so the
    # SVD inside consolidate sees the whole (d, n) matrix, as on one device.
    evidence_fn = jax.jit(evidence_body, **({} if mesh is None else {"out_shardings": rep}))

    def consolidate_body(hp, state, params, task_id, x, y, reps):
        return rule_fn(hp).consolidate(state, params, Evidence(task_id, x, y, reps, model.apply))

    if members:
        consolidate_body = jax.vmap(consolidate_body, in_axes=(0, 0, 0, None, 0, 0, 0))
    consolidate = jax.jit(consolidate_body, **({} if mesh is None else {"out_shardings": s_shard}))

    # --- data ----------------------------------------------------------------------------------------------------------
    data_seconds = 0.0
    tests: dict[int, tuple] = {}
    train_sets: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # cumulative (joint) mode only

    def get_task(t):
        nonlocal data_seconds
        s = time.perf_counter()
        task = stream.task(t)
        _check_labels(f"task {t} train", task.y_train, stream.num_outputs)
        _check_labels(f"task {t} test", task.y_test, stream.num_outputs)
        if t not in tests:
            tests[t] = (place(task.x_test), place(task.y_test))
        if cumulative:
            train_sets[t] = (task.x_train, task.y_train)
        data_seconds += time.perf_counter() - s
        return task

    def host(a):
        return np.asarray(jax.device_get(a), np.float64)

    lead = (M,) if members else ()
    acc = np.full((*lead, num_tasks, num_tasks), np.nan)
    losses = np.full((*lead, num_tasks, epochs), np.nan)
    baseline = np.full((*lead, num_tasks), np.nan)
    initial = jax.tree.map(jnp.copy, params)  # epochs donate params; b_j needs the untrained ones

    # --- checkpoint / resume ---------------------------------------------------------------------------------------------
    every = int(checkpoint.every_steps) if checkpoint is not None else 0
    ckpt = None
    pos = {"task": 0, "epoch": 0, "step": 0}
    resumed_from = None
    loss_partial = np.zeros(lead)
    prior_wall = prior_train = 0.0
    if checkpoint is not None:
        fingerprint = {
            "arrays": {"params": ckpt_lib.describe(params), "rule_state": ckpt_lib.describe(state)},
            "num_tasks": num_tasks, "stream": repr(stream), "epochs": epochs, "batch_size": batch_size,
            "seeds": [int(s) for s in seeds], "members": bool(members), "hparams": [float(h) for h in np.atleast_1d(hparams)],
            "evidence_samples": int(evidence_samples), "cumulative": bool(cumulative), "every_steps": every,
            "info": dict(checkpoint.info),
        }
        ckpt = ckpt_lib.Checkpointer(checkpoint.directory, fingerprint, max_to_keep=checkpoint.max_to_keep,
                                     async_save=checkpoint.async_save)

    def ckpt_tree():
        return {"params": params, "rule_state": state, "key_data": key_data, "accuracy_matrix": acc,
                "random_baseline": baseline, "losses": losses, "loss_partial": loss_partial}

    if ckpt is not None:
        restored = ckpt.restore(ckpt_tree())
        if restored is not None:
            tree, meta = restored
            params, state = tree["params"], tree["rule_state"]
            acc, baseline, losses = (np.asarray(tree[k], np.float64) for k in ("accuracy_matrix", "random_baseline", "losses"))
            loss_partial = np.asarray(tree["loss_partial"], np.float64).reshape(lead)
            pos = {k: int(meta["position"][k]) for k in ("task", "epoch", "step")}
            resumed_from = dict(pos)
            prior_wall, prior_train = float(meta.get("wall_seconds", 0.0)), float(meta.get("train_seconds", 0.0))
            if jax.process_index() == 0:
                print(f"clx: {desc}resuming from {ckpt.directory} at task {pos['task']}, epoch {pos['epoch']}, "
                      f"step {pos['step']}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    train_seconds = 0.0

    def save(position):
        if ckpt is None:
            return
        meta = {"position": position, "wall_seconds": prior_wall + time.perf_counter() - t0 - data_seconds,
                "train_seconds": prior_train + train_seconds}
        n = ckpt.save(ckpt_tree(), meta)
        if on_save is not None:
            on_save(n, dict(position))

    # Tasks 0..pos.task are seen (their test sets and baselines exist); load what the resumed position needs.
    start_task = pos["task"]
    if start_task < num_tasks:
        for j in range(start_task):  # the test sets of the tasks seen (and, for joint training, their train sets)
            get_task(j)
        task = get_task(start_task)
        if start_task == 0 and pos["epoch"] == 0 and pos["step"] == 0:
            baseline[..., 0] = host(eval_fn(initial, *tests[0], 0, 0))
    try:
        for t in range(start_task, num_tasks):
            if cumulative:
                xs = np.concatenate([train_sets[i][0] for i in range(t + 1)])
                ys = np.concatenate([train_sets[i][1] for i in range(t + 1)])
                ids = np.concatenate([np.full(len(train_sets[i][1]), i, np.int32) for i in range(t + 1)])
            else:
                xs, ys, ids = task.x_train, task.y_train, np.full(len(task.y_train), t, np.int32)
            x, y, ids = place(xs), place(ys), place(ids)
            n = len(ys)
            nb = math.ceil(n / batch_size)
            resumed = t == start_task
            first_epoch = pos["epoch"] if resumed else 0
            bar = tqdm(total=epochs, initial=first_epoch, desc=f"{desc}task {t + 1}/{num_tasks}", disable=not progress,
                       leave=False)
            for e in range(first_epoch, epochs):
                step = pos["step"] if resumed and e == first_epoch else 0
                if step == 0:
                    loss_partial = np.zeros(lead)
                while step < nb:
                    k = nb - step if every == 0 else min(every, nb - step)
                    s = time.perf_counter()
                    params, state, loss_sum = chunk_fn(k)(hp, params, state, x, y, ids, key_data, t * 1000 + e, step)
                    loss_sum = host(loss_sum)
                    train_seconds += time.perf_counter() - s
                    if not np.all(np.isfinite(loss_sum)):
                        raise FloatingPointError(
                            f"training loss became {loss_sum} in task {t}, epoch {e}; lower train.lr or check the inputs."
                        )
                    loss_partial = loss_partial + loss_sum
                    step += k
                    if every and not (step == nb and e == epochs - 1):  # the task-end save follows that one
                        save({"task": t, "epoch": e, "step": step})  # step == nb: epoch e done, its loss not yet stored
                losses[..., t, e] = loss_partial / n
                loss_partial = np.zeros(lead)
                bar.update(1)
                bar.set_postfix(loss=f"{float(np.mean(losses[..., t, e])):.4f}")
            bar.close()
            del x, y, ids

            # Evidence on a fixed-size sample of the finished task, then consolidation.
            n_task = len(task.y_train)
            samples = [np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(int(sd)), 10**6 + t), n_task))
                       [: min(evidence_samples, n_task)] for sd in seeds]
            if members:
                xe, ye = np.stack([task.x_train[i] for i in samples]), np.stack([task.y_train[i] for i in samples])
            else:
                xe, ye = task.x_train[samples[0]], task.y_train[samples[0]]
            xe = place_evidence(xe)
            ye = place(ye)
            reps = evidence_fn(params, xe, np.int32(t))
            state = consolidate(hp, state, params, np.int32(t), xe, ye, reps)

            if t + 1 < num_tasks:
                task = get_task(t + 1)
                baseline[..., t + 1] = host(eval_fn(initial, *tests[t + 1], t + 1, 0))
            for j in range(min(t + 2, num_tasks)):
                acc[..., t, j] = host(eval_fn(params, *tests[j], j, t + 1))
            log.info("%stask %d/%d done at %.1fs: mean accuracy on tasks 0..%d = %.4f", desc, t + 1, num_tasks,
                     prior_wall + time.perf_counter() - t0 - data_seconds, t, float(np.mean(acc[..., t, : t + 1])))
            pos = {"task": t + 1, "epoch": 0, "step": 0}
            save(dict(pos))
    finally:  # a failing run (NaN loss, KeyboardInterrupt) still finishes the saves it started
        if ckpt is not None:
            ckpt.close()
    wall = prior_wall + time.perf_counter() - t0 - data_seconds
    return FitResult(acc, baseline, params, state, wall, prior_train + train_seconds, data_seconds, losses, resumed_from)
