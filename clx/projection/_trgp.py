"""TRGP: Trust Region Gradient Projection.

Lin, Yang, Fan, Zhang (2022), "TRGP: Trust Region Gradient Projection for Continual
Learning", ICLR (official code: github.com/LYang-666/TRGP, ``main_pmnist.py`` and
``layers.py``, read for this module).

TRGP keeps GPM's rule for the weights: every projected kernel W (Flax layout (d, m))
steps along the gradient projected out of the union U of the old tasks' input
subspaces, ``g <- (I - U U^T) g`` (exactly ``clx.gpm``'s step). On top of it, each
new task t reuses the frozen part of W that acts on the inputs of its most related
old tasks, its *trust region* TR_t (chosen per layer):

- **Trust region** (Sec. 4.1; ``grad_proj_cond`` in the code). Before task t trains,
  one gradient G of task t's loss is computed, and every old task j is scored by
  the norm of G's projection onto j's own input subspace M_j:
  ``||M_j M_j^T G|| > epsilon ||G||`` puts j in the region (the code's "regime 2";
  epsilon = 0.2 on PMNIST, the module constant ``eplison_1``). The candidates are
  task 0 for task 1, task 1 for task 2 and, from task 3 on, the two old tasks with
  the largest projection norms (``np.argpartition(task_norm, -k)[-k:]``, k = 2);
  a candidate outside the region is dropped.
- **Scaled weight projection** (Sec. 4.2; ``Linear.forward`` in ``layers.py``). For
  task t the layer uses the effective weights (Flax layout, inputs on the left)

      W_t = W + sum_{j in TR_t} M_j (Q_{t,j} - I) M_j^T W,

  with a (k_j, k_j) scale matrix Q_{t,j} per selected old task, initialised to I when
  task t starts, trained jointly with W on task t (same learning rate), then frozen and
  stored with the task: task t is always evaluated with its own Q's. Since M_j lies in
  U, ``M_j^T dW = 0`` for every later projected step dW, so an old task's effective
  weights move only through ``(I - U U^T) dW`` on inputs outside U, as in GPM.
- **Per-task bases** (Sec. 4.3; ``get_space_and_grad``). After task t, with R its
  (d, n) representation matrix, the old union columns u_i are scored by
  ``||u_i^T R||^2`` and the new directions (left singular vectors of
  ``R - U U^T R``) by their squared singular values; both lists are ranked together
  and the fewest top entries reaching ``threshold * ||R||_F^2`` form task t's own
  basis M_t (old and new columns mixed). The new directions among them join U.

clx layout. The Q's are parameters, so the model carries them: :class:`TRGPModel`
wraps a ``clx.FunctionalModel`` (Dense layers) and its params become
``{"net": net params, "trgp": {"done": (T,), "layers": {kernel path: {...}}}}`` with, per
projected layer (d inputs, capacity k columns per task basis, S = ``num_regions`` = 2
trust-region slots per task):

- ``basis`` (T, d, k): M_j of every task j (zero columns past its rank), written once
  at task j's end;
- ``trust`` (T, S): 1 + the old task in each of task t's slots (0: an empty slot),
  written once when task t's region is chosen;
- ``live`` (S, k, k): D = Q - I of the task being trained (the only trained TRGP leaf);
- ``scale`` (T, S, k, k): each finished task's D (``live`` is moved here at its end);
- ``done`` (T,): 1 once a task has ended (then ``scale`` is used, else ``live``).

Storing D = Q - I instead of Q makes every write exact (0 + x and x + (-x)), so an
empty slot contributes exactly 0 and an empty region leaves the forward pass bit for
bit that of the wrapped network. The layer applies ``x_t = x + sum_j ((x M_j) D_j) M_j^T``
to its input before ``x_t W`` (batch x (d k) work per slot instead of d k m for the
weights). Every shape is static; task ids may be traced; the rule's state and the
params are pytrees of arrays (jit, vmap over seeds).

Cost: an active slot adds ``2 B d k + B k^2`` multiply-adds to a layer's forward pass
(B the batch), and the ``live`` (S, k, k) matrices are read and written every step. On
GPM's PMNIST MLP the task bases of layer 1 grow to about 600 of its 784 columns (the
joint ranking keeps old union columns), so with k = d a step costs about 5x GPM's
on a CPU. An empty region costs nothing (``lax.cond``); under ``vmap`` over seeds the
conditionals become selects, so the transform and the region's scores
(``T k d m`` per layer) are computed at every step.

The rule (:func:`trgp`) owns its optimizer (its updates are final steps: it writes
the region into the params) and resets the optimizer's state at every new task, as
the code builds a new ``torch.optim.SGD`` per task.

Where clx differs from the official code, deliberately:

- **The region's gradient.** The code takes one gradient on 300 random training
  examples of task t before training. clx's rules see the task's data only batch by
  batch, so the gradients of task t's first ``selection_batches`` steps are summed
  (30 batches of 10 = 300 examples on PMNIST) and the region is chosen after them;
  until then the region is empty (Q = I: exactly the code's network), and the Q's
  train from the next step on (0.1 % of PMNIST's 27,000 steps per task are spent
  before). The sum is over slightly different W (each step is a projected GPM step).
- **Union growth.** The code appends ``sel_index[sel_index > r_pre]`` to U, which
  skips the first new direction (index ``r_pre``) even when it is selected: that
  direction is in M_t but not in U, so later tasks can move W along it and task t's
  effective weights drift. clx appends every selected new direction (``>=``).
- **First task.** The code keeps ``sum(cumsum(ratio) < threshold)`` directions (one
  fewer than the fewest reaching the threshold, GPM's code convention); clx uses the
  fewest reaching it, as in every later task of the code and in ``clx.gpm``.
- **Representations** are the layer inputs of task t's own (effective) network; the
  code records them with plain W (``net(example_data)`` without the spaces). The part
  of R outside U, hence the union's growth, is the same either way
  (``x_t - x`` lies in U); only the scores of the old columns differ.
- **Capacity.** A task basis holds at most k columns (``rank`` of :meth:`TRGPModel.wrap`;
  by default k = d, no cap). With k < d a task keeps its top k entries and the union
  still grows by every selected new direction; ``TRGPState.wanted`` records the rank
  each task asked for, so a binding cap shows.
- **Scope.** Dense layers only (the code's conv layers use the same formula on the
  flattened kernel; not written here), no biases projected (GPM's MLP has none).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clx import subspace as sub
from clx.core import ContinualTransformation, Evidence
from clx.functional import FunctionalModel
from clx.projection._common import (
    check_finite,
    check_kernel_shape,
    check_num_samples,
    check_per_layer,
    example_columns,
    kernel_paths,
    per_layer,
    project_kernel,
)
from clx.tree import concrete, path_str

#: The code's trust-region threshold on PMNIST (``eplison_1`` in ``main_pmnist.py``).
EPSILON = 0.2

_NET, _TRGP = "net", "trgp"


def _stop(a):
    return jax.lax.stop_gradient(a)


def _scalar_task(task_id):
    t = jnp.asarray(task_id, jnp.int32)
    return t.reshape(-1)[0] if t.ndim else t


class TRGPModel:
    """A ``clx.FunctionalModel`` whose Dense layers apply TRGP's scaled weight projection of the task.

    Build it with :meth:`wrap`. ``apply(params, x, task_id)`` runs the wrapped network
    with task ``task_id``'s effective weights ``W + sum_j M_j D_j M_j^T W`` in every
    projected layer (module docstring); a :class:`clx.core.TappedModel`: the taps
    report each Dense layer's input *before* the trust-region transform, keyed by the
    kernel's path in the full params (``'net/layers/0/kernel'``). That is what the
    projection needs: the kernel's gradient is ``x_t^T delta`` and
    ``(x_t (I - U U^T)) = x (I - U U^T)`` because ``x_t - x`` lies in U.

    Attributes:
      net: the wrapped FunctionalModel.
      num_tasks: T, the tasks the params have room for.
      layers: the projected kernel paths (in the full params, ``'net/...'``), input to output.
    """

    def __init__(self, net: FunctionalModel, num_tasks: int, layers: Sequence[str]):
        self.net, self.num_tasks, self.layers = net, int(num_tasks), tuple(layers)

    @classmethod
    def wrap(
        cls,
        net: FunctionalModel,
        net_params,
        num_tasks: int,
        *,
        rank: int | Sequence[int] | dict[str, int] | None = None,
        num_regions: int = 2,
        layers: Sequence[str] | None = None,
    ) -> tuple["TRGPModel", dict]:
        """Wraps ``(net, net_params)``; returns ``(model, params)`` with fresh TRGP leaves (all zero).

        Args:
          net: a ``clx.FunctionalModel`` whose projected layers are ``nnx.Linear``.
          net_params: its params.
          num_tasks: T, the number of tasks of the stream.
          rank: k, the columns a task basis may hold: an int for every layer, one per
            projected layer, or a dict from kernel path (``'layers/0/kernel'``) to int;
            capped at the layer's d. None: d (no cap). Memory per layer:
            4 (T d k + T S k^2 + S k^2 + T S) bytes.
          num_regions: S, trust-region slots per task (the code's top-k, k = 2).
          layers: kernel paths of ``net_params`` to project (``'layers/0/kernel'``);
            None: every 2-D ``kernel`` (all Dense layers).

        Raises:
          ValueError: a net with an ``nnx.Conv`` layer, num_tasks or num_regions < 1,
            a rank < 1 or a rank list of the wrong length, an unknown layer.
          TypeError: ``net`` is not a ``clx.FunctionalModel``.
        """
        if not isinstance(net, FunctionalModel):
            raise TypeError(f"TRGPModel wraps a clx.FunctionalModel, got {type(net).__name__}.")
        if int(num_tasks) < 1 or int(num_regions) < 1:
            raise ValueError(f"TRGPModel: num_tasks and num_regions must be >= 1, got {num_tasks}, {num_regions}.")
        module = net._merge(net_params)
        if any(isinstance(m, nnx.Conv) for _, m in nnx.iter_modules(module)):
            raise ValueError(
                "TRGPModel supports Dense (nnx.Linear) layers only; this network has an nnx.Conv layer. "
                "Use clx.gpm for convolutional networks."
            )
        chosen = kernel_paths(net_params, layers, who="trgp")
        if any(len(shape) != 2 for _, shape in chosen):
            raise ValueError("TRGPModel projects 2-D (Dense) kernels only.")
        paths = [p for p, _ in chosen]
        ranks = [None] * len(paths) if rank is None else per_layer(rank, paths, 0, int, who="trgp", what="rank")
        T, S = int(num_tasks), int(num_regions)
        trgp_layers = {}
        for (p, (d, _)), k in zip(chosen, ranks):
            k = d if k is None else int(k)
            if k < 1:
                raise ValueError(f"TRGPModel: rank must be >= 1, got {k} for layer {p!r}.")
            k = min(k, d)
            trgp_layers[f"{_NET}/{p}"] = {
                "basis": jnp.zeros((T, d, k), jnp.float32),
                "trust": jnp.zeros((T, S), jnp.float32),
                "live": jnp.zeros((S, k, k), jnp.float32),
                "scale": jnp.zeros((T, S, k, k), jnp.float32),
            }
        params = {_NET: net_params, _TRGP: {"done": jnp.zeros((T,), jnp.float32), "layers": trgp_layers}}
        return cls(net, T, list(trgp_layers)), params

    # -- the clx model interface ------------------------------------------------------------------
    def _check_task(self, task_id):
        ids = concrete(task_id)
        if ids is None:
            return
        ids = np.unique(ids)
        if ids.size > 1:
            raise ValueError(
                f"TRGPModel runs one task's effective weights per call, but the batch mixes task ids {ids.tolist()}; "
                "split the batch by task."
            )
        if ids.size and not 0 <= int(ids[0]) < self.num_tasks:
            raise ValueError(
                f"unknown task id {int(ids[0])}: the TRGP params have room for tasks 0..{self.num_tasks - 1}; "
                "wrap the network with more num_tasks."
            )

    def _transform(self, params, key, t):
        """``x -> x + sum_j ((x M_j) D_j) M_j^T`` of task ``t`` in layer ``key``."""
        lay = params[_TRGP]["layers"][key]
        trust = _stop(lay["trust"][t])  # (S,)
        active = trust > 0.5

        def full(x):
            # gathered inside the branch: an empty region reads none of the (T, d, k) and (T, S, k, k) leaves
            done = params[_TRGP]["done"][t] > 0.5
            d_mats = jnp.where(done, _stop(lay["scale"][t]), lay["live"])  # (S, k, k)
            idx = jnp.clip(jnp.round(trust).astype(jnp.int32) - 1, 0, self.num_tasks - 1)
            bases = _stop(lay["basis"])[idx] * active[:, None, None].astype(jnp.float32)  # (S, d, k)
            xm = jnp.einsum("nd,sdk->snk", x, bases, precision=sub.HIGHEST)
            xmd = jnp.einsum("snk,skl->snl", xm, d_mats, precision=sub.HIGHEST)
            return x + jnp.einsum("snl,sdl->nd", xmd, bases, precision=sub.HIGHEST)

        # an empty region costs nothing (one branch runs; both under vmap) and leaves x as it is
        return lambda x: jax.lax.cond(jnp.any(active), full, lambda x: x, x)

    def _run(self, params, x, task_id, inputs, perturbations, shapes=None):
        self._check_task(task_id)
        t = _scalar_task(task_id)
        module = self.net._merge(params[_NET])
        for mpath, layer in nnx.iter_modules(module):
            if isinstance(layer, nnx.Linear):
                key = path_str((_NET, *mpath, "kernel"))
                fn = self._transform(params, key, t) if key in params[_TRGP]["layers"] else None
                layer.dot_general = _hook(key, layer.dot_general, fn, inputs, perturbations, shapes)
        return self.net._call(module, x, task_id)

    def apply(self, params, x, task_id=None):
        """Logits (B, outputs) of task ``task_id`` (an int32 scalar or a (B,) array of one id).

        Raises:
          ValueError: task_id None, a concrete id outside [0, num_tasks) or a batch mixing ids.
        """
        if task_id is None:
            raise ValueError("TRGPModel needs task_id: each task has its own effective weights.")
        return self._run(params, x, task_id, None, None)

    def apply_with_taps(self, params, x, task_id=None, perturbations=None):
        """``(logits, {kernel path: (B, d) layer input before the transform})``; ``perturbations`` as in
        ``clx.FunctionalModel.apply_with_taps`` (added to each Dense layer's pre-bias output)."""
        if task_id is None:
            raise ValueError("TRGPModel needs task_id: each task has its own effective weights.")
        inputs: dict = {}
        logits = self._run(params, x, task_id, inputs, perturbations if perturbations is not None else {})
        return logits, inputs

    def tap_shapes(self, params, x, task_id=None) -> dict:
        """``{kernel path: ShapeDtypeStruct (B, m)}`` of every Dense layer's pre-bias output."""
        shapes: dict = {}
        t = jnp.zeros((), jnp.int32) if task_id is None else task_id
        jax.eval_shape(lambda p, x: self._run(p, x, t, None, None, shapes), params, x)
        return shapes


def _hook(key, dot_general, transform, inputs, perturbations, shapes):
    def hooked(lhs, rhs, *args, **kwargs):
        flat = lhs.reshape(-1, lhs.shape[-1])
        if inputs is not None:
            if key in inputs:
                raise ValueError(f"Dense layer {key!r} is applied more than once; TRGPModel taps need one call.")
            inputs[key] = flat
        if transform is not None:
            lhs = transform(flat).reshape(lhs.shape)
        out = dot_general(lhs, rhs, *args, **kwargs)
        if shapes is not None:
            shapes[key] = jax.ShapeDtypeStruct((flat.shape[0], out.shape[-1]), out.dtype)
        if perturbations and key in perturbations:
            out = out + perturbations[key].reshape(out.shape)
        return out

    return hooked


# --- the rule --------------------------------------------------------------------------------------------------------


class TRGPState(NamedTuple):
    subspaces: dict[str, sub.Subspace]  # kernel path -> union U of the old tasks' subspaces of R^d
    projectors: dict[str, jax.Array]  # kernel path -> (d, d) I - U U^T
    grad_sum: dict[str, jax.Array]  # kernel path -> (d, m) sum of the task's first selection_batches gradients
    norms: dict[str, jax.Array]  # kernel path -> (T, T) ||M_j M_j^T G|| / ||G|| of task t (row) on task j
    wanted: dict[str, jax.Array]  # kernel path -> (T,) int32 rank each task's basis asked for (before the cap k)
    regions: dict[str, jax.Array]  # kernel path -> (T, S) int32 old task in each slot of task t's region (-1: empty)
    task: jax.Array  # int32 scalar, the task of the last update (-1 before any)
    step: jax.Array  # int32 scalar, updates done in that task
    inner: optax.OptState  # the optimizer's state on {"net": ..., "live": ...}


def check_epsilon(epsilon) -> float:
    """Validates a concrete trust-region threshold epsilon in [0, 1]; returns it as a float.

    Raises:
      ValueError: not a number in [0, 1].
    """
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"trgp: epsilon must be a number in [0, 1], got {epsilon!r}.") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"trgp: epsilon must be in [0, 1] (a fraction of the gradient's norm), got {value}; the paper uses 0.2 "
            "(1 keeps every trust region empty: GPM)."
        )
    return value


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k if k in tree else int(k)]
    return tree


