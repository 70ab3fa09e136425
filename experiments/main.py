r"""Runs a continual-learning experiment from a config file.

    python -m experiments.main --config experiments/configs/digits_default.py --workdir runs/demo
    python -m experiments.main --config experiments/configs/pmnist_gpm.py --workdir runs/pmnist \
        --config.method=gpm --config.seed=3

A user error (a bad config value, missing or corrupt data, a workdir that cannot
be written, a checkpoint of another run) prints ``error: <problem>`` and its fix in
one or two lines and exits with status 1 (``--traceback``: the traceback instead);
any other exception keeps its traceback.

This file is intentionally kept short: the run is ``experiments.run.run`` (results
and checks: its docstring), the methods are ``experiments.methods`` entries.

Scale and survival (docs/scaling.md):

- ``config.seeds`` (several) and ``config.sweep`` (a grid of one scalar
  hyperparameter) run as *members* of one ``clx.fit_members`` run (vmapped on a
  GPU, one after another on a CPU); each member writes its results into
  ``<out>/<member>/`` (``seed_3`` or ``gpm.threshold=0.97_seed_3``)
  and ``<out>/members_summary.json`` holds the mean and std over members.
- Checkpoints go to ``<out>/checkpoints`` (``config.checkpoint``); starting again
  with a workdir that holds one resumes it (a checkpoint of another config is an
  error that lists what differs).
- With several devices, training is data parallel over ``jax.make_mesh``
  (``config.mesh``); ``config.distributed.enabled`` starts multi-host JAX first.
"""

import logging as pylogging
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from clx import sharding
from experiments.run import run  # also importable as experiments.main.run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json, the accuracy matrix CSV and PNG.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of a bad config, data or checkpoint error too.")

# What the user can fix: a config value, the data, the workdir (OSError: missing, a file, read-only, full), a
# checkpoint of another run or a damaged one (clx.checkpoint's errors are ValueErrors), a module TFDS needs.
# Printed as `error: <message>`, exit status 1; any other exception keeps its traceback.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError)


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
        sharding.initialize_distributed(
            d.coordinator_address or None, d.num_processes or None, None if d.process_id < 0 else d.process_id
        )
    logging.set_verbosity(logging.INFO if not config.progress else logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietOrbax())
    t0 = time.time()
    try:
        run(config, _WORKDIR.value)
    except USER_ERRORS as e:
        if _TRACEBACK.value:
            raise
        print(user_error(e), file=sys.stderr)
        sys.exit(1)
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)


def user_error(e: BaseException) -> str:
    """``error: <message>`` in at most two lines: the problem (a long list of details joined), then the fix."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    if len(lines) > 2:
        details = lines[1:-1]
        more = f" (+{len(details) - 3} more)" if len(details) > 3 else ""
        lines = [f"{lines[0]} {'; '.join(details[:3])}{more}", lines[-1]]
    lines[-1] += " (rerun with --traceback for the traceback)"
    return "error: " + "\n  ".join(lines)


if __name__ == "__main__":
    app.run(main)
