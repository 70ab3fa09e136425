"""Continual backprop (clx.plasticity.cbp): the number of replacements over steps with the
fractional accumulation, only mature units and the lowest utilities, the network's output kept by
zero outgoing weights and the bias absorption, the optimizer's moments zeroed, bit-identity at rate
0, jit + vmap over members (one key each), bad input.

One jitted step (Adam with a traced learning rate, rate and maturity) serves every test but the
vmapped one: lr 0 leaves the params to the replacements alone."""

import _cl_tiny  # tests/ is on sys.path under pytest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx.plasticity import cbp

W, N = 8, 16  # hidden width, examples per batch
L0, L1 = "layers/0/kernel", "layers/1/kernel"  # the two hidden layers


def _model(seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(6, (W, W), 3, rngs=nnx.Rngs(seed)))


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (N, 6))


def _update(lr, rate, maturity, g, s, p, taps, key):
    return cbp(optax.adam(lr), rate, maturity=maturity).update(g, s, p, layer_inputs=taps, key=key)


_step = jax.jit(_update)
_RULE = cbp(optax.adam(1e-2))  # for init (the state does not depend on the hyperparameters)


def _grads(q, i=0):
    return jax.tree.map(lambda a: jnp.sin(a * (i + 1)) + 0.1, q)


def _run(rate, maturity, params, taps, steps, lr=0.0, grads=None):
    """``steps`` updates on fixed taps; returns the params and the states after each step."""
    state, states = _RULE.init(params), []
    for i in range(steps):
        g = grads(params, i) if grads is not None else jax.tree.map(jnp.zeros_like, params)
        u, state = _step(lr, rate, maturity, g, state, params, taps, jax.random.key(i))
        params = optax.apply_updates(params, u)
        states.append(state)
    return params, states


def _replaced(states, layer=L0):
    """Units replaced at each step: those whose age went back to 0."""
    return [set(np.flatnonzero(np.asarray(s.age[layer]) == 0).tolist()) for s in states]


def _reference_counts(rate, width, maturity, steps):
    """Replacements per step by the rule's arithmetic (float32 pending), with replaced units' ages reset."""
    age, pending, counts = np.zeros(width, np.int64), np.float32(0), []
    for _ in range(steps):
        age += 1
        eligible = age > maturity
        pending = np.float32(pending + np.float32(rate) * np.float32(eligible.sum()))
        n = int(min(np.floor(pending), eligible.sum()))
        pending = np.float32(pending - n)
        age[np.flatnonzero(eligible)[:n]] = 0  # which ones does not change the count
        counts.append(n)
    return counts


def test_replacement_count_accumulates_fractions_over_steps():
    m, p = _model()
    _, taps = m.apply_with_taps(p, _x())
    # rate 1/4, 8 units, maturity 3: nothing before step 4 (age > 3), then 8/4 = 2; then 6/4 -> 1 (0.5 left),
    # 5/4 -> 1 (0.75 left), 4/4 -> 1 (0.75), 5/4 (the step-4 units have matured) -> 2 (0 left).
    _, states = _run(0.25, 3, p, taps, 8)
    for layer in (L0, L1):
        assert [len(r) for r in _replaced(states, layer)] == [0, 0, 0, 2, 1, 1, 1, 2]
        np.testing.assert_array_equal([float(s.pending[layer]) for s in states], [0, 0, 0, 0, 0.5, 0.75, 0.75, 0])
    # a rate that is no binary fraction, over more steps: the float32 accumulation of the reference
    _, states = _run(0.1, 2, p, taps, 40)
    assert [len(r) for r in _replaced(states)] == _reference_counts(0.1, W, 2, 40)
    assert sum(len(r) for r in _replaced(states)) > 5


