"""Runs the methods of a config and writes their results (``experiments.main`` parses the flags and calls ``run``).

Every method of ``config.method`` (comma-separated) runs on the same stream from
the same initial params. One method writes ``results.json``,
``accuracy_matrix.csv`` and ``accuracy_matrix.png`` into the workdir; several
write them into ``<workdir>/<method>/`` plus ``summary.json`` / ``summary.txt``.
Everything that can be wrong with the config or the data is checked before
anything in the workdir is written (``prepare``); then, before any training, the
workdir is created and a probe file written into it and deleted (``check_workdir``),
so that a workdir that is a file or read-only fails at once, not after the run.

Checkpoints (``config.checkpoint``, on by default) go to ``<out>/checkpoints``; a
rerun into the same workdir resumes from them unless the config (but
``_NOT_FINGERPRINTED``), the clx source, the experiment code that builds the rules
(``experiments/run.py``, ``experiments/methods/``) or the library versions differ:
then it is refused with the differences listed (``clx.checkpoint``).

This module knows no method: everything about one (its rule, config block,
sweepable keys, results entries, data mode) is its entry in ``experiments.methods``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import tempfile

import jax
import numpy as np
from absl import logging

import clx
from clx import checkpoint as ckpt_lib
from clx import data, sharding
from clx.train import CheckpointOptions, fit, fit_members
from experiments import checks, methods, report
from experiments.logs import TensorBoardLog

# Config keys that do not change what a run computes, left out of the checkpoint fingerprint.
_NOT_FINGERPRINTED = ("progress", "checkpoint", "mesh", "distributed", "data.dir", "log")
METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "online_acc")
# Distributions whose versions go into every results.json ("environment").
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "clx")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked config: what ``run`` runs. Built by :func:`prepare`, which writes nothing."""

    methods: list[methods.Method]
    stream: data.TaskStream
    # (seed, sweep value) per member: the value a float (sweep.key), a (float, float) pair (sweep.key x sweep.key2)
    # or None; [(seed, None)] for a plain run
    members: list[tuple[int, float | tuple[float, float] | None]]
    mesh: jax.sharding.Mesh | None
    first: dict[str, tuple]  # method name -> (model, params) of the first member (built by the checks)


def prepare(config) -> Plan:
    """Validates the config, loads the data and builds every method's rule once per sweep value; writes nothing.

    Raises:
      ValueError / FileNotFoundError: a numeric value out of its range
        (``experiments.checks``, first); an unknown method, stream kind or dataset name;
        a method's missing config block or bad value (e.g. a GPM threshold, also a
        swept one); a key a method cannot sweep; missing or corrupt data; labels
        out of range; a batch size the mesh does not divide; train.seen_classes_only
        on a stream that is not class-IL; an unknown train.member_axis.
    """
    checks.check_config(config)
    chosen = [methods.get(name) for name in methods.parse(config.method)]
    clx.train.check_evaluate(config.eval.tasks, "config.eval.tasks")
    clx.train.check_member_axis(config.train.member_axis, "config.train.member_axis")
    if config.stream.kind not in data.KINDS:
        raise ValueError(f"unknown stream.kind {config.stream.kind!r}; choose one of {sorted(data.KINDS)}.")
    for method in chosen:
        methods.check_config(method, config)
    members = _members(config, chosen)
    if len(members) > 1 and config.stream.kind.startswith("split") and config.stream.class_order == "random":
        logging.warning(
            "config.seeds: every member trains on the one class order drawn from config.seed=%d (members share the "
            "stream); for an order per seed run each seed separately (experiments.tables does).",
            config.seed,
        )
    source = data.load_source(config.data.source, config.data.dir or None, scale=config.data.scale, pad=config.data.pad)
    stream = data.make_stream(
        source,
        config.stream.kind,
        config.stream.num_tasks,
        seed=config.seed,
        max_angle=config.stream.max_angle,
        class_order=config.stream.class_order,
        train_subset=config.stream.train_subset or None,
    )
    clx.train.check_seen_classes_only(config.train.seen_classes_only, stream, "config.train.seen_classes_only")
    mesh = make_data_mesh(config)
    if mesh is not None:
        sharding.check_batch_size(config.train.batch_size, mesh)
    first = {}
    for method in chosen:
        model, params = method.build_model(config, stream, members[0][0])
        if config.eval.plasticity_metrics and not hasattr(model, "apply_with_taps"):
            raise ValueError(
                f"config.eval.plasticity_metrics needs a model with layer taps, and method {method.name!r} builds a "
                f"{type(model).__name__}; set config.eval.plasticity_metrics=False for it."
            )
        for value in dict.fromkeys(v for _, v in members):  # each sweep value once (None: no sweep)
            rule = method.make_rule(config, model, swept_values(sweep_keys(config), value))
            jax.eval_shape(rule.init, params)  # the rule's own checks against the params, without allocating
        first[method.name] = (model, params)
    return Plan(chosen, stream, members, mesh, first)


