r"""Runs a continual-learning experiment from a config file.

    python -m experiments.main --config experiments/configs/digits_default.py --workdir runs/demo
    python -m experiments.main --config experiments/configs/pmnist_gpm.py --workdir runs/pmnist \
        --config.method=gpm --config.seed=3

Every method of ``config.method`` (comma-separated) runs on the same stream from
the same initial params. One method writes ``results.json``,
``accuracy_matrix.csv`` and ``accuracy_matrix.png`` into ``--workdir``; several
write them into ``--workdir/<method>/`` plus ``summary.json`` / ``summary.txt``.
Everything that can be wrong with the config or the data is checked before
anything in ``--workdir`` is written.

Scale and survival (docs/scaling.md):

- ``config.seeds`` (several) and ``config.sweep`` (a grid of one scalar
  hyperparameter) run as *members* of one vmapped program; each member writes
  its results into ``<out>/<member>/`` (``seed_3`` or ``gpm.threshold=0.97_seed_3``)
  and ``<out>/members_summary.json`` holds the mean and std over members.
- Checkpoints go to ``<out>/checkpoints`` (``config.checkpoint``); starting again
  with a workdir that holds one resumes it (a checkpoint of another config is an
  error that lists what differs).
- With several devices, training is data parallel over ``jax.make_mesh``
  (``config.mesh``); ``config.distributed.enabled`` starts multi-host JAX first.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import clx
from clx import data
from clx import sharding
from clx.train import CheckpointOptions, fit, fit_members
from experiments import methods, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json, the accuracy matrix CSV and PNG.")


def prepare(config):
    """Validates the config and loads the data; writes nothing.

    Returns:
      (method names, {name: MethodSpec}, stream).

    Raises:
      ValueError / FileNotFoundError: unknown method, stream kind or dataset name,
        a bad threshold, missing or corrupt data, labels out of range.
    """
    names = methods.parse(config.method)
    if config.stream.kind not in data.KINDS:
        raise ValueError(f"unknown stream.kind {config.stream.kind!r}; choose one of {sorted(data.KINDS)}.")
    specs = {m: methods.build(m, config) for m in names}
    source = data.load_source(config.data.source, config.data.dir or None, scale=config.data.scale,
                              pad=config.data.pad)
    stream = data.make_stream(
        source, config.stream.kind, config.stream.num_tasks, seed=config.seed,
        max_angle=config.stream.max_angle, class_order=config.stream.class_order,
        train_subset=config.stream.train_subset or None,
    )
    return names, specs, stream


SWEEP_KEYS = ("gpm.threshold", "train.lr")
# Config keys that do not change what a run computes, left out of the checkpoint fingerprint.
_NOT_FINGERPRINTED = ("progress", "checkpoint", "mesh", "distributed", "data.dir")


def _members(config) -> list[tuple[int, float | None]]:
    """(seed, sweep value) of every member: values x seeds; one member (seed, None) without seeds or sweep."""
    seeds = [int(s) for s in (config.seeds or (config.seed,))]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds repeats a seed: {list(config.seeds)}.")
    if not config.sweep.key:
        if len(config.sweep.grid):
            raise ValueError("config.sweep.grid is set but config.sweep.key is empty; name the hyperparameter, "
                             f"one of {SWEEP_KEYS}.")
        return [(s, None) for s in seeds]
    if config.sweep.key not in SWEEP_KEYS:
        raise ValueError(f"config.sweep.key={config.sweep.key!r} cannot be swept; choose one of {SWEEP_KEYS}.")
    values = [float(v) for v in config.sweep.grid]
    if not values:
        raise ValueError(f"config.sweep.key={config.sweep.key!r} needs config.sweep.grid, e.g. (0.95, 0.97, 0.99).")
    if config.sweep.key == "gpm.threshold":
        for v in values:
            clx.subspace.check_threshold(v)
    elif not all(v > 0 for v in values):
        raise ValueError(f"train.lr sweep.grid must be > 0, got {values}.")
    return [(s, v) for v in values for s in seeds]


def _check_sweep(name, spec, config):
    """Raises ValueError if the method cannot sweep ``config.sweep.key`` (checked before anything is written)."""
    key = config.sweep.key
    if not key:
        return
    if spec.rule_for is None:
        raise ValueError(f"config.sweep.key={key!r} is not supported for method {name!r}: it has no sweepable "
                         "hyperparameter.")
    spec.rule_for(key, float(config.sweep.grid[0]))  # the key is one this method sweeps


def _rule_fn(spec, config, model):
    """hyperparameter -> rule for ``model`` (the value may be a traced scalar inside jit)."""
    key = config.sweep.key
    if not key:
        rule = spec.rule_with(model)
        return lambda hp: rule
    return lambda hp: spec.rule_for(key, hp)


def _member_name(seed, value, key):
    return f"seed_{seed}" if value is None else f"{key}={value:g}_seed_{seed}"


def _fingerprint_config(config) -> dict:
    d = config.to_dict()
    for k in _NOT_FINGERPRINTED:
        section, _, leaf = k.rpartition(".")
        (d.get(section, {}) if section else d).pop(leaf, None)
    return d


def make_mesh(config):
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
    names, specs, stream = prepare(config)
    members = _members(config)
    mesh = make_mesh(config)
    if mesh is not None:
        sharding.check_batch_size(config.train.batch_size, mesh)
    for name in names:
        _check_sweep(name, specs[name], config)
    rows = {}
    for name in names:
        spec = specs[name]
        out = workdir if len(names) == 1 else os.path.join(workdir, name)
        ckpt = None
        if config.checkpoint.enabled:
            ckpt = CheckpointOptions(os.path.join(out, "checkpoints"), every_steps=int(config.checkpoint.every_steps),
                                     max_to_keep=int(config.checkpoint.max_to_keep),
                                     info={"method": name, "config": _fingerprint_config(config)})
        common = dict(epochs=config.train.epochs, batch_size=config.train.batch_size,
                      evidence_samples=spec.evidence_samples, cumulative=spec.cumulative,
                      eval_batch_size=config.train.eval_batch_size, progress=config.progress, desc=f"{name} ",
                      mesh=mesh, checkpoint=ckpt, on_save=on_save)
        if len(members) == 1 and not config.sweep.key:  # the plain path (bit-identical to a run without members)
            seed = members[0][0]
            model, params = spec.build_model(config, stream, seed)
            result = fit(model, params, spec.rule_with(model), stream, seed=seed, **common)
            per_member = [(None, result.accuracy_matrix, result.random_baseline, result.losses,
                           _ranks(name, result.rule_state, None))]
            member_params = result.params
        else:
            built = [spec.build_model(config, stream, s) for s, _ in members]
            model = built[0][0]
            hps = [0.0 if v is None else v for _, v in members]
            result = fit_members(model, [p for _, p in built], _rule_fn(spec, config, model), hps, stream,
                                 seeds=[s for s, _ in members], **common)
            per_member = [((s, v), result.accuracy_matrix[m], result.random_baseline[m], result.losses[m],
                           _ranks(name, result.rule_state, m)) for m, (s, v) in enumerate(members)]
            member_params = built[0][1]
        # Model-specific facts (e.g. a hypernetwork's compression ratio); they depend on shapes only.
        extra = model.extra_results(member_params) if hasattr(model, "extra_results") else {}
        member_rows = {}
        for who, acc, baseline, losses, ranks in per_member:
            summary = clx.metrics.summarize(acc, baseline)
            results = {
                "method": name,
                "accuracy_matrix": acc,
                **summary,
                "random_baseline": baseline,
                "wall_seconds": result.wall_seconds,
                "train_seconds": result.train_seconds,
                "data_seconds": result.data_seconds,
                "epoch_losses": losses,
                "config": config.to_dict(),
                "environment": {
                    "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                    "processes": jax.process_count(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                },
            }
            results.update(extra)
            if result.resumed_from is not None:
                results["resumed_from"] = result.resumed_from
            if ranks is not None:
                results["gpm_basis_ranks"] = ranks
            member_out = out
            if who is not None:
                results["member"] = {"seed": who[0], "members": len(members),
                                     **({config.sweep.key: who[1]} if who[1] is not None else {})}
                member_out = os.path.join(out, _member_name(who[0], who[1], config.sweep.key))
            if jax.process_index() == 0:
                report.write_results(member_out, results)
            member_rows[member_out] = results
        results = next(iter(member_rows.values()))
        if who is not None:
            summary = _members_summary(name, members, config.sweep.key, member_rows, result.wall_seconds)
            if jax.process_index() == 0:
                with open(os.path.join(out, "members_summary.json"), "w") as f:
                    json.dump(summary, f, indent=2)
            for group in summary["groups"]:
                print(f"{name} {group['name']}: ACC {100 * group['acc_mean']:.2f} +- {100 * group['acc_std']:.2f}%  "
                      f"BWT {100 * group['bwt_mean']:.2f} +- {100 * group['bwt_std']:.2f}%  ({group['members']} seeds)",
                      flush=True)
            print(f"{name}: {len(members)} members in one vmapped program, wall {result.wall_seconds:.1f}s -> "
                  f"{os.path.join(out, 'members_summary.json')}", flush=True)
        else:
            print(f"{name}: ACC {100 * results['acc']:.2f}%  BWT {100 * results['bwt']:.2f}%  "
                  f"wall {result.wall_seconds:.1f}s  -> {os.path.join(out, 'results.json')}", flush=True)
        rows[name] = results
    if len(names) > 1 and jax.process_index() == 0:
        print(report.write_summary(workdir, rows))
    return rows


def _ranks(name, rule_state, member):
    if name != "gpm":
        return None
    masks = {k: np.asarray(s.mask) for k, s in rule_state[0].subspaces.items()}
    return {k: int(m.sum() if member is None else m[member].sum()) for k, m in masks.items()}


METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_accuracy")


def _members_summary(name, members, key, member_rows, wall) -> dict:
    """Mean and std (ddof=0) of every metric over each sweep value's seeds (one group without a sweep)."""
    rows = list(member_rows.values())
    groups = {}
    for (seed, value), row in zip(members, rows):
        groups.setdefault(value, []).append(row)
    out = {"method": name, "sweep_key": key or None, "members": len(members), "wall_seconds": wall,
           "member_dirs": [os.path.basename(d) for d in member_rows], "groups": []}
    for value, grp in groups.items():
        g = {"name": "all seeds" if value is None else f"{key}={value:g}", "value": value, "members": len(grp),
             "seeds": [r["member"]["seed"] for r in grp]}
        for m in METRICS:
            vals = np.array([float(r[m]) for r in grp])
            g[f"{m}_mean"], g[f"{m}_std"] = float(np.mean(vals)), float(np.std(vals))
        out["groups"].append(g)
    return out


class _QuietOrbax(pylogging.Filter):
    """orbax logs every save at INFO; keep its warnings (e.g. a corrupt checkpoint) only."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("both --config and --workdir are required.")
    config = _CONFIG.value
    if config.distributed.enabled:  # before anything touches a device
        d = config.distributed
        sharding.initialize_distributed(d.coordinator_address or None, d.num_processes or None,
                                        None if d.process_id < 0 else d.process_id)
    logging.set_verbosity(logging.INFO if not _CONFIG.value.progress else logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietOrbax())
    t0 = time.time()
    run(_CONFIG.value, _WORKDIR.value)
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
