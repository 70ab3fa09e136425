"""Spectral regularization (clx.plasticity.spectral_regularization): the persistent power iteration
converges to NumPy's largest singular value, the added gradient is jax.grad of the stated penalty
at the exact singular vectors, strength 0 is the plain optimizer bit for bit, which leaves count,
the pull to sigma_max = 1 in training, and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clx
from clx.plasticity import spectral_regularization
from clx.plasticity._spectral import SpectralState


def _params():
    rng = np.random.default_rng(0)
    return {
        "conv": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),  # read as (18, 4)
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        },
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(6, 5)) * 0.5, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        },
        "norm": {"scale": jnp.asarray([1.5, 0.5, 2.0], jnp.float32)},  # a 1-D leaf that is not a bias
    }


def _grads():
    return jax.tree.map(lambda p: jnp.sin(p) * 0.1, _params())


def _top(w):
    """NumPy's top singular triple of a kernel read as (prod(shape[:-1]), shape[-1])."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64).reshape(-1, w.shape[-1]))
    return u[:, 0], s[0], vt[0]


def test_power_iteration_converges_to_the_largest_singular_value():
    params = _params()
    rule = spectral_regularization(1e-3)
    state = rule.init(params)
    assert set(state.u) == {"conv/kernel", "dense/kernel"}
    assert state.u["conv/kernel"].shape == (18,) and state.v["conv/kernel"].shape == (4,)
    step = jax.jit(lambda s: rule.update(_grads(), s, params)[1])
    history = {name: [] for name in state.u}
    for _ in range(60):
        state = step(state)
        for name in history:
            history[name].append(float(state.sigma[name]))
    for name, path in (("conv/kernel", ("conv", "kernel")), ("dense/kernel", ("dense", "kernel"))):
        u, s, v = _top(params[path[0]][path[1]])
        h = np.asarray(history[name])
        assert np.all(np.diff(h) >= -1e-5 * s)  # ||W v|| never decreases under power iteration
        assert h[0] < s * (1 - 1e-4)  # one iteration from a random start is not yet there
        np.testing.assert_allclose(h[-1], s, rtol=1e-5)
        np.testing.assert_allclose(abs(np.dot(state.u[name], u)), 1.0, atol=1e-4)
        np.testing.assert_allclose(abs(np.dot(state.v[name], v)), 1.0, atol=1e-4)


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_added_gradient_is_the_gradient_of_the_stated_penalty(exponent):
    strength, params = 0.3, _params()
    rule = spectral_regularization(strength, exponent=exponent)
    tops = {name: _top(params[name.split("/")[0]]["kernel"]) for name in ("conv/kernel", "dense/kernel")}
    exact = SpectralState(
        {n: jnp.asarray(t[0], jnp.float32) for n, t in tops.items()},
        {n: jnp.asarray(t[2], jnp.float32) for n, t in tops.items()},
        {n: jnp.zeros((), jnp.float32) for n in tops},
    )
    out, new_state = rule.update(_grads(), exact, params)

    def penalty(p):
        kernels = [p["conv"]["kernel"].reshape(18, 4), p["dense"]["kernel"]]
        biases = [p["conv"]["bias"], p["dense"]["bias"]]
        r = sum((jnp.linalg.norm(w, ord=2) ** exponent - 1.0) ** 2 for w in kernels)
        return strength * (r + sum(jnp.linalg.norm(b) ** (2 * exponent) for b in biases))

    want = jax.grad(penalty)(params)
    for (path, o), g, w in zip(
        jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(_grads()), jax.tree.leaves(want)
    ):
        np.testing.assert_allclose(np.asarray(o) - np.asarray(g), w, rtol=2e-4, atol=1e-5, err_msg=str(path))
    chex.assert_trees_all_equal(out["norm"], _grads()["norm"])  # the LayerNorm-like scale is left alone
    for name, (_, s, _) in tops.items():
        np.testing.assert_allclose(new_state.sigma[name], s, rtol=1e-6)
    # and a central finite difference of the penalty along a random direction agrees (float64 by hand)
    w = np.asarray(params["dense"]["kernel"], np.float64)
    d = np.random.default_rng(1).normal(size=w.shape)
    f = lambda m: strength * (np.linalg.norm(m, 2) ** exponent - 1) ** 2  # noqa: E731
    fd = (f(w + 1e-6 * d) - f(w - 1e-6 * d)) / 2e-6
    added = np.asarray(out["dense"]["kernel"], np.float64) - np.asarray(_grads()["dense"]["kernel"], np.float64)
    np.testing.assert_allclose(np.sum(added * d), fd, rtol=1e-4)


