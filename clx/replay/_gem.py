"""GEM: gradient episodic memory.

Lopez-Paz & Ranzato (2017), "Gradient Episodic Memory for Continual Learning",
NeurIPS, Eqs. 10-13. With g the task gradient and G (t, p) the gradients of the loss
on the episodic memory of each earlier task k < t (one row per task), GEM takes the
update g~ closest to g with G g~ >= 0. When some g . g_k < 0 it solves the dual QP
(Eq. 13)

    min_v  1/2 v^T G G^T v + g^T G^T v     s.t.  v >= gamma,

and steps along g~ = G^T v + g; otherwise g~ = g. ``gamma`` is the memory strength:
the paper (Sec. 3) adds a small gamma >= 0 to bias the projection towards backward
transfer, and its code (``model/gem.py``, ``project2cone2``: ``quadprog.solve_qp(P, q,
G=I, h=margin)``) puts it in the constraint v >= margin, margin = memory_strength =
0.5 in every experiment of ``run_experiments.sh`` -- followed here. With gamma = 0 and
one old task the solution is v = -g.g_1/|g_1|^2 and GEM is A-GEM.

The QP is solved in JAX, without quadprog: u = v - gamma >= 0 turns it into the
non-negative QP min 1/2 u^T P u + q'^T u, P = G G^T, q' = G g + gamma P 1, solved by
the Lawson-Hanson active-set method in Gram form inside one ``lax.while_loop`` (a
fixed iteration cap), on the problem scaled by the largest diagonal of P (the
minimiser does not change). It stops when the KKT conditions hold to ``tol``: u >= 0,
P u + q' >= -tol, and P u + q' = 0 (to solve precision) where u > 0. Only tasks
before the current one with a non-empty memory enter (a mask over a static maximum
of ``num_tasks`` rows).

Memory, as the paper's code: ``memory_per_task`` slots per task (256 on MNIST),
written while the task trains (each batch goes into the current task's ring), and
each old task's reference gradient is taken on its whole memory, every step. With
``skip_unseen`` (the default on a CPU backend) the reference gradients are taken one
task at a time (``lax.map``) under a ``lax.cond``, so the tasks not yet old cost
nothing: over a 10-task stream 4.5 old tasks a step on average instead of 10. Otherwise
they are one vmapped batch over all ``num_tasks`` memories (the rows of tasks not yet
old masked), which an accelerator runs faster, and which a vmapped member (several
seeds as one program) gets anyway, since ``vmap`` turns the cond into both branches.

Shapes: memory (num_tasks * memory_per_task, *input_shape); G (num_tasks, p), p the
number of parameters (rows of tasks not yet old are zeros and masked out).

Differences from the authors' code: their ring counter is shared between tasks and
drops the part of a batch that overflows the ring; clx keeps one counter per task
and wraps every example. No quadprog: the dual is solved to ``tol`` in float32 on the
scaled problem, where quadprog solves it in float64: the residual then sits near float32 rounding of
v, about 1e-7 * sum_j |P_ij v_j| / max diag(P).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.core import Batch, ContinualTransformation
from clx.replay._buffer import TaskRingBuffer, insert, task_ring_buffer
from clx.replay._common import check_size, check_weight

_HI = jax.lax.Precision.HIGHEST  # full float32 products (no TF32/bf16 passes on GPU/TPU) in the dual


class GEMState(NamedTuple):
    memory: TaskRingBuffer  # num_tasks * memory_per_task slots of input_shape


def solve_gem_dual(gram, dots, mask, margin=0.5, tol: float = 1e-6, max_iter: int | None = None):
    """Solves GEM's dual, ``min_v 1/2 v^T gram v + dots^T v  s.t. v >= margin``, over the rows in ``mask``.

    Args:
      gram: (t, t) ``G G^T``, the Gram matrix of the old tasks' gradients.
      dots: (t,) ``G g``.
      mask: (t,) bool, the rows that enter (others get v = 0).
      margin: gamma, the lower bound of v (the memory strength).
      tol: KKT tolerance on the problem scaled by ``max(diag(gram))``.
      max_iter: cap on the active-set iterations (default ``10 t + 10``).

    Returns:
      (v (t,) float32, number of iterations (int32 scalar)).
    """
    t = gram.shape[0]
    max_iter = 10 * t + 10 if max_iter is None else int(max_iter)
    mask = jnp.asarray(mask, bool)
    both = mask[:, None] & mask[None, :]
    scale = jnp.max(jnp.where(mask, jnp.diagonal(gram), 0.0))
    scale = jnp.where(scale > 0, scale, 1.0)
    p = jnp.where(both, gram / scale, 0.0)
    m = jnp.where(mask, margin, 0.0).astype(p.dtype)
    q = jnp.where(mask, (dots + jnp.dot(gram, m, precision=_HI)) / scale, 0.0)
    eye = jnp.eye(t, dtype=p.dtype)

    def solve(free):
        a = jnp.where(free[:, None] & free[None, :], p, eye)
        s = jnp.linalg.solve(a, jnp.where(free, -q, 0.0))
        return jnp.where(free & jnp.isfinite(s), s, 0.0)

    def candidates(u, free):
        w = -(jnp.dot(p, u, precision=_HI) + q)  # minus the gradient: > tol where raising u_i lowers the objective
        return mask & ~free & (w > tol), w

    def cond(carry):
        u, free, inner, it = carry
        return (it < max_iter) & (inner | jnp.any(candidates(u, free)[0]))

    def body(carry):
        u, free, inner, it = carry
        cand, w = candidates(u, free)
        j = jnp.argmax(jnp.where(cand, w, -jnp.inf))
        free = jnp.where(inner, free, free.at[j].set(True))  # outer step: free the most violated bound
        s = solve(free)
        feasible = jnp.all(jnp.where(free, s > 0, True))
        ratio = jnp.where(free & (s <= 0), u / jnp.where(u - s > 0, u - s, 1.0), jnp.inf)
        alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
        stepped = u + alpha * (s - u)  # inner step: back along the segment until a free u_i hits 0
        u_new = jnp.where(feasible, s, stepped)
        free = jnp.where(feasible, free, free & (stepped > 0) & ~((s <= 0) & (ratio <= alpha)))
        return jnp.where(free, u_new, 0.0), free, ~feasible, it + 1

    zeros = jnp.zeros((t,), p.dtype)
    u, _, _, it = jax.lax.while_loop(cond, body, (zeros, jnp.zeros((t,), bool), jnp.zeros((), bool), jnp.int32(0)))
    return jnp.where(mask, u + m, 0.0), it


def gem(
    memory_per_task: int,
    num_tasks: int,
    input_shape: Sequence[int],
    memory_strength: float = 0.5,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    skip_unseen: bool | None = None,
) -> ContinualTransformation:
    """GEM (Lopez-Paz & Ranzato 2017), chained before the optimizer.

    ``clx.chain(clx.replay.gem(256, 10, (784,)), optax.sgd(0.1))``.

    Args:
      memory_per_task: memory slots per task (the paper's code: ``n_memories`` 256).
      num_tasks: the most tasks the memory holds (static: one reference gradient
        row each; examples of a task id >= num_tasks are not stored, so build it
        with the stream's number of tasks).
      input_shape: one example's shape as the model takes it.
      memory_strength: gamma, the lower bound of the dual variables (the paper's
        code: 0.5); a float or a traced sweep value.
      tol: KKT tolerance of the dual solve (on the scaled problem).
      max_iter: cap on the solver's active-set iterations (default 10 num_tasks + 10).
      skip_unseen: take the reference gradients task by task and skip the tasks not
        yet old (module docs); None: when ``jax.default_backend()`` is "cpu" at trace
        time. The same update either way, to float rounding.

    Returns:
      A ContinualTransformation named "gem" with state ``GEMState`` that needs
      ``"batch"`` (the memory stores it) and ``"grad_fn"`` (one reference gradient
      per old task, vmapped over the tasks).

    Raises:
      ValueError: ``memory_per_task < 1``, ``num_tasks < 1``, a bad
        ``input_shape``, a concrete negative ``memory_strength``, ``tol <= 0``.
    """
    memory_per_task = check_size("gem", "memory_per_task", memory_per_task)
    num_tasks = check_size("gem", "num_tasks", num_tasks)
    check_weight("gem", "memory_strength", memory_strength)
    if not float(tol) > 0:
        raise ValueError(f"gem: tol must be > 0, got {tol}.")
    task_ring_buffer(1, 1, input_shape)  # checks input_shape now

    def init(params):
        del params
        return GEMState(task_ring_buffer(memory_per_task, num_tasks, input_shape))

    def update(updates, state, params=None, *, task_id, batch, grad_fn, **extra):
        del extra
        mem = state.memory
        tasks = jnp.arange(num_tasks)
        x, y, ids, valid = (
            a.reshape(num_tasks, memory_per_task, *a.shape[1:]) for a in (mem.x, mem.y, mem.task_ids, mem.valid)
        )
        old = (tasks < task_id) & jnp.any(valid, axis=1)
        refs = Batch(x, y, ids, (valid & old[:, None]).astype(jnp.float32))  # one reference batch per task
        if skip_unseen if skip_unseen is not None else jax.default_backend() == "cpu":

            def reference(j):
                ref = jax.tree.map(lambda a: a[j], refs)
                zeros = jax.tree.map(jnp.zeros_like, params)
                return jax.lax.cond(old[j], lambda: grad_fn(params, ref), lambda: zeros)

            grads = jax.lax.map(reference, tasks)  # (num_tasks, ...) per leaf
        else:
            grads = jax.vmap(grad_fn, in_axes=(None, 0))(params, refs)
        # Reads of the memory done before the insert writes it (in place, no copy of the memory per step).
        grads, mem = jax.lax.optimization_barrier((grads, mem))
        leaves, tree = jax.tree.flatten(updates)
        g = jnp.concatenate([leaf.reshape(-1) for leaf in leaves])
        rows = jnp.concatenate([leaf.reshape(num_tasks, -1) for leaf in jax.tree.leaves(grads)], axis=1)
        rows = jnp.where(old[:, None], rows, 0.0)
        dots = jnp.dot(rows, g, precision=_HI)
        violated = jnp.any(old & (dots < 0))
        v = jax.lax.cond(  # the dual only when a constraint is violated (under vmap both branches run)
            violated,
            lambda: solve_gem_dual(jnp.dot(rows, rows.T, precision=_HI), dots, old, memory_strength, tol, max_iter)[0],
            lambda: jnp.zeros((num_tasks,), rows.dtype),
        )
        g_new = jnp.dot(v, rows, precision=_HI) + g
        sizes = [leaf.size for leaf in leaves]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        out = [
            jnp.where(violated, g_new[o : o + leaf.size].reshape(leaf.shape).astype(leaf.dtype), leaf)
            for o, leaf in zip(offsets, leaves)
        ]
        return jax.tree.unflatten(tree, out), GEMState(insert(mem, batch))

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"batch", "grad_fn"}), name="gem")
