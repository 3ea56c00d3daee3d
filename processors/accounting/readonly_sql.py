"""Read-only SQL for analysts on the engine a running `throttlex run` hosts (chDB).

The embedded engine can be opened by one process only, so analysts cannot open the data directory while
ThrottleX runs. Instead the API serves their queries (`api.analyst`) on a connection of their own to
the engine the process already hosts, on a thread of its own: a slow analyst query never holds up the
sink's inserts or a quota read, and chDB releases the interpreter lock while it works, so the API keeps
answering meanwhile.

What an analyst may run is enforced in two places:

- the connection itself: its limits (`SqlLimits`) are set first and ``readonly = 1`` last, so no query
  on it can write, change a setting (its own ``SETTINGS`` clause included), or use a table function
  (``file``, ``url``, ``s3``, ``remote``, ``executable``, ``Python``, ... all need more than read-only);
- `refusal`, on ClickHouse's own parse of the statement (``formatQuerySingleLine`` and ``EXPLAIN AST``,
  so comments, quoting and multi-statements cannot hide anything): only ``SELECT``, ``SHOW``,
  ``DESCRIBE``, ``EXISTS`` and ``EXPLAIN``; no ``INTO OUTFILE``; none of the functions that reach
  files, the network or programs outside the engine, which read-only mode still allows as scalar
  functions (``SELECT file('/etc/passwd')`` would read it) — and ``KILL QUERY``, which it allows too,
  is not one of the statements served.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import chdb

REFUSED_CODE = 164
"""ClickHouse's READONLY: what the engine itself answers for a write in read-only mode."""

_SERVED_STATEMENTS = ("SelectWithUnionQuery", "SelectIntersectExceptQuery", "Show", "Describe", "Exists", "Explain")
_OUTSIDE_FUNCTIONS = {"file", "filecluster", "input", "url", "urlcluster", "s3", "s3cluster", "gcs", "oss", "cosn", "hdfs",
                      "hdfscluster", "azureblobstorage", "azureblobstoragecluster", "remote", "remotesecure", "cluster",
                      "clusterallreplicas", "mysql", "postgresql", "mongodb", "redis", "sqlite", "jdbc", "odbc", "ytsaurus",
                      "executable", "python", "arrowflight", "hascolumnintable", "catboostevaluate",
                      "naivebayesclassifier"}  # fmt: skip
_OUTSIDE_FAMILIES = ("iceberg", "deltalake", "hudi", "paimon")
"""Functions (table or scalar, compared in lower case) that read or write outside the engine: files, other
servers, object stores, programs, the Python process hosting chDB. Read-only mode refuses them as table
functions, but allows the scalar ones: ``file`` reads a file, ``hasColumnInTable`` with a host connects to
it, ``catboostEvaluate`` and ``naiveBayesClassifier`` load models from paths. A list of names can miss a
function a later engine adds: review it on each chDB upgrade."""


@dataclass(frozen=True)
class SqlLimits:
    """What one analyst query may take; past any of them the engine stops it with an error."""

    max_execution_time_s: float = 30.0
    max_result_rows: int = 1_000_000
    max_result_bytes: int = 256 * 1024 * 1024
    max_memory_usage_bytes: int = 1024 * 1024 * 1024
    max_threads: int = 2

    def statements(self) -> list[str]:
        """The SET statements that apply them, ``readonly = 1`` last: after it nothing can be changed."""
        return [
            f"SET max_execution_time = {self.max_execution_time_s}",
            "SET timeout_overflow_mode = 'throw'",
            f"SET max_result_rows = {int(self.max_result_rows)}",
            f"SET max_result_bytes = {int(self.max_result_bytes)}",
            "SET result_overflow_mode = 'throw'",
            f"SET max_memory_usage = {int(self.max_memory_usage_bytes)}",
            f"SET max_threads = {int(self.max_threads)}",
            "SET readonly = 1",
        ]


class SqlError(Exception):
    """The engine refused or failed a query; ``code`` is ClickHouse's error code (None if it gave none),
    the message is the engine's own text."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


class SqlUnavailable(SqlError):
    """The analysts' connection is not open (the API is stopping)."""

    def __init__(self) -> None:
        super().__init__("Code: 0. DB::Exception: the analysts' connection is closed: the API is stopping.", None)


