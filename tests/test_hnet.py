"""Task-conditioned hypernetworks (clx.hnet): generation, chunking, the recurrent
hypernetwork's dependency structure, the output regularizer, HNET+ENT, bad input."""

import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx.core import Evidence, Model, TappedModel
from clx.hnet import output_regularizer_loss


def _target(d_in=6, hidden=(5,), d_out=2):
    return clx.TargetNetwork.from_module_fn(lambda: clx.MLP(d_in, hidden, d_out, rngs=nnx.Rngs(0)))


def _evidence(t):
    return Evidence(jnp.int32(t), jnp.zeros((1, 6)), jnp.zeros((1,), jnp.int32), {}, None)


# --- target networks and chunking -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_target_template_is_abstract_and_apply_matches_the_module(layout):
    module = clx.MLP(6, (5,), 3, rngs=nnx.Rngs(1))
    target = clx.TargetNetwork.from_module_fn(lambda: clx.MLP(6, (5,), 3, rngs=nnx.Rngs(1)), layout=layout)
    assert all(isinstance(l, jax.ShapeDtypeStruct) for l in jax.tree.leaves(target.template))
    assert target.num_params == 6 * 5 + 5 + 5 * 3 + 3
    fmodel, params = clx.FunctionalModel.from_module(module)
    flat = target.flatten(params)
    assert flat.shape == (target.num_params,)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    np.testing.assert_allclose(target.apply(flat, x), fmodel.apply(params, x), rtol=1e-6)
    back = target.unflatten(flat)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


def test_torch_layout_is_the_authors_pytorch_parameter_order():
    """hypercl's flat vector: per layer W as (out, in) row-major, then b; Conv kernels as (out, in, kh, kw)."""
    module = clx.MLP(6, (5,), 3, rngs=nnx.Rngs(1))
    _, params = clx.FunctionalModel.from_module(module)
    l0, l1 = params["layers"][0], params["layers"][1]
    expected = np.concatenate(
        [np.asarray(l0["kernel"]).T.ravel(), l0["bias"], np.asarray(l1["kernel"]).T.ravel(), l1["bias"]]
    )
    torch_t = clx.TargetNetwork.from_module(module)  # the default layout
    np.testing.assert_array_equal(torch_t.flatten(params), expected)
    assert [p for p, _, _ in torch_t.shapes] == ["layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"]
    flax_t = clx.TargetNetwork.from_module(module, layout="flax")
    np.testing.assert_array_equal(
        flax_t.flatten(params), np.concatenate([l0["bias"], np.ravel(l0["kernel"]), l1["bias"], np.ravel(l1["kernel"])])
    )

    conv = nnx.Conv(2, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0))
    _, cparams = clx.FunctionalModel.from_module(conv)
    ct = clx.TargetNetwork.from_module(conv)
    np.testing.assert_array_equal(
        ct.flatten(cparams), np.concatenate([np.transpose(cparams["kernel"], (3, 2, 0, 1)).ravel(), cparams["bias"]])
    )  # flax (kh, kw, in, out)
    back = ct.unflatten(ct.flatten(cparams))
    np.testing.assert_array_equal(back["kernel"], cparams["kernel"])
    with pytest.raises(ValueError, match="unknown target layout 'jax'"):
        clx.TargetNetwork.from_module(module, layout="jax")


