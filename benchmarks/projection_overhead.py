"""Cost of GPM's gradient projection against a plain SGD step, measured in one run.

The PMNIST MLP (784-100-100-10, no biases) with a first-layer basis of rank 512
(about where GPM's first layer stands after 10 permuted tasks) and full-rank bases
on the other layers. For batch 10 and 128 it prints

    batch 10: projected/plain 3.61x, floor 3.30x, measured/floor 1.09

measured: the time of an epoch of GPM-projected train steps over the same epoch of
plain SGD steps (both the trainer's jitted scan, median of several repeats);
floor: the same ratio from FLOP counts, a plain step costing 6 B sum(d m) and the
projection of a d x m kernel with a rank-k basis at least
min(2 d^2 m, 4 d k m, 2 B d^2, 4 B d k).

    python benchmarks/projection_overhead.py [--steps 3000] [--repeats 5]
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


def floor_ratio(batch):
    plain = sum(6 * batch * d * m for d, m in SIZES)
    proj = sum(min(2 * d * d * m, 4 * d * k * m, 2 * batch * d * d, 4 * batch * d * k)
               for (d, m), k in zip(SIZES, RANKS.values()))
    return (plain + proj) / plain


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
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
          f"{args.steps} steps per epoch, median of {args.repeats}")
    for batch in args.batches:
        n = batch * args.steps
        x = jax.random.normal(jax.random.key(1), (n, 784))
        y = jax.random.randint(jax.random.key(2), (n,), 0, 10)
        plain_rule = clx.chain(optax.sgd(0.01))
        gpm_rule = clx.chain(clx.gpm(0.97), optax.sgd(0.01))
        t_plain = time_epoch(model, params, plain_rule, plain_rule.init(params), x, y, batch, args.repeats)
        t_proj = time_epoch(model, params, gpm_rule, gpm_state(params, gpm_rule), x, y, batch, args.repeats)
        measured, floor = t_proj / t_plain, floor_ratio(batch)
        print(f"batch {batch}: projected/plain {measured:.2f}x, floor {floor:.2f}x, measured/floor {measured / floor:.2f}"
              f"   ({1e6 * t_plain / args.steps:.1f} vs {1e6 * t_proj / args.steps:.1f} us/step)", flush=True)


if __name__ == "__main__":
    main()
