"""UPGD (clx.plasticity.upgd): steps equal to a line-by-line NumPy copy of the authors' optimizer,
the 0/0 guard (SGD when sigma = 0 and every utility is 0), the gate of the max-utility weight,
determinism, jit + vmap over seeds, and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clx
from clx.plasticity import shrink_perturb_steps, upgd


def _params():
    return {
        "layers": [
            {
                "kernel": jnp.array([[0.5, -1.0, 2.0], [0.25, 0.0, -3.0]], jnp.float32),
                "bias": jnp.array([0.1, -0.2, 0.3], jnp.float32),
            },
            {"kernel": jnp.array([[1.5], [-0.5], [4.0]], jnp.float32)},
        ]
    }


def _grads(i=0):
    return jax.tree.map(lambda p: jnp.cos(3.0 * p + i) - 0.25, _params())


def _np(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def _noise_by_hand(key, seed, tree):
    """Standard normal noise from fold_in(key, seed), leaf i from split(., n)[i] (the documented draw)."""
    leaves = jax.tree.leaves(tree)
    keys = jax.random.split(jax.random.fold_in(key, seed), len(leaves))
    return [np.asarray(jax.random.normal(k, x.shape, x.dtype), np.float64) for k, x in zip(keys, leaves)]


def _reference(params, grads_seq, noise_seq, lr, beta, sigma, wd, step_scale, protect):
    """The official step (core/optim/weight_upgd/first_order.py, FirstOrderGlobalUPGD and
    FirstOrderNonprotectingGlobalUPGD; README with step_scale 2), line by line in float64."""
    p = [a.copy() for a in params]
    util = [np.zeros_like(a) for a in p]
    for t, (grads, noises) in enumerate(zip(grads_seq, noise_seq), start=1):
        global_max = -np.inf
        for i, g in enumerate(grads):
            util[i] = beta * util[i] + (1 - beta) * (-g * p[i])
            global_max = max(global_max, util[i].max())
        bias_correction = 1 - beta**t
        for i, (g, e) in enumerate(zip(grads, noises)):
            noise = e * sigma
            scaled = 1 / (1 + np.exp(-((util[i] / bias_correction) / global_max)))
            x = (g + noise) * (1 - scaled) if protect else g + noise * (1 - scaled)
            p[i] = p[i] * (1 - lr * wd) - step_scale * lr * x
    return p


@pytest.mark.parametrize("protect,step_scale", [(True, 1.0), (False, 2.0)])
def test_three_steps_equal_the_official_optimizer_by_hand(protect, step_scale):
    lr, beta, sigma, wd, seed = 0.05, 0.9, 0.1, 0.01, 4
    rule = upgd(lr, beta_utility=beta, sigma=sigma, weight_decay=wd, step_scale=step_scale, protect=protect, seed=seed)
    params, state = _params(), rule.init(_params())
    step = jax.jit(lambda g, s, p, k: rule.update(g, s, p, key=k))
    keys = [jax.random.key(10 + i) for i in range(3)]
    grads_seq, noise_seq = [], []
    for i, key in enumerate(keys):
        grads_seq.append(_np(_grads(i)))
        noise_seq.append(_noise_by_hand(key, seed, params))
        u, state = step(_grads(i), state, params, key)
        chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
        params = optax.apply_updates(params, u)
    want = _reference(_np(_params()), grads_seq, noise_seq, lr, beta, sigma, wd, step_scale, protect)
    for got, w in zip(_np(params), want):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
    assert int(state.count) == 3
    # the trace is the raw (not bias-corrected) EMA of -g theta over the three steps' params
    assert all(np.all(np.isfinite(u)) for u in _np(state.utility))


def test_guarded_zero_utilities_with_sigma_zero_is_sgd():
    # g * theta = 0 entry by entry, so every utility is 0 and the official max is 0: its 0/0 is NaN
    theta = {"w": jnp.array([1.0, 0.0, 2.0, 0.0, -0.75], jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    g = {"w": jnp.array([0.0, 3.0, 0.0, -1.0, 0.0], jnp.float32), "b": jnp.array([0.5, -0.25, 0.125], jnp.float32)}
    key, lr = jax.random.key(0), 0.1
    with np.errstate(invalid="ignore"):
        assert np.isnan(np.float32(0.0) / np.float32(0.0))  # what the unguarded formula divides
    sgd = lambda rate: optax.sgd(rate).update(g, optax.sgd(rate).init(theta))[0]  # noqa: E731

    # README form (step 2 lr): a zero-utility weight has gate 1/2, so the step is SGD's, bit for bit
    # (2 lr * (g / 2) rounds exactly as lr * g: scaling by 2 and 1/2 is exact in binary floating point)
    def run(step_scale):
        rule = upgd(lr, sigma=0.0, weight_decay=0.0, step_scale=step_scale)  # a traced step_scale passes the check
        return rule.update(g, rule.init(theta), theta, key=key)

    run = jax.jit(run)
    for step_scale, rate in ((2.0, lr), (1.0, lr / 2)):
        u, state = run(step_scale)
        chex.assert_trees_all_equal(u, sgd(rate))
        chex.assert_trees_all_equal(state.utility, jax.tree.map(jnp.zeros_like, theta))
    # with weight decay it is SGD with decoupled decay, theta (1 - lr wd) - lr g, which equals optax's
    # coupled form -lr (g + wd theta) to one rounding (1e-7), not bit for bit (different operation order)
    wd = 0.01
    rule = upgd(lr, sigma=0.0, weight_decay=wd, step_scale=2.0)
    u, _ = rule.update(g, rule.init(theta), theta, key=key)
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    want, _ = tx.update(g, tx.init(theta), theta)
    chex.assert_trees_all_close(u, want, rtol=1e-7, atol=1e-9)
    # all-zero params (every utility 0 at step 1) stay finite too, and no NaN is formed on the way
    zeros = jax.tree.map(jnp.zeros_like, theta)
    with jax.debug_nans(True):
        u, _ = upgd(lr).update(g, upgd(lr).init(zeros), zeros, key=key)
    assert all(np.all(np.isfinite(a)) for a in _np(u))


def test_max_utility_weight_gate():
    lr, wd, sigma = 0.1, 0.01, 0.5
    theta = {"w": jnp.array([2.0, -1.0, 0.5, 1.0], jnp.float32)}
    g = {"w": jnp.array([-3.0, -0.5, 0.25, 1.0], jnp.float32)}  # -g theta = [6, -0.5, -0.125, -1]: entry 0 is the max
    key = jax.random.key(3)
    e = _noise_by_hand(key, 0, theta)[0]
    # step 1 with beta_u = 0.999: the max's scaled utility is sigmoid(1 / 0.001) = 1 in float32, so its gate
    # is 0: the weight only decays; every other weight moves by its gated gradient and noise
    rule = upgd(lr, beta_utility=0.999, sigma=sigma, weight_decay=wd)
    u = np.asarray(rule.update(g, rule.init(theta), theta, key=key)[0]["w"], np.float64)
    np.testing.assert_allclose(u[0], -lr * wd * 2.0, rtol=1e-6)
    assert np.all(np.abs(u[1:] + lr * wd * np.asarray(theta["w"][1:])) > 1e-3)
    # with beta_u = 0 (no bias correction) the max's ratio is 1: gate 1 - sigmoid(1) = 0.2689, not 0
    rule = upgd(lr, beta_utility=0.0, sigma=sigma, weight_decay=wd)
    u = np.asarray(rule.update(g, rule.init(theta), theta, key=key)[0]["w"], np.float64)
    gate = 1 - 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(u[0], -lr * wd * 2.0 - lr * (-3.0 + sigma * e[0]) * gate, rtol=1e-6)
    # the non-protecting variant gates only the noise: the max-utility weight takes its full gradient step
    rule = upgd(lr, beta_utility=0.999, sigma=sigma, weight_decay=wd, protect=False)
    u = np.asarray(rule.update(g, rule.init(theta), theta, key=key)[0]["w"], np.float64)
    np.testing.assert_allclose(u[0], -lr * wd * 2.0 - lr * -3.0, rtol=1e-6)


def test_deterministic_and_vmapped_seeds_are_the_runs_alone():
    """A run is a pure function of its key (bit for bit on a rerun); vmapped members are the runs alone."""
    rule = upgd(0.05, beta_utility=0.9, sigma=0.2, weight_decay=0.01)
    theta = _params()
    seeds = (0, 1, 2)
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])

    def member(key_data):
        key, params, state = jax.random.wrap_key_data(key_data), theta, rule.init(theta)
        for i in range(2):
            u, state = rule.update(_grads(i), state, params, key=jax.random.fold_in(key, i))
            params = optax.apply_updates(params, u)
        return params, state

    out, states = jax.jit(jax.vmap(member))(keys)
    alone_fn = jax.jit(member)
    for m, s in enumerate(seeds):
        alone, alone_state = alone_fn(jax.random.key_data(jax.random.key(s)))
        chex.assert_trees_all_equal((alone, alone_state), alone_fn(jax.random.key_data(jax.random.key(s))))
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[m], out), alone, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[m], states), alone_state, rtol=1e-6, atol=1e-7)
    first = np.asarray(out["layers"][0]["kernel"]).reshape(3, -1)
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])


def test_traced_hyperparameters_pass_and_sweep():
    theta = _params()

    def run(lr, beta, sigma):
        rule = upgd(lr, beta_utility=beta, sigma=sigma)
        return rule.update(_grads(), rule.init(theta), theta, key=jax.random.key(0))[0]

    out = jax.jit(jax.vmap(run))(jnp.array([0.1, 0.0]), jnp.array([0.9, 0.0]), jnp.array([0.1, 0.0]))
    for a, b in zip(_np(jax.tree.map(lambda x: x[0], out)), _np(run(0.1, 0.9, 0.1))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert all(np.all(a == 0) for a in _np(jax.tree.map(lambda x: x[1], out)))  # lr 0: no move


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-0.1), "lr must be a finite value >= 0"),
        (dict(lr=float("inf")), "lr must be a finite value >= 0"),
        (dict(lr=0.1, sigma=-1e-3), "sigma must be a finite value >= 0.*pass sigma >= 0"),
        (dict(lr=0.1, sigma=float("nan")), "sigma must be a finite value >= 0"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay must be a finite value >= 0"),
        (dict(lr=0.1, beta_utility=1.0), r"beta_utility must be in \[0, 1\), got 1.0; pass e.g. 0.999"),
        (dict(lr=0.1, beta_utility=-0.1), r"beta_utility must be in \[0, 1\)"),
        (dict(lr=0.1, beta_utility=float("nan")), r"beta_utility must be in \[0, 1\)"),
        (dict(lr=0.1, step_scale=0.0), "step_scale must be a finite value > 0.*pass 1.0"),
    ],
)
def test_bad_hyperparameters_raise_in_the_factory(kwargs, match):
    lr = kwargs.pop("lr")
    with pytest.raises(ValueError, match=match):
        upgd(lr, **kwargs)


def test_contract():
    rule = upgd(0.1)
    assert rule.needs == {"key", "optimizer"} and rule.name == "upgd"
    state = rule.init(_params())
    assert rule.consolidate(state, _params(), None) == (None, state)
    with pytest.raises(ValueError, match="update needs key="):
        rule.update(_grads(), state, _params())
    with pytest.raises(ValueError, match="update needs the params"):
        rule.update(_grads(), state, key=jax.random.key(0))
    with pytest.raises(ValueError, match="each apply their own optimizer"):
        clx.chain(upgd(0.1), shrink_perturb_steps(optax.sgd(0.1), 1e-4))
