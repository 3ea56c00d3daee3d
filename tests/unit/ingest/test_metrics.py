"""The request path's counters, as Prometheus reads them."""

from prometheus_client import CollectorRegistry, generate_latest

from throttlex.ingest.metrics import RequestPathCounter


def test_request_path_counts_are_exposed_as_a_labelled_counter() -> None:
    registry = CollectorRegistry()
    counter = RequestPathCounter("demo_requests_total", "Requests by outcome", "outcome", ("admitted", "blocked"),
                                 registry=registry)  # fmt: skip
    counter.counts["admitted"] += 3
    counter.counts["refused"] += 1  # a label not given up front appears when first counted
    text = generate_latest(registry).decode()
    assert "# TYPE demo_requests_total counter" in text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}
    assert samples == {'demo_requests_total{outcome="admitted"}': 3.0, 'demo_requests_total{outcome="blocked"}': 0.0,
                       'demo_requests_total{outcome="refused"}': 1.0}  # fmt: skip
