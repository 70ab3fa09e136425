"""8 seeds in one run (vmapped, lax.map-ed or looped) against 1 seed, and against 8 seeds one after another.

The PMNIST MLP (784-100-100-10, no biases), GPM (thresholds 0.95 / 0.99 / 0.99, 300
samples) + SGD 0.01 at batch 10, on one permuted-MNIST task (the real MNIST files
from ../shared/data/mnist when present, else random data of the same shape). The
rule state carries a consolidated basis, so every step is a real projected step.

Timed: one epoch over ``--examples`` training examples with the trainer's own
train-steps programs (``clx.train.make_train_steps_fn``: one jitted ``lax.scan``
per epoch, params and rule state donated and carried from call to call), after a
warm-up call, median of ``--repeats``:

* 1 seed: ``member_axis=None``;
* 8 seeds vmapped: ``member_axis="vmap"`` (``jax.vmap`` over the member axis);
* 8 seeds lax.map: ``member_axis="map"`` (the members one after another inside one program);
* 8 seeds loop: ``member_axis="loop"`` (the 1-seed program called per member on the stacked state);
* 8 seeds one after another: the 1-seed program called 8 times.

With ``--full`` also whole runs (2 tasks, 1 epoch, compilation included): ``clx.fit``
for 1 seed against ``clx.fit_members`` for 8 with ``member_axis="auto"`` (loop on
CPU, vmap on GPU/TPU).

On 2 CPU cores shared with other jobs (JAX 0.12, real MNIST, 10,000 examples =
1,000 steps per epoch, ``--full``):

    1 seed: (to be measured) s/epoch
    8 seeds vmapped: (to be measured) s/epoch -> (to be measured)
    8 seeds lax.map: (to be measured) s/epoch -> (to be measured)
    8 seeds one after another: (to be measured) s/epoch -> (to be measured)
    whole runs (2 tasks, 1 epoch, compilation included): 1 seed (to be measured), 8 seeds (fit_members,
        member_axis auto) (to be measured) -> (to be measured)

History: with the previous trainer (vmap only, no lax.map), the same CPU setup gave
1 seed 0.911 s/epoch, 8 seeds vmapped 8.004 s (8.79x, against a target of <= 3x),
8 seeds one after another 6.945 s (7.62x); whole runs 1 seed 17.3 s, 8 seeds vmapped
92.5 s (5.35x). These are to be re-measured with this script.

On one NVIDIA H100 (JAX 0.11.2, real MNIST, ``--examples 54000 --full`` = 5,400 steps
per epoch, the MNIST files passed with ``--data-dir``; previous trainer, lax.map not
measured):

    1 seed: 0.165 s/epoch
    8 seeds vmapped: 0.310 s/epoch  -> 8 vmapped / 1 = 1.88x
    8 seeds one after another: 1.312 s/epoch  -> 8 sequential / 1 = 7.96x
    whole runs (2 tasks, 1 epoch, compilation included): 1 seed 7.4 s, 8 seeds vmapped 10.8 s -> 1.47x

Why vmap does not pay on CPU (from the previous measurement): at batch 10 one
seed's step is already a compact compiled loop (about 0.9 ms, a quarter of it the
(10 x 784) @ (784 x 784) projector product), so there is little per-step overhead
for vmapping to amortise, and XLA:CPU runs the batched products of the vmapped step
no faster than one after another (a (8, 10, 784) x (8, 784, 784) batched product
took about 10x the time of one (10, 784) x (784, 784) product on these cores). Hence
``member_axis="map"``, which ``fit_members`` picks on CPU. The whole-run ratio is
lower than the per-epoch one because one compilation replaces eight. On a GPU/TPU
the batched products fill the device.

    python benchmarks/seed_sweep.py [--examples 10000] [--repeats 3] [--full] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
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
from clx.train import fit, fit_members, make_evidence_fn, make_train_steps_fn

SHARED_MNIST = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "mnist"
)
M = 8
BATCH = 10


def rule(_hp=None):
    return clx.chain(clx.gpm((0.95, 0.99, 0.99), num_samples=300), optax.sgd(0.01))


def model(seed):
    return clx.FunctionalModel.from_module(clx.MLP(784, (100, 100), 10, use_bias=False, rngs=nnx.Rngs(seed)))


def stream(examples, data_dir=SHARED_MNIST, num_tasks=2):
    if os.path.isdir(data_dir):
        return data.make_stream(
            data.load_source("mnist", data_dir), "permuted", num_tasks, seed=0, train_subset=examples
        ), "real MNIST"
    rng = np.random.default_rng(0)
    src = data.Source(
        "random",
        rng.normal(size=(examples, 28, 28, 1)).astype(np.float32),
        rng.integers(0, 10, examples).astype(np.int32),
        rng.normal(size=(1000, 28, 28, 1)).astype(np.float32),
        rng.integers(0, 10, 1000).astype(np.int32),
        10,
    )
    return data.make_stream(src, "permuted", num_tasks, seed=0), f"random data (no MNIST files in {data_dir})"


def consolidated_state(m, params, x):
    r = rule()
    reps = make_evidence_fn(m)(params, x[:300], jnp.int32(0))
    ev = clx.Evidence(jnp.int32(0), x[:300], jnp.zeros(300, jnp.int32), reps, m.apply)
    moves, state = r.consolidate(r.init(params), params, ev)
    assert moves is None  # GPM never moves the params
    return state


def carried(program, hp, params, state, key_data, x, y, ids):
    """A no-argument call of a train-steps ``program`` (task 1, epoch 0, from batch 0) that
    carries the donated params and rule state from one call to the next, as the trainer does."""
    carry = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)]

    def call():
        p, s, loss = program(hp, carry[0], carry[1], x, y, ids, key_data, np.int32(1), np.int32(0), np.int32(0))
        jax.block_until_ready((p, s, loss))
        carry[:] = [p, s]

    return call


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
    print(
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores; {what}, "
        f"{n} examples = {nb} steps of batch {BATCH} per epoch"
    )

    built = [model(seed) for seed in range(M)]
    m = built[0][0]
    params = [p for _, p in built]
    states = [consolidated_state(m, p, x) for p in params]
    keys = [jnp.asarray(jax.random.key_data(jax.random.key(seed))) for seed in range(M)]
    stacked_p = jax.tree.map(lambda *a: jnp.stack(a), *params)
    stacked_s = jax.tree.map(lambda *a: jnp.stack(a), *states)
    stacked_k, hps = jnp.stack(keys), jnp.zeros((M,), jnp.float32)
    hp0 = jnp.zeros((), jnp.float32)

    single = make_train_steps_fn(m, rule(), BATCH)(nb)
    one = carried(single, hp0, params[0], states[0], keys[0], x, y, ids)
    seeds = [carried(single, hp0, params[i], states[i], keys[i], x, y, ids) for i in range(M)]

    def sequential():
        for f in seeds:
            f()

    members = {
        how: carried(
            make_train_steps_fn(m, rule, BATCH, member_axis=how)(nb), hps, stacked_p, stacked_s, stacked_k, x, y, ids
        )
        for how in ("vmap", "map", "loop")
    }

    t1 = timed(one, args.repeats)
    print(f"1 seed: {t1:.3f} s/epoch", flush=True)
    for how, label in (("vmap", "vmapped"), ("map", "lax.map"), ("loop", "fit_members' loop (the CPU default)")):
        t = timed(members[how], args.repeats)
        print(f"{M} seeds {label}: {t:.3f} s/epoch -> {t / t1:.2f}x", flush=True)
    ts = timed(sequential, max(1, args.repeats // 2))
    print(f"{M} seeds one after another: {ts:.3f} s/epoch -> {ts / t1:.2f}x", flush=True)

    if args.full:
        kw = {"epochs": 1, "batch_size": BATCH, "evidence_samples": 300, "progress": False}
        t = time.perf_counter()
        fit(m, jax.tree.map(jnp.copy, params[0]), rule(), s, seed=0, **kw)
        f1 = time.perf_counter() - t
        t = time.perf_counter()
        fit_members(m, params, rule, np.zeros(M), s, seeds=list(range(M)), member_axis="auto", **kw)
        fv = time.perf_counter() - t
        print(
            f"whole runs (2 tasks, 1 epoch, compilation included): 1 seed {f1:.1f} s, {M} seeds (fit_members, "
            f"member_axis auto) {fv:.1f} s -> {fv / f1:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
