"""The `throttlex` command line. Configuration comes from ``THROTTLEX_*`` environment variables
(see the README); options here override the most common ones."""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import secrets
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from redis.exceptions import RedisError
from rich.console import Console

from throttlex.api.logs import configure_logging
from throttlex.ingest.kafka_access import KafkaAccessError, verify_login
from throttlex.ingest.keys import NAME_PATTERN
from throttlex.ingest.settings import ConnectionSettings
from throttlex.api.settings import LoadgenSettings, RunSettings
from throttlex.processors.core.policy import PolicyFileError, load_policies
from throttlex.processors.accounting.store import StoreError, UsageStore

cli = typer.Typer(
    name="throttlex",
    help="ThrottleX: distributed rate limiting and usage accounting on Kafka, Redis and ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PolicyFile = Annotated[
    Path | None, typer.Option("--policy-file", help="policy YAML (default: $THROTTLEX_POLICY_FILE or deploy/config/policies.yaml)")
]
ApiPort = Annotated[int | None, typer.Option("--api-port", help="HTTP API port (default: $THROTTLEX_API_PORT or 8080)")]


def _fail(message: str) -> NoReturn:
    typer.echo(f"throttlex: error: {message}", err=True)
    raise typer.Exit(2)


S = TypeVar("S", bound=ConnectionSettings)


def _settings(cls: type[S], **overrides: Any) -> S:
    """The role's settings; exits with a one-line reason if they are malformed, or if a secured Kafka refuses
    the login or certificate they give (clients would retry that for ever)."""
    try:
        settings = cls(**{name: value for name, value in overrides.items() if value is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check across settings, e.g. a file a setting names
            _fail(f"bad settings: {first['msg'].removeprefix('Value error, ')}")
        _fail(f"bad setting THROTTLEX_{str(first['loc'][0]).upper()}: {first['msg']}")
    try:
        verify_login(settings.kafka)
    except KafkaAccessError as exc:
        _fail(str(exc))
    return settings


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        asyncio.run(coroutine)
    except PolicyFileError as exc:
        _fail(f"policy file refused: {exc}")
    except KafkaError as exc:
        _fail(f"Kafka: {_one_line(exc)}; is the broker running (deploy/local/services.sh up)?")
    except RedisError as exc:
        _fail(f"Redis: {_one_line(exc)}; is it running (deploy/local/services.sh up)?")
    except (StoreError, ValueError, RuntimeError, OSError) as exc:
        _fail(_one_line(exc))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _serve(roles: set[str], policy_file: Path | None, api_port: int | None) -> None:
    from throttlex.api.runner import run_roles

    settings = _settings(RunSettings, policy_file=policy_file, api_port=api_port)
    configure_logging(settings.log_level, role="+".join(sorted(roles)))
    _run(run_roles(roles, settings))


@cli.command()
def run(policy_file: PolicyFile = None, api_port: ApiPort = None) -> None:
    """Run worker, sink and API in one process, on the embedded ClickHouse (chDB) by default."""
    _serve({"worker", "sink", "api"}, policy_file, api_port)


@cli.command()
def worker(policy_file: PolicyFile = None) -> None:
    """Run a stream worker: apply the policies to the events, publish blocks to Redis. Workers share the partitions."""
    _serve({"worker"}, policy_file, None)


@cli.command()
def sink() -> None:
    """Run the usage sink: events from Kafka into ClickHouse, offsets committed after each insert."""
    _serve({"sink"}, None, None)


@cli.command()
def api(policy_file: PolicyFile = None, api_port: ApiPort = None) -> None:
    """Run the HTTP API alone (quota report, health, metrics)."""
    _serve({"api"}, policy_file, api_port)


@cli.command()
def migrate(
    print_only: Annotated[
        bool, typer.Option("--print", help="print every statement a migration from nothing runs (in its cluster form "
                           "with $THROTTLEX_CLICKHOUSE_CLUSTER) and change nothing")  # fmt: skip
    ] = False,
) -> None:
    """Create or upgrade the ClickHouse schema ($THROTTLEX_CLICKHOUSE_DSN) and apply the raw retention
    ($THROTTLEX_RAW_RETENTION_DAYS); safe to run repeatedly."""
    settings = _settings(RunSettings)
    if print_only:
        try:
            statements = UsageStore(settings.clickhouse_dsn, cluster=settings.clickhouse_cluster).schema()
        except ValueError as exc:
            _fail(str(exc))
        typer.echo("".join(f"{statement};\n\n" for statement in statements), nl=False)
        return

    async def apply() -> None:
        store = UsageStore(settings.clickhouse_dsn, cluster=settings.clickhouse_cluster)
        await store.open()
        try:
            applied = await store.migrate()
            await store.apply_retention(settings.raw_retention_days)
        finally:
            await store.close()
        typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")

    _run(apply())


keys_cli = typer.Typer(help="Create API keys from the command line (the admin API does the rest).", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="tenant the key belongs to")],
    plan: Annotated[str, typer.Option(help="plan of the key (default: the default plan)")] = "",
    name: Annotated[str, typer.Option(help="what the key is for")] = "",
) -> None:
    """Create an API key in the registry and print it. It is shown this once; only its hash is kept."""
    if not re.match(NAME_PATTERN, tenant):
        _fail(f"tenant {tenant!r} must be 1-64 letters, digits or . _ : -")
    settings = _settings(RunSettings)
    configure_logging("WARNING", role="keys")
    from throttlex.api.admin import key_info
    from throttlex.api.audit import AuditTrail
    from throttlex.processors.registry import issue_key, open_registry

    try:
        actor = f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # a container's user id without a name
        actor = f"cli:uid-{os.getuid()}"

    async def create() -> None:
        trail = AuditTrail(settings.kafka, settings.audit_topic, replication_factor=settings.topic_replication_factor)
        await trail.start()  # before the key exists: a trail that cannot start stops here, with no key made
        try:
            async with open_registry(settings, replication_factor=settings.topic_replication_factor) as registry:
                (registry.policies or load_policies(settings.policy_file)).known_plan(plan)
                plain, record = await issue_key(registry, settings.key_salt_bytes, tenant=tenant, plan=plan, name=name)
            typer.echo(plain)  # the only copy: shown before anything else can fail
            await trail.record(actor, "key.create", record.key_id, None, key_info(record).model_dump(mode="json"))
        finally:
            await trail.stop()
        typer.echo(f"key id {record.key_id} (tenant {tenant}, plan {plan or 'default'})", err=True)

    _run(create())


