"""Analysts query the engine a running `throttlex run` hosts, read-only, through the API's ClickHouse
HTTP interface: with clickhouse-connect's own HTTP client, and with `throttlex sql`.

Every analyst query of the README answers as the same query on the chDB directory does after the run
stops; each kind of statement that could write, change settings, or reach files, the network or
programs is refused with ClickHouse's message; only admin credentials are served; a query past the
time limit is cut off while the API keeps answering."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from throttlex.ingest.events import encode, key_id_for
from tests.conftest import RoleProcess, Sandbox, free_port, register_keys, start_role, stop_role
from tests.factories import make_event

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
ADMIN_TOKEN, INGEST_TOKEN = "analyst-admin-token-for-tests", "analyst-ingest-token-for-tests"
API_KEYS = {"analyst-alice-key": "acme", "analyst-bob-key": "globex"}
EVENTS = 2_000
TIME_LIMIT_S = 2
ROW_LIMIT = 5_000


@dataclass
class Analysts:
    url: str
    port: int
    sandbox: Sandbox
    role: RoleProcess
    key_ids: dict[str, str]

    def client(self, username: str = "root", password: str = ADMIN_TOKEN) -> clickhouse_connect.driver.Client:
        return clickhouse_connect.get_client(host="127.0.0.1", port=self.port, username=username, password=password)


def readme_queries() -> list[str]:
    """The SQL statements of the README's analyst section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Querying usage (for analysts)") :]
    block = section[section.index("```sql") + len("```sql") : section.index("```", section.index("```sql") + 6)]
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


@pytest.fixture(scope="module")
def analysts(service_addresses: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Analysts]:
    kafka, redis_url = service_addresses
    sandbox = Sandbox(kafka_bootstrap=kafka, redis_url=redis_url, root=Path(tmp_path_factory.mktemp("analysts")))
    asyncio.run(register_keys(sandbox, API_KEYS))
    port = free_port()
    role = start_role(
        sandbox,
        ["run", "--policy-file", str(sandbox.write_policy(1_000_000, 60)), "--api-port", str(port)],
        {"THROTTLEX_ADMIN_TOKENS": f"root:{ADMIN_TOKEN}", "THROTTLEX_INGEST_TOKENS": f"importer;gateway:*:{INGEST_TOKEN}",
         "THROTTLEX_ANALYST_MAX_EXECUTION_TIME_S": str(TIME_LIMIT_S), "THROTTLEX_ANALYST_MAX_THREADS": "1",
         "THROTTLEX_ANALYST_MAX_RESULT_ROWS": str(ROW_LIMIT)},
    )  # fmt: skip
    salt = sandbox.env["THROTTLEX_KEY_SALT"].encode()
    key_ids = {key: key_id_for(key, salt) for key in API_KEYS}
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(5)
    now_ms = int(time.time() * 1000)
    events = [
        make_event(event_id=uuid.uuid4(), api_key_id=key_ids[key], tenant=API_KEYS[key],
                   event_time_ms=now_ms - 20 * 60_000 + rng.randrange(10 * 60_000),
                   route=rng.choice(["/v1/search", "/v1/items/{item_id}"]), status=rng.choice([200, 200, 429, 500]),
                   cost=rng.randint(1, 3), edge_blocked=rng.random() < 0.2, latency_ms=rng.uniform(1, 50))
        for key in rng.choices(list(API_KEYS), k=EVENTS)
    ]  # fmt: skip
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            _wait(lambda: http.get("/healthz").status_code == 200, role, "`throttlex run` to be healthy")
            for start in range(0, EVENTS, 1_000):
                body = b"[" + b",".join(encode(e) for e in events[start : start + 1_000]) + b"]"
                response = http.post("/v1/events", content=body, headers={"authorization": f"Bearer {INGEST_TOKEN}"})
                assert response.status_code == 202, response.text
            admin = httpx.BasicAuth("root", ADMIN_TOKEN)
            _wait(lambda: http.post("/", content="SELECT count() FROM usage_events", auth=admin).text.strip() == str(EVENTS),
                  role, "the sink to store every event")  # fmt: skip
        yield Analysts(url, port, sandbox, role, key_ids)
    finally:
        stop_role(role)


