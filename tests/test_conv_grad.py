"""clx.functional.conv_general_dilated: lax's convolution with its gradients written as forward ops.

Value and both gradients equal jax.lax's (float tolerance) over strides, paddings, kernel
and input sizes; the patch features are channel-major as the kernel reshape assumes;
unsupported configurations fall back to lax exactly; clx's conv models use it, and a
scan of SGD steps on a LeNet gives lax's params.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import clx
from clx.functional import conv_general_dilated
from clx.models import AlexNet, LeNet, ResNet18

DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
PADDINGS = ("VALID", "SAME", ((1, 1), (1, 1)), ((0, 1), (2, 0)))


def _vjps(conv, x, k, g, *args, **kw):
    out, vjp = jax.vjp(lambda x, k: conv(x, k, *args, **kw), x, k)
    return (out, *vjp(g))


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = max(float(np.abs(b).max()), 1e-30)
    np.testing.assert_array_less(np.abs(a - b).max(), rtol * scale + 1e-30)


def _case(nsp, size, k, c_in=3, c_out=4, seed=0):
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (2, *size, c_in))
    kernel = jax.random.normal(kk, (*k, c_in, c_out))
    return x, kernel, kg


def _check(x, kernel, kg, strides, padding, dn):
    out_shape = jax.eval_shape(lambda: jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn))
    g = jax.random.normal(kg, out_shape.shape)
    ours = _vjps(conv_general_dilated, x, kernel, g, strides, padding, dimension_numbers=dn)
    ref = _vjps(jax.lax.conv_general_dilated, x, kernel, g, strides, padding, dimension_numbers=dn)
    for a, b in zip(ours, ref):  # value, d/dlhs, d/drhs
        _close(a, b)


@settings(max_examples=6, deadline=None)
@given(
    stride=st.sampled_from((1, 2)),
    padding=st.sampled_from(PADDINGS),
    k=st.integers(1, 5),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    seed=st.integers(0, 100),
)
def test_value_and_both_gradients_equal_lax_2d(stride, padding, k, extra, seed):
    size = (k + extra[0], k + 1 + extra[1])  # odd and even sizes, at least the kernel
    x, kernel, kg = _case(2, size, (k, k), seed=seed)
    _check(x, kernel, kg, (stride, stride), padding, DN[2])


@pytest.mark.parametrize(
    "nsp, size, k, strides, padding",
    [
        (2, (9, 8), (5, 3), (2, 1), ((3, 4), (0, 5))),  # pads larger than K - 1: the input-gradient pads go negative
        (1, (11,), (3,), (2,), "SAME"),
        (3, (5, 6, 4), (2, 3, 1), (1, 2, 1), ((1, 0), (1, 1), (0, 2))),
    ],
)
def test_value_and_gradients_equal_lax_other_shapes_and_dims(nsp, size, k, strides, padding):
    x, kernel, kg = _case(nsp, size, k)
    _check(x, kernel, kg, strides, padding, DN[nsp])


def test_patch_features_are_channel_major_as_the_kernel_gradient_assumes():
    x = jnp.arange(2 * 4 * 5 * 3, dtype=jnp.float32).reshape(2, 4, 5, 3)
    p = jax.lax.conv_general_dilated_patches(x, (2, 3), (1, 1), "VALID", dimension_numbers=DN[2])
    assert p.shape == (2, 3, 3, 3 * 2 * 3)
    for c in range(3):
        for i in range(2):
            for j in range(3):
                np.testing.assert_array_equal(p[:, :, :, c * 6 + i * 3 + j], x[:, i : i + 3, j : j + 3, c])


def _uses_custom_vjp(f, *args):
    return "custom_vjp_call" in str(jax.make_jaxpr(f)(*args))


@pytest.mark.parametrize(
    "kw",
    [
        dict(rhs_dilation=(2, 2), dimension_numbers=DN[2]),
        dict(lhs_dilation=(2, 1), dimension_numbers=DN[2]),
        dict(feature_group_count=3, dimension_numbers=DN[2]),
        dict(dimension_numbers=("NCHW", "OIHW", "NCHW")),
        dict(dimension_numbers=DN[2], preferred_element_type=jnp.float32),
    ],
)
def test_unsupported_configurations_fall_back_to_lax_bit_for_bit(kw):
    nchw = kw["dimension_numbers"][0] == "NCHW"
    x = jax.random.normal(jax.random.key(0), (2, 3, 7, 7) if nchw else (2, 7, 7, 3))
    groups = kw.get("feature_group_count", 1)
    kernel = jax.random.normal(jax.random.key(1), (6, 3, 2, 2) if nchw else (2, 2, 3 // groups, 6))
    args = ((1, 1), ((1, 1), (0, 1)))
    out = jax.lax.conv_general_dilated(x, kernel, *args, **kw)
    g = jax.random.normal(jax.random.key(2), out.shape)
    ours = _vjps(conv_general_dilated, x, kernel, g, *args, **kw)
    ref = _vjps(jax.lax.conv_general_dilated, x, kernel, g, *args, **kw)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    assert not _uses_custom_vjp(lambda x, k: conv_general_dilated(x, k, *args, **kw), x, kernel)
    assert _uses_custom_vjp(
        lambda x, k: conv_general_dilated(x, k, *args, dimension_numbers=DN[2]), *_case(2, (7, 7), (2, 2))[:2]
    )


def test_second_order_reverse_mode_equals_lax():
    x, kernel, _ = _case(2, (6, 7), (3, 3))
    v = jax.random.normal(jax.random.key(5), kernel.shape)

    def hvp(conv):
        loss = lambda k: jnp.sum(jnp.tanh(conv(x, k, (2, 2), "SAME", dimension_numbers=DN[2])) ** 2)
        return jax.grad(lambda k: jnp.vdot(jax.grad(loss)(k), v))(kernel)

    _close(hvp(conv_general_dilated), hvp(jax.lax.conv_general_dilated), rtol=1e-4)


def test_every_conv_of_the_models_uses_it():
    models = (  # abstract (no initialization) but the same graph
        nnx.eval_shape(lambda: LeNet((16, 16, 1), channels=(2, 3), hidden=4, rngs=nnx.Rngs(0))),
        nnx.eval_shape(lambda: AlexNet((19, 19, 3), channels=(2, 2, 2), hidden=(4, 4), rngs=nnx.Rngs(0))),
        nnx.eval_shape(lambda: ResNet18((9, 9, 3), nf=2, rngs=nnx.Rngs(0))),
    )
    for m in models:
        convs = [sub for _, sub in nnx.iter_graph(m) if isinstance(sub, nnx.Conv)]
        assert convs and all(c.conv_general_dilated is conv_general_dilated for c in convs), type(m).__name__


def _lenet(conv):
    m = LeNet((16, 16, 1), num_outputs=3, channels=(3, 4), hidden=8, rngs=nnx.Rngs(0))
    m.conv1.conv_general_dilated = m.conv2.conv_general_dilated = conv
    return clx.FunctionalModel.from_module(m)


def test_a_jitted_scan_of_sgd_steps_on_lenet_gives_lax_params():
    xs = jax.random.normal(jax.random.key(1), (3, 8, 16, 16, 1))
    ys = jax.random.randint(jax.random.key(2), (3, 8), 0, 3)
    opt = optax.sgd(0.1)

    def train(conv):
        model, params = _lenet(conv)

        def step(carry, batch):
            params, opt_state = carry
            x, y = batch
            loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
            updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), (xs, ys))[0][0])(params)

    ours, ref = train(conv_general_dilated), train(jax.lax.conv_general_dilated)
    init = _lenet(conv_general_dilated)[1]
    for a, b, p0 in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(init)):
        assert not np.allclose(b, p0)  # the steps moved every param
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
