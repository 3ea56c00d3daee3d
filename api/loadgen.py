"""Traffic for the demo: calm keys stay under their limit, hot keys go over it.

Each key sends requests at a steady rate through a gateway; the run ends with a table of what each
key got (200s and 429s, and when the first 429 came) and the quota report of a hot and a calm key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from throttlex.api.demo_gateway import create_gateway_app
from throttlex.api.server import HttpServer
from throttlex.ingest.events import key_id_for
from throttlex.ingest.keys import KeyRecord
from throttlex.ingest.settings import GatewaySettings
from throttlex.processors.registry import open_registry


@dataclass
class KeyTraffic:
    name: str
    api_key: str
    rate_per_s: float
    sent: int = 0
    ok: int = 0
    limited: int = 0
    errors: int = 0
    first_429_s: float | None = None
    statuses: dict[int, int] = field(default_factory=dict)


def plan_keys(run_id: str, calm: int, hot: int, calm_rate: float, hot_rate: float) -> list[KeyTraffic]:
    keys = [KeyTraffic(f"hot-{n}", f"demo-{run_id}-hot-{n}", hot_rate) for n in range(1, hot + 1)]
    keys += [KeyTraffic(f"calm-{n}", f"demo-{run_id}-calm-{n}", calm_rate) for n in range(1, calm + 1)]
    return keys


async def drive(
    gateway_url: str,
    keys: list[KeyTraffic],
    duration_s: float,
    console: Console,
    *,
    on_late_429: Callable[[KeyTraffic], Awaitable[None]] | None = None,
) -> None:
    """Send each key's requests at its rate for ``duration_s``. ``on_late_429`` is awaited whenever a key
    is refused in the last third of the run (the quota report of a key while it is blocked)."""
    limits = httpx.Limits(max_connections=max(8, len(keys) * 2))
    async with httpx.AsyncClient(base_url=gateway_url, timeout=5.0, limits=limits) as client:
        started = time.monotonic()

        async def send_for(key: KeyTraffic) -> None:
            n = 0
            while (due := started + n / key.rate_per_s) < started + duration_s:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                n += 1
                key.sent += 1
                try:
                    response = await client.get(f"/v1/items/{n}", headers={"x-api-key": key.api_key})
                except httpx.HTTPError:
                    key.errors += 1
                    continue
                key.statuses[response.status_code] = key.statuses.get(response.status_code, 0) + 1
                if response.status_code == 429:
                    key.limited += 1
                    elapsed_s = time.monotonic() - started
                    if key.first_429_s is None:
                        key.first_429_s = elapsed_s
                    if on_late_429 is not None and elapsed_s > duration_s * 2 / 3:
                        await on_late_429(key)
                elif response.is_success:
                    key.ok += 1
                else:
                    key.errors += 1

        progress = Progress(
            TextColumn("[bold]traffic"), BarColumn(), TextColumn("{task.description}"), TimeRemainingColumn(),
            console=console, transient=False,
        )  # fmt: skip
        with progress:
            task = progress.add_task("", total=duration_s)
            senders = asyncio.gather(*(send_for(key) for key in keys))
            while not senders.done():
                sent = sum(k.sent for k in keys)
                limited = sum(k.limited for k in keys)
                progress.update(task, completed=min(duration_s, time.monotonic() - started),
                                description=f"{sent} requests, {limited} got 429")  # fmt: skip
                await asyncio.wait({senders}, timeout=0.25)
            progress.update(task, completed=duration_s)
            senders.result()


def traffic_table(keys: list[KeyTraffic]) -> Table:
    table = Table(title="Requests per key")
    for column in ("key", "rate/s", "sent", "200", "429", "errors", "first 429 after"):
        table.add_column(column, justify="left" if column == "key" else "right")
    for key in keys:
        first = f"{key.first_429_s:.1f}s" if key.first_429_s is not None else "-"
        table.add_row(key.name, f"{key.rate_per_s:g}", str(key.sent), str(key.ok), str(key.limited), str(key.errors), first)
    return table


def quota_table(name: str, report: dict[str, Any]) -> Table:
    blocked = report.get("blocked_until")
    title = f"Quota report for {name} (key id {report['api_key_id']})"
    title += f": blocked until {_clock_time(blocked)} by {report['blocked_by']}" if blocked else ": not blocked"
    plan = report.get("plan")
    caption = None
    if plan:
        caption = f"plan {plan['plan']}: {plan['used_units']:,} of {plan['limit_units']:,} billable units used this month"
    table = Table(title=title, caption=caption)
    for column in ("policy", "limit", "window", "used", "remaining", "resets at", "blocked until"):
        table.add_column(column)
    for policy in report["policies"]:
        table.add_row(
            policy["policy"], str(policy["limit"]), _window(policy), str(policy["used"]),
            str(policy["remaining"]), _clock_time(policy["resets_at"]), _clock_time(policy["blocked_until"]),
        )  # fmt: skip
    return table


def _clock_time(iso: str | None, today: date | None = None) -> str:
    """An instant as UTC time of day, with its date when that is not today (a monthly quota resets days on)."""
    if iso is None:
        return "-"
    instant = datetime.fromisoformat(iso).astimezone(timezone.utc)
    if instant.date() == (today or datetime.now(timezone.utc).date()):
        return instant.strftime("%H:%M:%S UTC")
    return instant.strftime("%Y-%m-%d %H:%M:%S UTC")


async def fetch_quota(api_url: str, api_key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=api_url, timeout=5.0) as client:
        response = await client.get("/v1/quota", headers={"x-api-key": api_key})
        response.raise_for_status()
        report: dict[str, Any] = response.json()
        return report


async def run(
    settings: GatewaySettings,
    keys: list[KeyTraffic],
    duration_s: float,
    console: Console,
    *,
    gateway_url: str | None,
    gateway_port: int,
    api_url: str,
) -> None:
    """Drive the traffic (through the demo gateway unless ``gateway_url`` is given), then print what
    each key got and the quota reports of a hot key (taken while it was blocked) and a calm key."""
    await register(settings, keys)
    server = None
    if gateway_url is None:
        server = HttpServer(create_gateway_app(settings), "127.0.0.1", gateway_port)
        await server.start()
        gateway_url = server.url
    console.print(f"driving {len(keys)} keys through {gateway_url} for {duration_s:g}s")
    hot = next((key for key in keys if key.name.startswith("hot")), None)
    calm = next((key for key in keys if key.name.startswith("calm")), None)
    reports: dict[str, dict[str, Any]] = {}

    async def report(key: KeyTraffic) -> None:
        try:
            reports[key.name] = await fetch_quota(api_url, key.api_key)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"no quota report from {api_url} ({exc}); is `throttlex run` up?") from None

    async def report_blocked_hot_key(key: KeyTraffic) -> None:
        if key is hot and key.name not in reports:
            await report(key)

    try:
        await drive(gateway_url, keys, duration_s, console, on_late_429=report_blocked_hot_key)
    finally:
        if server is not None:
            await server.stop()
    console.print(traffic_table(keys))
    for key in (hot, calm):
        if key is not None:
            if key.name not in reports:
                await report(key)
            console.print(quota_table(key.name, reports[key.name]))


async def register(settings: GatewaySettings, keys: list[KeyTraffic]) -> None:
    """Register the demo's keys (tenant from the settings, default plan), as an admin would."""
    async with open_registry(settings) as registry:
        for key in keys:
            key_id = key_id_for(key.api_key, settings.key_salt_bytes)
            await registry.put_key(KeyRecord(key_id=key_id, tenant=settings.tenant, name=key.name))


def _window(policy: dict[str, Any]) -> str:
    """A policy's window for the table: seconds, or the calendar period of a quota."""
    if policy["algorithm"] == "quota":
        return "day" if policy["window_s"] <= 86_400 else "month"
    return f"{policy['window_s']:g}s"
