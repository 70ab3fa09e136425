"""Model merging: task vectors and their merges (task arithmetic, TIES, DARE, OPCM).
One private module per method, re-exported here."""

__all__: list[str] = []
