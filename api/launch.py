"""The `throttlex` command's entry point: the command line needs the server parts, which a gateway-only
install (``pip install throttlex``) leaves out; say so in one line instead of a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from throttlex.api.cli import main as cli_main
    except ModuleNotFoundError as exc:
        sys.exit(f"throttlex: error: the command line needs the server parts ({exc.name} is not installed): "
                 "pip install 'throttlex[server]'")  # fmt: skip
    cli_main()
