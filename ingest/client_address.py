"""The address a request is counted and limited under (the ``ip`` dimension, an event's ``client_ip``).

Behind a load balancer every connection comes from the balancer, so the socket's peer is the caller only
when nothing stands in between. With trusted proxies configured (`GatewaySettings.trusted_proxies`, off by
default), a request whose peer is one of them is traced back through ``X-Forwarded-For`` (or, without it,
``Forwarded: for=``): hops are read from the right, each trusted one skipped, and the first address that is
not a trusted proxy is the client. Every proxy appends the address it received the request from, so what a
caller writes into the header itself lies to the left of that and is never reached. A server that already
rewrote the peer from the same header (uvicorn's ``--forwarded-allow-ips``, werkzeug's ``ProxyFix``) hands
over a peer that is the client, not a trusted proxy: the header is not read a second time.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

_FOR = re.compile(r'for="?\[?([^]";,\s]+)', re.IGNORECASE)
_PEERS_REMEMBERED = 4096


class ClientAddress:
    """The client of each request, given the trusted proxies: addresses or networks (``10.0.0.0/8``)."""

    def __init__(self, trusted_proxies: list[str]) -> None:
        self._networks = [ipaddress.ip_network(proxy.strip(), strict=False) for proxy in trusted_proxies if proxy.strip()]
        self._trusted = lru_cache(maxsize=_PEERS_REMEMBERED)(self._is_trusted)

    @property
    def enabled(self) -> bool:
        return bool(self._networks)

    def of(self, peer: str, forwarded_for: str | None, forwarded: str | None) -> str:
        """The client, for a connection from ``peer`` carrying these ``X-Forwarded-For`` and ``Forwarded``
        header values (None: absent)."""
        if not self._networks or not self._trusted(peer):
            return peer
        if forwarded_for is not None:
            hops = [hop.strip() for hop in forwarded_for.split(",")]
        elif forwarded is not None:
            hops = _FOR.findall(forwarded)
        else:
            return peer
        client = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return client  # garbage in the chain: nothing to its left can be trusted
            client = address
            if not self._trusted(address):
                return client
        return client  # every hop a trusted proxy: the leftmost is as far as the chain goes

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)


def _address(hop: str) -> str | None:
    """The address of one hop (``203.0.113.7``, ``203.0.113.7:4711``, ``[2001:db8::1]:4711``, ``2001:db8::1``),
    or None if it is none."""
    text = hop.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
