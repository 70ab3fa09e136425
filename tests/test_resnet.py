"""GPM's reduced ResNet-18 (clx.models.ResNet18): shapes, its 20 projected conv kernels, the strided convs'
representations against the authors' construction, GPM at threshold 1 keeping the first task's outputs, and the
"resnet18" model kind in the experiment script."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx.models import RESNET18_GPM_NUM_SAMPLES, ResNet18
from clx.projection import kernel_paths

HIGHEST = jax.lax.Precision.HIGHEST
DN = ("NHWC", "HWIO", "NHWC")

# The authors' order of the 20 conv layers (main_five_dataset.py: mat_final, the shortcut after its block's conv2).
AUTHORS_ORDER = (
    ["conv1/kernel"]
    + [f"layer1/{b}/conv{i}/kernel" for b in (0, 1) for i in (1, 2)]
    + [f"layer{s}/{b}/{n}/kernel" for s in (2, 3, 4) for b in (0, 1) for n in ("conv1", "conv2", "shortcut")[: 3 - b]]
)


def _abstract(**kw):
    module = nnx.eval_shape(lambda: ResNet18(rngs=nnx.Rngs(0), **kw))  # shapes only
    return clx.FunctionalModel.abstract(module), nnx.to_pure_dict(nnx.state(module, nnx.Param))


def test_shapes_on_32x32x3_and_the_20_conv_kernels_in_the_authors_order():
    model, params = _abstract()  # nf = 20, 5 heads of 10
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(model.apply, params, x, jnp.zeros(2, jnp.int32)).shape == (2, 10)
    assert params["head"]["kernel"].shape == (5, 640, 10)  # 8 nf x 2 x 2 after the 2x2 average pool
    paths = kernel_paths(params)
    assert [p for p, _ in paths] == AUTHORS_ORDER and len(paths) == 20
    windows = [params_at(params, p).shape[:2] for p, _ in paths]
    assert windows.count((3, 3)) == 17 and windows.count((1, 1)) == 3
    assert [p for p, _ in paths if params_at(params, p).shape[:2] == (1, 1)] == [
        "layer2/0/shortcut/kernel",
        "layer3/0/shortcut/kernel",
        "layer4/0/shortcut/kernel",
    ]
    # input dims of the authors' representation matrices: 3x3 x in_channel (3, 20, 40, 80, 160), 1x1 x in_channel
    assert [d for _, (d, _) in paths] == [27] + [180] * 5 + [360, 20, 360, 360, 360, 720, 40, 720, 720, 720] + [
        1440,
        80,
        1440,
        1440,
    ]
    # each conv's output map: 32 (conv1, stage 1), 16, 8, 4 (stride 2 with padding 1 halves it, as in PyTorch)
    taps = model.tap_shapes(params, x, 0)
    sides = {p: int(round((taps[p].shape[0] / 2) ** 0.5)) for p, _ in paths}
    assert sides["conv1/kernel"] == sides["layer1/1/conv2/kernel"] == 32
    assert sides["layer2/0/conv1/kernel"] == sides["layer2/0/shortcut/kernel"] == 16
    assert sides["layer3/0/shortcut/kernel"] == 8 and sides["layer4/1/conv2/kernel"] == 4
    # batch norm holds only Params (1-D), no biases on the convs; the authors' per-layer sample counts fit
    assert all(leaf.ndim == 1 for k, leaf in _flat(params) if "bn" in k) and not any(
        k.endswith("bias") and "bn" not in k for k, _ in _flat(params)
    )
    counts = dict(zip(AUTHORS_ORDER, RESNET18_GPM_NUM_SAMPLES))
    assert (counts["conv1/kernel"], counts["layer2/0/shortcut/kernel"], counts["layer2/1/conv1/kernel"]) == (10, 10, 10)
    assert (counts["layer2/1/conv2/kernel"], counts["layer3/0/shortcut/kernel"], counts["layer3/1/conv1/kernel"]) == (
        50,
        50,
        100,
    )
    assert sum(RESNET18_GPM_NUM_SAMPLES) == 9 * 10 + 4 * 50 + 7 * 100
    state = jax.eval_shape(clx.gpm(0.965, num_samples=RESNET18_GPM_NUM_SAMPLES, freeze_vectors=True).init, params)
    assert state.projectors["layer4/1/conv2/kernel"].shape == (1440, 1440)


def params_at(params, path):
    node = params
    for k in path.split("/"):
        node = node[int(k) if k.isdigit() else k]
    return node


def _flat(params):
    return [(clx.tree.path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def _torch_like(path, leaf, rng=np.random.default_rng(0)):
    name = clx.tree.path_str(path)
    if name.endswith("scale") or name.endswith("bias"):  # batch norm: ones and zeros
        return np.full(leaf.shape, float(name.endswith("scale")), np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim == 4 else leaf.shape[-2]
    return (rng.uniform(-1, 1, size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)  # PyTorch's default


@pytest.fixture(scope="module")
def net():
    """One nf = 2 model on 16x16x3 inputs, 3 outputs, 2 heads, shared by the tests, its weights drawn with numpy
    (PyTorch's default ranges) into the abstract module: building one for real compiles an initializer per shape."""
    module = nnx.eval_shape(lambda: ResNet18((16, 16, 3), 3, num_heads=2, nf=2, rngs=nnx.Rngs(0)))
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(_torch_like, nnx.to_pure_dict(state)))
    nnx.update(module, state)
    return module


