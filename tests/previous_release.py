"""The previous release of ThrottleX, from the repository's own history, for the rolling-upgrade test and the
benchmark that measures this release's worker beside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

PREVIOUS_RELEASE = "2dc586a"
"""The last commit before this release's worker (changelog written outside transactions, windows on event time)."""


class PreviousReleaseMissing(RuntimeError):
    """The clone has no history back to the previous release (a shallow clone)."""


LEDGER_BEFORE_ROLLUPS = "8c4653b"
"""The last commit whose API replicas each fed their plan ledger every raw event (`bench_ledger`)."""


def previous_release(into: Path, commit: str = PREVIOUS_RELEASE) -> Path:
    """Unpack the previous release's packages under ``into``; returns the directory to put on ``PYTHONPATH``
    for ``import throttlex`` to find them (the folders are mapped onto the package as the packaging does)."""
    root = Path(__file__).parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", commit, "ingest", "processors", "api"],
                             capture_output=True)  # fmt: skip
    if archive.returncode != 0:
        raise PreviousReleaseMissing(f"the previous release {commit} is not in this clone's history "
                                     f"(a shallow clone?): {archive.stderr.decode().strip()}")  # fmt: skip
    (into / "src").mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into / "src")], input=archive.stdout, check=True)
    package = into / "path" / "throttlex"
    package.mkdir(parents=True)
    for folder in ("ingest", "processors", "api"):
        (package / folder).symlink_to(into / "src" / folder)
    return into / "path"
