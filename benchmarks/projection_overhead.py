"""Cost of GPM's gradient projection against a plain SGD step, and of the plain step against its FLOP floor.

Three models (``--models``, all by default), everything measured in one run:

* ``mlp``: the PMNIST MLP (784-100-100-10, no biases) with a first-layer basis of
  rank 512 (about where GPM's first layer stands after 10 permuted tasks) and
  full-rank bases on the other layers, at batch 10 and 128 (``--batches``).
* ``lenet``: ``clx.LeNet`` on 28x28x1 inputs as experiments/configs/split_mnist_cnn.py
  builds it (5 two-way heads, no biases, batch 32, ``clx.gpm`` on conv1, conv2, fc).
* ``alexnet``: GPM's ``clx.AlexNet`` on 32x32x3 inputs as
  experiments/configs/split_cifar100_alexnet.py builds it (10 ten-way heads, batch
  64, ``clx.gpm(freeze_vectors=True)`` on conv1-3, fc1, fc2).

The conv models get a random orthonormal basis of rank d // 2 on every projected
layer, d its input dimension (k_h k_w c_in for a conv); the heads are not projected.
The run first prints the machine's float32 matmul throughput (jitted 1024x1024 @
1024x1024 products, best of several repeats, on all cores as XLA uses them by
default), then one line per MLP batch size and, per conv model, a line of its
layers and a result line, e.g.

    float32 matmul throughput: 167.3 GFLOP/s (1024x1024 @ 1024x1024, best of 10)
    batch 10: plain 150.2 us/step = 4.7x its FLOP floor (167 GFLOP/s; 1.9x at the step's own 10x784x100
        product rate, 67 GFLOP/s) | projected/plain 1.91x, floor 3.37x, measured/floor 0.57 (projected 287.0 us/step)
    lenet batch 32, 50 steps per epoch, plain step 0.439 GFLOP; conv1 n 18432 d 25 m 20 k 12: Q g +0.0 MFLOP
        (other route +23.0, floor +0.0); ...; fc n 32 d 800 m 500 k 400: (XQ)^T delta +41.0 MFLOP (...)
    lenet batch 32: plain 25000.0 us/step = 7.8x its FLOP floor (...; 2.1x at the step's own 2048x500x50
        product rate, 37 GFLOP/s) | projected/plain 1.10x, floor 1.15x, measured/floor 0.96 (...)

(illustrative numbers, not a measurement). The parts:

* plain: the time of one plain SGD step (an epoch of the trainer's jitted scan,
  ``clx.train.make_epoch_fn``, median of several repeats, over the number of
  steps) and its ratio to its FLOP floor, 6 sum(n d m) FLOPs over the layers at
  the square-matmul throughput: forward, input gradients and weight gradients, 2
  n d m each for a (d, m) kernel applied to n rows (n = B for a Dense layer and a
  head, B x output positions for a conv layer: its im2col patches; the first
  layer's unneeded input gradient is counted too). The same ratio is given at the
  throughput XLA gets on the step's own largest product, (n x d) @ (d x m), run as
  a ``lax.scan`` of many such products: the first ratio is the distance to the
  machine's square-matmul rate, the second to what XLA reaches on products of
  the step's own shape.
* projected/plain: an epoch of GPM-projected train steps over the same epoch of
  plain SGD steps; floor: the same ratio from FLOP counts, a plain step costing
  6 sum(n d m) and the projection of a d x m kernel with a rank-k basis adding at
  least min(2 d^2 m, 4 d k m, 2 n d^2, 4 n d k) (``Q g``, ``M (M^T g)``, the
  factored ``(X Q)^T delta`` beyond the ``X^T delta`` it replaces, and its rank-k
  form); measured/floor: the first over the second. A conv model's layer line gives
  per layer the route clx's ``project_kernel`` takes (``Q g``: + 2 d^2 m, or
  ``(XQ)^T delta``: + 2 n d^2), the other route's cost and the floor: with k = d / 2
  the floor is the cheaper route, and clx takes it on every layer (``Q g`` on the
  convs, whose n is large; the factored route on the fc layers).

On XLA's CPU backend (jax 0.12) the backward convolutions that autodiff of
``lax.conv_general_dilated`` emits run 10-25x slower inside a ``lax.scan`` than jitted
alone (LeNet's conv2 kernel gradient: 61 against 3.8 ms; its forward convolution: the
same in both), so clx's models use ``clx.functional.conv_general_dilated``, whose
gradients are forward ops (the patches' product with delta, a flipped-kernel
convolution): LeNet's plain step in the trainer's scan went from 142.7 to 24.8 ms
(5.8x) with it, one loaded run. Keep ``--conv-steps`` at 12 or more (XLA may unroll
a 3-step loop, which hides a loop's costs).

    python benchmarks/projection_overhead.py [--models mlp lenet alexnet] [--steps 3000] [--conv-steps 0]
        [--repeats 5] [--batches 10 128]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clx
from clx import subspace as sub
from clx.train import make_epoch_fn
from clx.tree import path_str

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs import split_cifar100_alexnet, split_mnist_cnn  # noqa: E402 -- the repository root

MODELS = ("mlp", "lenet", "alexnet")
CONV_STEPS = {"lenet": 50, "alexnet": 12}  # enough that XLA keeps the scan rolled, as the trainer runs it

SIZES = [(784, 100), (100, 100), (100, 10)]
RANKS = {"layers/0/kernel": 512, "layers/1/kernel": 100, "layers/2/kernel": 100}


def gpm_state(params, rule, ranks=RANKS):
    """``rule.init(params)`` with GPM's subspaces replaced by random orthonormal bases of rank ``ranks[path]``."""
    state = rule.init(params)
    subspaces, projectors = {}, {}
    rng = np.random.default_rng(0)
    for path, k in ranks.items():
        d = state[0].subspaces[path].basis.shape[0]
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        basis = np.zeros((d, d), np.float32)
        basis[:, :k] = q[:, :k]
        mask = np.arange(d) < k
        s = sub.Subspace(jnp.asarray(basis), jnp.asarray(mask), jnp.asarray(mask, jnp.float32))
        subspaces[path], projectors[path] = s, sub.complement_projector(s)
    return (clx.GPMState(subspaces, projectors),) + state[1:]


