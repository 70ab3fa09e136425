"""UPGD: utility-based perturbed gradient descent, an optimizer that protects useful weights
and perturbs the others.

Elsayed & Mahmood 2024, "Addressing Loss of Plasticity and Catastrophic Forgetting in
Continual Learning" (ICLR), first-order global UPGD. Checked against the authors' code,
github mohmdelsayed/upgd at b75e90a: ``core/optim/weight_upgd/first_order.py``
(``FirstOrderGlobalUPGD``, ``FirstOrderNonprotectingGlobalUPGD``, the classes the paper's
experiments run: ``experiments/input_permuted_mnist.py`` imports their learners) and the
``UPGD`` class in ``README.md`` (added in 989c9b3, "Update UPGD implementation for
reproducing experiments"). Per weight ``theta`` with gradient ``g``, at step ``t = 1, 2, ...``:

    u      <- beta_u u + (1 - beta_u) (-g theta)               (first-order utility trace)
    eta     = max over ALL weights of u                         (the raw trace, not bias-corrected)
    s       = sigmoid((u / (1 - beta_u^t)) / eta)               (scaled utility)
    theta  <- theta (1 - lr wd) - step_scale lr (g + sigma eps) (1 - s)     (protecting UPGD)
    theta  <- theta (1 - lr wd) - step_scale lr (g + sigma eps (1 - s))     (protect=False)

``eps`` standard normal per entry, fresh every step. Note what the formula gives: the
max-utility weight has ``s = sigmoid(1 / (1 - beta_u^t))``, so its gate ``1 - s`` is ~0 only
while the bias correction is large (t = 1, beta_u = 0.999: ``sigmoid(1000)`` = 1 in float32,
gate 0) and tends to ``1 - sigmoid(1) = 0.269`` as t grows; a weight of utility 0 has gate 1/2.

The README and the optimizer file differ; every difference is an argument here:

| | README ``UPGD`` | ``first_order.py`` | clx default |
|---|---|---|---|
| gated step | ``2 lr`` | ``lr`` | ``step_scale = 1`` (the file's) |
| ``beta_u`` | 0.999 | 0.0 | 0.999 (README) |
| ``sigma`` | 1e-3 | 1.0 | 1e-3 (README) |
| weight decay | 1e-3 | 0.0 | 1e-3 (README) |

The step is the file's (the code behind the paper's figures, and the one both variants share);
the file's constructor defaults are placeholders that every experiment overrides (their grids:
lr 1e-2..1e-5, beta_u {0.999, 0.9999}, sigma {0.01, 0.1, 1}, wd {0, 1e-1..1e-4}), so the
hyperparameter defaults are the README's. The README exactly: ``step_scale=2.0``. With
``step_scale = 2`` a weight of utility 0 (gate 1/2) steps exactly SGD's ``lr g``.

Guard (a deliberate difference): both versions compute ``(u / bc) / eta``, which is 0/0 = NaN
for a weight whose utility is 0 when every utility is <= 0 and ``eta = 0`` (e.g. all-zero params,
or every ``g theta = 0``), and then NaN poisons the weight. clx takes 0/0 as 0 (``s = 1/2``,
the scaled utility a zero-utility weight has at any ``eta > 0``); every other case is the
official arithmetic, including ``eta = 0`` with ``u < 0`` (``-inf``, ``s = 0``, gate 1) and
``eta < 0`` (dividing by a negative max flips the order; kept as the official code does it).

The rule IS the optimizer: it declares ``"optimizer"`` (its updates are the final steps
``theta_new - theta``) and ``"key"``; chain clx gradient rules before it. The noise comes from
``fold_in(step key, seed)``, one key per leaf (:func:`clx.plasticity._common.normal_like`), as
:func:`clx.plasticity.shrink_perturb_steps` draws it. ``consolidate`` moves nothing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.plasticity._common import check_nonnegative, need_key, need_params, normal_like
from clx.tree import concrete_float


class UPGDState(NamedTuple):
    utility: object  # params-shaped, each leaf in its parameter's dtype: the trace u (not bias-corrected)
    count: jax.Array  # () int32: steps taken (t of the bias correction 1 - beta_u^t)


def _check_beta(who: str, beta) -> None:
    v = concrete_float(beta)
    if v is not None and not (0.0 <= v < 1.0):
        raise ValueError(
            f"{who}: beta_utility must be in [0, 1), got {v}; pass e.g. 0.999 (0 keeps only the latest utility)."
        )


def _global_max(utility) -> jax.Array:
    """The max of every entry of every leaf (-inf for no entries), as the official code's running max."""
    maxes = [jnp.max(u).astype(jnp.float32) for u in jax.tree.leaves(utility) if jnp.size(u)]
    return jnp.max(jnp.stack(maxes)) if maxes else jnp.float32(-jnp.inf)


