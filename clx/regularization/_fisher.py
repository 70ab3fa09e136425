"""The diagonal Fisher information from per-example gradients (EWC, online EWC).

For a model with predictive distribution p(c | x, theta) = softmax(f(x; theta))_c on
n examples x_1..x_n, the diagonal of the Fisher information is estimated as the mean
over examples of squared per-example gradients of a log-likelihood:

    "true"       F = 1/n sum_i sum_c p_c(x_i) (d log p_c(x_i) / d theta)^2
                 (the expectation over the model's own predictive distribution;
                 van de Ven's ``fisher_labels='all'``, the definition of the Fisher)
    "empirical"  F = 1/n sum_i (d log p_{y_i}(x_i) / d theta)^2   (the true labels y_i)
    "sample"     F = 1/n sum_i (d log p_{c_i}(x_i) / d theta)^2,  c_i ~ p(. | x_i)
                 (one label per example sampled from the model's prediction; an
                 unbiased one-sample estimate of "true")
    "predicted"  F = 1/n sum_i (d log p_{c_i}(x_i) / d theta)^2,  c_i = argmax p(. | x_i)
                 (van de Ven's 2019 code, the "Three scenarios" runs)

Always the mean of per-example squares, never the square of a mini-batch mean gradient
(which shrinks with the batch size). Two ways to the same numbers:

* factored (given ``apply_with_taps``, a :class:`clx.TappedModel`'s): a Dense layer
  whose input holds one row per example has per-example kernel gradients
  ``x_i delta_i^T`` (``delta_i`` the gradient of the log-likelihood with respect to the
  layer's pre-bias output), so the sum of their squares is one product,
  ``(X * X)^T (Delta * Delta)``, and the bias's is ``sum_i delta_i^2``; for "true",
  ``Delta * Delta`` becomes ``sum_c p_c delta_c^2``, one backward pass per class for the
  deltas and still one product per layer. No per-example gradient is formed: on van de
  Ven's Permuted-MNIST MLP (1024-1000-1000-10) 60,000 examples took 225 s ("predicted") /
  932 s ("true") per-example on 2 CPU cores, 4.5 s / 9.2 s factored (``python
  benchmarks/baselines.py --consolidate`` times both). Every other parameter (conv
  kernels, whose gradient sums over positions; ``clx.MultiHead`` heads; layers applied
  more than once) goes the per-example way below;
* per-example (``jax.vmap`` of ``jax.vjp``): each example's gradient formed and squared.

The examples are processed ``chunk_size`` at a time (a ``lax.scan`` over chunks), so the
memory is that of ``chunk_size`` per-example gradients (or layer inputs and deltas)
whatever n is; by default as many as fit 2^24 floats (a 500k-parameter MLP: 33 examples
a chunk per-example). "true" costs one backward pass per class per example (van de Ven's
code does the same).

Keys for "sample": example i (its index in ``x``) draws its label with
``jax.random.categorical(fold_in(fold_in(key(seed), task_id), i), log p(. | x_i))``,
so the estimate does not depend on the chunk size.

``num_active`` (an int or traced int32 scalar) keeps only the first ``num_active``
outputs in the softmax, as van de Ven does for class-IL (the classes seen so far).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from clx.regularization._common import (
    MASKED_LOGIT,
    MergedApply,
    check_optional_int,
    chunk_size_for,
    factored_floats,
    factored_layers,
    num_params,
    sum_factored,
    sum_over_chunks,
    zero_perturbations,
)

#: The Fisher variants of :func:`diagonal_fisher`.
FISHER_VARIANTS = ("true", "empirical", "sample", "predicted")


def check_variant(who: str, variant: str) -> str:
    """``variant`` if it is one of :data:`FISHER_VARIANTS`, else ValueError naming the choices."""
    if variant not in FISHER_VARIANTS:
        raise ValueError(
            f"{who}: unknown Fisher variant {variant!r}; choose one of {FISHER_VARIANTS} "
            "('true': the expectation over the model's predictions, the default)."
        )
    return variant


def diagonal_fisher(
    apply_fn: Callable,
    params,
    x: jax.Array,
    y: jax.Array,
    task_id,
    *,
    variant: str = "true",
    seed=0,
    chunk_size: int | None = None,
    num_active=None,
    apply_with_taps: Callable | None = None,
):
    """The diagonal Fisher information of ``apply_fn`` at ``params`` on the examples ``x``.

    Args:
      apply_fn: ``apply_fn(params, x, task_id) -> logits`` (B, C).
      params: the params pytree.
      x: (n, ...) float32 inputs.
      y: (n,) int32 labels (read by "empirical" only).
      task_id: int32 scalar passed to ``apply_fn`` (selects the head of a multi-head
        model) and folded into the "sample" keys.
      variant: one of :data:`FISHER_VARIANTS` (module docs).
      seed: an int (or traced int32) seeding the "sample" labels.
      chunk_size: examples per chunk (None: as many as fit 2^24 floats of
        per-example gradients, or of layer inputs and deltas on the factored path).
        The result does not depend on it.
      num_active: None (every output) or the number of leading outputs kept in the
        softmax (the rest are masked out).
      apply_with_taps: the same model's ``apply_with_taps`` (:class:`clx.TappedModel`),
        or None. Given, the Dense layers with one input row per example take the
        factored way (module docs), the rest of the params the per-example way.

    Returns:
      A pytree shaped like ``params``: the mean over the n examples of the
      per-example squared log-likelihood gradients (the same, to float rounding,
      either way).

    Raises:
      ValueError: an unknown variant, ``chunk_size < 1``, an empty ``x``.
    """
    check_variant("diagonal_fisher", variant)
    chunk_size = check_optional_int("diagonal_fisher", "chunk_size", chunk_size)
    n = int(x.shape[0])
    if n < 1:
        raise ValueError("diagonal_fisher: x holds no examples; pass at least one.")
    num_classes = int(jax.eval_shape(lambda p: apply_fn(p, x[:1], task_id), params).shape[-1])
    per_class = num_classes if variant == "true" else 1
    y = jnp.asarray(y, jnp.int32)
    copies = 2 if per_class > 1 else 1  # per-example gradients alive at once ("true": the sum and one class's)
    layers = factored_layers(apply_with_taps, params, x, task_id)
    if not layers:
        chunk = chunk_size_for(n, num_params(params) * copies, chunk_size)
        return _fisher(apply_fn, params, None, x, y, task_id, seed, num_active, variant=variant, chunk=chunk)
    merged = MergedApply(apply_fn, params)
    rest, fixed = merged.split(params, layers)
    chunk = chunk_size_for(n, factored_floats(params, layers, per_class + 1), chunk_size)
    out = _factored(
        apply_with_taps, params, x, y, task_id, seed, num_active, variant=variant, chunk=chunk, layers=layers
    )
    if rest:
        chunk = chunk_size_for(n, num_params(rest) * copies, chunk_size)
        out.update(_fisher(merged, rest, fixed, x, y, task_id, seed, num_active, variant=variant, chunk=chunk))
    return merged.unflatten(out)


def _log_mask(logits, num_active):
    """log softmax over the first ``num_active`` outputs (all with None)."""
    if num_active is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < num_active, logits, MASKED_LOGIT)
    return jax.nn.log_softmax(logits)


def _labels(variant, logp, y, index, base_key):
    """The label whose log-likelihood gradient is squared, per example (not "true")."""
    if variant == "empirical":
        return y
    if variant == "sample":
        return jax.random.categorical(jax.random.fold_in(base_key, index), jax.lax.stop_gradient(logp))
    return jnp.argmax(logp, axis=-1)  # predicted


@functools.partial(jax.jit, static_argnames=("apply_with_taps", "variant", "chunk", "layers"))
def _factored(apply_with_taps, params, x, y, task_id, seed, num_active, *, variant, chunk, layers):
    """The factored Fisher of ``layers`` (module docs): ``{path: mean over examples}`` for their kernels and biases."""
    base_key = jax.random.fold_in(jax.random.key(seed), task_id)

    def rows(xc, ic, yc):
        def log_probs(d):
            logits, taps = apply_with_taps(params, xc, task_id, d)
            return _log_mask(logits, num_active), {k: taps[k] for k, _ in layers}

        perts = zero_perturbations(params, layers, xc.shape[0])
        logp, vjp, taps = jax.vjp(log_probs, perts, has_aux=True)
        num_classes = logp.shape[-1]
        if variant == "true":
            probs = jax.lax.stop_gradient(jnp.exp(logp))  # (b, C)

            def add_class(acc, c):
                (d,) = vjp(jnp.broadcast_to(jax.nn.one_hot(c, num_classes, dtype=jnp.float32), logp.shape))
                return {k: acc[k] + probs[:, c, None] * jnp.square(d[k]) for k in acc}, None

            return taps, jax.lax.scan(add_class, jax.tree.map(jnp.zeros_like, perts), jnp.arange(num_classes))[0]
        labels = jax.vmap(functools.partial(_labels, variant, base_key=base_key))(logp, yc, ic)
        (d,) = vjp(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
        return taps, {k: jnp.square(v) for k, v in d.items()}

    total = sum_factored(rows, jnp.square, params, layers, x, (y,), chunk)
    return {p: t / x.shape[0] for p, t in total.items()}


@functools.partial(jax.jit, static_argnames=("apply_fn", "variant", "chunk"))
def _fisher(apply_fn, params, fixed, x, y, task_id, seed, num_active, *, variant, chunk):
    """The per-example Fisher of every leaf of ``params``; with ``fixed`` (not None), ``apply_fn`` takes
    ``(params, fixed)`` and ``fixed`` is not differentiated. Jitted so eager callers with the same model and shapes
    compile once."""
    n = x.shape[0]

    def logits(p, xs):
        return apply_fn(p if fixed is None else (p, fixed), xs, task_id)

    num_classes = jax.eval_shape(lambda p: logits(p, x[:1]), params).shape[-1]
    base_key = jax.random.fold_in(jax.random.key(seed), task_id)

    def grad_of_class(vjp, c):
        (g,) = vjp(jax.nn.one_hot(c, num_classes, dtype=jnp.float32))
        return g

    def per_example(x_i, i, y_i):
        logp, vjp = jax.vjp(lambda p: _log_mask(logits(p, x_i[None])[0], num_active), params)
        if variant == "true":
            probs = jax.lax.stop_gradient(jnp.exp(logp))

            def add_class(acc, c):
                g = grad_of_class(vjp, c)
                return jax.tree.map(lambda a, gc: a + probs[c] * jnp.square(gc), acc, g), None

            acc, _ = jax.lax.scan(add_class, jax.tree.map(jnp.zeros_like, params), jnp.arange(num_classes))
            return acc
        return jax.tree.map(jnp.square, grad_of_class(vjp, _labels(variant, logp, y_i, i, base_key)))

    total = sum_over_chunks(per_example, params, x, (y,), chunk)
    return jax.tree.map(lambda t: t / n, total)
