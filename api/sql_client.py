"""`throttlex sql`: one read-only statement against a running ThrottleX API's analyst SQL (`api.analyst`),
printed as a table, CSV or JSON."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from rich.table import Table

from throttlex.api.credentials import parse_admin

Output = Literal["table", "csv", "json"]
REQUESTED_FORMAT: dict[Output, str] = {"table": "JSONCompact", "csv": "CSVWithNames", "json": "JSON"}
"""What is asked of the engine for each output (a statement with a FORMAT clause of its own is printed as
the engine returns it)."""


class SqlClientError(Exception):
    """The statement was not answered; the message is one line saying why."""


@dataclass(frozen=True)
class Login:
    user: str
    password: str


def login(user: str | None, password: str | None) -> Login:
    """The credential given, else the first of ``THROTTLEX_ADMIN_TOKENS`` (a local trial's own)."""
    if user and password:
        return Login(user, password)
    tokens = os.environ.get("THROTTLEX_ADMIN_TOKENS", "")
    if tokens and not (user or password):
        first = parse_admin(tokens, "THROTTLEX_ADMIN_TOKENS")[0]
        return Login(first.name, first.token)
    raise SqlClientError("give an admin credential: --user <name> --password <token> (or THROTTLEX_SQL_USER and "
                         "THROTTLEX_SQL_PASSWORD)")  # fmt: skip


def run(url: str, statement: str, output: Output, credential: Login, timeout_s: float) -> str | Table:
    """The statement's result: a table for the terminal, or text to print (CSV, JSON)."""
    try:
        response = httpx.post(url.rstrip("/") + "/", content=statement.encode(), params={"default_format": REQUESTED_FORMAT[output]},
                              auth=(credential.user, credential.password), timeout=timeout_s)  # fmt: skip
    except httpx.TransportError as exc:
        raise SqlClientError(f"cannot reach the ThrottleX API at {url} ({type(exc).__name__}): is `throttlex run` "
                             "running there? (--url)") from exc  # fmt: skip
    if response.status_code != 200:
        first_line = response.text.strip().splitlines()[0] if response.text.strip() else f"HTTP {response.status_code}"
        raise SqlClientError(first_line)
    answered_as = response.headers.get("x-clickhouse-format", REQUESTED_FORMAT[output])
    if answered_as != REQUESTED_FORMAT[output]:
        return response.text
    if output == "json":
        return json.dumps(response.json()["data"], indent=2, ensure_ascii=False)
    if output == "csv":
        return response.text
    return _table(response.json())


def _table(document: dict[str, list[Any]]) -> Table:
    rows = document["data"]
    table = Table(*[column["name"] for column in document["meta"]], caption=f"{len(rows)} row{'s' * (len(rows) != 1)}")
    for row in rows:
        table.add_row(*["NULL" if value is None else str(value) for value in row])
    return table
