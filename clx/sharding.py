"""Data-parallel placement for the trainer: one mesh over every device, the batch
sharded, parameters and every continual-learning state replicated.

The trainer (``clx.train.fit(..., mesh=...)``) uses these helpers; they are
public so that a custom loop can do the same:

- ``make_mesh((n_data,), ("data",))`` or ``make_mesh((n_data, n_model), ("data",
  "model"))``: a ``jax.make_mesh`` over all devices with ``AxisType.Auto`` axes
  (with Explicit axes ``jnp.linalg.svd`` of a sharded representation matrix and
  the gradient of softmax cross-entropy on a batch-sharded array both fail).
- ``batch_sharding(mesh)``: leading axis over ``"data"``; ``replicated(mesh)``.
- ``param_shardings(params, mesh, min_size)``: every leaf replicated, or, with a
  ``"model"`` axis, the last axis of large leaves (>= ``min_size`` elements,
  divisible by the axis size) sharded over it (tensor-parallel storage of big
  kernels; the compiler inserts the gathers).
- ``fsdp_shardings(params, mesh, axis="model")``: FSDP-style storage, each 2-D kernel
  split along its larger dimension over ``axis``, everything else replicated (a clear
  error naming the leaf whose dimension the axis does not divide).
- ``put(x, sharding)``: a host numpy array -> a global ``jax.Array`` through
  ``jax.make_array_from_process_local_data``. Every process passes the *same*
  full array for a replicated sharding (the trainer's task arrays, which every
  host builds deterministically from the stream seed), or its own rows for a
  batch sharding.
- ``initialize_distributed(...)``: ``jax.distributed.initialize`` with clear
  errors; call it first, before anything touches a device.

Continual-learning rules never see the mesh: the trainer constrains each step's
batch to ``batch_sharding`` and lets XLA insert the gradient all-reduce, and it
gathers the evidence (representation matrices) to every device before
``consolidate``, so an SVD-based rule computes the same basis as on one device.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"
MODEL_SHARD_MIN_SIZE = 2**20  # params with at least this many elements are split over a "model" axis


def make_mesh(
    shape: Sequence[int] | None = None,
    axis_names: Sequence[str] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over all (global) devices with Auto axis types.

    Args:
      shape: the mesh shape; ``None`` or ``()`` -> ``(jax.device_count(),)``. A
        ``-1`` entry takes the remaining devices (``(-1, 2)`` on 8 devices is
        ``(4, 2)``).
      axis_names: one name per axis; default ``("data",)`` for 1-D and
        ``("data", "model")`` for 2-D. The trainer needs a ``"data"`` axis.
      devices: the devices to use (default: all global devices).

    Returns:
      A ``jax.sharding.Mesh`` whose axes are all ``AxisType.Auto``.

    Raises:
      ValueError: the shape's product differs from the device count, more than
        one -1, a -1 that does not divide, names not matching the shape, no
        ``"data"`` axis, more than 2 axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = tuple(int(s) for s in (shape or (n,)))
    if len(shape) > 2:
        raise ValueError(f"mesh shape {shape} has {len(shape)} axes; clx uses ('data',) or ('data', 'model').")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape} has more than one -1.")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if rest <= 0 or n % rest:
            raise ValueError(
                f"mesh shape {shape}: {n} devices are not divisible by {rest}; use a shape whose product is {n}."
            )
        shape = tuple(n // rest if s == -1 else s for s in shape)
    if any(s < 1 for s in shape) or math.prod(shape) != n:
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(shape)} devices but there are {n} "
            f"({jax.process_count()} process(es) x {jax.local_device_count()} local {jax.default_backend()} devices); "
            f"use a shape whose product is {n}, e.g. ({n},) or (-1, 2), or set config.mesh.shape=() for all devices."
        )
    names = tuple(axis_names) if axis_names else ((DATA,) if len(shape) == 1 else (DATA, MODEL))
    if len(names) != len(shape):
        raise ValueError(f"mesh shape {shape} has {len(shape)} axes but axis_names {names} has {len(names)}.")
    if DATA not in names:
        raise ValueError(f"the mesh needs a {DATA!r} axis for the batch, got axis names {names}.")
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def data_size(mesh: Mesh) -> int:
    """Number of devices along the ``"data"`` axis (the batch is split into this many parts)."""
    return int(mesh.shape[DATA])


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    """Raises ValueError if ``batch_size`` does not split evenly over the data axis."""
    n = data_size(mesh)
    if int(batch_size) % n:
        lo, hi = (int(batch_size) // n) * n, (int(batch_size) // n + 1) * n
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {n} devices of the mesh's {DATA!r} axis; "
            f"use a multiple of {n} (e.g. {lo or hi} or {hi}) or a mesh with fewer data devices."
        )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"``, other axes whole."""
    return NamedSharding(mesh, P(DATA))


