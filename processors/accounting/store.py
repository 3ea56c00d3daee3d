"""ClickHouse access through clickhouse-connect, for the embedded engine and for servers alike.

The store is chosen by DSN: ``chdb:///path`` runs the ClickHouse engine in process (chDB; one process
may open a directory at a time), ``http(s)://user:password@host:8123/database`` talks to a server.
Both use clickhouse-connect's synchronous clients (chDB has no async one), each on a dedicated thread so
the event loop never blocks: one writes, one reads (`UsageStore`). Native errors become `StoreError`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from throttlex.processors import metrics
from throttlex.processors.accounting.cluster_schema import check_cluster_name, for_cluster, local
from throttlex.processors.accounting.migration_lock import LEASE_S, LOCK_TABLE, migration_lock

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMES = ("chdb", "http", "https")

# Server error codes that pass with time: timeouts, overload, too many parts, a read-only replica.
_TRANSIENT_CODES = {159, 202, 209, 210, 241, 242, 252}

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS throttlex_schema_migrations
(
    version    UInt32,
    name       String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY version
"""


class StoreError(Exception):
    """A ClickHouse operation failed. ``retriable`` is True when trying again later may succeed."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


def check_dsn(dsn: str) -> str:
    """Validate a DSN at start-up; raises ValueError naming the accepted forms."""
    scheme = urlparse(dsn).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported ClickHouse DSN {dsn!r}: use chdb:///path or http(s)://host:8123/db")
    return scheme


_STORED_ENDS = "SELECT kafka_partition, max(next_offset) FROM sink_progress GROUP BY kafka_partition"


class _Session:
    """One ClickHouse client and the one thread its calls run on, in order."""

    def __init__(self, name: str) -> None:
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.client: Any = None


class UsageStore:
    """Three sessions: one writes (inserts, schema changes), one reads (`query`), and one makes the long
    reads of dry runs (`scan`). Each has its own client and thread, so a slow analyst query or quota read
    never holds up the sink's inserts, a large insert never delays a read, and a dry run reading millions
    of events never delays a health check or a usage report; with chDB the clients are connections to
    the one engine the process hosts."""

    def __init__(self, dsn: str, *, cluster: str = "") -> None:
        self._scheme = check_dsn(dsn)
        if cluster and self._scheme == "chdb":
            raise ValueError("THROTTLEX_CLICKHOUSE_CLUSTER needs a ClickHouse server: chDB is one embedded engine")
        self._dsn = dsn
        self._cluster = check_cluster_name(cluster)
        self._writer = _Session("clickhouse-write")
        self._reader = _Session("clickhouse-read")
        self._scanner = _Session("clickhouse-scan")

    @property
    def embedded(self) -> bool:
        return self._scheme == "chdb"

    @property
    def engine_path(self) -> str | None:
        """The data directory of the embedded engine (None for a server): other connections to the
        engine this process hosts open it by this path."""
        return urlparse(self._dsn).path if self.embedded else None

    async def open(self) -> None:
        if self.embedded:
            Path(urlparse(self._dsn).path).mkdir(parents=True, exist_ok=True)
        for session in (self._writer, self._reader, self._scanner):
            session.client = await self._call(session, lambda: clickhouse_connect.get_client(dsn=self._dsn))

    async def close(self) -> None:
        """Close the clients; an embedded engine must be closed before the process exits."""
        for session in (self._scanner, self._reader, self._writer):
            if session.client is not None:
                client, session.client = session.client, None
                await self._call(session, client.close)
            session.thread.shutdown(wait=True)

    async def migrate(self, *, lock_wait_s: float = LEASE_S + 60) -> list[str]:
        """Apply the schema files not applied yet, in order, holding the migration lock (`migration_lock`) so
        that processes starting together apply each once; returns the names applied now (by this call).

        Schema files expand, then contract: a file adds what the new version needs (a column with a default,
        a table, a view) in a form the previous version's sinks keep inserting through, and drops what no
        version in service uses any more only in a later release, once every process is past it."""
        for statement in self.ddl(_MIGRATIONS_TABLE):
            await self.command(statement)
        if not await self._pending():
            return []
        applied = []
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        async with migration_lock(self, owner, wait_s=lock_wait_s) as held:
            for version, name, sql in await self._pending():  # read again: the last holder may have applied them
                await held.check()
                for statement in self.ddl(sql):
                    await self.command(statement)
                await self.insert("throttlex_schema_migrations", [(version, name)], ("version", "name"))
                log.info("applied migration", extra={"migration": name})
                applied.append(name)
        return applied

    def ddl(self, sql: str) -> list[str]:
        """The statements of ``sql`` (a schema file) as this store runs them: as written on one engine, in their
        cluster form (`cluster_schema`) with a cluster."""
        statements = _statements(sql)
        if not self._cluster:
            return statements
        return [form for statement in statements for form in for_cluster(statement, self._cluster)]

    def schema(self) -> list[str]:
        """Every statement a migration from nothing runs, in order (for review: `throttlex migrate --print`)."""
        return [*self.ddl(_MIGRATIONS_TABLE), *self.ddl(LOCK_TABLE), *(s for _, _, sql in _schema_files() for s in self.ddl(sql))]

    async def _pending(self) -> list[tuple[int, str, str]]:
        done = {row[0] for row in await self.query("SELECT version FROM throttlex_schema_migrations")}
        return [(version, name, sql) for version, name, sql in _schema_files() if version not in done]

    async def apply_retention(self, days: int) -> None:
        """Keep raw events ``days`` days (0: forever). Rollups are kept regardless."""
        table = local("usage_events") if self._cluster else "usage_events"
        [(create,)] = await self.query(
            f"SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = '{table}'"
        )
        ttl = f"TTL toDateTime(event_time) + toIntervalDay({int(days)})"
        if days > 0 and ttl not in create:
            change = f"MODIFY {ttl}"
        elif days <= 0 and " TTL " in create:
            change = "REMOVE TTL"
        else:
            return  # as set already: an ALTER at every start could rewrite every raw part (or queue DDL on every node)
        for statement in self.ddl(f"ALTER TABLE usage_events {change}"):
            await self.command(statement)

    @property
    def clustered(self) -> bool:
        """Whether the schema is on a ClickHouse cluster (`THROTTLEX_CLICKHOUSE_CLUSTER`)."""
        return bool(self._cluster)

    async def command(self, sql: str) -> None:
        await self._call(self._writer, functools.partial(self._writer.client.command, sql))

    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return await self._query(self._reader, sql, parameters)

    async def scan(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """`query` for reads that take long, on a session of their own: quick reads never wait behind them."""
        return await self._query(self._scanner, sql, parameters)

    async def _query(self, session: _Session, sql: str, parameters: dict[str, Any] | None) -> list[tuple[Any, ...]]:
        result = await self._call(session, functools.partial(session.client.query, sql, parameters=parameters))
        return [tuple(row) for row in result.result_rows]

    async def insert(
        self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str], *, dedup_token: str | None = None
    ) -> None:
        """Insert synchronously. With ``dedup_token``, a block already inserted under the same token is
        dropped, in ``table`` and in the materialized views it feeds."""
        insert = functools.partial(
            self._writer.client.insert, table, rows, column_names=list(columns), settings=self._insert_settings(dedup_token)
        )
        await self._call(self._writer, insert)

    async def insert_arrow(
        self, table: str, stream: bytes, columns: Sequence[str], *, dedup_token: str | None = None
    ) -> None:
        """Like `insert`, for rows given as an Arrow IPC stream (see `processors.accounting.rows`):
        typed columns ClickHouse reads almost as they are, far cheaper than rows it must parse."""
        await self.insert_formatted(table, stream, columns, "ArrowStream", dedup_token=dedup_token)

    async def insert_formatted(
        self, table: str, data: bytes, columns: Sequence[str], fmt: str, *, dedup_token: str | None = None
    ) -> None:
        """Insert ``data`` in one of ClickHouse's input formats (``ArrowStream``, ``JSONEachRow``, ...)."""
        await self._call(self._writer, self._raw_insert(table, data, columns, fmt, dedup_token))

    def insert_formatted_blocking(
        self, table: str, data: bytes, columns: Sequence[str], fmt: str, *, dedup_token: str | None = None
    ) -> None:
        """`insert_formatted` for a caller on a thread of its own (the sink's): waits for the writer's thread."""
        self._writer.thread.submit(_translated, self._raw_insert(table, data, columns, fmt, dedup_token)).result()

    async def stored_ends(self) -> dict[int, int]:
        """Events partition -> the offset after the highest one stored (``sink_progress``)."""
        return {int(partition): int(offset) for partition, offset in await self.query(_STORED_ENDS)}

    def stored_ends_blocking(self) -> dict[int, int]:
        """`stored_ends` for a caller on a thread of its own (the sink's); on the writer's thread, so it follows
        every insert made before."""
        query = functools.partial(self._writer.client.query, _STORED_ENDS)
        result = self._writer.thread.submit(_translated, query).result()
        return {int(partition): int(offset) for partition, offset in result.result_rows}

    def stored_offsets_blocking(self, partition: int, first: int, last: int) -> list[int]:
        """The offsets from ``first`` to ``last`` of events ``partition`` that ``usage_events`` holds, for a caller on
        a thread of its own (the sink's); on the writer's thread, so it follows every insert made before."""
        sql = ("SELECT DISTINCT kafka_offset FROM usage_events WHERE kafka_partition = {partition:UInt16} "
               "AND kafka_offset BETWEEN {first:UInt64} AND {last:UInt64}")  # fmt: skip
        parameters = {"partition": partition, "first": first, "last": last}
        query = functools.partial(self._writer.client.query, sql, parameters=parameters)
        return [int(offset) for (offset,) in self._writer.thread.submit(_translated, query).result().result_rows]

    def _raw_insert(
        self, table: str, data: bytes, columns: Sequence[str], fmt: str, dedup_token: str | None
    ) -> Callable[[], Any]:
        return functools.partial(
            self._writer.client.raw_insert, table, list(columns), data, settings=self._insert_settings(dedup_token), fmt=fmt
        )

    def _insert_settings(self, dedup_token: str | None) -> dict[str, Any]:
        settings = _insert_settings(dedup_token)
        if self._cluster:  # into the Distributed table: split and stored on the shards before the insert returns
            settings["distributed_foreground_insert"] = 1
        return settings

    async def ping(self) -> bool:
        try:
            return bool(await self.query("SELECT 1"))
        except StoreError:
            return False

    @staticmethod
    async def _call(session: _Session, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(session.thread, _translated, fn)


def _translated(fn: Callable[[], T]) -> T:
    """``fn()``, its client's errors raised as `StoreError`."""
    try:
        return fn()
    except OperationalError as exc:  # connection-level: the server may come back
        metrics.CLICKHOUSE_ERRORS.labels(kind="connection").inc()
        raise StoreError(_first_line(exc), retriable=True) from exc
    except ClickHouseError as exc:  # refused by the server: retry only what is known to pass
        code = re.search(r"Code: (\d+)", str(exc))
        transient = code is not None and int(code[1]) in _TRANSIENT_CODES
        metrics.CLICKHOUSE_ERRORS.labels(kind="transient" if transient else "refused").inc()
        raise StoreError(_first_line(exc), retriable=transient) from exc
    except OSError as exc:
        metrics.CLICKHOUSE_ERRORS.labels(kind="connection").inc()
        raise StoreError(f"{type(exc).__name__}: {exc}", retriable=True) from exc


def _insert_settings(dedup_token: str | None) -> dict[str, Any]:
    # A batch holds events of any month the contract accepts (2000-2099), one partition each: ClickHouse's
    # default guard (100 partitions a block) would refuse such a batch for ever, and the sink would stop.
    settings: dict[str, Any] = {"async_insert": 0, "max_partitions_per_insert_block": 0}
    if dedup_token is not None:
        settings |= {
            "insert_deduplicate": 1,
            "insert_deduplication_token": dedup_token,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
        }
    return settings


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _statements(sql: str) -> list[str]:
    """The statements of a schema file: ``--`` comment lines dropped, split on ``;``."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


def _schema_files() -> list[tuple[int, str, str]]:
    files = []
    for entry in resources.files("throttlex.processors.accounting.schema").iterdir():
        if entry.name.endswith(".sql"):
            files.append((int(entry.name.split("_", 1)[0]), entry.name, entry.read_text()))
    return sorted(files)
