"""TRGP: old tasks keep their outputs (with their stored scale matrices), an empty trust region is GPM,
the trust-region choice and the joint basis ranking on hand-made cases, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx import subspace as sub
from clx.projection import TRGPModel, task_basis, trgp, trust_region
from clx.train import make_train_steps_fn

K0, K1 = "net/layers/0/kernel", "net/layers/1/kernel"


def _wrapped(d=12, hidden=(24,), out=3, tasks=3, seed=0, rank=None):
    net, net_params = clx.FunctionalModel.from_module(clx.MLP(d, hidden, out, use_bias=False, rngs=nnx.Rngs(seed)))
    model, params = TRGPModel.wrap(net, net_params, tasks, rank=rank)
    return net, model, params


def _task_data(t, n=10, d=12, r=4, out=3):
    """n examples of task t in an r-dimensional subspace of R^d, random labels."""
    k = jax.random.key(100 + t)
    z = jax.random.normal(jax.random.fold_in(k, 0), (n, r))
    x = z @ jax.random.normal(jax.random.fold_in(k, 1), (r, d))
    return x, jax.random.randint(jax.random.fold_in(k, 2), (n,), 0, out)


class _Runner:
    """Trains a rule task by task with the trainer's own programs and consolidates like ``clx.fit``."""

    def __init__(self, model, rule, batch):
        self.model, self.rule, self.batch = model, rule, batch
        self.step = make_train_steps_fn(model, rule, batch)(1)  # one compiled step (no unrolled copies)
        self.consolidate_fn = jax.jit(rule.consolidate)
        self.key = jax.random.key_data(jax.random.key(0))

    def steps(self, params, state, x, y, t, start, num):
        """``num`` steps from batch ``start``, one program call each (one compiled step: no unrolled copies)."""
        ids = jnp.full((x.shape[0],), t, jnp.int32)
        for i in range(start, start + num):
            params, state, _ = self.step(None, params, state, x, y, ids, self.key, t, 0, i)
        return params, state

    def consolidate(self, params, state, x, y, t):
        _, inputs = self.model.apply_with_taps(params, x, jnp.int32(t))  # the trainer's evidence, eagerly
        ev = clx.Evidence(jnp.int32(t), x, y, {k: v.T for k, v in inputs.items()}, self.model.apply)
        moves, state = self.consolidate_fn(state, params, ev)
        return (params if moves is None else optax.apply_updates(params, moves)), state

    def task(self, params, state, x, y, t):
        params, state = self.steps(params, state, x, y, t, 0, math.ceil(x.shape[0] / self.batch))
        return self.consolidate(params, state, x, y, t)


def test_empty_region_is_the_wrapped_network_bit_for_bit():
    net, model, params = _wrapped()
    x = jax.random.normal(jax.random.key(1), (5, 12))
    np.testing.assert_array_equal(model.apply(params, x, 2), net.apply(params["net"], x))
    logits, inputs = model.apply_with_taps(params, x, jnp.full((5,), 1, jnp.int32))
    assert set(inputs) == {K0, K1}
    np.testing.assert_array_equal(inputs[K0], x)


def test_old_tasks_keep_their_outputs_with_their_stored_scales():
    """Threshold 1, epsilon 0 (every candidate joins the region): after tasks 1 and 2 train W and their own
    scale matrices, tasks 0 and 1 give the same outputs on their data as when they ended."""
    net, model, params = _wrapped()
    rule = trgp(optax.sgd(0.2), threshold=1.0, epsilon=0.0, num_samples=10, selection_batches=1)
    run = _Runner(model, rule, batch=5)
    state = rule.init(params)
    data = [_task_data(t) for t in range(3)]
    ended = []
    for t, (x, y) in enumerate(data):
        before = jax.tree.map(jnp.copy, params)
        params, state = run.task(params, state, x, y, t)
        ended.append(model.apply(params, x, t))
        for j in range(t):  # every older task, with its own stored D and region
            np.testing.assert_allclose(model.apply(params, data[j][0], j), ended[j], atol=1e-4)
        if t:
            # the task trained W and its own scale matrices, and its region is the code's choice (task t-1 first)
            assert np.abs(params["net"]["layers"][0]["kernel"] - before["net"]["layers"][0]["kernel"]).max() > 1e-3
            trust = np.asarray(params["trgp"]["layers"][K0]["trust"][t])
            assert trust[0] == t  # 1 + (t - 1): task 0 for task 1, task 1 for task 2
            assert np.abs(np.asarray(params["trgp"]["layers"][K0]["scale"][t])).max() > 0
        np.testing.assert_array_equal(params["trgp"]["layers"][K0]["live"], 0.0)  # reset exactly at the end
        assert float(params["trgp"]["done"][t]) == 1.0
    # the new task's outputs did use the region: dropping its D changes them
    no_d = jax.tree.map(jnp.copy, params)
    no_d["trgp"]["layers"][K0]["scale"] = no_d["trgp"]["layers"][K0]["scale"].at[2].set(0.0)
    assert np.abs(model.apply(no_d, data[2][0], 2) - ended[2]).max() > 1e-4


