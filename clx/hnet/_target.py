"""The target network: a Flax NNX module as a pure function of a generated flat vector."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clx.functional import FunctionalModel
from clx.tree import path_str


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
        paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure)]
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
    def from_module_fn(cls, module_fn: Callable[[], nnx.Module], layout: str = "torch") -> TargetNetwork:
        """The target of ``module_fn()`` (e.g. ``lambda: clx.MLP(784, (1000, 1000), 10, rngs=nnx.Rngs(0))``),
        traced abstractly with ``nnx.eval_shape``; ``layout`` as in the class docstring.

        Raises:
          ValueError: the module holds state other than ``nnx.Param`` (batch
            statistics, RNG counters), which a generated pure apply cannot carry;
            an unknown ``layout``.
        """
        return cls(FunctionalModel.abstract(nnx.eval_shape(module_fn)), layout)

    @classmethod
    def from_module(cls, module: nnx.Module, layout: str = "torch") -> TargetNetwork:
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
        return jnp.concatenate(
            [
                jnp.ravel(leaves[i] if self._axes[i] is None else jnp.transpose(leaves[i], self._axes[i])).astype(
                    jnp.float32
                )
                for i in self._order
            ]
        )

    def apply(self, params: dict, x: jax.Array, task_id=None) -> jax.Array:
        """The module's output on ``x`` with ``params`` (a pure dict, or a flat vector)."""
        if not isinstance(params, dict):
            params = self.unflatten(params)
        return self.functional.apply(params, x, task_id)

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Output shape for a batch of one input of ``input_shape`` (no compute)."""
        x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        return tuple(jax.eval_shape(self.apply, self.unflatten(jnp.zeros(self.num_params)), x).shape[1:])
