"""The cost of continual evaluation: GPM's Permuted-MNIST run with and without ``eval.every_steps``.

De Lange et al. 2023's continual evaluation scores every seen task on a fixed test subsample every
k optimizer steps; clx does it inside the jitted epoch (a ``lax.cond`` in the scan). This script runs
GPM's published Permuted-MNIST setup (``experiments/configs/pmnist_gpm.py``: MLP 784-100-100-10,
SGD 0.01, batch 10, 54,000 images per task; only GPM, no checkpoints) once without continual
evaluation and, for each subsample size, once with it every ``--every`` steps, in interleaved rounds,
and prints each run's training seconds (the jitted epochs, which hold the evaluations) and the
overhead against the run without, e.g.

    off:              train 41.2 s
    every 100, n=1000: train 47.0 s = +14.1 % (3000 evaluations, 16500 task scores)

(illustrative numbers, not a measurement). Real MNIST from ../shared/data/mnist when it is there,
else through TFDS.

    python benchmarks/continual_eval.py [--tasks 10] [--epochs 1] [--every 100] [--samples 1000,200] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import run  # noqa: E402 -- the repository root is sys.path[0]
from experiments.configs import pmnist_gpm  # noqa: E402


def config(tasks: int, epochs: int, every: int, samples: int):
    c = pmnist_gpm.get_config()
    c.method = "gpm"
    c.stream.num_tasks = tasks
    c.train.epochs = epochs
    c.checkpoint.enabled = False
    c.progress = False
    c.eval.every_steps = every
    c.eval.samples = samples
    return c


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task (the published setup: 5)")
    parser.add_argument("--every", type=int, default=100, help="eval.every_steps")
    parser.add_argument("--samples", default="200,1000", help="comma-separated eval.samples to time")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (the median is printed)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.samples.split(",")]
    variants = [("off", None, 200)] + [(f"every {args.every}, n={n}", args.every, n) for n in sizes]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, every, n in variants:
                out = run.run(config(args.tasks, args.epochs, every, n), os.path.join(tmp, f"{r}_{every or 0}_{n}"))
                results[name] = out["gpm"]
                times[name].append(out["gpm"]["train_seconds"])
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print(f"GPM Permuted MNIST, {args.tasks} tasks x {args.epochs} epoch(s), batch 10; ACC of the last round:")
    for name, every, n in variants:
        line = f"{name:>20}: train {med[name]:.1f} s (rounds {', '.join(f'{t:.1f}' for t in times[name])})"
        res = results[name]
        line += f", ACC {100 * res['acc']:.2f} %"
        if every:
            ce = res["continual_eval"]
            scores = int(sum(t + 1 for t in ce["task"]))
            line += f" = {100 * (med[name] / med['off'] - 1):+.1f} % ({len(ce['task'])} evaluations, {scores} task "
            line += f"scores); min-ACC {100 * res['min_acc']:.2f} %, WC-ACC {100 * res['wc_acc']:.2f} %"
        print(line, flush=True)


if __name__ == "__main__":
    main()