policies_cli = typer.Typer(help="Work with policy files.", no_args_is_help=True)
cli.add_typer(policies_cli, name="policies")


@policies_cli.command("import-envoy")
def import_envoy(
    file: Annotated[Path, typer.Argument(help="an envoyproxy/ratelimit configuration (domain, descriptors)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the policies here (default: print them)")] = None,
    partial: Annotated[
        bool, typer.Option("--partial", help="write what can be carried over even if some descriptors are refused")
    ] = False,
) -> None:
    """Turn an envoyproxy/ratelimit configuration into ThrottleX policies (docs/envoy.md says how each part maps).

    Descriptors that cannot be carried over are listed with their line and the reason; unless --partial, nothing is
    written then and the exit status is 1."""
    from throttlex.api.envoy_import import EnvoyImportError, import_envoy as translate, roles_from

    try:
        imported = translate(file.read_text(), str(file), roles_from(os.environ.get("THROTTLEX_RLS_DESCRIPTORS", "")))
    except OSError as exc:
        _fail(f"{file}: {exc.strerror}")
    except EnvoyImportError as exc:
        _fail(str(exc))
    for note in imported.notes:
        typer.echo(f"note: {note}", err=True)
    for refusal in imported.refused:
        typer.echo(f"refused: {refusal}", err=True)
    if imported.refused and not partial:
        typer.echo(f"throttlex: {len(imported.refused)} descriptor(s) refused; nothing written (--partial writes the rest)",
                   err=True)  # fmt: skip
        raise typer.Exit(1)
    if output is None:
        typer.echo(imported.document(), nl=False)
    else:
        output.write_text(imported.document())
        typer.echo(f"wrote {len(imported.policies)} policies to {output}", err=True)