def param_shardings(params: Any, mesh: Mesh, min_size: int | None = None) -> Any:
    """Shardings for a params (or rule-state) pytree.

    Everything is replicated, unless the mesh has a ``"model"`` axis: then each
    leaf with at least ``min_size`` elements whose last axis divides by the
    model-axis size is split along that last axis (kernels (in, out) by output
    units). Works on arrays and on ``jax.ShapeDtypeStruct`` leaves. ``min_size``
    defaults to ``MODEL_SHARD_MIN_SIZE`` (2^20).
    """
    min_size = MODEL_SHARD_MIN_SIZE if min_size is None else int(min_size)
    model = int(mesh.shape[MODEL]) if MODEL in mesh.axis_names else 1

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        if model > 1 and len(shape) >= 1 and math.prod(shape) >= min_size and shape[-1] % model == 0:
            return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), MODEL))
        return replicated(mesh)

    return jax.tree.map(one, params)


def fsdp_shardings(params: Any, mesh: Mesh, axis: str = MODEL, min_size: int = 0) -> Any:
    """FSDP-style shardings for a params pytree: each 2-D kernel split over ``axis``, the rest replicated.

    Every 2-D leaf with at least ``min_size`` elements (an ``nnx.Linear`` kernel (in, out))
    is split along its larger dimension (the first on a tie) over the mesh axis ``axis``, so
    each of the ``n`` devices stores ``1/n`` of it; every other leaf (biases, LayerNorm scales,
    3-D tokens and position embeddings, and 2-D leaves below ``min_size``) is replicated. Use
    ``put_tree(params, fsdp_shardings(params, mesh))`` (or ``jax.device_put``) to place them;
    a jitted step on the placed params then runs as one SPMD program (XLA inserts the
    gathers and reduce-scatters) and returns the results of the 1-device program up to float
    rounding. Works on arrays and on ``jax.ShapeDtypeStruct`` leaves.

    Args:
      params: a params pytree.
      mesh: a mesh with an axis named ``axis`` (``jax.make_mesh((8,), ("model",))``, or
        ``make_mesh((n_data, n_model))`` for data x model).
      axis: the mesh axis the kernels are split over (default ``"model"``).
      min_size: 2-D leaves with fewer elements stay replicated (default 0: every 2-D leaf).

    Returns:
      A pytree of ``NamedSharding`` shaped like ``params``.

    Raises:
      ValueError: ``axis`` is not an axis of ``mesh``; a 2-D leaf that should be split has
        a larger dimension not divisible by the axis size (the message names the leaf, its
        shape and the fixes: a width divisible by the axis size, a smaller ``axis``, or a
        larger ``min_size``).
    """
    from clx.tree import path_str

    if axis not in mesh.axis_names:
        raise ValueError(f"fsdp_shardings: the mesh has axes {tuple(mesh.axis_names)}, no {axis!r}; pass axis=.")
    n = int(mesh.shape[axis])
    min_size = int(min_size)

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) != 2 or math.prod(shape) < min_size or n == 1:
            return replicated(mesh)
        dim = 0 if shape[0] >= shape[1] else 1
        if shape[dim] % n:
            raise ValueError(
                f"fsdp_shardings: leaf '{path_str(path)}' of shape {shape} should be split over the {n} devices of "
                f"the mesh's {axis!r} axis along its larger dimension ({shape[dim]}), which {n} does not divide; use "
                f"widths divisible by {n}, a smaller {axis!r} axis, or min_size > {math.prod(shape)} to replicate it."
            )
        spec = [None, None]
        spec[dim] = axis
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(one, params)


def put(x, sharding: NamedSharding) -> jax.Array:
    """A host array -> a global ``jax.Array`` with ``sharding``.

    Uses ``jax.make_array_from_process_local_data``: with a replicated sharding
    every process passes the whole array; with ``batch_sharding`` each process
    passes its own contiguous rows (global rows = processes x local rows).
    Arrays that are already ``jax.Array`` with this sharding pass through; other
    device arrays are fetched to the host first (typed PRNG keys are not
    accepted; pass ``jax.random.key_data``).
    """
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def put_tree(tree: Any, shardings: Any) -> Any:
    """``put`` over a pytree with a matching pytree of shardings (or one sharding for all)."""
    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda a: put(a, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    **kwargs,
) -> None:
    """Starts multi-host JAX (``jax.distributed.initialize``); call it before any device use.

    On a Cloud TPU pod slice, or under SLURM / Open MPI, call it with no
    arguments on every host (the cluster is detected). On plain GPU hosts pass
    ``coordinator_address='host0:1234'`` (process 0's address and a free port),
    ``num_processes`` and this host's ``process_id`` in ``[0, num_processes)``.

    Raises:
      RuntimeError: JAX was already used on this process (devices initialised),
        with the fix; or the coordinator could not be reached (JAX's error,
        re-raised with the address).
    """
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            **kwargs,
        )
    except RuntimeError as e:
        msg = str(e)
        if "before any JAX" in msg or "should only be called once" in msg or "already" in msg:
            raise RuntimeError(
                f"jax.distributed.initialize failed: {msg.splitlines()[0]} -- call clx.sharding.initialize_distributed "
                "(or pass --distributed to experiments.main) before any other JAX call."
            ) from e
        raise RuntimeError(
            f"jax.distributed.initialize(coordinator_address={coordinator_address!r}, num_processes={num_processes}, "
            f"process_id={process_id}) failed: {msg.splitlines()[0] if msg else e!r}"
        ) from e
