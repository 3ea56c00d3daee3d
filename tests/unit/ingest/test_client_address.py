"""The client behind trusted proxies: hops read from the right, trusted ones skipped, a caller's own
additions to the header never reached; off unless proxies are configured."""

from __future__ import annotations

import pytest

from throttlex.ingest.client_address import ClientAddress
from throttlex.ingest.settings import GatewaySettings

BALANCERS = ClientAddress(["10.0.0.0/8", "2001:db8:ffff::1"])


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_headers_say() -> None:
    off = ClientAddress([])
    assert not off.enabled
    assert off.of("10.1.1.1", "203.0.113.7", 'for="198.51.100.1"') == "10.1.1.1"


def test_a_peer_that_is_no_trusted_proxy_is_the_client() -> None:
    assert BALANCERS.of("192.0.2.10", "203.0.113.7", None) == "192.0.2.10"


@pytest.mark.parametrize(("forwarded_for", "client"), [
    ("203.0.113.7", "203.0.113.7"),
    ("198.51.100.9, 203.0.113.7", "203.0.113.7"),  # the caller wrote 198.51.100.9 itself: never reached
    ("198.51.100.9, 203.0.113.7, 10.2.2.2", "203.0.113.7"),  # two balancers in a row
    ("203.0.113.7:4711", "203.0.113.7"),
    ("[2001:db8::7]:4711", "2001:db8::7"),
    ("10.3.3.3, 10.2.2.2", "10.3.3.3"),  # every hop a balancer: the leftmost
    ("nonsense, 203.0.113.7", "203.0.113.7"),
    ("203.0.113.7, nonsense", "10.1.1.1"),  # garbage appended by a trusted hop: nothing left of it is believed
    ("", "10.1.1.1"),
])  # fmt: skip
def test_x_forwarded_for_is_read_from_the_right(forwarded_for: str, client: str) -> None:
    assert BALANCERS.of("10.1.1.1", forwarded_for, None) == client


def test_forwarded_is_read_when_x_forwarded_for_is_absent() -> None:
    header = 'for=198.51.100.9;proto=https, for="[2001:db8::7]:4711", for=10.2.2.2'
    assert BALANCERS.of("2001:db8:ffff::1", None, header) == "2001:db8::7"
    assert BALANCERS.of("10.1.1.1", None, "for=unknown") == "10.1.1.1"
    assert BALANCERS.of("10.1.1.1", None, None) == "10.1.1.1"


def test_a_setting_that_names_no_network_is_refused_at_start() -> None:
    assert GatewaySettings(trusted_proxies="10.0.0.0/8, 192.0.2.1").trusted_proxy_list == ["10.0.0.0/8", "192.0.2.1"]
    with pytest.raises(ValueError, match="'10.0.0.300' is not an address or a network"):
        GatewaySettings(trusted_proxies="10.0.0.0/8,10.0.0.300")