def trgp(
    optimizer: optax.GradientTransformation,
    threshold: float | Sequence[float] | dict[str, float] | Callable = 0.97,
    epsilon: float = EPSILON,
    num_samples: int | Sequence[int] | dict[str, int] = 300,
    selection_batches: int = 30,
) -> ContinualTransformation:
    """Trust Region Gradient Projection (Lin et al. 2022, Algorithm 1), for a :class:`TRGPModel`.

    ``clx.chain(clx.projection.trgp(optax.sgd(0.01), [0.95, 0.99, 0.99]))`` with
    ``model, params = TRGPModel.wrap(net, net_params, num_tasks)``.

    Args:
      optimizer: the optax optimizer of W and of the scale matrices (the code: plain
        SGD, the same learning rate for both). Its state is reset at every new task.
      threshold: the energy threshold in (0, 1] of the task bases (module docstring):
        a float, one per projected layer (input to output), a dict from kernel path
        (``'net/layers/0/kernel'``) or a function of the task returning one of these.
        The code on PMNIST: (0.95, 0.99, 0.99).
      epsilon: the trust-region threshold in [0, 1]: old task j is in the region when
        ``||M_j M_j^T G|| > epsilon ||G||`` (0.2, the code's ``eplison_1``); 1 keeps
        every region empty (then the W steps are GPM's, with TRGP's union).
      num_samples: examples per task in each representation matrix (300 on PMNIST).
      selection_batches: the region of task t is chosen from the sum of the gradients
        of its first this many steps (30 batches of 10: the code's 300 examples); a
        task with fewer steps keeps an empty region.

    Returns:
      A ContinualTransformation named "trgp" with state :class:`TRGPState`, needing
      ``"taps"``, ``"representations"`` and ``"optimizer"`` (its updates are final).
      ``update`` needs the ``task_id`` extra. ``consolidate`` moves the TRGP leaves of
      the params (writes the task's basis, stores its D, resets ``live``), never W.

    Raises:
      ValueError: a threshold outside (0, 1], an epsilon outside [0, 1],
        ``num_samples`` or ``selection_batches`` < 1; at init, params that are not a
        TRGPModel's; at update, no ``task_id``; at consolidate, as ``clx.gpm``.
      TypeError: ``optimizer`` is not an optax GradientTransformation.
    """
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"trgp: optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}.")
    threshold = check_per_layer(threshold, sub.check_threshold)
    if not isinstance(epsilon, jax.core.Tracer):  # a traced (swept) epsilon is used as it is
        epsilon = check_epsilon(epsilon)
    if not isinstance(num_samples, (dict, list, tuple)) and int(num_samples) < 1:
        raise ValueError(f"trgp: num_samples must be >= 1, got {num_samples}.")
    num_samples = check_num_samples(num_samples, who="trgp")
    if isinstance(selection_batches, bool) or int(selection_batches) != selection_batches or selection_batches < 1:
        raise ValueError(f"trgp: selection_batches must be an integer >= 1, got {selection_batches!r}.")
    selection_batches = int(selection_batches)

    def layers_of(params) -> list[str]:
        if not (isinstance(params, dict) and _TRGP in params and _NET in params):
            raise ValueError(
                "trgp needs the params of a clx.projection.TRGPModel ({'net': ..., 'trgp': ...}); build them with "
                "TRGPModel.wrap(net, net_params, num_tasks)."
            )
        return list(params[_TRGP]["layers"])

    def view(tree_net, live):
        return {"net": tree_net, "live": live}

    def init(params):
        paths = layers_of(params)
        per_layer(threshold, paths, 0, sub.check_threshold, who="trgp")
        per_layer(num_samples, paths, 0, int, who="trgp", what="num_samples value")
        T = params[_TRGP]["done"].shape[0]
        subspaces, projectors, grad_sum, norms, wanted, regions = {}, {}, {}, {}, {}, {}
        for p in paths:
            d, m = _get(params, p).shape
            subspaces[p] = sub.empty(d)
            projectors[p] = jnp.eye(d, dtype=jnp.float32)
            grad_sum[p] = jnp.zeros((d, m), jnp.float32)
            norms[p] = jnp.zeros((T, T), jnp.float32)
            wanted[p] = jnp.zeros((T,), jnp.int32)
            regions[p] = jnp.full(params[_TRGP]["layers"][p]["trust"].shape, -1, jnp.int32)
        live = {p: params[_TRGP]["layers"][p]["live"] for p in paths}
        inner = optimizer.init(view(params[_NET], live))
        return TRGPState(subspaces, projectors, grad_sum, norms, wanted, regions, jnp.int32(-1), jnp.int32(0), inner)

    def update(updates, state, params=None, *, task_id=None, layer_inputs=None, output_grads=None, **extra):
        del extra
        if task_id is None:
            raise ValueError("trgp.update needs the task_id extra (clx.fit passes it): update(g, s, p, task_id=t).")
        if params is None:
            raise ValueError("trgp.update needs the params (it reads the task bases and trust regions).")
        paths = layers_of(params)
        layer_inputs, output_grads = layer_inputs or {}, output_grads or {}
        t = _scalar_task(task_id)
        new_task = t != state.task
        step = jnp.where(new_task, 0, state.step)
        trgp_p = params[_TRGP]["layers"]
        live_p = {p: trgp_p[p]["live"] for p in paths}
        fresh = optimizer.init(view(params[_NET], live_p))
        inner = jax.tree.map(lambda f, o: jnp.where(new_task, f, o), fresh, state.inner)

        grad_sum, norms, regions, trust_moves = {}, {}, {}, {}
        select_now = (step == selection_batches - 1) & (t >= 1)
        for p in paths:
            g = _get(updates, p)
            gs = jnp.where(new_task, 0.0, state.grad_sum[p]) + g
            grad_sum[p] = gs
            bases = _stop(trgp_p[p]["basis"])
            S = trgp_p[p]["trust"].shape[1]
            row, ratio = jax.lax.cond(
                select_now,
                lambda gs=gs, bases=bases, S=S: trust_region(gs, bases, t, epsilon, S),
                lambda S=S, T=bases.shape[0]: (jnp.zeros((S,), jnp.float32), jnp.zeros((T,), jnp.float32)),
            )
            old_row = trgp_p[p]["trust"][t]
            trust_moves[p] = jnp.zeros_like(trgp_p[p]["trust"]).at[t].set(jnp.where(select_now, row - old_row, 0.0))
            norms[p] = jnp.where(select_now, state.norms[p].at[t].set(ratio), state.norms[p])
            chosen = state.regions[p].at[t].set(row.astype(jnp.int32) - 1)
            regions[p] = jnp.where(select_now, chosen, state.regions[p])

        seen = set()

        def project(path, g):
            key = path_str((_NET, *path))
            if key not in state.projectors:
                return g
            seen.add(key)
            q = state.projectors[key]
            check_kernel_shape("trgp", path, g, q.shape[0], layer_inputs.get(key))
            return project_kernel(g, q, layer_inputs.get(key), output_grads.get(key))

        g_net = jax.tree_util.tree_map_with_path(project, updates[_NET])
        if set(paths) - seen:
            raise ValueError(
                f"trgp: the params' TRGP layers {sorted(set(paths) - seen)} are not kernels of params['net']."
            )
        active = {p: (trgp_p[p]["trust"][t] > 0.5).astype(jnp.float32)[:, None, None] for p in paths}
        g_live = {p: updates[_TRGP]["layers"][p]["live"] * active[p] for p in paths}
        steps, inner = optimizer.update(view(g_net, g_live), inner, view(params[_NET], live_p))

        out_layers = {
            p: {
                "basis": jnp.zeros_like(trgp_p[p]["basis"]),
                "trust": trust_moves[p],
                "live": steps["live"][p] * active[p],
                "scale": jnp.zeros_like(trgp_p[p]["scale"]),
            }
            for p in paths
        }
        out = {_NET: steps["net"], _TRGP: {"done": jnp.zeros_like(params[_TRGP]["done"]), "layers": out_layers}}
        state = state._replace(grad_sum=grad_sum, norms=norms, regions=regions, task=t, step=step + 1, inner=inner)
        return out, state

    def consolidate(state, params, evidence: Evidence):
        paths = layers_of(params)
        missing = [p for p in paths if p not in evidence.representations]
        if missing:
            raise ValueError(
                f"trgp: the evidence has no representation matrices for {missing}; it has "
                f"{sorted(evidence.representations)}. Run the trainer with the TRGPModel."
            )
        t = _scalar_task(evidence.task_id)
        samples = per_layer(num_samples, paths, t, int, who="trgp", what="num_samples value")
        n_examples = int(evidence.x.shape[0])
        trgp_p = params[_TRGP]["layers"]
        subspaces, projectors, wanted = dict(state.subspaces), dict(state.projectors), dict(state.wanted)
        moves_layers = {}
        for p, th, ns in zip(paths, per_layer(threshold, paths, t, sub.check_threshold, who="trgp"), samples):
            rep = evidence.representations[p]
            d = state.subspaces[p].basis.shape[0]
            if rep.ndim != 2 or rep.shape[0] != d:
                raise ValueError(f"trgp: representation of {p!r} has shape {rep.shape}; it must be ({d}, n).")
            check_finite("trgp", f"representation of {p!r}", rep)
            rep = example_columns(rep, n_examples, ns, who="trgp", path=p)
            union, basis_t, want = task_basis(state.subspaces[p], rep, th, trgp_p[p]["basis"].shape[2])
            subspaces[p] = union
            projectors[p] = sub.complement_projector(union)
            wanted[p] = state.wanted[p].at[t].set(want)
            lay = trgp_p[p]
            moves_layers[p] = {
                "basis": jnp.zeros_like(lay["basis"]).at[t].set(basis_t - lay["basis"][t]),
                "trust": jnp.zeros_like(lay["trust"]),
                "live": -lay["live"],
                "scale": jnp.zeros_like(lay["scale"]).at[t].set(lay["live"] - lay["scale"][t]),
            }
        done = params[_TRGP]["done"]
        moves = {
            _NET: jax.tree.map(jnp.zeros_like, params[_NET]),
            _TRGP: {"done": jnp.zeros_like(done).at[t].set(1.0 - done[t]), "layers": moves_layers},
        }
        return moves, state._replace(subspaces=subspaces, projectors=projectors, wanted=wanted)

    return ContinualTransformation(
        init, update, consolidate, needs=frozenset({"taps", "representations", "optimizer"}), name="trgp"
    )