def test_empty_region_steps_like_gpm_step_for_step():
    """Epsilon 1 keeps every region empty: each W step equals clx.gpm's (same union on task 1, and on task 2
    GPM's step with TRGP's union), and the first union equals GPM's."""
    net, model, params = _wrapped()
    lr, th = 0.2, [0.9, 0.95]
    rule = trgp(optax.sgd(lr), threshold=th, epsilon=1.0, num_samples=10, selection_batches=1)
    gpm = clx.chain(clx.gpm(th, num_samples=10), optax.sgd(lr))
    run_t, run_g = _Runner(model, rule, 5), _Runner(net, gpm, 5)
    s_t, s_g = rule.init(params), gpm.init(params["net"])
    p_t, p_g = params, jax.tree.map(jnp.copy, params["net"])
    for t in range(3):
        x, y = _task_data(t)
        if t == 2:  # the unions may differ from here on (joint ranking): give GPM TRGP's
            union = jax.tree.map(jnp.copy, (s_t.subspaces, s_t.projectors))  # the programs donate the states
            subspaces, projectors = ({k[4:]: v for k, v in u.items()} for u in union)
            s_g = (s_g[0]._replace(subspaces=subspaces, projectors=projectors), *s_g[1:])
        for i in range(2):
            p_t, s_t = run_t.steps(p_t, s_t, x, y, t, i, 1)
            p_g, s_g = run_g.steps(p_g, s_g, x, y, t, i, 1)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p_t["net"], p_g)
        np.testing.assert_array_equal(p_t["trgp"]["layers"][K0]["trust"], 0.0)
        p_t, s_t = run_t.consolidate(p_t, s_t, x, y, t)
        p_g, s_g = run_g.consolidate(p_g, s_g, x, y, t)
        if t == 0:
            for k in (K0, K1):
                u, g = s_t.subspaces[k], s_g[0].subspaces[k[4:]]
                np.testing.assert_array_equal(u.mask, g.mask)
                np.testing.assert_allclose(u.basis, g.basis, atol=1e-5)


def test_trust_region_choice_on_a_hand_made_case():
    # d = 4, one output; task j's basis is e_j (tasks 0-3), tasks 4-5 have none yet
    bases = jnp.zeros((6, 4, 1)).at[jnp.arange(4), jnp.arange(4), 0].set(1.0)
    g = jnp.array([[0.1], [0.5], [0.3], [0.8]])  # norm 0.995
    row = lambda t, eps: np.asarray(trust_region(g, bases, t, eps)[0])  # noqa: E731
    np.testing.assert_array_equal(row(0, 0.0), [0, 0])  # no old task
    np.testing.assert_array_equal(row(1, 0.05), [1, 0])  # task 1 -> task 0 (0.1 > 0.05 * 0.995)
    np.testing.assert_array_equal(row(1, 0.2), [0, 0])  # ... unless its norm is below epsilon
    np.testing.assert_array_equal(row(2, 0.2), [2, 0])  # task 2 -> task 1 only
    np.testing.assert_array_equal(row(3, 0.0), [2, 3])  # task 3: top 2 of tasks 0-2 (1: 0.5, 2: 0.3); 3 is not old
    np.testing.assert_array_equal(row(4, 0.2), [4, 2])  # task 4: tasks 3 (0.8), then 1 (0.5)
    np.testing.assert_array_equal(row(4, 0.6), [4, 0])  # 0.5 < 0.6 * 0.995: task 1 leaves the region
    np.testing.assert_array_equal(row(5, 1.0), [0, 0])  # epsilon 1: always empty
    ratios = np.asarray(trust_region(g, bases, 4, 0.2)[1])
    np.testing.assert_allclose(ratios, [0.1, 0.5, 0.3, 0.8, 0, 0] / np.sqrt(0.99), rtol=1e-6)


def test_task_basis_ranks_old_and_new_directions_together():
    # union {e0, e1}; R has energy 9 on e0, 1 on e1, 4 on e2: threshold 0.9 of 14 -> e0 and e2 (9 + 4 >= 12.6)
    union = sub.Subspace(jnp.eye(4).at[:, 2:].set(0.0), jnp.array([True, True, False, False]), jnp.ones(4))
    rep = jnp.array([[3.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0], [0, 0, 0]])
    grown, basis, rank = task_basis(union, rep, 0.9, capacity=4)
    assert int(rank) == 2
    np.testing.assert_allclose(np.abs(basis[:, 0]), [1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.abs(basis[:, 1]), [0, 0, 1, 0], atol=1e-6)
    np.testing.assert_array_equal(basis[:, 2:], 0.0)
    np.testing.assert_array_equal(grown.mask, [True, True, True, False])  # e2, the selected new one, joins U
    np.testing.assert_array_equal(grown.basis[:, 2], basis[:, 1])  # the same column, exactly
    # a capacity of 1 keeps the top entry only; the union still grows by e2
    grown1, basis1, rank1 = task_basis(union, rep, 0.9, capacity=1)
    assert basis1.shape == (4, 1) and int(rank1) == 2
    np.testing.assert_array_equal(grown1.mask, grown.mask)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "x"])
def test_bad_epsilon_raises(bad):
    with pytest.raises(ValueError, match="epsilon must be"):
        trgp(optax.sgd(0.1), epsilon=bad)


@pytest.mark.parametrize("bad", [0.0, 1.01, [0.9, 2.0]])
def test_bad_threshold_raises(bad):
    with pytest.raises(ValueError, match="threshold must be in"):
        trgp(optax.sgd(0.1), threshold=bad)


def test_other_bad_input_raises():
    with pytest.raises(ValueError, match="selection_batches"):
        trgp(optax.sgd(0.1), selection_batches=0)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        trgp(0.1)
    net, model, params = _wrapped()
    with pytest.raises(ValueError, match="TRGPModel"):
        trgp(optax.sgd(0.1)).init(params["net"])
    with pytest.raises(ValueError, match="2 projected layers"):
        trgp(optax.sgd(0.1), threshold=[0.9, 0.9, 0.9]).init(params)
    with pytest.raises(ValueError, match="unknown task id 3"):
        model.apply(params, jnp.zeros((2, 12)), 3)
    with pytest.raises(ValueError, match="mixes task ids"):
        model.apply(params, jnp.zeros((2, 12)), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        TRGPModel.wrap(net, params["net"], 3, rank=0)
