"""Reading THROTTLEX_REDIS_URL: one server, a primary through Sentinel, and what is refused (with what to give)."""

from __future__ import annotations

import pytest

from throttlex.ingest.redis_connection import RedisUrlError, check_redis_url, connect_redis, parse_sentinel_url


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_data_nodes_settings() -> None:
    target = parse_sentinel_url("rediss+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26381,[::2]/throttlex/2"
                                "?ssl_ca_certs=/etc/ca.pem&sentinel_password=watch")  # fmt: skip
    assert target.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26381), ("::2", 26379)]
    assert target.service == "throttlex" and target.tls and target.sentinel_password == "watch"
    assert target.data["username"] == "app" and target.data["password"] == "s3cret" and target.data["db"] == 2
    assert target.data["ssl_ca_certs"] == "/etc/ca.pem" and "sentinel_password" not in target.data


def test_plain_urls_pass_as_they_are() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@redis.example.com:6380/0?ssl_ca_certs=/ca.pem", "unix:///run/redis.sock"):
        assert check_redis_url(url) == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://10.0.0.1:7000", "Redis Cluster is not supported"),
        ("http://10.0.0.1:6379", "not http://"),
        ("redis+sentinel://10.0.0.1:26379", "names the service"),
        ("redis+sentinel://10.0.0.1:port/throttlex", "give host:port"),
    ],
)
def test_unusable_urls_are_refused_saying_what_to_give(url: str, says: str) -> None:
    with pytest.raises(RedisUrlError, match=says):
        check_redis_url(url)


def test_a_sentinel_url_may_set_socket_options_the_caller_also_sets() -> None:
    client = connect_redis("redis+sentinel://127.0.0.1:26379/throttlex/0?socket_timeout=3", socket_timeout=1.0)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.0
