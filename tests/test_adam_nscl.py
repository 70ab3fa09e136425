"""Adam-NSCL: plain Adam before the first task ends, then Adam steps in the null space of the
old tasks' uncentered feature covariance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx import data
from clx.projection._adam_nscl import adam_nscl, feature_columns, null_space_mask, null_space_projector
from clx.train import evidence_key, fit, make_evidence_fn

PATHS = ("layers/0/kernel", "layers/1/kernel")


def _model(d=12, hidden=(8,), out=4, seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(d, hidden, out, use_bias=False, rngs=nnx.Rngs(seed)))


def _evidence(model, params, x, t=0):
    reps = make_evidence_fn(model)(params, x, jnp.int32(t))
    return clx.Evidence(jnp.int32(t), x, jnp.zeros(x.shape[0], jnp.int32), reps, model.apply)


def _kernel(tree, path):
    for key in path.split("/"):
        tree = tree[int(key)] if key.isdigit() else tree[key]
    return np.asarray(tree)


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def test_before_consolidate_the_update_is_optax_adam():
    model, params = _model()
    rule, ref = adam_nscl(1e-3), optax.adam(1e-3)
    state, ref_state = rule.init(params), ref.init(params)
    update, ref_update = jax.jit(rule.update), jax.jit(ref.update)  # both compiled: same fusion, same bits
    for step in range(3):
        g = _grads(params, step)
        out, state = update(g, state, params, task_id=jnp.int32(0))
        want, ref_state = ref_update(g, ref_state, params)
        jax.tree.map(np.testing.assert_array_equal, out, want)
    assert rule.needs == frozenset({"optimizer", "representations"}) and rule.name == "adam_nscl"


def test_after_consolidate_updates_lie_in_the_null_space_of_old_features():
    """a < 1: the null space is the exact orthogonal complement of the old inputs' span (rank 5)."""
    model, params = _model()
    x_old = jax.random.normal(jax.random.key(1), (5, 12))
    ev = _evidence(model, params, x_old)
    rule = adam_nscl(1e-2, a=0.5)
    state = rule.init(params)
    _, state = jax.jit(rule.consolidate)(state, params, ev)
    for p, d in zip(PATHS, (12, 8)):
        q, x = np.asarray(state.projectors[p]), np.asarray(ev.representations[p])
        np.testing.assert_allclose(q @ q, q, atol=1e-5)  # an orthogonal projector ...
        assert round(np.trace(q)) == d - np.linalg.matrix_rank(x) > 0  # ... onto the complement of the old columns
    fresh = optax.adam(1e-2).init(params)  # Adam was reset at consolidate
    for step in range(3):
        g = _grads(params, 10 + step)
        out, state = rule.update(g, state, params, task_id=jnp.int32(1))
        raw, fresh = optax.adam(1e-2).update(g, fresh, params)
        for p in PATHS:
            u, x = _kernel(out, p), np.asarray(ev.representations[p])  # (d, m), (d, 5)
            rel = np.linalg.norm(x.T @ u) / (np.linalg.norm(x) * np.linalg.norm(u))
            assert rel < 1e-5, (p, rel)
            np.testing.assert_allclose(u, np.asarray(state.projectors[p]) @ _kernel(raw, p), atol=1e-6)


def test_covariance_accumulates_over_tasks_like_numpy():
    model, params = _model()
    x1 = np.asarray(jax.random.normal(jax.random.key(2), (30, 12)))
    x2 = np.asarray(jax.random.normal(jax.random.key(3), (30, 12))) * 2.0 + 1.0
    rule = adam_nscl(1e-3)
    state = rule.init(params)
    consolidate = jax.jit(rule.consolidate)
    ev1, ev2 = _evidence(model, params, jnp.asarray(x1), 0), _evidence(model, params, jnp.asarray(x2), 1)
    _, state = consolidate(state, params, ev1)
    _, state = consolidate(state, params, ev2)
    for p in PATHS:
        r = np.concatenate([np.asarray(ev1.representations[p]), np.asarray(ev2.representations[p])], axis=1)
        np.testing.assert_allclose(state.covariances[p], r @ r.T / 60, rtol=1e-5, atol=1e-6)
        assert float(state.counts[p]) == 60.0

    # The official code's estimate: outer products of per-batch means (batches of 10 examples).
    rule = adam_nscl(1e-3, covariance="batch_means", batch_size=10)
    _, state = rule.consolidate(rule.init(params), params, ev1)
    means = x1.reshape(3, 10, 12).mean(axis=1)  # (batches, d)
    np.testing.assert_allclose(state.covariances["layers/0/kernel"], means.T @ means / 3, rtol=1e-5, atol=1e-6)


