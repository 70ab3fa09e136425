"""Preemption-safe checkpoints of a continual-learning run (orbax-checkpoint).

A checkpoint holds everything needed to continue a stream exactly where it
stopped: the params, the whole rule state (optimizer state, bases, masks,
anchors, buffers -- any pytree), the PRNG key data, the accuracy matrix and
random baseline so far, the epoch losses, and, as JSON, the position in the
stream (task, epoch, step), timings, a *fingerprint* of the run and checksums.

The fingerprint is what the caller describes (``clx.fit``: shapes and dtypes of
every saved array, method, stream, epochs, batch size, seeds) plus the code
that computes the run (``code_fingerprint``: the clx version, a SHA-256 of the
clx package's source files, the versions of jax, jaxlib, flax, optax,
orbax-checkpoint and numpy). The git commit and whether the tree is dirty
(``code_provenance``) are stored beside it and shown when a resume is refused,
but not compared: the source hash already tells whether the code differs, and a
commit or an edit outside clx does not change what a run computes. The entries
named in ``MAY_CHANGE`` (``every_steps``: how often a run saves) are stored but
may differ on resume.

Integrity: ``save`` copies every array to the host (the copy orbax then writes)
and stores the SHA-256 of each array's bytes (``array_sha256``) and of the
metadata itself (``meta_sha256``) in the JSON metadata; ``restore`` checks both
before returning, so damaged data is never trained on.

``Checkpointer`` wraps an ``orbax.checkpoint.CheckpointManager`` with
``args.Composite(state=StandardSave, meta=JsonSave)``; saves are asynchronous
(the trainer continues while the arrays are written), ``max_to_keep`` recent
ones are kept, and a half-written save is never visible (orbax writes to a
temporary directory and renames it when done).

``restore(target)`` tries the newest checkpoint first. If it cannot be read
(truncated or corrupt files) or a checksum does not match (a
``CheckpointCorruptError`` in the warning), it says so (a warning naming the
step, the directory and the reason) and uses the previous one; if
none can be used it raises instead of silently starting over. A checkpoint
written by a different config or different code raises
``CheckpointMismatchError`` listing what differs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from clx.tree import path_str

log = logging.getLogger(__name__)


# Distributions whose versions are part of every checkpoint's fingerprint (with clx's own source hash).
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# Top-level fingerprint entries that are stored but may differ on resume: how often a run saves
# does not change what it computes (``clx.fit`` scans the same batches in whatever chunks).
MAY_CHANGE = ("every_steps",)


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint was written by a run with a different config or different code."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's data or metadata does not match the checksums stored with it."""


def source_sha256(root: str, *parts: str) -> str:
    """SHA-256 over the sorted relative paths and contents of the ``*.py`` files under ``root``.

    ``parts`` (files or directories relative to ``root``) restrict it to those;
    none: all of ``root``. ``__pycache__`` and hidden directories are skipped; paths
    are '/'-joined relative to ``root``, so the hash does not depend on where the
    code lives or on the operating system.
    """
    files = []
    for part in parts or (".",):
        top = os.path.join(root, part)
        if os.path.isfile(top):
            files.append(top)
        for base, dirs, names in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            files += [os.path.join(base, n) for n in names if n.endswith(".py")]
    h = hashlib.sha256()
    for rel, path in sorted({os.path.relpath(f, root).replace(os.sep, "/"): f for f in files}.items()):
        with open(path, "rb") as f:
            data = f.read()
        h.update(len(rel.encode()).to_bytes(8, "little") + rel.encode() + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _clx_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> dict:
    """The code a run is computed with: ``{'clx_version', 'clx_source_sha256', 'libraries': {dist: version}}``.

    Part of every checkpoint's fingerprint: a checkpoint written by other clx
    source files or other library versions is refused on restore. Computed once
    per process (the source that was imported).
    """
    return {
        "clx_version": _version("clx"),
        "clx_source_sha256": source_sha256(_clx_dir()),
        "libraries": {dist: _version(dist) for dist in LIBRARIES},
    }


@functools.lru_cache(maxsize=1)
def code_provenance() -> dict:
    """``{'git_commit', 'git_dirty'}`` of the git checkout clx is imported from (None, None outside one).

    Stored with every checkpoint and shown when a resume is refused; not compared.
    Asks git with a 5 s timeout; no git, a timeout or an installed (non-checkout) clx give None.
    """
    root = os.path.dirname(_clx_dir())

    def git(*args):
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return {"git_commit": None, "git_dirty": None}  # clx installed inside some other repository
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def _array_sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.view(np.uint8).reshape(-1) if a.size else b"").hexdigest()


