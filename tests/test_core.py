"""clx.chain composes optax and clx transforms without changing optax's behaviour."""

import chex
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


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.adam(1e-3),
        lambda: optax.sgd(0.1, momentum=0.9),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
    ],
)
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
    moves, s_after = ours.consolidate(s_ours, p_ours, ev)
    assert moves is None and ours.loss is None and ours.needs == frozenset()
    chex.assert_trees_all_equal(s_after, s_ours)


def test_chain_applies_members_in_order_and_consolidates_each():
    calls = []

    def scale_rule(c):
        def update(u, s, params=None, **extra):
            return jax.tree.map(lambda x: x * c, u), s + 1

        def consolidate(s, params, ev):
            calls.append(c)
            return None, s + 100

        return clx.ContinualTransformation(lambda p: jnp.int32(0), update, consolidate)

    tx = clx.chain(scale_rule(2.0), optax.scale(-1.0), scale_rule(3.0))
    state = tx.init(_params())
    u, state = tx.update({"x": jnp.ones(2)}, state)
    np.testing.assert_array_equal(u["x"], -6.0 * jnp.ones(2))
    moves, state = tx.consolidate(state, None, None)
    assert moves is None
    assert calls == [2.0, 3.0]
    assert int(state[0]) == 101 and int(state[2]) == 101


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match="clx.chain takes optax"):
        clx.chain(object())
    with pytest.raises(ValueError, match="at least one"):
        clx.chain()


def _mover(name, delta, needs=()):
    """A rule whose consolidate moves every param by ``delta`` and records the params it saw."""

    def consolidate(s, params, ev):
        return jax.tree.map(lambda p: jnp.full_like(p, delta), params), params

    return clx.ContinualTransformation(
        lambda p: p, lambda u, s, params=None, **e: (u, s), consolidate, needs=frozenset(needs), name=name
    )


def test_chain_hands_moved_params_to_later_members_and_sums_moves():
    params = {"w": jnp.zeros(3)}
    tx = clx.chain(_mover("a", 1.0), optax.sgd(0.1), _mover("b", 2.0))
    moves, (seen_a, _, seen_b) = tx.consolidate(tx.init(params), params, None)
    np.testing.assert_array_equal(moves["w"], 3.0 * np.ones(3))
    np.testing.assert_array_equal(seen_a["w"], np.zeros(3))  # a saw the params as they were
    np.testing.assert_array_equal(seen_b["w"], np.ones(3))  # b saw them after a's move


def test_chain_sums_loss_terms_and_unions_needs():
    def term(c, needs):
        return clx.ContinualTransformation(
            lambda p: jnp.float32(c),
            lambda u, s, params=None, **e: (u, s),
            lambda s, p, ev: (None, s),
            loss=lambda p, s, b, f: s * jnp.sum(p["w"]),
            needs=frozenset(needs),
            name=f"term{c}",
        )

    tx = clx.chain(term(2.0, {"batch"}), optax.sgd(0.1), term(3.0, {"grad_fn"}))
    params = {"w": jnp.ones(4)}
    assert float(tx.loss(params, tx.init(params), None, None)) == 20.0
    assert tx.needs == {"batch", "grad_fn"} and tx.name == "chain(term2.0, optax, term3.0)"
    assert clx.chain(optax.sgd(0.1)).loss is None


def test_two_optimizer_owners_in_one_chain_is_an_error():
    with pytest.raises(ValueError, match=r"\['own1', 'own2'\] each apply their own optimizer"):
        clx.chain(_mover("own1", 0.0, {"optimizer"}), _mover("own2", 0.0, {"optimizer"}))
    with pytest.raises(ValueError, match="own1"):  # also through a nested chain
        clx.chain(clx.chain(_mover("own1", 0.0, {"optimizer"})), _mover("own2", 0.0, {"optimizer"}))


def test_check_needs_names_the_rule_a_model_cannot_serve():
    class PlainModel:  # a clx.core.Model without taps
        def apply(self, params, x, task_id=None):
            return x

    rule = clx.chain(clx.gpm(0.9), optax.sgd(0.1))
    with pytest.raises(ValueError, match="rule 'gpm' needs 'taps'.*PlainModel has no apply_with_taps"):
        clx.core.check_needs(rule, PlainModel())
    model, _ = clx.FunctionalModel.from_module(clx.MLP(4, (3,), 2, rngs=__import__("flax").nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no Dense"):
        clx.core.check_needs(rule, model, tap_shapes={})
    clx.core.check_needs(rule, model, tap_shapes={"layers/0/kernel": None})  # a tapped model with layers: fine
    with pytest.raises(ValueError, match=r"unknown needs \['telepathy'\]"):
        clx.core.check_needs(_mover("odd", 0.0, {"telepathy"}), model)
