"""ReDo: every ``period`` steps, recycle the tau-dormant hidden units.

Sokar, Agarwal, Castro & Evci 2023, "The Dormant Neuron Phenomenon in Deep Reinforcement
Learning", ICML, Definition 3.1 (the score) and Algorithm 1 (ReDo); the official code
github google/dopamine, ``dopamine/labs/redo/weight_recyclers.py`` (``NeuronRecycler``), read.

Unit i of a hidden layer with activations h (N, m) on the current batch (the input tap of the
next Dense kernel) scores

    s_i = mean_n |h_ni| / (mean_j mean_n |h_nj| + 1e-9)        (:func:`dormant_scores`)

(the official ``estimate_neuron_score``, whose ``+ 1e-9`` makes a layer of silent units all
dormant). After the optimizer's step of every ``period``-th step (steps counted from 1, Algorithm
1's ``t mod F == 0``), each unit with ``s_i <= tau`` is recycled: fresh input weights
(``init``, default "xavier": the official ``weight_reinit_random`` draws
``nn.initializers.xavier_uniform()``), input bias 0, outgoing weights 0 (the official default
``init_method_outgoing='zero'``), and the wrapped optimizer's moments (every params-shaped subtree
of its state) zeroed there (the official code zeroes Adam's mu and nu at the input and outgoing
weights; clx also zeroes them at the input bias). Unlike continual backprop nothing is added to the
next layer's bias: a recycled unit that was silent on every input leaves the network's output as it
was, one that was only nearly silent changes it by its small contribution.

tau: the official ``BaseRecycler`` defaults ``dead_neurons_threshold=0.0`` (only exactly silent
units; checked in weight_recyclers.py; its shipped Atari gin configs switch to
``NeuronRecyclerScheduled``, which recycles a fixed fraction, ``recycle_rate=0.3``, instead); the
paper's text uses tau = 0.025 and 0.1 (as ``clx.metrics.dormant_fraction`` records; its
hyperparameter table was not re-read for this module); the loss-of-plasticity code's ReDo baseline
(Dohare et al. 2024, github shibhansh/loss-of-plasticity ``lop/rl/cfg/ant/redo.yml`` with
``lop/algos/gntRedo.py``; checked) uses threshold 0.1 with ``reset_period`` 100 (gntRedo's own
defaults: 0.01 and 1000). clx defaults to tau = 0.1, deliberately: the value of that continual-learning
baseline and the larger of the paper's two (0.0 recycles only units silent on every example of the
batch: pass it for the official default). ``period`` defaults to 1000 (gntRedo's default).

Where clx differs from the official code: the scores come from the step's own batch (its taps, before
the step), not from a separate sample of 256 states after it; unit j of the l-th hidden layer draws its
fresh column from ``fold_in(fold_in(fold_in(step key, seed), l), j)``.
Under ``jax.vmap`` over seeds the recycling branch (a ``lax.cond``) runs at every step as a select.

Layers: as :func:`clx.plasticity.cbp`, the hidden layers of consecutive Dense and Conv layers. A Conv
layer's units are its output channels (feature maps), as in the official code ("In convolutional neural
networks, we consider a feature map as neuron", ``ConvNeuronRecycler`` / ``LayerReset``): a channel's
score is its mean |h| over the batch and the spatial positions, normalised by the layer's mean
(``estimate_neuron_score`` reduces every axis but the last of the (N, H, W, C) activation), recycling
draws its whole filter ``kernel[..., c]`` fresh (``xavier_uniform`` of the kernel's shape: fan-in
kh kw c_in, fan-out kh kw c_out) and zeroes its input bias, its outgoing weights and their Adam moments.
Where clx differs for Conv layers: the activations are the next layer's input tap, i.e. after any
pooling (the official code records the layer's own activation, before pooling), and for a next Conv
layer the positions are weighted as its windows see them (``clx.plasticity._units``); a channel's
outgoing weights before a Dense layer are the rows p C + c of the channels-last flatten, whereas the
official ``create_mask_helper`` masks the rows with ``jnp.repeat(mask, H W)``, i.e. c H W + p, while its
networks flatten channels last (``x.reshape((-1))`` of the (H, W, C) map; as we read it, that zeroes
rows of other channels); a normalization layer after a Conv layer raises (see :func:`clx.plasticity.cbp`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clx.core import ContinualTransformation
from clx.plasticity._common import check_nonnegative, check_optimizer, need_key, need_params
from clx.plasticity._units import (
    Selection,
    check_count,
    check_init,
    fresh_inputs,
    hidden_layers,
    need_taps,
    normalize_layers,
    reset_units,
    tap_units,
)
from clx.tree import by_path

_EPS = 1e-9  # the official code's guard: score /= mean(score) + 1e-9


def dormant_scores(features) -> jax.Array:
    """ReDo's per-unit score (Sokar et al. 2023, Def. 3.1) of a layer's ``(N, H)`` features, as ``(H,)`` float32.

    ``s_i = E_x|h_i(x)| / ((1/H) sum_k E_x|h_k(x)| + 1e-9)``; a unit is tau-dormant when ``s_i <= tau``.
    ``clx.metrics.dormant_fraction`` is the mean of ``s <= tau``. Features with more axes, e.g. a Conv
    layer's ``(N, H, W, C)`` maps, are averaged over every axis but the last (a channel's score is its mean
    |h| over the batch and the positions, as the official ``estimate_neuron_score``).

    Raises:
      ValueError: ``features`` with fewer than 2 axes.
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim < 2:
        raise ValueError(
            f"dormant_scores: features must be (examples, ..., units) with at least 2 axes, got shape {features.shape}."
        )
    mean_abs = jnp.mean(jnp.abs(features), axis=tuple(range(features.ndim - 1)))
    return mean_abs / (jnp.mean(mean_abs) + _EPS)