def sweep_keys(config) -> tuple[str, ...]:
    """The swept hyperparameters: () without a sweep, ``(sweep.key,)``, or ``(sweep.key, sweep.key2)``."""
    return tuple(k for k in (config.sweep.key, config.sweep.get("key2", "")) if k)


def swept_values(keys: tuple[str, ...], value):
    """One member's sweep value as ``make_rule``'s ``hp``: ``{key: value}`` (two keys: a pair, or a traced (2,)
    array inside ``fit_members``, one entry each), or None without a sweep."""
    if value is None or not keys:
        return None
    if len(keys) == 1:
        return {keys[0]: value}
    return {k: value[i] for i, k in enumerate(keys)}


def _members(config, chosen) -> list[tuple[int, float | tuple[float, float] | None]]:
    """(seed, sweep value) of every member: values x seeds (sweep.grid, crossed with sweep.grid2 for a second key,
    as (v, v2) pairs); one member (seed, None) without seeds or sweep."""
    seeds = [int(s) for s in (config.seeds or (config.seed,))]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds repeats a seed: {list(config.seeds)}.")
    key, key2 = config.sweep.key, config.sweep.get("key2", "")
    grid2 = tuple(config.sweep.get("grid2", ()))
    if key2 and not key:
        raise ValueError(f"config.sweep.key2={key2!r} needs config.sweep.key (the first hyperparameter) and its grid.")
    if len(grid2) and not key2:
        raise ValueError("config.sweep.grid2 is set but config.sweep.key2 is empty; name the second hyperparameter.")
    if key2 and key2 == key:
        raise ValueError(f"config.sweep.key2 repeats config.sweep.key={key!r}; sweep two different hyperparameters.")
    if not key:
        if len(config.sweep.grid):
            common = sorted(set.intersection(*(set(m.sweepable) for m in chosen)))
            raise ValueError(
                "config.sweep.grid is set but config.sweep.key is empty; name the hyperparameter, "
                f"one of {common} for {[m.name for m in chosen]}."
            )
        return [(s, None) for s in seeds]
    for method in chosen:
        methods.check_sweep(method, key)
        if key2:
            methods.check_sweep(method, key2)
    values = [float(v) for v in config.sweep.grid]
    if not values:
        raise ValueError(f"config.sweep.key={key!r} needs config.sweep.grid, e.g. (0.95, 0.97, 0.99).")
    if key2:
        values2 = [float(v) for v in grid2]
        if not values2:
            raise ValueError(f"config.sweep.key2={key2!r} needs config.sweep.grid2, e.g. (0.001, 0.01).")
        values = [(a, b) for a in values for b in values2]
    return [(s, v) for v in values for s in seeds]


def make_data_mesh(config):
    """The data-parallel mesh of ``config.mesh``, or None (one device / mesh.enabled=off).

    Raises:
      ValueError: an unknown mesh.enabled, a shape that does not match the devices.
    """
    mode = str(config.mesh.enabled).lower()
    if mode not in ("auto", "on", "off", "true", "false"):
        raise ValueError(f"config.mesh.enabled must be auto, on or off, got {config.mesh.enabled!r}.")
    if mode in ("off", "false") or (mode == "auto" and jax.device_count() == 1 and not config.mesh.shape):
        return None
    return sharding.make_mesh(tuple(config.mesh.shape) or None)