@dataclass(frozen=True)
class SqlResult:
    body: bytes
    format: str
    """The format of ``body``: the statement's own FORMAT clause, else the one asked for."""
    rows_read: int
    bytes_read: int
    elapsed_s: float


def refusal(statement: str, ast: str) -> str | None:
    """Why a statement is not served, or None. ``statement`` is ClickHouse's single-line rendering of it
    and ``ast`` its ``EXPLAIN AST`` (both from the engine's parser)."""
    kind = ast.split(maxsplit=1)[0] if ast.strip() else ""
    if not kind.startswith(_SERVED_STATEMENTS):
        return f"only SELECT, SHOW, DESCRIBE, EXISTS and EXPLAIN are served here, not {statement.split(maxsplit=1)[0]}"
    if re.search(r"\bINTO\s+OUTFILE\b", statement, re.IGNORECASE):
        return "INTO OUTFILE would write a file on the server"
    for name in re.findall(r"^\s*Function (\S+)", ast, re.MULTILINE):
        lowered = name.lower()
        if lowered in _OUTSIDE_FUNCTIONS or lowered.startswith(_OUTSIDE_FAMILIES):
            return f"{name}() reaches files, the network or programs outside the engine"
    return None


_DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRAILING_FORMAT = re.compile(r" FORMAT (\w+)$")


def escape_parameter(value: str) -> str:
    """A query parameter's value as the engine parses it (escaped text: backslash, tab, newline, CR)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class ReadOnlySql:
    """One read-only, limited connection to the engine this process hosts, and the thread it runs on.
    Queries run one at a time, in arrival order."""

    def __init__(self, path: str, limits: SqlLimits) -> None:
        self._path = path
        self._limits = limits
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-analyst")
        self._connection: Any = None
        self._default_database = ""  # where a query runs when the request names no database
        self._current_database = ""  # where the connection is now (USE)
        self.timezone = "UTC"

    async def open(self) -> None:
        def connect() -> None:
            self._connection = chdb.connect(self._path)  # type: ignore[no-untyped-call]
            try:
                for statement in self._limits.statements():
                    self._connection.query(statement)
                found = self._query("SELECT currentDatabase(), timezone()", "TabSeparated", {}).bytes().decode().strip()
            except Exception:
                self._connection.close()  # an open connection would keep the engine from closing
                self._connection = None
                raise
            self._default_database, self.timezone = found.split("\t")
            self._current_database = self._default_database

        await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        def close() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=True)

    async def run(self, sql: str, fmt: str, parameters: dict[str, str], database: str | None = None) -> SqlResult:
        """Run one analyst statement, its output in ``fmt`` unless it names a FORMAT of its own.
        Raises `SqlError` for what the engine or `refusal` refuses."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, sql, fmt, parameters, database)

    def _run(self, sql: str, fmt: str, parameters: dict[str, str], database: str | None) -> SqlResult:
        database = database or self._default_database
        if database != self._current_database:
            if not _DATABASE_NAME.fullmatch(database):
                raise SqlError(f"Code: 81. DB::Exception: Database {database!r} does not exist. (UNKNOWN_DATABASE)", 81)
            self._query(f"USE {database}", "TabSeparated", {})
            self._current_database = database
        rendered = self._query("SELECT formatQuerySingleLine({sql:String})", "TabSeparatedRaw", {"sql": escape_parameter(sql)})
        statement = rendered.bytes().decode().rstrip("\n")
        ast = self._query(f"EXPLAIN AST {statement}", "TabSeparatedRaw", parameters).bytes().decode()
        reason = refusal(statement, ast)
        if reason is not None:
            raise SqlError(f"Code: {REFUSED_CODE}. DB::Exception: {reason}. (READONLY)", REFUSED_CODE)
        result = self._query(statement, fmt, parameters)
        own_format = _TRAILING_FORMAT.search(statement)
        return SqlResult(result.bytes() or b"", own_format[1] if own_format else fmt, result.rows_read(), result.bytes_read(),
                         result.elapsed())  # fmt: skip

    def _query(self, sql: str, fmt: str, parameters: dict[str, str]) -> Any:
        if self._connection is None:
            raise SqlUnavailable()
        try:
            return self._connection.query(sql, fmt, params=parameters)
        except Exception as exc:  # chDB raises its engine's exceptions as RuntimeError with the text
            message = str(exc).strip()
            code = re.match(r"Code: (\d+)", message)
            raise SqlError(message, int(code[1]) if code else None) from exc
