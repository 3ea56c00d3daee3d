"""One migration at a time: a lock kept in ClickHouse itself, so every process that migrates the schema at
start (each sink, the API, `throttlex migrate`) agrees on who runs the schema files, on one engine or a cluster.

ClickHouse has no compare-and-set, but it drops an insert whose deduplication token it has seen. The lock is a
sequence of turns in ``throttlex_migration_lock``: to take turn ``n``, a process inserts ``(n, itself, 'taken')``
under the token ``take-<n>``. The first such insert is stored and every later one is dropped, so reading turn
``n`` back tells each claimant whether it holds the lock. The holder ends its turn with a ``'released'`` row;
the next claimant takes turn ``n + 1``. A turn taken longer ago than ``lease_s`` and never released (its holder
died) may be taken over the same way; a holder checks before each schema file that its turn is still the last
(`LockLost` otherwise). With the embedded engine the claim holds across the connections of the one process
that may open its directory, and with a single server across processes. On a cluster (`cluster_schema`) the
lock table is one Replicated table with a copy on every server, so Keeper keeps its deduplication tokens for
all of them: processes migrating through different servers agree, and the holder runs every schema
statement ``ON CLUSTER``. Should a token not be deduplicated, every reader still agrees on one holder: the
earliest claim of the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from throttlex.processors.accounting.store import UsageStore

log = logging.getLogger(__name__)

LOCK_TABLE = """
CREATE TABLE IF NOT EXISTS throttlex_migration_lock
(
    turn   UInt64,
    owner  String,
    state  LowCardinality(String),
    at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (turn, state)
SETTINGS non_replicated_deduplication_window = 1000, replicated_deduplication_window = 1000
"""

LEASE_S = 600.0
"""A turn not released after this long is taken to be abandoned (its holder died mid-migration)."""
POLL_S = 0.2


class MigrationLockTimeout(TimeoutError):
    """Another process held the migration lock for longer than the caller would wait."""


class LockLost(RuntimeError):
    """This process's turn was taken over (it held the lock past the lease): it must stop migrating."""


class Held:
    """The turn a process holds; `check` raises `LockLost` once another process has taken a later one."""

    def __init__(self, store: UsageStore, turn: int, owner: str) -> None:
        self._store = store
        self.turn = turn
        self._owner = owner

    async def check(self) -> None:
        last, holder = await _last_turn(self._store)
        if (last, holder) != (self.turn, self._owner):
            raise LockLost(f"the migration lock was taken over by {holder} (turn {last}) while this process held turn {self.turn}")


@contextlib.asynccontextmanager
async def migration_lock(
    store: UsageStore, owner: str, *, lease_s: float = LEASE_S, wait_s: float = LEASE_S + 60
) -> AsyncIterator[Held]:
    """Hold the migration lock; waits while another process holds it (`MigrationLockTimeout` after ``wait_s``)."""
    for statement in store.ddl(LOCK_TABLE):
        await store.command(statement)
    deadline = time.monotonic() + wait_s
    reported = 0.0
    while True:
        turn, holder = await _claim(store, owner, lease_s)
        if holder == owner:
            break
        if time.monotonic() > deadline:
            raise MigrationLockTimeout(f"the migration lock is held by {holder} (turn {turn}); waited {wait_s:g} s")
        if time.monotonic() - reported > 5:
            log.info("waiting for the migration lock", extra={"holder": holder, "turn": turn})
            reported = time.monotonic()
        await asyncio.sleep(POLL_S)
    try:
        yield Held(store, turn, owner)
    finally:
        await store.insert("throttlex_migration_lock", [(turn, owner, "released")], ("turn", "owner", "state"),
                           dedup_token=f"release-{turn}")  # fmt: skip


async def _last_turn(store: UsageStore) -> tuple[int, str]:
    rows = await store.query(f"SELECT turn, {_HOLDER} FROM throttlex_migration_lock GROUP BY turn ORDER BY turn DESC LIMIT 1")
    return (rows[0][0], rows[0][1]) if rows else (0, "")


_HOLDER = "argMinIf(owner, (at, owner), state = 'taken')"
"""A turn's holder: its earliest claim (the only one, when the deduplication token did its work)."""


async def _claim(store: UsageStore, owner: str, lease_s: float) -> tuple[int, str]:
    """Try to take the next free turn; returns the turn looked at and who holds it (``owner`` if this did)."""
    rows = await store.query(
        f"SELECT turn, {_HOLDER}, countIf(state = 'released') > 0,"
        " dateDiff('millisecond', minIf(at, state = 'taken'), now64(3)) / 1000"
        " FROM throttlex_migration_lock GROUP BY turn ORDER BY turn DESC LIMIT 1"
    )
    if rows:
        [(last, holder, released, age_s)] = rows
        if not released and age_s < lease_s:
            return last, holder
        turn = last + 1
    else:
        turn = 1
    await store.insert("throttlex_migration_lock", [(turn, owner, "taken")], ("turn", "owner", "state"),
                       dedup_token=f"take-{turn}")  # fmt: skip
    [(holder,)] = await store.query(
        f"SELECT {_HOLDER} FROM throttlex_migration_lock WHERE turn = {{turn:UInt64}}", {"turn": turn}
    )
    return turn, holder
