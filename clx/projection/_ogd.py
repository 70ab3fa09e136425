"""OGD: Orthogonal Gradient Descent.

Farajtabar, Azizan, Mott, Li (2020), "Orthogonal Gradient Descent for Continual
Learning", AISTATS (arXiv:1910.07104), Algorithm 1, the ground-truth-logit variant
(OGD-GTL).

After task t, OGD stores the gradients, with respect to all the parameters w, of the
ground-truth logit of a sample of the task's examples,

    u_i = grad_w f_{y_i}(x_i; w*_t),      i = 1 .. memory_per_task,

orthonormalised (Gram-Schmidt) against every vector stored so far and each other,
into a growing set S = {v_1, ..., v_k} of orthonormal vectors of R^P (P = the number
of projected parameters). While later tasks train, the gradient of the task loss is
projected out of span(S) (Algorithm 1, line 8):

    g  <-  g - sum_{v in S} (v^T g) v  =  g - V^T (V g),     V: (k, P) rows v_i,

so, to first order, the step leaves every stored example's ground-truth logit where
it was: f_{y_i}(x_i; w - lr g~) - f_{y_i}(x_i; w) = -lr u_i^T g~ + O(lr^2) and
u_i^T g~ = 0 on span(S). The paper keeps 200 gradients per task (it finds 200
enough, with diminishing returns beyond) and trains with plain SGD (lr 1e-3): OGD
replaces the SGD step, so chain it before ``optax.sgd``; with momentum or Adam the
step is no longer the projected gradient and the guarantee is lost.

State: ``OGDState(vectors, count)``; ``vectors`` is (capacity, P) float32 with
capacity = memory_per_task * num_tasks fixed at init (static shapes: jit, vmap over
seeds and checkpoints need them). Rows [0, count) hold the orthonormal basis, every
other row is zero. Memory: capacity * P * 4 bytes (Permuted MNIST's 784-100-100-10
MLP without biases, P = 89,400, 10 tasks x 200: 715 MB); ``update`` reads it twice per
step (two (capacity, P) matrix-vector products), whatever ``count``.

Orthonormalisation, stable in float32 and under jit: the new gradients are projected
out of the stored basis twice (block classical Gram-Schmidt with re-orthogonalisation,
"twice is enough"), orthonormalised among themselves by a ``lax.scan`` of modified
Gram-Schmidt (each vector projected twice against the ones kept before it), projected
out of the stored basis once more (orthogonality to it then holds to working precision
even after cancellation) and normalised. A vector whose residual norm is at most
``tol`` times its own norm (it lies in the span already, or is zero: a dead ReLU
network, a saturated logit) is dropped: its row stays zero and it is not counted.
The kept vectors fill rows [count, count + kept).

Which parameters: every leaf of the params pytree, biases and heads included, as in
the paper's Algorithm 1 (the flat vector of ``jax.flatten_util.ravel_pytree``).
``exclude`` leaves some out (neither stored nor projected: their gradient passes
unchanged). For ``clx.MultiHead`` models (``head/kernel`` (num_heads, d, k),
``head/bias``) the default projects the stacked heads too: the new task's gradient
is zero on old heads, but its projection may move them, which keeps the invariant
above in the full parameter space. ``exclude=("head",)`` instead projects the shared
layers only and trains the current head freely, as the OGD+ code of Bennani et al.
(MehdiAbbanaBennani/continual-learning-ogdplus, ``optimizer_step``) does in its
multi-head runs; the invariant then still holds, since a task's loss never moves
another task's head.

Differences from the paper / public code: the paper samples the stored examples at
random from the task; clx uses the first ``memory_per_task`` examples of the
evidence, which ``clx.fit`` draws at random per task (``evidence_samples`` must be at
least ``memory_per_task``). Vectors in the span already are dropped instead of
normalised (the public code divides by their norm, which yields NaN for a zero
gradient). A fixed capacity: a consolidate past ``num_tasks`` tasks raises when the
task index is concrete; under jit it stores only the vectors that still fit and
drops the rest (the count is clamped to the capacity; under ``checkify.checkify`` it
is reported).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.flatten_util import ravel_pytree

from clx import subspace as sub
from clx.core import ContinualTransformation, Evidence
from clx.projection._common import check_finite
from clx.tree import concrete_int, path_str

#: Default cap on the stored vectors' memory (capacity x P x 4 bytes): 2 GiB.
MAX_BYTES = 2 * 1024**3


class OGDState(NamedTuple):
    """OGD's state (a pytree).

    Attributes:
      vectors: (capacity, P) float32; rows [0, count) orthonormal, the rest zero.
      count: int32 scalar, the number of stored vectors.
    """

    vectors: jax.Array
    count: jax.Array


def _check_int(who: str, name: str, value, minimum: int, fix: str) -> int:
    try:
        integral = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        integral = False
    if not integral:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}; {fix}.")
    if int(value) < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {value}; {fix}.")
    return int(value)


def ogd(
    memory_per_task: int = 200,
    num_tasks: int | None = None,
    *,
    exclude: Sequence[str] = (),
    tol: float = 1e-4,
    max_bytes: int = MAX_BYTES,
) -> ContinualTransformation:
    """Orthogonal Gradient Descent, ground-truth-logit variant (Farajtabar et al. 2020, Algorithm 1).

    ``clx.chain(clx.ogd(200, num_tasks=10), optax.sgd(1e-3))`` is the paper's optimizer.

    Args:
      memory_per_task: gradients stored per task (the paper's 200), computed at
        ``consolidate`` on the first ``memory_per_task`` evidence examples.
      num_tasks: the number of tasks the run will consolidate; with
        ``memory_per_task`` it fixes the capacity of the state
        (``memory_per_task * num_tasks`` rows).
      exclude: '/'-joined param paths or path prefixes to leave out (e.g.
        ``("head",)``: a ``clx.MultiHead``'s ``head/kernel`` and ``head/bias``);
        their gradient passes unchanged and no stored vector has entries for them.
      tol: a new gradient whose residual norm after projection out of the stored
        and earlier new vectors is at most ``tol`` times its norm is dropped.
      max_bytes: a guard on the state's size, capacity * P * 4 bytes (default 2 GiB).

    Returns:
      A ContinualTransformation named "ogd" with state :class:`OGDState`; needs
      nothing from the trainer (``consolidate`` uses ``evidence.apply_fn``, ``x``,
      ``y`` and ``task_id``). ``update(g, state, params=None, **extra)`` returns
      ``g - V^T (V g)`` (rows of V past ``count`` masked), shaped and typed like g;
      ``consolidate`` returns ``(None, state)``: it never moves the params.

    Raises:
      ValueError: in the factory, ``memory_per_task`` or ``num_tasks`` not an integer
        >= 1 (or ``num_tasks`` missing), ``tol`` outside (0, 1), ``max_bytes`` <= 0;
        at init, an ``exclude`` entry matching no param, nothing left to project, or
        a state larger than ``max_bytes``; at ``update``, a gradient whose flattened
        size differs from the state's P; at consolidate, no ``evidence.apply_fn``,
        fewer than ``memory_per_task`` evidence examples, (when the task index is
        concrete) a task index >= ``num_tasks``, or (when concrete) NaN/inf gradients.
    """
    who = "ogd"
    memory_per_task = _check_int(who, "memory_per_task", memory_per_task, 1, "store at least one gradient per task")
    if num_tasks is None:
        raise ValueError(
            f"{who}: give num_tasks (the stream's number of tasks): the state's memory of "
            f"memory_per_task * num_tasks vectors is allocated at init, e.g. clx.ogd({memory_per_task}, num_tasks=10)."
        )
    num_tasks = _check_int(who, "num_tasks", num_tasks, 1, "pass the stream's number of tasks")
    tol = float(tol)
    if not 0.0 < tol < 1.0:
        raise ValueError(f"{who}: tol must be in (0, 1), got {tol}.")
    max_bytes = int(max_bytes)
    if max_bytes <= 0:
        raise ValueError(f"{who}: max_bytes must be > 0, got {max_bytes}.")
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(str(e).strip("/") for e in exclude)
    capacity = memory_per_task * num_tasks

    def excluded(key: str) -> bool:
        return any(key == e or key.startswith(e + "/") for e in exclude)

    def split(tree):
        """(kept leaves, flat keep mask, treedef): the leaves OGD projects, in flattening order."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        keep = [not excluded(path_str(p)) for p, _ in flat]
        return [leaf for (_, leaf), k in zip(flat, keep) if k], keep, treedef, [leaf for _, leaf in flat]

    def flatten(tree) -> tuple[jax.Array, Callable]:
        kept, keep, treedef, leaves = split(tree)
        vec, unravel_kept = ravel_pytree(kept)

        def unravel(v):
            new = iter(unravel_kept(v))
            return jax.tree_util.tree_unflatten(treedef, [next(new) if k else a for a, k in zip(leaves, keep)])

        return vec, unravel

    def init(params):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        keys = [path_str(p) for p, _ in flat]
        unused = [e for e in exclude if not any(k == e or k.startswith(e + "/") for k in keys)]
        if unused:
            raise ValueError(f"{who}: exclude entries {unused} match no parameter; the params are {keys}.")
        size = sum(int(jnp.size(leaf)) for (p, leaf) in flat if not excluded(path_str(p)))
        if size == 0:
            raise ValueError(f"{who}: no parameters left to project (exclude={list(exclude)} covers {keys}).")
        nbytes = capacity * size * 4
        if nbytes > max_bytes:
            raise ValueError(
                f"{who}: the state would hold {capacity} x {size} float32 = {nbytes / 2**30:.2f} GiB "
                f"(memory_per_task={memory_per_task} x num_tasks={num_tasks} vectors of {size} params), over "
                f"max_bytes={max_bytes / 2**30:.2f} GiB; lower memory_per_task or num_tasks, exclude some params, "
                "or raise max_bytes."
            )
        return OGDState(jnp.zeros((capacity, size), jnp.float32), jnp.zeros((), jnp.int32))

    def check_size(vec, state, what):
        if vec.shape[-1] != state.vectors.shape[-1]:
            raise ValueError(
                f"{who}: the {what} flattens to {vec.shape[-1]} projected values but the state's vectors have "
                f"{state.vectors.shape[-1]}; build the state with init on these params (and the same exclude)."
            )

    def update(updates, state, params=None, **extra):
        del params, extra
        g, unravel = flatten(updates)
        check_size(g, state, "gradient")
        used = jnp.arange(state.vectors.shape[0]) < state.count
        coeff = jnp.where(used, jnp.dot(state.vectors, g.astype(jnp.float32), precision=sub.HIGHEST), 0.0)
        g = g - jnp.dot(coeff, state.vectors, precision=sub.HIGHEST).astype(g.dtype)
        return unravel(g), state

    def gtl_gradients(params, evidence: Evidence) -> jax.Array:
        """(memory_per_task, P) float32: grad_w f_{y_i}(x_i; w) of the first memory_per_task evidence examples."""
        x, y = evidence.x[:memory_per_task], evidence.y[:memory_per_task]

        def logit(p, xi, yi):
            return evidence.apply_fn(p, xi[None], evidence.task_id)[0, yi]

        def flat_grad(xi, yi):
            return flatten(jax.grad(logit)(params, xi, yi))[0].astype(jnp.float32)

        return jax.vmap(flat_grad)(x, jnp.asarray(y, jnp.int32))

    def consolidate(state, params, evidence: Evidence):
        if evidence.apply_fn is None:
            raise ValueError(f"{who}: the evidence has no apply_fn; OGD needs the model to take per-example gradients.")
        n = int(evidence.x.shape[0])
        if n < memory_per_task:
            raise ValueError(
                f"{who}: the evidence has {n} examples but memory_per_task={memory_per_task}; collect a larger "
                f"evidence sample (clx.fit(..., evidence_samples>={memory_per_task})) or lower memory_per_task."
            )
        t = concrete_int(evidence.task_id)
        if t is not None and t >= num_tasks:
            raise ValueError(
                f"{who}: consolidating task {t} but the state holds num_tasks={num_tasks} tasks of "
                f"{memory_per_task} vectors; build the rule with num_tasks >= {t + 1}."
            )
        grads = gtl_gradients(params, evidence)
        check_size(grads, state, "ground-truth-logit gradient")
        check_finite(who, "the ground-truth-logit gradients", grads)
        return None, _store(state, grads, tol, who)

    return ContinualTransformation(init, update, consolidate, name=who)


def _store(state: OGDState, grads: jax.Array, tol: float, who: str = "ogd") -> OGDState:
    """``state`` with the rows of ``grads`` (m, P) orthonormalised against the stored vectors and each other
    and written at rows [count, count + kept); dropped (dependent or zero) vectors take no row."""
    capacity = state.vectors.shape[0]
    m = grads.shape[0]
    used = (jnp.arange(capacity) < state.count)[:, None]
    v = jnp.where(used, state.vectors, 0.0)

    def out_of_stored(r):
        return r - sub.matmul(sub.matmul(r, v.T), v)

    norms = jnp.linalg.norm(grads, axis=1)
    r = out_of_stored(out_of_stored(grads))  # block CGS, twice

    def mgs(q, i):
        w = r[i]
        for _ in range(2):  # against the new vectors kept so far, twice (unkept rows are zero)
            w = w - jnp.dot(jnp.dot(q, w, precision=sub.HIGHEST), q, precision=sub.HIGHEST)
        nw = jnp.linalg.norm(w)
        keep = nw > tol * norms[i]
        w = jnp.where(keep, w / jnp.where(keep, nw, 1.0), 0.0)
        return q.at[i].set(w), keep

    q, keep = jax.lax.scan(mgs, jnp.zeros_like(r), jnp.arange(m))
    q = out_of_stored(q)  # removes what cancellation left of the stored directions
    qn = jnp.linalg.norm(q, axis=1, keepdims=True)
    q = jnp.where(keep[:, None], q / jnp.where(keep[:, None], qn, 1.0), 0.0)

    kept = jnp.sum(keep, dtype=jnp.int32)
    order = jnp.argsort(~keep, stable=True)  # kept rows first, in order
    rows = state.count + jnp.arange(m, dtype=jnp.int32)
    valid = (jnp.arange(m) < kept) & (rows < capacity)
    checkify.debug_check(
        state.count + kept <= capacity,
        f"{who}: the memory of {capacity} vectors is full; vectors past it were dropped (raise num_tasks)",
    )
    vectors = state.vectors.at[jnp.where(valid, rows, capacity)].set(q[order], mode="drop")
    return OGDState(vectors, jnp.minimum(state.count + kept, capacity).astype(jnp.int32))