def test_only_mature_units_and_the_lowest_utility_are_replaced():
    m, p = _model()
    p["layers"][1]["kernel"] = jnp.ones((W, W))  # equal outgoing magnitudes: utility ranks by mean|h|
    p["layers"][2]["kernel"] = jnp.ones((W, 3))
    mean_abs = jnp.array([0.9, 0.8, 0.2, 0.7, 0.6, 0.1, 0.5, 0.4])  # unit 5 lowest, then 2, then 7
    h = jnp.tile(mean_abs, (N, 1)) * jnp.where(jnp.arange(N) % 2 == 0, 1.0, -1.0)[:, None]  # |h| constant
    taps = {L0: jnp.ones((N, 6)), L1: h, "layers/2/kernel": h}
    _, states = _run(0.125, 2, p, taps, 6)  # rate 1/8: 8/8 = 1 per step once mature
    # step 3: all mature (age 3 > 2), pending 1: unit 5. Step 4: 7 eligible, 0.875: none. Step 5: 1.75 -> one,
    # and unit 5 (its utility now 0: zero outgoing weights) is not mature again (age 2): the next lowest, 2.
    # Step 6: 0.75 + 7/8 = 1.625 -> one: unit 5 is mature again (age 3) with the lowest utility.
    for layer in (L0, L1):
        assert _replaced(states, layer) == [set(), set(), {5}, set(), {2}, {5}]
    u = np.asarray(states[1].utility[L0])  # before any replacement: (1 - 0.99^2) mean|h| mean|w_out|
    np.testing.assert_allclose(u, (1 - 0.99**2) * np.asarray(mean_abs), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(states[1].mean_act[L0]), 0.0, atol=1e-7)  # h averages to 0


def test_function_is_kept_by_zero_outgoing_weights_and_the_bias_absorption():
    m, p = _model(seed=3)
    x = _x()
    # in each hidden layer one dead unit and one of constant activation with small outgoing weights
    for i, (dead, const, c) in enumerate([(2, 5, 0.7), (3, 6, 0.5)]):
        lay, nxt = p["layers"][i], p["layers"][i + 1]
        lay["kernel"] = lay["kernel"].at[:, dead].set(0.0).at[:, const].set(0.0)
        lay["bias"] = jnp.ones((W,)).at[dead].set(-1.0).at[const].set(c)  # the others: active on most inputs
        nxt["kernel"] = nxt["kernel"].at[const].set(0.01 * jnp.sign(nxt["kernel"][const]))
    before, taps = m.apply_with_taps(p, x)
    after, states = _run(0.25, 1, p, taps, 2)  # step 2: 8 mature units x 0.25 = 2 replaced per layer
    assert _replaced(states, L0) == [set(), {2, 5}] and _replaced(states, L1) == [set(), {3, 6}]
    np.testing.assert_allclose(m.apply(after, x), before, atol=1e-5)  # the output is unchanged
    for i, gone in enumerate(([2, 5], [3, 6])):
        gone = jnp.array(gone)
        out = np.asarray(after["layers"][i + 1]["kernel"][gone])
        if i == 0:  # where layer 1's replaced units 3 and 6 meet them, their fresh input weights win (as in gnt.py)
            assert np.all(out[:, [3, 6]] != 0)
            out = np.delete(out, [3, 6], axis=1)
        np.testing.assert_array_equal(out, 0.0)
        np.testing.assert_array_equal(after["layers"][i]["bias"][gone], 0.0)
        fresh = np.asarray(after["layers"][i]["kernel"][:, gone])
        bound = np.sqrt(6 / after["layers"][i]["kernel"].shape[0])  # Kaiming-uniform: sqrt(2) sqrt(3 / d)
        assert np.all(fresh != 0) and np.all(np.abs(fresh) <= bound)
    # hidden layer 1's bias absorbed 0.7 x unit 5's outgoing weights (then units 3 and 6 were reset to 0)
    keep = jnp.array([i for i in range(W) if i not in (3, 6)])
    absorbed = (after["layers"][1]["bias"] - p["layers"][1]["bias"])[keep]
    np.testing.assert_allclose(absorbed, 0.7 * p["layers"][1]["kernel"][5][keep], rtol=1e-5, atol=1e-7)
    assert np.all(np.abs(np.asarray(absorbed)) > 0)
    # without the absorption (what the authors' gnt.py ends up adding: 0) the output would move
    lost = jax.tree.map(lambda a: a, after)
    lost["layers"][2]["bias"] = p["layers"][2]["bias"]
    assert np.max(np.abs(m.apply(lost, x) - before)) > 1e-4
    kept = jnp.array([i for i in range(W) if i not in (2, 5)])  # everything else: the plain step (lr 0)
    chex.assert_trees_all_equal(after["layers"][0]["kernel"][:, kept], p["layers"][0]["kernel"][:, kept])


