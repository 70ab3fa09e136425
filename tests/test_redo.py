"""ReDo (clx.plasticity.redo): the dormancy score on hand-made activations, exactly the dormant
units recycled (fresh inputs, zero input bias and outgoing weights, zero Adam moments), nothing
before the period, the output kept when the recycled units were silent, vmapped seeds, bad input.

One jitted step (Adam with a traced learning rate, tau and period) serves most tests."""

import _cl_tiny  # tests/ is on sys.path under pytest
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


# --- Conv layers: units are output channels -------------------------------------------------------------------------

C1, C2, FC = "conv1/kernel", "conv2/kernel", "fc/kernel"


def kept_out(gone):
    return [c for c in range(4) if c not in gone]


def _rows(c, m=4, positions=4):
    """The rows of channel c in a Dense kernel after a channels-last flatten: p m + c."""
    return [p * m + c for p in range(positions)]


def test_channel_score_is_the_mean_over_batch_and_positions():
    h = np.zeros((2, 2, 2, 3), np.float32)
    h[0, :, :, 0] = [[1, -3], [0, 4]]  # channel 0: |h| sums to 8 over 8 entries: 1
    h[1, 0, 0, 1] = 0.4  # channel 1: 0.05
    h[:, :, :, 2] = -2.0  # channel 2: 2
    np.testing.assert_allclose(dormant_scores(h), np.array([1.0, 0.05, 2.0]) / (3.05 / 3), rtol=1e-6)
    np.testing.assert_allclose(dormant_scores(h), dormant_scores(h.reshape(-1, 3)), rtol=1e-6)  # positions = rows
    with pytest.raises(ValueError, match=r"at least 2 axes, got shape \(3,\)"):
        dormant_scores(jnp.ones(3))


@pytest.mark.parametrize("tau,gone1,gone2", [(0.1, [1], [0]), (0.4, [1], [0, 3]), (0.0, [], [0])])
def test_conv_channels_recycled_by_their_score_on_the_taps(tau, gone1, gone2):
    _, p = clx.FunctionalModel.from_module(_cl_tiny.TinyCNN(nnx.Rngs(0)))
    act1 = np.ones((N, 3, 3, 3), np.float32)  # conv1's pooled maps as conv2's 2x2 windows read them
    act1[..., 1] = 0.0
    act1[:, 1, 1, 1] = 0.2  # only at the center, which 4 of the 16 window taps read: 0.05 (the plain mean: 0.022)
    act2 = np.ones((N, 2, 2, 4), np.float32)  # conv2's maps, flattened: channel 0 silent, 3 at 1 of 4 positions
    act2[..., 0] = 0.0
    act2[..., 3] = 0.0
    act2[:, 0, 1, 3] = 0.8  # mean 0.2 over the positions
    taps = {
        C1: jnp.ones((N * 36, 9)),
        C2: clx.functional.conv_patches(jnp.asarray(act1), (2, 2, 3, 4)),
        FC: jnp.asarray(act2.reshape(N, -1)),
    }
    # scores: conv1 (1, 0.05, 1) / 0.6833 = (1.46, 0.073, 1.46); conv2 (0, 1, 1, 0.2) / 0.55 = (0, 1.82, 1.82, 0.36)
    ((after, _),) = _run(tau, 1, p, taps, 1)
    kept_in = [c for c in range(3) if c not in gone1]  # conv2's filters, less the slices of conv1's recycled channels
    for name, gone, m, ins in (("conv1", gone1, 3, [0]), ("conv2", gone2, 4, kept_in)):
        new, old = np.asarray(after[name]["kernel"])[:, :, ins], np.asarray(p[name]["kernel"])[:, :, ins]
        assert [c for c in range(m) if not np.array_equal(new[..., c], old[..., c])] == gone
    np.testing.assert_array_equal(np.asarray(after["conv2"]["kernel"])[:, :, gone1][..., kept_out(gone2)], 0.0)
    zero_rows = [r for r in range(16) if np.all(np.asarray(after["fc"]["kernel"])[r] == 0)]
    assert zero_rows == sorted(sum((_rows(c) for c in gone2), []))


def test_conv_recycling_keeps_the_function_and_zeroes_the_moments_of_exactly_those_channels():
    m, p = clx.FunctionalModel.from_module(_cl_tiny.TinyCNN(nnx.Rngs(3)))
    p["conv1"]["kernel"] = p["conv1"]["kernel"].at[..., 1].set(0.0)  # conv1's channel 1 and conv2's channel 0 silent
    p["conv1"]["bias"] = jnp.array([1.0, -1.0, 1.0])
    p["conv2"]["kernel"] = jnp.abs(p["conv2"]["kernel"]).at[..., 0].set(0.0)  # the others active (inputs >= 0)
    p["conv2"]["bias"] = jnp.array([-1.0, 1.0, 1.0, 1.0])
    x = jax.random.normal(jax.random.key(1), (N, 8, 8, 1))
    before, taps = m.apply_with_taps(p, x)
    ((after, _),) = _run(0.1, 1, p, taps, 1)  # lr 0: only the recycling moves the params
    np.testing.assert_allclose(m.apply(after, x), before, atol=1e-6)
    k1, k2 = np.asarray(after["conv1"]["kernel"]), np.asarray(after["conv2"]["kernel"])
    for fresh, fan_in, fan_out in ((k1[..., 1], 9, 27), (k2[..., 0], 12, 16)):  # xavier over the kernel's shape
        bound = np.sqrt(6 / (fan_in + fan_out))
        assert np.all(fresh != 0) and np.all(np.abs(fresh) <= bound) and np.max(np.abs(fresh)) > 0.6 * bound
    np.testing.assert_array_equal(k2[:, :, 1, 1:], 0.0)  # outgoing slices of conv1's channel 1 (channel 0: fresh)
    np.testing.assert_array_equal(np.asarray(after["fc"]["kernel"])[_rows(0)], 0.0)
    np.testing.assert_array_equal(np.asarray(after["conv2"]["bias"]), [0.0, 1.0, 1.0, 1.0])
    runs = _run(0.1, 2, p, taps, 2, lr=1e-2, grads=_grads)  # step 2 recycles the same channels, after Adam's steps
    expect = jax.tree.map(lambda a: np.zeros(a.shape, bool), p)
    expect["conv1"]["kernel"][..., 1] = expect["conv1"]["bias"][1] = True
    expect["conv2"]["kernel"][:, :, 1, :] = expect["conv2"]["kernel"][..., 0] = expect["conv2"]["bias"][0] = True
    expect["fc"]["kernel"][_rows(0)] = True
    adam = runs[-1][1].inner[0]
    for moment in (adam.mu, adam.nu):
        jax.tree.map(lambda a, e: np.testing.assert_array_equal(np.asarray(a) == 0, e), moment, expect)


def test_conv_with_batch_norm_raises():
    from clx.models import AlexNet

    net = nnx.eval_shape(lambda: AlexNet((19, 19, 3), 3, 1, channels=(2, 3, 4), hidden=(5, 6), rngs=nnx.Rngs(0)))
    p = jax.tree.map(lambda a: jnp.zeros(a.shape), nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    with pytest.raises(ValueError, match=r"redo: Conv layer 'conv1/kernel' has 2 channels .*\['bn1/scale'\]"):
        redo(optax.sgd(0.1)).init(p)
