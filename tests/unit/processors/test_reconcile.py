import re

from throttlex.processors.accounting.reconcile import route_regex, settled_range
from throttlex.processors.core.windows import SlidingWindow


def test_route_globs_become_anchored_regular_expressions() -> None:
    regex = re.compile(route_regex(["/v1/items/*", "/health?", "/a.b"]))
    assert regex.match("/v1/items/{item_id}")
    assert regex.match("/healthz")
    assert regex.match("/a.b")
    assert not regex.match("/a-b")  # the dot is literal
    assert not regex.match("/v2/items/1")
    assert not regex.match("x/v1/items/1")


def test_only_buckets_old_enough_are_compared() -> None:
    window = SlidingWindow(window_ms=10_000, bucket_ms=1_000)
    window.add(20_500, 1)  # head: bucket 20; the window holds buckets 11..20
    assert settled_range(window, now_ms=30_000, settle_ms=5_000) == (11, 21)
    assert settled_range(window, now_ms=19_000, settle_ms=2_000) == (11, 17)
    assert settled_range(window, now_ms=12_000, settle_ms=1_000) is None