def test_adam_moments_of_replaced_units_are_zero():
    m, p = _model()
    _, taps = m.apply_with_taps(p, _x())
    _, states = _run(0.25, 1, p, taps, 2, lr=1e-2, grads=_grads)
    adam = states[-1].inner[0]
    for i, layer in enumerate((L0, L1)):
        gone = np.array(sorted(_replaced(states, layer)[-1]))
        assert len(gone) == 2  # step 2: 8 mature units x 0.25
        for moment in (adam.mu, adam.nu):
            k, b = np.asarray(moment["layers"][i]["kernel"]), np.asarray(moment["layers"][i]["bias"])
            nxt = np.asarray(moment["layers"][i + 1]["kernel"])
            assert np.all(k[:, gone] == 0) and np.all(b[gone] == 0) and np.all(nxt[gone] == 0)
            assert np.all(np.delete(b, gone) != 0)  # the other units keep their moments
    assert np.all(np.asarray(adam.mu["layers"][2]["bias"]) != 0)  # the output layer's bias moments are kept
    assert int(adam.count) == 2  # optax's one step count is left as it is


def test_rate_zero_is_the_plain_optimizer_bit_for_bit():
    m, p = _model()
    _, taps = m.apply_with_taps(p, _x())
    opt = optax.adam(1e-2)
    plain = jax.jit(opt.update)
    s, o, q1, q2 = _RULE.init(p), opt.init(p), p, p
    for i in range(4):  # a traced rate 0: every layer has W slots, none switched on
        u, s = _step(1e-2, 0.0, 1, _grads(q1, i), s, q1, taps, jax.random.key(i))
        v, o = plain(_grads(q2, i), o, q2)
        chex.assert_trees_all_equal(u, v)
        q1, q2 = optax.apply_updates(q1, u), optax.apply_updates(q2, v)
    chex.assert_trees_all_equal(s.inner, o)
    np.testing.assert_array_equal(s.age[L0], 4)  # units mature (age > 1) but none replaced
    # a concrete rate 0 takes no replacement slots at all: the plain step too
    rule = cbp(opt, 0.0, maturity=1)
    u, s0 = rule.update(_grads(p), rule.init(p), p, layer_inputs=taps, key=jax.random.key(0))
    chex.assert_trees_all_equal(u, opt.update(_grads(p), opt.init(p), p)[0])
    assert rule.consolidate(s0, p, None) == (None, s0)


def test_vmapped_members_match_their_solo_runs_and_differ_by_key():
    m, p = _model()
    _, taps = m.apply_with_taps(p, _x())
    s = _RULE.init(p)
    s = s._replace(age={k: a + 1 for k, a in s.age.items()})  # mature already: step 1 replaces 2 per layer
    keys = jax.random.split(jax.random.key(0), 3)
    steps, states = jax.jit(jax.vmap(lambda k: _update(1e-2, 0.25, 1, _grads(p), s, p, taps, k)))(keys)
    for i in range(3):
        alone = _step(1e-2, 0.25, 1, _grads(p), s, p, taps, keys[i])
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], (steps, states)), alone, atol=1e-6)
    gone = [_replaced([jax.tree.map(lambda a: a[i], states)])[0] for i in range(3)]
    assert len(gone[0]) == 2 and gone[0] == gone[1] == gone[2]  # the same data picks the same units
    cols = [np.asarray(steps["layers"][0]["kernel"][i])[:, sorted(gone[0])] for i in range(3)]
    assert not np.any(cols[0] == cols[1]) and not np.any(cols[1] == cols[2])  # fresh draws differ by key


@pytest.mark.parametrize(
    "build,err,match",
    [
        (lambda: cbp(optax.sgd(0.1), 1.5), ValueError, r"replacement_rate must be in \[0, 1\]"),
        (lambda: cbp(optax.sgd(0.1), -1e-4), ValueError, r"replacement_rate must be in \[0, 1\]"),
        (lambda: cbp(optax.sgd(0.1), decay=1.0), ValueError, r"decay must be in \[0, 1\)"),
        (lambda: cbp(optax.sgd(0.1), decay=-0.5), ValueError, r"decay must be in \[0, 1\)"),
        (lambda: cbp(optax.sgd(0.1), maturity=0), ValueError, "maturity must be an integer >= 1"),
        (lambda: cbp(optax.sgd(0.1), maturity=2.5), ValueError, "maturity must be an integer >= 1"),
        (lambda: cbp(optax.sgd(0.1), init="orthogonal"), ValueError, "init must be one of"),
        (lambda: cbp(optax.sgd(0.1), utility="weight"), ValueError, "utility must be one of"),
        (lambda: cbp(optax.sgd(0.1), layers="layers/0"), TypeError, "sequence of kernel paths"),
        (lambda: cbp(clx.chain(optax.sgd(0.1)), 1e-4), TypeError, "plain optax optimizer"),
        (lambda: cbp(object()), TypeError, "optax GradientTransformation"),
    ],
)
def test_bad_hyperparameters_raise_in_the_factory(build, err, match):
    with pytest.raises(err, match=match):
        build()


