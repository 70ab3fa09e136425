"""clx.FunctionalModel: an NNX module as a pure apply, and its Dense taps (the layers'
inputs and, through zero perturbations, their output gradients), checked against the
module itself and against hand-computed math on small cases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx.functional import FunctionalModel
from clx.tree import path_str


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _at(params, path):
    for k in path.split("/"):
        params = params[int(k) if k.isdigit() else k]
    return params


def _ce(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


class Tokens(nnx.Module):
    """A Dense layer applied at every position of (B, P, d) inputs, a mean over positions, a Dense head."""

    def __init__(self, rngs):
        self.a = nnx.Linear(5, 7, rngs=rngs)
        self.b = nnx.Linear(7, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.mean(nnx.relu(self.a(x)), axis=1))


class Twice(nnx.Module):
    """One Dense layer applied twice."""

    def __init__(self, rngs):
        self.l = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.l(nnx.relu(self.l(x)))


# --- apply ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [True, False])
def test_apply_equals_the_modules_own_call_and_leaves_the_module_alone(use_bias):
    module = clx.MLP(12, (8, 6), 4, use_bias=use_bias, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    x = _x((5, 3, 4))  # flattened to 12 by the MLP
    want = module(x)
    model, params = FunctionalModel.from_module(module)
    assert model.takes_task_id and isinstance(model, clx.TappedModel)
    assert ("bias" in params["layers"][0]) == use_bias
    chex.assert_trees_all_equal(params, before)
    np.testing.assert_array_equal(model.apply(params, x), want)
    np.testing.assert_allclose(jax.jit(model.apply)(params, x), want, atol=1e-6)
    perturb = {"layers/2/kernel": jnp.ones((5, 4))}
    model.apply_with_taps(params, x, None, perturb)
    # the module keeps its weights and its own dot_general (the taps live on a merged copy), and still gives the same
    for layer in module.layers:
        assert layer.dot_general is jax.lax.dot_general
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param))), before)
    np.testing.assert_array_equal(module(x), want)
    # ... and so does the functional model: no array or tracer has been left in its template
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(model.template))
    np.testing.assert_array_equal(model.apply(params, x), want)


def test_apply_is_pure_under_grad_and_vmap():
    m0, p0 = FunctionalModel.from_module(clx.MLP(12, (8,), 4, rngs=nnx.Rngs(0)))
    _, p1 = FunctionalModel.from_module(clx.MLP(12, (8,), 4, rngs=nnx.Rngs(1)))
    x = _x((5, 12))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)
    both = jax.vmap(m0.apply, in_axes=(0, None))(stacked, x)
    np.testing.assert_allclose(both[0], m0.apply(p0, x), atol=1e-6)
    np.testing.assert_allclose(both[1], m0.apply(p1, x), atol=1e-6)
    g = jax.grad(lambda p: jnp.sum(m0.apply(p, x)))(p0)
    assert jax.tree.structure(g) == jax.tree.structure(p0)


def test_multi_head_mlp_applies_head_task_id_per_example():
    module = clx.MLP(6, (5,), 3, num_heads=4, rngs=nnx.Rngs(2))
    model, params = FunctionalModel.from_module(module)
    x, ids = _x((8, 6)), jnp.array([0, 1, 2, 3, 3, 2, 1, 0], jnp.int32)
    l0, head = params["layers"][0], params["head"]
    h = jax.nn.relu(x @ l0["kernel"] + l0["bias"])
    want = jnp.stack([h[i] @ head["kernel"][ids[i]] + head["bias"][ids[i]] for i in range(8)])
    np.testing.assert_allclose(model.apply(params, x, ids), want, atol=1e-5)
    np.testing.assert_allclose(model.apply(params, x, ids), module(x, task_id=ids), atol=1e-6)
    # a scalar task id is every example's
    np.testing.assert_allclose(model.apply(params, x, 2), model.apply(params, x, jnp.full((8,), 2)), atol=1e-6)
    with pytest.raises(ValueError, match="needs task_id"):
        model.apply(params, x)
    # the heads are not Dense layers: only the hidden layer is tapped
    _, inputs = model.apply_with_taps(params, x, ids)
    assert set(inputs) == set(model.tap_shapes(params, x, ids)) == {"layers/0/kernel"}


def test_a_module_without_task_id_ignores_it():
    model, params = FunctionalModel.from_module(Tokens(nnx.Rngs(0)))
    x = _x((4, 6, 5))
    assert not model.takes_task_id
    np.testing.assert_array_equal(model.apply(params, x, 3), model.apply(params, x))


# --- taps -----------------------------------------------------------------------------------------------------------


def test_layer_inputs_are_the_inputs_of_each_dense_layer():
    model, params = FunctionalModel.from_module(clx.MLP(4, (6, 5), 3, rngs=nnx.Rngs(0)))
    x = _x((7, 2, 2))
    logits, inputs = model.apply_with_taps(params, x)
    layers = params["layers"]
    x0 = x.reshape(7, 4)
    x1 = jax.nn.relu(x0 @ layers[0]["kernel"] + layers[0]["bias"])
    x2 = jax.nn.relu(x1 @ layers[1]["kernel"] + layers[1]["bias"])
    assert list(inputs) == ["layers/0/kernel", "layers/1/kernel", "layers/2/kernel"]
    for key, want in zip(inputs, (x0, x1, x2)):
        np.testing.assert_allclose(inputs[key], want, atol=1e-6)
    np.testing.assert_allclose(logits, x2 @ layers[2]["kernel"] + layers[2]["bias"], atol=1e-6)
    np.testing.assert_array_equal(logits, model.apply(params, x))
    # tap_shapes: one (N, m) float32 per layer, m the width of the kernel the key names
    shapes = model.tap_shapes(params, x)
    assert shapes == {k: jax.ShapeDtypeStruct((7, _at(params, k).shape[1]), jnp.float32) for k in inputs}
    for k in inputs:
        assert _at(params, k).shape[0] == inputs[k].shape[1]


@pytest.mark.parametrize("use_bias", [True, False])
def test_gradient_at_zero_perturbations_is_delta_and_factors_the_kernel_gradient(use_bias):
    model, params = FunctionalModel.from_module(clx.MLP(3, (4,), 2, use_bias=use_bias, rngs=nnx.Rngs(1)))
    x, y = _x((5, 3)), jnp.array([0, 1, 1, 0, 1], jnp.int32)
    shapes = model.tap_shapes(params, x)
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

    def loss(p, perturbations):
        logits, inputs = model.apply_with_taps(p, x, None, perturbations)
        return _ce(logits, y), inputs

    (value, inputs), (g, delta) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, zeros)
    np.testing.assert_allclose(value, _ce(model.apply(params, x), y), atol=1e-7)
    # by hand: delta of the output layer is (softmax - onehot) / B, back through W1 and the ReLU for layer 0
    w0, w1 = params["layers"][0]["kernel"], params["layers"][1]["kernel"]
    pre = x @ w0 + (params["layers"][0]["bias"] if use_bias else 0.0)
    logits = jax.nn.relu(pre) @ w1 + (params["layers"][1]["bias"] if use_bias else 0.0)
    d1 = (jax.nn.softmax(logits) - jax.nn.one_hot(y, 2)) / 5
    d0 = (d1 @ w1.T) * (pre > 0)
    np.testing.assert_allclose(delta["layers/1/kernel"], d1, atol=1e-7)
    np.testing.assert_allclose(delta["layers/0/kernel"], d0, atol=1e-7)
    for i in (0, 1):
        k = f"layers/{i}/kernel"
        assert delta[k].shape == shapes[k].shape
        np.testing.assert_allclose(inputs[k].T @ delta[k], g["layers"][i]["kernel"], atol=1e-6)
        if use_bias:
            np.testing.assert_allclose(jnp.sum(delta[k], 0), g["layers"][i]["bias"], atol=1e-6)
    assert set(g["layers"][0]) == ({"kernel", "bias"} if use_bias else {"kernel"})


def test_a_perturbation_is_added_to_the_layers_pre_bias_output():
    model, params = FunctionalModel.from_module(clx.MLP(3, (4,), 2, rngs=nnx.Rngs(0)))
    x = _x((5, 3))
    p0 = _x((5, 4), seed=1)
    layers = params["layers"]
    h = jax.nn.relu(x @ layers[0]["kernel"] + p0 + layers[0]["bias"])
    # only the layers named are perturbed
    logits, _ = model.apply_with_taps(params, x, None, {"layers/0/kernel": p0})
    np.testing.assert_allclose(logits, h @ layers[1]["kernel"] + layers[1]["bias"], atol=1e-6)
    p1 = _x((5, 2), seed=2)
    logits, _ = model.apply_with_taps(params, x, None, {"layers/1/kernel": p1})
    np.testing.assert_allclose(logits, model.apply(params, x) + p1, atol=1e-6)


def test_a_layer_applied_at_many_positions_taps_one_row_per_position():
    model, params = FunctionalModel.from_module(Tokens(nnx.Rngs(0)))
    x, y = _x((4, 6, 5)), jnp.array([0, 2, 1, 2], jnp.int32)
    shapes = model.tap_shapes(params, x)
    assert {k: s.shape for k, s in shapes.items()} == {"a/kernel": (24, 7), "b/kernel": (4, 3)}
    zeros = {k: jnp.zeros(s.shape) for k, s in shapes.items()}

    def loss(p, perturbations):
        logits, inputs = model.apply_with_taps(p, x, None, perturbations)
        return _ce(logits, y), inputs

    (_, inputs), (g, delta) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, zeros)
    np.testing.assert_allclose(inputs["a/kernel"], x.reshape(24, 5), atol=0)
    assert inputs["b/kernel"].shape == (4, 7)
    np.testing.assert_allclose(inputs["a/kernel"].T @ delta["a/kernel"], g["a"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(inputs["b/kernel"].T @ delta["b/kernel"], g["b"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(jnp.sum(delta["a/kernel"], 0), g["a"]["bias"], atol=1e-6)


def test_a_layer_applied_twice_stacks_its_inputs_and_refuses_perturbations():
    model, params = FunctionalModel.from_module(Twice(nnx.Rngs(0)))
    x = _x((3, 4))
    _, inputs = model.apply_with_taps(params, x)
    first = x @ params["l"]["kernel"] + params["l"]["bias"]
    np.testing.assert_allclose(inputs["l/kernel"], jnp.concatenate([x, jax.nn.relu(first)]), atol=1e-6)
    with pytest.raises(ValueError, match="'l/kernel' is applied more than once"):
        model.apply_with_taps(params, x, None, {"l/kernel": jnp.zeros((3, 4))})


def test_a_model_without_dense_layers_has_no_taps():
    class Scale(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4,)))

        def __call__(self, x):
            return x * self.w[...]

    model, params = FunctionalModel.from_module(Scale())
    x = _x((2, 4))
    assert model.tap_shapes(params, x) == {}
    logits, inputs = model.apply_with_taps(params, x)
    assert inputs == {}
    np.testing.assert_array_equal(logits, x)


# --- abstract models and their errors -------------------------------------------------------------------------------


def test_abstract_needs_no_weights_and_applies_any_params_of_the_structure():
    abstract = nnx.eval_shape(lambda: clx.MLP(12, (8,), 4, num_heads=2, rngs=nnx.Rngs(0)))
    model = FunctionalModel.abstract(abstract)
    module = clx.MLP(12, (8,), 4, num_heads=2, rngs=nnx.Rngs(3))
    real, params = FunctionalModel.from_module(module)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), model.template) == jax.tree.map(
        lambda a: (a.shape, a.dtype), real.template
    )
    assert model.takes_task_id
    x = _x((3, 12))
    np.testing.assert_allclose(model.apply(params, x, 1), module(x, task_id=1), atol=1e-6)
    keys = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert keys == ["head/bias", "head/kernel", "layers/0/bias", "layers/0/kernel"]


@pytest.mark.parametrize(
    "make, kinds",
    [
        (lambda: nnx.BatchNorm(4, rngs=nnx.Rngs(0)), "['BatchStat']"),
        (lambda: nnx.Dropout(0.5, rngs=nnx.Rngs(0)), "['RngCount', 'RngKey']"),
    ],
)
def test_state_other_than_params_is_refused(make, kinds):
    for split in (lambda m: FunctionalModel.from_module(m), FunctionalModel.abstract):
        with pytest.raises(ValueError, match=r"only nnx.Param; this one also holds " + kinds.replace("[", r"\[")):
            split(make())