@pytest.mark.parametrize("chunk_dim", [1, 7, 48, 53, 54, 200])
def test_chunking_reproduces_the_exact_target_parameter_count(chunk_dim):
    target = _target()  # 6*5+5 + 5*2+2 = 47 weights
    n = target.num_params
    hnet = clx.chunked_hypernetwork(n, 3, chunk_dim, 2, (4,))
    theta = hnet.init(jax.random.key(0))
    assert theta["chunk_emb"].shape == (math.ceil(n / chunk_dim), 2)
    e = jnp.ones((3,))
    assert hnet.apply(theta, e).shape == (n,)
    many = hnet.apply(theta, jnp.stack([e, 2 * e]))  # batched embeddings: one matmul
    assert many.shape == (2, n)
    np.testing.assert_allclose(many[0], hnet.apply(theta, e), rtol=1e-5, atol=1e-6)
    target.unflatten(hnet.apply(theta, e))  # cut and reshaped into the template


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_and_mlp_hypernetworks_match_the_target_size(cell):
    n = _target().num_params
    rnn = clx.recurrent_hypernetwork(n, 3, 10, 2, hidden_size=8, cell=cell)
    assert rnn.apply(rnn.init(jax.random.key(0)), jnp.ones(3)).shape == (n,)
    mlp = clx.mlp_hypernetwork(n, 3, (4,))
    assert mlp.apply(mlp.init(jax.random.key(0)), jnp.ones(3)).shape == (n,)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_chunks_depend_on_earlier_chunks_only(cell):
    n, cd = 60, 10  # 6 chunks
    hnet = clx.recurrent_hypernetwork(n, 3, cd, 4, hidden_size=8, cell=cell)
    theta = hnet.init(jax.random.key(0))
    e = jax.random.normal(jax.random.key(1), (3,))
    base = hnet.apply(theta, e).reshape(-1, cd)
    j = 2
    moved = dict(theta, chunk_emb=theta["chunk_emb"].at[j].add(1.0))  # change only chunk j's input
    out = hnet.apply(moved, e).reshape(-1, cd)
    diff = jnp.max(jnp.abs(out - base), axis=1)
    assert jnp.all(diff[:j] == 0.0)  # earlier chunks: exactly unchanged
    assert jnp.all(diff[j:] > 1e-6)  # chunk j and every later chunk change (the dependency is real)
    # the chunked (non-recurrent) hypernetwork has no such dependency
    chunked = clx.chunked_hypernetwork(n, 3, cd, 4, (8,))
    th = chunked.init(jax.random.key(0))
    d = jnp.max(
        jnp.abs(chunked.apply(dict(th, chunk_emb=th["chunk_emb"].at[j].add(1.0)), e) - chunked.apply(th, e)).reshape(
            -1, cd
        ),
        axis=1,
    )
    assert d[j] > 0 and jnp.all(jnp.delete(d, j) == 0.0)


# --- the output regularizer -----------------------------------------------------------------


def _tiny_setup(T=3, hidden=(6,)):
    target = _target()
    hnet = clx.chunked_hypernetwork(target.num_params, 3, 10, 2, hidden, "elu")
    model = clx.HyperModel(target, hnet, T, 2, per_task_heads=False, input_shape=(6,))
    return target, hnet, model, model.init(jax.random.key(0))


def test_regularizer_gradient_matches_finite_differences():
    _, hnet, model, params = _tiny_setup()
    lr, beta = 0.05, 0.7
    rule = clx.output_regularizer(hnet, optax.sgd(lr), beta=beta, num_tasks=3)
    state = rule.init(params)
    _, state = rule.consolidate(state, params, _evidence(1))  # targets of tasks 0, 1 from these params
    key = jax.random.key(3)
    # move theta away from theta* so that the regularizer is not at its minimum
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape), params)
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(4), p.shape), params)  # a task-loss gradient
    updates, _ = rule.update(g, state, params, task_id=jnp.int32(2))
    # sgd: updates = -lr (g + beta * grad R(theta + dtheta)), dtheta = -lr g (the look-ahead)
    reg_grad = jax.tree.map(lambda u, gg: (-u / lr - gg) / beta, updates["hnet"], g["hnet"])
    theta_la = jax.tree.map(lambda p, gg: p - lr * gg, params["hnet"], g["hnet"])
    weights = jnp.array([1.0, 1.0, 0.0])

    def R(th):
        return output_regularizer_loss(hnet, th, params["task_emb"], state.targets, weights)

    flat, unravel = jax.flatten_util.ravel_pytree(theta_la)
    rg, _ = jax.flatten_util.ravel_pytree(reg_grad)
    eps = 1e-2
    for i in range(4):
        v = jax.random.normal(jax.random.key(10 + i), flat.shape)
        fd = (R(unravel(flat + eps * v)) - R(unravel(flat - eps * v))) / (2 * eps)
        np.testing.assert_allclose(float(jnp.dot(rg, v)), float(fd), rtol=2e-2, atol=1e-3)
    # the embeddings of tasks other than the current one are not updated
    assert jnp.all(updates["task_emb"][:2] == 0) and jnp.any(updates["task_emb"][2] != 0)


def test_regularizer_without_lookahead_evaluates_at_theta():
    _, hnet, _, params = _tiny_setup()
    rule = clx.output_regularizer(hnet, optax.sgd(1.0), beta=1.0, num_tasks=3, lookahead=False)
    _, state = rule.consolidate(rule.init(params), params, _evidence(0))
    moved = dict(params, hnet=jax.tree.map(lambda p: p + 0.05, params["hnet"]))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = rule.update(zero, state, moved, task_id=jnp.int32(1))
    want = jax.grad(
        lambda th: output_regularizer_loss(hnet, th, params["task_emb"], state.targets, jnp.array([1.0, 0.0, 0.0]))
    )(moved["hnet"])
    jax.tree.map(lambda u, w: np.testing.assert_allclose(-u, w, rtol=1e-5, atol=1e-6), updates["hnet"], want)


