"""The gradient-projection family: GPM (Saha, Garg, Roy 2021)."""

from __future__ import annotations

import ml_collections
import numpy as np

import clx
from experiments.methods._registry import Method, optimizer, register, swept


def gpm_config() -> ml_collections.ConfigDict:
    """``config.gpm``: the paper's Permuted-MNIST values (Saha et al. 2021, App. B)."""
    g = ml_collections.ConfigDict()
    g.threshold = (0.95, 0.99, 0.99)  # per projected layer, or one float (a sweep sets one value for every layer)
    g.num_samples = 300  # examples per task in the representation matrices (an int, or one per projected layer)
    g.freeze_vectors = False  # zero 1-D params' gradients (biases, batch norm) after task 0, as the authors' code
    return g


def gpm_rule(config, model, hp=None):
    """``clx.chain(clx.gpm(...), optimizer)``; ``hp``: a swept ``gpm.threshold`` (every layer) or ``train.lr``."""
    del model
    g = config.gpm
    threshold = g.threshold if isinstance(g.threshold, (int, float)) else tuple(g.threshold)
    threshold = swept(config, hp, "gpm.threshold", threshold)
    if clx.tree.concrete(threshold) is None:  # a traced sweep value: gpm takes it as a function of the task
        traced = threshold
        threshold = lambda t: traced  # noqa: E731
    num_samples = g.num_samples if isinstance(g.num_samples, int) else tuple(g.num_samples)
    freeze = bool(g.get("freeze_vectors", False))
    return clx.chain(clx.gpm(threshold, num_samples=num_samples, freeze_vectors=freeze), optimizer(config, hp))


def gpm_basis_ranks(rule_state, member) -> dict:
    """``{"gpm_basis_ranks": {kernel path: rank}}`` read from the chain state's GPM member."""
    state = next(s for s in rule_state if isinstance(s, clx.GPMState))
    masks = {k: np.asarray(s.mask) for k, s in state.subspaces.items()}
    return {"gpm_basis_ranks": {k: int(m.sum() if member is None else m[member].sum()) for k, m in masks.items()}}


GPM = register(
    Method(
        "gpm",
        gpm_rule,
        config=gpm_config,
        sweepable=("gpm.threshold", "train.lr"),
        results=gpm_basis_ranks,
        evidence_samples=lambda config: int(np.max(config.gpm.num_samples)),
    )
)
