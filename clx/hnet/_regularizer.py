"""The hypernetwork output regularizer (von Oswald et al. 2020, "Continual learning
with hypernetworks", ICLR, Eq. 2) as a ContinualTransformation that owns the optimizer."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clx.core import ContinualTransformation
from clx.hnet._hypernetworks import Hypernetwork, _check_sizes
from clx.hnet._model import _scalar_task
from clx.tree import concrete_float


class HnetRegState(NamedTuple):
    """State of :func:`output_regularizer`.

    Attributes:
      opt_state: the wrapped optimizer's state.
      targets: (num_tasks, n_target) float32, ``f(e_t, theta*)`` stored at consolidate.
      stored: (num_tasks,) bool, which rows of ``targets`` hold a finished task.
      key: (2,) uint32 PRNG key for the random subset of old tasks.
    """

    opt_state: Any
    targets: jax.Array
    stored: jax.Array
    key: jax.Array


def output_regularizer_loss(
    hnet: Hypernetwork, theta, task_embs: jax.Array, targets: jax.Array, weights: jax.Array
) -> jax.Array:
    """``sum_t w_t ||f(e_t, theta) - targets_t||^2 / max(sum_t w_t, 1)`` (float32 scalar).

    The regularizer of von Oswald et al. 2020, Eq. 2, without ``beta``:
    ``task_embs`` (T, emb_dim), ``targets`` (T, n_target), ``weights`` (T,) (1 for
    the old tasks regularized, 0 otherwise).
    """
    out = hnet.apply(theta, task_embs)
    per_task = jnp.sum(jnp.square(out - targets), axis=-1)
    return jnp.sum(weights * per_task) / jnp.maximum(jnp.sum(weights), 1.0)


def output_regularizer(
    hnet: Hypernetwork,
    optimizer: optax.GradientTransformation,
    *,
    beta: float,
    num_tasks: int,
    lookahead: bool = True,
    num_sampled: int | None = None,
    reset_optimizer: bool = True,
    seed: int = 0,
) -> ContinualTransformation:
    """The hypernetwork output regularizer (von Oswald et al. 2020, Eq. 2) with its optimizer.

    While task ``T`` trains (``task_id`` extra), each step:

    1. ``dtheta`` = the update ``optimizer`` would make from the task-loss
       gradient (the look-ahead; zero with ``lookahead=False``), a constant
       (``stop_gradient``, as ``detach_dt`` in ``hypercl``);
    2. adds ``beta / |S| * sum_{t in S} grad_theta ||f(e_t, theta*) - f(e_t, theta + dtheta)||^2``
       to the gradient of theta (``params["hnet"]``), ``S`` = all finished tasks
       (``T`` of them), or ``num_sampled`` of them drawn at random each step
       (``hnet_reg_batch_size`` in ``hypercl``);
    3. takes the real optimizer step, then zeroes the update of every task
       embedding except ``task_id``'s (old embeddings stay fixed, later ones untouched).

    ``consolidate`` (end of task t) stores ``f(e_j, theta)`` for every ``j <= t``
    (the authors recompute all targets before each new task) and, with
    ``reset_optimizer``, re-initialises the optimizer (the authors build a new Adam per task).

    The rule emits the final updates (it owns the optimizer: it declares the
    ``"optimizer"`` need, so ``clx.chain`` refuses a second rule that owns one):
    use it alone or last in ``clx.chain``. ``consolidate`` returns ``(None, state)``
    (it never moves the params). Params must be ``{"hnet": theta, "task_emb": (num_tasks, e)}``
    (a :class:`HyperModel`'s). State: :class:`HnetRegState`, fixed shapes (one compile).

    Raises:
      ValueError: ``beta < 0``, ``num_tasks < 1``, ``num_sampled < 1``; at update,
        missing ``params`` or ``task_id``.
    """
    b = concrete_float(beta)  # beta may also be a traced scalar (clx.train.fit_members)
    if b is not None and not b >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}; beta weighs the output regularizer (0 turns it off).")
    _check_sizes(num_tasks=num_tasks)
    if num_sampled is not None and int(num_sampled) < 1:
        raise ValueError(f"num_sampled must be >= 1 or None (all old tasks), got {num_sampled}.")
    T = int(num_tasks)
    regularize = b is None or b > 0

    def init(params):
        return HnetRegState(
            optimizer.init(params),
            jnp.zeros((T, hnet.num_outputs), jnp.float32),
            jnp.zeros((T,), bool),
            jax.random.PRNGKey(seed),
        )

    max_reg = max(T - 1, 0) if num_sampled is None else min(int(num_sampled), max(T - 1, 0))

    def reg_grad(theta, embs, targets, order, n):
        """(1/n) sum_{i<n} grad ||f(e_order[i], theta) - y_order[i]||^2, one task at a time.

        A loop, not one batched matmul over the n tasks: each task's (n_target,)
        output and residual stay in cache, where n of them at once (n * n_target
        floats, several times) would not; measured 1.5-3x faster on a 2-core CPU."""

        def sq(th, t):
            return jnp.sum(jnp.square(hnet.apply(th, embs[t]) - targets[t]))

        def body(i, acc):
            return jax.tree.map(jnp.add, acc, jax.grad(sq)(theta, order[i]))

        acc = jax.lax.fori_loop(0, n, body, jax.tree.map(jnp.zeros_like, theta))
        return jax.tree.map(lambda g: g / jnp.maximum(n, 1).astype(g.dtype), acc)

    def update(grads, state, params=None, *, task_id=None, **extra):
        del extra
        if params is None or task_id is None:
            raise ValueError(
                "clx.hnet.output_regularizer needs params and the task_id extra "
                "(clx.train.fit passes both); call update(grads, state, params, task_id=t)."
            )
        tid = _scalar_task(task_id)
        rows = jnp.arange(T)
        old = state.stored & (rows != tid)
        n_old = jnp.sum(old).astype(jnp.int32)
        key, sub = jax.random.split(state.key)
        if regularize:
            theta = params["hnet"]
            if lookahead:
                delta, _ = optimizer.update(grads, state.opt_state, params)
                theta = jax.tree.map(lambda p, d: p + jax.lax.stop_gradient(d), theta, delta["hnet"])
            if num_sampled is not None and int(num_sampled) < T - 1:
                scores = jnp.where(old, jax.random.uniform(sub, (T,)), 2.0)
            else:
                scores = jnp.where(old, 0.0, 1.0)
            order = jnp.argsort(scores, stable=True)  # the regularized old tasks first
            n = jnp.minimum(n_old, max_reg)
            g_reg = reg_grad(theta, jax.lax.stop_gradient(params["task_emb"]), state.targets, order, n)
            grads = {**grads, "hnet": jax.tree.map(lambda g, r: g + beta * r, grads["hnet"], g_reg)}
        emb_mask = (rows == tid)[:, None]
        grads = {**grads, "task_emb": jnp.where(emb_mask, grads["task_emb"], 0.0)}
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        updates = {**updates, "task_emb": jnp.where(emb_mask, updates["task_emb"], 0.0)}
        return updates, HnetRegState(opt_state, state.targets, state.stored, key)

    def consolidate(state, params, evidence):
        t = jnp.asarray(evidence.task_id, jnp.int32)
        upto = jnp.arange(T) <= t
        outs = hnet.apply(params["hnet"], params["task_emb"])
        targets = jnp.where(upto[:, None], outs, state.targets)
        opt_state = optimizer.init(params) if reset_optimizer else state.opt_state
        return None, HnetRegState(opt_state, targets, state.stored | upto, state.key)

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"optimizer"}), name="output_regularizer")
