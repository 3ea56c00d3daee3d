"""ClickHouse's HTTP interface, read-only, on the API's own address: analysts query the engine a running
`throttlex run` hosts with the clients they already have.

clickhouse-connect (``clickhouse_connect.get_client(host=…, port=<API port>, username=…, password=…)``),
Grafana's ClickHouse data source and anything else that speaks ClickHouse's HTTP interface connect to
the API as to a ClickHouse server: ``GET /ping``; ``GET`` or ``POST /`` with the query in the ``query``
parameter and/or the body, ``default_format``, ``database``, ``param_<name>`` query parameters, and
ClickHouse's ways of logging in (basic auth, the ``X-ClickHouse-User``/``X-ClickHouse-Key`` headers or
the ``user``/``password`` parameters). The user is an admin credential's name, the password its token;
API keys and ingest tokens are refused.

Queries run on a read-only, limited connection of their own (`processors.accounting.readonly_sql`);
each refusal or failure answers 4xx with ClickHouse's own message and its code in
``X-ClickHouse-Exception-Code``, as a ClickHouse server would. Settings cannot be changed by a query
(read-only), so setting parameters other than the client plumbing below are refused the same way. Each
query is logged with the credential's name.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from throttlex.api import metrics
from throttlex.api.credentials import match
from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.events import key_id_for
from throttlex.processors.accounting.readonly_sql import REFUSED_CODE, ReadOnlySql, SqlError, SqlUnavailable

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

_CLIENT_PLUMBING = {
    "query", "database", "default_format", "user", "password", "query_id", "session_id", "session_timeout",
    "session_check", "compress", "decompress", "enable_http_compression", "http_zlib_compression_level",
    "wait_end_of_query", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "cancel_http_readonly_queries_on_client_close", "buffer_size", "quota_key", "client_protocol_version",
    "http_response_buffer_size", "role", "max_execution_time",
}  # fmt: skip
"""Parameters about the HTTP exchange or the session, not the query: accepted and not applied (each
query is answered whole, uncompressed, on the analysts' one connection). ``max_execution_time`` is among
them because Grafana's data source sends it with every query: the server's own limit applies."""

_CONTENT_TYPES = {"TabSeparated": "text/tab-separated-values", "TSV": "text/tab-separated-values", "CSV": "text/csv",
                  "JSON": "application/json", "Native": "application/octet-stream", "RowBinary": "application/octet-stream",
                  "Arrow": "application/vnd.apache.arrow.file", "Parquet": "application/octet-stream"}  # fmt: skip
_PYTHON_OUTPUTS = {"dataframe", "arrowtable", "datastore"}
"""chDB's output "formats" that are Python objects, not bytes: not an answer to send."""
MAX_STATEMENT_BYTES = 1024 * 1024

AUTHENTICATION_FAILED = 516
ACCESS_DENIED = 497


@router.get("/ping")
async def ping() -> PlainTextResponse:
    """ClickHouse's liveness answer, which its clients ask for before anything else."""
    return PlainTextResponse("Ok.\n")


@router.api_route("/", methods=["GET", "POST"])
async def clickhouse_http(request: Request) -> Response:
    """One analyst statement, answered as ClickHouse's HTTP interface answers it."""
    params = request.query_params
    if request.method == "GET" and not params.get("query"):
        return PlainTextResponse("Ok.\n")  # a ClickHouse server's answer to a request with no query
    name = _analyst(request)
    if isinstance(name, Response):
        return name
    body = await _body(request)
    if body is None:
        return _error(413, f"Code: 0. DB::Exception: a statement is at most {MAX_STATEMENT_BYTES:,} bytes here.", 0)
    sql = "\n".join(part for part in (params.get("query", ""), body) if part.strip())
    if not sql.strip():
        return _error(400, "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)", 62)
    sql_access: ReadOnlySql | None = request.app.state.analyst_sql
    if sql_access is None:
        return _error(503, "Code: 0. DB::Exception: no ClickHouse engine in this process: query the API of the `throttlex run` "
                           "that hosts it, or the ClickHouse server directly with a read-only user.", 0)  # fmt: skip
    settings = [key for key in params if key not in _CLIENT_PLUMBING and not key.startswith("param_")]
    if settings:
        metrics.ANALYST_QUERIES.labels(outcome="refused").inc()
        return _error(403, f"Code: {REFUSED_CODE}. DB::Exception: Cannot modify '{settings[0]}' setting in readonly mode. (READONLY)",
                      REFUSED_CODE)  # fmt: skip
    if params.get("compress") == "1":  # ClickHouse's own block compression of the answer: not spoken here
        return _error(400, "Code: 0. DB::Exception: compress=1 is not supported here: answers are sent uncompressed, "
                           "leave compress unset.", 0)  # fmt: skip
    fmt = params.get("default_format") or "TabSeparated"
    if fmt.lower() in _PYTHON_OUTPUTS:
        return _error(400, f"Code: 73. DB::Exception: Unknown format {fmt}. (UNKNOWN_FORMAT)", 73)
    parameters = {key.removeprefix("param_"): value for key, value in params.items() if key.startswith("param_")}
    query_id = params.get("query_id") or str(uuid.uuid4())
    try:
        result = await sql_access.run(sql, fmt, parameters, params.get("database"))
    except SqlUnavailable as exc:
        return _error(503, str(exc), exc.code)
    except SqlError as exc:
        refused = exc.code in (REFUSED_CODE, ACCESS_DENIED)
        metrics.ANALYST_QUERIES.labels(outcome="refused" if refused else "failed").inc()
        log.info("analyst query not served", extra={"admin": name, "query_id": query_id, "error": str(exc)[:500]})
        return _error(403 if refused else 400, str(exc), exc.code)
    metrics.ANALYST_QUERIES.labels(outcome="served").inc()
    log.info("analyst query", extra={"admin": name, "query_id": query_id, "query": sql[:500], "rows_read": result.rows_read,
                                     "elapsed_ms": round(result.elapsed_s * 1000, 1)})  # fmt: skip
    out_format = result.format
    summary = {"read_rows": str(result.rows_read), "read_bytes": str(result.bytes_read), "written_rows": "0",
               "written_bytes": "0", "total_rows_to_read": str(result.rows_read),
               "elapsed_ns": str(int(result.elapsed_s * 1e9))}  # fmt: skip
    return Response(
        result.body,
        media_type=_content_type(out_format),
        headers={"X-ClickHouse-Format": out_format, "X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": sql_access.timezone,
                 "X-ClickHouse-Summary": json.dumps(summary), "X-ClickHouse-Server-Display-Name": "throttlex"},
    )  # fmt: skip


async def _body(request: Request) -> str | None:
    """The request's body as text (a POST's statement), None if it is over `MAX_STATEMENT_BYTES`."""
    if request.method != "POST":
        return ""
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > MAX_STATEMENT_BYTES:
            return None
    return received.decode("utf-8", errors="replace")


def _content_type(fmt: str) -> str:
    for prefix, content_type in _CONTENT_TYPES.items():
        if fmt.startswith(prefix):
            return content_type
    return "text/plain"


def _error(status: int, message: str, code: int | None) -> Response:
    headers = {"X-ClickHouse-Exception-Code": str(code or 0)}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="ThrottleX analyst SQL"'
    return PlainTextResponse(message.rstrip("\n") + "\n", status_code=status, headers=headers)


def _presented(request: Request) -> tuple[str, str]:
    """The user and password sent in any of the ways ClickHouse's HTTP interface takes them."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            return user, password
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
    if scheme.lower() == "bearer":
        return "", value.strip()
    if "x-clickhouse-key" in request.headers or "x-clickhouse-user" in request.headers:
        return request.headers.get("x-clickhouse-user", ""), request.headers.get("x-clickhouse-key", "")
    return request.query_params.get("user", ""), request.query_params.get("password", "")


def _analyst(request: Request) -> str | Response:
    """The admin credential's name; an error response for anyone else."""
    settings = request.app.state.settings
    user, password = _presented(request)
    found = match(password, settings.admin_credentials) if password else None
    if found is not None and user in ("", found.name):
        return found.name
    metrics.AUTH_FAILURES.inc()
    if found is None and password and _holds_other_credential(request, password):
        return _error(403, f"Code: {ACCESS_DENIED}. DB::Exception: {user or 'this credential'}: analyst SQL needs an admin "
                           "credential, not an API key or ingest token. (ACCESS_DENIED)", ACCESS_DENIED)  # fmt: skip
    return _error(401, f"Code: {AUTHENTICATION_FAILED}. DB::Exception: {user or 'default'}: Authentication failed: log in with "
                       "an admin credential, its name as the user and its token as the password. (AUTHENTICATION_FAILED)",
                  AUTHENTICATION_FAILED)  # fmt: skip


def _holds_other_credential(request: Request, secret: str) -> bool:
    settings = request.app.state.settings
    if match(secret, settings.ingest_credentials) is not None:
        return True
    record = request.app.state.registry.keys.get(key_id_for(secret, settings.key_salt_bytes))
    return record is not None and record.admits(key_id_for(secret, settings.key_salt_bytes), wall_clock_ms())
