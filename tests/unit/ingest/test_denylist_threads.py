"""The edge denylist's cache is changed on its event loop only: a check from another thread (the WSGI
middleware's request threads) hands an expired block's key back instead of dropping it, and the loop drops
it only if it is still expired (a renewal may have replaced it meanwhile). No Redis: blocks are applied as
the pub/sub messages would apply them."""

from __future__ import annotations

from throttlex.ingest.denylist import EdgeDenylist
from throttlex.ingest.denylist_entries import Block, encode_block


def test_a_check_with_on_expired_leaves_the_cache_to_the_loop() -> None:
    now = [1_000_000]
    edge = EdgeDenylist("redis://127.0.0.1:1/0", "t", clock=lambda: now[0])
    edge._apply(encode_block(Block("api_key=k1", now[0] + 1_000, "p")))
    request = {"api_key": "k1", "tenant": "acme", "ip": "", "route": "/", "method": "GET"}
    assert edge.check(request) is not None
    now[0] += 2_000
    handed_back: list[str] = []
    assert edge.check(request, on_expired=handed_back.append) is None
    assert handed_back == ["api_key=k1"] and "api_key=k1" in edge._cache  # not dropped off the loop

    edge._apply(encode_block(Block("api_key=k1", now[0] + 5_000, "p")))  # renewed before the loop got to it
    edge.forget_if_expired("api_key=k1")
    assert edge.check(request) is not None  # the renewal stands

    now[0] += 10_000
    edge.forget_if_expired("api_key=k1")
    assert "api_key=k1" not in edge._cache and not edge._kinds