@pytest.fixture(scope="module")
def tapped(net):
    """(model, params, run): ``run(params, x, task_ids)`` -> (logits, {kernel path: (N, d) inputs}), jitted once for
    the (6, 16, 16, 3) batches every test below uses."""
    model, params = clx.FunctionalModel.from_module(net)
    return model, params, jax.jit(model.apply_with_taps)


def _ids(t):
    return jnp.full((6,), t, jnp.int32)


def test_real_forward_heads_and_bad_arguments(net, tapped):
    model, params, run = tapped
    x = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
    out, taps = run(params, x, jnp.array([0, 1, 1, 0, 1, 0], jnp.int32))
    assert out.shape == (6, 3) and bool(jnp.isfinite(out).all())
    assert params["head"]["kernel"].shape == (2, 16, 3)  # 16 -> 8 -> 4 -> 2 -> pool 1: 8 nf features
    assert sorted(taps) == sorted(AUTHORS_ORDER)  # every conv tapped once; the heads are not nnx.Linear
    small = nnx.eval_shape(lambda: ResNet18((9, 9, 1), 3, 1, nf=1, rngs=nnx.Rngs(0)))  # 9 -> 5 -> 3 -> 2 -> 1
    assert isinstance(small.head, nnx.Linear) and small.head.kernel.shape == (8, 3)  # one shared, projected head
    with pytest.raises(ValueError, match="at least 9x9"):
        ResNet18((8, 8, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown init"):
        ResNet18(init="kaiming", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        ResNet18(nf=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="4 stages"):
        ResNet18(num_blocks=(2, 2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"takes \(batch, 16, 16, 3\) inputs"):
        net(jnp.zeros((2, 15, 16, 3)), 0)


def _authors_patches(act, k, stride, pad):
    """The authors' loop (get_representation_matrix_ResNet18), channels-last: pad, then every window at the stride.
    Returns (examples x positions, k k c) with rows example-major and columns in (k_h, k_w, c) order."""
    act = np.pad(np.asarray(act, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    s = (act.shape[1] - k) // stride + 1
    rows = [
        act[n, stride * i : stride * i + k, stride * j : stride * j + k, :].reshape(-1)
        for n in range(act.shape[0])
        for i in range(s)
        for j in range(s)
    ]
    return np.stack(rows)


def _bn(z, scale, bias):
    mean, var = z.mean(0), z.var(0)
    return (z - mean) / np.sqrt(var + 1e-5) * scale + bias


def test_strided_convs_representations_are_their_patches_with_stride_and_padding_1(tapped):
    model, params, run = tapped
    x = np.asarray(jax.random.normal(jax.random.key(2), (6, 16, 16, 3)))
    _, taps = run(params, x, _ids(0))
    taps = {k: np.asarray(v, np.float64) for k, v in taps.items()}
    np.testing.assert_allclose(taps["conv1/kernel"], _authors_patches(x, 3, 1, 1), atol=1e-6)  # stride 1, padding 1
    # stage 2's input h, rebuilt in numpy from the last block of stage 1: relu(bn2(conv2(a)) + its input)
    blk = params["layer1"][1]
    h_in = taps["layer1/1/conv1/kernel"][:, 4 * 2 : 5 * 2]  # the centre of each 3x3 window: the block's input
    z = taps["layer1/1/conv2/kernel"] @ np.asarray(blk["conv2"]["kernel"]).reshape(18, 2)
    h = np.maximum(_bn(z, blk["bn2"]["scale"], blk["bn2"]["bias"]) + h_in, 0).reshape(6, 16, 16, 2)
    rep = taps["layer2/0/conv1/kernel"]  # (examples x positions, d), stride 2, padding 1: an 8x8 output
    assert rep.shape == (6 * 8 * 8, 18)
    np.testing.assert_allclose(rep, _authors_patches(h, 3, 2, 1), atol=1e-4)
    lax_patches = jax.lax.conv_general_dilated_patches(
        jnp.asarray(h, jnp.float32), (3, 3), (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN, precision=HIGHEST
    )  # (6, 8, 8, c * 9), features channel-major
    np.testing.assert_allclose(
        rep, jnp.moveaxis(lax_patches.reshape(6, 8, 8, 2, 3, 3), 3, -1).reshape(-1, 18), atol=1e-4
    )
    np.testing.assert_allclose(taps["layer2/0/shortcut/kernel"], _authors_patches(h, 1, 2, 0), atol=1e-4)  # no pad
    # Flax's 'SAME' would pad a stride-2 3x3 conv (0, 1): other patches than the authors' (what _PAD1 avoids)
    same = jax.lax.conv_general_dilated_patches(
        jnp.asarray(h, jnp.float32), (3, 3), (2, 2), "SAME", dimension_numbers=DN
    )
    assert not np.allclose(jnp.moveaxis(same.reshape(6, 8, 8, 2, 3, 3), 3, -1).reshape(-1, 18), rep, atol=1e-3)


def test_gpm_at_threshold_1_keeps_the_first_tasks_outputs_while_the_second_trains(tapped):
    """After task 0's bases (every layer, threshold 1, batch norm frozen), three projected SGD steps on task 1 move
    the convs but not task 0's logits or any layer's inputs on task 0's stored examples."""
    model, params, run = tapped
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)
    x0[..., 2] = 0.0  # task 0 spans 18 of conv1's 27 patch dims: conv1 can still learn task 1
    x0, x1 = jnp.asarray(x0), jnp.asarray(rng.normal(size=(6, 16, 16, 3)).astype(np.float32))
    y1 = jnp.asarray(rng.integers(0, 3, size=6))
    rule = clx.chain(clx.gpm(1.0, num_samples=6, freeze_vectors=True), optax.sgd(0.2))
    before, taps = run(params, x0, _ids(0))
    reps = {k: v.T for k, v in taps.items()}  # the evidence's (d, examples x positions), as clx.fit records it
    ev = clx.Evidence(jnp.int32(0), x0, jnp.zeros(6, jnp.int32), reps, model.apply)
    _, state = jax.jit(rule.consolidate)(jax.jit(rule.init)(params), params, ev)

    @jax.jit
    def step(p, state):
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(model.apply(q, x1, _ids(1)), y1).mean()
        u, state = rule.update(jax.grad(loss)(p), state, p, task_id=jnp.int32(1))
        return optax.apply_updates(p, u), state

    p = params
    for _ in range(3):
        p, state = step(p, state)
    after, after_taps = run(p, x0, _ids(0))
    np.testing.assert_allclose(after, before, atol=1e-4 * float(jnp.abs(before).max()) + 1e-5)
    for key in taps:
        np.testing.assert_allclose(after_taps[key], taps[key], atol=2e-4, err_msg=key)
    moved = [k for k, _ in kernel_paths(params) if not np.allclose(params_at(p, k), params_at(params, k))]
    assert "conv1/kernel" in moved and "layer4/1/conv2/kernel" in moved  # not frozen: projected
    assert not np.allclose(run(p, x1, _ids(1))[0], run(params, x1, _ids(1))[0])
    np.testing.assert_array_equal(p["bn1"]["scale"], params["bn1"]["scale"])  # 1-D params learn on task 0 only


def test_resnet18_kind_in_the_experiment_script_and_gpm_layer_selection():
    from experiments.methods import _registry as reg

    class S:  # the fixture's shapes: no new initializers to compile
        input_shape, num_outputs, num_heads = (16, 16, 3), 3, 2

    c = ml_collections.ConfigDict({"model": {"kind": "resnet18", "nf": 2, "init": "torch", "use_bias": False}})
    model = params = jax.eval_shape(lambda: reg.build_classifier(c, S, 0)[1])  # shapes only (layer_paths reads them)
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 2) and params["head"]["kernel"].shape == (2, 16, 3)
    assert "resnet18" in reg.MODEL_KINDS
    assert reg.layer_paths(model, "") is None  # the rule's default: all 20
    assert reg.layer_paths(model, "layer*/0/shortcut/kernel") == [
        "layer2/0/shortcut/kernel",
        "layer3/0/shortcut/kernel",
        "layer4/0/shortcut/kernel",
    ]
    assert reg.layer_paths(model, "conv1/kernel,layer4/*/conv2/kernel") == [
        "conv1/kernel",
        "layer4/0/conv2/kernel",
        "layer4/1/conv2/kernel",
    ]
    state = jax.eval_shape(clx.gpm(0.965, layers=reg.layer_paths(model, "layer4/*")).init, params)
    assert sorted(state.projectors) == [
        "layer4/0/conv1/kernel",
        "layer4/0/conv2/kernel",
        "layer4/0/shortcut/kernel",
    ] + [
        "layer4/1/conv1/kernel",
        "layer4/1/conv2/kernel",
    ]
