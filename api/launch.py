"""The `throttlex` command's entry point: the command line needs the server parts, which a gateway-only
install (``pip install throttlex``) leaves out; say so in one line instead of a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from throttlex.api.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_PACKAGES:
            raise
        sys.exit(f"throttlex: error: the command line needs the server parts ({exc.name} is not installed): "
                 "pip install 'throttlex[server]'")  # fmt: skip
    cli_main()


SERVER_PACKAGES = {"aiokafka", "fastapi", "uvicorn", "clickhouse_connect", "chdb", "pyarrow", "yaml", "typer", "rich",
                   "pythonjsonlogger", "httpx"}  # fmt: skip
"""What `throttlex[server]` adds (import names): a missing one means a gateway-only install, anything
else missing is a fault to report as it is."""