@cli.command()
def gateway(
    port: Annotated[int, typer.Option(help="port of the demo gateway")] = 8090,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
) -> None:
    """Run the demo gateway: a small API behind the ThrottleX middleware (its /metrics included)."""
    settings = _settings(LoadgenSettings)
    configure_logging(settings.log_level, role="gateway")
    from throttlex.api.demo_gateway import create_gateway_app
    from throttlex.api.server import serve_until_signalled

    async def serve() -> None:  # the Kafka producer must be made inside the running loop
        await serve_until_signalled(create_gateway_app(settings), host, port)

    _run(serve())


@cli.command()
def loadgen(
    duration_s: Annotated[float, typer.Option("--duration", min=1, help="seconds of traffic")] = 20,
    calm_keys: Annotated[int, typer.Option(min=0, help="keys that stay under their limit")] = 4,
    hot_keys: Annotated[int, typer.Option(min=0, help="keys that go over their limit")] = 2,
    calm_rate: Annotated[float, typer.Option(min=0.1, help="requests per second per calm key")] = 2,
    hot_rate: Annotated[float, typer.Option(min=0.1, help="requests per second per hot key")] = 20,
    gateway_url: Annotated[str | None, typer.Option(help="drive this gateway instead of starting the demo one")] = None,
    gateway_port: Annotated[int, typer.Option(help="port for the demo gateway started here")] = 8090,
    api_url: Annotated[str, typer.Option(help="ThrottleX API to ask for quota reports")] = "http://127.0.0.1:8080",
) -> None:
    """Drive traffic through a gateway and show which keys got blocked, with a quota report."""
    from throttlex.api import loadgen as lg

    settings = _settings(LoadgenSettings)
    configure_logging("WARNING", role="loadgen")
    console = Console()
    keys = lg.plan_keys(secrets.token_hex(3), calm_keys, hot_keys, calm_rate, hot_rate)

    _run(lg.run(settings, keys, duration_s, console, gateway_url=gateway_url, gateway_port=gateway_port, api_url=api_url))


@cli.command()
def sql(
    statement: Annotated[str, typer.Argument(help="one SELECT, SHOW, DESCRIBE, EXISTS or EXPLAIN statement")],
    output: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    url: Annotated[str, typer.Option(envvar="THROTTLEX_SQL_URL", help="the ThrottleX API (`throttlex run`)")] = "http://127.0.0.1:8080",
    user: Annotated[str | None, typer.Option(envvar="THROTTLEX_SQL_USER", help="an admin credential's name")] = None,
    password: Annotated[str | None, typer.Option(envvar="THROTTLEX_SQL_PASSWORD", help="that credential's token")] = None,
    timeout_s: Annotated[float, typer.Option("--timeout", min=1, help="seconds to wait for the answer")] = 120,
) -> None:
    """Query usage in ClickHouse on the running engine, read-only, through the API's analyst SQL.

    Without --user and --password, the first credential of THROTTLEX_ADMIN_TOKENS is used (a local
    trial's own). Example: throttlex sql "SELECT tenant, count() FROM usage_events GROUP BY tenant"
    """
    from throttlex.api import sql_client

    if output not in sql_client.REQUESTED_FORMAT:
        _fail(f"--format is table, csv or json, not {output!r}")
    try:
        result = sql_client.run(url, statement, output, sql_client.login(user, password), timeout_s)
    except sql_client.SqlClientError as exc:
        _fail(str(exc))
    if isinstance(result, str):
        typer.echo(result, nl=not result.endswith("\n"))
    else:
        Console().print(result)


def main() -> None:
    sys.exit(cli())
