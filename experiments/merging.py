"""The continual model-merging protocol of issue 13, one command: fine-tune, merge in random orders, table.

    python -m experiments.merging --pretrained DIR --workdir OUT [--tasks 7] [--steps 500] [--lr 1e-4]
        [--orders 10] [--seed 0] [--eval-samples 1000] [--data-dir MNIST_DIR]

1. **Fine-tune.** ``DIR`` is a pretrained ViT written by ``experiments.pretrain_vit``
   (``load_pretrained``); its ``vit.json`` names the source it was trained on (``mnist``, or
   ``digits`` for quick checks), and the ``finetune`` stream of that source (``clx.data``: task
   ``t`` applies ``FINETUNE_CHANGES[t]``: rotated 90 degrees, mirrored, inverted, noisy,
   blurred, shrunk, permuted; labels unchanged) gives the ``--tasks`` tasks. One copy of the
   pretrained params per task is fully fine-tuned (every param, head included) with Adam
   (``--lr``, constant, default 1e-4), ``--steps`` steps of batch ``--batch-size`` drawn by the
   trainer's own program (``clx.train.make_train_steps_fn``: epochs of seeded permutations),
   and saved to ``OUT/finetuned/task_<t>`` (``clx.models.save_params``) with a
   ``task_<t>.json`` beside it. A rerun finds them and skips the fine-tuning (resumable); a
   saved model whose settings (steps, lr, batch, seed, pretrained dir) differ is refused.
2. **Merge** (all models are read back from the checkpoints, so a rerun gives the same numbers).
   ``--orders`` R random orders of the tasks, ``np.random.default_rng(seed).permutation(T)``
   drawn R times. Methods and their settings (FusionBench's OPCM baselines, as issue 13 asks):

   - ``pretrained``: theta_0 on every task;
   - ``fine-tuned``: each task's own fine-tuned model on its task (the upper reference);
   - all at once (order-free): ``task arithmetic`` (lambda 0.3), ``TIES`` (top 20 %, lambda
     0.3, ``merge="sum"``: FusionBench's ``config/method/ties_merging.yaml``; clx's own
     defaults are the paper's disjoint mean with lambda 1.0), ``DARE + TA`` (drop p = 0.5,
     rescale, then task arithmetic with lambda 0.3; one DARE key per order, so its std is over
     the R DARE draws);
   - continual, in each order (``merge_next`` in a ``lax.scan`` over the ordered models,
     ``vmap`` over the R orders): ``continual TA`` (lambda 0.3), ``continual TIES`` (lambda
     0.5, top 20 %, sum), ``continual average``, ``OPCM`` (alpha 0.5, the projected diagonal
     zeroed: FusionBench since 2025-03-18) and ``OPCM (diag kept)`` (alpha 0.5, the code behind
     the paper's numbers).

3. **Evaluate.** Every model is scored on the same fixed subsample of each task's test set:
   the first ``--eval-samples`` of ``np.random.default_rng([seed, 0xE7A1]).permutation`` of it
   (all of it when smaller; MNIST has 10,000 per task). For a continual method, order r gives
   the (T, T) accuracy matrix of merging ``R[i, j]`` = accuracy on the task merged j-th after
   the i-th merge (tasks in merge positions, clx's convention for ``clx.metrics``); ACC is
   ``clx.metrics.acc`` (the last row's mean, the final merged model on all T tasks), BWT
   ``clx.metrics.bwt`` of that matrix; the table gives mean ± std (population std, ddof 0)
   over the R orders.

Writes ``OUT/merging.json`` (settings, orders, per-task fine-tuning records, the
``finetuned_matrix`` (T, T): fine-tuned model i on task j, and per method its ACC/BWT per order,
the accuracy matrices (R, T, T), merge and evaluation seconds) and ``OUT/merging.md`` (the table
below), and prints the table. Bad input (a pretrained directory without ``vit.json``/``params``,
``--orders`` < 1, ``--tasks`` outside 1..7, non-positive steps/lr/batch/eval samples, a
``--workdir`` that is a file) is a clear error before anything is written.

Measured (``--pretrained`` the 97.1 % MNIST ViT of ``experiments.pretrain_vit``, defaults: 7 tasks,
500 steps, lr 1e-4, 10 orders, 1000 test examples per task; 2 CPU cores shared with other jobs,
load 8-19): fine-tuning 1,198 s for the 7 tasks, merging and scoring 1,700 s. ACC %: pretrained
29.6, fine-tuned 90.3 (each on its own task), TA 39.8, TIES 34.6, DARE + TA 39.3 ± 0.4, continual
TA 39.8 ± 0.0, continual TIES 12.1 ± 1.5 (its merged task vector grows about 1.5x per merge with
``merge="sum"``: norm 16.5 after 7 merges against 1.1-3.0 for one task vector), continual average
36.5 ± 0.0, OPCM 41.1 ± 0.4 (diagonal kept: 41.3 ± 0.5). So fine-tuned > OPCM > continual TA,
the order issue 13 expects, with OPCM 1.3 points over continual TA.

Wall times: fine-tuning per task is the jitted training (compilation included for the first task);
a method's "merge s" is its merging over all R orders (one jitted program, compilation included),
"eval s" the scoring of its models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clx
from clx import data

FINETUNED_DIR = "finetuned"
RESULT_JSON = "merging.json"
RESULT_MD = "merging.md"
_EVAL_STREAM = 0xE7A1  # seed tag of the test subsample, independent of the order draws
# the settings a saved fine-tuned model must share with this run to be reused
_FT_KEYS = ("steps", "lr", "batch_size", "seed", "pretrained", "stream_seed")
#: the merges, in the table's order (after the "pretrained" and "fine-tuned" references)
MERGES = (
    "task arithmetic",
    "TIES",
    "DARE + TA",
    "continual TA",
    "continual TIES",
    "continual average",
    "OPCM",
    "OPCM (diag kept)",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.merging", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", required=True, help="a directory written by experiments.pretrain_vit")
    p.add_argument("--workdir", required=True, help="where finetuned/, merging.json and merging.md go")
    p.add_argument("--tasks", type=int, default=7, help="tasks of the finetune stream, 1..7 (default 7)")
    p.add_argument("--steps", type=int, default=500, help="Adam steps per fine-tuning (default 500)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, constant (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--orders", type=int, default=10, help="random merge orders R (default 10)")
    p.add_argument("--seed", type=int, default=0, help="orders, DARE keys, batch order and the test subsample")
    p.add_argument("--eval-samples", type=int, default=1000, help="test examples per task scored (default 1000)")
    p.add_argument("--data-dir", default="", help="the MNIST IDX directory (default ../shared/data/mnist)")
    p.add_argument("--chunk", type=int, default=100, help="fine-tuning steps per jitted call")
    p.add_argument("--methods", default="all", help=f"comma-separated subset of {', '.join(MERGES)} (default all)")
    return p


def check_args(args) -> None:
    """Raises ValueError / FileNotFoundError for bad settings, before anything is read or written."""
    if not 1 <= args.tasks <= len(data.FINETUNE_CHANGES):
        raise ValueError(
            f"--tasks must be in 1..{len(data.FINETUNE_CHANGES)} (the finetune stream's kinds "
            f"{data.FINETUNE_CHANGES}), got {args.tasks}."
        )
    for name in ("orders", "steps", "batch_size", "eval_samples", "chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not (args.lr > 0 and np.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}.")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}.")
    unknown = [m for m in _methods(args.methods) if m not in MERGES]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(MERGES)} or 'all'.")
    pre = os.path.abspath(args.pretrained)
    if not os.path.isdir(pre):
        raise FileNotFoundError(
            f"--pretrained {pre!r} does not exist; write one with python -m experiments.pretrain_vit --workdir DIR."
        )
    for name in ("vit.json", "params"):
        if not os.path.exists(os.path.join(pre, name)):
            raise FileNotFoundError(
                f"--pretrained {pre!r} has no {name}; it must be a directory written by experiments.pretrain_vit."
            )
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise ValueError(f"--workdir {args.workdir!r} is a file; pass a directory.")


def _methods(spec: str) -> list[str]:
    return list(MERGES) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]


def load_stream(info: dict, args) -> data.TaskStream:
    """The finetune stream of the source the ViT was pretrained on (``info["source"]``)."""
    name = info.get("source", "mnist")
    if name == "mnist":
        from experiments.configs.base import mnist_dir

        source = data.load_source("mnist", args.data_dir or mnist_dir() or None)
    else:
        source = data.load_source(name, args.data_dir or None)
    return data.make_stream(source, "finetune", args.tasks, seed=args.seed)


def draw_orders(num_tasks: int, num_orders: int, seed: int) -> np.ndarray:
    """(R, T) int32: R permutations of 0..T-1 drawn in turn from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_tasks) for _ in range(num_orders)]).astype(np.int32)


