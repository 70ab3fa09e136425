"""The gradient-projection family: GPM (Saha, Garg, Roy 2021), SGP (Saha & Roy 2023)."""

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


def _memory_args(config, hp, name: str) -> dict:
    """GPM's and SGP's shared arguments from ``config.<name>``: threshold (swept ``<name>.threshold`` sets every
    layer; a traced value becomes a function of the task), num_samples, freeze_vectors."""
    g = config[name]
    threshold = g.threshold if isinstance(g.threshold, (int, float)) else tuple(g.threshold)
    threshold = swept(config, hp, f"{name}.threshold", threshold)
    if clx.tree.concrete(threshold) is None:  # a traced sweep value: the rule takes it as a function of the task
        traced = threshold
        threshold = lambda t: traced  # noqa: E731
    num_samples = g.num_samples if isinstance(g.num_samples, int) else tuple(g.num_samples)
    return dict(threshold=threshold, num_samples=num_samples, freeze_vectors=bool(g.get("freeze_vectors", False)))


def gpm_rule(config, model, hp=None):
    """``clx.chain(clx.gpm(...), optimizer)``; ``hp``: a swept ``gpm.threshold`` (every layer) or ``train.lr``."""
    del model
    return clx.chain(clx.gpm(**_memory_args(config, hp, "gpm")), optimizer(config, hp))


def _basis_ranks(state_type, key: str):
    def results(rule_state, member) -> dict:
        """``{key: {kernel path: rank}}`` read from the chain state's member of ``state_type``."""
        state = next(s for s in rule_state if isinstance(s, state_type))
        masks = {k: np.asarray(s.mask) for k, s in state.subspaces.items()}
        return {key: {k: int(m.sum() if member is None else m[member].sum()) for k, m in masks.items()}}

    return results


gpm_basis_ranks = _basis_ranks(clx.GPMState, "gpm_basis_ranks")


def _evidence_samples(name: str):
    return lambda config: int(np.max(config[name].num_samples))


GPM = register(
    Method(
        "gpm",
        gpm_rule,
        config=gpm_config,
        sweepable=("gpm.threshold", "train.lr"),
        results=gpm_basis_ranks,
        evidence_samples=_evidence_samples("gpm"),
    )
)


def sgp_config() -> ml_collections.ConfigDict:
    """``config.sgp``: GPM's block plus the scale coefficient (Saha & Roy 2023; the authors' code: alpha 10)."""
    g = gpm_config()
    g.alpha = 10.0  # Eq. 2's scale coefficient (scale_coff in sahagobinda/SGP); large alpha -> GPM
    return g


def sgp_rule(config, model, hp=None):
    """``clx.chain(clx.sgp(...), optimizer)``; ``hp``: a swept ``sgp.threshold``, ``sgp.alpha`` or ``train.lr``."""
    del model
    alpha = swept(config, hp, "sgp.alpha", float(config.sgp.alpha))
    return clx.chain(clx.sgp(alpha=alpha, **_memory_args(config, hp, "sgp")), optimizer(config, hp))


def sgp_results(rule_state, member) -> dict:
    """``sgp_basis_ranks`` and ``sgp_mean_importance`` (the mean lambda over each layer's stored directions)."""
    out = _basis_ranks(clx.SGPState, "sgp_basis_ranks")(rule_state, member)
    state = next(s for s in rule_state if isinstance(s, clx.SGPState))
    means = {}
    for k, s in state.subspaces.items():
        mask, imp = np.asarray(s.mask), np.asarray(s.importance)
        if member is not None:
            mask, imp = mask[member], imp[member]
        means[k] = float(imp[mask].mean()) if mask.any() else 0.0
    return {**out, "sgp_mean_importance": means}


SGP = register(
    Method(
        "sgp",
        sgp_rule,
        config=sgp_config,
        sweepable=("sgp.threshold", "sgp.alpha", "train.lr"),
        results=sgp_results,
        evidence_samples=_evidence_samples("sgp"),
    )
)
