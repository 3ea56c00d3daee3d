"""What a worker keeps for each input partition it owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import TopicPartition

from throttlex.processors.core.engine import PolicyEngine


@dataclass(eq=False)
class Partition:
    """One input partition this worker owns: its keys and how far they go."""

    tp: TopicPartition
    engine: PolicyEngine
    regrouped: bool
    next_offset: int = -1
    """The offset after the last record applied (-1: none yet)."""
    committed: int = -1
    """The offset this worker last committed for it (-1: none yet)."""
    watermark_ms: int = 0
    """The newest event time applied: idle keys are found by it, not by the wall clock."""
    dirty: set[str] = field(default_factory=set)
    """Keys changed (or dropped) since the last flush."""
    catch_up_to: int = 0
    """For a regroup partition: the end offset it had when assigned. Until the records before it are
    applied, forwards to it go through Kafka too (see `StreamWorker._local_targets`)."""
