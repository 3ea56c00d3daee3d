"""Prometheus metrics of the API role."""

from prometheus_client import Counter

QUOTA_REPORTS = Counter("throttlex_api_quota_reports_total", "Quota reports served")
AUTH_FAILURES = Counter("throttlex_api_auth_failures_total", "Requests refused for a missing API key")
INGESTED_EVENTS = Counter("throttlex_api_ingested_events_total", "Events sent to POST /v1/events", ["outcome"])
ANALYST_QUERIES = Counter("throttlex_api_analyst_queries_total", "Analyst SQL statements, by outcome", ["outcome"])
