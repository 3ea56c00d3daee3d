"""The metric names ThrottleX exports, read from the metric modules of every role."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY

from throttlex.api import metrics as api_metrics
from throttlex.ingest import metrics as ingest_metrics
from throttlex.processors import metrics as processors_metrics

MODULES = (ingest_metrics, processors_metrics, api_metrics)
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Every series name the ThrottleX metrics can produce (``_total``, ``_bucket``... included)."""
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("throttlex_"):
            names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bthrottlex_[a-z0-9_]+", text))
