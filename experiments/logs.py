"""TensorBoard event files written as a run goes (tensorboardX: no TensorFlow needed).

``TensorBoardLog(dirs, method, epochs)`` is a ``clx.fit(..., on_task_end=)`` callback: after each
task it writes, into one event directory per member (``<workdir>/<method>[/<member>]/tensorboard``):

=============================  ==============================  ===========================================
tag                            step                            value
=============================  ==============================  ===========================================
``train/loss``                 epochs trained in the run       the epoch's mean training loss
``train/online_accuracy``      tasks trained                   the task's first-epoch online accuracy
``accuracy/task_<j>``          tasks trained                   test accuracy on task j (j seen), fraction
``accuracy/acc_seen``          tasks trained                   mean test accuracy over the tasks seen
``continual_eval/task_<j>``    optimizer steps in the run      task j's subsample accuracy (eval.every_steps)
``plasticity/<name>``          tasks trained                   ``eval.plasticity_metrics`` diagnostics
``method/<name>[/<key>...]``   tasks trained                   the method's own numbers (basis ranks, ...)
``time/wall_seconds``          tasks trained                   the run's wall time so far
=============================  ==============================  ===========================================

``tensorboard --logdir <workdir>`` shows every method (and member) of a run side by side. A
resumed run appends to the same directories; the tasks it redoes are written again at the same
steps (TensorBoard draws the last value).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: The subdirectory of a method's (or member's) output directory that holds its event files.
SUBDIR = "tensorboard"


def _scalars(prefix: str, value: Any):
    """(tag, float) for every finite number in a nested dict / list of numbers (a method's results)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _scalars(f"{prefix}/{k}", v)
    elif isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim):
        for i, v in enumerate(value):
            yield from _scalars(f"{prefix}/{i}", v)
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return
        if math.isfinite(v):
            yield prefix, v


class TensorBoardLog:
    """Writes a run's scalars to TensorBoard event files, task by task (see the module docstring).

    Args:
      dirs: one output directory per member (a single run: one); events go to ``<dir>/tensorboard``.
      method_results: ``(rule_state, member) -> dict`` (the registry's ``Method.results``), read at each
        task end; ``member`` is None for a single run, else the member's index.
      epochs: epochs per task (the step of ``train/loss``).
      members: whether ``fit``'s arrays carry a leading member axis (``fit_members``, even with one
        member, e.g. a one-value sweep); None: when there is more than one directory.
    """

    def __init__(
        self,
        dirs: Sequence[str],
        method_results: Callable[[Any, int | None], dict],
        epochs: int,
        members: bool | None = None,
    ):
        from tensorboardX import SummaryWriter

        self.writers = [SummaryWriter(os.path.join(d, SUBDIR), flush_secs=30) for d in dirs]
        self.members = len(dirs) > 1 if members is None else bool(members)
        self.method_results = method_results
        self.epochs = int(epochs)

    def __call__(self, t: int, info: dict) -> None:
        for m, w in enumerate(self.writers):
            one = (lambda a: np.asarray(a)[m]) if self.members else np.asarray
            step = t + 1
            for e, loss in enumerate(one(info["losses"])):
                w.add_scalar("train/loss", float(loss), t * self.epochs + e + 1)
            w.add_scalar("train/online_accuracy", float(one(info["train_accuracy"])[0]), step)
            row = one(info["accuracy"])
            for j in range(t + 1):
                if np.isfinite(row[j]):
                    w.add_scalar(f"accuracy/task_{j}", float(row[j]), step)
            seen = row[: t + 1]
            if np.isfinite(seen).any():
                w.add_scalar("accuracy/acc_seen", float(np.nanmean(seen)), step)
            for name, value in info["task_metrics"].items():
                w.add_scalar(f"plasticity/{name}", float(one(value)), step)
            curves = info.get("eval_curves")
            if curves is not None:
                acc = one(curves["accuracy"])
                for g, accs in zip(curves["global_step"], acc):
                    for j in range(t + 1):
                        w.add_scalar(f"continual_eval/task_{j}", float(accs[j]), int(g))
            for tag, v in _scalars("method", self.method_results(info["rule_state"], m if self.members else None)):
                w.add_scalar(tag, v, step)
            w.add_scalar("time/wall_seconds", float(info["wall_seconds"]), step)
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