def _trainer(model, rule, x, steps):
    """A jitted ``train(params, state, y, t)``: ``steps`` full-batch steps of task ``t`` (one compile per rule)."""

    def loss(p, y, t):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x, t), y).mean()

    @jax.jit
    def train(params, state, y, t):
        def step(carry, _):
            p, s = carry
            u, s = rule.update(jax.grad(loss)(p, y, t), s, p, task_id=t)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, state), None, length=steps)[0]

    return train


def test_old_task_weights_stay_put_with_the_regularizer_and_move_without():
    _, hnet, model, params0 = _tiny_setup(T=2, hidden=(16,))
    x = jax.random.normal(jax.random.key(5), (64, 6))
    y0 = (x[:, 0] > 0).astype(jnp.int32)
    y1 = (x[:, 1] > 0).astype(jnp.int32)
    drift = {}
    for beta in (0.0, 1.0):
        rule = clx.output_regularizer(hnet, optax.adam(1e-2), beta=beta, num_tasks=2)
        train = _trainer(model, rule, x, 300)
        params, state = train(params0, rule.init(params0), y0, jnp.int32(0))
        _, state = rule.consolidate(state, params, _evidence(0))
        w0 = model.generate_flat(params, 0)
        params, state = train(params, state, y1, jnp.int32(1))
        drift[beta] = float(jnp.linalg.norm(model.generate_flat(params, 0) - w0) / jnp.linalg.norm(w0))
        acc1 = float(jnp.mean(model.predict(params, x, 1, 2) == y1))
        assert acc1 > 0.85, (beta, acc1)  # task 1 is learned either way
    assert drift[1.0] < 0.02, drift
    assert drift[0.0] > 10 * drift[1.0], drift


def test_random_subset_regularizes_one_old_task_per_step():
    _, hnet, _, params = _tiny_setup(T=4)
    rule = clx.output_regularizer(hnet, optax.sgd(1.0), beta=1.0, num_tasks=4, lookahead=False, num_sampled=1)
    _, state = rule.consolidate(rule.init(params), params, _evidence(2))  # tasks 0, 1, 2 finished
    moved = dict(params, hnet=jax.tree.map(lambda p: p + 0.05, params["hnet"]))
    zero = jax.tree.map(jnp.zeros_like, params)
    single = [
        jax.flatten_util.ravel_pytree(
            jax.grad(lambda th: output_regularizer_loss(hnet, th, params["task_emb"], state.targets, jnp.eye(4)[t]))(
                moved["hnet"]
            )
        )[0]
        for t in range(3)
    ]
    picked = set()
    for _ in range(12):
        updates, state = rule.update(zero, state, moved, task_id=jnp.int32(3))
        u = -jax.flatten_util.ravel_pytree(updates["hnet"])[0]
        match = [t for t in range(3) if jnp.allclose(u, single[t], rtol=1e-4, atol=1e-6)]
        assert len(match) == 1  # exactly one old task's gradient, unscaled (beta / 1)
        picked.add(match[0])
    assert len(picked) > 1  # a different random old task from step to step


def test_consolidate_stores_targets_and_state_shapes_are_fixed():
    _, hnet, model, params = _tiny_setup()
    rule = clx.output_regularizer(hnet, optax.adam(1e-3), beta=0.1, num_tasks=3)
    s0 = rule.init(params)
    moves, s1 = jax.jit(rule.consolidate)(s0, params, _evidence(0))
    assert moves is None  # the regularizer never moves the params
    assert jax.tree.map(jnp.shape, s0) == jax.tree.map(jnp.shape, s1)
    np.testing.assert_allclose(s1.targets[0], model.generate_flat(params, 0), rtol=1e-5, atol=1e-6)
    assert s1.stored.tolist() == [True, False, False] and jnp.all(s1.targets[1:] == 0)


# --- the model: heads, HNET+ENT -------------------------------------------------------------