def trust_region(grad: jax.Array, bases: jax.Array, task, epsilon, num_regions: int = 2):
    """Task ``task``'s trust region in one layer (``grad_proj_cond`` of the code).

    Args:
      grad: (d, m) gradient of the task's loss with respect to the layer's kernel.
      bases: (T, d, k) every task's basis M_j (orthonormal columns, zeros past its rank).
      task: int32 scalar t (concrete or traced); tasks j < t are old.
      epsilon: the threshold in [0, 1].
      num_regions: S, the slots (the code's top-k, k = 2).

    Returns:
      ``(row, ratios)``: row (S,) float32, 1 + the old task in each slot (0: empty):
      task 0 for t = 1, task 1 for t = 2, from t = 3 the S old tasks with the largest
      ``||M_j M_j^T grad||`` (largest first), each kept only if that norm exceeds
      ``epsilon ||grad||``; ratios (T,) float32, ``||M_j M_j^T grad|| / ||grad||`` for
      j < t, 0 elsewhere. For t = 0 the row is empty.
    """
    T = bases.shape[0]
    t = jnp.asarray(task, jnp.int32)
    proj = jnp.einsum("tdk,dm->tkm", bases, grad, precision=sub.HIGHEST)
    norms = jnp.sqrt(jnp.sum(proj**2, axis=(1, 2)))
    gnorm = jnp.sqrt(jnp.sum(grad**2))
    old = jnp.arange(T) < t
    order = jnp.argsort(jnp.where(old, -norms, jnp.inf), stable=True)  # largest norm first
    slots = jnp.arange(num_regions)
    top = order[jnp.minimum(slots, T - 1)]
    cand = jnp.where(t <= 2, jnp.where(slots == 0, t - 1, 0), top)  # the code's fixed choices for tasks 1 and 2
    valid = jnp.where(t <= 2, slots == 0, slots < t) & (t >= 1)
    inside = norms[jnp.clip(cand, 0, T - 1)] > epsilon * gnorm
    row = jnp.where(valid & inside, cand + 1, 0).astype(jnp.float32)
    ratios = jnp.where(old, norms / jnp.where(gnorm > 0, gnorm, 1.0), 0.0)
    return row, ratios


