"""Conv layers in the gradient-projection core: im2col taps, conv-kernel projection, GPM on CNNs, the CNN models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx import subspace as sub
from clx.functional import conv_patches
from clx.models import AlexNet, BatchStatNorm, LeNet
from clx.projection import kernel_paths, project_kernel
from clx.train import make_evidence_fn

DN = ("NHWC", "HWIO", "NHWC")


class _TinyCNN(nnx.Module):
    """conv 3x3 (stride/padding given) - relu - conv 2x2 (valid) - relu - mean - dense - 2 heads; biases optional."""

    def __init__(self, strides=1, padding="VALID", use_bias=False, *, rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), strides=strides, padding=padding, use_bias=use_bias, rngs=rngs)
        self.conv2 = nnx.Conv(4, 3, (2, 2), padding="VALID", use_bias=use_bias, rngs=rngs)
        self.fc = nnx.Linear(3, 5, use_bias=use_bias, rngs=rngs)
        self.head = clx.models.MultiHead(5, 2, 2, use_bias, nnx.initializers.lecun_normal(), rngs=rngs)

    def __call__(self, x, task_id=None):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.head(nnx.relu(self.fc(x.mean((1, 2)))), task_id)


def _tiny(seed=0, **kw):
    return clx.FunctionalModel.from_module(_TinyCNN(rngs=nnx.Rngs(seed), **kw))


def _x(n=3, hw=7, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, hw, hw, 2))


# --- im2col patches --------------------------------------------------------------------------------------------------


def test_patches_layout_hand_checked():
    x = jnp.arange(2 * 3 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 3, 2)
    p = conv_patches(x, (2, 2, 2, 5))
    assert p.shape == (2 * 4, 8)  # 2 examples x 2x2 positions, d = 2*2*2
    # row 0: example 0, output (0, 0): the window x[0, 0:2, 0:2, :] in (k_h, k_w, c_in) order
    np.testing.assert_array_equal(p[0], np.asarray(x[0, 0:2, 0:2, :]).reshape(-1))
    np.testing.assert_array_equal(p[1], np.asarray(x[0, 0:2, 1:3, :]).reshape(-1))  # row-major over the grid
    np.testing.assert_array_equal(p[4], np.asarray(x[1, 0:2, 0:2, :]).reshape(-1))  # example-major
    # stride 2 with one row/column of zero padding before: output (0, 0) sees two zeros rows/cols
    q = conv_patches(x, (2, 2, 2), strides=2, padding=((1, 0), (1, 0)))
    assert q.shape == (2 * 4, 8)
    want = np.zeros((2, 2, 2))
    want[1, 1] = np.asarray(x[0, 0, 0])
    np.testing.assert_array_equal(q[0], want.reshape(-1))
    np.testing.assert_array_equal(q[3], np.asarray(x[0, 1:3, 1:3, :]).reshape(-1))


@pytest.mark.parametrize(
    "strides,padding,dilation",
    [(1, "VALID", 1), (2, "SAME", 1), ((2, 1), ((1, 2), (0, 1)), (1, 2)), (1, "SAME", 2)],
)
def test_patches_times_kernel_is_the_conv_and_patches_t_delta_its_gradient(strides, padding, dilation):
    x = _x(3, 8)
    k = jax.random.normal(jax.random.key(2), (3, 3, 2, 4))
    s = (strides,) * 2 if isinstance(strides, int) else strides
    dil = (dilation,) * 2 if isinstance(dilation, int) else dilation
    conv = lambda k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, s, padding, rhs_dilation=dil, dimension_numbers=DN, precision=jax.lax.Precision.HIGHEST
    )
    p = conv_patches(x, k.shape, strides, padding, kernel_dilation=dilation)
    out = conv(k)
    np.testing.assert_allclose(out.reshape(-1, 4), p @ k.reshape(-1, 4), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.key(3), out.shape)
    g = jax.grad(lambda k: jnp.sum(conv(k) * w))(k)  # delta = w
    np.testing.assert_allclose(g.reshape(-1, 4), p.T @ w.reshape(-1, 4), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strides,padding", [(1, "VALID"), (2, "SAME"), (2, ((1, 0), (2, 1)))])
def test_conv_taps_are_patches_and_factor_the_kernel_gradient(strides, padding):
    model, params = _tiny(strides=strides, padding=padding, use_bias=True)
    x, t = _x(), jnp.int32(1)
    shapes = model.tap_shapes(params, x, t)
    assert set(shapes) == {"conv1/kernel", "conv2/kernel", "fc/kernel"}  # not the 3-D MultiHead
    zeros = {k: jnp.zeros(s.shape) for k, s in shapes.items()}

    def loss(p, z):
        logits, inputs = model.apply_with_taps(p, x, t, z)
        return jnp.sum(jnp.sin(logits)), (inputs, logits)

    (g, delta), (inputs, logits) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, zeros)
    np.testing.assert_allclose(logits, model.apply(params, x, t), rtol=1e-6)
    np.testing.assert_array_equal(inputs["conv1/kernel"], conv_patches(x, (3, 3, 2), strides, padding))
    for name in ("conv1", "conv2", "fc"):
        key = f"{name}/kernel"
        assert inputs[key].shape[0] == shapes[key].shape[0] == delta[key].shape[0]
        gk = g[name]["kernel"]
        np.testing.assert_allclose(
            gk.reshape(-1, gk.shape[-1]), inputs[key].T @ delta[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
        np.testing.assert_allclose(g[name]["bias"], delta[key].sum(0), rtol=1e-5, atol=1e-6)  # pre-bias output


def test_evidence_representations_of_a_conv_are_its_patches_examples_by_positions():
    model, params = _tiny()
    x = _x(4)
    reps = make_evidence_fn(model)(params, x, jnp.int32(0))
    assert reps["conv1/kernel"].shape == (18, 4 * 25)
    np.testing.assert_array_equal(reps["conv1/kernel"], conv_patches(x, (3, 3, 2)).T)
    assert reps["conv2/kernel"].shape == (16, 4 * 16) and reps["fc/kernel"].shape == (3, 4)


def test_bad_conv_input_is_refused():
    with pytest.raises(ValueError, match="does not fit x of shape"):
        conv_patches(_x(), (3, 3, 5, 4))
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        conv_patches(jnp.zeros((3, 4)), (3, 4))

    class Grouped(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), feature_group_count=2, rngs=rngs)

        def __call__(self, x):
            return self.conv(x).mean((1, 2))

    model, params = clx.FunctionalModel.from_module(Grouped(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="feature_group_count=2"):
        model.apply_with_taps(params, _x())


# --- projection of conv kernels ---------------------------------------------------------------------------------------


def test_kernel_paths_flattens_conv_kernels_and_skips_the_heads():
    _, params = _tiny()
    assert kernel_paths(params) == [("conv1/kernel", (18, 4)), ("conv2/kernel", (16, 3)), ("fc/kernel", (3, 5))]
    with pytest.raises(ValueError, match="not 2-D kernels"):
        kernel_paths(params, ["head/kernel"])


def test_factored_route_equals_q_g_for_a_conv_kernel():
    x = _x(1, 5)
    k = jax.random.normal(jax.random.key(4), (3, 3, 2, 40))  # d = 18, m = 40, N = 9: the factored route pays
    p = conv_patches(x, k.shape)
    delta = jax.random.normal(jax.random.key(5), (p.shape[0], 40))
    g = (p.T @ delta).reshape(k.shape)
    b = jnp.linalg.qr(jax.random.normal(jax.random.key(6), (18, 5)))[0]
    q = jnp.eye(18) - b @ b.T
    assert 2 * 9 * 18 * 18 + 2 * 9 * 18 * 40 < 2 * 18 * 18 * 40
    fact, plain = project_kernel(g, q, p, delta), project_kernel(g, q)
    assert fact.shape == plain.shape == k.shape
    np.testing.assert_allclose(fact, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.reshape(18, 40), q @ g.reshape(18, 40), rtol=1e-5, atol=1e-5)


def _evidence(model, params, x, t=0):
    reps = make_evidence_fn(model)(params, x, jnp.int32(t))
    return clx.Evidence(jnp.int32(t), x, jnp.zeros(x.shape[0], jnp.int32), reps, model.apply)


def _np_rank(rep, th):
    s = np.linalg.svd(np.asarray(rep, np.float64), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(s) / s.sum(), th - 1e-7) + 1)  # fewest directions reaching th (Eq. 5)


def test_gpm_conv_ranks_projection_and_old_outputs_unchanged():
    model, params = _tiny()
    x = _x(6)
    rule = clx.gpm(0.9, num_samples=6)
    state = rule.init(params)
    assert state.projectors["conv1/kernel"].shape == (18, 18)
    _, state = jax.jit(rule.consolidate)(state, params, _evidence(model, params, x))
    reps = make_evidence_fn(model)(params, x, jnp.int32(0))
    for key in ("conv1/kernel", "conv2/kernel"):
        assert int(sub.rank(state.subspaces[key])) == _np_rank(reps[key], 0.9), key
    # a projected step of task 1 is orthogonal to the stored bases and moves no old conv output (conv1's input is x)
    x1 = _x(3, seed=9)
    g = jax.grad(lambda p: jnp.sum(model.apply(p, x1, jnp.int32(1)) ** 2))(params)
    pg, _ = rule.update(g, state, params, task_id=jnp.int32(1))
    for name in ("conv1", "conv2"):
        b = state.subspaces[f"{name}/kernel"].basis * state.subspaces[f"{name}/kernel"].mask
        gk = pg[name]["kernel"].reshape(b.shape[0], -1)
        assert float(jnp.abs(b.T @ gk).max()) < 1e-5 * float(jnp.abs(g[name]["kernel"]).max() + 1)
    full = clx.gpm(1.0, num_samples=6)
    _, fstate = full.consolidate(full.init(params), params, _evidence(model, params, x))
    pg, _ = full.update(g, fstate, params, task_id=jnp.int32(1))
    k0, k1 = params["conv1"]["kernel"], params["conv1"]["kernel"] - 0.5 * pg["conv1"]["kernel"]
    old = reps["conv1/kernel"].T  # (N, d) patches of task 0
    np.testing.assert_allclose(old @ k1.reshape(18, -1), old @ k0.reshape(18, -1), atol=1e-4)


def test_per_layer_num_samples_take_the_first_examples_patches():
    model, params = _tiny()
    x = _x(5)
    rule = clx.gpm(0.99, num_samples={"conv1/kernel": 2, "conv2/kernel": 5, "fc/kernel": 3})
    _, state = rule.consolidate(rule.init(params), params, _evidence(model, params, x))
    want = sub.expand(sub.empty(18), conv_patches(x[:2], (3, 3, 2)).T, 0.99)  # 2 examples x 25 positions
    np.testing.assert_allclose(
        sub.complement_projector(state.subspaces["conv1/kernel"]), sub.complement_projector(want), atol=1e-5
    )
    assert int(sub.rank(state.subspaces["fc/kernel"])) <= 3
    with pytest.raises(ValueError, match="has 5 examples but num_samples=6"):
        clx.gpm(0.9, num_samples=[6, 5, 5]).consolidate(rule.init(params), params, _evidence(model, params, x))
    with pytest.raises(ValueError, match="not a multiple of the evidence's 4 examples"):
        ev = _evidence(model, params, x)
        rule.consolidate(rule.init(params), params, ev.replace(x=x[:4]))
    with pytest.raises(ValueError, match="2 num_samples values given for 3 projected layers"):
        clx.gpm(0.9, num_samples=[2, 3]).init(params)
    with pytest.raises(ValueError, match="not a function"):
        clx.gpm(0.9, num_samples=lambda t: 3)
    with pytest.raises(ValueError, match="integers >= 1"):
        clx.gpm(0.9, num_samples=[2, 0, 1])


def test_freeze_vectors_zeroes_1d_grads_after_the_first_task_only():
    model, params = _tiny(use_bias=True)
    rule = clx.gpm(0.9, num_samples=3, freeze_vectors=True)
    state = rule.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    for t in (0, 1, 3):
        out, _ = jax.jit(rule.update)(g, state, params, task_id=jnp.int32(t))
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            if leaf.ndim == 1:
                assert float(jnp.abs(leaf).max()) == (1.0 if t == 0 else 0.0), (t, path)
            else:  # kernels (projected by I: unchanged before any consolidate) and the 2-D head biases
                np.testing.assert_array_equal(leaf, 1.0)
    plain, _ = clx.gpm(0.9, num_samples=3).update(g, state, params, task_id=jnp.int32(1))
    np.testing.assert_array_equal(plain["conv1"]["bias"], 1.0)
    with pytest.raises(ValueError, match="needs the task_id extra"):
        rule.update(g, state, params)


# --- models ----------------------------------------------------------------------------------------------------------


def test_batch_stat_norm_uses_the_batch_statistics():
    bn = BatchStatNorm(3)
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) * 3.0 + 2.0
    y = bn(x)
    np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var((0, 1, 2)), 1.0, rtol=1e-3)  # biased variance, eps 1e-5
    assert not np.allclose(bn(x[:2])[0], y[0])  # an example's output depends on its batch (no running stats)
    bn.scale[...] = jnp.array([1.0, 2.0, 3.0])
    bn.bias[...] = jnp.array([0.0, 1.0, -1.0])
    np.testing.assert_allclose(bn(x).mean((0, 1, 2)), [0.0, 1.0, -1.0], atol=1e-5)
    assert not jax.tree.leaves(nnx.split(bn, nnx.Param, ...)[2])  # no state but the two Params
    with pytest.raises(ValueError, match="got inputs with 2 features"):
        bn(jnp.zeros((2, 2)))


def test_models_output_shapes_flat_inputs_and_projected_layers():
    lenet = LeNet((28, 28, 1), 2, num_heads=5, rngs=nnx.Rngs(0))
    model, params = clx.FunctionalModel.from_module(lenet)
    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    out = model.apply(params, x, jnp.array([0, 4, 2]))
    assert out.shape == (3, 2)
    np.testing.assert_array_equal(model.apply(params, x.reshape(3, -1), jnp.array([0, 4, 2])), out)
    assert kernel_paths(params) == [("conv1/kernel", (25, 20)), ("conv2/kernel", (500, 50)), ("fc/kernel", (800, 500))]
    single = LeNet((28, 28, 1), 10, rngs=nnx.Rngs(0))
    assert isinstance(single.head, nnx.Linear)
    # GPM's AlexNet: FunctionalModel accepts it (batch norm holds only nnx.Param), 5 projected layers, 1-D bn params
    module = nnx.eval_shape(lambda: AlexNet((32, 32, 3), 10, num_heads=3, rngs=nnx.Rngs(0)))  # shapes only
    model, params = clx.FunctionalModel.abstract(module), nnx.to_pure_dict(nnx.state(module, nnx.Param))
    assert [(p, s[0]) for p, s in kernel_paths(params)] == [
        ("conv1/kernel", 48),
        ("conv2/kernel", 576),
        ("conv3/kernel", 512),
        ("fc1/kernel", 1024),
        ("fc2/kernel", 2048),
    ]
    assert params["conv1"]["kernel"].shape == (4, 4, 3, 64) and params["head"]["kernel"].shape == (3, 2048, 10)
    assert sorted(k for k in params if k.startswith("bn")) == ["bn1", "bn2", "bn3", "bn4", "bn5"]
    shapes = model.tap_shapes(params, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), 0)
    assert shapes["conv1/kernel"].shape == (2 * 29 * 29, 64) and shapes["conv3/kernel"].shape == (2 * 25, 256)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(model.apply, params, x, jnp.zeros(2, jnp.int32)).shape == (2, 10)


def test_bad_model_arguments_are_refused():
    with pytest.raises(ValueError, match="at least 16x16"):
        LeNet((12, 12, 1), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown init"):
        AlexNet(init="kaiming", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        LeNet((28, 28, 1), 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"takes \(batch, 28, 28, 1\) inputs"):
        m = LeNet((28, 28, 1), 2, rngs=nnx.Rngs(0))
        m(jnp.zeros((2, 27, 28, 1)))


def test_build_classifier_chooses_by_kind():
    from experiments.methods import _registry as reg

    class S:
        input_shape, num_outputs, num_heads = (28, 28, 1), 2, 5

    c = ml_collections.ConfigDict({"model": {"kind": "lenet", "use_bias": False, "init": "torch", "hidden": (8,)}})
    model, params = reg.build_classifier(c, S, 0)
    assert params["conv1"]["kernel"].shape == (5, 5, 1, 20)
    c.model.kind = "mlp"
    _, params = reg.build_classifier(c, S, 0)
    assert params["layers"][0]["kernel"].shape == (784, 8)
    c.model.kind = "vgg"
    with pytest.raises(ValueError, match=r"unknown config.model.kind 'vgg'; choose one of \('mlp', 'lenet', 'alex"):
        reg.build_classifier(c, S, 0)


def test_gpm_with_a_cnn_in_fit_keeps_old_tasks_conv_outputs():
    """Threshold 1 on a tiny CNN: after task 1 trains, task 0's conv and dense outputs on its evidence are unchanged."""
    model, params = _tiny()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 7, 7, 2)).astype(np.float32)
    x[:12, :, :, 1] = 0.0  # task 0 spans half of conv1's patch space: conv1 can still learn task 1
    rule = clx.chain(clx.gpm(1.0, num_samples=12), optax.sgd(0.1))
    state = rule.init(params)
    ev = _evidence(model, params, jnp.asarray(x[:12]))
    _, state = rule.consolidate(state, params, ev)
    x1 = jnp.asarray(x[12:])
    p = params
    for _ in range(3):
        g = jax.grad(lambda q: jnp.sum(model.apply(q, x1, jnp.int32(1)) ** 2))(p)
        u, state = rule.update(g, state, p, task_id=jnp.int32(1))
        p = optax.apply_updates(p, u)
    before = make_evidence_fn(model)(params, ev.x, jnp.int32(0))
    after = make_evidence_fn(model)(p, ev.x, jnp.int32(0))
    for key in before:  # each layer's inputs on task 0 stay put, so its outputs do too
        np.testing.assert_allclose(after[key], before[key], atol=2e-4, err_msg=key)
    assert not np.allclose(p["conv1"]["kernel"], params["conv1"]["kernel"])
