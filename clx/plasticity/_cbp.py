"""Continual backpropagation: after every step, replace a few mature, low-utility hidden units.

Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood & Sutton 2024, "Loss of plasticity in deep
continual learning", Nature 632, Methods ("Continual backpropagation", Eq. 1 and the
algorithm given there); the authors' code github shibhansh/loss-of-plasticity,
``lop/algos/gnt.py`` (``GnT``, used through ``lop/algos/cbp.py`` on Permuted MNIST) and
``lop/algos/cbp_linear.py``. Checked against both (gnt.py read whole); for Conv layers against
``lop/algos/convGnT.py`` (``ConvGnT``, read whole), ``lop/algos/cbp_conv.py`` (``CBPConv``) and
``lop/utils/miscellaneous.py`` ``get_layer_bound`` (repository commit 63c35f3).

For each hidden layer l (units = columns of kernel l, activations h (N, m) = the input tap of
kernel l + 1, outgoing weights w = rows of kernel l + 1; for a Conv layer see "Conv layers" below),
after the optimizer's step u:

1. ``age += 1``; with the post-step outgoing weights ``w' = w + u_w`` (gnt.py reads the weights
   after ``opt.step()``), the contribution utility and the running mean activation

       u_i = decay u_i + (1 - decay) mean_n |h_ni| mean_k |w'_ik|
       f_i = decay f_i + (1 - decay) mean_n h_ni

   both bias-corrected by ``1 - decay^age_i`` (Adam-style, gnt.py ``update_utility``). The
   paper's Eq. 1 sums over the outgoing weights, gnt.py takes their mean (``abs().mean(dim=0)``
   of the (out, in) torch weight): the two differ by the factor n_{l+1}, the same for every unit of
   the layer, so they pick the same units; clx takes the code's mean.
   ``utility="adaptable_contribution"`` is gnt.py's other choice (the one its Permuted MNIST
   config ``lop/permuted_mnist/cfg/cbp.json`` sets): ``mean|w'| mean_n|h_ni - f_i| / mean|w_in,i|``.
2. Units with ``age > maturity`` are eligible; ``pending += replacement_rate * (number eligible)``,
   ``n = floor(pending)``, ``pending -= n`` (gnt.py with ``accumulate=True``, as the Permuted MNIST
   experiment runs it: fractional replacements carry over to later steps).
3. The n eligible units of lowest bias-corrected utility are replaced: input weights drawn fresh
   from U(-b, b) (``init``, default the code's bound: Kaiming sqrt(2) sqrt(3 / d) for a Dense layer,
   sqrt(1 / d) for a Conv layer), input bias 0,
   outgoing weights 0, and the next layer's bias absorbs the unit's mean contribution
   ``w'_i f_i / (1 - decay^age_i)``, so the network's output changes only by the unit's deviation
   from its mean (not at all for a unit of constant activation, e.g. a dead one). Their utility,
   mean activation and age restart at 0.
4. The wrapped optimizer's moments (every params-shaped subtree of its state: Adam's mu and nu,
   momentum's trace) are zeroed at the replaced units' input weights, input bias and outgoing
   weights (gnt.py ``update_optim_params``, for its Adam).

Where clx differs from gnt.py, deliberately:

- the bias absorption. gnt.py's ``test_features`` sets ``mean_feature_act[i][replaced] = 0``
  before ``gen_new_features`` reads it for the absorption, so its absorption always adds 0 (a bug:
  the comment there says "Update bias to correct for the removed features"); clx reads the mean
  first, then resets it, as the paper describes;
- the step count of Adam's bias correction: gnt.py's ``AdamGnT`` keeps a step per entry and resets
  it; optax's Adam has one count for all entries, which clx leaves as it is, so a replaced weight's
  first moments are not bias-corrected afresh;
- the random draws: unit j of the l-th hidden layer (0-based, in ``layers`` order) draws its fresh
  column from ``fold_in(fold_in(fold_in(step key, seed), l), j)`` instead of torch's global
  generator (so vmapped seeds draw independently, and a traced rate draws what a concrete one does);
  gnt.py's non-accumulating mode (a Bernoulli draw for a fraction below 1) is not offered;
- the means over the batch run over every row of the tap (the trainer pads an epoch's last batch
  with repeated examples of weight 0, which count here).

Layers: the hidden layers of consecutive Dense and Conv layers (every one by default, or those
named by ``layers``: kernel paths, e.g. ``('layers/0/kernel',)``, ``('conv1/kernel',)``); the last
hidden layer of a multi-head model (its activation is not tapped) is not supported.

Conv layers (``clx.plasticity._units`` describes the discovery): a unit is an output channel c of a
Conv kernel (kh, kw, c_in, m). Its input weights are its filter ``kernel[:, :, :, c]`` (fan-in
d = kh kw c_in), its outgoing weights ``next[:, :, c, :]`` of a next Conv, or the rows p m + c (every
position p of the channels-last flatten) of a next Dense kernel. Its activations are the next layer's
input tap (after any pooling): the im2col patches of a next Conv, the flattened maps of a next Dense
(convGnT.py also reads the pooled maps: ``lop/nets/conv_net.py`` ``predict`` returns
``pool(relu(conv(x)))`` as a conv layer's features).
As convGnT.py, the running mean activation f is the mean over the batch and the positions
(``features.mean(dim=(0, 2, 3))``), and the utility's term is, Conv -> Conv, the product of the
channel's mean |h| and the mean |w'| of its outgoing filter slices (``output_wight_mag =
weight.abs().mean(dim=(0, 2, 3))``), Conv -> Dense, the mean over the positions of the per-row product
``mean_n |h_(p,c)| mean_k |w'_(p,c),k|`` (its ``.view(-1, num_last_filter_outputs).mean(dim=1)``; clx reads
the number of positions from the shapes, the code takes it as ``num_last_filter_outputs``);
"adaptable_contribution" divides by the mean |filter| (``weight.abs().mean(dim=(1, 2, 3))``). Where clx
differs for Conv layers:

- the positions: for a next Conv layer clx averages over the patches that layer sees, so with 'VALID'
  padding a border position counts less than an interior one and 'SAME' padding's zeros count (convGnT
  averages the (N, C, H, W) map evenly); a 1x1 next Conv, or a Dense one, sees each position once;
- the fresh filter's bound: with the default ``init=None`` a Conv filter is drawn from U(-b, b) with
  b = sqrt(1 / (kh kw c_in)), the code's ``get_layer_bound`` for a ``Conv2d`` (which ignores ``init``);
  an explicit ``init`` applies its bound with fan-in kh kw c_in and fan-out kh kw c_out to Conv layers too;
- the bias absorption: convGnT.py and CBPConv absorb nothing; clx adds ``f_c sum_g w'_(g,c)`` (the
  channel's mean activation times its outgoing weights summed over the window offsets or positions),
  exact when the channel's activation is the same at every position the next layer reads (a dead
  channel, or a constant one under 'VALID' padding);
- the moments: convGnT.py resets AdamGnT's ``exp_avg_sq`` but not the ``exp_avg`` of the input filters
  (and both for the input bias and outgoing weights); clx zeroes every moment there, as for Dense layers;
- normalization: CBPConv resets a following batch norm's weight (1), bias (0) and running statistics;
  clx raises for a Conv layer with a normalization of its size in the params (``clx.models.AlexNet``;
  name its Dense layers in ``layers=`` to act on them alone).

Static shapes: a layer of width m has ``K = min(m, ceil(replacement_rate m))`` replacement slots per
step (``K = m`` when the rate is a traced sweep value; no slots and no replacement when it is a concrete
0), chosen by ``lax.top_k`` and switched on by ``slot < n``: jit-able and vmappable over seeds. The
selection (top_k, fresh draws, the absorbed biases) sits in a ``lax.cond`` on "some layer replaces at this
step" (with rho = 1e-4 and 100 units, one step in 100; under ``jax.vmap`` it runs at every step as a
select). The resets (K slots written in place) go inside the cond for small layers and, when the touched
kernels hold more than ``RESETS_OUTSIDE_COND_ELEMENTS`` (2^20) elements, outside it at every step, unchanged
where no slot is valid, so the params-sized steps and optimizer state do not pass through the cond (which
copied them: at 784-2000-2000-2000 and batch 1 a CBP step took 3.2x the SGD step with them inside, 2.3x
outside; at 784-100-100 and batch 16 inside is the cheaper, 1.38-1.68x against 1.53-1.78x). Both give the
same numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from clx.core import ContinualTransformation
from clx.plasticity._common import check_optimizer, check_unit_interval, need_key, need_params
from clx.plasticity._units import (
    Selection,
    check_count,
    check_init,
    contribution,
    fresh_inputs,
    hidden_layers,
    layer_init,
    need_taps,
    normalize_layers,
    reset_units,
    summed_out,
    unit_mean,
)
from clx.tree import by_path, concrete_float

_UTILITIES = ("contribution", "adaptable_contribution")


class CBPState(NamedTuple):
    inner: object  # the wrapped optimizer's state
    utility: dict  # hidden-layer kernel path -> (m,) float32: the running utility u (not bias-corrected)
    mean_act: dict  # kernel path -> (m,) float32: the running mean activation f (not bias-corrected)
    age: dict  # kernel path -> (m,) int32: steps since the unit was initialised or last replaced
    pending: dict  # kernel path -> () float32: the accumulated fractional count of replacements, in [0, 1)


def check_decay(who: str, decay) -> None:
    v = concrete_float(decay)
    if v is not None and not (0.0 <= v < 1.0):
        raise ValueError(f"{who}: decay must be in [0, 1), got {v}; the paper uses 0.99.")


# Above this many elements in the kernels CBP touches (the hidden layers' and the next ones'), the resets are
# written outside the lax.cond that selects the units (which would copy the params-sized steps every step);
# below, inside it. Measured on 2 CPU cores: 784-2000-2000-2000 at batch 1 (9.6M), a CBP step 3.16x the SGD
# step with the resets inside, 2.28x outside; 784-100-100-10 at batch 16 (89k), 1.38 / 1.68x inside against
# 1.53 / 1.78x outside in two A/B rounds.
RESETS_OUTSIDE_COND_ELEMENTS = 1 << 20


def cbp(
    optimizer: optax.GradientTransformation,
    replacement_rate=1e-4,
    decay=0.99,
    maturity=100,
    *,
    seed: int = 0,
    layers=None,
    init: str | None = None,
    utility: str = "contribution",
) -> ContinualTransformation:
    """Continual backprop (Dohare et al. 2024) around an optimizer: its step, then unit replacement.

    The final update of a step is the optimizer's step ``u`` (bit for bit at every entry not
    replaced) with the replaced units' input weights set to fresh draws, their input bias and
    outgoing weights to 0 and their mean contribution added to the next layer's bias (see the module
    docstring for the utility, the accumulation and where clx differs from the authors' code).
    ``consolidate`` moves nothing. ``replacement_rate = 0`` is the plain optimizer, bit for bit.

    The rule owns the optimizer (it declares ``"optimizer"``: its updates are the final steps, so the
    fresh weights are not scaled by a learning rate); chain clx gradient rules before it.

    Args:
      optimizer: a plain optax optimizer, e.g. ``optax.sgd(0.003)`` (the paper's Permuted MNIST step size).
      replacement_rate: rho in [0, 1], replacements per eligible unit per step (the paper: 1e-4 on
        Permuted MNIST, swept over {1e-4, 1e-5, 1e-6}; 3e-4 on Continual ImageNet).
      decay: eta in [0, 1) of the running utility and mean activation (0.99 in all the paper's experiments).
      maturity: m >= 1; a unit is eligible when its age exceeds it (100 in the paper).
      seed: folded into the step key for the fresh weights.
      layers: None (every hidden layer) or kernel paths of the hidden layers to act on.
      init: the fresh input weights' bound: None (the code's: "kaiming" for a Dense layer, "torch"'s
        sqrt(1 / (kh kw c_in)) for a Conv layer), or "kaiming", "torch", "lecun" or "xavier" for every layer.
      utility: "contribution" (the paper's Eq. 1) or "adaptable_contribution" (gnt.py's other choice).

    Returns:
      A ContinualTransformation named "cbp" with state :class:`CBPState`, needing ``"taps"``,
      ``"key"`` and ``"optimizer"`` (the model must be a ``clx.FunctionalModel``).

    Raises:
      ValueError: a concrete ``replacement_rate`` outside [0, 1], ``decay`` outside [0, 1),
        ``maturity`` below 1, an unknown ``init`` or ``utility`` (here); a ``layers`` entry that is not
        a hidden Dense or Conv layer of the params, a Conv layer with a normalization of its size
        (``init``); ``update`` without params, key or the taps.
      TypeError: ``optimizer`` is a clx rule or not an optax transformation; ``layers`` not a sequence of str.
    """
    who = "cbp"
    check_optimizer(who, optimizer)
    check_unit_interval(who, "replacement_rate", replacement_rate)
    check_decay(who, decay)
    check_count(who, "maturity", maturity)
    check_init(who, init, default="kaiming")
    if utility not in _UTILITIES:
        raise ValueError(f"{who}: utility must be one of {_UTILITIES}, got {utility!r}.")
    names = normalize_layers(who, layers)
    seed = int(seed)
    rate = concrete_float(replacement_rate)

    def slots(m: int) -> int:
        if rate is None:
            return m
        return min(m, math.ceil(rate * m)) if rate > 0 else 0

    def init_fn(params):
        hidden = hidden_layers(who, params, names)

        def zeros(shape, dtype=jnp.float32):  # a buffer of its own per leaf (the trainer donates the state)
            return {h.kernel: jnp.zeros(shape(h), dtype) for h in hidden}

        return CBPState(
            optimizer.init(params),
            zeros(lambda h: (h.m,)),
            zeros(lambda h: (h.m,)),
            zeros(lambda h: (h.m,), jnp.int32),
            zeros(lambda h: ()),
        )

    def update(updates, state, params=None, *, layer_inputs=None, key=None, **extra):
        del extra
        need_params(who, params)
        hidden = hidden_layers(who, params, names)
        need_taps(who, layer_inputs, hidden)
        need_key(who, key)
        steps, inner = optimizer.update(updates, state.inner, params)
        flat_p = by_path(params)
        flat_u = by_path(steps)
        base = jax.random.fold_in(key, seed)
        util, mean_act, age, pending = dict(state.utility), dict(state.mean_act), dict(state.age), dict(state.pending)
        todo = []  # (index in hidden, layer, slots, count n, u, f, a, corr, w_out) of layers that may replace
        for i, h in enumerate(hidden):
            x = layer_inputs[h.out].astype(jnp.float32)  # (R, G m): the layer's activations h
            w_out = (flat_p[h.out] + flat_u[h.out]).astype(jnp.float32)  # next kernel, after the optimizer's step
            a = state.age[h.kernel] + 1
            corr = 1.0 - jnp.power(jnp.asarray(decay, jnp.float32), a.astype(jnp.float32))  # (m,) > 0
            f = decay * state.mean_act[h.kernel] + (1.0 - decay) * unit_mean(h, x)
            if utility == "contribution":
                inst = contribution(h, jnp.abs(x), w_out)
            else:
                w_in = (flat_p[h.kernel] + flat_u[h.kernel]).astype(jnp.float32).reshape(h.d, h.m)
                dev = jnp.abs(x - jnp.tile(f / corr, h.groups))  # |h - f| of each unit, at its G columns
                inst = contribution(h, dev, w_out) / jnp.mean(jnp.abs(w_in), axis=0)
            u = decay * state.utility[h.kernel] + (1.0 - decay) * inst
            util[h.kernel], mean_act[h.kernel], age[h.kernel] = u, f, a
            k = slots(h.m)
            if k == 0:
                continue
            eligible = a > maturity
            n_eligible = jnp.sum(eligible).astype(jnp.float32)
            acc = state.pending[h.kernel] + replacement_rate * n_eligible
            n = jnp.clip(jnp.floor(acc), 0.0, jnp.minimum(float(k), n_eligible))
            pending[h.kernel] = (acc - n).astype(jnp.float32)
            todo.append((i, h, k, n, jnp.where(eligible, u / corr, jnp.inf), corr, w_out))

        def select(util, mean_act, age):
            """The units to reset (their slots, fresh input weights, the next biases' absorption) and the reset
            statistics; only small arrays, so the ``lax.cond`` around it copies nothing of params size."""
            util, mean_act, age = dict(util), dict(mean_act), dict(age)
            sels, fresh, absorb = [], [], []
            for i, h, k, n, score, corr, w_out in todo:
                _, index = jax.lax.top_k(-score, k)  # (k,) the k lowest utilities, eligible units first
                valid = jnp.arange(k) < n
                sel = Selection(index, valid)
                u, f, a = util[h.kernel], mean_act[h.kernel], age[h.kernel]
                mean_i = jnp.take(f / corr, index)  # (k,) bias-corrected mean activation, read before its reset
                contrib = jnp.take(summed_out(h, w_out), index, axis=0) * mean_i[:, None]  # (k, k_next)
                absorb.append(jnp.sum(jnp.where(valid[:, None], contrib, 0.0), axis=0))
                util[h.kernel] = u.at[index].set(jnp.where(valid, 0.0, u[index]), unique_indices=True)
                mean_act[h.kernel] = f.at[index].set(jnp.where(valid, 0.0, f[index]), unique_indices=True)
                age[h.kernel] = a.at[index].set(jnp.where(valid, 0, a[index]), unique_indices=True)
                bound = layer_init(init, h, "kaiming", "torch")
                fresh.append(fresh_inputs(jax.random.fold_in(base, i), h, sel, bound, flat_p[h.kernel].dtype))
                sels.append(sel)
            return util, mean_act, age, sels, fresh, absorb

        def keep(util, mean_act, age):
            """No unit replaced: slots 0..k-1 marked invalid, so ``reset_units`` leaves every array as it is."""
            sels, fresh, absorb = [], [], []
            for _, h, k, _, _, _, w_out in todo:
                sels.append(Selection(jnp.arange(k), jnp.zeros((k,), bool)))
                fresh.append(jnp.zeros((h.d, k), flat_p[h.kernel].dtype))
                absorb.append(jnp.zeros(summed_out(h, w_out).shape[1:], jnp.float32))
            return dict(util), dict(mean_act), dict(age), sels, fresh, absorb

        if todo:  # the replacement work runs only at a step that replaces (a select under vmap)
            any_n = jnp.any(jnp.stack([t[3] for t in todo]) > 0)
            layers = [t[1] for t in todo]
            touched = sum(flat_p[h.kernel].size + flat_p[h.out].size for h in layers)
            if touched > RESETS_OUTSIDE_COND_ELEMENTS:  # large layers: only the selection in the cond; the
                # resets every step, K slots in place, changing nothing where no slot is valid
                util, mean_act, age, sels, fresh, absorb = jax.lax.cond(any_n, select, keep, util, mean_act, age)
                steps, inner = reset_units(steps, params, inner, layers, sels, fresh, absorb)
            else:  # small layers: everything in the cond (the steps it carries are cheap to copy)

                def replace(steps, inner, util, mean_act, age):
                    util, mean_act, age, sels, fresh, absorb = select(util, mean_act, age)
                    steps, inner = reset_units(steps, params, inner, layers, sels, fresh, absorb)
                    return steps, inner, util, mean_act, age

                steps, inner, util, mean_act, age = jax.lax.cond(
                    any_n, replace, lambda *a: a, steps, inner, util, mean_act, age
                )
        return steps, CBPState(inner, util, mean_act, age, pending)

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(
        init_fn, update, consolidate, needs=frozenset({"taps", "key", "optimizer"}), name="cbp"
    )