def _wait(check: object, role: RoleProcess, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{role.log()[-3000:]}"
        time.sleep(0.2)


def test_clickhouse_connect_reads_the_running_engine(analysts: Analysts) -> None:
    client = analysts.client()
    assert client.command("SELECT 1") == 1
    rows = client.query("SELECT tenant, count() FROM usage_events GROUP BY tenant ORDER BY tenant").result_rows
    assert sum(n for _, n in rows) == EVENTS and {tenant for tenant, _ in rows} == {"acme", "globex"}
    one_key = client.query("SELECT count() FROM usage_events WHERE api_key_id = {key:String}",
                           parameters={"key": analysts.key_ids["analyst-alice-key"]}).result_rows[0][0]  # fmt: skip
    assert 0 < one_key < EVENTS
    assert httpx.get(f"{analysts.url}/ping").text == "Ok.\n"


REFUSED = {
    "INSERT": "INSERT INTO usage_events (tenant) VALUES ('x')",
    "CREATE": "CREATE TABLE analyst_scratch (a UInt8) ENGINE = Memory",
    "DROP": "DROP TABLE usage_events",
    "ALTER": "ALTER TABLE usage_events DELETE WHERE 1",
    "TRUNCATE": "TRUNCATE TABLE usage_events",
    "SYSTEM": "SYSTEM FLUSH LOGS",
    "SET": "SET readonly = 0",
    "KILL": "KILL QUERY WHERE 1",
    "SETTINGS clause": "SELECT 1 SETTINGS max_execution_time = 1000",
    "file() table function": "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "url() table function": "SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')",
    "s3() table function": "SELECT * FROM s3('http://127.0.0.1:9/bucket/x.csv', 'CSV', 'a String')",
    "remote() table function": "SELECT * FROM remote('127.0.0.1:9', system.one)",
    "executable() table function": "SELECT * FROM executable('ls', 'TSV', 'a String')",
    "file() scalar function": "SELECT `file`('/etc/hostname')",
    "hasColumnInTable() to a host": "SELECT hasColumnInTable('127.0.0.1:9', 'default', '', 'system', 'one', 'dummy')",
    "INTO OUTFILE": "SELECT 1 INTO OUTFILE '{outfile}'",
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_what_could_write_change_settings_or_reach_outside_is_refused(analysts: Analysts, kind: str, tmp_path: Path) -> None:
    outfile = tmp_path / "out.tsv"
    statement = REFUSED[kind].format(outfile=outfile)
    response = httpx.post(f"{analysts.url}/", content=statement, auth=("root", ADMIN_TOKEN))
    assert response.status_code == 403, (response.status_code, response.text)
    assert response.headers["x-clickhouse-exception-code"] == "164"
    assert re.match(r"Code: 164\. DB::Exception: .+\(READONLY\)", response.text), response.text
    with pytest.raises(DatabaseError, match="Code: 164"):  # and so clickhouse-connect raises ClickHouse's error
        analysts.client().command(statement)
    assert not outfile.exists()
    assert analysts.client().command("SELECT count() FROM usage_events") == EVENTS


def test_a_setting_sent_as_a_parameter_is_refused_and_a_syntax_error_is_a_400(analysts: Analysts) -> None:
    auth = ("root", ADMIN_TOKEN)
    response = httpx.post(f"{analysts.url}/", params={"max_result_rows": "0"}, content="SELECT 1", auth=auth)
    assert response.status_code == 403 and "Cannot modify 'max_result_rows' setting in readonly mode" in response.text
    response = httpx.post(f"{analysts.url}/", content="SELECT 1; DROP TABLE usage_events", auth=auth)
    assert response.status_code == 400 and response.headers["x-clickhouse-exception-code"] == "62", response.text
    assert "Multi-statements are not allowed" in response.text


def test_reads_of_every_served_kind_answer(analysts: Analysts) -> None:
    client = analysts.client()
    assert "usage_events" in str(client.command("SHOW TABLES"))
    assert client.query("DESCRIBE TABLE usage_events").result_rows[0][0] == "event_id"
    assert client.command("EXISTS TABLE usage_events") == 1
    assert "ReadFrom" in str(client.command("EXPLAIN SELECT tenant FROM usage_events"))
    sent_by_grafana = httpx.post(f"{analysts.url}/", params={"max_execution_time": "60"}, content="SELECT 1", auth=("root", ADMIN_TOKEN))
    assert sent_by_grafana.status_code == 200, sent_by_grafana.text  # accepted; the server's own limit applies


def test_the_database_a_request_names_is_used_and_an_unsafe_name_is_refused(analysts: Analysts) -> None:
    auth = ("root", ADMIN_TOKEN)
    in_system = httpx.post(f"{analysts.url}/", params={"database": "system"}, content="SELECT count() FROM one", auth=auth)
    assert in_system.status_code == 200 and in_system.text == "1\n", in_system.text
    back_home = httpx.post(f"{analysts.url}/", content="SELECT currentDatabase()", auth=auth)
    assert back_home.text == "default\n"
    unsafe = httpx.post(f"{analysts.url}/", params={"database": "a\\`; KILL QUERY WHERE 1 SYNC --"}, content="SELECT 1", auth=auth)
    assert unsafe.status_code == 400 and unsafe.headers["x-clickhouse-exception-code"] == "81", unsafe.text
    as_object = httpx.post(f"{analysts.url}/", params={"default_format": "DataFrame"}, content="SELECT 1", auth=auth)
    assert as_object.status_code == 400 and "Unknown format" in as_object.text


def test_only_admin_credentials_are_served(analysts: Analysts) -> None:
    query = {"query": "SELECT 1"}
    as_key = httpx.get(f"{analysts.url}/", params=query, auth=("analyst", "analyst-alice-key"))
    assert as_key.status_code == 403 and as_key.headers["x-clickhouse-exception-code"] == "497", as_key.text
    as_ingest = httpx.get(f"{analysts.url}/", params=query, headers={"X-ClickHouse-User": "importer", "X-ClickHouse-Key": INGEST_TOKEN})
    assert as_ingest.status_code == 403, as_ingest.text
    for auth in [("root", "not-the-token"), ("someone-else", ADMIN_TOKEN)]:
        refused = httpx.get(f"{analysts.url}/", params=query, auth=auth)
        assert refused.status_code == 401 and refused.headers["x-clickhouse-exception-code"] == "516", refused.text
    assert httpx.get(f"{analysts.url}/", params=query).status_code == 401
    with pytest.raises(DatabaseError, match="497"):
        analysts.client(username="analyst", password="analyst-bob-key")
    by_headers = httpx.get(f"{analysts.url}/", params=query, headers={"X-ClickHouse-User": "root", "X-ClickHouse-Key": ADMIN_TOKEN})
    assert by_headers.status_code == 200 and by_headers.text == "1\n"
    by_parameters = httpx.get(f"{analysts.url}/", params={**query, "user": "root", "password": ADMIN_TOKEN})
    assert by_parameters.status_code == 200 and by_parameters.text == "1\n"


def test_a_query_past_the_time_limit_is_cut_off_while_the_api_keeps_answering(analysts: Analysts) -> None:
    answered: list[httpx.Response] = []
    running = threading.Thread(target=lambda: answered.append(httpx.post(
        f"{analysts.url}/", content="SELECT count() FROM numbers(1000000000000)", auth=("root", ADMIN_TOKEN), timeout=60)))  # fmt: skip
    health: list[tuple[int, float]] = []
    running.start()
    while running.is_alive():
        started = time.perf_counter()
        status = httpx.get(f"{analysts.url}/healthz", timeout=10).status_code
        health.append((status, time.perf_counter() - started))
    running.join()
    [cut] = answered
    assert cut.status_code == 400 and cut.headers["x-clickhouse-exception-code"] == "159", cut.text
    assert "(TIMEOUT_EXCEEDED)" in cut.text
    assert len(health) >= 3 and {status for status, _ in health} == {200}, health
    assert max(seconds for _, seconds in health) < 1.0, health  # answered while the query ran, not after it


def test_a_result_over_the_row_limit_is_refused(analysts: Analysts) -> None:
    auth = ("root", ADMIN_TOKEN)
    within = httpx.post(f"{analysts.url}/", content=f"SELECT number FROM numbers({ROW_LIMIT})", auth=auth)
    assert within.status_code == 200 and len(within.text.splitlines()) == ROW_LIMIT
    over = httpx.post(f"{analysts.url}/", content=f"SELECT number FROM numbers({ROW_LIMIT + 1})", auth=auth)
    assert over.status_code == 400 and over.headers["x-clickhouse-exception-code"] == "396", over.text
    assert "(TOO_MANY_ROWS_OR_BYTES)" in over.text


def _throttlex_sql(analysts: Analysts, *args: str, password: str = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(Path(sys.executable).parent), "THROTTLEX_SQL_URL": analysts.url, "THROTTLEX_SQL_USER": "root",
           "THROTTLEX_SQL_PASSWORD": password}  # fmt: skip
    return subprocess.run([sys.executable, "-c", "from throttlex.api.cli import main; main()", "sql", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_throttlex_sql_prints_a_table_csv_and_json(analysts: Analysts) -> None:
    statement = "SELECT tenant, count() AS n FROM usage_events GROUP BY tenant ORDER BY tenant"
    expected = analysts.client().query(statement).result_rows
    as_csv = _throttlex_sql(analysts, statement, "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert as_csv.stdout.splitlines() == ['"tenant","n"', *[f'"{tenant}",{n}' for tenant, n in expected]]
    as_json = _throttlex_sql(analysts, statement, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert [(row["tenant"], int(row["n"])) for row in json.loads(as_json.stdout)] == expected
    as_table = _throttlex_sql(analysts, statement)
    assert as_table.returncode == 0, as_table.stderr
    for tenant, n in expected:
        assert re.search(rf"│ {tenant}\s+│ {n}\s+│", as_table.stdout), as_table.stdout
    refused = _throttlex_sql(analysts, "DROP TABLE usage_events")
    assert refused.returncode == 2 and refused.stderr.strip().startswith("throttlex: error: Code: 164.")
    assert len(refused.stderr.strip().splitlines()) == 1
    wrong = _throttlex_sql(analysts, "SELECT 1", password="not-the-token")
    assert wrong.returncode == 2 and "Authentication failed" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


def test_the_grafana_usage_dashboard_queries_answer_through_the_api(analysts: Analysts) -> None:
    """The provisioned usage dashboard's SQL, its Grafana time macro filled in as the data source does."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "usage.json").read_text())
    client = analysts.client()
    for panel in dashboard["panels"]:
        [target] = panel["targets"]
        assert panel["datasource"]["type"] == target["datasource"]["type"] == "grafana-clickhouse-datasource"
        sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 1 DAY AND \1 <= now()", target["rawSql"])
        rows = client.query(sql).result_rows
        assert rows and {row[1] for row in rows} == {"acme", "globex"}, (panel["title"], rows)
        assert sum(row[2] for row in rows) > 0


def test_every_readme_query_answers_as_chdb_does_directly_after_the_run_stops(analysts: Analysts) -> None:
    """Last in this module: it stops the run to open the chDB directory itself."""
    statements = readme_queries()
    assert len(statements) >= 3
    alice = analysts.key_ids["analyst-alice-key"]
    statements = [statement.replace("'3f9a...'", f"'{alice}'") for statement in statements]  # the README's placeholder key
    client = analysts.client()
    live = [sorted(tuple(row) for row in client.query(statement).result_rows) for statement in statements]  # rows in ties may come in any order
    assert all(live), live  # every README query finds the events sent a few minutes ago
    analysts.role.stop()
    direct = clickhouse_connect.get_client(dsn=analysts.sandbox.env["THROTTLEX_CLICKHOUSE_DSN"])
    try:
        assert [sorted(tuple(row) for row in direct.query(statement).result_rows) for statement in statements] == live
    finally:
        direct.close()
