"""ReDo (clx.plasticity.redo): the dormancy score on hand-made activations, exactly the dormant
units recycled (fresh inputs, zero input bias and outgoing weights, zero Adam moments), nothing
before the period, the output kept when the recycled units were silent, vmapped seeds, bad input.

One jitted step (Adam with a traced learning rate, tau and period) serves most tests."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx.metrics import dormant_fraction
from clx.plasticity import dormant_scores, redo

W, N = 8, 16
L0, L1, L2 = "layers/0/kernel", "layers/1/kernel", "layers/2/kernel"


def _model(seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(6, (W, W), 3, rngs=nnx.Rngs(seed)))


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (N, 6))


def _update(lr, tau, period, g, s, p, taps, key):
    return redo(optax.adam(lr), tau, period).update(g, s, p, layer_inputs=taps, key=key)


_step = jax.jit(_update)
_RULE = redo(optax.adam(1e-2))


def _grads(q, i=0):
    return jax.tree.map(lambda a: jnp.sin(a * (i + 1)) + 0.1, q)


def _run(tau, period, params, taps, steps, lr=0.0, grads=None):
    state, out = _RULE.init(params), []
    for i in range(steps):
        g = grads(params, i) if grads is not None else jax.tree.map(jnp.zeros_like, params)
        u, state = _step(lr, tau, period, g, state, params, taps, jax.random.key(i))
        params = optax.apply_updates(params, u)
        out.append((params, state))
    return out


def test_score_on_hand_made_activations():
    h = jnp.array([[0.0, 1.0, 2.0, -4.0], [0.0, 3.0, 2.0, 0.0]])  # mean|h| = (0, 2, 2, 2), layer mean 1.5
    np.testing.assert_allclose(dormant_scores(h), [0.0, 4 / 3, 4 / 3, 4 / 3], rtol=1e-6)
    h = jnp.array([[0.1, 1.0, -1.0, 2.0]])  # (0.1, 1, 1, 2) / 1.025
    np.testing.assert_allclose(dormant_scores(h), np.array([0.1, 1, 1, 2]) / 1.025, rtol=1e-6)
    assert float(dormant_fraction(h, 0.1)) == 0.25 and float(dormant_fraction(h, 0.09)) == 0.0  # same score
    np.testing.assert_array_equal(dormant_scores(jnp.zeros((3, 5))), 0.0)  # a silent layer: all dormant at tau 0


def _hand_taps():
    """Hidden activations with |h| constant per unit: scores (1, 1, 0.05, 1, 1, 0.2, 1, 0) / 0.65625."""
    mean_abs = jnp.array([1.0, 1.0, 0.05, 1.0, 1.0, 0.2, 1.0, 0.0])
    h = jnp.tile(mean_abs, (N, 1)) * jnp.where(jnp.arange(N) % 2 == 0, 1.0, -1.0)[:, None]
    return {L0: jnp.ones((N, 6)), L1: h, L2: h}


@pytest.mark.parametrize("tau,dormant", [(0.1, [2, 7]), (0.5, [2, 5, 7]), (0.0, [7])])
def test_exactly_the_dormant_units_are_recycled(tau, dormant):
    m, p = _model()
    ((after, state),) = _run(tau, 1, p, _hand_taps(), 1)  # lr 0: only the recycling moves the params
    assert int(state.count) == 1
    live = [i for i in range(W) if i not in dormant]
    for i in (0, 1):
        lay, new, nxt = p["layers"][i], after["layers"][i], after["layers"][i + 1]
        kernel = np.asarray(new["kernel"])
        fresh = kernel[:, dormant]
        bound = np.sqrt(6 / (kernel.shape[0] + W))  # xavier-uniform, the official code's draw
        assert np.all(fresh != 0) and np.all(np.abs(fresh) <= bound)
        assert not np.any(fresh == np.asarray(lay["kernel"])[:, dormant])
        np.testing.assert_array_equal(np.asarray(new["bias"])[dormant], 0.0)
        out_rows = np.asarray(nxt["kernel"])[dormant]
        if i == 0:  # where hidden layer 1's recycled units meet them, their fresh input weights win
            out_rows = np.delete(out_rows, dormant, axis=1)
        np.testing.assert_array_equal(out_rows, 0.0)
        np.testing.assert_array_equal(np.asarray(new["bias"])[live], np.asarray(lay["bias"])[live])
    # every other entry keeps its value bit for bit
    k0, k1, k2 = (np.asarray(after["layers"][i]["kernel"]) for i in range(3))
    p0, p1, p2 = (np.asarray(p["layers"][i]["kernel"]) for i in range(3))
    np.testing.assert_array_equal(k0[:, live], p0[:, live])
    np.testing.assert_array_equal(k1[np.ix_(live, live)], p1[np.ix_(live, live)])
    np.testing.assert_array_equal(k2[live], p2[live])
    chex.assert_trees_all_equal(after["layers"][2]["bias"], p["layers"][2]["bias"])  # no bias absorption


def test_nothing_changes_before_the_period_and_adam_moments_are_zeroed_at_it():
    m, p = _model()
    taps = _hand_taps()
    opt = optax.adam(1e-2)
    plain, o, q = jax.jit(opt.update), opt.init(p), p
    runs = _run(0.1, 3, p, taps, 3, lr=1e-2, grads=_grads)
    for i, (params, state) in enumerate(runs[:2]):  # steps 1, 2: the plain optimizer, bit for bit
        v, o = plain(_grads(q, i), o, q)
        q = optax.apply_updates(q, v)
        chex.assert_trees_all_equal(params, q)
        chex.assert_trees_all_equal(state.inner, o)
    params, state = runs[2]  # step 3: units 2 and 7 of both hidden layers recycled
    assert int(state.count) == 3
    adam = state.inner[0]
    for moment in (adam.mu, adam.nu):
        for i in (0, 1):
            k, b = np.asarray(moment["layers"][i]["kernel"]), np.asarray(moment["layers"][i]["bias"])
            assert np.all(k[:, [2, 7]] == 0) and np.all(b[[2, 7]] == 0)
            assert np.all(np.delete(b, [2, 7]) != 0)
        assert np.all(np.asarray(moment["layers"][2]["kernel"])[[2, 7]] == 0)
    np.testing.assert_array_equal(np.asarray(params["layers"][2]["kernel"])[[2, 7]], 0.0)
    assert _RULE.consolidate(state, params, None) == (None, state)


def test_output_is_kept_when_the_recycled_units_were_silent():
    m, p = _model(seed=3)
    for i, dead in enumerate((2, 5)):  # one silent unit per hidden layer, the others active on most inputs
        lay = p["layers"][i]
        lay["kernel"] = lay["kernel"].at[:, dead].set(0.0)
        lay["bias"] = jnp.ones((W,)).at[dead].set(-1.0)
    x = _x()
    before, taps = m.apply_with_taps(p, x)
    for i, dead in enumerate((2, 5)):
        s = np.asarray(dormant_scores(taps[(L1, L2)[i]]))
        assert s[dead] == 0 and np.all(np.delete(s, dead) > 0.1)
    ((after, _),) = _run(0.1, 1, p, taps, 1)
    np.testing.assert_array_equal(np.asarray(after["layers"][1]["kernel"])[2, np.arange(W) != 5], 0.0)
    np.testing.assert_array_equal(np.asarray(after["layers"][2]["kernel"])[5], 0.0)
    assert not np.allclose(after["layers"][0]["kernel"][:, 2], 0.0)  # fresh inputs
    np.testing.assert_allclose(m.apply(after, x), before, atol=1e-6)


def test_vmapped_seeds_recycle_the_same_units_with_their_own_draws():
    m, p = _model()
    s = _RULE.init(p)
    seeds = jnp.arange(3)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(seeds)
    steps, states = jax.jit(jax.vmap(lambda k: _update(1e-2, 0.1, 1, _grads(p), s, p, _hand_taps(), k)))(keys)
    cols = np.asarray(steps["layers"][0]["kernel"])[:, :, [2, 7]]  # (3, d, 2)
    assert not np.any(cols[0] == cols[1]) and not np.any(cols[1] == cols[2])
    rows = np.asarray(steps["layers"][2]["kernel"] + p["layers"][2]["kernel"])[:, [2, 7]]
    np.testing.assert_array_equal(rows, 0.0)  # every member zeroed the same outgoing rows
    np.testing.assert_array_equal(states.count, 1)


@pytest.mark.parametrize(
    "build,err,match",
    [
        (lambda: redo(optax.sgd(0.1), -0.1), ValueError, "tau must be a finite value >= 0"),
        (lambda: redo(optax.sgd(0.1), float("nan")), ValueError, "tau must be a finite value >= 0"),
        (lambda: redo(optax.sgd(0.1), period=0), ValueError, "period must be an integer >= 1"),
        (lambda: redo(optax.sgd(0.1), period=1.5), ValueError, "period must be an integer >= 1"),
        (lambda: redo(optax.sgd(0.1), init="zeros"), ValueError, "init must be one of"),
        (lambda: redo(optax.sgd(0.1), layers=[3]), TypeError, "sequence of kernel paths"),
        (lambda: redo(clx.chain(optax.sgd(0.1))), TypeError, "plain optax optimizer"),
    ],
)
def test_bad_hyperparameters_raise_in_the_factory(build, err, match):
    with pytest.raises(err, match=match):
        build()


def test_bad_layers_and_calls_raise():
    m, p = _model()
    with pytest.raises(ValueError, match=r"layers \['head/kernel'\] are not hidden Dense layers"):
        redo(optax.sgd(0.1), layers=["head"]).init(p)
    rule = redo(optax.sgd(0.1), layers=["layers/1/kernel"])
    s = rule.init(p)
    with pytest.raises(ValueError, match="update needs layer_inputs="):
        rule.update(p, s, p, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no tap 'layers/2/kernel'"):
        rule.update(p, s, p, layer_inputs={L0: _x()}, key=jax.random.key(0))
    with pytest.raises(ValueError, match="update needs key="):
        rule.update(p, s, p, layer_inputs=_hand_taps())
    assert rule.needs == {"taps", "key", "optimizer"}
