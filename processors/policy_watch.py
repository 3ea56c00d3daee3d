"""Live policy changes: the policy file is checked every few seconds and a valid change is applied
without a restart. A change that does not validate is refused with the reason, and the policies in
force stay as they are. Once an admin has written policies through the API, the registry's document
is in force instead of the file (`PolicySource`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

from throttlex.processors import metrics
from throttlex.processors.core.policy import PolicyFileError, PolicySet, parse_policies

log = logging.getLogger(__name__)


async def watch_policy_file(
    path: Path, interval_s: float, apply: Callable[[PolicySet], Awaitable[bool]]
) -> None:
    """Call ``apply`` with the new policies each time the file's content changes and validates;
    ``apply`` says whether it put them in force."""
    last = _read(path)
    while True:
        await asyncio.sleep(interval_s)
        text = _read(path)
        if text is None or text == last:
            continue
        last = text
        try:
            policies = parse_policies(text, str(path))
        except PolicyFileError as exc:
            metrics.POLICY_RELOADS.labels(outcome="refused").inc()
            log.error("policy change refused; the policies in force stay", extra={"reason": str(exc)})
            continue
        if not await apply(policies):
            metrics.POLICY_RELOADS.labels(outcome="ignored").inc()
            log.warning("policy file changed, but the registry's policy document is in force; not applied")
            continue
        metrics.POLICY_RELOADS.labels(outcome="applied").inc()
        log.info("policy change applied", extra={"policies": [policy.name for policy in policies.policies]})


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError as exc:
        log.warning("policy file unreadable; keeping the policies in force", extra={"error": str(exc)})
        return None


class PolicySource:
    """The policies in force: the registry's policy document once an admin has written one
    (``PUT /v1/admin/policies`` or ``/plans``), else the policy file. Handlers registered with
    `on_change` are called with the new policies whenever what is in force changes."""

    def __init__(self, file_policies: PolicySet, registry_policies: PolicySet | None) -> None:
        self._file = file_policies
        self._registry = registry_policies
        self._handlers: list[Callable[[PolicySet], Awaitable[None]]] = []

    @property
    def current(self) -> PolicySet:
        return self._registry if self._registry is not None else self._file

    @property
    def origin(self) -> Literal["file", "registry"]:
        return "file" if self._registry is None else "registry"

    def on_change(self, handler: Callable[[PolicySet], Awaitable[None]]) -> None:
        self._handlers.append(handler)

    async def file_changed(self, policies: PolicySet) -> bool:
        """Take the file's new policies; False if the registry's document stays in force instead."""
        self._file = policies
        if self._registry is not None:
            return False
        await self._notify()
        return True

    async def registry_changed(self, policies: PolicySet) -> None:
        self._registry = policies
        await self._notify()

    async def _notify(self) -> None:
        for handler in self._handlers:
            await handler(self.current)