def _meta_sha256(meta: dict) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its ``meta_sha256`` entry."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _host_array(leaf, copy: bool = True):
    """The bytes of an array leaf on the host (a private copy: what gets written and hashed), or None.

    None (the leaf is saved as it is, without a checksum) for a multi-host array this
    process holds only its shards of, a typed PRNG key array and anything not an array.
    """
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return None
        return np.array(leaf, copy=True) if copy else np.asarray(leaf)
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np.array(leaf, copy=True) if copy else np.asarray(leaf)
    return None


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
      fingerprint: a JSON-able dict describing the run; ``code_fingerprint()`` is
        added as its ``'code'`` entry. ``restore`` refuses a checkpoint whose
        fingerprint differs (``CheckpointMismatchError``), except in the
        top-level keys of ``may_change``.
      max_to_keep: how many recent checkpoints to keep (>= 2, so that a corrupt
        newest one has a predecessor).
      async_save: write in a background thread (``wait`` before exiting).
      may_change: top-level fingerprint keys that may differ on resume (stored,
        not compared): settings that do not change what the run computes.

    Raises:
      ValueError: ``max_to_keep < 2``.
    """

    def __init__(
        self,
        directory: str,
        fingerprint: dict,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        may_change: tuple[str, ...] = MAY_CHANGE,
    ):
        if int(max_to_keep) < 2:
            raise ValueError(
                f"max_to_keep must be >= 2 so that a corrupt newest checkpoint has a fallback, got {max_to_keep}."
            )
        import orbax.checkpoint as ocp  # imported here: `import clx` stays fast

        self._ocp = ocp
        self.directory = directory if "://" in str(directory) else os.path.abspath(directory)
        self.fingerprint = to_jsonable({**fingerprint, "code": code_fingerprint()})
        self.may_change = tuple(may_change)
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

        Every array leaf is copied to the host first (orbax writes these copies, so
        the caller may donate or overwrite its arrays at once) and hashed: the
        metadata stores ``array_sha256`` (``{leaf path: sha256 of its bytes}``; None
        for a leaf saved as it is, e.g. a multi-host array this process holds only
        part of, which is not verified), ``fingerprint``, ``provenance`` (``code_provenance()``) and
        ``meta_sha256`` (of all the rest). Asynchronous: returns once the copies
        are made and hashed; the files are written in the background.
        """
        ocp = self._ocp
        step = self._next
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves, sums = [], {}
        for path, leaf in flat:
            host = _host_array(leaf)
            leaves.append(leaf if host is None else host)
            sums[path_str(path) or "."] = None if host is None else _array_sha256(host)
        host_tree = jax.tree_util.tree_unflatten(treedef, leaves)
        meta = to_jsonable(
            {**meta, "fingerprint": self.fingerprint, "provenance": code_provenance(), "array_sha256": sums}
        )
        meta["meta_sha256"] = _meta_sha256(meta)
        self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(host_tree), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._next += 1
        return step

    def restore(self, target: Any) -> tuple[Any, dict] | None:
        """The newest intact checkpoint as ``(tree, meta)``, or None if the directory has none.

        For each checkpoint, newest first: reads the metadata and checks its
        ``meta_sha256``; compares the fingerprint with this run's; reads the arrays
        and checks each one's ``array_sha256``. An unreadable file or a checksum
        that does not match means a damaged checkpoint: a warning names it and the
        reason, and the previous one is tried.

        Args:
          target: a pytree of arrays or ``jax.ShapeDtypeStruct`` (with the wanted
            ``sharding``) of the same structure as the saved tree; arrays are
            restored with its shapes, dtypes and shardings.

        Raises:
          CheckpointMismatchError: the checkpoint's fingerprint (config, shapes,
            code, library versions) differs from this run's; the message lists
            every difference and how to start over.
          CheckpointCorruptError: checkpoints exist but none is intact (a ValueError).
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
                intact = meta.get("meta_sha256") == _meta_sha256(meta)
                if not intact and "meta_sha256" in meta:
                    raise CheckpointCorruptError("metadata checksum mismatch (the metadata file is damaged)")
            except Exception as e:  # noqa: BLE001 -- any unreadable file means: try the previous one
                errors.append((step, e))
                self._warn(step, e, steps)
                continue
            self._check_fingerprint(step, meta)
            try:
                if not intact:  # no meta_sha256, yet the fingerprint matches: its checksum entries are damaged
                    raise CheckpointCorruptError("no checksums in its metadata (the metadata file is damaged)")
                tree = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
                    "state"
                ]
                jax.block_until_ready(tree)
                self._verify(tree, meta.get("array_sha256", {}))
            except Exception as e:  # noqa: BLE001
                errors.append((step, e))
                self._warn(step, e, steps)
                continue
            if errors:
                print(
                    f"clx.checkpoint: resumed from checkpoint {step} in {self.directory} "
                    f"(newer ones damaged: {[s for s, _ in errors]}).",
                    file=sys.stderr,
                    flush=True,
                )
            self._next = max(steps) + 1
            return tree, meta
        raise CheckpointCorruptError(
            f"none of the checkpoints {sorted(steps)} in {self.directory} can be used "
            f"(newest error: {type(errors[0][1]).__name__}: {str(errors[0][1]).splitlines()[0][:300]}); "
            "delete that directory to start the run over."
        )

    def _check_fingerprint(self, step: int, meta: dict) -> None:
        """Raises ``CheckpointMismatchError`` listing every difference outside ``may_change``."""
        saved = {k: v for k, v in meta.get("fingerprint", {}).items() if k not in self.may_change}
        now = {k: v for k, v in self.fingerprint.items() if k not in self.may_change}
        if saved == now:
            return
        diff = _diff(saved, now)
        msg = (
            f"the checkpoint {step} in {self.directory} was written by a different run:\n  "
            + "\n  ".join(diff[:20])
            + ("\n  ..." if len(diff) > 20 else "")
        )
        if any("code" in line.split(":")[0].split(".") for line in diff):
            then, here = meta.get("provenance") or {}, code_provenance()
            msg += (
                "\nThe code differs (source files or library versions): the checkpoint was written at git commit "
                f"{_commit(then)}, this is {_commit(here)}."
            )
        raise CheckpointMismatchError(
            msg + f"\nUse a fresh --workdir (or delete {self.directory}) to start this run over, "
            "or rerun with the checkpoint's config and code to resume it."
        )

    @staticmethod
    def _verify(tree: Any, sums: dict) -> None:
        """Raises ``CheckpointCorruptError`` naming the leaves whose bytes do not match their stored SHA-256."""
        bad = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = path_str(path) or "."
            if name not in sums:
                bad.append(f"{name} (no checksum stored)")
                continue
            if sums[name] is None:  # saved without a checksum (see _host_array): not verified
                continue
            host = _host_array(leaf, copy=False)
            if host is not None and _array_sha256(host) != sums[name]:
                bad.append(name)
        if bad:
            raise CheckpointCorruptError(
                f"array checksum mismatch in {', '.join(bad[:5])}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )

    def _warn(self, step, error, steps):
        older = [s for s in steps if s < step]
        what = "is damaged" if isinstance(error, CheckpointCorruptError) else "is unreadable"
        msg = (
            f"clx.checkpoint: checkpoint {step} in {self.directory} {what} "
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


def _commit(provenance: dict) -> str:
    if not provenance:
        return "unknown (not recorded)"
    commit = provenance.get("git_commit")
    if not commit:
        return "unknown (not a git checkout)"
    return commit[:12] + (" with uncommitted changes" if provenance.get("git_dirty") else "")