def upgd(
    lr,
    *,
    beta_utility=0.999,
    sigma=1e-3,
    weight_decay=1e-3,
    step_scale=1.0,
    protect: bool = True,
    seed: int = 0,
) -> ContinualTransformation:
    """First-order global UPGD (Elsayed & Mahmood 2024), an optimizer: see the module docstring.

    ``update(grads, state, params, key=k)`` returns ``-lr wd theta - step_scale lr x`` with
    ``x = (g + sigma eps)(1 - s)`` (``protect=True``) or ``x = g + sigma eps (1 - s)``
    (``protect=False``, the file's ``FirstOrderNonprotectingGlobalUPGD``: the utility gates only
    the noise), so the trainer's ``theta + update`` is the official
    ``theta.mul_(1 - lr wd).add_(x, alpha=-step_scale lr)`` up to one rounding of the sum.
    Shapes and dtypes: every output leaf has its parameter's shape and dtype; the trace is
    kept in the parameter's dtype, the global max in float32.

    Perturbed SGD without any gate (the paper's PGD baseline, ``core/optim/pgd.py``) is not this
    rule: use ``clx.plasticity.shrink_perturb_steps(optax.sgd(lr), lr * sigma)`` (noise added
    to the step, ``theta - lr (g + sigma eps)``).

    Args:
      lr: the step size >= 0 (the paper's grids: 1e-2..1e-5). A float or a traced sweep value.
      beta_utility: the trace's decay in [0, 1) (README 0.999; the file's default 0).
      sigma: the noise std >= 0 (README 1e-3; the file's default 1.0).
      weight_decay: >= 0, decoupled: ``theta (1 - lr wd)`` (README 1e-3; the file's default 0).
      step_scale: > 0, the gated term's step is ``step_scale lr`` (1: the file; 2: the README).
      protect: True for UPGD (the gate scales gradient and noise), False for the non-protecting
        variant (the gate scales only the noise).
      seed: folded into the step key.

    Returns:
      A ContinualTransformation named "upgd" with state :class:`UPGDState`, needing ``"key"``
      and ``"optimizer"``.

    Raises:
      ValueError: a concrete ``lr``, ``sigma`` or ``weight_decay`` < 0 or non-finite, ``step_scale``
        <= 0 or non-finite, ``beta_utility`` outside [0, 1) (here); ``update`` without params or key.
    """
    who = "upgd"
    check_nonnegative(who, "lr", lr)
    check_nonnegative(who, "sigma", sigma)
    check_nonnegative(who, "weight_decay", weight_decay)
    _check_beta(who, beta_utility)
    s = concrete_float(step_scale)
    if s is not None and not (0.0 < s < math.inf):
        raise ValueError(
            f"{who}: step_scale must be a finite value > 0, got {s}; pass 1.0 (the official optimizer file) "
            "or 2.0 (the README's UPGD)."
        )
    seed = int(seed)

    def init(params):
        return UPGDState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, key=None, **extra):
        del extra
        need_params(who, params)
        need_key(who, key)
        count = state.count + 1
        utility = jax.tree.map(
            lambda u, g, p: (beta_utility * u + (1.0 - beta_utility) * (-g * p)).astype(u.dtype),
            state.utility,
            updates,
            params,
        )
        eta = _global_max(utility)
        correction = 1.0 - jnp.power(jnp.asarray(beta_utility, jnp.float32), count.astype(jnp.float32))
        eps = normal_like(jax.random.fold_in(key, seed), params)

        def step(u, g, p, e):
            corrected = u.astype(jnp.float32) / correction
            # corrected / eta as the official code computes it, except 0/0 := 0; no NaN is ever formed
            ratio = corrected / jnp.where(eta == 0.0, 1.0, eta)
            at_zero = jnp.where(corrected == 0.0, 0.0, jnp.where(corrected > 0.0, jnp.inf, -jnp.inf))
            ratio = jnp.where(eta == 0.0, at_zero, ratio)
            gate = (1.0 - jax.nn.sigmoid(ratio)).astype(g.dtype)
            noise = (sigma * e).astype(g.dtype)
            x = (g + noise) * gate if protect else g + noise * gate
            return (-(lr * weight_decay) * p - (step_scale * lr) * x).astype(g.dtype)

        return jax.tree.map(step, utility, updates, params, eps), UPGDState(utility, count)

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"key", "optimizer"}), name=who)