def run(config, workdir: str, *, on_save=None) -> dict[str, dict]:
    """Runs every method of the config; returns {method: results dict} (the first member's with several members).

    ``on_save(checkpoint_number, position)`` is passed to ``fit`` (tests use it).
    """
    plan = prepare(config)
    check_workdir(workdir)
    several = len(plan.methods) > 1
    rows = {}
    for method in plan.methods:
        out = os.path.join(workdir, method.name) if several else workdir
        rows[method.name] = _run_method(method, plan, config, out, on_save)
    if several and jax.process_index() == 0:
        print(report.write_summary(workdir, rows))
    return rows


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` (with parents) if missing, then writes and deletes a probe file in it.

    ``run`` calls it after ``prepare`` and before any training, so that results are
    never lost to a workdir that cannot hold them (with checkpoints off nothing else
    writes there before the run ends). Every process probes with its own file.

    Raises:
      NotADirectoryError: the workdir, or a directory above it, is a file.
      PermissionError: the workdir cannot be created or written (read-only, not its owner's).
      OSError: it cannot be created or written for another reason (a full disk, ...).
      Each message names the path and the fix.
    """
    path = os.path.abspath(workdir)
    fix = "pass another --workdir (a missing directory is created)"
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"the workdir {path} is a file, not a directory; {fix}, or move the file away.")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clx-write-probe-", dir=path)
        try:
            os.write(fd, b"clx")
        finally:
            os.close(fd)
            os.remove(probe)
    except (NotADirectoryError, FileExistsError) as e:
        above = os.path.dirname(path)
        while above != os.path.dirname(above) and not os.path.lexists(above):
            above = os.path.dirname(above)
        raise NotADirectoryError(f"the workdir {path} cannot be created: {above} is a file; {fix}.") from e
    except PermissionError as e:
        raise PermissionError(
            f"the workdir {path} is not writable ({e.strerror}: {e.filename or path}); {fix}, "
            "or make it writable for this user (e.g. chmod u+w)."
        ) from e
    except OSError as e:
        raise OSError(f"cannot write into the workdir {path} ({e}); {fix}.") from e


@functools.cache
def _experiment_code() -> dict:
    """The experiment code that decides what a run computes, for the checkpoint fingerprint (clx adds its own).
    Hashed once per process, as ``clx.checkpoint.code_fingerprint`` (the code that was imported)."""
    return {
        "experiments_sha256": ckpt_lib.source_sha256(os.path.dirname(os.path.abspath(__file__)), "run.py", "methods")
    }


def _run_method(method, plan, config, out, on_save) -> dict:
    """Trains ``method`` (all members in one program), writes its results under ``out``; returns the first's."""
    name, members, keys = method.name, plan.members, sweep_keys(config)
    ckpt = None
    if config.checkpoint.enabled:
        ckpt = CheckpointOptions(
            os.path.join(out, "checkpoints"),
            every_steps=int(config.checkpoint.every_steps),
            every_tasks=int(config.checkpoint.every_tasks),
            max_to_keep=int(config.checkpoint.max_to_keep),
            info={"method": name, "config": _fingerprint_config(config, plan.methods), "code": _experiment_code()},
        )
    common = dict(
        epochs=config.train.epochs,
        batch_size=config.train.batch_size,
        evidence_samples=int(method.evidence_samples(config)),
        cumulative=method.cumulative,
        eval_batch_size=config.train.eval_batch_size,
        progress=config.progress,
        desc=f"{name} ",
        mesh=plan.mesh,
        checkpoint=ckpt,
        on_save=on_save,
        evaluate=config.eval.tasks,
        eval_every_steps=config.eval.every_steps,
        eval_samples=int(config.eval.samples),
        seen_classes_only=bool(config.train.seen_classes_only),
    )
    model, params = plan.first[name]
    log = None
    if config.log.tensorboard and jax.process_index() == 0:
        dirs = (
            [out]
            if len(members) == 1 and not keys
            else [os.path.join(out, _member_name(s, v, keys)) for s, v in members]
        )
        log = common["on_task_end"] = TensorBoardLog(
            dirs, method.results, config.train.epochs, members=len(members) > 1 or bool(keys)
        )
    if config.eval.plasticity_metrics:
        common["task_metrics"] = functools.partial(
            clx.metrics.plasticity_metrics, model, tau=float(config.eval.plasticity_metrics_tau)
        )
    # Model-specific facts (e.g. a hypernetwork's compression ratio); shapes only, read before fit donates params.
    extra = model.extra_results(params) if hasattr(model, "extra_results") else {}
    try:
        if len(members) == 1 and not keys:  # the plain path (bit-identical to a run without members)
            result = fit(model, params, method.make_rule(config, model), plan.stream, seed=members[0][0], **common)
            per_member = [
                (
                    None,
                    result.accuracy_matrix,
                    result.random_baseline,
                    result.losses,
                    result.train_accuracy,
                    result.task_metrics,
                    result.eval_curves,
                    method.results(result.rule_state, None),
                )
            ]
        else:
            params_list = [params] + [method.build_model(config, plan.stream, s)[1] for s, _ in members[1:]]
            hps = [0.0 if v is None else v for _, v in members]
            result = fit_members(
                model,
                params_list,
                lambda hp: method.make_rule(config, model, swept_values(keys, hp)),
                hps,
                plan.stream,
                seeds=[s for s, _ in members],
                member_axis=config.train.member_axis,
                **common,
            )
            per_member = [
                (
                    (s, v),
                    result.accuracy_matrix[m],
                    result.random_baseline[m],
                    result.losses[m],
                    result.train_accuracy[m],
                    None if result.task_metrics is None else {k: v[m] for k, v in result.task_metrics.items()},
                    None
                    if result.eval_curves is None
                    else {**result.eval_curves, "accuracy": result.eval_curves["accuracy"][m]},
                    method.results(result.rule_state, m),
                )
                for m, (s, v) in enumerate(members)
            ]
    finally:
        if log is not None:
            log.close()
    member_rows = {}
    for who, acc, baseline, losses, train_acc, task_metrics, curves, method_results in per_member:
        results = {
            "method": name,
            "accuracy_matrix": acc,
            **summarize(acc, baseline, config.eval.tasks),
            "random_baseline": baseline,
            "wall_seconds": result.wall_seconds,
            "train_seconds": result.train_seconds,
            "data_seconds": result.data_seconds,
            "epoch_losses": losses,
            # online accuracy per (task, epoch): the params' accuracy on each training example just before the
            # step that learned it; online_acc is its mean over tasks in the first epoch (the plasticity metric)
            "epoch_train_accuracy": train_acc,
            "online_acc": float(np.mean(train_acc[:, 0])),
            "online_accuracy": train_acc[:, 0],  # per task: the curve the plasticity papers plot
            **({"task_metrics": task_metrics} if task_metrics is not None else {}),
            **(continual_results(curves) if curves is not None else {}),
            "config": config.to_dict(),
            "environment": environment(),
            **extra,
            **method_results,
        }
        if result.resumed_from is not None:
            results["resumed_from"] = result.resumed_from
        member_out = out
        if who is not None:
            results["member"] = {
                "seed": who[0],
                "members": len(members),
                **(swept_values(keys, who[1]) or {}),
            }
            member_out = os.path.join(out, _member_name(who[0], who[1], keys))
        if jax.process_index() == 0:
            report.write_results(member_out, results)
        member_rows[member_out] = results
    first = next(iter(member_rows.values()))
    if per_member[0][0] is None:
        print(
            f"{name}: ACC {100 * first['acc']:.2f}%  BWT {100 * first['bwt']:.2f}%  "
            f"online acc {100 * first['online_acc']:.2f}%  wall {result.wall_seconds:.1f}s  "
            f"-> {os.path.join(out, 'results.json')}",
            flush=True,
        )
        return first
    summary = _members_summary(name, members, keys, member_rows, result.wall_seconds)
    if jax.process_index() == 0:
        with open(os.path.join(out, "members_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    for group in summary["groups"]:
        print(
            f"{name} {group['name']}: ACC {100 * group['acc_mean']:.2f} +- {100 * group['acc_std']:.2f}%  "
            f"BWT {100 * group['bwt_mean']:.2f} +- {100 * group['bwt_std']:.2f}%  "
            f"online acc {100 * group['online_acc_mean']:.2f} +- {100 * group['online_acc_std']:.2f}%  "
            f"({group['members']} seeds)",
            flush=True,
        )
    print(
        f"{name}: {len(members)} members in one run (fit_members), wall {result.wall_seconds:.1f}s -> "
        f"{os.path.join(out, 'members_summary.json')}",
        flush=True,
    )
    return first


def continual_results(curves: dict) -> dict:
    """results.json's continual-evaluation entries: min-ACC, WC-ACC and the stability gap (``clx.metrics.
    continual_metrics``) and the curves themselves (``continual_eval``: task, step, global_step, accuracy)."""
    return {
        **clx.metrics.continual_metrics(curves["accuracy"], curves["task"]),
        "continual_eval": dict(curves),
    }


def summarize(R, baseline, evaluate: str = "seen") -> dict:
    """``clx.metrics.summarize``; with ``evaluate="current"`` (only R[t, t] and R[t, t+1] scored) the metrics those
    entries define (FWT, learning accuracy), and NaN for ACC, BWT and forgetting, which need old tasks' scores."""
    if evaluate == "seen":
        return clx.metrics.summarize(R, baseline)
    T = len(baseline)
    return {
        "acc": float("nan"),
        "bwt": float("nan"),
        "fwt": clx.metrics.fwt(R, baseline) if T > 1 else float("nan"),
        "forgetting": float("nan"),
        "learning_accuracy": clx.metrics.learning_accuracy(R),
    }


def environment() -> dict:
    """Where the results came from: package versions, backend, devices, processes, CPUs, Python."""
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        **versions,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _value_name(value, keys) -> str:
    """``gpm.threshold=0.97`` or, for two keys, ``ewc.lam=10_train.lr=0.01``."""
    return "_".join(f"{k}={v:g}" for k, v in swept_values(keys, value).items())


def _member_name(seed, value, keys):
    return f"seed_{seed}" if value is None else f"{_value_name(value, keys)}_seed_{seed}"


def _fingerprint_config(config, chosen) -> dict:
    """The config without the keys of ``_NOT_FINGERPRINTED`` and the blocks of registered methods not chosen."""
    d = config.to_dict()
    for name in set(methods.METHODS) - {m.name for m in chosen}:
        d.pop(name, None)
    for k in _NOT_FINGERPRINTED:
        section, _, leaf = k.rpartition(".")
        (d.get(section, {}) if section else d).pop(leaf, None)
    return d


def _members_summary(name, members, keys, member_rows, wall) -> dict:
    """Mean and std (ddof=0) of every metric over each sweep value's seeds (one group without a sweep)."""
    rows = list(member_rows.values())
    groups = {}
    for (seed, value), row in zip(members, rows):
        groups.setdefault(value, []).append(row)
    out = {
        "method": name,
        "sweep_key": keys[0] if keys else None,
        "sweep_keys": list(keys),
        "members": len(members),
        "wall_seconds": wall,
        "member_dirs": [os.path.basename(d) for d in member_rows],
        "groups": [],
    }
    for value, grp in groups.items():
        g = {
            "name": "all seeds" if value is None else _value_name(value, keys),
            "value": list(value) if isinstance(value, tuple) else value,
            "members": len(grp),
            "seeds": [r["member"]["seed"] for r in grp],
        }
        for m in METRICS:
            vals = np.array([float(r[m]) for r in grp])
            g[f"{m}_mean"], g[f"{m}_std"] = float(np.mean(vals)), float(np.std(vals))
        out["groups"].append(g)
    return out
