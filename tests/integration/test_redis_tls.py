"""ThrottleX on a Redis that wants TLS and a password (``rediss://:<password>@host:port/0?ssl_ca_certs=<CA file>``):
a Redis of the test's own, its certificate signed by a CA the test makes. The worker's writer and a gateway's
edge denylist both connect, and a block goes from one to the other; a client that does not trust the CA, or
has the wrong password, is refused."""

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


async def test_a_block_goes_through_a_redis_with_tls_and_a_password(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    writer_client = redis_client(url, 2.0)
    await eventually(lambda: redis_answers(writer_client), timeout_s=20, what="the TLS Redis to answer")
    # The refusals with redis-py's blocking client: a TLS connection the asyncio client has refused at AUTH is
    # closed without waiting, and one still closing when the test's event loop ends leaves its socket behind.
    for bad_url, error in (
        (f"rediss://:{PASSWORD}@127.0.0.1:{port}/0", ConnectionError),  # the system's CAs do not know the test's CA
        (f"rediss://:not-the-password@127.0.0.1:{port}/0?ssl_ca_certs={ca}", AuthenticationError),
    ):
        with SyncRedis.from_url(bad_url, socket_timeout=2.0) as client, pytest.raises(error):
            client.ping()
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