def mlp_layers(batch):
    """The MLP's layers as ``[(path, n, d, m)]``: n = batch rows through each (d, m) kernel."""
    return [(path, batch, d, m) for path, (d, m) in zip(RANKS, SIZES)]


def model_layers(model, params, x, task_ids):
    """Every Dense, Conv and ``clx.MultiHead`` layer of ``model`` on the batch ``x`` as ``[(path, n, d, m)]``.

    A Dense layer's n is the batch, a Conv layer's the batch x its output
    positions (the rows of its im2col patches, d = k_h k_w c_in); a MultiHead
    (batch, d, m) head computes one (d, m) product per example, n = batch.
    """
    taps = model.tap_shapes(params, x, task_ids)  # path -> (n, m) pre-bias outputs
    layers = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key, shape = path_str(path), tuple(leaf.shape)
        if key.split("/")[-1] != "kernel":
            continue
        if key in taps:
            layers.append((key, taps[key].shape[0], math.prod(shape[:-1]), shape[-1]))
        elif len(shape) == 3:  # MultiHead (heads, d, m)
            layers.append((key, x.shape[0], shape[1], shape[2]))
    return layers


def plain_flops(layers):
    """FLOPs of a plain train step: forward, input gradients and weight gradients, 2 n d m each per layer."""
    return sum(6 * n * d * m for _, n, d, m in layers)


def projection_floor(n, d, m, k):
    """The fewest FLOPs an exact projection of a (d, m) kernel gradient with a rank-k basis adds to a step:
    Q g (2 d^2 m), M (M^T g) (4 d k m), or the factored (X Q)^T delta (2 n d^2 beyond the X^T delta it
    replaces) and its rank-k form ((X M) M^T)^T delta (4 n d k)."""
    return min(2 * d * d * m, 4 * d * k * m, 2 * n * d * d, 4 * n * d * k)


def floor_ratio(layers, ranks):
    plain = plain_flops(layers)
    proj = sum(projection_floor(n, d, m, ranks[path]) for path, n, d, m in layers if path in ranks)
    return (plain + proj) / plain


