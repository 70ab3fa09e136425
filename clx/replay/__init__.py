"""Replay methods: on-device buffers (reservoir, class-balanced, per-task rings) in
the rule state, and the methods that use them (ER, A-GEM, GEM, DER, DER++).
One private module per method, re-exported here."""

__all__: list[str] = []
