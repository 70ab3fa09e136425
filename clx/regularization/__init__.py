"""Regularization methods: penalties that pull the params towards old tasks'
solutions (EWC, online EWC, SI, MAS, L2) and distillation to the old model (LwF).
One private module per method, re-exported here."""

__all__: list[str] = []