def test_class_il_apply_masks_other_tasks_and_predict_uses_entropy():
    target = _target(d_out=6)  # 3 tasks x 2 classes
    hnet = clx.chunked_hypernetwork(target.num_params, 3, 16, 2, (6,))
    model = clx.HyperModel(target, hnet, 3, 2, scenario="class_il", input_shape=(6,))
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    logits = model.apply(params, x, 1)
    assert logits.shape == (5, 6)
    assert jnp.all(logits[:, [0, 1, 4, 5]] == -1e9) and jnp.all(logits[:, 2:4] > -1e8)
    heads = model.all_head_logits(params, x)  # (3, 5, 2)
    np.testing.assert_allclose(heads[1], logits[:, 2:4], rtol=1e-5)
    pred = model.predict(params, x, 0, 3)
    t_hat = model.infer_task(params, x, 3)
    p = jax.nn.softmax(heads, -1)
    ent = -jnp.sum(p * jnp.log(p), -1)
    assert jnp.array_equal(t_hat, jnp.argmin(ent, 0))
    assert jnp.array_equal(clx.hnet.entropy_task_inference(heads, 3, model.temperature), t_hat)
    assert jnp.array_equal(pred, 2 * t_hat + jnp.argmax(heads[t_hat, jnp.arange(5)], -1))
    assert jnp.all(model.infer_task(params, x, 1) == 0)  # only task 0 trained: no choice
    assert jnp.all(model.predict(params, x, 0, 0) < 2)  # the untrained baseline still predicts


def test_compression_ratio_counts_hnet_and_embeddings():
    target, _, model, params = _tiny_setup()
    n_h = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(params))
    assert model.compression_ratio(params) == pytest.approx(n_h / target.num_params)
    assert model.extra_results(params)["target_params"] == target.num_params
    # a plain clx Model: no Dense taps, so rules that need them refuse it
    assert isinstance(model, Model) and not isinstance(model, TappedModel)


# --- bad input ------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    target = _target()
    n = target.num_params
    with pytest.raises(ValueError, match="num_outputs=47"):
        clx.HyperModel(target, clx.chunked_hypernetwork(n + 1, 3, 10, 2), 2, 2)
    with pytest.raises(ValueError, match="47 parameters"):
        target.unflatten(jnp.zeros(n - 1))
    with pytest.raises(ValueError, match="chunk_dim must be >= 1"):
        clx.chunked_hypernetwork(n, 3, 0, 2)
    with pytest.raises(ValueError, match="chunk_dim must be >= 1"):
        clx.recurrent_hypernetwork(n, 3, 0)
    with pytest.raises(ValueError, match="cell"):
        clx.recurrent_hypernetwork(n, 3, 10, cell="rnn")
    hnet = clx.chunked_hypernetwork(n, 3, 10, 2)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        clx.output_regularizer(hnet, optax.sgd(0.1), beta=-0.1, num_tasks=2)
    with pytest.raises(ValueError, match="outputs"):
        clx.HyperModel(target, hnet, 2, 3, input_shape=(6,))  # the target has 2 outputs, not 2*3
    model = clx.HyperModel(target, hnet, 2, 2, per_task_heads=False, input_shape=(6,))
    params = model.init(jax.random.key(0))
    x = jnp.zeros((3, 6))
    with pytest.raises(ValueError, match="unknown task id 2"):
        model.apply(params, x, 2)
    with pytest.raises(ValueError, match="mixes task ids"):
        model.apply(params, x, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="unknown task id -1"):
        model.generate(params, -1)
    cil = clx.HyperModel(target, hnet, 2, 1, scenario="class_il", per_task_heads=True, input_shape=(6,))
    with pytest.raises(ValueError, match="num_trained=3"):
        cil.predict(cil.init(jax.random.key(0)), x, 0, 3)
    # under jit an out-of-range id cannot raise: it yields NaN logits (fit then stops on the NaN loss)
    assert jnp.all(jnp.isnan(jax.jit(model.apply)(params, x, jnp.int32(5))))
    rule = clx.output_regularizer(hnet, optax.sgd(0.1), beta=0.1, num_tasks=2)
    with pytest.raises(ValueError, match="task_id"):
        rule.update(params, rule.init(params), params)


def test_a_chain_of_two_rules_that_own_an_optimizer_is_refused():
    _, hnet, _, _ = _tiny_setup()
    rule = clx.output_regularizer(hnet, optax.sgd(0.1), beta=0.1, num_tasks=3)
    assert rule.name == "output_regularizer" and "optimizer" in rule.needs
    with pytest.raises(ValueError, match=r"\['output_regularizer', 'output_regularizer'\].*own optimizer"):
        clx.chain(
            clx.output_regularizer(hnet, optax.sgd(0.1), beta=0.1, num_tasks=3),
            clx.output_regularizer(hnet, optax.adam(1e-3), beta=0.1, num_tasks=3),
        )
    clx.chain(optax.clip_by_global_norm(1.0), rule)  # one owner, after a plain optax transform: fine
