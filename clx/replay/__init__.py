"""Replay methods: on-device buffers (reservoir, class-balanced, per-task rings) in
the rule state, and the methods that use them (ER, A-GEM, GEM, DER, DER++).
One private module per method, re-exported here."""

from clx.replay._agem import AGEMState, agem, project_agem
from clx.replay._buffer import (
    ClassBalancedBuffer,
    ReservoirBuffer,
    TaskRingBuffer,
    capacity,
    class_balanced_buffer,
    insert,
    num_filled,
    reservoir_buffer,
    sample,
    task_ring_buffer,
)
from clx.replay._der import DERState, der, derpp
from clx.replay._er import ERState, er
from clx.replay._gem import GEMState, gem, solve_gem_dual

__all__ = [
    "AGEMState",
    "ClassBalancedBuffer",
    "DERState",
    "ERState",
    "GEMState",
    "ReservoirBuffer",
    "TaskRingBuffer",
    "agem",
    "capacity",
    "class_balanced_buffer",
    "der",
    "derpp",
    "er",
    "gem",
    "insert",
    "num_filled",
    "project_agem",
    "reservoir_buffer",
    "sample",
    "solve_gem_dual",
    "task_ring_buffer",
]
