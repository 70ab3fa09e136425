"""Cost of a chunked-hypernetwork train step against a plain train step of the same target.

    python benchmarks/hnet_step.py [--old-tasks 9] [--batch 128] [--repeats 20] [--layout torch|flax]

Setup: the Permuted-MNIST configuration of von Oswald et al. 2020 (experiments/
configs/pmnist_hnet.py): target MLP 784-1000-1000-100 (1,886,100 weights), chunked
hypernetwork [e (24); c (8)] -> 25 -> 25 -> 78,000 (25 chunks), Adam, beta 0.1 with
the look-ahead, ``--old-tasks`` finished tasks regularized every step (9 = the last
task of PMNIST-10, the worst case; the average over the 10 tasks is 4.5).

Printed, from one run (median of ``--repeats`` timed calls after a warm-up):

* plain: jitted grad of the target's loss + Adam step on the target's own weights;
* hnet: jitted generation of the weights + target forward/backward + backward into
  the hypernetwork + the output regularizer (look-ahead Adam step, ``--old-tasks``
  generations with their backward) + the Adam step;
* the ratio hnet / plain, and the parts (each timed alone): generation forward,
  target forward/backward with fixed weights, one regularized old task.

What dominates: with no old task the target's forward/backward (as for the plain
step) plus the split of the generated vector into the template and the concatenate
of its gradient (~40 % over a dict-params forward/backward) and two Adam updates on
2M hypernetwork weights; from the second task on, the regularizer: each old task
costs a generation forward and backward of all 1.9M target weights, about a third
of a target forward/backward at batch 128, so at 9 old tasks it is the largest part.
What was done about it: the regularizer's tasks run one at a time in a
``fori_loop`` (one batched matmul over all old tasks was 1.5-3x slower on CPU: its
(tasks x 1.9M) outputs and residuals fall out of cache); ``TargetNetwork.unflatten``
uses ``jnp.split`` (its gradient is one concatenate; slicing's is a full-size pad
per array); the rule's state (the (T, n_target) targets) is donated through the
trainer's scan, never copied; and ``num_sampled=`` (the authors'
``hnet_reg_batch_size``) bounds the per-step cost for long task sequences.
The CPU timings on a shared machine are noisy: compare ratios from one run.
The target layout (``--layout``) does not change the cost measurably: at 9 old tasks
on 2 CPU cores the hnet step took 116 ms (torch, the default) and 124 ms (flax), the
plain step 10.9 and 12.7 ms in the same two runs (ratios 10.6x and 9.8x).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clx
from clx.core import Evidence


def time_steps(step, params, state, repeats: int) -> float:
    """Median seconds of a jitted ``step(params, state) -> (params, state)`` that donates
    both (as the trainer's scan carries them: no copies of the rule state)."""
    params, state = step(params, state)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - s)
    return float(np.median(times))


def timeit(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - s)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-tasks", type=int, default=9)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--num-sampled", type=int, default=0, help=">0: regularize this many random old tasks per step")
    ap.add_argument(
        "--layout",
        choices=clx.TargetNetwork.LAYOUTS,
        default="torch",
        help="order of the generated vector (clx.TargetNetwork)",
    )
    args = ap.parse_args()
    T, k, B = 10, 10, args.batch

    make_target = lambda: clx.MLP(784, (1000, 1000), T * k, rngs=nnx.Rngs(0))
    target = clx.TargetNetwork.from_module_fn(make_target, layout=args.layout)
    hnet = clx.chunked_hypernetwork(target.num_params, 24, 78000, 8, (25, 25), "elu")
    model = clx.HyperModel(target, hnet, T, k, input_shape=(28, 28, 1))
    params = model.init(jax.random.key(0))
    opt = optax.adam(1e-4)
    rule = clx.output_regularizer(hnet, opt, beta=0.1, num_tasks=T, num_sampled=args.num_sampled or None)
    state = rule.init(params)
    ev = Evidence(jnp.int32(args.old_tasks - 1), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32), {}, None)
    if args.old_tasks > 0:
        _, state = rule.consolidate(state, params, ev)  # (moves, state); the regularizer never moves params
    tid = jnp.int32(args.old_tasks)

    x = jax.random.normal(jax.random.key(1), (B, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (B,), 0, k)

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def hnet_step(params, state):
        grads = jax.grad(lambda p: ce(model.apply(p, x, tid)))(params)
        updates, state = rule.update(grads, state, params, task_id=tid)
        return optax.apply_updates(params, updates), state

    fmodel, tparams = clx.FunctionalModel.from_module(make_target())
    popt = optax.adam(1e-4)
    pstate = popt.init(tparams)

    def plain_loss(p):
        out = fmodel.apply(p, x)
        return ce(jax.lax.dynamic_slice_in_dim(out, tid * k, k, axis=1))

    @partial(jax.jit, donate_argnums=(0, 1))
    def plain_step(p, s):
        g = jax.grad(plain_loss)(p)
        u, s = popt.update(g, s, p)
        return optax.apply_updates(p, u), s

    gen = jax.jit(lambda p: model.generate_flat(p, tid))
    flat = gen(params)
    target_fb = jax.jit(jax.grad(lambda f: ce(model._head_logits(f, x, tid))))
    one_reg = jax.jit(jax.grad(lambda th: jnp.sum(jnp.square(hnet.apply(th, params["task_emb"][0]) - flat))))

    r = args.repeats
    t_gen = timeit(gen, params, repeats=r)
    t_tfb = timeit(target_fb, flat, repeats=r)
    t_reg1 = timeit(one_reg, params["hnet"], repeats=r)
    t_plain = time_steps(plain_step, tparams, pstate, repeats=r)
    t_hnet = time_steps(hnet_step, jax.tree.map(jnp.copy, params), state, repeats=r)
    n_reg = min(args.old_tasks, args.num_sampled) if args.num_sampled else args.old_tasks
    print(
        f"devices: {jax.devices()}; batch {B}; target {target.num_params:,} weights ({args.layout} layout); "
        f"hnet {model.num_hnet_params(params):,} (compression {model.compression_ratio(params):.3f}); "
        f"{n_reg} old task(s) regularized per step"
    )
    print(f"plain step        {1e3 * t_plain:8.2f} ms")
    print(f"hnet step         {1e3 * t_hnet:8.2f} ms   ratio hnet/plain {t_hnet / t_plain:.2f}x")
    print(f"  generation fwd            {1e3 * t_gen:8.2f} ms")
    print(f"  target fwd+bwd (fixed W)  {1e3 * t_tfb:8.2f} ms")
    print(f"  one old task's reg grad   {1e3 * t_reg1:8.2f} ms  (x{n_reg} = {1e3 * n_reg * t_reg1:.2f} ms)")
    parts = {"output regularizer": n_reg * t_reg1, "target fwd+bwd": t_tfb, "generation fwd": t_gen}
    top = max(parts, key=parts.get)
    print(f"dominant: {top} ({100 * parts[top] / t_hnet:.0f}% of the hnet step by the parts' own timings)")


if __name__ == "__main__":
    main()
