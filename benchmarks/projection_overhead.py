"""Cost of GPM's gradient projection against a plain SGD step, and of the plain step against its FLOP floor.

The PMNIST MLP (784-100-100-10, no biases) with a first-layer basis of rank 512
(about where GPM's first layer stands after 10 permuted tasks) and full-rank bases
on the other layers. Everything is measured in one run. It first prints the
machine's float32 matmul throughput (jitted 1024x1024 @ 1024x1024 products, best of
several repeats, on all cores as XLA uses them by default), then one line per batch
size (10 and 128 by default), e.g.

    float32 matmul throughput: 167.3 GFLOP/s (1024x1024 @ 1024x1024, best of 10)
    batch 10: plain 150.2 us/step = 4.7x its FLOP floor (167 GFLOP/s; 1.9x at the step's own 10x784x100
        product rate, 67 GFLOP/s) | projected/plain 1.91x, floor 3.37x, measured/floor 0.57 (projected 287.0 us/step)

(one line per batch size; illustrative numbers, not a measurement). The parts:

* plain: the time of one plain SGD step (an epoch of the trainer's jitted scan,
  median of several repeats, over the number of steps) and its ratio to its FLOP
  floor, 6 B sum(d m) FLOPs at the square-matmul throughput. The same ratio is
  given at the throughput XLA gets on the step's own largest product,
  (B x 784) @ (784 x 100), run as a ``lax.scan`` of many such products: the
  first ratio is the distance to the machine's square-matmul rate, the second to
  what XLA reaches on products of the step's own shape.
* projected/plain: an epoch of GPM-projected train steps over the same epoch of
  plain SGD steps; floor: the same ratio from FLOP counts, a plain step costing
  6 B sum(d m) and the projection of a d x m kernel with a rank-k basis at least
  min(2 d^2 m, 4 d k m, 2 B d^2, 4 B d k); measured/floor: the first over the second.

    python benchmarks/projection_overhead.py [--steps 3000] [--repeats 5] [--batches 10 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clx
from clx import subspace as sub
from clx.train import make_epoch_fn

SIZES = [(784, 100), (100, 100), (100, 10)]
RANKS = {"layers/0/kernel": 512, "layers/1/kernel": 100, "layers/2/kernel": 100}


def gpm_state(params, rule):
    state = rule.init(params)
    subspaces, projectors = {}, {}
    rng = np.random.default_rng(0)
    for (d, _), (path, k) in zip(SIZES, RANKS.items()):
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        basis = np.zeros((d, d), np.float32)
        basis[:, :k] = q[:, :k]
        mask = np.arange(d) < k
        s = sub.Subspace(jnp.asarray(basis), jnp.asarray(mask), jnp.asarray(mask, jnp.float32))
        subspaces[path], projectors[path] = s, sub.complement_projector(s)
    return (clx.GPMState(subspaces, projectors),) + state[1:]


def plain_flops(batch):
    """FLOPs of a plain train step: forward, input gradients and weight gradients, 2 B d m each per layer."""
    return sum(6 * batch * d * m for d, m in SIZES)


def floor_ratio(batch):
    plain = plain_flops(batch)
    proj = sum(
        min(2 * d * d * m, 4 * d * k * m, 2 * batch * d * d, 4 * batch * d * k)
        for (d, m), k in zip(SIZES, RANKS.values())
    )
    return (plain + proj) / plain


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


def product_gflops(batch, d, m, repeats=5, ring=16):
    """float32 GFLOP/s of (batch x d) @ (d x m) products run one after another in a ``lax.scan``.

    Each step multiplies one of ``ring`` different inputs (picked by the step
    index, so XLA cannot hoist the product out of the loop) and adds the result
    to the carry (so it is used); about 2 GFLOP per call, at least 200 steps.
    """
    steps = max(200, int(2e9 // (2 * batch * d * m)))
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="train steps per timed epoch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[10, 128])
    args = ap.parse_args()
    model, params = clx.FunctionalModel.from_module(clx.MLP(784, (100, 100), 10, use_bias=False, rngs=nnx.Rngs(0)))
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{args.steps} steps per epoch, median of {args.repeats}",
        flush=True,
    )
    square = square_matmul_gflops()
    print(f"float32 matmul throughput: {square:.1f} GFLOP/s (1024x1024 @ 1024x1024, best of 10)", flush=True)
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
        step = t_plain / args.steps
        flops = plain_flops(batch)
        measured, floor = t_proj / t_plain, floor_ratio(batch)
        print(
            f"batch {batch}: plain {1e6 * step:.1f} us/step = {step / (flops / (square * 1e9)):.1f}x its FLOP floor "
            f"({square:.0f} GFLOP/s; {step / (flops / (own * 1e9)):.1f}x at the step's own {batch}x{d0}x{m0} "
            f"product rate, {own:.0f} GFLOP/s) | projected/plain {measured:.2f}x, floor {floor:.2f}x, "
            f"measured/floor {measured / floor:.2f} (projected {1e6 * t_proj / args.steps:.1f} us/step)",
            flush=True,
        )


if __name__ == "__main__":
    main()