def clx_path(n, d, m):
    """The route ``clx.projection``'s ``project_kernel`` takes for a (d, m) kernel with (n, d) taps, the FLOPs it
    adds to the plain step, and the other route's: 'Q g' adds 2 d^2 m; '(XQ)^T delta' adds 2 n d^2 (its 2 n d m
    product replaces the unprojected X^T delta, which XLA then drops). The same test as ``project_kernel``'s."""
    qg, factored = 2 * d * d * m, 2 * n * d * d
    if 2 * n * d * d + 2 * n * d * m < 2 * d * d * m:
        return "(XQ)^T delta", factored, qg
    return "Q g", qg, factored


def best_seconds(f, *args, repeats):
    """The fastest of ``repeats`` timed calls of a jitted ``f`` (after one compiling call)."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def square_matmul_gflops(n=1024, repeats=10):
    """float32 GFLOP/s of a jitted (n x n) @ (n x n) product, best of ``repeats``."""
    a = jax.random.normal(jax.random.key(3), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(4), (n, n), jnp.float32)
    return 2 * n**3 / best_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats) / 1e9


def product_gflops(batch, d, m, repeats=5, ring=16, min_steps=200):
    """float32 GFLOP/s of (batch x d) @ (d x m) products run one after another in a ``lax.scan``.

    Each step multiplies one of ``ring`` different inputs (picked by the step
    index, so XLA cannot hoist the product out of the loop) and adds the result
    to the carry (so it is used); about 2 GFLOP per call, at least ``min_steps`` steps.
    """
    steps = max(min_steps, int(2e9 // (2 * batch * d * m)))
    xs = jax.random.normal(jax.random.key(5), (ring, batch, d), jnp.float32)
    w = jax.random.normal(jax.random.key(6), (d, m), jnp.float32)

    @jax.jit
    def run(xs, w):
        def body(acc, i):
            return acc + xs[i % ring] @ w, None

        acc, _ = jax.lax.scan(body, jnp.zeros((batch, m), jnp.float32), jnp.arange(steps))
        return acc

    return 2 * batch * d * m * steps / best_seconds(run, xs, w, repeats=repeats) / 1e9


def time_epoch(model, params, rule, state, x, y, batch, repeats):
    epoch = make_epoch_fn(model, rule, batch)
    ids = jnp.zeros(len(y), jnp.int32)
    times = []
    for r in range(repeats + 1):  # the first call compiles
        p, s = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)
        t0 = time.perf_counter()
        out = epoch(p, s, x, y, ids, jax.random.key(r))
        jax.block_until_ready(out)
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(label, square, own, own_shape, flops, floor, t_plain, t_proj, steps):
    """One result line: the plain step against its FLOP floor, the projected step against the plain one."""
    step = t_plain / steps
    measured = t_proj / t_plain
    return (
        f"{label}: plain {1e6 * step:.1f} us/step = {step / (flops / (square * 1e9)):.1f}x its FLOP floor "
        f"({square:.0f} GFLOP/s; {step / (flops / (own * 1e9)):.1f}x at the step's own {own_shape} "
        f"product rate, {own:.0f} GFLOP/s) | projected/plain {measured:.2f}x, floor {floor:.2f}x, "
        f"measured/floor {measured / floor:.2f} (projected {1e6 * t_proj / steps:.1f} us/step)"
    )


def run_mlp(args, square):
    model, params = clx.FunctionalModel.from_module(clx.MLP(784, (100, 100), 10, use_bias=False, rngs=nnx.Rngs(0)))
    d0, m0 = max(SIZES, key=lambda s: s[0] * s[1])
    for batch in args.batches:
        n = batch * args.steps
        x = jax.random.normal(jax.random.key(1), (n, 784))
        y = jax.random.randint(jax.random.key(2), (n,), 0, 10)
        plain_rule = clx.chain(optax.sgd(0.01))
        gpm_rule = clx.chain(clx.gpm(0.97), optax.sgd(0.01))
        t_plain = time_epoch(model, params, plain_rule, plain_rule.init(params), x, y, batch, args.repeats)
        t_proj = time_epoch(model, params, gpm_rule, gpm_state(params, gpm_rule), x, y, batch, args.repeats)
        own = product_gflops(batch, d0, m0)
        layers = mlp_layers(batch)
        line = report(
            f"batch {batch}",
            square,
            own,
            f"{batch}x{d0}x{m0}",
            plain_flops(layers),
            floor_ratio(layers, RANKS),
            t_plain,
            t_proj,
            args.steps,
        )
        print(line, flush=True)


def conv_case(name):
    """``(module, input_shape, classes per head, batch, gpm rule)`` as the experiment config of ``name`` builds them."""
    if name == "lenet":
        c = split_mnist_cnn.get_config()
        shape, classes = (28, 28, 1), 10
    else:
        c = split_cifar100_alexnet.get_config()
        shape, classes = (32, 32, 3), 100
    tasks = c.stream.num_tasks
    kw = dict(num_outputs=classes // tasks, num_heads=tasks, init=c.model.init, rngs=nnx.Rngs(0))
    if name == "lenet":
        module = clx.models.LeNet(shape, use_bias=c.model.use_bias, **kw)
    else:
        module = clx.models.AlexNet(shape, **kw)
    rule = clx.gpm(0.97, freeze_vectors=bool(c.gpm.get("freeze_vectors", False)))
    return module, shape, classes // tasks, int(c.train.batch_size), rule


def run_conv(name, args, square):
    module, shape, outputs, batch, gpm = conv_case(name)
    model, params = clx.FunctionalModel.from_module(module)
    steps = args.conv_steps or CONV_STEPS[name]
    n = batch * steps
    x = jax.random.normal(jax.random.key(1), (n, *shape))
    y = jax.random.randint(jax.random.key(2), (n,), 0, outputs)
    layers = model_layers(model, params, x[:batch], jnp.zeros((batch,), jnp.int32))
    plain_rule = clx.chain(optax.sgd(0.01))
    gpm_rule = clx.chain(gpm, optax.sgd(0.01))
    state = gpm_rule.init(params)
    ranks = {path: s.basis.shape[0] // 2 for path, s in state[0].subspaces.items()}
    parts = []
    for path, rows, d, m in layers:
        if path in ranks:
            route, cost, other = clx_path(rows, d, m)
            parts.append(
                f"{path.split('/')[0]} n {rows} d {d} m {m} k {ranks[path]}: {route} +{cost / 1e6:.1f} MFLOP "
                f"(other route +{other / 1e6:.1f}, floor +{projection_floor(rows, d, m, ranks[path]) / 1e6:.1f})"
            )
    print(
        f"{name} batch {batch}, {steps} steps per epoch, plain step {plain_flops(layers) / 1e9:.3f} GFLOP; "
        + "; ".join(parts),
        flush=True,
    )
    t_plain = time_epoch(model, params, plain_rule, plain_rule.init(params), x, y, batch, args.repeats)
    t_proj = time_epoch(model, params, gpm_rule, gpm_state(params, gpm_rule, ranks), x, y, batch, args.repeats)
    _, n0, d0, m0 = max(layers, key=lambda t: t[1] * t[2] * t[3])
    own = product_gflops(n0, d0, m0, repeats=3, ring=4, min_steps=4)
    line = report(
        f"{name} batch {batch}",
        square,
        own,
        f"{n0}x{d0}x{m0}",
        plain_flops(layers),
        floor_ratio(layers, ranks),
        t_plain,
        t_proj,
        steps,
    )
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--steps", type=int, default=3000, help="train steps per timed epoch of the MLP")
    ap.add_argument(
        "--conv-steps",
        type=int,
        default=0,
        help=f"train steps per timed epoch of the conv models (0: {CONV_STEPS})",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[10, 128], help="the MLP's batch sizes")
    args = ap.parse_args()
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{args.steps} steps per MLP epoch, median of {args.repeats}",
        flush=True,
    )
    square = square_matmul_gflops()
    print(f"float32 matmul throughput: {square:.1f} GFLOP/s (1024x1024 @ 1024x1024, best of 10)", flush=True)
    for name in args.models:
        if name == "mlp":
            run_mlp(args, square)
        else:
            run_conv(name, args, square)


if __name__ == "__main__":
    main()
