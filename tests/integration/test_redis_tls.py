"""ThrottleX on a Redis that wants TLS and a password (``rediss://:<password>@host:port/0?ssl_ca_certs=<CA file>``):
a Redis of the test's own, its certificate signed by a CA the test makes. The worker's writer and a gateway's
edge denylist both connect, and a block goes from one to the other; a client that does not trust the CA, or
has the wrong password, is refused. The same through a Sentinel that speaks TLS only
(``rediss+sentinel://:<password>@host:port/<service>/0?ssl_ca_certs=<CA file>``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.exceptions import AuthenticationError, ConnectionError

from throttlex.ingest.clock import wall_clock_ms
from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.denylist_entries import Block
from throttlex.processors.redis_client import redis_client
from throttlex.processors.worker.denylist_writer import DenylistWriter
from tests.conftest import eventually, free_port, redis_answers

pytestmark = pytest.mark.integration

PASSWORD = "redis-tls-test-password"


def _certificates(directory: Path) -> None:
    """A CA, and a certificate it signs for 127.0.0.1."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA", "-keyout", "ca-key.pem", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "redis-key.pem", "-out", "redis.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "1",
            "-extfile", "san.ext", "-out", "redis.pem")  # fmt: skip


@pytest.fixture
def tls_sentinel(tls_redis: tuple[int, Path]) -> Iterator[int]:
    """A Sentinel on TLS only, watching `tls_redis` as service ``tls-primary``: its port."""
    redis_port, ca = tls_redis
    directory, port = ca.parent, free_port()
    (directory / "sentinel.conf").write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file redis.pem\ntls-key-file redis-key.pem\n"
        f"tls-ca-cert-file ca.pem\ntls-auth-clients no\ntls-replication yes\n"
        f"sentinel monitor tls-primary 127.0.0.1 {redis_port} 1\nsentinel auth-pass tls-primary {PASSWORD}\n"
    )
    process = subprocess.Popen(["redis-server", "sentinel.conf", "--sentinel"], cwd=directory, stdout=subprocess.DEVNULL)
    try:
        yield port
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Redis that accepts TLS connections with `PASSWORD` only: its port and the CA that signed it."""
    _certificates(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--tls-cert-file", "redis.pem", "--tls-key-file", "redis-key.pem", "--tls-ca-cert-file", "ca.pem",
         "--tls-auth-clients", "no", "--requirepass", PASSWORD],
        cwd=tmp_path, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield port, tmp_path / "ca.pem"
    finally:
        process.kill()
        process.wait()


async def a_block_goes_from_writer_to_edge(url: str) -> None:
    writer_client = redis_client(url, 2.0)
    await eventually(lambda: redis_answers(writer_client), timeout_s=20, what="the TLS Redis to answer")
    edge = EdgeDenylist(url, "tls-test")
    await edge.start()
    try:
        block = Block("api_key=k1", wall_clock_ms() + 60_000, "per-key", dims=("api_key",))
        assert await DenylistWriter(writer_client, "tls-test").publish([block]) == 1
        request = {"api_key": "k1", "tenant": "acme", "ip": "10.0.0.1", "route": "/v1/items", "method": "GET"}
        await eventually(lambda: edge.check(request) is not None, timeout_s=5, what="the block at the edge")
    finally:
        await edge.stop()
        await writer_client.aclose()


async def test_a_block_goes_through_a_primary_found_by_a_sentinel_on_tls(tls_redis: tuple[int, Path], tls_sentinel: int) -> None:
    _, ca = tls_redis
    await a_block_goes_from_writer_to_edge(f"rediss+sentinel://:{PASSWORD}@127.0.0.1:{tls_sentinel}/tls-primary/0?ssl_ca_certs={ca}")


async def test_a_block_goes_through_a_redis_with_tls_and_a_password(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    await a_block_goes_from_writer_to_edge(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    # The refusals with redis-py's blocking client: a TLS connection the asyncio client has refused at AUTH is
    # closed without waiting, and one still closing when the test's event loop ends leaves its socket behind.
    for bad_url, error in (
        (f"rediss://:{PASSWORD}@127.0.0.1:{port}/0", ConnectionError),  # the system's CAs do not know the test's CA
        (f"rediss://:not-the-password@127.0.0.1:{port}/0?ssl_ca_certs={ca}", AuthenticationError),
    ):
        with SyncRedis.from_url(bad_url, socket_timeout=2.0) as client, pytest.raises(error):
            client.ping()
