"""Task-conditioned hypernetworks for continual learning.

von Oswald, Henning, Sacramento, Grewe (2020), "Continual learning with
hypernetworks", ICLR (arXiv:1906.00695). A hypernetwork ``f(e, theta)`` maps a
learned task embedding ``e_t`` to the weights of a *target network*; continual
learning only has to keep the hypernetwork's outputs for the old embeddings fixed,
which the output regularizer (their Eq. 2) does:

    L_total = L_task(theta, e_T, D_T)
              + (beta / (T-1)) * sum_{t<T} || f(e_t, theta*) - f(e_t, theta + dtheta) ||^2

with ``theta*`` the hypernetwork weights before task ``T`` and ``dtheta`` the
look-ahead: the step the optimizer would take on the task loss alone (a constant:
the gradient is not propagated through it, as in the authors' code, ``hypercl``).

The pieces, all pure functions on pytrees:

* :class:`TargetNetwork` -- any Flax NNX module as a pure ``apply(params, x)``
  whose parameters come from a flat vector (cut and reshaped into the module's
  parameter template, obtained with ``nnx.eval_shape`` + ``nnx.split``, so the
  target's weights are never allocated). By default the vector is laid out as
  PyTorch stores the parameters (each kernel as (out, in), then its bias), as in the
  authors' code: which weights share a chunk matters (see the class docstring).
* :class:`Hypernetwork` -- ``init(key) -> theta`` and ``apply(theta, e) -> (n_target,)``:
  :func:`mlp_hypernetwork` (one output per target weight),
  :func:`chunked_hypernetwork` (the paper's chunking: the same small network
  generates chunk ``i`` from ``[e_t; c_i]`` with learned chunk embeddings ``c_i``),
  :func:`recurrent_hypernetwork` (Chandra, Varshney, Srijith, Gupta 2023,
  "Continual Learning with Dependency Preserving Hypernetworks", WACV: a GRU or
  LSTM scanned over the chunks, so chunk ``k`` depends on chunks ``j < k``).
* :class:`HyperModel` -- hypernetwork + target + one embedding per task, as a clx
  model (``apply``, ``apply_recording``, ``dense_output_shapes``, ``predict``) that
  ``clx.train.fit`` runs like any other; params ``{"hnet": theta, "task_emb": (T, e)}``.
  ``predict`` does HNET+ENT task inference for class-IL (the embedding whose
  generated network has the lowest predictive entropy on the input).
* :func:`output_regularizer` -- the regularizer above as a ContinualTransformation
  that wraps the optimizer (so the look-ahead is the real step), stores
  ``f(e_t, theta*)`` at ``consolidate`` and trains only the current task's embedding.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clx.core import ContinualTransformation
from clx.functional import FunctionalModel

__all__ = [
    "ACTIVATIONS", "HnetRegState", "HyperModel", "Hypernetwork", "TargetNetwork", "chunked_hypernetwork",
    "mlp_hypernetwork", "output_regularizer", "output_regularizer_loss", "recurrent_hypernetwork",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "elu": jax.nn.elu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "linear": lambda x: x,
}

_MASKED_LOGIT = -1e9  # logits of other tasks' classes in class-IL: exp underflows to exactly 0


# ---------------------------------------------------------------------------------------
# target networks


class TargetNetwork:
    """A Flax NNX module as a pure function of a generated parameter vector.

    Build with :meth:`from_module_fn` (the module is traced with ``nnx.eval_shape``:
    no weights are allocated) or :meth:`from_module` (an existing module; only
    its shapes are kept).

    The layout of the flat vector decides which weights share a chunk of a chunked
    hypernetwork (chunk ``i`` is entries ``[i * chunk_dim, (i + 1) * chunk_dim)``), and
    with it what the hypernetwork can express:

    * ``"torch"`` (default): PyTorch's parameter layout, the one of the authors'
      code (``hypercl``'s ``mnets.mlp.MLP``): module by module, the kernel before the
      bias, each kernel with its output axis first (a Dense kernel as (out, in), a
      Conv kernel as (out, in, kh, kw)); other leaves as stored, the bias last. A
      chunk then holds whole output units (rows of incoming weights).
    * ``"flax"``: the leaves as Flax stores them, in sorted-path order
      (``layers/0/bias``, ``layers/0/kernel`` as (in, out), ...). A chunk then holds
      the outgoing weights of a block of inputs.

    On Permuted MNIST-10 with the authors' settings (experiments/configs/pmnist_hnet.py,
    seed 0) the layout alone takes ACC from 96.02 % (``"flax"``; the last task learned to
    94.0 %) to 97.42 % (``"torch"``; 97.1 %); the paper reports about 97.6 %.

    Attributes:
      graphdef: the module's static structure (``nnx.split``).
      template: the abstract ``nnx.State`` of its ``nnx.Param`` s (ShapeDtypeStruct leaves).
      layout: ``"torch"`` or ``"flax"``.
      shapes: ``[(path, shape, dtype)]`` of the template's leaves in flat-vector
        order, with their stored (Flax) shapes.
      num_params: total number of target weights ``n_target``.
      takes_task_id: whether the module's ``__call__`` takes ``task_id``.

    Raises:
      ValueError: an unknown ``layout``.
    """

    LAYOUTS = ("torch", "flax")

    def __init__(self, functional: FunctionalModel, layout: str = "torch"):
        if layout not in self.LAYOUTS:
            raise ValueError(f"unknown target layout {layout!r}; choose 'torch' (the authors' code) or 'flax'.")
        self.functional, self.layout = functional, layout
        self.graphdef, self.template = functional.graphdef, functional.template
        self.takes_task_id = functional.takes_task_id
        pure = nnx.to_pure_dict(self.template)
        leaves, self._treedef = jax.tree.flatten(pure)
        paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_leaves_with_path(pure)]
        # self._order[k]: the template leaf stored k-th in the flat vector; self._axes[i]: its transpose there
        self._order, self._axes = list(range(len(leaves))), [None] * len(leaves)
        if layout == "torch" and paths:
            parent, _, name = zip(*(p.rpartition("/") for p in paths))  # ("layers/0", "/", "kernel")
            # leaves of one module are contiguous in sorted-path order; move each bias behind its siblings
            rank: dict[str, int] = {}
            for q in parent:
                rank.setdefault(q, len(rank))
            self._order = sorted(range(len(leaves)), key=lambda i: (rank[parent[i]], name[i] == "bias", i))
            for i, l in enumerate(leaves):
                if name[i] == "kernel" and l.ndim >= 2:
                    self._axes[i] = (l.ndim - 1, l.ndim - 2, *range(l.ndim - 2))  # (out, in, *spatial)
        self.shapes = [(paths[i], tuple(leaves[i].shape), leaves[i].dtype) for i in self._order]
        self._sizes = [int(np.prod(s)) for _, s, _ in self.shapes]
        self.num_params = int(sum(self._sizes))

    @classmethod
    def from_module_fn(cls, module_fn: Callable[[], nnx.Module], layout: str = "torch") -> "TargetNetwork":
        """The target of ``module_fn()`` (e.g. ``lambda: clx.MLP(784, (1000, 1000), 10, rngs=nnx.Rngs(0))``),
        traced abstractly with ``nnx.eval_shape``; ``layout`` as in the class docstring.

        Raises:
          ValueError: the module holds state other than ``nnx.Param`` (batch
            statistics, RNG counters), which a generated pure apply cannot carry;
            an unknown ``layout``.
        """
        return cls(FunctionalModel.abstract(nnx.eval_shape(module_fn)), layout)

    @classmethod
    def from_module(cls, module: nnx.Module, layout: str = "torch") -> "TargetNetwork":
        """The target of an existing module (its weights are ignored; only shapes are kept)."""
        return cls(FunctionalModel.abstract(module), layout)

    def unflatten(self, flat: jax.Array) -> dict:
        """Cuts a (num_params,) vector into the template's arrays (pure nested dict).

        Raises:
          ValueError: ``flat`` is not a vector of exactly ``num_params`` entries
            (build the hypernetwork with ``num_outputs=target.num_params``).
        """
        if flat.ndim != 1 or flat.shape[0] != self.num_params:
            raise ValueError(
                f"the target network has {self.num_params} parameters but got a vector of shape {flat.shape}; "
                f"build the hypernetwork with num_outputs={self.num_params} (target.num_params)."
            )
        # jnp.split, not slices: its gradient is one concatenate (a slice's is a full-size pad per piece)
        parts = jnp.split(flat, np.cumsum(self._sizes)[:-1].tolist())
        pieces = [None] * len(parts)
        for i, (_, s, d), p in zip(self._order, self.shapes, parts):
            axes = self._axes[i]
            if axes is None:
                pieces[i] = p.reshape(s).astype(d)
            else:  # stored with the output axis first: transpose back to the template's shape
                pieces[i] = jnp.transpose(p.reshape([s[a] for a in axes]), np.argsort(axes)).astype(d)
        return jax.tree.unflatten(self._treedef, pieces)

    def flatten(self, params: dict) -> jax.Array:
        """The inverse of :meth:`unflatten`: a (num_params,) float32 vector."""
        leaves = jax.tree.leaves(params)
        return jnp.concatenate([jnp.ravel(leaves[i] if self._axes[i] is None else jnp.transpose(leaves[i], self._axes[i]))
                                .astype(jnp.float32) for i in self._order])

    def apply(self, params: dict, x: jax.Array, task_id=None) -> jax.Array:
        """The module's output on ``x`` with ``params`` (a pure dict, or a flat vector)."""
        if not isinstance(params, dict):
            params = self.unflatten(params)
        return self.functional.apply(params, x, task_id)

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Output shape for a batch of one input of ``input_shape`` (no compute)."""
        x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        return tuple(jax.eval_shape(self.apply, self.unflatten(jnp.zeros(self.num_params)), x).shape[1:])


# ---------------------------------------------------------------------------------------
# hypernetworks


class Hypernetwork(NamedTuple):
    """A hypernetwork as two pure functions.

    Attributes:
      init: ``init(key) -> theta``, the trainable weights (a pytree; chunk
        embeddings included, they are part of theta and regularized with it).
      apply: ``apply(theta, e) -> (num_outputs,) float32``, the flat target
        weights for one task embedding ``e`` of shape (emb_dim,); several
        embeddings (m, emb_dim) give (m, num_outputs) in one batched computation.
      num_outputs: number of generated weights (must equal the target's ``num_params``).
      emb_dim: task-embedding size.
      name: 'mlp', 'chunked' or 'recurrent'.
    """

    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    num_outputs: int
    emb_dim: int
    name: str


def _check_sizes(**sizes):
    for k, v in sizes.items():
        vals = v if isinstance(v, (tuple, list)) else (v,)
        if any(int(s) < 1 for s in vals):
            raise ValueError(f"{k} must be >= 1, got {v}; choose a positive size.")


def _dense_init(key, sizes: Sequence[int]) -> list[dict]:
    """Xavier-uniform kernels, zero biases: the init of the authors' code."""
    keys = jax.random.split(key, len(sizes) - 1)
    xavier = jax.nn.initializers.glorot_uniform()
    return [{"kernel": xavier(k, (a, b), jnp.float32), "bias": jnp.zeros((b,), jnp.float32)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _mlp(layers: list[dict], h: jax.Array, act) -> jax.Array:
    for i, layer in enumerate(layers):
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(layers) - 1:
            h = act(h)
    return h


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown hypernetwork activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def mlp_hypernetwork(num_outputs: int, emb_dim: int, hidden: Sequence[int] = (100, 100),
                     activation: str = "relu") -> Hypernetwork:
    """The full hypernetwork: an MLP ``e (emb_dim,) -> hidden -> (num_outputs,)``.

    von Oswald et al. 2020, Sec. 2 (no chunking): one output unit per target weight,
    so its last layer alone has ``hidden[-1] * num_outputs`` weights.

    Raises:
      ValueError: a size < 1 or an unknown activation.
    """
    _check_sizes(num_outputs=num_outputs, emb_dim=emb_dim, hidden=tuple(hidden) or (1,))
    act = _activation(activation)
    sizes = [int(emb_dim), *map(int, hidden), int(num_outputs)]

    def init(key):
        return {"layers": _dense_init(key, sizes)}

    def apply(theta, e):
        return _mlp(theta["layers"], e, act)

    return Hypernetwork(init, apply, int(num_outputs), int(emb_dim), "mlp")


def chunked_hypernetwork(num_outputs: int, emb_dim: int, chunk_dim: int, chunk_emb_dim: int,
                         hidden: Sequence[int] = (25, 25), activation: str = "relu",
                         chunk_emb_std: float = 1.0) -> Hypernetwork:
    """The chunked hypernetwork of von Oswald et al. 2020 (Sec. 2, "Model compression").

    The target's ``num_outputs`` weights are produced in ``n_chunks = ceil(num_outputs /
    chunk_dim)`` chunks by one small MLP ``[e_t ; c_i] (emb_dim + chunk_emb_dim,) ->
    hidden -> (chunk_dim,)``, with a learned chunk embedding ``c_i`` per chunk
    (part of theta: ``theta["chunk_emb"]``, (n_chunks, chunk_emb_dim), init
    N(0, chunk_emb_std^2)); all chunks are one batched matmul, concatenated and
    cut to ``num_outputs`` (the last chunk's surplus is dropped). Its size is about
    ``hidden[-1] * chunk_dim``, independent of the target: the compressive regime.

    Raises:
      ValueError: ``chunk_dim < 1`` (or any size < 1), an unknown activation.
    """
    if int(chunk_dim) < 1:
        raise ValueError(f"chunk_dim must be >= 1, got {chunk_dim}; pick the number of weights one chunk generates.")
    _check_sizes(num_outputs=num_outputs, emb_dim=emb_dim, chunk_emb_dim=chunk_emb_dim, hidden=tuple(hidden) or (1,))
    act = _activation(activation)
    n_chunks = math.ceil(int(num_outputs) / int(chunk_dim))
    sizes = [int(emb_dim) + int(chunk_emb_dim), *map(int, hidden), int(chunk_dim)]

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"layers": _dense_init(k1, sizes),
                "chunk_emb": chunk_emb_std * jax.random.normal(k2, (n_chunks, int(chunk_emb_dim)), jnp.float32)}

    def apply(theta, e):
        c = theta["chunk_emb"]
        lead = e.shape[:-1]  # () or (m,): several embeddings are one big matmul
        h = jnp.concatenate([jnp.broadcast_to(e[..., None, :], (*lead, c.shape[0], e.shape[-1])),
                             jnp.broadcast_to(c, (*lead, *c.shape))], axis=-1)
        out = _mlp(theta["layers"], h.reshape(-1, h.shape[-1]), act)
        return out.reshape(*lead, -1)[..., : int(num_outputs)]

    return Hypernetwork(init, apply, int(num_outputs), int(emb_dim), "chunked")


def recurrent_hypernetwork(num_outputs: int, emb_dim: int, chunk_dim: int, chunk_emb_dim: int = 8,
                           hidden_size: int = 64, cell: str = "gru", chunk_emb_std: float = 1.0) -> Hypernetwork:
    """The dependency-preserving recurrent hypernetwork (Chandra et al. 2023, Sec. 3).

    A GRU or LSTM cell is scanned (``jax.lax.scan``) over the ``n_chunks =
    ceil(num_outputs / chunk_dim)`` chunks: step ``i`` reads ``[e_t ; c_i]`` and
    the state left by chunks ``0..i-1`` and emits chunk ``i = W_out h_i + b_out``
    (``chunk_dim`` weights; the last chunk is cut). So chunk ``k`` depends on the
    inputs of every chunk ``j <= k`` and on none after it. Chunk embeddings
    ``theta["chunk_emb"]`` (n_chunks, chunk_emb_dim) are learned, as in the
    chunked hypernetwork.

    Raises:
      ValueError: ``chunk_dim < 1`` (or any size < 1), ``cell`` not 'gru'/'lstm'.
    """
    if int(chunk_dim) < 1:
        raise ValueError(f"chunk_dim must be >= 1, got {chunk_dim}; pick the number of weights one chunk generates.")
    if cell not in ("gru", "lstm"):
        raise ValueError(f"unknown recurrent cell {cell!r}; choose 'gru' or 'lstm'.")
    _check_sizes(num_outputs=num_outputs, emb_dim=emb_dim, chunk_emb_dim=chunk_emb_dim, hidden_size=hidden_size)
    n_chunks = math.ceil(int(num_outputs) / int(chunk_dim))
    d_in, hs = int(emb_dim) + int(chunk_emb_dim), int(hidden_size)
    gates = 3 if cell == "gru" else 4

    def init(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        xavier = jax.nn.initializers.glorot_uniform()
        ortho = jax.nn.initializers.orthogonal()
        return {
            "w_in": xavier(k1, (d_in, gates * hs), jnp.float32),
            "w_h": jnp.concatenate([ortho(k, (hs, hs), jnp.float32) for k in jax.random.split(k2, gates)], axis=1),
            "b": jnp.zeros((gates * hs,), jnp.float32),
            "out": _dense_init(k3, [hs, int(chunk_dim)])[0],
            "chunk_emb": chunk_emb_std * jax.random.normal(k4, (n_chunks, int(chunk_emb_dim)), jnp.float32),
        }

    def apply(theta, e):
        c = theta["chunk_emb"]
        lead = e.shape[:-1]  # () or (m,)
        xs = jnp.concatenate([jnp.broadcast_to(e[..., None, :], (*lead, c.shape[0], e.shape[-1])),
                              jnp.broadcast_to(c, (*lead, *c.shape))], axis=-1)
        xw = jnp.moveaxis(xs @ theta["w_in"] + theta["b"], -2, 0)  # (n_chunks, *lead, gates*hs), one matmul

        if cell == "gru":
            def step(h, xi):
                hw = h @ theta["w_h"]
                r = jax.nn.sigmoid(xi[..., :hs] + hw[..., :hs])
                z = jax.nn.sigmoid(xi[..., hs:2 * hs] + hw[..., hs:2 * hs])
                n = jnp.tanh(xi[..., 2 * hs:] + r * hw[..., 2 * hs:])
                h = (1.0 - z) * n + z * h
                return h, h
            carry = jnp.zeros((*lead, hs), jnp.float32)
        else:
            def step(carry, xi):
                h, cst = carry
                g = xi + h @ theta["w_h"]
                i, f, o = (jax.nn.sigmoid(g[..., k * hs:(k + 1) * hs]) for k in range(3))
                cst = f * cst + i * jnp.tanh(g[..., 3 * hs:])
                h = o * jnp.tanh(cst)
                return (h, cst), h
            carry = (jnp.zeros((*lead, hs), jnp.float32), jnp.zeros((*lead, hs), jnp.float32))

        _, hs_all = jax.lax.scan(step, carry, xw)  # (n_chunks, *lead, hidden_size)
        out = jnp.moveaxis(hs_all, 0, -2) @ theta["out"]["kernel"] + theta["out"]["bias"]
        return out.reshape(*lead, -1)[..., : int(num_outputs)]

    return Hypernetwork(init, apply, int(num_outputs), int(emb_dim), "recurrent")


# ---------------------------------------------------------------------------------------
# hypernetwork + target as a clx model


def _scalar_task(task_id):
    """One task id for the batch: the hypernetwork generates one set of weights per call."""
    t = jnp.asarray(task_id, jnp.int32)
    return t.reshape(-1)[0] if t.ndim else t


def _concrete_float(v):
    try:
        return float(np.asarray(v))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


def _concrete_int(v):
    try:
        return int(np.asarray(v).reshape(-1)[0])
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


class HyperModel:
    """A task-conditioned hypernetwork and its target network, as a clx model.

    Params: ``{"hnet": theta, "task_emb": (num_tasks, emb_dim) float32}``
    (embeddings init N(0, emb_std^2), the authors' default std 1).

    Output heads follow the authors' code (``hypercl``, ``mnist/train_utils.py``):
    the target may have ``num_tasks * head_size`` outputs, task ``t`` using
    outputs ``[t*head_size, (t+1)*head_size)`` (``per_task_heads=True``), or just
    ``head_size`` outputs shared by all tasks (each task has its own generated
    weights anyway).

    * ``scenario='task_il'`` (also Permuted MNIST with the task id given):
      ``apply(params, x, t) -> (batch, head_size)`` logits of task ``t``'s head.
    * ``scenario='class_il'``: labels are ``t*head_size + c``;
      ``apply -> (batch, num_tasks*head_size)`` with task ``t``'s logits in its
      slots and -1e9 elsewhere (training = the task's own softmax, as in the
      authors' CL3 with ``infer_output_head``); ``predict`` does HNET+ENT.

    Args:
      target: the :class:`TargetNetwork`.
      hnet: a :class:`Hypernetwork` with ``num_outputs == target.num_params``.
      num_tasks: number of task embeddings.
      head_size: outputs per task (classes of one task).
      scenario: 'task_il' or 'class_il'.
      per_task_heads: see above; checked against the target's output size.
      emb_std: std of the task embeddings' normal init.
      temperature: softmax temperature of the entropy (``soft_temp``, 1 in the paper).
      input_shape: a single input's shape, to check the target's output size.

    Raises:
      ValueError: the hypernetwork's output size differs from the target's
        parameter count; the target's output size is not ``head_size`` (or
        ``num_tasks * head_size``); an unknown scenario; sizes < 1.
    """

    def __init__(self, target: TargetNetwork, hnet: Hypernetwork, num_tasks: int, head_size: int, *,
                 scenario: str = "task_il", per_task_heads: bool = True, emb_std: float = 1.0,
                 temperature: float = 1.0, input_shape: Sequence[int] | None = None):
        if hnet.num_outputs != target.num_params:
            raise ValueError(
                f"the hypernetwork generates {hnet.num_outputs} weights but the target network has "
                f"{target.num_params} parameters; build the hypernetwork with num_outputs={target.num_params} (target.num_params)."
            )
        if scenario not in ("task_il", "class_il"):
            raise ValueError(f"unknown scenario {scenario!r}; choose 'task_il' or 'class_il'.")
        _check_sizes(num_tasks=num_tasks, head_size=head_size)
        self.target, self.hnet = target, hnet
        self.num_tasks, self.head_size = int(num_tasks), int(head_size)
        self.scenario, self.per_task_heads = scenario, bool(per_task_heads)
        self.emb_std, self.temperature = float(emb_std), float(temperature)
        if input_shape is not None:
            want = self.num_tasks * self.head_size if self.per_task_heads else self.head_size
            got = target.output_shape(input_shape)
            if got != (want,):
                raise ValueError(
                    f"the target network outputs {got} per example but {'num_tasks * head_size' if self.per_task_heads else 'head_size'} "
                    f"= {want} are needed; build the target with {want} outputs."
                )

    # -- params ---------------------------------------------------------------------
    def init(self, key: jax.Array) -> dict:
        """Fresh params: ``{"hnet": hnet.init(k1), "task_emb": N(0, emb_std^2) (num_tasks, emb_dim)}``."""
        k1, k2 = jax.random.split(key)
        return {"hnet": self.hnet.init(k1),
                "task_emb": self.emb_std * jax.random.normal(k2, (self.num_tasks, self.hnet.emb_dim), jnp.float32)}

    def num_hnet_params(self, params) -> int:
        """Trainable hypernetwork weights (chunk embeddings included) plus task embeddings."""
        return int(sum(np.prod(l.shape) for l in jax.tree.leaves(params)))

    def compression_ratio(self, params) -> float:
        """(hypernetwork weights + chunk and task embeddings) / target weights (the paper's ratio)."""
        return self.num_hnet_params(params) / self.target.num_params

    def extra_results(self, params) -> dict:
        """Keys for an experiment's results.json."""
        return {"compression_ratio": self.compression_ratio(params), "hnet_params": self.num_hnet_params(params),
                "target_params": self.target.num_params, "hnet_type": self.hnet.name}

    # -- generation -----------------------------------------------------------------
    def _embedding(self, params, task_id):
        t = _scalar_task(task_id)
        # an out-of-range id under jit gives NaN weights (and the trainer stops on a NaN loss)
        return params["task_emb"].at[t].get(mode="fill", fill_value=jnp.nan)

    def _check_task(self, task_id):
        try:
            ids = np.unique(np.asarray(task_id))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
            return  # traced: see _embedding
        if ids.size > 1:
            raise ValueError(f"one hypernetwork call generates one task's network, but the batch mixes task ids "
                             f"{ids.tolist()}; split the batch by task.")
        t = int(ids[0]) if ids.size else None
        if t is not None and not 0 <= t < self.num_tasks:
            raise ValueError(f"unknown task id {t}: the model has embeddings for tasks 0..{self.num_tasks - 1}; "
                             "build the HyperModel with more num_tasks.")

    def generate_flat(self, params, task_id) -> jax.Array:
        """(n_target,) generated weights of task ``task_id``. Raises ValueError on an unknown (concrete) id."""
        self._check_task(task_id)
        return self.hnet.apply(params["hnet"], self._embedding(params, task_id))

    def generate(self, params, task_id) -> dict:
        """The target's params (pure dict) for task ``task_id``."""
        return self.target.unflatten(self.generate_flat(params, task_id))

    def _head_logits(self, flat, x, t):
        out = self.target.apply(self.target.unflatten(flat), x)
        out = out.reshape(out.shape[0], -1)
        if self.per_task_heads:
            out = jax.lax.dynamic_slice_in_dim(out, t * self.head_size, self.head_size, axis=1)
        return out  # (batch, head_size)

    # -- the clx model interface ----------------------------------------------------
    def apply(self, params, x, task_id=None):
        """Logits on ``x`` (batch first) of task ``task_id`` (int scalar, or a (batch,)
        array whose entries must all be equal: one generated network per call).

        Shapes: task_il (batch, head_size); class_il (batch, num_tasks*head_size).

        Raises:
          ValueError: ``task_id`` is None or a concrete id outside [0, num_tasks).
        """
        if task_id is None:
            raise ValueError("a hypernetwork model needs task_id to pick the task embedding.")
        self._check_task(task_id)
        t = _scalar_task(task_id)
        logits = self._head_logits(self.generate_flat(params, t), x, t)
        if self.scenario == "task_il":
            return logits
        full = jnp.full((x.shape[0], self.num_tasks * self.head_size), _MASKED_LOGIT, logits.dtype)
        return jax.lax.dynamic_update_slice_in_dim(full, logits, t * self.head_size, axis=1)

    def apply_recording(self, params, x, task_id=None, perturbations=None):
        """``(apply(...), {})``: no Dense taps, so input-space rules (GPM) do not apply."""
        del perturbations
        return self.apply(params, x, task_id), {}

    def dense_output_shapes(self, params, x, task_id=None) -> dict:
        return {}

    def all_head_logits(self, params, x) -> jax.Array:
        """(num_tasks, batch, head_size): every task embedding's network on ``x``, own head each."""
        flats = self.hnet.apply(params["hnet"], params["task_emb"])  # (num_tasks, n_target)
        return jax.vmap(lambda f, t: self._head_logits(f, x, t))(flats, jnp.arange(self.num_tasks))

    def task_entropies(self, params, x, num_trained, logits=None) -> jax.Array:
        """(num_tasks, batch) predictive entropies of each embedding's network on ``x``
        (softmax at ``temperature``); +inf for tasks >= num_trained (task 0 always competes)."""
        logits = self.all_head_logits(params, x) if logits is None else logits
        logp = jax.nn.log_softmax(logits / self.temperature, axis=-1)
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        n = jnp.maximum(jnp.asarray(num_trained, jnp.int32), 1)
        return jnp.where(jnp.arange(self.num_tasks)[:, None] < n, ent, jnp.inf)

    def infer_task(self, params, x, num_trained, logits=None) -> jax.Array:
        """(batch,) int32: the lowest-entropy task among the first ``num_trained`` (HNET+ENT)."""
        return jnp.argmin(self.task_entropies(params, x, num_trained, logits), axis=0).astype(jnp.int32)

    def predict(self, params, x, task_id, num_trained):
        """(batch,) int32 predictions.

        task_il: ``argmax`` of task ``task_id``'s head. class_il (HNET+ENT, von
        Oswald et al. 2020, Sec. 4.1): per example, the task ``t^`` among the first
        ``num_trained`` embeddings whose generated network has the lowest entropy
        of its softmax; the prediction is ``t^ * head_size + argmax`` of that head.

        Raises:
          ValueError: a concrete ``task_id`` or ``num_trained`` outside the model's tasks.
        """
        if self.scenario == "task_il":
            return jnp.argmax(self.apply(params, x, task_id), axis=-1).astype(jnp.int32)
        n = _concrete_int(num_trained)
        if n is not None and not 0 <= n <= self.num_tasks:
            raise ValueError(f"unknown task: num_trained={n} but the model has only {self.num_tasks} task embeddings.")
        logits = self.all_head_logits(params, x)
        t_hat = self.infer_task(params, x, num_trained, logits)
        chosen = jnp.take_along_axis(logits, t_hat[None, :, None], axis=0)[0]  # (batch, head_size)
        return (t_hat * self.head_size + jnp.argmax(chosen, axis=-1)).astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# the output regularizer


class HnetRegState(NamedTuple):
    """State of :func:`output_regularizer`.

    Attributes:
      opt_state: the wrapped optimizer's state.
      targets: (num_tasks, n_target) float32, ``f(e_t, theta*)`` stored at consolidate.
      stored: (num_tasks,) bool, which rows of ``targets`` hold a finished task.
      key: (2,) uint32 PRNG key for the random subset of old tasks.
    """

    opt_state: Any
    targets: jax.Array
    stored: jax.Array
    key: jax.Array


def output_regularizer_loss(hnet: Hypernetwork, theta, task_embs: jax.Array, targets: jax.Array,
                            weights: jax.Array) -> jax.Array:
    """``sum_t w_t ||f(e_t, theta) - targets_t||^2 / max(sum_t w_t, 1)`` (float32 scalar).

    The regularizer of von Oswald et al. 2020, Eq. 2, without ``beta``:
    ``task_embs`` (T, emb_dim), ``targets`` (T, n_target), ``weights`` (T,) (1 for
    the old tasks regularized, 0 otherwise).
    """
    out = hnet.apply(theta, task_embs)
    per_task = jnp.sum(jnp.square(out - targets), axis=-1)
    return jnp.sum(weights * per_task) / jnp.maximum(jnp.sum(weights), 1.0)


def output_regularizer(hnet: Hypernetwork, optimizer: optax.GradientTransformation, *, beta: float,
                       num_tasks: int, lookahead: bool = True, num_sampled: int | None = None,
                       reset_optimizer: bool = True, seed: int = 0) -> ContinualTransformation:
    """The hypernetwork output regularizer (von Oswald et al. 2020, Eq. 2) with its optimizer.

    While task ``T`` trains (``task_id`` extra), each step:

    1. ``dtheta`` = the update ``optimizer`` would make from the task-loss
       gradient (the look-ahead; zero with ``lookahead=False``), a constant
       (``stop_gradient``, as ``detach_dt`` in ``hypercl``);
    2. adds ``beta / |S| * sum_{t in S} grad_theta ||f(e_t, theta*) - f(e_t, theta + dtheta)||^2``
       to the gradient of theta (``params["hnet"]``), ``S`` = all finished tasks
       (``T`` of them), or ``num_sampled`` of them drawn at random each step
       (``hnet_reg_batch_size`` in ``hypercl``);
    3. takes the real optimizer step, then zeroes the update of every task
       embedding except ``task_id``'s (old embeddings stay fixed, later ones untouched).

    ``consolidate`` (end of task t) stores ``f(e_j, theta)`` for every ``j <= t``
    (the authors recompute all targets before each new task) and, with
    ``reset_optimizer``, re-initialises the optimizer (the authors build a new Adam per task).

    The rule emits the final updates (it owns the optimizer): use it alone or
    last in ``clx.chain``. Params must be ``{"hnet": theta, "task_emb": (num_tasks, e)}``
    (a :class:`HyperModel`'s). State: :class:`HnetRegState`, fixed shapes (one compile).

    Raises:
      ValueError: ``beta < 0``, ``num_tasks < 1``, ``num_sampled < 1``; at update,
        missing ``params`` or ``task_id``.
    """
    b = _concrete_float(beta)  # beta may also be a traced scalar (clx.train.fit_members)
    if b is not None and not b >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}; beta weighs the output regularizer (0 turns it off).")
    _check_sizes(num_tasks=num_tasks)
    if num_sampled is not None and int(num_sampled) < 1:
        raise ValueError(f"num_sampled must be >= 1 or None (all old tasks), got {num_sampled}.")
    T = int(num_tasks)
    regularize = b is None or b > 0

    def init(params):
        return HnetRegState(optimizer.init(params), jnp.zeros((T, hnet.num_outputs), jnp.float32),
                            jnp.zeros((T,), bool), jax.random.PRNGKey(seed))

    max_reg = max(T - 1, 0) if num_sampled is None else min(int(num_sampled), max(T - 1, 0))

    def reg_grad(theta, embs, targets, order, n):
        """(1/n) sum_{i<n} grad ||f(e_order[i], theta) - y_order[i]||^2, one task at a time.

        A loop, not one batched matmul over the n tasks: each task's (n_target,)
        output and residual stay in cache, where n of them at once (n * n_target
        floats, several times) would not; measured 1.5-3x faster on a 2-core CPU."""

        def sq(th, t):
            return jnp.sum(jnp.square(hnet.apply(th, embs[t]) - targets[t]))

        def body(i, acc):
            return jax.tree.map(jnp.add, acc, jax.grad(sq)(theta, order[i]))

        acc = jax.lax.fori_loop(0, n, body, jax.tree.map(jnp.zeros_like, theta))
        return jax.tree.map(lambda g: g / jnp.maximum(n, 1).astype(g.dtype), acc)

    def update(grads, state, params=None, *, task_id=None, **extra):
        del extra
        if params is None or task_id is None:
            raise ValueError("clx.hnet.output_regularizer needs params and the task_id extra "
                             "(clx.train.fit passes both); call update(grads, state, params, task_id=t).")
        tid = _scalar_task(task_id)
        rows = jnp.arange(T)
        old = state.stored & (rows != tid)
        n_old = jnp.sum(old).astype(jnp.int32)
        key, sub = jax.random.split(state.key)
        if regularize:
            theta = params["hnet"]
            if lookahead:
                delta, _ = optimizer.update(grads, state.opt_state, params)
                theta = jax.tree.map(lambda p, d: p + jax.lax.stop_gradient(d), theta, delta["hnet"])
            if num_sampled is not None and int(num_sampled) < T - 1:
                scores = jnp.where(old, jax.random.uniform(sub, (T,)), 2.0)
            else:
                scores = jnp.where(old, 0.0, 1.0)
            order = jnp.argsort(scores, stable=True)  # the regularized old tasks first
            n = jnp.minimum(n_old, max_reg)
            g_reg = reg_grad(theta, jax.lax.stop_gradient(params["task_emb"]), state.targets, order, n)
            grads = {**grads, "hnet": jax.tree.map(lambda g, r: g + beta * r, grads["hnet"], g_reg)}
        emb_mask = (rows == tid)[:, None]
        grads = {**grads, "task_emb": jnp.where(emb_mask, grads["task_emb"], 0.0)}
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        updates = {**updates, "task_emb": jnp.where(emb_mask, updates["task_emb"], 0.0)}
        return updates, HnetRegState(opt_state, state.targets, state.stored, key)

    def consolidate(state, params, evidence):
        t = jnp.asarray(evidence.task_id, jnp.int32)
        upto = jnp.arange(T) <= t
        outs = hnet.apply(params["hnet"], params["task_emb"])
        targets = jnp.where(upto[:, None], outs, state.targets)
        opt_state = optimizer.init(params) if reset_optimizer else state.opt_state
        return HnetRegState(opt_state, targets, state.stored | upto, state.key)

    return ContinualTransformation(init, update, consolidate)
