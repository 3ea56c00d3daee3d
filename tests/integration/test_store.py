"""The store's two sessions on the real engine (chDB): a read is answered while an insert is running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from throttlex.processors.accounting.store import UsageStore

pytestmark = pytest.mark.integration


async def test_reads_do_not_wait_behind_an_insert(tmp_path: Path) -> None:
    store = UsageStore(f"chdb://{tmp_path / 'chdb'}")
    await store.open()
    try:
        await store.command("CREATE TABLE slow (n UInt64) ENGINE = MergeTree ORDER BY n")
        # An insert that takes 2.4 s on the writing session: 3 blocks of 4 rows, each row sleeping 0.2 s.
        insert = asyncio.create_task(store.command(
            "INSERT INTO slow SELECT number + sleepEachRow(0.2) FROM numbers(12) SETTINGS max_block_size = 4"))  # fmt: skip
        await asyncio.sleep(0)  # the insert task runs up to handing its statement to the writing session
        reads = [await store.query("SELECT count() FROM system.one") for _ in range(5)]
        assert not insert.done(), "the reads were answered only after the insert"
        await insert
        [(rows,)] = await store.query("SELECT count() FROM slow")
    finally:
        await store.close()
    assert reads == [[(1,)]] * 5
    assert rows == 12
