"""An 8-point hyperparameter grid x 3 seeds as one sweep against 24 separate runs, measured in one run.

What ``experiments.tune``'s tuning phase does (``config.sweep``: the 24 members of one
``clx.fit_members`` run, one set of compiled programs) against what a user without it
does: 24 runs, each ``clx.fit`` with its own rule (concrete value), its own model and
its own compilation. Both sides build their rules, models and stream through the
experiment code (``experiments.run.prepare``, the method's registry entry), train on the
same Permuted stream with the same options, and their accuracy matrices are compared
(the sweep's members trace the value, the separate runs take it as a constant, so a
small difference is possible; it is printed). The separate runs are in this process:
24 processes would each also pay an interpreter start and the imports (a few seconds
each), which is not counted here.

Defaults: permuted sklearn digits (``configs/digits_default.py``: MLP 64-100-100-10, SGD
0.05, batch 10), 2 tasks x 1 epoch, GPM with one threshold for every layer over
0.90 ... 0.99 (8 values), seeds 0, 1, 2. ``--method ewc`` sweeps ``ewc.lam`` over
1 ... 1000 instead. ``--mnist``: real MNIST from ../shared/data/mnist
(``configs/pmnist_gpm.py``: MLP 784-100-100-10, SGD 0.01, batch 10), ``--train-subset``
examples per task.

``member_axis`` "auto" is "loop" on a CPU (``clx.fit_members``: the one-member programs,
compiled once, called once per member, since XLA:CPU runs vmapped members no faster
than one after another) and "vmap" on a GPU. So on a CPU the sweep's win is the
compilation and setup paid once instead of 24 times, and it shrinks as the training
grows; on a GPU the members also run side by side.

    python benchmarks/tune_sweep.py [--method gpm|ewc] [--tasks 3] [--epochs 1] [--mnist] \
        [--train-subset 10000] [--member-axis auto]

Measured with the defaults on 2 CPU cores shared with other jobs (load average about 10,
hence wall time 2.6x the CPU time; JAX 0.12, GPM, 2 permuted-digits tasks x 1 epoch of
144 steps):

    sweep: one fit_members run of 24 members (member_axis=loop): 36.9 s wall, 14.3 s CPU
    separate: 24 fit runs one after another: 270.4 s wall, 105.0 s CPU (wall per run: first 13.2 s,
        median 11.1 s, last 13.7 s)
    ratio separate / sweep: 7.34x wall, 7.35x CPU time
    largest accuracy difference between a sweep member and its separate run: 0.00e+00

A second run, at a load average of about 7: 29.8 s wall / 15.1 s CPU against 191.7 s /
100.3 s, 6.42x wall, 6.62x CPU time, accuracies again identical; the script took 3.9 min
wall, 2.0 min of CPU time.
With 3 tasks (``--tasks 3``) on the same loaded machine: 59.8 s against 313.9 s wall, 5.25x.
The whole default script took 5.5 min wall, 2.1 min of CPU time.

``--mnist`` (real MNIST, 10,000 examples per task = 1,000 steps, 2 tasks x 1 epoch; the load
average fell from about 14 during the sweep to about 5 during the separate runs, so the
wall ratio understates the win and the CPU-time ratio is the one to read):

    sweep: one fit_members run of 24 members (member_axis=loop): 362.4 s wall, 90.3 s CPU
    separate: 24 fit runs one after another: 444.5 s wall, 193.3 s CPU (wall per run: first 36.4 s,
        median 14.2 s, last 10.0 s)
    ratio separate / sweep: 1.23x wall, 2.14x CPU time
    largest accuracy difference between a sweep member and its separate run: 0.00e+00

The more steps per member, the smaller the CPU win (the compilation saved is a fixed
cost per run); on a GPU ``fit_members`` vmaps the members (``benchmarks/seed_sweep.py``:
8 seeds in 1.88x one seed's epoch time on an H100), which this script has not been run on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from clx.train import fit, fit_members

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/ is not installed
from experiments.configs import digits_default, pmnist_gpm  # noqa: E402
from experiments.run import prepare  # noqa: E402

GRIDS = {
    "gpm": ("gpm.threshold", (0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)),
    "ewc": ("ewc.lam", (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)),
}
SEEDS = (0, 1, 2)


def _config(args):
    c = pmnist_gpm.get_config() if args.mnist else digits_default.get_config()
    key, grid = GRIDS[args.method]
    c.method = args.method
    c.stream.num_tasks = args.tasks
    c.train.epochs = args.epochs
    if args.mnist:
        c.stream.train_subset = args.train_subset
    c.seeds = SEEDS
    c.sweep.key, c.sweep.grid = key, grid
    c.progress = False
    c.checkpoint.enabled = False
    c.mesh.enabled = "off"
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=sorted(GRIDS), default="gpm")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--mnist", action="store_true", help="real MNIST from ../shared/data/mnist (configs/base.py)")
    ap.add_argument("--train-subset", type=int, default=10000, help="--mnist: training examples per task")
    ap.add_argument("--member-axis", default="auto", choices=("auto", "vmap", "map", "loop"))
    args = ap.parse_args()

    config = _config(args)
    plan = prepare(config)  # the checks, the stream, every grid value's rule built once
    (method,) = plan.methods
    model, _ = plan.first[method.name]
    stream, members = plan.stream, plan.members
    key = config.sweep.key
    common = dict(
        epochs=config.train.epochs,
        batch_size=config.train.batch_size,
        evidence_samples=int(method.evidence_samples(config)),
        cumulative=method.cumulative,
        eval_batch_size=config.train.eval_batch_size,
        progress=False,
        evaluate=config.eval.tasks,
    )
    axis = args.member_axis
    if axis == "auto":
        axis = "loop" if jax.default_backend() == "cpu" else "vmap"
    steps = -(-len(stream.task(0).y_train) // config.train.batch_size)
    print(
        f"{jax.devices()[0].device_kind} x{jax.device_count()}; {config.data.source} permuted, "
        f"{stream.num_tasks} tasks x {config.train.epochs} epoch(s) of {steps} steps "
        f"(batch {config.train.batch_size}); {method.name} {key} x {len(config.sweep.grid)} values "
        f"x {len(SEEDS)} seeds = {len(members)} members",
        flush=True,
    )

    t, c = time.perf_counter(), time.process_time()
    params = [method.build_model(config, stream, s)[1] for s, _ in members]
    swept = fit_members(
        model,
        params,
        lambda hp: method.make_rule(config, model, hp),
        [v for _, v in members],
        stream,
        seeds=[s for s, _ in members],
        member_axis=args.member_axis,
        **common,
    )
    jax.block_until_ready(swept.params)
    sweep, sweep_cpu = time.perf_counter() - t, time.process_time() - c
    print(
        f"sweep: one fit_members run of {len(members)} members (member_axis={axis}): {sweep:.1f} s wall, "
        f"{sweep_cpu:.1f} s CPU",
        flush=True,
    )

    t, c = time.perf_counter(), time.process_time()
    each, accs = [], []
    for s, v in members:
        t1 = time.perf_counter()
        m, p = method.build_model(config, stream, s)
        r = fit(m, p, method.make_rule(config, m, v), stream, seed=s, **common)
        jax.block_until_ready(r.params)
        each.append(time.perf_counter() - t1)
        accs.append(r.accuracy_matrix)
    separate, separate_cpu = time.perf_counter() - t, time.process_time() - c
    print(
        f"separate: {len(members)} fit runs one after another: {separate:.1f} s wall, {separate_cpu:.1f} s CPU "
        f"(wall per run: first {each[0]:.1f} s, median {np.median(each):.1f} s, last {each[-1]:.1f} s)",
        flush=True,
    )
    print(
        f"ratio separate / sweep: {separate / sweep:.2f}x wall, {separate_cpu / sweep_cpu:.2f}x CPU time",
        flush=True,
    )
    a, b = np.asarray(swept.accuracy_matrix), np.stack(accs)  # NaN: a task not yet seen (evaluate="current")
    same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))
    diff = float(np.nanmax(np.abs(a - b))) if not np.all(np.isnan(a)) else 0.0
    print(
        f"largest accuracy difference between a sweep member and its separate run: {diff:.2e}"
        + ("" if same_nan else " (and the scored entries differ)"),
        flush=True,
    )


if __name__ == "__main__":
    main()
