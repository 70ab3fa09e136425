"""Cost of one OPCM merge step against the same SVDs done by NumPy.

OPCM (``clx.merging.opcm``) spends a merge step on one SVD per projected (2-D) weight
plus a few products and two norms over the whole tree. This script measures, in one run:

* ``opcm step``: one jitted ``merge_next`` after the first model (so the SVD branch
  runs), after a warm-up call, ``block_until_ready``, best of ``--repeats``;
* ``numpy svd``: ``numpy.linalg.svd(S, full_matrices=False)`` of the same merged task
  vectors S, one per projected weight, best of ``--repeats`` (the floor of a NumPy/PyTorch-
  style implementation that does the SVDs on the host; FusionBench's OPCM uses
  ``torch.linalg.svd`` with full matrices);
* ``jax svd``: the same SVDs as one jitted ``jnp.linalg.svd`` program, to split the step
  into its SVDs and the rest;
* ``gram svd``: the same SVDs through the Gram matrix (``clx.subspace.gram_svd``, one
  device here), and the OPCM step with ``svd="gram"``;

and prints the ratios step/numpy and jax-svd/numpy, for

* ``vit-tiny``: 4 blocks of a ViT-like stack, each an attention projection 64x64, an MLP
  64x256 and 256x64, with biases (12 projected weights, 196,608 + biases params);
* ``1024``: one 1024x1024 linear weight with its bias;
* ``4096``: one 4096x4096 weight, only with ``--big`` (slow on a laptop-class CPU).

It also times one SVD-split fine-tuning step (``clx.projection.svd_split`` owning Adam:
project the gradient, Adam, project the step, on every attention and MLP matrix) against
the plain Adam step, both jitted with the ViT's forward and backward, on the pretrained
ViT's shape (``clx.models.ViT`` 28x28x1, patch 7, dim 64, depth 4, MLP 128; batch 32),
and prints ``svd_split step / plain step`` (issue 13's "Speed").

    python benchmarks/merging.py [--repeats 5] [--big]

On a shared or small CPU machine run both sides on one thread each, or BLAS and XLA
thread pools oversubscribe the cores and the NumPy side is slowed most (on a loaded
2-core box a 64x256 NumPy SVD took 20-1000 ms with OpenBLAS threads, 2 ms on one):

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    PYTHONPATH=. python benchmarks/merging.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import clx
import clx.merging as merging
from clx.subspace import gram_svd


def vit_tiny(rng, scale=1.0):
    def w(*shape):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    return {f"block{i}": {"attn": {"kernel": w(64, 64), "bias": w(64)},
                          "fc1": {"kernel": w(64, 256), "bias": w(256)},
                          "fc2": {"kernel": w(256, 64), "bias": w(64)}} for i in range(4)}  # fmt: skip


def one_layer(n):
    def make(rng, scale=1.0):
        return {"kernel": jnp.asarray(scale * rng.standard_normal((n, n)), jnp.float32),
                "bias": jnp.asarray(scale * rng.standard_normal(n), jnp.float32)}  # fmt: skip

    return make


def best(f, repeats):
    jax.block_until_ready(f())  # warm-up (compiles a jitted f)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(name, make, repeats):
    rng = np.random.default_rng(0)
    pre = make(rng)
    first = jax.tree.map(lambda p, d: p + d, pre, make(rng, 0.01))
    second = jax.tree.map(lambda p, d: p + d, pre, make(rng, 0.01))
    merger = merging.opcm(alpha=0.5)
    step = jax.jit(merger.merge_next)
    state = step(merger.init(pre), first)  # count 1: the next call takes the SVD branch
    t_step = best(lambda: step(state, second), repeats)

    mats = [s for s in jax.tree.leaves(state.sum_tv) if s.ndim == 2]
    host = [np.asarray(s) for s in mats]
    t_numpy = best(lambda: [np.linalg.svd(s, full_matrices=False) for s in host], repeats)
    jax_svds = jax.jit(lambda ms: [jnp.linalg.svd(s, full_matrices=False) for s in ms])
    t_jax = best(lambda: jax_svds(mats), repeats)
    gram_svds = jax.jit(lambda ms: [gram_svd(s) for s in ms])
    t_gram = best(lambda: gram_svds(mats), repeats)
    gram_step = jax.jit(merging.opcm(alpha=0.5, svd="gram").merge_next)
    t_gram_step = best(lambda: gram_step(state, second), repeats)
    shapes = sorted({tuple(s.shape) for s in mats})
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pre))
    print(
        f"{name}: {len(mats)} SVDs of {shapes}, {params:,} params | opcm step {1e3 * t_step:.2f} ms, "
        f"numpy svd {1e3 * t_numpy:.2f} ms, jax svd {1e3 * t_jax:.2f} ms | step/numpy {t_step / t_numpy:.2f}x, "
        f"jax svd/numpy {t_jax / t_numpy:.2f}x, step/jax svd {t_step / t_jax:.2f}x",
        flush=True,
    )
    print(
        f"{name} gram: gram svd {1e3 * t_gram:.2f} ms ({t_gram / t_jax:.2f}x jax svd), "
        f"opcm step with svd='gram' {1e3 * t_gram_step:.2f} ms ({t_gram_step / t_step:.2f}x the full-SVD step)",
        flush=True,
    )


def measure_svd_split(repeats, batch=32):
    """One jitted fine-tuning step of the MNIST ViT: Adam vs SVD-split owning Adam (24 split matrices)."""
    import optax
    from flax import nnx

    vit = clx.models.ViT((28, 28, 1), 10, patch_size=7, dim=64, depth=4, attention_heads=4, mlp_dim=128,
                         rngs=nnx.Rngs(0))  # fmt: skip
    model, params = clx.FunctionalModel.from_module(vit)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    split = [f"blocks/{i}/{n}/kernel" for i in range(4) for n in ("attn/query", "attn/key", "attn/value", "attn/out",
                                                                    "fc1", "fc2")]  # fmt: skip
    rules = {
        "plain": clx.chain(optax.adam(1e-4)),
        "svd_split": clx.chain(clx.projection.svd_split(0.25, layers=split, optimizer=optax.adam(1e-4))),
    }
    steps = {}
    for name, rule in rules.items():

        @jax.jit
        def step(p, s, rule=rule):
            def loss(p):
                return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

            g = jax.grad(loss)(p)
            u, s = rule.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = rule.init(params)
        jax.block_until_ready(step(params, state))  # compile
        steps[name] = (step, state)
    times = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so a load change on a shared machine hits both sides alike
        for name, (step, state) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, state))
            times[name].append(time.perf_counter() - t0)
    times = {name: min(t) for name, t in times.items()}
    print(
        f"svd_split on the MNIST ViT (batch {batch}, {len(split)} split matrices 64x64 / 64x128 / 128x64): plain Adam "
        f"step {1e3 * times['plain']:.2f} ms, svd_split step {1e3 * times['svd_split']:.2f} ms | "
        f"svd_split/plain {times['svd_split'] / times['plain']:.2f}x",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big", action="store_true", help="also one 4096x4096 layer")
    args = ap.parse_args()
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), numpy {np.__version__}, "
        f"best of {args.repeats} after a warm-up",
        flush=True,
    )
    measure_svd_split(max(args.repeats, 20))
    measure("vit-tiny", vit_tiny, args.repeats)
    measure("1024", one_layer(1024), args.repeats)
    if args.big:
        measure("4096", one_layer(4096), max(1, args.repeats // 2))


if __name__ == "__main__":
    main()
