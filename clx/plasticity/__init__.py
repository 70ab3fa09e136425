"""Loss-of-plasticity cures (L2-init, shrink & perturb, continual backprop, ReDo,
UPGD, spectral regularization), as rules that move the params at task boundaries
or perturb the update. One private module per method, re-exported here."""

__all__: list[str] = []
