"""The loss-of-plasticity papers' PyTorch code against clx: seconds per task for the same work.

Measured on 2 CPU cores shared with a training job (three clx training processes were running;
load average 5-6), clx at commit 164062a (jax 0.12.0.1, CPU), torch 2.13.0+cpu
with 1 thread, the authors' code at the commits below, 2026-12-07, the default arguments
(3 rounds, case (b) timed on 1,000 steps); the run's lines, re-wrapped into the format the script
prints now (the numbers as measured):

    jax 0.12.0.1 on cpu, torch 2.13.0+cpu (set_num_threads 1), MNIST; 2 CPU cores;
      median of 3 interleaved rounds after warm-up
    backprop, 784-100-100-10, batch 16: clx 0.145 s/task, PyTorch (lop) 0.485 s/task -> clx 3.4x faster
        per step: clx 232 us, torch 776 us
        rounds (s/task): clx 0.145, 0.183, 0.115; torch 1t 0.485, 0.741, 0.482
        last-round mean training loss: clx 0.349, torch 0.278
    cbp, 784-100-100-10, batch 16: clx 0.167 s/task, PyTorch (lop) 0.869 s/task -> clx 5.2x faster
        per step: clx 268 us, torch 1390 us
        rounds (s/task): clx 0.167, 0.254, 0.161; torch 1t 0.869, 1.33, 0.78
        last-round mean training loss: clx 0.340, torch 0.282
    backprop, 784-2000-2000-2000-10, batch 1: clx 644 s/task, PyTorch (lop) 1.16e+03 s/task -> clx 1.8x faster
        per step: clx 10740 us, torch 19330 us; s/task = 60 x 1000 timed steps
        rounds (s/task): clx 644, 681, 605; torch 1t 1.23e+03, 1.16e+03, 1.06e+03
        last-round mean training loss: clx 0.493, torch 0.104
    cbp, 784-2000-2000-2000-10, batch 1: clx 3.18e+03 s/task, PyTorch (lop) 3.15e+03 s/task -> clx 1.0x slower
        per step: clx 52931 us, torch 52507 us; s/task = 60 x 1000 timed steps
        rounds (s/task): clx 3.18e+03, 3.31e+03, 3.05e+03; torch 1t 3.98e+03, 2.28e+03, 3.15e+03
        last-round mean training loss: clx 0.426, torch 0.099
    sgd, 784-300-150-10, batch 1: clx 0.195 s/task, PyTorch (upgd) 3.73 s/task -> clx 19.1x faster
        per step: clx 78 us, torch 1491 us
        rounds (s/task): clx 0.267, 0.148, 0.195; torch 1t 3.73, 2.58, 4.05
        last-round mean training loss: clx 0.129, torch 0.173
    upgd, 784-300-150-10, batch 1: clx 12.4 s/task, PyTorch (upgd) 11.7 s/task -> clx 1.1x slower
        per step: clx 4957 us, torch 4684 us
        rounds (s/task): clx 12.6, 10.2, 12.4; torch 1t 14, 9.32, 11.7
        last-round mean training loss: clx 0.265, torch 0.309

Reading it: at clx's own shape (a) clx is 3.4x (backprop) and 5.2x (CBP) faster per task than the
authors' PyTorch learners, and 19x faster than UPGD's SGD loop at batch 1 (c): there PyTorch's
per-step Python and dispatch overhead (about 0.8-1.5 ms a step) dominates and clx's one jitted scan
has none. Where the per-step arithmetic dominates the two meet. Dohare's 784-2000-2000-2000-10 at
batch 1 (b) is memory-bound matrix-vector work (38 MB of weights read and written every step): clx
is 1.8x faster with backprop (one 60,000-step task ~11 min against ~19 min) and even with CBP
(about 53 ms a step on both sides, ~53 min a task); clx's CBP costs 4.9x its own backprop at this
width, lop's 2.7x, so clx's CBP step had room to shrink there (since commit 1ccc4fd the resets are
written outside CBP's ``lax.cond``: in a separate run of 200-step calls at this width, CBP went from
3.16x to 2.28x clx's SGD step). Case (b) rerun after it (``--cases b --rounds 2 --big-steps 500``, the
same loaded cores):

    backprop, 784-2000-2000-2000-10, batch 1: clx 618 s/task, PyTorch (lop) 1.24e+03 s/task -> clx 2.0x faster
        per step: clx 10301 us, torch 20717 us; s/task = 120 x 500 timed steps
    cbp, 784-2000-2000-2000-10, batch 1: clx 1.79e+03 s/task, PyTorch (lop) 2.5e+03 s/task -> clx 1.4x faster
        per step: clx 29803 us, torch 41749 us; s/task = 120 x 500 timed steps

so clx's CBP is now 2.9x its backprop there, lop's 2.0x. UPGD (c) is about even (clx 1.1x
slower, about 5 ms a step on both sides): drawing a fresh normal for each of the 280k weights every
step dominates (clx's UPGD step is 64x its SGD step, torch's 3.1x, its SGD step being mostly overhead).

What is compared (the same layer sizes, batch, number of steps, optimizer and hyperparameters on
both sides; data pre-made in memory on both sides, so loading is excluded):

(a) clx's ``pmnist_plasticity`` shape: MLP 784-100-100-10 with biases, ReLU, batch 16, 625 steps
    (one task: 10,000 images seen once), SGD 0.01; backprop, and continual backprop with replacement
    rate 1e-4, decay 0.99, maturity 100 and the paper's contribution utility (Eq. 1; what clx's
    config runs).
(b) Dohare et al.'s own Online Permuted MNIST shape: MLP 784-2000-2000-2000-10, batch 1, SGD 0.003
    (``lop/permuted_mnist/cfg/bp/std_net.json``, ``cfg/cbp.json``: rate 1e-4, decay 0.99, maturity
    100, ``util_type`` "adaptable_contribution", ``accumulate`` true). A task there is 60,000 images
    = 60,000 steps; ``--big-steps`` (2,000) steps are timed and the time is scaled by
    60,000 / big-steps (the line says "extrapolated").
(c) Elsayed & Mahmood's label-permuted shape: MLP 784-300-150-10 (their ``FullyConnectedReLU``,
    10 outputs here as in clx's label-permuted MNIST, 47 in their EMNIST), batch 1, 2,500 steps
    (one label permutation), plain SGD 0.01 and first-order global UPGD (lr 0.01, beta_utility
    0.999, sigma 1e-3, weight decay 1e-3: clx's defaults, inside their grids' ranges except sigma,
    which costs the same at any value).

PyTorch side (``--worker``, run by ``--torch-python``, ``torch.set_num_threads(T)`` for each T of
``--torch-threads``, default 1): the authors' own classes, imported from their source trees by ``sys.path``:

- github shibhansh/loss-of-plasticity at 63c35f3 (Dohare et al. 2024, Nature, "Loss of
  plasticity in deep continual learning"): ``lop.nets.deep_ffnn.DeepFFNN`` with
  ``lop.algos.bp.Backprop`` / ``lop.algos.cbp.ContinualBackprop`` built with the arguments of
  ``lop/permuted_mnist/online_expr.py`` and called as there, ``learner.learn(x=batch_x,
  target=batch_y)`` on slices of the pre-permuted tensors. ContinualBackprop's generate-and-test
  (``lop/algos/gnt.py``) runs after every step in Python (utility update, ``torch.where`` and
  ``topk`` per layer); clx runs the same per-step work inside the jitted scan.
- github mohmdelsayed/upgd at b75e90a (Elsayed & Mahmood 2024, ICLR, "Addressing Loss of
  Plasticity and Catastrophic Forgetting in Continual Learning"):
  ``core.learner.weight_upgd.FirstOrderGlobalUPGDLearner`` and ``core.learner.sgd.SGDLearner``
  on ``core.network.fcn_relu.FullyConnectedReLU``, stepped as ``core/run/run.py``'s loop does
  (``zero_grad``, ``learner.predict``, ``CrossEntropyLoss``, ``backward``, ``optimizer.step``).
  Their learner module imports ``backpack`` and ``HesScale`` (used only by the second-order
  learners); the worker puts empty stand-ins for them in ``sys.modules`` instead of installing them.

What the torch side leaves out of the authors' loops (so PyTorch is timed at its fastest): the
per-step online-accuracy logging (``online_expr.py``: softmax + accuracy per step; ``run.py``:
``loss.item()`` and an accuracy ``.item()`` per step, two host syncs).

clx side: ``clx.train.make_train_steps_fn(model, rule, batch)`` (the trainer's own program: one
jitted ``lax.scan`` over the steps of a call; params and rule state carried from call to call) on
``clx.MLP`` (PyTorch's init, biases) with ``clx.chain(optax.sgd(lr))``,
``clx.plasticity.cbp(optax.sgd(lr), 1e-4, 0.99, 100, utility=...)`` and
``clx.plasticity.upgd(0.01, beta_utility=0.999, sigma=1e-3, weight_decay=1e-3)``. Differences in
the work itself: clx reads each batch through the epoch's shuffled order (a gather of ``batch``
rows per step), the authors' loops slice consecutive rows; clx's CBP differs from gnt.py where the
``clx.plasticity.cbp`` docstring says (bias absorption, the keyed draws): the same amount of work.
The networks start from different random weights: ``DeepFFNN`` draws Kaiming-uniform weights
(bound sqrt(6 / fan_in)), ``clx.MLP`` and ``FullyConnectedReLU`` PyTorch's ``Linear`` default
(bound 1 / sqrt(fan_in)); so the losses printed (a sanity check that both sides train) differ in (b).

Threads: on this machine (2 cores, shared with training jobs, load average 5-7) torch with 2
threads ran 30-40x slower than with 1 (OpenMP's spinning barrier losing its second core;
``OMP_WAIT_POLICY=PASSIVE`` brought lop's Backprop at (a) to 1.3-1.5 ms a step with 2 threads,
still slower than 1 thread's 0.7-0.9 ms), so the default is 1 thread, torch's fastest here;
``--torch-threads 1,2`` times both every round and compares clx with the faster. JAX runs with its
default (XLA's CPU thread pool over both cores). ``--cases a --torch-threads 1,2`` (same machine,
right after the run above; re-wrapped as above):

    backprop, 784-100-100-10, batch 16: clx 0.16 s/task, PyTorch (lop) 0.598 s/task -> clx 3.7x faster
        per step: clx 256 us, torch 957 us; torch 1 thread 0.598, 2 threads 24.9 s/task (clx against the faster)
        rounds (s/task): clx 0.114, 0.16, 0.193; torch 1t 0.473, 0.598, 0.803; torch 2t 24.9, 26.3, 15.1
        last-round mean training loss: clx 0.349, torch 0.193
    cbp, 784-100-100-10, batch 16: clx 0.166 s/task, PyTorch (lop) 0.84 s/task -> clx 5.1x faster
        per step: clx 265 us, torch 1344 us; torch 1 thread 0.84, 2 threads 35 s/task (clx against the faster)
        rounds (s/task): clx 0.16, 0.166, 0.226; torch 1t 0.84, 0.798, 0.854; torch 2t 35, 35, 35.9
        last-round mean training loss: clx 0.340, torch 0.194

Install PyTorch in its own environment (not clx's):

    python3 -m venv torchvenv && torchvenv/bin/pip install torch numpy

Run (the sources extracted from the two repositories, e.g. ``git archive``):

    python benchmarks/plasticity_reference.py --torch-python torchvenv/bin/python \\
        --lop-dir lop_src --upgd-dir upgd_src [--rounds 5] [--big-steps 2000] [--cases a,b,c]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

# name -> (label, rule, hidden widths, batch, steps timed per call, steps per task, lr, cbp utility)
CASES = {
    "a_bp": ("backprop", "bp", (100, 100), 16, 625, 625, 0.01, None),
    "a_cbp": ("cbp", "cbp", (100, 100), 16, 625, 625, 0.01, "contribution"),
    "b_bp": ("backprop", "bp", (2000, 2000, 2000), 1, 2000, 60_000, 0.003, None),
    "b_cbp": ("cbp", "cbp", (2000, 2000, 2000), 1, 2000, 60_000, 0.003, "adaptable_contribution"),
    "c_sgd": ("sgd", "sgd", (300, 150), 1, 2500, 2500, 0.01, None),
    "c_upgd": ("upgd", "upgd", (300, 150), 1, 2500, 2500, 0.01, None),
}
UPGD_HP = dict(beta_utility=0.999, sigma=1e-3, weight_decay=1e-3)
REF = {"bp": "PyTorch (lop)", "cbp": "PyTorch (lop)", "sgd": "PyTorch (upgd)", "upgd": "PyTorch (upgd)"}


def case_table(big_steps: int) -> dict:
    out = {}
    for name, (label, rule, hidden, batch, steps, task_steps, lr, util) in CASES.items():
        if name.startswith("b_"):
            steps = big_steps
        out[name] = dict(label=label, rule=rule, hidden=hidden, batch=batch, steps=steps, task=task_steps, lr=lr)
        out[name]["utility"] = util
    return out


def load_data(mnist_dir: str, n: int):
    """(n, 784) float32 in [0, 1] under a fixed pixel permutation and (n,) int32 labels, and where from."""
    rng = np.random.default_rng(0)
    paths = [os.path.join(mnist_dir, f"train-{k}-idx{d}-ubyte.gz") for k, d in (("images", 3), ("labels", 1))]
    if all(os.path.exists(p) for p in paths):
        arrays = []
        for p in paths:
            with gzip.open(p) as f:
                b = f.read()
            dims = [int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(b[3])]
            arrays.append(np.frombuffer(b, np.uint8, offset=4 + 4 * b[3]).reshape(dims)[:n])
        x = arrays[0].reshape(n, 784).astype(np.float32) / 255.0
        y, source = arrays[1].astype(np.int32), "MNIST"
    else:
        x = rng.random((n, 784), dtype=np.float32)
        y, source = rng.integers(0, 10, n).astype(np.int32), "random MNIST-shaped data"
    return x[:, rng.permutation(784)], y, source


# ----------------------------------------------------------------------------------------------
# PyTorch worker: the authors' code, one case per request line, answers one JSON line.


def _stub_modules():
    """Empty stand-ins for backpack / HesScale, which the upgd learners import but first order never uses."""

    class _Any:
        def __init__(self, *a, **k):
            pass

    def stand_in(attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return _Any

    def module(name):
        m = types.ModuleType(name)
        m.__getattr__ = stand_in
        m.__path__ = []
        sys.modules[name] = m

    for name in ("backpack", "HesScale", "HesScale.hesscale", "hesscale", "hesscale.core"):
        module(name)
    for name in ("hesscale.core.hesscale_base", "hesscale.core.derivatives"):
        module(name)


def worker(args):
    import torch

    torch.manual_seed(0)
    sys.path[:0] = [args.lop_dir, args.upgd_dir]
    _stub_modules()
    from core.learner.sgd import SGDLearner
    from core.learner.weight_upgd import FirstOrderGlobalUPGDLearner
    from core.network.fcn_relu import FullyConnectedReLU
    from lop.algos.bp import Backprop
    from lop.algos.cbp import ContinualBackprop
    from lop.nets.deep_ffnn import DeepFFNN

    d = np.load(args.data)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"].astype(np.int64))
    cases = case_table(args.big_steps)
    runners = {}
    for name, c in cases.items():
        lr, n = c["lr"], c["steps"] * c["batch"]
        if c["rule"] in ("bp", "cbp"):  # as lop/permuted_mnist/online_expr.py builds them
            net = DeepFFNN(
                input_size=784, num_features=c["hidden"][0], num_outputs=10, num_hidden_layers=len(c["hidden"])
            )
            if c["rule"] == "bp":
                learner = Backprop(net=net, step_size=lr, opt="sgd", loss="nll", weight_decay=0, device="cpu")
            else:
                learner = ContinualBackprop(
                    net=net,
                    step_size=lr,
                    opt="sgd",
                    loss="nll",
                    replacement_rate=1e-4,
                    maturity_threshold=100,
                    decay_rate=0.99,
                    util_type=c["utility"],
                    accumulate=True,
                    device="cpu",
                )

            def run(learner=learner, b=c["batch"], n=n):
                total = torch.zeros(())
                for i in range(0, n, b):
                    loss, _ = learner.learn(x=x[i : i + b], target=y[i : i + b])
                    total += loss
                return float(total)

        else:  # as core/run/run.py builds and steps them
            kwargs = {"lr": lr, **UPGD_HP} if c["rule"] == "upgd" else {"lr": lr}
            learner = (FirstOrderGlobalUPGDLearner if c["rule"] == "upgd" else SGDLearner)(FullyConnectedReLU, kwargs)
            learner.set_task(types.SimpleNamespace(n_inputs=784, n_outputs=10))
            assert [p.shape[0] for n_, p in learner.network.named_parameters() if n_.endswith("bias")] == [300, 150, 10]
            optimizer = learner.optimizer(learner.parameters, **learner.optim_kwargs)
            criterion = torch.nn.CrossEntropyLoss()

            def run(learner=learner, optimizer=optimizer, criterion=criterion, n=n):
                total = torch.zeros(())
                for i in range(n):
                    optimizer.zero_grad()
                    output = learner.predict(x[i : i + 1])
                    loss = criterion(output, y[i : i + 1])
                    loss.backward()
                    optimizer.step()
                    total += loss.detach()
                return float(total)

        runners[name] = run
    print(json.dumps({"ready": torch.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        name, threads = line.split()
        torch.set_num_threads(int(threads))
        t0 = time.perf_counter()
        loss = runners[name]()
        dt = time.perf_counter() - t0
        print(json.dumps({"case": name, "seconds": dt, "mean_loss": loss / cases[name]["steps"]}), flush=True)


# ----------------------------------------------------------------------------------------------
# clx side and the driver.


def clx_runners(cases, x_np, y_np):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import clx
    from clx.train import make_train_steps_fn

    runners = {}
    for name, c in cases.items():
        model, params = clx.FunctionalModel.from_module(clx.MLP(784, c["hidden"], 10, rngs=nnx.Rngs(0)))
        lr = c["lr"]
        if c["rule"] in ("bp", "sgd"):
            rule = clx.chain(optax.sgd(lr))
        elif c["rule"] == "cbp":
            rule = clx.plasticity.cbp(optax.sgd(lr), 1e-4, 0.99, 100, utility=c["utility"])
        else:
            rule = clx.plasticity.upgd(lr, **UPGD_HP)
        n = c["steps"] * c["batch"]
        program = make_train_steps_fn(model, rule, c["batch"])(c["steps"])
        x, y, ids = jnp.asarray(x_np[:n]), jnp.asarray(y_np[:n]), jnp.zeros(n, jnp.int32)
        key = jax.random.key_data(jax.random.key(0))
        carry = [params, rule.init(params), 0]

        def run(program=program, carry=carry, x=x, y=y, ids=ids, key=key, steps=c["steps"]):
            p, s, epoch = carry
            p, s, loss = program(None, p, s, x, y, ids, key, np.int32(0), np.int32(epoch), np.int32(0))
            loss = float(jax.block_until_ready(loss))
            carry[:] = [p, s, epoch + 1]
            return loss

        runners[name] = run
    return runners, f"jax {jax.__version__} on {jax.default_backend()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-python", default="torchvenv/bin/python")
    ap.add_argument("--lop-dir", default="lop_src", help="a checkout of shibhansh/loss-of-plasticity")
    ap.add_argument("--upgd-dir", default="upgd_src", help="a checkout of mohmdelsayed/upgd")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--mnist", default=os.path.join(here, "..", "..", "shared", "data", "mnist"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-steps", type=int, default=1000, help="steps timed per call in case (b)")
    ap.add_argument("--cases", default="a,b,c", help="which of the shapes a, b, c to run")
    ap.add_argument("--torch-threads", default="1", help="torch.set_num_threads values, each timed every round")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    groups = set(args.cases.split(","))
    threads = [int(t) for t in args.torch_threads.split(",")]
    cases = {k: v for k, v in case_table(args.big_steps).items() if k[0] in groups}
    n = max(c["steps"] * c["batch"] for c in cases.values())
    x, y, source = load_data(args.mnist, n)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.npz")
        np.savez(data, x=x, y=y)
        cmd = [args.torch_python, os.path.abspath(__file__), "--worker", "--data", data]
        cmd += ["--big-steps", str(args.big_steps), "--lop-dir", args.lop_dir, "--upgd-dir", args.upgd_dir]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        torch_version = json.loads(proc.stdout.readline())["ready"]

        def torch_call(name, t):
            proc.stdin.write(f"{name} {t}\n")
            proc.stdin.flush()
            r = json.loads(proc.stdout.readline())
            return r["seconds"], r["mean_loss"]

        runners, jax_info = clx_runners(cases, x, y)
        print(
            f"{jax_info}, torch {torch_version} (set_num_threads {args.torch_threads}), {source}; "
            f"{os.cpu_count()} CPU cores;\n  median of {args.rounds} interleaved rounds after warm-up",
            flush=True,
        )
        times = {name: {"clx": [], **{t: [] for t in threads}} for name in cases}
        losses = {}
        for name in cases:  # warm-up: compile (+1 call) on clx, one call per thread count on torch
            runners[name]()
            runners[name]()
            for t in threads:
                torch_call(name, t)
        for _ in range(args.rounds):
            for name, c in cases.items():
                t0 = time.perf_counter()
                lc = runners[name]()
                times[name]["clx"].append(time.perf_counter() - t0)
                for t in threads:
                    tt, lt = torch_call(name, t)
                    times[name][t].append(tt)
                losses[name] = (lc / (c["steps"] * c["batch"]), lt)
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait()

    for name, c in cases.items():
        scale = c["task"] / c["steps"]
        med = {k: statistics.median(v) for k, v in times[name].items()}
        best = min(threads, key=lambda t: med[t])
        mc, mt = med["clx"], med[best]
        shape = "-".join(map(str, (784, *c["hidden"], 10)))
        extra = f"; s/task = {c['task'] // c['steps']} x {c['steps']} timed steps" if scale != 1 else ""
        faster = f"clx {mt / mc:.1f}x faster" if mt >= mc else f"clx {mc / mt:.1f}x slower"
        per_t = ""
        if len(threads) > 1:
            per_t = "; torch " + ", ".join(f"{t} thread{'s' if t > 1 else ''} {med[t] * scale:.3g}" for t in threads)
            per_t += " s/task (clx against the faster)"
        rounds = "; ".join(
            f"{k if k == 'clx' else f'torch {k}t'} {', '.join(f'{v * scale:.3g}' for v in ts)}"
            for k, ts in times[name].items()
        )
        print(
            f"{c['label']}, {shape}, batch {c['batch']}: clx {mc * scale:.3g} s/task, {REF[c['rule']]} "
            f"{mt * scale:.3g} s/task -> {faster}\n"
            f"    per step: clx {1e6 * mc / c['steps']:.0f} us, torch {1e6 * mt / c['steps']:.0f} us{extra}{per_t}\n"
            f"    rounds (s/task): {rounds}\n"
            f"    last-round mean training loss: clx {losses[name][0]:.3f}, torch {losses[name][1]:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
