"""MAS: memory aware synapses, an unsupervised importance from the sensitivity of the outputs.

Aljundi, Babiloni, Elhoseiny, Rohrbach, Tuytelaars (2018), "Memory Aware Synapses:
Learning what (not) to forget", ECCV. At the end of each task, on its examples
x_1..x_n (no labels needed), Eqs. 2 and 4 with the squared l2 norm of the outputs:

    Omega_t = 1/n sum_k | d ||f(x_k; theta)||_2^2 / d theta |,     Omega <- Omega + Omega_t,   theta* <- theta

(the importances of the tasks are summed, as the authors' ``accumelate_reg_params``
does), and while later tasks train the penalty lam * sum_i Omega_i (theta_i - theta*_i)^2
(Eq. 3) enters as its analytic gradient ``2 lam Omega (theta - theta*)``, added in
``update`` (the authors' ``Weight_Regularized_SGD`` adds the same term to the
gradient). f is the model's output, its logits (the head of the evidence's task for
a multi-head model). Per-example gradients, ``chunk_size`` at a time; given the model's
``apply_with_taps`` (the trainer passes it), a Dense layer with one input row per example
sums ``|x_i| |delta_i|^T`` as one product ``|X|^T |Delta|`` (and its bias ``sum_i
|delta_i|``) without forming them, as ``clx.regularization.diagonal_fisher`` does.

Shapes: every state field but the counter is shaped like the params.

Differences from the authors' code: rahafaljundi/MAS-Memory-Aware-Synapses
(``compute_importance_l2``) takes the absolute value of the gradient of a whole
mini-batch's summed squared norm, which is the per-example Eq. 4 only at batch size 1
(their ``b1`` option); clx always uses per-example gradients, as the paper defines.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation, Evidence
from clx.regularization._common import (
    MergedApply,
    check_nonnegative,
    check_optional_int,
    chunk_size_for,
    copy_tree,
    factored_floats,
    factored_layers,
    need_params,
    num_params,
    penalty_gradient,
    sum_factored,
    sum_over_chunks,
    zero_perturbations,
)


class MASState(NamedTuple):
    importance: object  # params-shaped: Omega, summed over the finished tasks (0 before task 1)
    anchor: object  # params-shaped: theta*, the params at the end of the latest task
    num_tasks: jax.Array  # () int32, consolidations so far


def mas_importance(apply_fn, params, x: jax.Array, task_id, *, chunk_size: int | None = None, apply_with_taps=None):
    """``1/n sum_k |d ||apply_fn(params, x_k, task_id)||_2^2 / d params|`` (Aljundi et al. 2018, Eq. 4).

    Args:
      apply_fn: ``apply_fn(params, x, task_id) -> outputs`` (B, C).
      params: the params pytree.
      x: (n, ...) inputs, n >= 1.
      task_id: int32 scalar handed to ``apply_fn``.
      chunk_size: examples per chunk of per-example gradients (None: automatic).
      apply_with_taps: the same model's ``apply_with_taps`` or None: given, the Dense
        layers with one input row per example take the factored way (module docs); the
        same numbers to float rounding.

    Returns:
      A pytree shaped like ``params``.

    Raises:
      ValueError: an empty ``x``, ``chunk_size < 1``.
    """
    chunk_size = check_optional_int("mas_importance", "chunk_size", chunk_size)
    n = int(x.shape[0])
    if n < 1:
        raise ValueError("mas_importance: x holds no examples; pass at least one.")

    layers = factored_layers(apply_with_taps, params, x, task_id)
    if not layers:
        return _importance(apply_fn, params, None, x, task_id, chunk=chunk_size_for(n, num_params(params), chunk_size))
    merged = MergedApply(apply_fn, params)
    rest, fixed = merged.split(params, layers)
    chunk = chunk_size_for(n, factored_floats(params, layers, 2), chunk_size)
    out = _factored(apply_with_taps, params, x, task_id, chunk=chunk, layers=layers)
    if rest:
        out.update(_importance(merged, rest, fixed, x, task_id, chunk=chunk_size_for(n, num_params(rest), chunk_size)))
    return merged.unflatten(out)


@functools.partial(jax.jit, static_argnames=("apply_with_taps", "chunk", "layers"))
def _factored(apply_with_taps, params, x, task_id, *, chunk, layers):
    """The factored importance of ``layers``: ``{path: mean over examples}`` for their kernels and biases."""

    def rows(xc, ic):
        del ic

        def outputs(d):
            out, taps = apply_with_taps(params, xc, task_id, d)
            return out, {k: taps[k] for k, _ in layers}

        out, vjp, taps = jax.vjp(outputs, zero_perturbations(params, layers, xc.shape[0]), has_aux=True)
        (d,) = vjp(2.0 * out)  # d ||f(x_i)||^2 / d f(x_i) = 2 f(x_i), one row per example
        return taps, {k: jnp.abs(v) for k, v in d.items()}

    total = sum_factored(rows, jnp.abs, params, layers, x, (), chunk)
    return {p: t / x.shape[0] for p, t in total.items()}


@functools.partial(jax.jit, static_argnames=("apply_fn", "chunk"))
def _importance(apply_fn, params, fixed, x, task_id, *, chunk):
    """The per-example importance of every leaf of ``params``; with ``fixed`` (not None), ``apply_fn`` takes
    ``(params, fixed)`` and ``fixed`` is not differentiated. Jitted so eager callers with the same model and shapes
    compile once."""

    def per_example(x_i, i):
        del i

        def sq_norm(p):
            return jnp.sum(jnp.square(apply_fn(p if fixed is None else (p, fixed), x_i[None], task_id)))

        return jax.tree.map(jnp.abs, jax.grad(sq_norm)(params))

    total = sum_over_chunks(per_example, params, x, (), chunk)
    return jax.tree.map(lambda t: t / x.shape[0], total)


def mas(lam: float, *, num_samples: int | None = None, chunk_size: int | None = None) -> ContinualTransformation:
    """Memory aware synapses (Aljundi et al. 2018), chained before the optimizer.

    ``clx.chain(clx.regularization.mas(1.0), optax.sgd(0.01))``.

    Args:
      lam: the penalty strength lambda >= 0 (a float or a traced sweep value); 1 in
        the paper's object-recognition experiments (the authors' ``reg_lambda=1``).
      num_samples: evidence examples used (its first ``num_samples``; None: all).
        The authors use the task's whole training set.
      chunk_size: examples per chunk of per-example gradients (None: automatic).

    Returns:
      A ContinualTransformation named "mas" with state ``MASState``.

    Raises:
      ValueError: a concrete negative ``lam``, ``num_samples``/``chunk_size`` < 1; in
        ``update``, no params; at ``consolidate``, fewer evidence examples than
        ``num_samples``.
    """
    check_nonnegative("mas", "lam", lam)
    num_samples = check_optional_int("mas", "num_samples", num_samples)
    chunk_size = check_optional_int("mas", "chunk_size", chunk_size)

    def init(params):
        return MASState(jax.tree.map(jnp.zeros_like, params), copy_tree(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        del extra
        need_params("mas", params)
        return penalty_gradient(updates, params, 2.0 * lam, state.importance, state.anchor), state

    def consolidate(state, params, evidence: Evidence):
        x = evidence.x
        if num_samples is not None:
            if x.shape[0] < num_samples:
                raise ValueError(
                    f"mas: the evidence holds {x.shape[0]} examples but num_samples={num_samples}; collect a larger "
                    "evidence sample or lower num_samples."
                )
            x = x[:num_samples]
        new = mas_importance(
            evidence.apply_fn,
            params,
            x,
            evidence.task_id,
            chunk_size=chunk_size,
            apply_with_taps=evidence.apply_with_taps,
        )
        importance = jax.tree.map(jnp.add, state.importance, new)
        return None, MASState(importance, copy_tree(params), state.num_tasks + 1)

    return ContinualTransformation(init, update, consolidate, name="mas")
