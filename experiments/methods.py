"""The one place where method names map to clx rules (the trainer knows none).

``build(name, config)`` returns a MethodSpec: the ContinualTransformation (rule
chained with the optimizer of ``config.train``) and the trainer's data mode.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import optax
from flax import nnx

import clx

OPTIMIZERS = ("sgd", "adam")


def build_mlp(config, stream, seed: int):
    """The ``clx.MLP`` of ``config.model`` for ``stream``, as (FunctionalModel, params)."""
    module = clx.MLP(
        int(np.prod(stream.input_shape)), tuple(config.model.hidden), stream.num_outputs,
        num_heads=stream.num_heads, use_bias=config.model.use_bias, init=config.model.init,
        rngs=nnx.Rngs(seed),
    )
    return clx.FunctionalModel.from_module(module)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    rule: clx.ContinualTransformation
    cumulative: bool = False  # joint training: task t trains on tasks 0..t
    evidence_samples: int = 300
    # (config, stream, seed) -> (model with apply/apply_recording/dense_output_shapes, params)
    build_model: object = build_mlp


def optimizer(train) -> optax.GradientTransformation:
    """The base optimizer of ``config.train`` (``optimizer``, ``lr``, ``momentum``)."""
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer {train.optimizer!r}; choose one of {OPTIMIZERS}.")
    if not train.lr > 0:
        raise ValueError(f"train.lr must be > 0, got {train.lr}.")
    if train.optimizer == "adam":
        return optax.adam(train.lr)
    return optax.sgd(train.lr, momentum=train.momentum or None)


def _finetune(config):
    return MethodSpec("finetune", clx.chain(optimizer(config.train)))


def _joint(config):
    return MethodSpec("joint", clx.chain(optimizer(config.train)), cumulative=True)


def _gpm(config):
    g = config.gpm
    threshold = g.threshold if isinstance(g.threshold, float) else tuple(g.threshold)
    rule = clx.chain(clx.gpm(threshold, num_samples=g.num_samples), optimizer(config.train))
    return MethodSpec("gpm", rule, evidence_samples=g.num_samples)


BUILDERS = {"finetune": _finetune, "joint": _joint, "gpm": _gpm}


def parse(method: str) -> list[str]:
    """Splits ``config.method`` ('gpm' or 'gpm,finetune') and checks each name.

    Raises:
      ValueError: an empty or unknown method name (the message lists the known ones).
    """
    names = [m.strip().lower() for m in str(method).split(",") if m.strip()]
    if not names:
        raise ValueError(f"config.method is empty; choose from {sorted(BUILDERS)}.")
    unknown = [m for m in names if m not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known methods: {sorted(BUILDERS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"config.method names a method twice: {names}.")
    return names


def build(name: str, config) -> MethodSpec:
    """The MethodSpec for a known method name (see ``parse``)."""
    return BUILDERS[parse(name)[0]](config)
