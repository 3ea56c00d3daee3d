"""Serving an ASGI app with uvicorn inside an event loop that ThrottleX owns."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn
from typing import Any
from starlette.types import ASGIApp


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the runner owns SIGINT/SIGTERM for every role."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    def __init__(self, app: ASGIApp, host: str, port: int, **options: Any) -> None:
        """``options``: more of uvicorn's settings (``proxy_headers``, ``forwarded_allow_ips``...)."""
        self.url = f"http://{host}:{port}"
        self._server = _EmbeddedServer(
            uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, **options)
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve in the background; raises RuntimeError if the server cannot start (port taken...)."""
        self._task = asyncio.create_task(self._server.serve(), name=f"http {self.url}")
        while not self._server.started:
            if self._task.done():
                raise RuntimeError(f"could not serve on {self.url} (is the port in use?); see the log above")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(SystemExit):
                await self._task


async def serve_until_signalled(app: ASGIApp, host: str, port: int) -> None:
    """Serve ``app`` until SIGINT or SIGTERM."""
    server = HttpServer(app, host, port)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