def eval_sets(stream, n: int, seed: int):
    """``(x (T, m, ...), y (T, m))``: each task's fixed test subsample, m = min(n, smallest test set)."""
    sizes = [len(stream.test_set(t)[1]) for t in range(stream.num_tasks)]
    m = min(n, *sizes)
    xs, ys = [], []
    for t in range(stream.num_tasks):
        x, y = stream.test_set(t)
        idx = np.random.default_rng([seed, _EVAL_STREAM]).permutation(len(y))[:m]
        xs.append(x[idx])
        ys.append(y[idx])
    return np.stack(xs), np.stack(ys)


def make_scorer(model, xs, ys, batch: int = 1000):
    """``score(stacked params (M, ...)) -> (M, T)`` float64 host array: every model on every task's subsample.

    One jitted program (``clx.train.make_eval_fn``'s accuracy, ``lax.map`` over tasks and models).
    """
    accuracy = clx.train.make_eval_fn(model, batch)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    T = ys.shape[0]

    @jax.jit
    def score(stacked, xs, ys):
        def one_model(p):
            return jax.lax.map(lambda j: accuracy(p, xs[j], ys[j], j, T).astype(jnp.float32), jnp.arange(T))

        return jax.lax.map(one_model, stacked)

    return lambda stacked: np.asarray(score(stacked, xs, ys), np.float64)