class ReDoState(NamedTuple):
    inner: object  # the wrapped optimizer's state
    count: jax.Array  # () int32: steps taken so far


def redo(
    optimizer: optax.GradientTransformation,
    tau=0.1,
    period=1000,
    *,
    seed: int = 0,
    layers=None,
    init: str = "xavier",
) -> ContinualTransformation:
    """ReDo (Sokar et al. 2023) around an optimizer: its step, and every ``period`` steps the dormant units recycled.

    The final update is the optimizer's step (bit for bit at every entry not recycled, and at every
    step that is not a multiple of ``period``) with the tau-dormant units' input weights set to fresh
    draws and their input bias and outgoing weights to 0 (see the module docstring).
    ``consolidate`` moves nothing.

    Args:
      optimizer: a plain optax optimizer (the rule owns it: its updates are the final steps).
      tau: the dormancy threshold >= 0 (default 0.1; see the module docstring for the choices).
      period: F >= 1, recycle after steps F, 2F, ... (counted over the whole run).
      seed: folded into the step key for the fresh weights.
      layers: None (every hidden layer) or kernel paths of the hidden layers to act on.
      init: the fresh input weights' bound: "xavier" (the official code's, for Dense and Conv layers),
        "kaiming", "torch" or "lecun" (a Conv filter's fan-in is kh kw c_in, its fan-out kh kw c_out).

    Returns:
      A ContinualTransformation named "redo" with state :class:`ReDoState`, needing ``"taps"``,
      ``"key"`` and ``"optimizer"``.

    Raises:
      ValueError: a concrete negative or non-finite ``tau``, ``period`` below 1, an unknown ``init``
        (here); a ``layers`` entry that is not a hidden Dense or Conv layer, a Conv layer with a
        normalization of its size (``init``); ``update`` without params, key or the taps.
      TypeError: ``optimizer`` is a clx rule or not an optax transformation; ``layers`` not a sequence of str.
    """
    who = "redo"
    check_optimizer(who, optimizer)
    check_nonnegative(who, "tau", tau)
    check_count(who, "period", period)
    check_init(who, init)
    names = normalize_layers(who, layers)
    seed = int(seed)

    def init_fn(params):
        hidden_layers(who, params, names)
        return ReDoState(optimizer.init(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, layer_inputs=None, key=None, **extra):
        del extra
        need_params(who, params)
        hidden = hidden_layers(who, params, names)
        need_taps(who, layer_inputs, hidden)
        need_key(who, key)
        steps, inner = optimizer.update(updates, state.inner, params)
        count = state.count + 1
        flat_p = by_path(params)
        taps = {h.out: layer_inputs[h.out] for h in hidden}

        def recycle(steps, inner):
            base = jax.random.fold_in(key, seed)
            sels = [Selection(None, dormant_scores(tap_units(h, taps[h.out])) <= tau) for h in hidden]
            fresh = [
                fresh_inputs(jax.random.fold_in(base, i), h, s, init, flat_p[h.kernel].dtype)
                for i, (h, s) in enumerate(zip(hidden, sels))
            ]
            return reset_units(steps, params, inner, hidden, sels, fresh)

        steps, inner = jax.lax.cond(count % period == 0, recycle, lambda s, i: (s, i), steps, inner)
        return steps, ReDoState(inner, count)

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(
        init_fn, update, consolidate, needs=frozenset({"taps", "key", "optimizer"}), name="redo"
    )
