"""Preemption-safe checkpoints of a continual-learning run (orbax-checkpoint).

A checkpoint holds everything needed to continue a stream exactly where it
stopped: the params, the whole rule state (optimizer state, bases, masks,
anchors, buffers -- any pytree), the PRNG key data, the accuracy matrix and
random baseline so far, the epoch losses, and, as JSON, the position in the
stream (task, epoch, step), timings and a *fingerprint* of the run (shapes and
dtypes of every saved array, method, stream, epochs, batch size, seeds).

``Checkpointer`` wraps an ``orbax.checkpoint.CheckpointManager`` with
``args.Composite(state=StandardSave, meta=JsonSave)``; saves are asynchronous
(the trainer continues while the arrays are written), ``max_to_keep`` recent
ones are kept, and a half-written save is never visible (orbax writes to a
temporary directory and renames it when done).

``restore(target)`` tries the newest checkpoint first. If it cannot be read
(truncated or corrupt files), it says so (a warning naming the step, the
directory and the error) and uses the previous one; if none can be read it
raises instead of silently starting over. A checkpoint written by a different
config raises ``CheckpointMismatchError`` listing what differs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from clx.tree import path_str

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint was written by a run with a different config."""


def describe(tree: Any) -> dict[str, list]:
    """``{'/'-joined path: [shape, dtype]}`` of every leaf of a pytree (arrays or ShapeDtypeStructs)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[path_str(path) or "."] = [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
    return out


def _diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    lines = []
    for k in sorted(set(saved) | set(now)):
        name = f"{prefix}{k}"
        if k not in saved:
            lines.append(f"{name}: absent in the checkpoint, {now[k]!r} now")
        elif k not in now:
            lines.append(f"{name}: {saved[k]!r} in the checkpoint, absent now")
        elif isinstance(saved[k], dict) and isinstance(now[k], dict):
            lines.extend(_diff(saved[k], now[k], name + "."))
        elif saved[k] != now[k]:
            lines.append(f"{name}: {saved[k]!r} in the checkpoint, {now[k]!r} now")
    return lines


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Converts numpy/JAX values, tuples, sets, paths, ConfigDicts and dataclasses to JSON types.

    Used for checkpoint metadata and for the experiment script's results files;
    ``where`` names the value in the warning below.

    NaN and infinities stay floats (``json`` writes them as ``NaN``/``Infinity``). An
    object of an unknown type is written as its ``str`` with a warning rather than
    failing: losing a finished run's results over one odd config value is worse.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), where)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        return to_jsonable(obj.to_dict(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where)
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "__array__"):  # jax.Array and friends
        return to_jsonable(np.asarray(obj), where)
    warnings.warn(
        f"{where}: {type(obj).__name__} is not JSON-serialisable; writing str(value)",
        stacklevel=3,
    )
    return str(obj)


class Checkpointer:
    """Saves and restores one run's checkpoints in ``directory``.

    Args:
      directory: where the numbered checkpoint directories live (created).
      fingerprint: a JSON-able dict describing the run; ``restore`` refuses a
        checkpoint whose fingerprint differs (``CheckpointMismatchError``).
      max_to_keep: how many recent checkpoints to keep (>= 2, so that a corrupt
        newest one has a predecessor).
      async_save: write in a background thread (``wait`` before exiting).

    Raises:
      ValueError: ``max_to_keep < 2``.
    """

    def __init__(self, directory: str, fingerprint: dict, *, max_to_keep: int = 3, async_save: bool = True):
        if int(max_to_keep) < 2:
            raise ValueError(
                f"max_to_keep must be >= 2 so that a corrupt newest checkpoint has a fallback, got {max_to_keep}."
            )
        import orbax.checkpoint as ocp  # imported here: `import clx` stays fast

        self._ocp = ocp
        self.directory = directory if "://" in str(directory) else os.path.abspath(directory)
        self.fingerprint = to_jsonable(fingerprint)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep), create=True, enable_async_checkpointing=async_save
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        self._next = (max(self._mngr.all_steps()) + 1) if self._mngr.all_steps() else 0

    def steps(self) -> list[int]:
        """The finalized checkpoint numbers, oldest first."""
        return sorted(self._mngr.all_steps())

    def save(self, tree: Any, meta: dict) -> int:
        """Starts saving ``tree`` (arrays) and ``meta`` (JSON) as the next checkpoint; returns its number.

        Asynchronous: returns once the arrays are copied off the devices.
        """
        ocp = self._ocp
        step = self._next
        meta = to_jsonable({**meta, "fingerprint": self.fingerprint})
        self._mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True
        )
        self._next += 1
        return step

    def restore(self, target: Any) -> tuple[Any, dict] | None:
        """The newest readable checkpoint as ``(tree, meta)``, or None if the directory has none.

        Args:
          target: a pytree of arrays or ``jax.ShapeDtypeStruct`` (with the wanted
            ``sharding``) of the same structure as the saved tree; arrays are
            restored with its shapes, dtypes and shardings.

        Raises:
          CheckpointMismatchError: the checkpoint's fingerprint (config, shapes)
            differs from this run's; the message lists every difference.
          RuntimeError: checkpoints exist but none can be read.
        """
        ocp = self._ocp
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(
            lambda a: (
                jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=getattr(a, "sharding", None))
                if isinstance(a, (jax.Array, jax.ShapeDtypeStruct))
                else a
            ),
            target,
        )
        errors = []
        for step in steps:
            try:
                meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 -- any unreadable file means: try the previous one
                errors.append((step, e))
                self._warn(step, e, steps)
                continue
            saved = meta.get("fingerprint", {})
            if saved != self.fingerprint:
                diff = _diff(saved, self.fingerprint)
                raise CheckpointMismatchError(
                    f"the checkpoint {step} in {self.directory} was written by a different run:\n  "
                    + "\n  ".join(diff[:20])
                    + ("\n  ..." if len(diff) > 20 else "")
                    + "\nUse a fresh --workdir (or delete its 'checkpoints' directory) to start this config over, "
                    "or rerun with the checkpoint's config to resume it."
                )
            try:
                tree = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
                    "state"
                ]
                jax.block_until_ready(tree)
            except Exception as e:  # noqa: BLE001
                errors.append((step, e))
                self._warn(step, e, steps)
                continue
            if errors:
                print(
                    f"clx.checkpoint: resumed from checkpoint {step} in {self.directory} "
                    f"(newer ones unreadable: {[s for s, _ in errors]}).",
                    file=sys.stderr,
                    flush=True,
                )
            self._next = max(steps) + 1
            return tree, meta
        raise RuntimeError(
            f"none of the checkpoints {sorted(steps)} in {self.directory} can be read "
            f"(newest error: {type(errors[0][1]).__name__}: {str(errors[0][1]).splitlines()[0][:300]}); "
            "delete that directory to start the run over."
        )

    def _warn(self, step, error, steps):
        older = [s for s in steps if s < step]
        msg = (
            f"clx.checkpoint: checkpoint {step} in {self.directory} is unreadable "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}); "
            + (f"falling back to checkpoint {older[0]}." if older else "no older checkpoint left.")
        )
        log.warning(msg)
        print(msg, file=sys.stderr, flush=True)

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()
