"""8 seeds as one vmapped program against 1 seed, and against 8 seeds one after another.

The PMNIST MLP (784-100-100-10, no biases), GPM (thresholds 0.95 / 0.99 / 0.99, 300
samples) + SGD 0.01 at batch 10, on one permuted-MNIST task (the real MNIST files
from ../shared/data/mnist when present, else random data of the same shape). The
rule state carries a consolidated basis, so every step is a real projected step.

Timed: one epoch over ``--examples`` training examples with the trainer's own
chunk program (``clx.train``: one jitted ``lax.scan`` per epoch; ``jax.vmap`` over
the member axis for the vmapped case), after a warm-up call, median of
``--repeats``. Measured on 2 CPU cores shared with other jobs (JAX 0.12, real MNIST,
10,000 examples = 1,000 steps per epoch, ``--full``):

    1 seed: 0.911 s/epoch
    8 seeds vmapped: 8.004 s/epoch  -> 8 vmapped / 1 = 8.79x   (target <= 3x)
    8 seeds one after another: 6.945 s/epoch  -> 8 sequential / 1 = 7.62x
    whole runs (2 tasks, 1 epoch, compilation included): 1 seed 17.3 s, 8 seeds vmapped 92.5 s -> 5.35x

On one NVIDIA H100 (JAX 0.11.2, real MNIST, ``--examples 54000 --full`` = 5,400 steps
per epoch, the MNIST files passed with ``--data-dir``):

    1 seed: 0.165 s/epoch
    8 seeds vmapped: 0.310 s/epoch  -> 8 vmapped / 1 = 1.88x
    8 seeds one after another: 1.312 s/epoch  -> 8 sequential / 1 = 7.96x
    whole runs (2 tasks, 1 epoch, compilation included): 1 seed 7.4 s, 8 seeds vmapped 10.8 s -> 1.47x

The target is not met on CPU. At batch 10 one seed's step is already a compact
compiled loop (about 0.9 ms, a quarter of it the (10 x 784) @ (784 x 784) projector
product), so there is little per-step overhead for vmapping to amortise, and XLA:CPU
runs the batched products of the vmapped step no faster than one after another
(a (8, 10, 784) x (8, 784, 784) batched product takes about 10x the time of one
(10, 784) x (784, 784) product on these cores). The whole-run ratio is lower because
one compilation replaces eight. On a GPU/TPU the batched products fill the device.

    python benchmarks/seed_sweep.py [--examples 10000] [--repeats 3] [--full] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clx
from clx import data
from clx.train import _chunk_fn, fit, fit_members, make_evidence_fn

SHARED_MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "mnist")
M = 8
BATCH = 10


def rule(_hp=None):
    return clx.chain(clx.gpm((0.95, 0.99, 0.99), num_samples=300), optax.sgd(0.01))


def model(seed):
    return clx.FunctionalModel.from_module(clx.MLP(784, (100, 100), 10, use_bias=False, rngs=nnx.Rngs(seed)))


def stream(examples, data_dir=SHARED_MNIST, num_tasks=2):
    if os.path.isdir(data_dir):
        return data.make_stream(data.load_source("mnist", data_dir), "permuted", num_tasks, seed=0,
                                train_subset=examples), "real MNIST"
    rng = np.random.default_rng(0)
    src = data.Source("random", rng.normal(size=(examples, 28, 28, 1)).astype(np.float32),
                      rng.integers(0, 10, examples).astype(np.int32),
                      rng.normal(size=(1000, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 1000).astype(np.int32), 10)
    return data.make_stream(src, "permuted", num_tasks, seed=0), f"random data (no MNIST files in {data_dir})"


def consolidated_state(m, params, x):
    r = rule()
    reps = make_evidence_fn(m)(params, x[:300], jnp.int32(0))
    return r.consolidate(r.init(params), params, clx.Evidence(jnp.int32(0), x[:300], jnp.zeros(300, jnp.int32), reps, m.apply))


def timed(f, repeats):
    f()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also time whole fit / fit_members runs (2 tasks, 1 epoch)")
    ap.add_argument("--data-dir", default=SHARED_MNIST, help="MNIST IDX files (default ../shared/data/mnist)")
    args = ap.parse_args()

    s, what = stream(args.examples, args.data_dir)
    task = s.task(0)
    x = jnp.asarray(task.x_train)
    y, ids = jnp.asarray(task.y_train), jnp.zeros(len(task.y_train), jnp.int32)
    n = len(task.y_train)
    nb = -(-n // BATCH)
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores; {what}, "
          f"{n} examples = {nb} steps of batch {BATCH} per epoch")

    built = [model(seed) for seed in range(M)]
    m = built[0][0]
    params = [p for _, p in built]
    states = [consolidated_state(m, p, x) for p in params]
    keys = [np.asarray(jax.random.key_data(jax.random.key(seed))) for seed in range(M)]
    chunk = functools.partial(_chunk_fn(m, rule, BATCH, True), num_steps=nb)
    single = jax.jit(chunk)
    vmapped = jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None, None, None, 0, None, None)))
    hp0 = jnp.zeros((), jnp.float32)
    stacked_p = jax.tree.map(lambda *a: jnp.stack(a), *params)
    stacked_s = jax.tree.map(lambda *a: jnp.stack(a), *states)
    stacked_k, hps = jnp.asarray(np.stack(keys)), jnp.zeros((M,), jnp.float32)

    def one(i=0):
        jax.block_until_ready(single(hp0, params[i], states[i], x, y, ids, keys[i], 1000, 0))

    def sequential():
        for i in range(M):
            one(i)

    def all_at_once():
        jax.block_until_ready(vmapped(hps, stacked_p, stacked_s, x, y, ids, stacked_k, 1000, 0))

    t1 = timed(one, args.repeats)
    tv = timed(all_at_once, args.repeats)
    ts = timed(sequential, max(1, args.repeats // 2))
    print(f"1 seed: {t1:.3f} s/epoch")
    print(f"{M} seeds vmapped: {tv:.3f} s/epoch  -> {M} vmapped / 1 = {tv / t1:.2f}x   (target <= 3x)")
    print(f"{M} seeds one after another: {ts:.3f} s/epoch  -> {M} sequential / 1 = {ts / t1:.2f}x")

    if args.full:
        kw = dict(epochs=1, batch_size=BATCH, evidence_samples=300, progress=False)
        t = time.perf_counter()
        fit(m, jax.tree.map(jnp.copy, params[0]), rule(), s, seed=0, **kw)
        f1 = time.perf_counter() - t
        t = time.perf_counter()
        fit_members(m, params, rule, np.zeros(M), s, seeds=list(range(M)), **kw)
        fv = time.perf_counter() - t
        print(f"whole runs (2 tasks, 1 epoch, compilation included): 1 seed {f1:.1f} s, {M} seeds vmapped {fv:.1f} s "
              f"-> {fv / f1:.2f}x")


if __name__ == "__main__":
    main()
