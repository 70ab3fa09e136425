"""Flax NNX models as pure functions, with the Dense-layer taps rules need.

``FunctionalModel.from_module(module)`` splits an NNX module once (``nnx.split``)
into a static graph and a params pytree (plain nested dicts of arrays), and gives

- ``apply(params, x, task_id) -> logits``, a pure function for jit/grad/vmap;
- ``apply_with_taps(params, x, task_id, perturbations=None)``, which also returns
  the inputs of every ``nnx.Linear`` layer, keyed by the path of its kernel in
  ``params`` (``'layers/0/kernel'``). Adding ``perturbations`` (zeros, one per
  layer, shaped like the layer's pre-bias output) and differentiating with respect
  to them yields the gradient of the loss with respect to each layer's output
  ``delta``, so a Dense kernel gradient factors as ``g = X^T delta``. Rules that
  project the input space (GPM) use this to project the (B, d) inputs instead of
  the (d, m) gradient when that is cheaper.

Layers are tapped by giving each ``nnx.Linear`` of the merged copy its own
``dot_general``; the module passed in is never modified.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from clx.tree import path_str


class FunctionalModel:
    """A pure-function view of a Flax NNX module.

    Attributes:
      graphdef: the module's static structure.
      template: the abstract ``nnx.State`` of its parameters.
      takes_task_id: whether ``module.__call__`` has a ``task_id`` argument
        (multi-head models); if not, ``task_id`` is ignored.
    """

    def __init__(self, graphdef, template, takes_task_id: bool):
        self.graphdef = graphdef
        self.template = template
        self.takes_task_id = takes_task_id

    @classmethod
    def from_module(cls, module: nnx.Module) -> tuple["FunctionalModel", dict]:
        """Splits ``module`` into (FunctionalModel, params).

        Returns:
          The functional model and its params as nested dicts of arrays.

        Raises:
          ValueError: if the module holds state other than ``nnx.Param`` (batch
            statistics, RNG counters), which clx's pure apply cannot carry yet.
        """
        model, params = cls._split(module)
        return model, nnx.to_pure_dict(params)

    @classmethod
    def abstract(cls, module: nnx.Module) -> "FunctionalModel":
        """The FunctionalModel of a module's structure alone (e.g. one from
        ``nnx.eval_shape``: no weights need exist). Raises as ``from_module``."""
        return cls._split(module)[0]

    @classmethod
    def _split(cls, module):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        if jax.tree.leaves(rest):
            kinds = sorted(
                {type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))}
            )
            raise ValueError(
                "clx.FunctionalModel supports modules whose state is only nnx.Param; this one also "
                f"holds {kinds}. "
                "Remove BatchNorm/Dropout RNG state or keep it outside the model."
            )
        template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        takes_task_id = "task_id" in inspect.signature(type(module).__call__).parameters
        return cls(graphdef, template, takes_task_id), params

    def _merge(self, params) -> nnx.Module:
        state = jax.tree.map(lambda a: a, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def _call(self, module, x, task_id):
        return module(x, task_id=task_id) if self.takes_task_id else module(x)

    def apply(self, params, x: jax.Array, task_id=None) -> jax.Array:
        """Logits of the model on ``x`` (batch first), for task ``task_id``
        (int scalar or (batch,) int array; ignored by single-head models)."""
        return self._call(self._merge(params), x, task_id)

    def apply_with_taps(self, params, x, task_id=None, perturbations: dict | None = None):
        """Logits and the inputs of every Dense layer.

        Args:
          params: the params pytree.
          x: (batch, ...) inputs.
          task_id: as in ``apply``.
          perturbations: optional ``{kernel path: array}`` added to each layer's
            pre-bias output; pass zeros and differentiate to get ``delta``.

        Returns:
          ``(logits, layer_inputs)`` with ``layer_inputs[path]`` of shape (N, d):
          the layer's input with all leading axes flattened (N = batch for an MLP).

        Raises:
          ValueError: if a layer is applied more than once while perturbations
            are given (the factored gradient needs one call per layer).
        """
        module = self._merge(params)
        inputs: dict[str, jax.Array] = {}
        for mpath, sub in nnx.iter_modules(module):
            if isinstance(sub, nnx.Linear):
                sub.dot_general = _tap(path_str(tuple(mpath) + ("kernel",)), sub.dot_general, inputs, perturbations)
        logits = self._call(module, x, task_id)
        return logits, inputs

    def tap_shapes(self, params, x, task_id=None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of each Dense layer's pre-bias output, flattened to (N, m), for ``x``."""
        shapes: dict[str, Any] = {}

        def run(params, x):
            module = self._merge(params)
            for mpath, sub in nnx.iter_modules(module):
                if isinstance(sub, nnx.Linear):
                    key = path_str(tuple(mpath) + ("kernel",))
                    sub.dot_general = _shape_tap(key, sub.dot_general, shapes)
            return self._call(module, x, task_id)

        jax.eval_shape(run, params, x)
        return shapes


def _tap(key: str, dot_general: Callable, inputs: dict, perturbations: dict | None) -> Callable:
    def tapped(lhs, rhs, *args, **kwargs):
        flat = lhs.reshape(-1, lhs.shape[-1])
        if key in inputs:
            if perturbations is not None:
                raise ValueError(
                    f"Dense layer {key!r} is applied more than once; factored gradients need one call "
                    "per layer. Use a rule that does not declare 'taps'."
                )
            flat = jnp.concatenate([inputs[key], flat], axis=0)
        inputs[key] = flat
        out = dot_general(lhs, rhs, *args, **kwargs)
        if perturbations is not None and key in perturbations:
            out = out + perturbations[key].reshape(out.shape)
        return out

    return tapped


def _shape_tap(key: str, dot_general: Callable, shapes: dict) -> Callable:
    def tapped(lhs, rhs, *args, **kwargs):
        out = dot_general(lhs, rhs, *args, **kwargs)
        n = 1
        for s in out.shape[:-1]:
            n *= s
        shapes[key] = jax.ShapeDtypeStruct((n, out.shape[-1]), out.dtype)
        return out

    return tapped