def test_batch_means_of_conv_patches_average_each_position():
    rep = np.asarray(jax.random.normal(jax.random.key(4), (6, 8 * 3)))  # d=6, 8 examples x 3 positions
    cols = np.asarray(feature_columns(jnp.asarray(rep), 8, "batch_means", 4, path="c"))
    want = rep.reshape(6, 2, 4, 3).mean(axis=2).reshape(6, 6)
    np.testing.assert_allclose(cols, want, rtol=1e-6)


def test_null_space_selection_matches_numpy():
    rng = np.random.default_rng(0)
    v, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    lam = np.array([0.5, 0.7, 1.2, 2.0, 4.0, 9.0, 20.0, 50.0, 80.0, 100.0])
    cov = (v * lam) @ v.T
    for a in (1.0, 3.0, 10.0, 1000.0):
        w, u = np.linalg.eigh(cov)
        keep = w <= a * w[0]
        vectors, mask = jax.jit(null_space_mask)(jnp.asarray(cov, jnp.float32), a)
        np.testing.assert_array_equal(mask, keep)
        ref = u[:, keep] @ u[:, keep].T
        np.testing.assert_allclose(null_space_projector(jnp.asarray(cov, jnp.float32), a), ref, atol=1e-5)
        np.testing.assert_allclose(
            null_space_projector(jnp.asarray(cov, jnp.float32), a, normalize=True),
            ref / np.linalg.norm(ref),
            atol=1e-5,
        )
    assert int(jnp.sum(null_space_mask(jnp.asarray(cov, jnp.float32), 0.5)[1])) == 0  # a < 1, full rank: frozen


def test_later_learning_rate_scales_the_steps_after_the_first_task():
    model, params = _model()
    g = _grads(params, 5)
    plain, slow = adam_nscl(1e-3), adam_nscl(1e-3, later_learning_rate=5e-5)
    a, _ = plain.update(g, plain.init(params), params, task_id=jnp.int32(1))
    b, _ = slow.update(g, slow.init(params), params, task_id=jnp.int32(1))
    c, _ = slow.update(g, slow.init(params), params, task_id=jnp.int32(0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x * 0.05, rtol=1e-5), a, b)
    jax.tree.map(np.testing.assert_array_equal, a, c)


