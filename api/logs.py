"""The one place that configures logging: JSON lines on stderr with level, logger, message and context."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

_NOISY = ("aiokafka", "kafka", "uvicorn.access", "uvicorn.error")


def configure_logging(level: str, *, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"role": role},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _NOISY:  # client libraries are chatty at INFO; their warnings still show
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))
