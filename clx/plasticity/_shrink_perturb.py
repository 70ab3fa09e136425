"""Shrink & perturb: theta <- shrink * theta + sigma * eps, at task boundaries or after every step.

Two factories:

- :func:`shrink_perturb` (Ash & Adams 2020, "On Warm-Starting Neural Network Training",
  Section 4): at every task boundary ``consolidate`` returns the move
  ``(shrink - 1) theta + sigma eps``, so the trainer's params become
  ``shrink theta + sigma eps``. ``eps`` is standard normal per entry by default
  (the paper's ``p ~ N(0, sigma^2)``, as Kumar et al. 2023 describe it too); the
  authors' code (github JordanAsh/warm_start, ``run.py`` ``shrink_perturb``) takes
  ``eps`` from a freshly initialised network instead ("respects how different kinds of
  parameters are often initialized differently"; their defaults shrink 0.4, perturb 0.1):
  pass ``noise_fn(key, params) -> a fresh init`` for that. Their code also builds a
  new optimizer after each move; clx keeps the optimizer's state (chain an
  optimizer-state reset if wanted).
- :func:`shrink_perturb_steps`, the per-step form of the loss-of-plasticity code
  (Dohare et al. 2024, github shibhansh/loss-of-plasticity, ``lop/algos/bp.py``
  ``Backprop``): the optimizer steps on ``g + weight_decay theta`` (PyTorch's coupled
  ``weight_decay``), then Gaussian noise of std ``sigma`` is added to every weight and
  bias: ``theta <- theta + u + sigma eps``. Their Permuted MNIST config
  (``lop/permuted_mnist/cfg/snp.json``): SGD, lr 0.003, weight_decay 1e-4,
  perturb_scale swept over {1e-4, 1e-5, 1e-6}. With ``shrink < 1`` it is also Kumar et
  al. 2023's per-step Shrink & Perturb (Appendix A.3):
  ``theta <- shrink (theta + u) + sigma eps``.

Randomness: both declare the ``"key"`` need. The boundary rule keeps the latest step
key (folded with ``seed``) in its state and draws the move's noise from it, then
advances it, so vmapped seeds (members) get independent noise while a member's moves
are a pure function of its run's key; before any step, the state's key is
``jax.random.key(seed)``. The per-step rule draws from ``fold_in(step key, seed)``.
Keys are stored as raw key data (uint32), which orbax saves like any array.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import optax

from clx.core import ContinualTransformation
from clx.plasticity._common import (
    check_nonnegative,
    check_optimizer,
    check_unit_interval,
    need_key,
    need_params,
    normal_like,
)


class ShrinkPerturbState(NamedTuple):
    key: jax.Array  # (2,) uint32 key data (the default threefry impl): the key the next move's noise comes from


def _check(who, shrink, sigma):
    check_unit_interval(who, "shrink", shrink)
    check_nonnegative(who, "sigma", sigma)


def shrink_perturb(
    shrink,
    sigma,
    *,
    seed: int = 0,
    noise_fn: Callable[[jax.Array, object], object] | None = None,
) -> ContinualTransformation:
    """Shrink & perturb at every task boundary (Ash & Adams 2020): ``theta <- shrink theta + sigma eps``.

    ``consolidate`` returns ``moves = (shrink - 1) theta + sigma eps`` (params-shaped,
    each leaf in its parameter's dtype) with ``eps = noise_fn(k, params)`` (default:
    standard normal per entry, one key per leaf, :func:`clx.plasticity._common.normal_like`)
    and ``k, next = jax.random.split(wrap_key_data(state.key))``; the new state holds
    ``next``. ``update`` leaves the updates untouched and stores
    ``key_data(fold_in(step key, seed))``. ``shrink = 1, sigma = 0`` leaves the params
    bit for bit.

    Args:
      shrink: the factor in [0, 1] (0: the noise alone, a fresh start when
        ``noise_fn`` draws an init; 1: no shrinking). A float or a traced sweep value.
      sigma: the noise scale >= 0.
      seed: folded into every step key; also the key before the first step.
      noise_fn: optional ``noise_fn(key, params) -> params-shaped pytree``, e.g. a
        jit-able fresh initialisation of the model (the authors' code).

    Returns:
      A ContinualTransformation named "shrink_perturb" with state :class:`ShrinkPerturbState`,
      needing ``"key"``; it does not change gradients, so chain it with an optimizer.

    Raises:
      ValueError: a concrete ``shrink`` outside [0, 1] or ``sigma`` < 0 or non-finite (here);
        ``update`` called without ``key``.
    """
    _check("shrink_perturb", shrink, sigma)
    seed = int(seed)

    def init(params):
        del params
        return ShrinkPerturbState(jax.random.key_data(jax.random.key(seed)))

    def update(updates, state, params=None, *, key=None, **extra):
        del params, extra
        need_key("shrink_perturb", key)
        return updates, ShrinkPerturbState(jax.random.key_data(jax.random.fold_in(key, seed)))

    def consolidate(state, params, evidence):
        del evidence
        k, nxt = jax.random.split(jax.random.wrap_key_data(state.key))
        eps = noise_fn(k, params) if noise_fn is not None else normal_like(k, params)
        moves = jax.tree.map(lambda p, e: ((shrink - 1.0) * p + sigma * e).astype(p.dtype), params, eps)
        return moves, ShrinkPerturbState(jax.random.key_data(nxt))

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"key"}), name="shrink_perturb")


class ShrinkPerturbStepsState(NamedTuple):
    inner: object  # the wrapped optimizer's state


def shrink_perturb_steps(
    optimizer: optax.GradientTransformation,
    sigma,
    *,
    weight_decay=0.0,
    shrink=1.0,
    seed: int = 0,
) -> ContinualTransformation:
    """Shrink & perturb after every step, around an optimizer (Dohare et al. 2024's ``Backprop``).

    With ``u = optimizer(g + weight_decay theta)``, the final update is
    ``u + (shrink - 1)(theta + u) + sigma eps``, i.e. the params become
    ``shrink (theta + u) + sigma eps``; ``eps`` standard normal per entry from
    ``fold_in(step key, seed)`` (one key per leaf). With the default ``shrink = 1`` this is
    the loss-of-plasticity code's step: ``opt.step()`` with PyTorch's coupled
    ``weight_decay``, then ``param += N(0, perturb_scale^2)`` on every weight and bias.
    ``consolidate`` moves nothing.

    The rule owns the optimizer (it declares ``"optimizer"``: its updates are the final
    steps, so the noise is not scaled by a learning rate); chain clx gradient rules before it.

    Args:
      optimizer: a plain optax optimizer, e.g. ``optax.sgd(0.003)``.
      sigma: the noise std >= 0 (the code's ``perturb_scale``; 1e-4..1e-6 on Permuted MNIST).
      weight_decay: >= 0, added as ``weight_decay theta`` to the gradient before the optimizer
        (1e-4 on Permuted MNIST).
      shrink: in [0, 1], applied to the stepped params (Kumar et al. 2023, A.3; 1: none).
      seed: folded into the step key.

    Returns:
      A ContinualTransformation named "shrink_perturb_steps" with state
      :class:`ShrinkPerturbStepsState`, needing ``"key"`` and ``"optimizer"``.

    Raises:
      ValueError: a concrete ``sigma`` or ``weight_decay`` < 0 or non-finite, ``shrink`` outside
        [0, 1] (here); ``update`` called without params or key.
      TypeError: ``optimizer`` is a clx rule (its boundary hooks would be lost) or not an optax transform.
    """
    who = "shrink_perturb_steps"
    check_optimizer(who, optimizer)
    _check(who, shrink, sigma)
    check_nonnegative(who, "weight_decay", weight_decay)
    seed = int(seed)

    def init(params):
        return ShrinkPerturbStepsState(optimizer.init(params))

    def update(updates, state, params=None, *, key=None, **extra):
        del extra
        need_params(who, params)
        need_key(who, key)
        grads = jax.tree.map(lambda g, p: g + (weight_decay * p).astype(g.dtype), updates, params)
        steps, inner = optimizer.update(grads, state.inner, params)
        eps = normal_like(jax.random.fold_in(key, seed), params)

        def final(u, p, e):
            return (u + (shrink - 1.0) * (p + u) + sigma * e).astype(u.dtype)

        return jax.tree.map(final, steps, params, eps), ShrinkPerturbStepsState(inner)

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(
        init, update, consolidate, needs=frozenset({"key", "optimizer"}), name="shrink_perturb_steps"
    )
