"""OGD: the stored ground-truth-logit gradients are an orthonormal basis of the right span, and the projected
step leaves old tasks' ground-truth logits fixed to first order."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import clx
from clx import data
from clx.projection._ogd import OGDState, ogd


def _model(d=12, hidden=(8,), out=4, heads=1, bias=True, seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(d, hidden, out, num_heads=heads, use_bias=bias, rngs=nnx.Rngs(seed)))


def _data(n, d=12, out=4, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, out)


def _evidence(model, x, y, t=0):
    return clx.Evidence(jnp.int32(t), x, y, {}, model.apply)


def _perturbed(params, seed):
    return jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(seed), p.shape), params)


def _loop_gtl(model, params, x, y, t):
    """(n, P) float64: the ground-truth-logit gradients, one example at a time (no vmap)."""
    rows = []
    for i in range(x.shape[0]):
        g = jax.grad(lambda p: model.apply(p, x[i : i + 1], jnp.int32(t))[0, int(y[i])])(params)
        rows.append(np.asarray(ravel_pytree(g)[0], np.float64))
    return np.stack(rows)


def _projector(rows):
    """The orthogonal projector onto the row span of ``rows`` (float64, by SVD)."""
    u, s, vt = np.linalg.svd(rows, full_matrices=False)
    basis = vt[s > s[0] * 1e-6]
    return basis.T @ basis


def _two_tasks(m=10, num_tasks=3):
    model, params = _model()
    rule = ogd(m, num_tasks=num_tasks)
    state = rule.init(params)
    (x0, y0), (x1, y1) = _data(m + 3, seed=1), _data(m + 3, seed=2)
    p1 = _perturbed(params, 7)  # the second task is consolidated at other params
    consolidate = jax.jit(rule.consolidate)
    _, state = consolidate(state, params, _evidence(model, x0, y0, 0))
    _, state = consolidate(state, p1, _evidence(model, x1, y1, 1))
    return model, params, p1, rule, state, ((x0[:m], y0[:m]), (x1[:m], y1[:m]))


def test_stored_vectors_are_orthonormal_and_unused_rows_zero():
    _, params, _, _, state, _ = _two_tasks(m=10, num_tasks=3)
    v, count = np.asarray(state.vectors, np.float64), int(state.count)
    p = ravel_pytree(params)[0].size
    assert v.shape == (30, p) and state.vectors.dtype == jnp.float32 and state.count.dtype == jnp.int32
    assert count == 20  # 20 generic gradients in R^140: none dependent
    np.testing.assert_allclose(v[:count] @ v[:count].T, np.eye(count), atol=2e-6)
    assert not v[count:].any()


def test_projected_gradient_is_orthogonal_to_every_stored_vector_and_equals_the_projection():
    model, params, _, rule, state, _ = _two_tasks()
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(11), p.shape), params)
    out, new_state = jax.jit(rule.update)(g, state, params)
    assert new_state is state or all(np.array_equal(a, b) for a, b in zip(new_state, state))
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, out, g)
    assert all(jax.tree.leaves(same))
    v = np.asarray(state.vectors[: int(state.count)], np.float64)
    flat_g, flat_out = (np.asarray(ravel_pytree(t)[0], np.float64) for t in (g, out))
    assert np.abs(v @ flat_out).max() < 1e-5 * np.linalg.norm(flat_g)
    np.testing.assert_allclose(flat_out, flat_g - v.T @ (v @ flat_g), atol=1e-5)
    # a second projection changes nothing (a projector)
    again, _ = rule.update(out, state, params)
    np.testing.assert_allclose(ravel_pytree(again)[0], flat_out, atol=1e-5)


def test_stored_span_equals_span_of_per_example_gtl_gradients():
    model, p0, p1, _, state, ((x0, y0), (x1, y1)) = _two_tasks()
    rows = np.concatenate([_loop_gtl(model, p0, x0, y0, 0), _loop_gtl(model, p1, x1, y1, 1)])
    v = np.asarray(state.vectors[: int(state.count)], np.float64)
    np.testing.assert_allclose(v.T @ v, _projector(rows), atol=1e-4)
    # task 0's vectors alone span task 0's gradients (rows are written in order)
    np.testing.assert_allclose(v[:10].T @ v[:10], _projector(rows[:10]), atol=1e-4)


def test_dependent_gradients_are_dropped_not_counted():
    model, params = _model()
    x, y = _data(8, seed=3)
    x, y = x.at[5].set(x[0]), y.at[5].set(y[0])  # example 5 repeats example 0: the same gradient
    rule = ogd(8, num_tasks=2)
    consolidate = jax.jit(rule.consolidate)
    _, state = consolidate(rule.init(params), params, _evidence(model, x, y))
    assert int(state.count) == 7
    v = np.asarray(state.vectors, np.float64)
    np.testing.assert_allclose(v[:7] @ v[:7].T, np.eye(7), atol=2e-6)
    assert not v[7:].any()
    # consolidating the same examples at the same params again adds nothing
    _, state2 = consolidate(state, params, _evidence(model, x, y, 1))
    assert int(state2.count) == 7


def test_empty_memory_update_is_exactly_the_identity():
    model, params = _model()
    rule = ogd(5, num_tasks=2)
    state = rule.init(params)
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(5), p.shape), params)
    out, _ = jax.jit(rule.update)(g, state)
    jax.tree.map(np.testing.assert_array_equal, out, g)


def test_exclude_heads_passes_head_gradients_unchanged():
    model, params = _model(heads=3)
    assert params["head"]["kernel"].ndim == 3
    rule_all, rule_shared = ogd(6, num_tasks=3), ogd(6, num_tasks=3, exclude=("head",))
    x, y = _data(6, seed=4)
    n_all = ravel_pytree(params)[0].size
    n_head = params["head"]["kernel"].size + params["head"]["bias"].size
    _, s_all = jax.jit(rule_all.consolidate)(rule_all.init(params), params, _evidence(model, x, y, 1))
    _, s_sh = jax.jit(rule_shared.consolidate)(rule_shared.init(params), params, _evidence(model, x, y, 1))
    assert s_all.vectors.shape[1] == n_all and s_sh.vectors.shape[1] == n_all - n_head
    # task 1's logits depend on head 1 only: the full vectors are zero on heads 0 and 2
    heads = jax.vmap(lambda r: ravel_pytree(jax.tree.map(jnp.zeros_like, params))[1](r)["head"]["kernel"])(
        s_all.vectors[:6]
    )
    assert not np.asarray(heads[:, [0, 2]]).any() and np.asarray(heads[:, 1]).any()
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(6), p.shape), params)
    out, _ = rule_shared.update(g, s_sh)
    jax.tree.map(np.testing.assert_array_equal, out["head"], g["head"])
    assert not np.allclose(out["layers"][0]["kernel"], g["layers"][0]["kernel"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="memory_per_task must be >= 1"):
        ogd(0, num_tasks=2)
    with pytest.raises(ValueError, match="memory_per_task must be an integer"):
        ogd(2.5, num_tasks=2)
    with pytest.raises(ValueError, match="give num_tasks"):
        ogd(10)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        ogd(10, num_tasks=0)
    with pytest.raises(ValueError, match="tol must be in"):
        ogd(10, num_tasks=2, tol=0.0)
    model, params = _model()
    with pytest.raises(ValueError, match="over max_bytes"):
        ogd(10, num_tasks=2, max_bytes=1000).init(params)
    with pytest.raises(ValueError, match=r"exclude entries \['nope'\] match no parameter"):
        ogd(10, num_tasks=2, exclude=("nope",)).init(params)
    with pytest.raises(ValueError, match="no parameters left to project"):
        ogd(10, num_tasks=2, exclude=("layers",)).init(params)


def test_consolidate_and_update_errors():
    model, params = _model()
    rule = ogd(10, num_tasks=2)
    state = rule.init(params)
    x, y = _data(6)
    with pytest.raises(ValueError, match="has 6 examples but memory_per_task=10.*evidence_samples>=10"):
        rule.consolidate(state, params, _evidence(model, x, y))
    x, y = _data(10)
    with pytest.raises(ValueError, match="consolidating task 2 but the state holds num_tasks=2.*num_tasks >= 3"):
        rule.consolidate(state, params, _evidence(model, x, y, t=2))
    with pytest.raises(ValueError, match="no apply_fn"):
        rule.consolidate(state, params, clx.Evidence(jnp.int32(0), x, y, {}))
    _, other = _model(hidden=(5,))
    with pytest.raises(ValueError, match="build the state with init on these params"):
        rule.update(other, state)


def test_full_memory_under_jit_clamps_and_keeps_old_rows():
    """Past num_tasks under jit (task index traced): the count stops at the capacity and no row is overwritten."""
    model, params = _model()
    rule = ogd(4, num_tasks=2)
    consolidate = jax.jit(rule.consolidate)
    state = rule.init(params)
    for t in range(2):
        _, state = consolidate(state, params, _evidence(model, *_data(4, seed=20 + t), t=t))
    full = np.asarray(state.vectors)
    _, state3 = consolidate(state, params, _evidence(model, *_data(4, seed=30), t=2))
    assert int(state3.count) == 8
    np.testing.assert_array_equal(np.asarray(state3.vectors), full)


class _OneTask:
    """Task ``t`` of a stream as a one-task stream (fit trains it as task 0)."""

    def __init__(self, stream, t):
        self._stream, self._t, self.num_tasks = stream, t, 1

    def task(self, i):
        return self._stream.task(self._t)

    def test_set(self, i):
        return self._stream.test_set(self._t)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def test_training_a_second_task_keeps_old_ground_truth_logits_much_better_than_sgd():
    """clx.fit on task 1 with OGD + plain SGD at a small lr moves task 0's stored ground-truth logits by much
    less than plain SGD does (first order: they do not move at all)."""
    stream = data.make_stream(data.load_source("digits"), "permuted", 2, seed=0, train_subset=200)
    model, p_init = clx.FunctionalModel.from_module(clx.MLP(64, (32,), 10, use_bias=True, rngs=nnx.Rngs(0)))
    kw = dict(epochs=3, batch_size=20, evidence_samples=40, progress=False)
    p0 = clx.fit(model, p_init, optax.sgd(0.1), _OneTask(stream, 0), **kw).params
    task0 = stream.task(0)
    x0, y0 = jnp.asarray(task0.x_train[:40]), jnp.asarray(task0.y_train[:40])
    rule = ogd(40, num_tasks=2)
    _, state = jax.jit(rule.consolidate)(rule.init(p0), p0, _evidence(model, x0, y0))

    def gtl(params):
        return np.asarray(jnp.take_along_axis(model.apply(params, x0), y0[:, None], axis=1)[:, 0])

    lr = 0.05
    chained = clx.chain(rule, optax.sgd(lr))
    with_ogd = chained._replace(init=lambda params: (state, optax.sgd(lr).init(params)))
    moved = {}
    for name, r in (("ogd", with_ogd), ("sgd", optax.sgd(lr))):
        res = clx.fit(model, jax.tree.map(jnp.copy, p0), r, _OneTask(stream, 1), **kw)
        moved[name] = np.abs(gtl(res.params) - gtl(p0)).mean()
        if name == "ogd":
            assert int(res.rule_state[0].count) == 80  # task 1 consolidated too
    assert moved["sgd"] > 0.03  # 0.073 measured
    assert moved["ogd"] < 0.12 * moved["sgd"], moved  # 0.0057 measured: only the second-order drift remains


def test_state_is_an_ogdstate_and_vmaps_over_seeds():
    """init and consolidate vmapped over 3 seeds' params equal each seed alone."""
    model = _model()[0]
    stack = [_model(seed=s)[1] for s in range(3)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *stack)
    rule = ogd(5, num_tasks=2)
    x, y = _data(5, seed=9)
    states = jax.vmap(rule.init)(params)
    assert isinstance(states, OGDState)
    ev = _evidence(model, x, y)
    _, batched = jax.jit(jax.vmap(rule.consolidate, in_axes=(0, 0, None)))(states, params, ev)
    consolidate = jax.jit(rule.consolidate)
    for s in range(3):
        _, alone = consolidate(rule.init(stack[s]), stack[s], ev)
        np.testing.assert_allclose(batched.vectors[s], alone.vectors, atol=1e-5)
        assert int(batched.count[s]) == int(alone.count) == 5