def test_consolidate_vmaps_over_seeds():
    model, _ = _model()
    members = [_model(seed=s)[1] for s in (0, 1)]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *members)
    rule = adam_nscl(1e-3, a=2.0)
    x = jax.random.normal(jax.random.key(6), (20, 12))
    evs = [_evidence(model, p, x) for p in members]
    ev = jax.tree.map(lambda *e: jnp.stack(e), *evs)
    _, states = jax.jit(jax.vmap(rule.consolidate))(jax.vmap(rule.init)(stacked), stacked, ev)
    for i, (p, e) in enumerate(zip(members, evs)):
        _, s = rule.consolidate(rule.init(p), p, e)
        jax.tree.map(lambda v, w: np.testing.assert_allclose(v[i], w, atol=1e-5), states, s)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"learning_rate": 1e-3, "a": 0.0}, "a must be > 0"),
        ({"learning_rate": 1e-3, "a": [1.0, -2.0]}, "a must be > 0"),
        ({"learning_rate": 1e-3, "b2": 1.0}, "b2 must be in"),
        ({"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"learning_rate": 1e-3, "covariance": "centered"}, "covariance must be one of"),
        ({"learning_rate": 1e-3, "covariance": "batch_means"}, "needs batch_size"),
        ({"learning_rate": 1e-3, "later_learning_rate": -1.0}, "later_learning_rate must be > 0"),
        ({"learning_rate": optax.constant_schedule(1e-3), "later_learning_rate": 1e-4}, "not a schedule"),
    ],
)
def test_bad_hyperparameters_raise_in_the_factory(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adam_nscl(**kwargs)


def test_bad_layers_and_evidence_raise():
    model, params = _model()
    with pytest.raises(ValueError, match="are not 2-D kernels"):
        adam_nscl(1e-3, layers=["layers/9/kernel"]).init(params)
    with pytest.raises(ValueError, match="3 a values given for 2 projected layers"):
        adam_nscl(1e-3, a=[1.0, 2.0, 3.0]).init(params)
    rule = adam_nscl(1e-3)
    state = rule.init(params)
    ev = _evidence(model, params, jnp.ones((4, 12)))
    with pytest.raises(ValueError, match="no representation matrices for"):
        rule.consolidate(state, params, ev.replace(representations={}))
    bad = dict(ev.representations, **{"layers/0/kernel": jnp.ones((5, 4))})
    with pytest.raises(ValueError, match="lives in R\\^12|live in R\\^12"):
        rule.consolidate(state, params, ev.replace(representations=bad))
    nan = dict(ev.representations, **{"layers/0/kernel": jnp.full((12, 4), jnp.nan)})
    with pytest.raises(ValueError, match="NaN or inf"):
        rule.consolidate(state, params, ev.replace(representations=nan))
    with pytest.raises(ValueError, match="needs at least batch_size=8"):
        adam_nscl(1e-3, covariance="batch_means", batch_size=8).consolidate(state, params, ev)
    with pytest.raises(ValueError, match="needs the task_id extra"):
        adam_nscl(1e-3, later_learning_rate=1e-4).update(_grads(params, 0), state, params)
    with pytest.raises(ValueError, match="weight_decay > 0 needs params"):
        r = adam_nscl(1e-3, weight_decay=1e-4)
        r.update(_grads(params, 0), r.init(params))


def test_fit_keeps_the_old_task_outputs_on_its_stored_representations():
    """clx.fit on two permuted-digits tasks; with a < 1 every layer's null space is the exact
    complement of task 0's evidence columns, so task 0's logits on that sample do not move."""
    samples, kw = 24, dict(epochs=1, batch_size=16, evidence_samples=24, progress=False)
    rule = adam_nscl(1e-2, a=0.5)

    def stream(t):
        return data.make_stream(data.load_source("digits"), "permuted", t, seed=0, train_subset=160)

    model, params = clx.FunctionalModel.from_module(clx.MLP(64, (32,), 10, use_bias=False, rngs=nnx.Rngs(0)))
    after0 = fit(model, params, rule, stream(1), **kw)
    model, params = clx.FunctionalModel.from_module(clx.MLP(64, (32,), 10, use_bias=False, rngs=nnx.Rngs(0)))
    after1 = fit(model, params, rule, stream(2), **kw)

    task0 = stream(2).task(0)
    pick = np.asarray(jax.random.permutation(evidence_key(jax.random.key(0), 0), len(task0.y_train)))[:samples]
    x_ev = jnp.asarray(task0.x_train[pick])
    reps = make_evidence_fn(model)(after0.params, x_ev, jnp.int32(0))
    cov = after0.rule_state.covariances["layers/0/kernel"]
    x0 = np.asarray(reps["layers/0/kernel"])
    np.testing.assert_allclose(cov, x0 @ x0.T / samples, rtol=1e-4, atol=1e-6)  # it is the stored sample

    old = np.asarray(model.apply(after0.params, x_ev))
    new = np.asarray(model.apply(after1.params, x_ev))
    np.testing.assert_allclose(new, old, atol=1e-4 * np.abs(old).max())
    moved = np.abs(_kernel(after1.params, "layers/0/kernel") - _kernel(after0.params, "layers/0/kernel")).max()
    assert moved > 1e-2  # task 1 did train the kernels, inside the null space
    assert after1.accuracy_matrix[1, 1] > after1.random_baseline[1] + 0.1
