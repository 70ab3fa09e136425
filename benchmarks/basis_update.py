"""Cost of GPM's basis update in clx against the authors' numpy SVD update, on the same representation matrices.

After each task GPM grows every projected layer's basis from the layer's
representation matrix R (d, n) by the energy criterion (Saha et al. 2021, Eqs. 5,
8, 9) and rebuilds the projector. Two implementations are timed on the same R:

* clx: the GPM rule's ``consolidate`` (``clx.subspace.expand`` and
  ``complement_projector`` for every layer, one jitted call; an SVD of R_hat when
  n <= d, an eigendecomposition of R_hat R_hat^T when n > d; fixed (d, d) shapes);
* numpy: the authors' ``update_GPM`` (sahagobinda/GPM, ``main_pmnist.py`` and
  ``main_cifar100.py``), re-typed: ``np.linalg.svd(R, full_matrices=False)`` and the
  cumulative energy ratio on the first task; on later tasks a second SVD of R for
  its total energy, the SVD of R_hat = R - M M^T R, the loop over the ratios and
  ``np.hstack``; then the projection matrix M M^T per layer, as their training loop
  builds it (``feature_mat``).

Both run in float32 on the CPU (or clx on the default JAX device). The matrices are
real activations: the layers' inputs (``clx.train.make_evidence_fn``) of a freshly
initialised model on standard-normal inputs, with the authors' sample counts:

* the PMNIST MLP 784-100-100-10: 300 examples per layer, R of 784 x 300 and
  100 x 300 (twice); thresholds 0.95 / 0.99 / 0.99;
* GPM's 5-layer AlexNet on 32x32x3 (``clx.models.AlexNet``): 24 / 100 / 100 / 125 /
  125 examples (the authors' ``batch_list``), im2col patches for the convs, so R is
  48 x 20,184, 576 x 14,400, 512 x 2,500, 1,024 x 125 and 2,048 x 125; threshold 0.97.

"first task" starts from an empty basis, "later task" from the basis the first
task left (the representations of a second input draw). Each time is the best of
``--repeats`` calls after a compiling call; the last columns give the ranks each
implementation reached (the authors' first-task rank is one lower by construction:
``sum(cumsum < threshold)``; clx follows Eq. 5). Helpers (``best_seconds``) come
from ``benchmarks/projection_overhead.py``.

    python benchmarks/basis_update.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from projection_overhead import best_seconds  # benchmarks/ is sys.path[0]

import clx
from clx import subspace as sub
from clx.projection import kernel_paths
from clx.projection._common import example_columns
from clx.train import make_evidence_fn

MLP_SAMPLES, MLP_THRESHOLDS = 300, (0.95, 0.99, 0.99)
ALEXNET_SAMPLES, ALEXNET_THRESHOLDS = (24, 100, 100, 125, 125), (0.97,) * 5


def authors_update(mats, thresholds, features):
    """The authors' ``update_GPM`` (first task when ``features`` is empty, else later) and their projection
    matrices ``M M^T``; returns ``(features, projections)``. ``mats``: the (d, n) float32 arrays."""
    features = list(features)
    if not features:
        for a, th in zip(mats, thresholds):
            u, s, _ = np.linalg.svd(a, full_matrices=False)
            ratio = s**2 / (s**2).sum()
            features.append(u[:, : int(np.sum(np.cumsum(ratio) < th))])
    else:
        for i, (a, th) in enumerate(zip(mats, thresholds)):
            _, s1, _ = np.linalg.svd(a, full_matrices=False)
            total = (s1**2).sum()
            hat = a - features[i] @ (features[i].T @ a)
            u, s, _ = np.linalg.svd(hat, full_matrices=False)
            ratio = s**2 / total
            acc = (total - (s**2).sum()) / total
            r = 0
            for x in ratio:
                if acc < th:
                    acc += x
                    r += 1
                else:
                    break
            if r == 0:
                continue
            stacked = np.hstack((features[i], u[:, :r]))
            features[i] = stacked[:, : stacked.shape[0]]
    return features, [f @ f.T for f in features]


def numpy_seconds(f, repeats):
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def setup(model, params, input_shape, samples, key):
    """(evidence for ``consolidate``, the per-layer (d, n) float32 matrices the authors' code gets)."""
    n = max(samples)
    x = jax.random.normal(key, (n, *input_shape), jnp.float32)
    reps = make_evidence_fn(model)(params, x, jnp.int32(0))
    paths = [p for p, _ in kernel_paths(params)]
    mats = [np.asarray(example_columns(reps[p], n, s, who="bench", path=p)) for p, s in zip(paths, samples)]
    ev = clx.Evidence(jnp.int32(0), x, jnp.zeros((n,), jnp.int32), reps, model.apply)
    return ev, mats


def compare(name, model, params, input_shape, samples, thresholds, repeats):
    rule = clx.gpm(thresholds, num_samples=samples)
    consolidate = jax.jit(rule.consolidate)
    ev0, mats0 = setup(model, params, input_shape, samples, jax.random.key(1))
    ev1, mats1 = setup(model, params, input_shape, samples, jax.random.key(2))
    state0 = rule.init(params)
    _, state1 = consolidate(state0, params, ev0)
    feats1, _ = authors_update(mats0, thresholds, [])
    shapes = " ".join(f"{m.shape[0]}x{m.shape[1]}" for m in mats0)
    print(f"{name}: R per layer {shapes}", flush=True)
    for label, state, ev, mats, feats in (
        ("first task", state0, ev0, mats0, []),
        ("later task", state1, ev1, mats1, feats1),
    ):
        t_clx = best_seconds(consolidate, state, params, ev, repeats=repeats)
        t_np = numpy_seconds(lambda: authors_update(mats, thresholds, feats), repeats)  # noqa: B023
        ranks_clx = [int(sub.rank(s)) for s in consolidate(state, params, ev)[1].subspaces.values()]
        ranks_np = [f.shape[1] for f in authors_update(mats, thresholds, feats)[0]]
        print(
            f"  {label}: clx {1e3 * t_clx:.1f} ms, numpy {1e3 * t_np:.1f} ms, numpy/clx {t_np / t_clx:.2f}x | "
            f"ranks clx {ranks_clx}, numpy {ranks_np}",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, best of {args.repeats}",
        flush=True,
    )
    mlp, mlp_params = clx.FunctionalModel.from_module(clx.MLP(784, (100, 100), 10, use_bias=False, rngs=nnx.Rngs(0)))
    compare("PMNIST MLP", mlp, mlp_params, (784,), (MLP_SAMPLES,) * 3, MLP_THRESHOLDS, args.repeats)
    alex, alex_params = clx.FunctionalModel.from_module(clx.models.AlexNet((32, 32, 3), 10, 10, rngs=nnx.Rngs(0)))
    compare("GPM AlexNet", alex, alex_params, (32, 32, 3), ALEXNET_SAMPLES, ALEXNET_THRESHOLDS, args.repeats)


if __name__ == "__main__":
    main()
