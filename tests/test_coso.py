"""CoSO: projected Adam in gradient subspaces orthogonal to a Frequent-Directions history of old tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx import subspace as sub
from clx.projection._coso import append_directions, coso, frequent_directions, history_count

PATHS = ("layers/0/kernel", "layers/1/kernel")


def _model(d=12, hidden=(8,), out=6, seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(d, hidden, out, use_bias=True, rngs=nnx.Rngs(seed)))


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def _kernel(tree, path):
    for key in path.split("/"):
        tree = tree[int(key)] if key.isdigit() else tree[key]
    return np.asarray(tree)


def _history(state, path):
    h = state.history[path]
    return np.asarray(h.basis)[:, np.asarray(h.mask)]


def test_full_rank_on_an_empty_history_with_sgd_is_sgd():
    """U U^T g = g for a full-rank U, so with SGD as the inner optimizer CoSO is SGD (to float tolerance)."""
    _, params = _model()
    rule = coso(rank={"layers/0/kernel": 8, "layers/1/kernel": 6}, inner=optax.sgd(0.1), sketch_size=4)
    state, update = rule.init(params), jax.jit(rule.update)
    for step in range(3):
        g = _grads(params, step)
        out, state = update(g, state, params)
        jax.tree.map(lambda o, gg: np.testing.assert_allclose(o, -0.1 * gg, atol=2e-6), out, g)


def test_adam_runs_on_the_subspace_coordinates_and_keeps_its_moments_across_subspaces():
    """Adam is not rotation invariant, so full-rank CoSO with Adam is not plain Adam: it is Adam on the coordinates
    C = P^T G (P: G's top left singular vectors, new every step with K = 1), its moments carried over unrotated
    when P changes (the code), the step mapped back by P. Checked against NumPy with the rule's own P (SVD signs
    are arbitrary); the layer left out of ``layers`` takes optax's plain Adam step."""
    _, params = _model()
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-6
    rule = coso(lr, rank=6, layers=["layers/1/kernel"], sketch_size=3)
    ref = optax.adam(lr, eps=eps)
    state, ref_state = rule.init(params), ref.init(params)
    m = v = np.zeros((6, 8))
    update = jax.jit(rule.update)
    for step in range(1, 4):
        g = _grads(params, step)
        out, state = update(g, state, params)
        want, ref_state = ref.update(g, ref_state)
        gm = _kernel(g, "layers/1/kernel").T  # output side: (6, 8)
        p = np.asarray(state.bases["layers/1/kernel"], np.float64)
        np.testing.assert_allclose(p.T @ p, np.eye(6), atol=1e-5)
        c = p.T @ gm
        m, v = b1 * m + (1 - b1) * c, b2 * v + (1 - b2) * c * c
        step_c = -lr * (m / (1 - b1**step)) / (np.sqrt(v / (1 - b2**step)) + eps)
        np.testing.assert_allclose(_kernel(out, "layers/1/kernel").T, p @ step_c, atol=1e-5)
        np.testing.assert_allclose(_kernel(out, "layers/0/kernel"), _kernel(want, "layers/0/kernel"), atol=1e-7)


def test_the_update_lies_in_the_current_subspace_and_is_orthogonal_to_the_history():
    _, params = _model()
    rule = coso(1e-2, rank=2, sketch_size=4)
    state = rule.init(params)
    update, consolidate = jax.jit(rule.update), jax.jit(rule.consolidate)
    for step in range(4):
        _, state = update(_grads(params, step), state, params)
    _, state = consolidate(state, params, None)
    assert all(sub.rank(state.history[p]) > 0 for p in PATHS)
    for step in range(4, 7):
        out, state = update(_grads(params, step), state, params)
        for p in PATHS:
            delta = _kernel(out, p).T  # (a, b), output side
            basis, hist = np.asarray(state.bases[p]), _history(state, p)
            assert np.abs(delta).max() > 1e-4
            np.testing.assert_allclose(basis @ (basis.T @ delta), delta, atol=1e-6)  # in span(P)
            assert np.abs(hist.T @ delta).max() < 1e-6  # orthogonal to M
            assert np.abs(hist.T @ basis).max() < 1e-5