def test_bad_layers_and_calls_raise():
    m, p = _model()
    with pytest.raises(ValueError, match=r"layers \['layers/2/kernel'\] are not hidden Dense layers.*layers/0/kernel"):
        cbp(optax.sgd(0.1), layers=["layers/2"]).init(p)  # the output layer has no next layer
    with pytest.raises(ValueError, match="layers/7/kernel"):
        cbp(optax.sgd(0.1), layers=["layers/7/kernel"]).init(p)
    state = cbp(optax.sgd(0.1), layers=["layers/1"]).init(p)
    assert set(state.age) == {L1}  # layers= restricts the rule
    rule = cbp(optax.sgd(0.1))
    s = rule.init(p)
    with pytest.raises(ValueError, match="update needs layer_inputs="):
        rule.update(p, s, p, key=jax.random.key(0))
    with pytest.raises(ValueError, match="update needs key="):
        rule.update(p, s, p, layer_inputs=m.apply_with_taps(p, _x())[1])
    with pytest.raises(ValueError, match="no tap 'layers/1/kernel'"):
        rule.update(p, s, p, layer_inputs={L0: _x()}, key=jax.random.key(0))
    assert rule.needs == {"taps", "key", "optimizer"}
    with pytest.raises(ValueError, match="no hidden Dense layer"):
        rule.init({"w": jnp.ones((3, 2))})


# --- Conv layers: units are output channels -------------------------------------------------------------------------

C1, C2, FC = "conv1/kernel", "conv2/kernel", "fc/kernel"


def _cnn(seed=0):
    return clx.FunctionalModel.from_module(_cl_tiny.TinyCNN(nnx.Rngs(seed)))


def _images(seed=1):
    return jax.random.normal(jax.random.key(seed), (N, 8, 8, 1))


def _rows(c, m=4, positions=4):
    """The rows of channel c in a Dense kernel after a channels-last flatten: p m + c."""
    return [p * m + c for p in range(positions)]


