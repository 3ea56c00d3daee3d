"""The schema on a ClickHouse cluster: the same schema files, each statement given its cluster form.

With ``THROTTLEX_CLICKHOUSE_CLUSTER`` naming a cluster of the server's ``remote_servers`` (with
``internal_replication`` on, and the ``{shard}`` and ``{replica}`` macros set on every server), every
statement of a schema file becomes:

- ``CREATE TABLE t …`` → ``t_local``, a Replicated table on every server (``ON CLUSTER``), and ``t``, a
  Distributed table over the shards, sharded by the table's key in `SHARDING` (a key's rows on one shard,
  so a key's quotas are read from one, and a retried insert splits into the same blocks). Every query keeps
  naming ``t``.
- ``CREATE MATERIALIZED VIEW … TO r AS SELECT … FROM t`` → the view on every server, from ``t_local`` into
  ``r_local``: each shard keeps the rollups of its own rows.
- ``ALTER TABLE t …`` → on ``t_local`` everywhere; a column change also on ``t``.
- ``TRUNCATE TABLE t`` → ``t_local`` everywhere.
- ``INSERT INTO r SELECT … FROM t`` (a backfill) → through the Distributed tables, once, stored on the
  shards before the migration goes on.

The migrations table and the migration lock (`EVERYWHERE`) are one Replicated table with a copy on every
server (their Keeper path has no shard): a migration recorded, or a lock turn taken, on one server is seen
on all, and the lock's deduplication tokens are kept by Keeper for the whole cluster.

The sink inserts into the Distributed ``usage_events`` synchronously (``distributed_foreground_insert``),
with its deduplication token: a retried batch is split the same way, and each shard drops the block it
has already stored, whichever replica the retry reaches. A statement of a form not listed here raises
`NoClusterForm`: a new schema file must say how it runs on a cluster before it ships.
"""

from __future__ import annotations

import re

SHARDING = {
    "usage_events": "cityHash64(api_key_id)",
    "usage_per_minute": "cityHash64(api_key_id)",
    "usage_per_hour": "cityHash64(api_key_id)",
    "usage_per_day": "cityHash64(api_key_id)",
    "usage_units_per_minute": "cityHash64(api_key_id)",
    "sink_progress": "kafka_partition",
}
"""Every sharded table and its sharding key (deterministic: the same row always goes to the same shard)."""
EVERYWHERE = ("throttlex_schema_migrations", "throttlex_migration_lock")
"""Tables with one copy on every server instead of shards."""

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CREATE_TABLE = re.compile(rf"CREATE TABLE IF NOT EXISTS ({_NAME})\s+(.*)", re.S)
_CREATE_VIEW = re.compile(rf"CREATE MATERIALIZED VIEW IF NOT EXISTS ({_NAME})\s+TO ({_NAME})\s+AS\s+(.*)", re.S)
_TRUNCATE = re.compile(rf"TRUNCATE TABLE ({_NAME})")
_ALTER = re.compile(rf"ALTER TABLE ({_NAME})\s+(.*)", re.S)
_ENGINE = re.compile(r"ENGINE\s*=\s*(\w*MergeTree)(?:\(([^)]*)\))?")
_COLUMN_CHANGE = re.compile(r"\b(ADD|MODIFY|DROP|RENAME|COMMENT)\s+COLUMN\b")


class NoClusterForm(ValueError):
    """A schema statement whose cluster form is not known (see the module's docstring)."""


def check_cluster_name(name: str) -> str:
    if name and not re.fullmatch(_NAME, name):
        raise ValueError(f"a ClickHouse cluster name is an identifier (letters, digits, _), not {name!r}")
    return name


def local(table: str) -> str:
    return f"{table}_local"


def for_cluster(statement: str, cluster: str) -> list[str]:
    """The statements that do on ``cluster`` what ``statement`` does on one server."""
    on = f"ON CLUSTER {cluster}"
    if match := _CREATE_TABLE.fullmatch(statement):
        table, rest = match.groups()
        if table in EVERYWHERE:
            return [f"CREATE TABLE IF NOT EXISTS {table} {on} {_replicated(rest, f'/clickhouse/tables/all/{{database}}/{table}')}"]
        key = _sharding_key(table, statement)
        rest = re.sub(rf"^AS ({_NAME})\b", lambda m: f"AS {local(m[1])}", rest)
        path = f"/clickhouse/tables/{{shard}}/{{database}}/{local(table)}"
        return [
            f"CREATE TABLE IF NOT EXISTS {local(table)} {on} {_replicated(rest, path)}",
            f"CREATE TABLE IF NOT EXISTS {table} {on} AS {local(table)}\n"
            f"ENGINE = Distributed({cluster}, currentDatabase(), {local(table)}, {key})",
        ]
    if match := _CREATE_VIEW.fullmatch(statement):
        view, target, select = match.groups()
        _sharding_key(target, statement)
        select = re.sub(rf"\b({'|'.join(SHARDING)})\b", lambda m: local(m[1]), select)
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} {on} TO {local(target)} AS\n{select}"]
    if match := _ALTER.fullmatch(statement):
        table, change = match.groups()
        if table in EVERYWHERE:
            return [f"ALTER TABLE {table} {on} {change}"]
        _sharding_key(table, statement)
        statements = [f"ALTER TABLE {local(table)} {on} {change}"]
        if _COLUMN_CHANGE.search(change):
            statements.append(f"ALTER TABLE {table} {on} {change}")
        return statements
    if match := _TRUNCATE.fullmatch(statement):
        table = match[1]
        _sharding_key(table, statement)
        return [f"TRUNCATE TABLE {local(table)} {on}"]
    if statement.startswith("INSERT INTO "):  # stored on the shards before the migration goes on
        return [f"{statement}\nSETTINGS distributed_foreground_insert = 1"]
    raise NoClusterForm(f"no cluster form for this schema statement (processors/accounting/cluster_schema.py): {statement[:120]}")


def _sharding_key(table: str, statement: str) -> str:
    try:
        return SHARDING[table]
    except KeyError:
        raise NoClusterForm(f"table {table!r} has no sharding key in cluster_schema.SHARDING: {statement[:120]}") from None


def _replicated(definition: str, path: str) -> str:
    """``definition`` (what follows the table's name) with its MergeTree engine made Replicated at ``path``."""

    def engine(match: re.Match[str]) -> str:
        arguments = ", ".join(a for a in (f"'{path}'", "'{replica}'", match[2]) if a)
        return f"ENGINE = Replicated{match[1]}({arguments})"

    replaced, count = _ENGINE.subn(engine, definition, count=1)
    if count != 1:
        raise NoClusterForm(f"no MergeTree engine to replicate in: {definition[:120]}")
    return replaced
