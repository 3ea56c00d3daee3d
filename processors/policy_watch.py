"""Live policy changes: the policy file is checked every few seconds and a valid change is applied
without a restart. A change that does not validate is refused with the reason, and the policies in
force stay as they are."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from processors import metrics
from processors.policy import PolicyFileError, PolicySet, parse_policies

log = logging.getLogger(__name__)


async def watch_policy_file(
    path: Path, interval_s: float, apply: Callable[[PolicySet], Awaitable[None]]
) -> None:
    """Call ``apply`` with the new policies each time the file's content changes and validates."""
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
        await apply(policies)
        metrics.POLICY_RELOADS.labels(outcome="applied").inc()
        log.info("policy change applied", extra={"policies": [policy.name for policy in policies.policies]})


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError as exc:
        log.warning("policy file unreadable; keeping the policies in force", extra={"error": str(exc)})
        return None