def test_conv_layers_are_found_with_their_transitions():
    from clx.models import LeNet
    from clx.plasticity._units import hidden_layers

    _, p = _cnn()
    (h1, h2) = hidden_layers("cbp", p, None)
    assert (h1.kernel, h1.out, h1.kind, h1.groups, h1.d, h1.m, h1.window) == (C1, C2, "conv", 4, 9, 3, 9)
    assert (h2.kernel, h2.out, h2.kind, h2.groups, h2.d, h2.m, h2.window) == (C2, FC, "conv_dense", 4, 12, 4, 4)
    lenet = nnx.eval_shape(lambda: LeNet((16, 16, 1), 10, channels=(2, 3), hidden=5, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(lenet, nnx.Param))
    got = [(h.kernel, h.kind, h.groups) for h in hidden_layers("cbp", params, None)]  # 16 -> 12 -> 6 -> 2 -> 1
    assert got == [(C1, "conv", 25), (C2, "conv_dense", 1), (FC, "dense", 1)]


def test_conv_utility_and_mean_are_the_hand_computation():
    m, p = _cnn()
    rng = np.random.default_rng(0)
    act1 = rng.normal(size=(N, 3, 3, 3)).astype(np.float32)  # conv1's pooled maps, as conv2 reads them
    act2 = rng.normal(size=(N, 2, 2, 4)).astype(np.float32)  # conv2's maps, flattened into fc
    taps = {
        C1: jnp.ones((N * 36, 9)),
        C2: clx.functional.conv_patches(jnp.asarray(act1), p["conv2"]["kernel"].shape),  # (N * 4, 2 * 2 * 3)
        FC: jnp.asarray(act2.reshape(N, -1)),
    }
    _, (s,) = _run(0.0, 1, p, taps, 1)  # no replacement; lr 0: w' = w
    # conv1 -> conv2: conv2's 2x2 windows see the 3x3 map's corners once, edges twice, the center 4 times
    weight = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16
    mean_abs = np.einsum("nhwc,hw->c", np.abs(act1), weight) / N
    mean = np.einsum("nhwc,hw->c", act1, weight) / N
    out_mag = np.abs(np.asarray(p["conv2"]["kernel"])).mean(axis=(0, 1, 3))  # convGnT: weight.abs().mean((0, 2, 3))
    np.testing.assert_allclose(s.utility[C1], 0.01 * mean_abs * out_mag, rtol=1e-5)
    np.testing.assert_allclose(s.mean_act[C1], 0.01 * mean, rtol=1e-5, atol=1e-9)
    # conv2 -> fc: the mean over positions of mean_n |h_(p,c)| x mean_k |w_(p m + c, k)|
    w = np.abs(np.asarray(p["fc"]["kernel"]))
    util = np.array(
        [
            np.mean([np.abs(act2[:, i, j, c]).mean() * w[(2 * i + j) * 4 + c].mean() for i, j in np.ndindex(2, 2)])
            for c in range(4)
        ]
    )
    np.testing.assert_allclose(s.utility[C2], 0.01 * util, rtol=1e-5)
    np.testing.assert_allclose(s.mean_act[C2], 0.01 * act2.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-9)


def _cnn_with_weak_channels():
    """conv1: channel 1 dead, channel 2 constant 0.5 with small outgoing weights; conv2: channel 0 dead,
    channel 3 constant 0.3 with small outgoing weights; the other channels active (bias 1, conv2's filters >= 0)."""
    m, p = _cnn(seed=3)
    c1, c2, fc = p["conv1"], p["conv2"], p["fc"]
    c1["kernel"] = c1["kernel"].at[..., 1].set(0.0).at[..., 2].set(0.0)
    c1["bias"] = jnp.array([1.0, -1.0, 0.5])
    c2["kernel"] = jnp.abs(c2["kernel"]).at[:, :, 2, :].multiply(0.05).at[..., 0].set(0.0).at[..., 3].set(0.0)
    c2["bias"] = jnp.array([-1.0, 1.0, 1.0, 0.3])
    fc["kernel"] = fc["kernel"].at[jnp.array(_rows(3))].set(0.01 * jnp.sign(fc["kernel"][jnp.array(_rows(3))]))
    return m, p


def test_conv_channels_are_replaced_with_the_function_kept():
    m, p = _cnn_with_weak_channels()
    x = _images()
    before, taps = m.apply_with_taps(p, x)
    # maturity 1, rate 0.7: nothing at step 1; at step 2 floor(0.7 x 3) = 2 and floor(0.7 x 4) = 2 channels
    after, states = _run(0.7, 1, p, taps, 2)
    assert _replaced(states, C1) == [set(), {1, 2}] and _replaced(states, C2) == [set(), {0, 3}]
    np.testing.assert_allclose(m.apply(after, x), before, atol=1e-5)  # zero outgoing weights + absorption
    k1, k2, kf = (np.asarray(after[n]["kernel"]) for n in ("conv1", "conv2", "fc"))
    for kernel, gone, fan_in in ((k1, [1, 2], 9), (k2, [0, 3], 12)):  # fresh filters: U(-b, b), b = sqrt(1 / fan_in)
        fresh, bound = kernel[..., gone], np.sqrt(1 / fan_in)  # the code's get_layer_bound for a Conv2d
        assert np.all(fresh != 0) and np.all(np.abs(fresh) <= bound) and np.max(np.abs(fresh)) > 0.6 * bound
    np.testing.assert_array_equal(k1[..., 0], p["conv1"]["kernel"][..., 0])  # the kept channel, bit for bit
    np.testing.assert_array_equal(np.asarray(after["conv1"]["bias"]), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(k2[:, :, [1, 2]][..., [1, 2]], 0.0)  # outgoing slices (where conv2 kept its filters)
    np.testing.assert_array_equal(k2[:, :, 0][..., [1, 2]], p["conv2"]["kernel"][:, :, 0][..., [1, 2]])
    np.testing.assert_array_equal(kf[_rows(0) + _rows(3)], 0.0)  # every position's row of conv2's channels 0, 3
    np.testing.assert_array_equal(
        np.delete(kf, _rows(0) + _rows(3), axis=0), np.delete(p["fc"]["kernel"], _rows(0) + _rows(3), axis=0)
    )
    # the absorption: conv1's channel 2 (0.5 everywhere) into conv2's bias, summed over the 2x2 window;
    # conv2's channel 3 (0.3 at every position) into fc's bias, summed over its 4 rows
    b2 = np.asarray(after["conv2"]["bias"])
    np.testing.assert_allclose(
        b2[[1, 2]] - 1.0, 0.5 * np.asarray(p["conv2"]["kernel"])[:, :, 2, [1, 2]].sum((0, 1)), rtol=1e-5
    )
    assert b2[0] == 0 and b2[3] == 0  # conv2's replaced channels: input bias 0
    absorbed = np.asarray(after["fc"]["bias"] - p["fc"]["bias"])
    np.testing.assert_allclose(absorbed, 0.3 * np.asarray(p["fc"]["kernel"])[_rows(3)].sum(0), rtol=1e-4, atol=1e-7)


def test_conv_adam_moments_are_zeroed_at_exactly_the_replaced_channels():
    m, p = _cnn()
    _, taps = m.apply_with_taps(p, _images())
    _, states = _run(0.7, 1, p, taps, 2, lr=1e-2, grads=_grads)
    g1, g2 = sorted(_replaced(states, C1)[-1]), sorted(_replaced(states, C2)[-1])
    assert len(g1) == 2 and len(g2) == 2
    expect = jax.tree.map(lambda a: np.zeros(a.shape, bool), p)
    expect["conv1"]["kernel"][..., g1] = True
    expect["conv1"]["bias"][g1] = True
    expect["conv2"]["kernel"][:, :, g1, :] = True
    expect["conv2"]["kernel"][..., g2] = True
    expect["conv2"]["bias"][g2] = True
    expect["fc"]["kernel"][sum((_rows(c) for c in g2), [])] = True
    adam = states[-1].inner[0]
    for moment in (adam.mu, adam.nu):
        jax.tree.map(lambda a, e: np.testing.assert_array_equal(np.asarray(a) == 0, e), moment, expect)


def test_conv_bad_layers_raise():
    from clx.models import AlexNet

    conv = {
        "conv": {"kernel": jnp.ones((3, 3, 1, 4))},
        "fc": {"kernel": jnp.ones((10, 3))},
    }  # 10 rows: no 4-channel flatten
    with pytest.raises(
        ValueError, match=r"'conv/kernel' is a Conv layer with 4 units whose next kernel 'fc/kernel' \(10, 3\)"
    ):
        cbp(optax.sgd(0.1), layers=["conv/kernel"]).init(conv)
    with pytest.raises(ValueError, match="no hidden Dense layer or Conv layer"):
        cbp(optax.sgd(0.1)).init(conv)
    head = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}, "head": {"kernel": jnp.ones((2, 4, 3))}}  # multi-head: 3-D
    with pytest.raises(ValueError, match="'conv/kernel' is the last Dense/Conv kernel"):
        cbp(optax.sgd(0.1), layers=["conv"]).init(head)
    net = nnx.eval_shape(lambda: AlexNet((19, 19, 3), 3, 1, channels=(2, 3, 4), hidden=(5, 6), rngs=nnx.Rngs(0)))
    p = jax.tree.map(lambda a: jnp.zeros(a.shape), nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    with pytest.raises(ValueError, match=r"Conv layer 'conv1/kernel' has 2 channels .*\['bn1/scale'\].*layers="):
        cbp(optax.sgd(0.1)).init(p)
    assert set(cbp(optax.sgd(0.1), layers=["fc1"]).init(p).age) == {"fc1/kernel"}  # its Dense layers alone


def test_resets_outside_the_cond_give_the_same_numbers_as_inside(monkeypatch):
    """Large layers write the resets outside the selecting lax.cond, small ones inside it: forced each way on the
    same 12 Adam steps with replacements at most of them (rate 0.25, maturity 1), params and states agree bit
    for bit, at steps that replace and steps that do not."""
    from clx.plasticity import _cbp

    m, p = _model()
    _, taps = m.apply_with_taps(p, _x())
    out = {}
    for name, threshold in (("inside", 1 << 40), ("outside", 0)):
        monkeypatch.setattr(_cbp, "RESETS_OUTSIDE_COND_ELEMENTS", threshold)
        step = jax.jit(_update)  # a fresh trace under this threshold
        params, state, states = p, _RULE.init(p), []
        for i in range(12):
            u, state = step(1e-2, 0.25, 1, _grads(params, i), state, params, taps, jax.random.key(i))
            params = optax.apply_updates(params, u)
            states.append(state)
        out[name] = (params, states)
    replaced = [len(r) for r in _replaced(out["inside"][1])]
    assert any(replaced) and not all(replaced)  # both kinds of step were exercised
    chex.assert_trees_all_equal(out["inside"], out["outside"])
