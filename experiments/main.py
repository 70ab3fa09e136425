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
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import clx
from clx import data
from clx.train import fit
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
    source = data.load_source(config.data.source, config.data.dir or None)
    stream = data.make_stream(
        source, config.stream.kind, config.stream.num_tasks, seed=config.seed,
        max_angle=config.stream.max_angle, class_order=config.stream.class_order,
        train_subset=config.stream.train_subset or None,
    )
    return names, specs, stream


def run(config, workdir: str) -> dict[str, dict]:
    """Runs every method of the config; returns {method: results dict}."""
    names, specs, stream = prepare(config)
    rows = {}
    for name in names:
        spec = specs[name]
        model, params = spec.build_model(config, stream, config.seed)
        result = fit(
            model, params, spec.rule, stream, epochs=config.train.epochs, batch_size=config.train.batch_size,
            seed=config.seed, evidence_samples=spec.evidence_samples, cumulative=spec.cumulative,
            eval_batch_size=config.train.eval_batch_size, progress=config.progress, desc=f"{name} ",
        )
        summary = clx.metrics.summarize(result.accuracy_matrix, result.random_baseline)
        results = {
            "method": name,
            "accuracy_matrix": result.accuracy_matrix,
            **summary,
            "random_baseline": result.random_baseline,
            "wall_seconds": result.wall_seconds,
            "train_seconds": result.train_seconds,
            "data_seconds": result.data_seconds,
            "epoch_losses": result.losses,
            "config": config.to_dict(),
            "environment": {
                "jax": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
                "cpu_count": os.cpu_count(), "python": platform.python_version(),
            },
        }
        if name == "gpm":
            ranks = {k: int(s.mask.sum()) for k, s in result.rule_state[0].subspaces.items()}
            results["gpm_basis_ranks"] = ranks
        out = workdir if len(names) == 1 else os.path.join(workdir, name)
        report.write_results(out, results)
        rows[name] = results
        print(f"{name}: ACC {100 * summary['acc']:.2f}%  BWT {100 * summary['bwt']:.2f}%  "
              f"wall {result.wall_seconds:.1f}s  -> {os.path.join(out, 'results.json')}", flush=True)
    if len(names) > 1:
        print(report.write_summary(workdir, rows))
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("both --config and --workdir are required.")
    logging.set_verbosity(logging.INFO if not _CONFIG.value.progress else logging.WARNING)
    t0 = time.time()
    run(_CONFIG.value, _WORKDIR.value)
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