def test_strength_zero_is_the_plain_optimizer_bit_for_bit():
    params = _params()
    rule = clx.chain(spectral_regularization(0.0), optax.adam(1e-2))

    def run(tx):
        state, p = tx.init(params), params
        for i in range(3):
            g = jax.tree.map(lambda a: jnp.cos(a + i), p)
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        return p

    chex.assert_trees_all_equal(jax.jit(lambda: run(rule))(), jax.jit(lambda: run(optax.adam(1e-2)))())


def test_training_pulls_sigma_max_to_one_and_biases_to_zero():
    params = {"kernel": jnp.asarray(np.diag([3.0, 2.0, 0.5]) + 0.1, jnp.float32), "bias": jnp.full((3,), 0.5)}
    rule = clx.chain(spectral_regularization(1.0, exponent=2.0), optax.sgd(0.01))
    zeros = jax.tree.map(jnp.zeros_like, params)  # no task gradient: the penalty alone

    @jax.jit
    def train(p):
        def body(carry, _):
            p, s = carry
            u, s = rule.update(zeros, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (p, rule.init(p)), None, length=600)[0]

    p, state = train(params)
    sv = np.linalg.svd(np.asarray(p["kernel"], np.float64), compute_uv=False)
    np.testing.assert_allclose(sv[0], 1.0, atol=1e-3)  # 3 and 2 pulled down to 1
    assert sv[-1] < 0.7  # the small singular value is not pushed up (only the top one is regularized)
    # the bias's ||b||^4 (k = 2) decays like t^(-1/2), slower than L2's exponential decay
    assert np.linalg.norm(p["bias"]) < 0.25 * np.linalg.norm(params["bias"])
    # without biases=True the bias is untouched
    out, _ = spectral_regularization(1.0, biases=False).update(zeros, rule.init(params)[0], params)
    chex.assert_trees_all_equal(out["bias"], zeros["bias"])


def test_zero_kernel_stays_finite():
    params = {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))}
    for k in (1.0, 2.0):
        rule = spectral_regularization(1.0, exponent=k)
        out, state = rule.update(params, rule.init(params), params)
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves((out, state)))


def test_traced_strength_sweeps_under_vmap():
    params = _params()

    def run(strength):
        rule, g = spectral_regularization(strength), _grads()
        return rule.update(g, rule.init(params), params)[0], g

    out, grads = jax.jit(jax.vmap(run))(jnp.array([0.0, 0.5]))
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[0], out), jax.tree.map(lambda a: a[0], grads))  # g + 0 = g
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], out), run(0.5)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strength=-1e-4), "strength must be a finite value >= 0.*pass strength >= 0"),
        (dict(strength=float("nan")), "strength must be a finite value >= 0"),
        (dict(strength=float("inf")), "strength must be a finite value >= 0"),
        (dict(strength=1e-4, exponent=0.5), "exponent must be a finite value >= 1, got 0.5; pass exponent=2.0"),
        (dict(strength=1e-4, exponent=float("inf")), "exponent must be a finite value >= 1"),
    ],
)
def test_bad_hyperparameters_raise_in_the_factory(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_regularization(**kwargs)


def test_contract():
    rule = spectral_regularization(1e-4)
    assert rule.needs == frozenset() and rule.name == "spectral_regularization"
    state = rule.init(_params())
    assert rule.consolidate(state, _params(), None) == (None, state)
    with pytest.raises(ValueError, match="update needs the params"):
        rule.update(_grads(), state)
