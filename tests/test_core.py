"""clx.chain composes optax and clx transforms without changing optax's behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clx


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"a": {"kernel": jax.random.normal(k1, (5, 3))}, "b": jax.random.normal(k2, (4,))}


def _grads(i):
    k = jax.random.fold_in(jax.random.key(1), i)
    return jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(k, p.size), p.shape), _params())


@pytest.mark.parametrize("make", [lambda: optax.adam(1e-3), lambda: optax.sgd(0.1, momentum=0.9),
                                  lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))])
def test_chain_of_plain_optax_matches_optax_step_for_step(make):
    ref, ours = make(), clx.chain(make())
    p_ref = p_ours = _params()
    s_ref, s_ours = ref.init(p_ref), ours.init(p_ours)
    for i in range(6):
        g = _grads(i)
        u_ref, s_ref = jax.jit(ref.update)(g, s_ref, p_ref)
        u_ours, s_ours = jax.jit(ours.update)(g, s_ours, p_ours, layer_inputs={}, output_grads={})
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p_ref, p_ours)
    # A plain optax member consolidates as the identity.
    ev = clx.Evidence(jnp.int32(0), jnp.zeros((1, 1)), jnp.zeros((1,), jnp.int32), {})
    assert ours.consolidate(s_ours, p_ours, ev) is not None
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ours.consolidate(s_ours, p_ours, ev), s_ours)


def test_chain_applies_members_in_order_and_consolidates_each():
    calls = []

    def scale_rule(c):
        def update(u, s, params=None, **extra):
            return jax.tree.map(lambda x: x * c, u), s + 1

        def consolidate(s, params, ev):
            calls.append(c)
            return s + 100

        return clx.ContinualTransformation(lambda p: jnp.int32(0), update, consolidate)

    tx = clx.chain(scale_rule(2.0), optax.scale(-1.0), scale_rule(3.0))
    state = tx.init(_params())
    u, state = tx.update({"x": jnp.ones(2)}, state)
    np.testing.assert_array_equal(u["x"], -6.0 * jnp.ones(2))
    state = tx.consolidate(state, None, None)
    assert calls == [2.0, 3.0]
    assert int(state[0]) == 101 and int(state[2]) == 101


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match="clx.chain takes optax"):
        clx.chain(object())
    with pytest.raises(ValueError, match="at least one"):
        clx.chain()
