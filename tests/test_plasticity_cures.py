"""L2 Init and shrink & perturb (clx.plasticity): exact math on small known pytrees,
bit-identity when switched off, the noise's keys and statistics, bad hyperparameters,
and members of a jit + vmap over seeds that differ only through their keys."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clx
from clx.plasticity import l2_init, shrink_perturb, shrink_perturb_steps


def _params():
    return {
        "layers": [
            {
                "kernel": jnp.array([[0.5, -1.0, 2.0], [0.25, 0.0, -3.0]], jnp.float32),
                "bias": jnp.array([0.1, -0.2, 0.3]),
            },
            {"kernel": jnp.array([[1.5], [-0.5], [4.0]], jnp.float32)},
        ]
    }


def _grads():
    return jax.tree.map(lambda p: jnp.full_like(p, 0.125) - 0.5 * p, _params())


def _np(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def _normal_by_hand(key, tree):
    """Standard normal noise, leaf i from split(key, n)[i] (the documented draw), as numpy float64."""
    leaves = jax.tree.leaves(tree)
    keys = jax.random.split(key, len(leaves))
    return [np.asarray(jax.random.normal(k, x.shape, x.dtype), np.float64) for k, x in zip(keys, leaves)]


# --- L2 Init ---------------------------------------------------------------------------------------------------------


def test_l2_init_adds_twice_lambda_times_the_distance_to_theta0():
    lam = 0.3
    rule = l2_init(lam)
    theta0 = _params()
    state = rule.init(theta0)
    theta = jax.tree.map(lambda p: p * 1.5 - 0.25, theta0)
    out, state2 = rule.update(_grads(), state, theta, task_id=jnp.int32(0))
    for o, g, p, p0 in zip(_np(out), _np(_grads()), _np(theta), _np(theta0)):
        np.testing.assert_allclose(o, g + 2 * lam * (p - p0), rtol=1e-6, atol=1e-7)
    # the penalty lam ||theta - theta0||^2 has exactly this gradient (no 1/2)
    penalty = lambda t: lam * sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(theta0)))  # noqa: E731
    for o, g, d in zip(_np(out), _np(_grads()), _np(jax.grad(penalty)(theta))):
        np.testing.assert_allclose(o - g, d, rtol=1e-5, atol=1e-6)
    assert state2 is state
    # at theta0 itself the gradient is untouched, bit for bit
    same, _ = rule.update(_grads(), state, theta0)
    chex.assert_trees_all_equal(same, _grads())


def test_l2_init_anchor_is_the_exact_init_after_many_steps_and_boundaries():
    rule = clx.chain(l2_init(1e-2), optax.sgd(0.1))
    theta0 = _params()
    want = jax.tree.map(np.array, theta0)  # a host copy of the initial params
    params, state = theta0, jax.jit(rule.init)(theta0)

    def train_step(g, s, p):
        u, s = rule.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(train_step, donate_argnums=(1, 2))  # as the trainer, which donates params and state
    ev = clx.Evidence(jnp.int32(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), {}, None)
    for t in range(3):
        for i in range(20):
            grads = jax.tree.map(lambda p: jnp.sin(p + i + t), params)
            params, state = step(grads, state, params)
        moves, state = rule.consolidate(state, params, ev)
        assert moves is None
    chex.assert_trees_all_equal(state[0].init_params, want)  # bit for bit, not an alias of the live params
    assert max(np.max(np.abs(a - b)) for a, b in zip(_np(params), _np(want))) > 0.1


def test_l2_init_zero_lambda_is_the_identity():
    rule = l2_init(0.0)
    theta = jax.tree.map(lambda p: p + 1.0, _params())
    out, _ = rule.update(_grads(), rule.init(_params()), theta)
    chex.assert_trees_all_equal(out, _grads())


# --- shrink & perturb at task boundaries -----------------------------------------------------------------------------


def _evidence():
    return clx.Evidence(jnp.int32(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), {}, None)


def test_boundary_move_is_shrink_minus_one_theta_plus_sigma_eps_from_the_state_key():
    shrink, sigma, seed = 0.4, 0.1, 7
    rule = shrink_perturb(shrink, sigma, seed=seed)
    theta = _params()
    state = rule.init(theta)
    np.testing.assert_array_equal(state.key, jax.random.key_data(jax.random.key(seed)))
    step_key = jax.random.key(123)
    out, state = rule.update(_grads(), state, theta, key=step_key)
    chex.assert_trees_all_equal(out, _grads())  # the gradient is untouched
    np.testing.assert_array_equal(state.key, jax.random.key_data(jax.random.fold_in(step_key, seed)))
    moves, new_state = rule.consolidate(state, theta, _evidence())
    k, nxt = jax.random.split(jax.random.wrap_key_data(state.key))
    for m, p, e in zip(_np(moves), _np(theta), _normal_by_hand(k, theta)):
        np.testing.assert_allclose(m, (shrink - 1) * p + sigma * e, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new_state.key, jax.random.key_data(nxt))
    moved = optax.apply_updates(theta, moves)
    for q, p, e in zip(_np(moved), _np(theta), _normal_by_hand(k, theta)):
        np.testing.assert_allclose(q, shrink * p + sigma * e, rtol=1e-6, atol=1e-6)
    # the key advances: a second boundary (no step between) draws different noise
    moves2, _ = rule.consolidate(new_state, theta, _evidence())
    assert not np.allclose(_np(moves2)[0], _np(moves)[0])


def test_boundary_noise_fn_replaces_the_gaussian():
    fresh = jax.tree.map(lambda p: jnp.full_like(p, 2.0), _params())
    rule = shrink_perturb(0.5, 0.25, noise_fn=lambda key, params: fresh)
    moves, _ = rule.consolidate(rule.init(_params()), _params(), _evidence())
    for m, p in zip(_np(moves), _np(_params())):
        np.testing.assert_allclose(m, -0.5 * p + 0.5, rtol=1e-6)


def test_shrink_one_sigma_zero_leaves_params_bit_identical():
    theta = _params()
    rule = shrink_perturb(1.0, 0.0)
    state = rule.update(_grads(), rule.init(theta), theta, key=jax.random.key(0))[1]
    moves, _ = jax.jit(rule.consolidate)(state, theta, _evidence())
    chex.assert_trees_all_equal(optax.apply_updates(theta, moves), theta)
    steps = shrink_perturb_steps(optax.sgd(0.1), 0.0)
    got, _ = jax.jit(lambda g, s, p, k: steps.update(g, s, p, key=k))(
        _grads(), steps.init(theta), theta, jax.random.key(1)
    )
    want, _ = optax.sgd(0.1).update(_grads(), optax.sgd(0.1).init(theta), theta)
    chex.assert_trees_all_equal(got, want)


# --- shrink & perturb after every step -------------------------------------------------------------------------------


def test_per_step_weight_decay_shrink_and_noise_exactly():
    lr, wd, shrink, sigma, seed = 0.1, 0.01, 0.9, 0.05, 3
    rule = shrink_perturb_steps(optax.sgd(lr), sigma, weight_decay=wd, shrink=shrink, seed=seed)
    theta, key = _params(), jax.random.key(5)
    out, _ = rule.update(_grads(), rule.init(theta), theta, key=key)
    eps = _normal_by_hand(jax.random.fold_in(key, seed), theta)
    for o, g, p, e in zip(_np(out), _np(_grads()), _np(theta), eps):
        u = -lr * (g + wd * p)  # PyTorch SGD's coupled weight_decay, then the step
        np.testing.assert_allclose(p + o, shrink * (p + u) + sigma * e, rtol=1e-5, atol=1e-6)
    assert rule.consolidate(rule.init(theta), theta, _evidence())[0] is None


def test_per_step_noise_differs_between_keys_and_has_std_sigma():
    sigma = 1e-3
    rule = shrink_perturb_steps(optax.sgd(0.0), sigma)  # lr 0: the update is the noise alone
    theta = {"w": jnp.zeros((64, 64), jnp.float32), "b": jnp.zeros((64,), jnp.float32)}
    state = rule.init(theta)
    keys = jax.random.split(jax.random.key(0), 64)
    draws = jax.jit(jax.vmap(lambda k: rule.update(theta, state, theta, key=k)[0]))(keys)
    w = np.asarray(draws["w"], np.float64)  # (64 keys, 64, 64)
    assert not np.any(np.all(w[0] == w[1:], axis=(1, 2)))  # no two keys draw the same noise
    np.testing.assert_allclose(w.std(), sigma, rtol=0.01)  # 262,144 draws: std within 1 %
    assert abs(w.mean()) < 5 * sigma / np.sqrt(w.size)
    assert np.abs(np.corrcoef(w[:, 0, 0], w[:, 0, 1])[0, 1]) < 0.4  # entries are not copies of each other
    np.testing.assert_allclose(np.asarray(draws["b"]).std(), sigma, rtol=0.05)


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: l2_init(-0.1), "lam must be a finite value >= 0"),
        (lambda: l2_init(float("nan")), "lam must be a finite value >= 0"),
        (lambda: shrink_perturb(1.5, 0.1), r"shrink must be in \[0, 1\].*pass a value in \[0, 1\]"),
        (lambda: shrink_perturb(-0.1, 0.1), r"shrink must be in \[0, 1\]"),
        (lambda: shrink_perturb(0.5, -1e-3), "sigma must be a finite value >= 0.*pass sigma >= 0"),
        (lambda: shrink_perturb_steps(optax.sgd(0.1), -1e-4), "sigma must be a finite value >= 0"),
        (lambda: shrink_perturb_steps(optax.sgd(0.1), 1e-4, shrink=2.0), r"shrink must be in \[0, 1\]"),
        (lambda: shrink_perturb_steps(optax.sgd(0.1), 1e-4, weight_decay=-1.0), "weight_decay must be"),
    ],
)
def test_bad_hyperparameters_raise_in_the_factory(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_calls_raise():
    with pytest.raises(TypeError, match="plain optax optimizer"):
        shrink_perturb_steps(clx.chain(optax.sgd(0.1)), 1e-4)
    with pytest.raises(ValueError, match="update needs key="):
        rule = shrink_perturb(0.5, 0.1)
        rule.update(_grads(), rule.init(_params()), _params())
    with pytest.raises(ValueError, match="update needs the params"):
        rule = l2_init(0.1)
        rule.update(_grads(), rule.init(_params()))
    assert shrink_perturb(0.5, 0.1).needs == {"key"}
    assert shrink_perturb_steps(optax.sgd(0.1), 1e-4).needs == {"key", "optimizer"}
    with pytest.raises(ValueError, match="each apply their own optimizer"):
        clx.chain(shrink_perturb_steps(optax.sgd(0.1), 1e-4), shrink_perturb_steps(optax.sgd(0.1), 1e-4))


# --- jit + vmap over seeds -------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)


@pytest.mark.parametrize("every", ["task", "step"])
def test_vmapped_members_differ_only_by_their_keys(every):
    shrink, sigma = 0.8, 0.05
    if every == "task":
        rule = clx.chain(shrink_perturb(shrink, sigma), optax.sgd(0.1))
    else:
        rule = shrink_perturb_steps(optax.sgd(0.1), sigma, shrink=shrink)
    theta = _params()
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    params = stack([theta] * 3)  # identical params and gradients: only the keys differ
    keys = jax.vmap(jax.random.wrap_key_data)(jnp.stack([jax.random.key_data(jax.random.key(s)) for s in SEEDS]))

    def member(p, k):
        s = rule.init(p)
        u, s = rule.update(_grads(), s, p, key=k)
        p = optax.apply_updates(p, u)
        moves, s = rule.consolidate(s, p, _evidence())
        return (p if moves is None else optax.apply_updates(p, moves)), s

    out, states = jax.jit(jax.vmap(member))(params, keys)
    for m, s in enumerate(SEEDS):
        alone, alone_state = jax.jit(member)(theta, jax.random.key(s))
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[m], out), alone, atol=1e-6)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[m], states), alone_state, atol=1e-6)
    # the deterministic part is the same for every member; the noise is not
    det = _np(optax.apply_updates(theta, optax.sgd(0.1).update(_grads(), optax.sgd(0.1).init(theta))[0]))
    noise = [(np.asarray(o, np.float64) - shrink * d) / sigma for o, d in zip(jax.tree.leaves(out), det)]
    first = noise[0].reshape(3, -1)
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])
    assert all(np.all(np.abs(n) < 8) for n in noise)  # what is left is noise of unit scale (no other difference)
