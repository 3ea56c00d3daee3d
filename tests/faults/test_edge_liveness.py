"""An edge cache whose Redis stops answering while its connection stays open (the process stopped with
SIGSTOP for 10 s: nothing is closed, nothing arrives), as a stopped Redis or a dropped NAT entry does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.denylist_entries import Block
from throttlex.ingest.metrics import EDGE_REDIS_ERRORS
from throttlex.processors.worker.denylist_writer import DenylistWriter
from tests.conftest import eventually, redis_answers

STALL_S = 10.0
SILENCE_S = 1.0
NOTICE_BOUND_S = 2 * SILENCE_S + 1.0  # silent for SILENCE_S, then a ping unanswered as long (about 2 s in all)


async def test_an_edge_notices_a_redis_that_stops_answering_and_catches_up_when_it_answers(
    private_redis: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    url, processes = private_redis
    writer_client = Redis.from_url(url, socket_timeout=3 * STALL_S)  # its write waits out the stall
    await eventually(lambda: redis_answers(writer_client), timeout_s=10, what="the private Redis to answer")
    prefix = "liveness"
    edge = EdgeDenylist(url, prefix, silence_s=SILENCE_S)
    await edge.start()
    assert edge.synced
    request = {"api_key": "k1", "tenant": "acme", "ip": "10.0.0.1", "route": "/v1/items", "method": "GET"}
    block = Block("api_key=k1", wall_clock_ms() + 120_000, "per-key", dims=("api_key",))
    try:
        os.kill(processes[-1].pid, signal.SIGSTOP)
        stalled_at = time.monotonic()
        await eventually(lambda: not edge.synced, timeout_s=NOTICE_BOUND_S, what="the edge to notice the silent Redis")
        noticed_s = time.monotonic() - stalled_at
        # A worker's block decided during the stall: its write waits for Redis.
        writing = asyncio.create_task(DenylistWriter(writer_client, prefix).publish([block]))
        slowest_check_s = 0.0
        while time.monotonic() - stalled_at < STALL_S:  # requests go on being checked (a local lookup: nothing to wait on)
            started = time.perf_counter()
            assert edge.check(request) is None
            slowest_check_s = max(slowest_check_s, time.perf_counter() - started)
            await asyncio.sleep(0.01)
        os.kill(processes[-1].pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        assert await writing == 1
        await eventually(lambda: edge.check(request) is not None, timeout_s=2.0,
                         what="the block written during the stall, within 2 s of Redis answering")  # fmt: skip
        caught_up_s = time.monotonic() - resumed_at
        await eventually(lambda: edge.synced, timeout_s=2.0, what="the edge to be synchronised again")
    finally:
        os.kill(processes[-1].pid, signal.SIGCONT)
        await edge.stop()
        await writer_client.aclose()
    print(f"silent Redis noticed after {noticed_s:.2f} s; a check took at most {slowest_check_s * 1e6:.0f} µs meanwhile; "
          f"the block written during the stall reached the edge {caught_up_s:.2f} s after Redis answered")  # fmt: skip


def edge_redis_errors() -> float:
    """Redis errors the edge caches of this process have met (`throttlex_edge_redis_errors_total`), all kinds."""
    return sum(sample.value for metric in EDGE_REDIS_ERRORS.collect() for sample in metric.samples
               if sample.name.endswith("_total"))  # fmt: skip


class Relay:
    """A TCP relay to Redis that can lose its flows the way a NAT that drops its entries does: the connections
    stay open and nothing passes on them any more, in either direction, forever. While ``vanished``, new
    connections are accepted and then get nothing either (the peer is gone); afterwards new ones work."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._generation = 0
        self.vanished = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def lose_every_flow(self) -> None:
        self._generation += 1
        self.vanished = True

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.vanished:  # accepted, then silence: kept open, nothing read or sent
            self._spawn(self._hold(writer))
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        generation = self._generation
        self._spawn(self._pipe(reader, upstream_writer, generation))
        self._spawn(self._pipe(upstream_reader, writer, generation))

    async def _hold(self, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            writer.close()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, generation: int) -> None:
        try:
            while data := await source.read(65_536):
                if generation != self._generation:
                    await asyncio.Event().wait()  # a lost flow: what arrives goes nowhere, and nothing is read again
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def test_an_edge_whose_redis_flows_vanish_gets_new_ones_and_catches_up(
    private_redis: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    """Unlike a stopped Redis, whose kernel still answers, a vanished peer leaves a read waiting for TCP's own
    timeout (about 15 minutes). Every Redis call of the edge is bounded, so it gives the dead connections up,
    opens new ones once the way is clear, and a block written meanwhile reaches it."""
    url, _ = private_redis
    errors_before = edge_redis_errors()
    writer_client = Redis.from_url(url)
    await eventually(lambda: redis_answers(writer_client), timeout_s=10, what="the private Redis to answer")
    relay = Relay(int(url.rsplit(":", 1)[1].split("/")[0]))
    port = await relay.start()
    edge = EdgeDenylist(f"redis://127.0.0.1:{port}/0", "vanish", silence_s=SILENCE_S)
    await edge.start()
    request = {"api_key": "k1", "tenant": "acme", "ip": "10.0.0.1", "route": "/v1/items", "method": "GET"}
    try:
        assert edge.synced
        relay.lose_every_flow()
        await eventually(lambda: not edge.synced, timeout_s=10, what="the edge to notice the lost flows")  # timed above
        # Reconnecting into the void for a while: each attempt's calls must give up rather than wait forever.
        await eventually(lambda: edge_redis_errors() >= errors_before + 2, timeout_s=15,
                         what="the edge to give up a second connection")  # fmt: skip
        relay.vanished = False  # the way is clear again for new connections; the old ones stay lost
        block = Block("api_key=k1", wall_clock_ms() + 120_000, "per-key", dims=("api_key",))
        assert await DenylistWriter(writer_client, "vanish").publish([block]) == 1
        await eventually(lambda: edge.check(request) is not None, timeout_s=15, what="the block to reach the edge")
        assert edge.synced
    finally:
        await edge.stop()
        await relay.stop()
        await writer_client.aclose()
