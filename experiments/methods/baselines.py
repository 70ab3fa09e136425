"""The baselines: fine-tuning (the lower bound) and joint training (the upper bound)."""

from __future__ import annotations

import clx
from experiments.methods._registry import Method, optimizer, register


def make_rule(config, model, hp=None):
    """The optimizer of ``config.train`` alone (``hp``: a swept ``train.lr``)."""
    del model
    return clx.chain(optimizer(config, hp))


FINETUNE = register(Method("finetune", make_rule))
# Task t trains on the union of tasks 0..t, with the same optimizer.
JOINT = register(Method("joint", make_rule, data_mode="joint"))