def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def continual_merged(merger, pretrained, stacked, orders):
    """The merged params after each merge, for every order: leaves (R, T, ...).

    ``stacked``: the T fine-tuned models on a leading axis (task order); ``orders`` (R, T).
    ``lax.scan`` of ``merger.merge_next`` over the models in order r, ``vmap`` over r.
    """

    def one(order, pretrained, stacked):
        models = jax.tree.map(lambda a: a[order], stacked)

        def body(state, m):
            state = merger.merge_next(state, m)
            return state, state.merged

        return jax.lax.scan(body, merger.init(pretrained), models)[1]

    return jax.jit(jax.vmap(one, in_axes=(0, None, None)))(jnp.asarray(orders), pretrained, stacked)


def _ft_paths(workdir: str, t: int):
    base = os.path.join(workdir, FINETUNED_DIR, f"task_{t}")
    return base, base + ".json"


def make_finetune(model, lr: float, batch_size: int, chunk: int):
    """``finetune(params0, task, steps, seed) -> (params, mean losses per call)``: full fine-tuning with Adam(lr).

    Runs the trainer's own program (``clx.train.make_train_steps_fn``, compiled once per number
    of steps per call and shared by every task): step g takes batch ``g % nb`` of epoch
    ``g // nb``'s permutation ``shuffle_key(key(seed), task, epoch)`` of the task's examples.
    """
    rule = clx.as_continual(optax.adam(lr))
    make = clx.train.make_train_steps_fn(model, rule, batch_size)
    programs = {}

    def finetune(params0, task, steps: int, seed: int):
        x, y = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
        n = len(task.y_train)
        task_ids = jnp.zeros((n,), jnp.int32)
        key_data = jax.random.key_data(jax.random.key(seed))
        nb = -(-n // batch_size)
        params = jax.tree.map(jnp.copy, params0)  # the programs donate their params
        state = rule.init(params)
        losses, g = [], 0
        while g < steps:
            epoch, start = divmod(g, nb)
            num = min(chunk, nb - start, steps - g)
            if num not in programs:
                programs[num] = make(num)
            params, state, loss_sum = programs[num](
                None, params, state, x, y, task_ids, key_data, task.task_id, epoch, start
            )
            losses.append(float(loss_sum) / min(num * batch_size, n - start * batch_size))
            g += num
        if not np.isfinite(losses).all():
            raise FloatingPointError(f"fine-tuning task {task.task_id}: the loss became NaN or infinite; lower --lr.")
        return params, losses

    return finetune


def finetune_all(model, params0, stream, args, workdir: str, like) -> tuple[list, list]:
    """Fine-tunes (or reloads) one model per task; returns (params read back from disk, records)."""
    os.makedirs(os.path.join(workdir, FINETUNED_DIR), exist_ok=True)
    settings = {
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "pretrained": os.path.abspath(args.pretrained),
        "stream_seed": args.seed,
    }
    models, records = [], []
    finetune = make_finetune(model, args.lr, args.batch_size, args.chunk)
    for t in range(stream.num_tasks):
        ckpt, meta = _ft_paths(workdir, t)
        if os.path.isdir(ckpt) and os.path.isfile(meta):
            with open(meta) as f:
                record = json.load(f)
            differ = {k: (record.get(k), settings[k]) for k in _FT_KEYS if record.get(k) != settings[k]}
            if differ:
                raise ValueError(
                    f"{ckpt!r} was fine-tuned with other settings {differ} (saved, now); pass another --workdir."
                )
            record["reused"] = True
            print(f"task {t} ({record['change']}): reusing {ckpt}", flush=True)
        else:
            task = stream.task(t)
            t0 = time.time()
            params, losses = finetune(params0, task, args.steps, args.seed)
            jax.block_until_ready(params)
            seconds = time.time() - t0
            clx.models.save_params(ckpt, params, overwrite=os.path.isdir(ckpt))
            record = {
                "task": t,
                "change": data.FINETUNE_CHANGES[t],
                **settings,
                "train_examples": len(task.y_train),
                "first_loss": losses[0],
                "final_loss": losses[-1],
                "train_seconds": round(seconds, 1),
            }
            with open(meta, "w") as f:
                json.dump(record, f, indent=2)
            record["reused"] = False
            print(
                f"task {t} ({record['change']}): fine-tuned {args.steps} steps in {seconds:.1f}s, "
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
                flush=True,
            )
        models.append(clx.models.load_params(ckpt, like))
        records.append(record)
    return models, records


def _summary(accs, bwts=None) -> dict:
    accs = np.asarray(accs, np.float64)
    out = {"acc_mean": float(accs.mean()), "acc_std": float(accs.std()), "acc_per_order": accs.tolist()}
    if bwts is not None:
        bwts = np.asarray(bwts, np.float64)
        out.update(bwt_mean=float(bwts.mean()), bwt_std=float(bwts.std()), bwt_per_order=bwts.tolist())
    return out


def _timed(f, *a):
    t0 = time.time()
    out = jax.block_until_ready(f(*a))
    return out, time.time() - t0


def run_methods(pretrained, finetuned, orders, score, seed: int, methods=MERGES):
    """Every method's results ``{name: {"kind", "hparams", acc/bwt summaries, matrices, seconds}}``, the
    (T, T) accuracies of fine-tuned model i on task j, and the pretrained model's (T,) accuracies."""
    T, R = len(finetuned), orders.shape[0]
    stacked = stack(finetuned)
    m = clx.merging
    results = {}

    pre_acc = score(stack([pretrained]))[0]
    results["pretrained"] = {
        "kind": "reference",
        "hparams": {},
        "per_task": pre_acc.tolist(),
        **_summary([pre_acc.mean()]),
    }
    ft_matrix, ft_eval = _timed(score, stacked)
    own = np.diag(ft_matrix)
    print(f"pretrained: ACC {100 * pre_acc.mean():.2f}; fine-tuned (own task): ACC {100 * own.mean():.2f}", flush=True)
    results["fine-tuned"] = {
        "kind": "reference",
        "hparams": {},
        "per_task": own.tolist(),
        "eval_seconds": round(ft_eval, 2),
        **_summary([own.mean()]),
    }

    def all_at_once(name, hparams, merge_fn):
        if name not in methods:
            return
        merged, secs = _timed(merge_fn)
        accs, ev = _timed(score, stack([merged]))
        results[name] = {
            "kind": "all_at_once",
            "hparams": hparams,
            "per_task": accs[0].tolist(),
            "merge_seconds": round(secs, 2),
            "eval_seconds": round(ev, 2),
            **_summary([accs[0].mean()]),
        }
        print(f"{name}: ACC {100 * results[name]['acc_mean']:.2f} (merge {secs:.1f}s, eval {ev:.1f}s)", flush=True)

    all_at_once("task arithmetic", {"lam": 0.3}, lambda: m.task_arithmetic(pretrained, finetuned, lam=0.3))
    all_at_once(
        "TIES", {"k": 20, "lam": 0.3, "merge": "sum"}, lambda: m.ties_merging(pretrained, finetuned, 20, 0.3, "sum")
    )

    if "DARE + TA" in methods:  # one DARE draw per order (the merge itself is order-free)
        keys = jax.random.split(jax.random.key(seed), R)

        def dare_ta(key, pre, fts):
            tvs = [m.dare(m.task_vector(f, pre), 0.5, k) for f, k in zip(fts, jax.random.split(key, T))]
            return m.apply_task_vector(pre, m.tree_sum(tvs), 0.3)

        dare_all = jax.jit(lambda keys, pre, fts: jax.lax.map(lambda k: dare_ta(k, pre, fts), keys))
        merged, secs = _timed(dare_all, keys, pretrained, finetuned)
        accs, ev = _timed(score, merged)
        results["DARE + TA"] = {
            "kind": "all_at_once",
            "hparams": {"p": 0.5, "lam": 0.3, "draws": R},
            "per_task_per_draw": accs.tolist(),
            "merge_seconds": round(secs, 2),
            "eval_seconds": round(ev, 2),
            **_summary(accs.mean(axis=1)),
        }
        print(f"DARE + TA: ACC {100 * results['DARE + TA']['acc_mean']:.2f} (merge {secs:.1f}s, eval {ev:.1f}s)")

    continual = [
        ("continual TA", {"lam": 0.3}, m.continual_task_arithmetic(0.3)),
        ("continual TIES", {"lam": 0.5, "k": 20, "merge": "sum"}, m.continual_ties_merging(0.5, 20, "sum")),
        ("continual average", {}, m.continual_weight_average()),
        ("OPCM", {"alpha": 0.5, "zero_diagonal": True}, m.opcm(0.5)),
        ("OPCM (diag kept)", {"alpha": 0.5, "zero_diagonal": False}, m.opcm(0.5, zero_diagonal=False)),
    ]
    for name, hparams, merger in continual:
        if name not in methods:
            continue
        merged, secs = _timed(continual_merged, merger, pretrained, stacked, orders)
        flat = jax.tree.map(lambda a: a.reshape(R * T, *a.shape[2:]), merged)
        by_task, ev = _timed(score, flat)
        by_task = by_task.reshape(R, T, T)  # [r, i, task id]
        mats = np.stack([by_task[r][:, orders[r]] for r in range(R)])  # [r, i, position]
        results[name] = {
            "kind": "continual",
            "hparams": hparams,
            "accuracy_matrices": mats.tolist(),
            "merge_seconds": round(secs, 2),
            "eval_seconds": round(ev, 2),
            **_summary([clx.metrics.acc(a) for a in mats], [clx.metrics.bwt(a) for a in mats] if T > 1 else None),
        }
        print(f"{name}: ACC {100 * results[name]['acc_mean']:.2f} (merge {secs:.1f}s, eval {ev:.1f}s)", flush=True)
    return results, ft_matrix, pre_acc


def table(results: dict, num_orders: int) -> str:
    """The markdown table: method, final ACC mean ± std over orders, BWT, seconds."""
    lines = [
        f"| method | settings | ACC % (mean ± std, {num_orders} orders) | BWT % (merge sequence) | merge s | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        hp = ", ".join(f"{k} {v}" for k, v in r["hparams"].items()) or "-"
        if r["kind"] == "reference" or name in ("task arithmetic", "TIES"):
            acc = f"{100 * r['acc_mean']:.2f} (order-free)"
        else:
            acc = f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}"
        bwt = f"{100 * r['bwt_mean']:.2f} ± {100 * r['bwt_std']:.2f}" if "bwt_mean" in r else "-"
        ms = f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "-"
        es = f"{r['eval_seconds']:.1f}" if "eval_seconds" in r else "-"
        lines.append(f"| {name} | {hp} | {acc} | {bwt} | {ms} | {es} |")
    return "\n".join(lines)


def render(out: dict) -> str:
    """``merging.md`` from the ``merging.json`` dict: a header with the settings, then :func:`table`."""
    st, records = out["settings"], out["finetune"]
    T, info = st["tasks"], st["pretrained_info"]
    fine = ", ".join(f"{r['change']} {100 * r['accuracy']:.1f}" for r in records)
    ft_train = sum(r["train_seconds"] for r in records)
    reused = all(r["reused"] for r in records)
    return (
        f"# Continual merging of {T} fine-tuned ViTs ({info.get('source')}, finetune stream)\n\n"
        f"Pretrained: {st['pretrained']} (test accuracy {info.get('test_accuracy')}). "
        f"Fine-tuning: {st['optimizer']}, lr {st['lr']}, {st['steps']} steps of batch {st['batch_size']} per "
        f"task, {ft_train:.0f}s of training for the {T} tasks"
        f"{' (read back from the checkpoints in this run)' if reused else ''}. "
        f"Scored on {st['eval_samples']} test examples per task; {st['orders']} random orders (seed {st['seed']}). "
        f"ACC: mean accuracy over all tasks of the final merged model, mean ± std over the orders; BWT: "
        f"clx.metrics.bwt of each order's accuracy matrix of merging. This run's wall time {out['wall_seconds']:.0f}s "
        f"on {len(st['devices'])} device(s).\n\n"
        f"Individual fine-tuned accuracy per task: {fine}.\n\n" + table(out["methods"], st["orders"]) + "\n"
    )


def main(argv=None) -> dict:
    """Runs the protocol; returns the ``merging.json`` dict."""
    args = _parser().parse_args(argv)
    check_args(args)
    from experiments.pretrain_vit import load_pretrained

    t_start = time.time()
    model, pretrained, info = load_pretrained(args.pretrained)
    stream = load_stream(info, args)
    workdir = os.path.abspath(args.workdir)
    T = stream.num_tasks
    print(f"pretrained {args.pretrained} ({info.get('source')}, {info.get('params')} params); {stream}", flush=True)

    t_ft = time.time()
    finetuned, records = finetune_all(model, pretrained, stream, args, workdir, pretrained)
    ft_seconds = time.time() - t_ft
    xs, ys = eval_sets(stream, args.eval_samples, args.seed)
    score = make_scorer(model, xs, ys)
    orders = draw_orders(T, args.orders, args.seed)
    results, ft_matrix, pre_acc = run_methods(pretrained, finetuned, orders, score, args.seed, _methods(args.methods))
    for t, rec in enumerate(records):
        rec["accuracy"] = float(ft_matrix[t, t])

    out = {
        "settings": {
            "pretrained": os.path.abspath(args.pretrained),
            "pretrained_info": info,
            "tasks": T,
            "changes": list(data.FINETUNE_CHANGES[:T]),
            "steps": args.steps,
            "lr": args.lr,
            "optimizer": "adam (constant lr), full fine-tuning",
            "batch_size": args.batch_size,
            "orders": args.orders,
            "seed": args.seed,
            "eval_samples": int(ys.shape[1]),
            "methods": _methods(args.methods),
            "devices": [str(d) for d in jax.devices()],
        },
        "orders": orders.tolist(),
        "finetune": records,
        "finetuned_matrix": ft_matrix.tolist(),
        "pretrained_per_task": pre_acc.tolist(),
        "methods": results,
        "finetune_seconds": round(ft_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    text = render(out)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULT_JSON), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(workdir, RESULT_MD), "w") as f:
        f.write(text)
    print(text, end="")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