def task_basis(union: sub.Subspace, representation: jax.Array, threshold, capacity: int):
    """TRGP's joint ranking (``get_space_and_grad`` of the code): ``(new union, task basis (d, capacity), rank)``.

    The used columns u_i of ``union`` are scored ``||u_i^T R||^2``, the left singular
    vectors of ``R - U U^T R`` by their squared singular values; the fewest top-scored
    entries reaching ``threshold * ||R||_F^2`` (at most d) form the task basis, in
    decreasing score (its first ``capacity`` columns are returned, zeros after its
    rank), and the selected new directions are appended to the union. ``rank`` (int32)
    is the number of entries selected before the capacity cap.
    """
    d = union.basis.shape[0]
    dtype = union.basis.dtype
    r_mat = representation.astype(dtype)
    n = r_mat.shape[1]
    used = union.basis * union.mask.astype(dtype)
    total = jnp.sum(r_mat**2)
    old_energy = jnp.where(union.mask, jnp.sum(sub.matmul(used.T, r_mat) ** 2, axis=1), -1.0)
    r_hat = r_mat - sub.matmul(used, sub.matmul(used.T, r_mat))
    if n <= d:
        u, sv, _ = jnp.linalg.svd(r_hat, full_matrices=False)
        energy = jnp.pad(sv**2, (0, d - n))
        u = jnp.pad(u, ((0, 0), (0, d - n)))
    else:
        evals, evecs = jnp.linalg.eigh(sub.matmul(r_hat, r_hat.T))
        energy, u = jnp.clip(evals[::-1], 0.0), evecs[:, ::-1]
    safe_total = jnp.where(total > 0, total, 1.0)
    useful = energy > 1e-10 * safe_total
    for _ in range(2):
        u = u - sub.matmul(used, sub.matmul(used.T, u))
    norms = jnp.linalg.norm(u, axis=0)
    u = u / jnp.where(norms > 0, norms, 1.0)
    new_energy = jnp.where(useful, energy, -1.0)

    scores = jnp.concatenate([old_energy, new_energy])  # (2d,)
    columns = jnp.concatenate([union.basis, u], axis=1)  # (d, 2d)
    order = jnp.argsort(-scores, stable=True)
    ranked = scores[order]
    valid = ranked >= 0
    before = jnp.cumsum(jnp.where(valid, ranked, 0.0)) - jnp.where(valid, ranked, 0.0)
    take = valid & (before < threshold * total)
    rank = jnp.minimum(jnp.sum(take, dtype=jnp.int32), d)
    chosen = jnp.arange(2 * d) < rank
    k = min(int(capacity), d)
    basis_t = columns[:, order[:k]] * chosen[:k].astype(dtype)

    old_rank = sub.rank(union)
    add = jnp.minimum(jnp.sum(chosen & (order >= d), dtype=jnp.int32), d - old_rank)
    cols = jnp.arange(d)
    shifted = jnp.take(u, jnp.clip(cols - old_rank, 0, d - 1), axis=1)
    new_cols = (cols >= old_rank) & (cols < old_rank + add)
    grown = sub.Subspace(
        jnp.where(new_cols[None, :], shifted, union.basis),
        union.mask | new_cols,
        jnp.where(new_cols, jnp.ones_like(union.importance), union.importance),
    )
    return grown, basis_t, rank
