"""SVD-split (clx.projection.svd_split): the two-sided projection, the rank rules, the frozen triplets unchanged
after fine-tuning, the identity at k = 0, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx.core import Evidence
from clx.projection._svd_split import frozen_rank, layer_importance, split_projection


def _mlp(seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(12, (10,), 6, use_bias=True, rngs=nnx.Rngs(seed)))


def _data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, 12)), jnp.float32), jnp.asarray(rng.integers(0, 6, n), jnp.int32)


def _train(model, params, rule, steps=25, seed=1):
    x, y = _data(seed=seed)
    state = rule.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        g = jax.grad(loss)(params)
        u, state = rule.update(g, state, params)
        return optax.apply_updates(params, u), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _kernels(params):
    return {clx.tree.path_str(p): np.asarray(v, np.float64) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_the_projection_removes_both_frozen_subspaces_and_is_idempotent():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    a, s, bt = jnp.linalg.svd(w, full_matrices=False)
    g = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    p = split_projection(g, a, bt.T, jnp.int32(2))
    a2, b2 = np.asarray(a[:, :2]), np.asarray(bt.T[:, :2])
    np.testing.assert_allclose(a2.T @ np.asarray(p), 0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p) @ b2, 0, atol=1e-6)
    want = (np.eye(6) - a2 @ a2.T) @ np.asarray(g) @ (np.eye(4) - b2 @ b2.T)
    np.testing.assert_allclose(np.asarray(p), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(split_projection(p, a, bt.T, jnp.int32(2))), np.asarray(p), atol=1e-6)
    assert np.array_equal(np.asarray(split_projection(g, a, bt.T, jnp.int32(0))), np.asarray(g))  # k = 0: exactly g


def test_the_fraction_rule_is_the_released_codes():
    # k = min(floor(max(d, m) * s), min(d, m)) (notebooks/finetune_svd.py)
    assert int(frozen_rank((64, 64), 0.07)) == 4
    assert int(frozen_rank((64, 128), 0.07)) == 8
    assert int(frozen_rank((64, 128), 0.49)) == 62
    assert int(frozen_rank((64, 128), 0.6)) == 64  # capped at min(d, m): every direction frozen
    assert int(frozen_rank((5, 3), 0.0)) == 0
    model, params = _mlp()
    rule = clx.projection.svd_split(0.1, 0.1)
    state = rule.init(params)
    assert {k: int(v) for k, v in state.rank.items()} == {"layers/0/kernel": 1, "layers/1/kernel": 1}
    ev = Evidence(jnp.int32(0), jnp.zeros((1, 12)), jnp.zeros((1,), jnp.int32), {})
    for task, want in ((1, 2), (2, 3)):  # s_t = 0.1 + 0.1 t of max(d, m) = 12 and 10
        _, state = rule.consolidate(state, params, ev)
        assert int(state.task) == task
        assert int(state.rank["layers/0/kernel"]) == int(np.floor(12 * (0.1 + 0.1 * task) + 1e-6))
        assert int(state.rank["layers/1/kernel"]) == want


@pytest.mark.parametrize("where", ["owned_adam", "after_adam", "before_sgd"])
def test_the_frozen_triplets_survive_fine_tuning(where):
    model, params = _mlp()
    if where == "owned_adam":
        rule = clx.projection.svd_split(0.4, optimizer=optax.adam(0.05))
    elif where == "after_adam":
        rule = clx.chain(optax.adam(0.05), clx.projection.svd_split(0.4))
    else:
        rule = clx.chain(clx.projection.svd_split(0.4), optax.sgd(0.5))
    state0 = rule.init(params)
    split = state0 if where == "owned_adam" else next(s for s in state0 if isinstance(s, clx.projection.SVDSplitState))
    trained, _ = _train(model, params, rule)
    before, after = _kernels(params), _kernels(trained)
    for path in ("layers/0/kernel", "layers/1/kernel"):
        k = int(split.rank[path])
        assert k == int(np.floor(max(before[path].shape) * 0.4))  # 4 of 12x10, 4 of 10x6
        a = np.asarray(split.left[path], np.float64)[:, :k]
        b = np.asarray(split.right[path], np.float64)[:, :k]
        s = np.asarray(split.singular_values[path], np.float64)[:k]
        w = after[path]
        assert np.abs(w - before[path]).max() > 1e-2  # it learned
        np.testing.assert_allclose(a.T @ w @ b, np.diag(s), atol=2e-5)  # the frozen block
        np.testing.assert_allclose(a.T @ w, np.diag(s) @ b.T, atol=2e-5)  # W^T's action on the frozen left vectors
        np.testing.assert_allclose(w @ b, a @ np.diag(s), atol=2e-5)  # W's action on the frozen right vectors
        # the singular values and vectors of the trained W still hold the frozen triplets
        sv = np.linalg.svd(w, compute_uv=False)
        assert all(np.isclose(sv, x, atol=1e-4).any() for x in s)
    for path in ("layers/0/bias", "layers/1/bias"):  # 1-D leaves train freely
        assert np.abs(after[path] - before[path]).max() > 1e-3


def test_with_nothing_frozen_it_is_the_plain_optimizer_step_for_step():
    model, params = _mlp()
    for plain, rule in (
        (optax.adam(0.01), clx.projection.svd_split(0.0, 0.0, optimizer=optax.adam(0.01))),
        (optax.sgd(0.1), clx.chain(optax.sgd(0.1), clx.projection.svd_split(0.0, 0.0))),
    ):
        p1, p2 = params, params
        s1, s2 = plain.init(params), rule.init(params)
        x, y = _data()

        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        for _ in range(5):
            u1, s1 = plain.update(jax.grad(loss)(p1), s1, p1)
            u2, s2 = rule.update(jax.grad(loss)(p2), s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
            for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
                assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_adaptive_rule_on_a_hand_made_case():
    # inputs e_1..e_4; layer a: W = 2 I (cos 1 on every column, I = 1); layer b: W = diag(1, 1, 1, -1) (I = 0.5).
    # mean 0.75; k = round(4 * 0.5 + I / 0.75 * 4 * 0.5), clipped to [1, 4]: a -> 5 -> 4, b -> round(3.33) = 3
    params = {"a": {"kernel": 2 * jnp.eye(4)}, "b": {"kernel": jnp.diag(jnp.array([1.0, 1.0, 1.0, -1.0]))}}
    x = jnp.eye(4)
    assert float(layer_importance(params["a"]["kernel"], x)) == pytest.approx(1.0)
    assert float(layer_importance(params["b"]["kernel"], x)) == pytest.approx(0.5)
    rule = clx.projection.svd_split(0.25, 0.0, rank_rule="adaptive")
    assert rule.needs == frozenset({"representations"})
    state = rule.init(params)
    assert {k: int(v) for k, v in state.rank.items()} == {"a/kernel": 1, "b/kernel": 1}  # task 0: floor(4 * 0.25)
    ev = Evidence(jnp.int32(0), jnp.zeros((4, 4)), jnp.zeros((4,), jnp.int32), {"a/kernel": x, "b/kernel": x})
    _, state = rule.consolidate(state, params, ev)
    assert {k: int(v) for k, v in state.rank.items()} == {"a/kernel": 4, "b/kernel": 3}
    with pytest.raises(ValueError, match="no representations for"):
        rule.consolidate(state, params, ev.replace(representations={"a/kernel": x}))


def test_a_traced_fraction_is_vmapped():
    model, params = _mlp()

    def ranks(f):
        return clx.projection.svd_split(f, 0.0).init(params).rank["layers/0/kernel"]

    assert np.asarray(jax.jit(jax.vmap(ranks))(jnp.array([0.0, 0.25, 0.5]))).tolist() == [0, 3, 6]


def test_the_vit_splits_its_matrices_and_leaves_the_rest():
    vit = clx.models.ViT((8, 8, 1), 10, patch_size=2, dim=8, depth=1, attention_heads=2, mlp_dim=16, rngs=nnx.Rngs(0))
    _, params = clx.FunctionalModel.from_module(vit)
    rule = clx.projection.svd_split(0.25)
    state = rule.init(params)
    assert sorted(state.rank) == sorted(
        ["head/kernel", "patch_embed/kernel", "blocks/0/fc1/kernel", "blocks/0/fc2/kernel"]
        + [f"blocks/0/attn/{n}/kernel" for n in ("key", "out", "query", "value")]
    )
    g = jax.tree.map(jnp.ones_like, params)
    out, _ = rule.update(g, state, params)
    for path in ("cls_token", "pos_embed", "blocks/0/attn/query/bias", "norm/scale"):  # 3-D and 1-D: unchanged
        a, b = _kernels(out)[path], _kernels(g)[path]
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="not 2-D kernels"):
        clx.projection.svd_split(0.25, layers=["pos_embed"]).init(params)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fraction": 1.0}, r"fraction must be in \[0, 1\)"),
        ({"fraction": -0.1}, r"fraction must be in \[0, 1\)"),
        ({"fraction_step": -0.01}, "fraction_step must be >= 0"),
        ({"rank_rule": "energy"}, "rank_rule must be one of"),
        ({"min_retention": 0.8, "target_retention": 0.5}, "min_retention <= target_retention"),
        ({"optimizer": "adam"}, "optimizer must be an optax.GradientTransformation"),
    ],
)
def test_bad_input_raises_at_the_factory(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        clx.projection.svd_split(**kwargs)


def test_an_update_of_another_shape_names_the_layer():
    model, params = _mlp()
    rule = clx.projection.svd_split(0.2)
    state = rule.init(params)
    bad = jax.tree.map(jnp.zeros_like, params)
    bad["layers"][0]["kernel"] = jnp.zeros((3, 3))
    with pytest.raises(ValueError, match="'layers/0/kernel' has shape \\(3, 3\\)"):
        rule.update(bad, state, params)