def test_frequent_directions_is_exact_without_shrinkage_and_a_lower_bound_with_it():
    key = jax.random.key(0)
    gs = [jax.random.normal(k, (6, 2)) for k in jax.random.split(key, 3)]  # rank 2 each, 6 in total
    exact = jnp.zeros((6, 6))
    for g in gs:
        exact = frequent_directions(exact, g)
    want = sum(np.asarray(g) @ np.asarray(g).T for g in gs)
    np.testing.assert_allclose(np.asarray(exact @ exact.T), want, rtol=1e-4, atol=1e-4)
    small = jnp.zeros((6, 3))
    for g in gs:
        small = frequent_directions(small, g)
    gap = np.linalg.eigvalsh(want - np.asarray(small @ small.T))
    assert gap.min() > -1e-4  # sum g g^T - Z Z^T is positive semi-definite
    # FD's guarantee with l = 3: ||sum g g^T - Z Z^T||_2 <= ||G||_F^2 / (l - k) for any k < l; k = 0
    assert gap.max() <= np.trace(want) / 3 + 1e-4


def test_history_keeps_the_code_s_count_and_stays_orthonormal():
    sigma = jnp.array([3.0, 2.0, 1.0, 0.0])  # energy ratios 9/14, 13/14, 1, 1
    assert int(history_count(sigma, 0.98)) == 2  # the code's strict "<": 2 (the paper-style count would be 3)
    assert int(history_count(sigma, 0.5)) == 0
    assert int(history_count(jnp.zeros(3), 0.98)) == 0
    append = jax.jit(append_directions, static_argnums=2)
    s = sub.empty(5)
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))[0]
    s = append(s, jnp.asarray(q[:, :2]), 2)
    s = append(s, jnp.asarray(q[:, 1:4]), 3)  # q[:, 1] is already in: the run stops there
    assert int(sub.rank(s)) == 2
    s = append(s, jnp.asarray(q[:, 2:5]), 2)
    basis = np.asarray(s.basis)[:, np.asarray(s.mask)]
    np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-5)


def test_consolidate_resets_the_task_and_the_rule_vmaps_over_seeds():
    _, params = _model()
    rule = coso(3e-3, rank=2, sketch_size=4, update_every=2)
    update, consolidate = jax.jit(jax.vmap(rule.update)), jax.jit(jax.vmap(rule.consolidate, in_axes=(0, 0, None)))
    two = jax.tree.map(lambda p: jnp.stack([p, p]), params)
    state = jax.vmap(rule.init)(two)
    for step in range(3):
        g = jax.tree.map(lambda a: jnp.stack([a, -2 * a]), _grads(params, step))
        out, state = update(g, state, two)
    assert np.asarray(state.step).tolist() == [3, 3]
    _, state = consolidate(state, two, None)
    assert np.asarray(state.step).tolist() == [0, 0]
    assert all(float(jnp.abs(z).max()) == 0 for z in state.sketches.values())
    assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(state.inner_state[0].mu))  # a fresh Adam
    ranks = {p: np.asarray(sub.rank(jax.tree.map(lambda a: a[0], state.history[p]))) for p in PATHS}
    assert all(0 < r <= 4 for r in ranks.values())
    # both members saw gradients of the same directions (g and -2 g): the same history dimension
    assert all(int(jnp.sum(state.history[p].mask[0])) == int(jnp.sum(state.history[p].mask[1])) for p in PATHS)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank must be an integer >= 1"),
        (dict(threshold=0.0), r"threshold must be in \(0, 1\]"),
        (dict(threshold=1.5), r"threshold must be in \(0, 1\]"),
        (dict(update_every=0), "update_every must be an integer >= 1"),
        (dict(sketch_size=0), "sketch_size must be an integer >= 1"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(decay=-1.0), "decay must be >= 0"),
        (dict(side="rows"), "side must be one of"),
    ],
)
def test_bad_hyperparameters_raise_in_the_factory(kwargs, match):
    with pytest.raises(ValueError, match=match):
        coso(**kwargs)


def test_rank_above_the_weight_s_smaller_side_raises_at_init():
    _, params = _model()
    with pytest.raises(ValueError, match=r"rank 7 for 'layers/1/kernel' exceeds min\(a, b\) = 6"):
        coso(rank=7).init(params)
    with pytest.raises(ValueError, match="not 2-D kernels"):
        coso(rank=2, layers=["layers/9/kernel"]).init(params)
